"""Calibration data: sources, determinism, and the errors a user gets for bad files."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from quanteval.calibration import calibration_file, calibration_ids, read_text


class CharTok:
    """A stand-in tokenizer: one id per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_windows_are_deterministic_and_sized(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("hello world " * 200)
    a = calibration_ids(CharTok(), f, 5, 32, seed=0)
    b = calibration_ids(CharTok(), f, 5, 32, seed=0)
    assert a.shape == (5, 32) and torch.equal(a, b)
    assert not torch.equal(a, calibration_ids(CharTok(), f, 5, 32, seed=1))


def test_jsonl_sources(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "alpha"}\n\n{"question": "q?", "answer": "#### 4"}\n')
    assert read_text(f) == "alpha\n\nq?\n#### 4"


@pytest.mark.parametrize(
    "content, needle",
    [
        ("", "empty"),
        ('{"text": "ok"}\n{"text": \n', "c.jsonl:2: malformed JSON"),
        ('{"other": 1}\n', "c.jsonl:1: no 'text'"),
        ("[1, 2]\n", "c.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, needle):
    f = tmp_path / "c.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=needle.replace("?", r"\?")):
        read_text(f)


def test_too_short_and_bad_counts(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("tiny")
    with pytest.raises(ValueError, match="short.txt: 4 tokens, too short for calibration seq_len=32"):
        calibration_ids(CharTok(), f, 2, 32, 0)
    with pytest.raises(ValueError, match="n_samples=0"):
        calibration_ids(CharTok(), f, 0, 2, 0)
    with pytest.raises(FileNotFoundError, match="calibration.path="):
        calibration_file("wikitext2", str(tmp_path / "missing.jsonl"), None)
    with pytest.raises(ValueError, match="calibration.dataset='c4'"):
        calibration_file("c4", None, tmp_path)


def test_bad_calibration_file_fails_before_work(tiny_model, tiny_data, tmp_path):
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    proc = run_cli("model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}", f"results_dir={tmp_path}",
                   "preset=smoke", "method=rtn,gptq", "bits=4", f"calibration.path={bad}")
    assert proc.returncode == 2, proc.stderr
    assert f"{bad}:2: malformed JSON" in proc.stderr
    assert not (tmp_path / "default").exists()


def test_short_calibration_fails_that_run_only(tiny_model, tiny_data, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the river .\n")
    proc = run_cli("model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}", f"results_dir={tmp_path}",
                   "preset=smoke", "preset.n_windows=2", "preset.seq_len=64", "method=rtn,gptq", "bits=4", "task=wikitext2",
                   f"calibration.path={short}")
    assert proc.returncode == 1
    from quanteval.results import load

    df = load(tmp_path / "default").set_index("method")
    assert df.loc["rtn", "status"] == "ok"  # the completed run is kept
    assert df.loc["gptq", "status"] == "failed" and "too short for calibration" in df.loc["gptq", "error"]
    assert "1 run(s) failed: wikitext2 gptq w4 g64 (" in proc.stderr
