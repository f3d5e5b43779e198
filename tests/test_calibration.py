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


# --------------------------------------------------------------------------- the default mix


class ChatTok(CharTok):
    """CharTok with a chat template that marks each turn."""

    chat_template = "x"

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)


def _mix_data(tmp_path):
    import json

    root = tmp_path / "data"
    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "valid.txt").write_text("encyclopaedia text about rivers and kings. " * 300)
    (root / "gsm8k").mkdir()
    rows = [{"question": f"Tom has {i} apples and buys {i + 1} more. How many now?",
             "answer": f"He has {i} + {i + 1} = <<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1}.\n#### {2 * i + 1}"}
            for i in range(60)]
    (root / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _decode(row) -> str:
    return "".join(chr(int(i)) for i in row)


def test_mix_holds_both_kinds_in_the_share_and_in_the_models_template(tmp_path):
    from quanteval.calibration import mix_ids

    root = _mix_data(tmp_path)
    ids = mix_ids(ChatTok(), root, 8, 64, seed=0, chat_share=0.25, prompt_format="chat")
    assert ids.shape == (8, 64) and ids.dtype == torch.long
    texts = [_decode(r) for r in ids]
    chat = [t for t in texts if "apples" in t or "<user>" in t or "<assistant>" in t or "####" in t]
    assert len(chat) == 2 and len(texts) - len(chat) == 6  # 0.25 of 8 sequences are chat-formatted
    assert all("<<" not in t for t in chat)  # calculator annotations stripped
    assert torch.equal(ids, mix_ids(ChatTok(), root, 8, 64, seed=0, chat_share=0.25, prompt_format="chat"))
    plain = [_decode(r) for r in mix_ids(ChatTok(), root, 8, 64, seed=0, chat_share=0.5, prompt_format="plain")]
    assert not any("<user>" in t for t in plain) and any("Answer: " in t or "Question: " in t for t in plain)


def test_the_mix_is_interleaved_so_the_first_sequences_see_both(tmp_path):
    from quanteval.calibration import mix_ids

    root = _mix_data(tmp_path)
    kinds = ["chat" if ("apples" in _decode(r) or "<" in _decode(r)) else "text"
             for r in mix_ids(ChatTok(), root, 16, 48, seed=3, chat_share=0.5, prompt_format="chat")]
    assert kinds.count("chat") == 8 and kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)


def test_a_calibration_set_holding_a_test_item_fails_in_one_line(tiny_model, tiny_data, tmp_path, monkeypatch,
                                                               capsys):
    import shutil
    import sys

    from quanteval import cli

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    test_row = (data / "gsm8k" / "test.jsonl").read_text().splitlines()[3]
    with open(data / "gsm8k" / "train.jsonl", "a") as f:
        f.write(test_row + "\n")  # a GSM8K test item slipped into the train file
    cli._task_data_files.cache_clear()
    cli._check_calibration.cache_clear()
    monkeypatch.setattr(sys, "argv", ["quanteval", "model=hf", f"model.name_or_path={tiny_model}",
                                      f"data_dir={data}", f"results_dir={tmp_path / 'r'}", "preset=smoke",
                                      "method=gptq", "bits=4", "task=wikitext2"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1, lines
    assert "calibration.dataset=mix" in lines[0] and "task gsm8k evaluates" in lines[0] and "line 4" in lines[0]
    assert not (tmp_path / "r").exists()
