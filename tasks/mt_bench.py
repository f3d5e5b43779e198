"""MT-Bench first turns (open-ended chat): loader only.

No reference answers and no judge model here: quanteval measures each variant against the
baseline's own answers (teacher-forced KL and top-1 agreement on them, ROUGE-L between the two
answers, identical-answer rate). ``process_results`` reports the answer's length in words, the
only reference-free figure, so that lm-eval can run the task too. A judge can be plugged in later
through ``quanteval.evaluate.generative.JUDGES``.
"""

from __future__ import annotations

from quanteval_tasks.common import load_rows, to_dataset

DATA = "mt_bench/question.jsonl"  # relative to the data directory


def docs(data_dir=None, **_) -> list[dict]:
    rows = load_rows(DATA, data_dir)
    return [{"id": str(r["question_id"]), "category": r["category"], "prompt": r["turns"][0]} for r in rows]


def dataset(**kwargs):
    return to_dataset(docs(**kwargs))


def doc_to_text(doc: dict) -> str:
    return doc["prompt"]


def process_results(doc: dict, results: list[str]) -> dict:
    return {"words": float(len(results[0].split()))}
