"""ifeval: NLTK's Punkt data is installed offline with NLTK's own parameters, scores equal lm-eval's
(with hand-checked values), lm-eval's TaskManager loads the task, and bad data fails with file:line.

Every test here runs with ``nltk.download`` replaced by a function that raises, and with
``QUANTEVAL_CACHE`` in a temporary directory (nothing is written under ``~/.cache``).
"""

from __future__ import annotations

import importlib
import json

import nltk
import pytest

from conftest import load_lm_eval_task
from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTokenizer

from quanteval.data import resolve_data_dir
from quanteval_tasks import ifeval
from quanteval_tasks.ifeval import (DATA, agg_inst_level_acc, dataset, doc_to_text, docs,
                                    ensure_punkt, process_results)

# byte sizes of NLTK's own punkt_tab/english files (nltk_data's tokenizers/punkt_tab.zip)
NLTK_ENGLISH_SIZES = {"abbrev_types.txt": 619, "collocations.tab": 594, "sent_starters.txt": 241,
                      "ortho_context.tab": 236303}
DR_SMITH = "Dr. Smith arrived. He sat down."


def _no_network(*args, **kwargs):
    raise AssertionError(f"nltk.download{args} called: the test must not need the network")


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTEVAL_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(nltk, "download", _no_network)
        yield


@pytest.fixture(scope="module")
def items() -> dict[int, dict]:
    return {d["key"]: d for d in docs()}


@pytest.fixture(scope="module")
def upstream():
    ensure_punkt()
    from lm_eval.tasks.ifeval import utils

    return utils


# ---------------------------------------------------------------- Punkt, offline


def test_ensure_punkt_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTEVAL_CACHE", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [])  # only what ensure_punkt adds can be found
    root = ensure_punkt()
    english = root / "tokenizers" / "punkt_tab" / "english"
    assert root == tmp_path.resolve() / "nltk_data" and nltk.data.path == [str(root)]
    assert {p.name: p.stat().st_size for p in english.iterdir()} == NLTK_ENGLISH_SIZES
    assert ensure_punkt() == root and nltk.data.path == [str(root)]  # idempotent
    assert nltk.data.find("tokenizers/punkt_tab/english/").path == str(english)

    # lm-eval's import-time check runs again; it would call nltk.download (which raises) if it failed
    from lm_eval.tasks.ifeval import instructions_util

    importlib.reload(instructions_util)
    assert isinstance(instructions_util._get_sentence_tokenizer(), PunktTokenizer)
    assert instructions_util.count_sentences(DR_SMITH) == 2
    assert nltk.word_tokenize("The KEY steps, then BUILD.") == ["The", "KEY", "steps", ",", "then", "BUILD", "."]


def test_punkt_parameters_are_nltks_english():
    from punkt.data import english as model

    ensure_punkt()
    params = PunktTokenizer("english")._params
    assert len(params.abbrev_types) == 156 and params.abbrev_types == set(model.ABBREV_TYPES)
    assert {"dr", "mr", "mrs", "prof", "sen", "inc", "jan", "u.s", "d.c", "p.m", "ph.d"} <= params.abbrev_types
    assert len(params.collocations) == 37 and params.collocations == set(model.COLLOCATIONS)
    assert len(params.sent_starters) == 39 and params.sent_starters == set(model.SENT_STARTERS)
    assert len(params.ortho_context) == 20366 and dict(params.ortho_context) == model.ORTHO_CONTEXT


@pytest.mark.parametrize("text, n", [
    (DR_SMITH, 2),
    ("Mr. and Mrs. Jones moved to Washington, D.C. in Jan. 2001. They like it there.", 2),
    ("Prof. Lee met Sen. Smith at 5 p.m. yesterday. They talked.", 2),
    ("One. Two! Three? Four.", 4),
])
def test_sentence_counts_use_the_trained_abbreviations(upstream, text, n):
    from lm_eval.tasks.ifeval import instructions_util

    assert instructions_util.count_sentences(text) == n
    if n == 2:  # an untrained Punkt splits after every abbreviation
        assert len(PunktSentenceTokenizer().tokenize(text)) > 2


def test_install_tolerates_a_concurrent_writer(tmp_path, monkeypatch):
    target = tmp_path / "english"
    real = ifeval.punkt_tab_files

    def other_process_finishes_first():
        files = real()
        target.mkdir()
        for name, text in files.items():
            (target / name).write_text(text)
        return files

    monkeypatch.setattr(ifeval, "punkt_tab_files", other_process_finishes_first)
    ifeval._install(target)
    assert [p.name for p in tmp_path.iterdir()] == ["english"]  # our temp dir is gone
    assert {p.name: p.stat().st_size for p in target.iterdir()} == NLTK_ENGLISH_SIZES

    broken = tmp_path / "broken" / "english"
    broken.mkdir(parents=True)
    (broken / "abbrev_types.txt").write_text("dr")
    monkeypatch.setattr(ifeval, "punkt_tab_files", real)
    with pytest.raises(OSError, match="broken/english exists but lacks"):
        ifeval._install(broken)
    assert [p.name for p in broken.parent.iterdir()] == ["english"]


# ---------------------------------------------------------------- scoring


def _scores(strict: list[bool], loose: list[bool] | None = None) -> dict:
    loose = strict if loose is None else loose
    return {"prompt_level_strict_acc": all(strict), "inst_level_strict_acc": strict,
            "prompt_level_loose_acc": all(loose), "inst_level_loose_acc": loose}


SCORED = [
    # change_case:english_lowercase
    (1051, "dear sam,\nplease go and vote on tuesday. every single vote counts, and yours matters too.",
     _scores([True])),
    (1051, "Dear Sam,\nplease go and vote on tuesday. every single vote counts, and yours matters too.",
     _scores([False], loose=[True])),  # loose drops the first line
    # length_constraints:number_sentences, less than 3: "Dr." does not end a sentence
    (3739, "Dr. Smith calls it jealousy. Shakespeare called it the green-eyed monster.", _scores([True])),
    (3739, "It is jealousy. Shakespeare named it. He called it the green-eyed monster.", _scores([False])),
    # change_case:capital_word_frequency, at least 3 (nltk.word_tokenize)
    (1592, "Wind and sun can power the grid. The KEY steps are to BUILD storage and EXPAND transmission.",
     _scores([True])),
    (1592, "Only TWO words, NOT three.", _scores([False])),
    # detectable_format:json_format
    (13, '```JSON\n{"history": "Prospect Park opened in 1867."}\n```', _scores([True])),
    (13, 'Here is the JSON:\n{"history": "Prospect Park opened in 1867."}', _scores([False], loose=[True])),
    (13, "Prospect Park opened in 1867.", _scores([False])),
    # change_case:english_lowercase + length_constraints:number_sentences (less than 5)
    (1535, "dear hiring manager, i would love to guide visitors through beijing. i speak english and "
           "mandarin. thank you.", _scores([True, True])),
    (1535, "dear hiring manager. i would love to guide visitors. i know beijing. i speak english. "
           "i speak mandarin. thank you.", _scores([True, False])),
    # length_constraints:number_words, less than 300
    (1092, "a short trip report about kyoto and tokyo.", _scores([True])),
    (1092, " ".join(["word"] * 300), _scores([False])),
    # an empty response follows nothing
    (1051, "", _scores([False])),
]


@pytest.mark.parametrize("key, response, expected", SCORED)
def test_scores_equal_lm_evals(items, upstream, key, response, expected):
    doc = items[key]
    got = process_results(doc, [response])
    assert got == upstream.process_results(doc, [response])
    assert got == expected


def test_language_checks_are_deterministic(items):
    # unseeded, langdetect calls "hello world" en or nl at random; ifeval seeds it
    results = {process_results(items[1051], ["hello world"])["prompt_level_strict_acc"] for _ in range(30)}
    assert len(results) == 1


def test_inst_level_aggregation(upstream):
    lists = [[True, False], [True], [False, False, True]]
    assert agg_inst_level_acc(lists) == upstream.agg_inst_level_acc(lists) == pytest.approx(3 / 6)


# ---------------------------------------------------------------- docs and lm-eval


def test_docs(items):
    assert len(items) == 541
    first = docs()[0]
    assert set(first) == {"id", "key", "prompt", "instruction_id_list", "kwargs"}
    assert first["id"] == "1000" and first["key"] == 1000
    assert first["instruction_id_list"] == ["punctuation:no_comma", "detectable_format:number_highlighted_sections",
                                            "length_constraints:number_words"]
    assert first["kwargs"] == [{}, {"num_highlights": 3}, {"relation": "at least", "num_words": 300}]
    assert doc_to_text(first) == first["prompt"] and first["prompt"].startswith("Write a 300+ word summary")


def test_dataset_ignores_extra_metadata():
    ds = dataset(version=1.0, quanteval={"chat": True})
    assert list(ds) == ["test"] and ds["test"].num_rows == 541 and ds["test"][0]["id"] == "1000"


@pytest.fixture(scope="module")
def lm_eval_task():
    return load_lm_eval_task("ifeval")


def test_lm_eval_loads_task(items, lm_eval_task):
    task = lm_eval_task
    test_docs = list(task.test_docs())
    assert len(test_docs) == 541 and test_docs[0]["id"] == "1000"
    assert task.doc_to_text(test_docs[0]) == items[1000]["prompt"]
    assert task.config.generation_kwargs == {"until": [], "do_sample": False, "max_gen_toks": 1280}
    meta = dict(task.config.metadata["quanteval"])
    assert meta.pop("sweep")["kind"] == "chat"  # how quanteval sweeps it (quanteval_tasks.task_table)
    assert meta == {"chat": True, "primary": "prompt_level_strict_acc",
                                                 "binary": True, "teacher_forced": "baseline", "tags": []}
    assert set(task.aggregation()) == {"prompt_level_strict_acc", "inst_level_strict_acc",
                                       "prompt_level_loose_acc", "inst_level_loose_acc"}
    assert task.aggregation()["inst_level_loose_acc"]([[True, False], [True]]) == pytest.approx(2 / 3)


def test_lm_eval_docs_score_like_the_file(items, lm_eval_task):
    # the dataset's kwargs carry every key (None when unused), as on the hub; scores must not change
    by_key = {d["key"]: d for d in lm_eval_task.test_docs()}
    assert by_key[1592]["kwargs"][0]["num_words"] is None
    for key, response, expected in SCORED:
        assert lm_eval_task.process_results(by_key[key], [response]) == expected


def test_malformed_line_names_file_and_line(tmp_path):
    lines = (resolve_data_dir(None) / DATA).read_text(encoding="utf-8").splitlines()[:2]
    (tmp_path / "ifeval").mkdir()
    path = tmp_path / DATA
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [d["id"] for d in docs(data_dir=str(tmp_path))] == ["1000", "1001"]

    path.write_text("\n".join([*lines, '{"key": 1005, "prompt": ']) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"ifeval/input_data\.jsonl:3: malformed JSON"):
        docs(data_dir=str(tmp_path))

    path.write_text(json.dumps({"key": 7, "prompt": "hi"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"record 1: missing field\(s\) instruction_id_list, kwargs"):
        docs(data_dir=str(tmp_path))
