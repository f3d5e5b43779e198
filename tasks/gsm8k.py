"""GSM8K (multi-step math): loader and reference text; scoring is lm-eval's (filters in gsm8k.yaml).

Each doc also carries ``n_steps``, the number of calculator annotations (``<<48/2=24>>``) in its
reference solution, so accuracy and fidelity can be broken down by how many steps a problem takes.
"""

from __future__ import annotations

import re

from quanteval_tasks.common import load_rows, to_dataset

DATA = "gsm8k/test.jsonl"  # relative to the data directory

INSTRUCTION = ("Solve the problem step by step. End your answer with a final line of the form "
               "'#### <number>'.")
_CALC = re.compile(r"<<[^>]*>>")


def _from_hub(row: dict) -> dict:
    return {"question": row["question"], "answer": row["answer"]}


def docs(data_dir=None, **_) -> list[dict]:
    rows = load_rows(DATA, data_dir, hub=("openai/gsm8k", "main", "test"), from_hub=_from_hub)
    return [{"id": f"gsm8k-{i}", "question": r["question"], "answer": r["answer"],
             "n_steps": len(_CALC.findall(r["answer"]))} for i, r in enumerate(rows)]


def dataset(**kwargs):
    return to_dataset(docs(**kwargs))


def doc_to_text(doc: dict) -> str:
    return f"{doc['question']}\n{INSTRUCTION}"


def doc_to_target(doc: dict) -> str:
    """The reference solution as plain text (calculator annotations removed), ending '#### N'."""
    return _CALC.sub("", doc["answer"])
