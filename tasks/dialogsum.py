"""DialogSum (summarization): loader and ROUGE scoring against the three reference summaries.

ROUGE-1/2/L F1 with the ``rouge-score`` package (Porter stemming, as its authors' reference
setting). The primary figure is the maximum over the three references (``rougeL``); the mean over
them is reported too (``rougeL_mean``). Data licence: CC BY-NC-SA 4.0 (cylnlp/dialogsum).
"""

from __future__ import annotations

from functools import lru_cache

from quanteval_tasks.common import load_rows, to_dataset

DATA = "dialogsum/test.jsonl"  # relative to the data directory

INSTRUCTION = "Summarize the following dialogue in one or two sentences."
ROUGE = ("rouge1", "rouge2", "rougeL")


def _from_hub(row: dict) -> dict:  # knkarthick/dialogsum has one summary per row
    return {"fname": row["id"], "dialogue": row["dialogue"], "summary1": row["summary"],
            "summary2": row["summary"], "summary3": row["summary"]}


def docs(data_dir=None, **_) -> list[dict]:
    rows = load_rows(DATA, data_dir, hub=("knkarthick/dialogsum", None, "test"),
                     from_hub=_from_hub)
    return [{"id": r["fname"], "dialogue": r["dialogue"],
             "references": [r[k] for k in ("summary1", "summary2", "summary3") if r.get(k)]} for r in rows]


def dataset(**kwargs):
    return to_dataset(docs(**kwargs))


def doc_to_text(doc: dict) -> str:
    return f"{INSTRUCTION}\n\n{doc['dialogue']}"


def doc_to_target(doc: dict) -> str:
    return doc["references"][0]


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=True)


def process_results(doc: dict, results: list[str]) -> dict:
    """ROUGE F1 of the summary: max over the references (primary) and mean over them."""
    pred = results[0].strip()
    per_ref = [_scorer().score(ref, pred) for ref in doc["references"]]
    out = {}
    for k in ROUGE:
        vals = [s[k].fmeasure for s in per_ref]
        out[k] = max(vals)
        out[f"{k}_mean"] = sum(vals) / len(vals)
    return out
