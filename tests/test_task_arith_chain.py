"""arith_chain: deterministic, prefix-stable k-step problems whose worked solutions check out,
GSM8K-style scoring, and loading through lm-eval's TaskManager."""

from __future__ import annotations

import re

import pytest

from quanteval_tasks import TASK_DIR
from quanteval_tasks.arith_chain import (MAX_VALUE, dataset, doc_to_target, doc_to_text, docs, extract,
                                         process_results)

STEP = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")


@pytest.fixture(scope="module")
def items() -> list[dict]:
    return docs(per_k=25)


def test_ids_order_and_determinism(items):
    assert [d["id"] for d in items[:3]] == ["k1-0", "k1-1", "k1-2"]
    assert [d["k"] for d in items] == sorted(d["k"] for d in items)
    assert len(items) == 8 * 25 and len({d["id"] for d in items}) == len(items)
    assert docs(per_k=25) == items
    other = docs(seed=1, per_k=25)
    assert [d["question"] for d in other] != [d["question"] for d in items]


def test_prefix_stable():
    small, large = docs(k_max=4, per_k=3), docs(k_max=6, per_k=5)
    for k in range(1, 5):
        assert [d for d in small if d["k"] == k] == [d for d in large if d["k"] == k][:3]
    assert docs(k_min=3, k_max=3, per_k=2) == [d for d in small if d["k"] == 3][:2]


def test_solution_steps_reproduce_answer(items):
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for d in items:
        *steps, final = d["solution"].splitlines()
        assert len(steps) == d["k"] and final == f"#### {d['answer']}"
        prev = None
        for line in steps:
            a, op, b, c = STEP.match(line).groups()
            a, b, c = int(a), int(b), int(c)
            if op == "/":
                assert b > 0 and a % b == 0 and a // b == c, line
            else:
                assert ops[op](a, b) == c, line
            assert prev is None or a == prev, f"{d['id']}: step does not start from the previous result"
            assert 1 <= c <= MAX_VALUE
            prev = c
        assert prev == d["answer"] and isinstance(d["answer"], int)
        assert 1 <= int(STEP.match(steps[0]).group(1)) <= MAX_VALUE


def test_question_has_k_operations(items):
    for d in items:
        sentences = re.findall(r"[^.?]+[.?]", d["question"])
        assert len(sentences) == d["k"] + 2, d["question"]  # the start, k operations, the question
        assert sentences[-1].strip().startswith("How many") and sentences[-1].endswith("?")
        assert str(STEP.match(d["solution"].splitlines()[0]).group(1)) in sentences[0]


def test_prompt_and_target(items):
    d = items[0]
    assert doc_to_text(d).startswith(d["question"] + "\n") and "'#### <number>'" in doc_to_text(d)
    assert doc_to_target(d) == d["solution"]


@pytest.mark.parametrize("response, flexible, strict", [
    ("#### 1,234", "1234", "1234"),
    ("The total is $12.", "12", "[invalid]"),
    ("I cannot tell.", "[invalid]", "[invalid]"),
    ("3 + 4 = 7\n7 * 2 = 14\n#### 14", "14", "14"),
    ("#### 14\nActually it is 15", "15", "14"),
    ("#### 5 and #### 6", "6", "5"),
    ("-3 apples", "-3", "[invalid]"),
])
def test_extract(response, flexible, strict):
    assert extract(response, strict=False) == flexible
    assert extract(response, strict=True) == strict


def test_process_results():
    doc = {"answer": 14}
    assert process_results(doc, ["3 + 4 = 7\n7 * 2 = 14\n#### 14"]) == {"acc": 1.0, "acc_strict": 1.0}
    assert process_results(doc, ["7 * 2 = 15\n#### 15"]) == {"acc": 0.0, "acc_strict": 0.0}
    assert process_results(doc, ["So she has 14 left."]) == {"acc": 1.0, "acc_strict": 0.0}
    assert process_results(doc, ["#### 14\nWait, 14 + 1 = 15."]) == {"acc": 0.0, "acc_strict": 1.0}
    assert process_results({"answer": 1234}, ["#### $1,234."]) == {"acc": 1.0, "acc_strict": 0.0}
    assert process_results(doc, [""]) == {"acc": 0.0, "acc_strict": 0.0}


@pytest.mark.parametrize("kwargs, name", [
    ({"per_k": 0}, "per_k"), ({"k_min": 0}, "k_min"), ({"k_max": 2.5}, "k_max"),
    ({"k_min": 5, "k_max": 3}, "k_min"), ({"per_k": True}, "per_k"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        docs(**kwargs)


def test_dataset_ignores_extra_metadata():
    ds = dataset(version=1.0, seed=0, k_min=1, k_max=2, per_k=2, quanteval={"chat": True})
    assert list(ds) == ["test"] and ds["test"]["id"] == ["k1-0", "k1-1", "k2-0", "k2-1"]


def test_lm_eval_loads_task():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    task = tm.load("quanteval_arith_chain")["tasks"]["quanteval_arith_chain"]
    test_docs = list(task.test_docs())
    assert len(test_docs) == 8 * 20 and test_docs[0] == docs(per_k=1)[0]
    assert task.doc_to_text(test_docs[0]) == doc_to_text(test_docs[0])
    assert task.doc_to_target(test_docs[0]) == test_docs[0]["solution"]
    assert task.config.metadata["quanteval"]["tags"] == ["k"]
    reply = f"#### {test_docs[0]['answer']}"
    assert task.process_results(test_docs[0], [reply]) == {"acc": 1.0, "acc_strict": 1.0}
