"""humaneval: the 164 problems load, reference solutions pass and bad or hostile completions fail
with a reason in the sandbox, the sandbox choice fails closed, and lm-eval's TaskManager loads it."""

from __future__ import annotations

import gzip
import os

import pytest

from conftest import load_lm_eval_task

import quanteval.sandbox as sb
from quanteval.sandbox import SandboxUnavailable, bwrap_path
from quanteval_tasks.humaneval import (dataset, doc_to_target, doc_to_text, docs, problems_file,
                                       process_results, program, score_item)

needs_bwrap = pytest.mark.skipif(bwrap_path() is None, reason="bubblewrap not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def items() -> list[dict]:
    return docs()


def test_docs(items):
    assert len(items) == 164 and len({d["id"] for d in items}) == 164
    first = items[0]
    assert first["id"] == first["task_id"] == "HumanEval/0" and items[-1]["id"] == "HumanEval/163"
    assert set(first) == {"id", "task_id", "prompt", "canonical_solution", "test", "entry_point"}
    assert first["entry_point"] == "has_close_elements" and "def check(candidate)" in first["test"]
    assert problems_file().name == "HumanEval.jsonl.gz"


def test_prompt_target_and_program(items):
    d = items[0]
    assert doc_to_text(d) == d["prompt"] and doc_to_text(d).rstrip().endswith('"""')
    assert doc_to_target(d) == d["canonical_solution"]
    src = program(d, "    return False\n")
    assert src == d["prompt"] + "    return False\n\n" + d["test"] + "\ncheck(has_close_elements)\n"
    compile(src, "solution.py", "exec")


def test_dataset_ignores_extra_metadata():
    ds = dataset(version=1.0, quanteval={"chat": False})
    assert list(ds) == ["test"] and ds["test"].num_rows == 164 and ds["test"][0]["id"] == "HumanEval/0"


def test_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl.gz"):
        docs(path=str(tmp_path / "nope.jsonl.gz"))
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="bad.jsonl.gz") as err:
        docs(path=str(bad))
    assert "\n" not in str(err.value)
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"task_id": "HumanEval/0", "prompt": "x"}\n{oops\n'))
    with pytest.raises(ValueError, match=r"broken.jsonl.gz: line 1: missing field\(s\) canonical_solution"):
        docs(path=str(broken))


@needs_bwrap
def test_canonical_solutions_pass(items):
    for d in items[:3]:
        assert score_item(d, d["canonical_solution"]) == ({"pass@1": 1.0}, {"reason": "passed"}), d["id"]
    assert process_results(items[0], [items[0]["canonical_solution"]]) == {"pass@1": 1.0}


@needs_bwrap
@pytest.mark.parametrize("completion, reason", [
    ("", "error: AssertionError"),                                   # the body is only the docstring
    ("    return not True\n", "error: AssertionError"),              # wrong
    ("    return undefined_name\n", "error: NameError: name 'undefined_name' is not defined"),
    ("    return (\n", "error: SyntaxError"),
])
def test_bad_completions_fail_with_reason(items, completion, reason):
    scores, info = score_item(items[0], completion)
    assert scores == {"pass@1": 0.0} and info["reason"].startswith(reason), info
    assert process_results(items[0], [completion]) == {"pass@1": 0.0}


@needs_bwrap
def test_hostile_completions_are_contained(items):
    kill = ("    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n"
            f"    os.kill({os.getpid()}, signal.SIGKILL)\n    return True\n")
    scores, info = score_item(items[0], kill)
    assert scores == {"pass@1": 0.0}
    assert info["reason"].startswith("error: ProcessLookupError") or info["reason"].startswith("killed"), info
    scores, info = score_item(items[0], "    while True:\n        pass\n", timeout_s=1)
    assert scores == {"pass@1": 0.0} and info["reason"] in ("timeout", "cpu")
    assert score_item(items[1], items[1]["canonical_solution"])[0] == {"pass@1": 1.0}  # still scoring


def test_sandbox_none_runs_without_bwrap(items, monkeypatch):
    monkeypatch.setattr(sb, "bwrap_path", lambda: None)
    d = items[0]
    assert score_item(d, d["canonical_solution"], sandbox="none") == ({"pass@1": 1.0}, {"reason": "passed"})
    assert score_item(d, "", sandbox="none")[0] == {"pass@1": 0.0}
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):  # fail closed: never a silent fallback
        score_item(d, d["canonical_solution"])
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        process_results(d, [d["canonical_solution"]])


@pytest.mark.parametrize("value", ["docker", "", "None", None])
def test_bad_sandbox_value(items, value):
    with pytest.raises(ValueError, match="sandbox"):
        score_item(items[0], items[0]["canonical_solution"], sandbox=value)


@pytest.fixture(scope="module")
def lm_eval_task():
    return load_lm_eval_task("humaneval")


def test_lm_eval_loads_task(items, lm_eval_task):
    task = lm_eval_task
    test_docs = list(task.test_docs())
    assert len(test_docs) == 164 and test_docs[0] == items[0]
    assert task.doc_to_text(test_docs[0]) == items[0]["prompt"]
    assert task.doc_to_target(test_docs[0]) == items[0]["canonical_solution"]
    assert task.config.generation_kwargs["until"] == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    meta = dict(task.config.metadata["quanteval"])
    assert meta.pop("sweep")["kind"] == "code"  # how quanteval sweeps it (quanteval_tasks.task_table)
    assert meta == {"chat": False, "primary": "pass@1", "binary": True,
                                                 "teacher_forced": "reference", "tags": []}


@needs_bwrap
def test_lm_eval_scores_through_the_sandbox(items, lm_eval_task):
    d = next(iter(lm_eval_task.test_docs()))
    assert lm_eval_task.process_results(d, [d["canonical_solution"]]) == {"pass@1": 1.0}
    assert lm_eval_task.process_results(d, ["    return None\n"]) == {"pass@1": 0.0}
