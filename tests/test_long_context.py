"""Long context: the needle and var_track tasks (lm-eval's RULER generators on quanteval's haystack), the
long-window fidelity task with its position buckets, their report charts and rows, and their bad input.

The CLI tests use a copy of the tiny random Llama whose window is raised to 4096 tokens (RoPE has no
hard limit), so 512- and 1024-token prompts run in seconds; the slow one uses the real SmolLM2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from quanteval import results
from quanteval.config import ModelConfig
from quanteval.evaluate import fidelity
from quanteval.models import load_tokenizer, tokenizer_source

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def long_model(tiny_model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_long") / "model"
    shutil.copytree(tiny_model, d)
    conf = json.loads((d / "config.json").read_text())
    conf["max_position_embeddings"] = 4096
    (d / "config.json").write_text(json.dumps(conf))
    return d


def args(model: Path, data: Path, res: Path, *extra: str) -> list[str]:
    return ["model=hf", f"model.name_or_path={model}", f"data_dir={data}", f"results_dir={res}", "preset=smoke",
            *extra]


# --------------------------------------------------------------------------- the generators


def test_needle_items_fill_their_length_and_hold_their_needle(long_model, tiny_data):
    from quanteval_tasks import needle

    kw = dict(data_dir=str(tiny_data), lengths=[512, 1024], keys=[1, 4], tokenizer=str(long_model))
    docs = needle.docs(per_length=3, **kw)
    assert [d["length"] for d in docs] == [512] * 3 + [1024] * 3
    tok = load_tokenizer(str(long_model))
    for d in docs:
        n = needle.prompt_tokens(tok, d["text"])
        assert n == d["n_tokens"] and d["length"] - 40 <= n <= d["length"], (n, d["length"])
        assert all(a in d["text"] for a in d["answers"]) and d["query"] in d["text"]
        assert 0 <= d["depth"] <= 100 and d["depth"] % 10 == 0
        assert d["text"].count("One of the special magic numbers") == d["keys"]
    assert [d["keys"] for d in docs[:3]] == [1, 4, 1]
    again = needle.docs(per_length=2, **kw)  # seeded: the same items, and raising per_length keeps them
    assert [d["text"] for d in again] == [docs[0]["text"], docs[1]["text"], docs[3]["text"], docs[4]["text"]]
    assert needle.process_results(docs[0], [f"It is {docs[0]['answers'][0]}."]) == {"acc": 1.0}
    assert needle.process_results(docs[0], ["I do not know."]) == {"acc": 0.0}


def test_var_track_items_by_hops(long_model):
    from quanteval_tasks import var_track

    docs = var_track.docs(lengths=[512], hops=[1, 3], per_hops=2, tokenizer=str(long_model))
    assert [d["hops"] for d in docs] == [1, 1, 3, 3]
    for d in docs:
        assert len(d["answers"]) == d["hops"] + 1 and all(f"VAR {a} " in d["text"] for a in d["answers"])
        assert d["n_tokens"] <= 512
    assert var_track.process_results(docs[2], [" ".join(docs[2]["answers"][:2])])["partial"] == 0.5


def test_lengths_auto_follow_the_window_and_the_preset():
    from quanteval_tasks.needle import resolve_lengths

    assert resolve_lengths("auto", 8192) == [1024, 2048, 4096, 8192]
    assert resolve_lengths("auto", 131072, "full")[-1] == 131072
    assert resolve_lengths("auto", 32768, "full")[-1] == 32768
    assert resolve_lengths("auto", 2048, "default") == [1024, 2048]


# --------------------------------------------------------------------------- long-window fidelity


def test_chunked_logits_equal_the_full_head(tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    w = torch.randint(0, model.config.vocab_size, (600,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = fidelity._logits(model, w)
        monkeypatch.setattr(fidelity, "LONG", 100)
        chunked = fidelity._logits(model, w)
        assert isinstance(chunked, fidelity._ChunkedLogits) and chunked.shape == tuple(full.shape)
        torch.testing.assert_close(chunked[130:300], full[130:300], rtol=1e-5, atol=1e-5)


def test_by_position_buckets(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    windows = torch.randint(0, model.config.vocab_size, (2, 1101), generator=torch.Generator().manual_seed(1))
    base = fidelity.baseline_stats(model, windows, top_k=8)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    m = fidelity.compare(model, windows, base)
    assert list(m["by_position"]) == ["0-512", "512-1K", "1K-2K"]
    assert [b["n_tokens"] for b in m["by_position"].values()] == [2 * 512, 2 * 512, 2 * 76]
    weighted = sum(b["kl_mean"] * b["n_tokens"] for b in m["by_position"].values()) / m["n_tokens"]
    assert weighted == pytest.approx(m["kl_mean"], rel=1e-6)
    assert fidelity.position_buckets(511) == [("0-512", 0, 511)]


# --------------------------------------------------------------------------- end to end, and the report


@pytest.fixture(scope="module")
def long_sweep(long_model, tiny_data, tmp_path_factory):
    res = tmp_path_factory.mktemp("long_results")
    common = args(long_model, tiny_data, res, "method=none,rtn", "bits=8,2", "force_generate=true")
    for extra in (["task=needle", "task.options.lengths=[512,1024]", "task.limit=2"],
                  ["task=var_track", "task.options.lengths=[512]", "task.options.hops=[1,2]", "task.limit=1"],
                  ["task=wikitext2_long", "task.seq_len=1100", "task.n_windows=2"]):
        proc = run_cli(*common, *extra, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    return res


@pytest.mark.slow  # three whole CLI sweeps (long_sweep: about 60 s)
def test_long_context_runs_record_lengths_hops_and_buckets(long_sweep):
    runs = {}
    for f in (long_sweep / "default" / "runs").glob("*.json"):
        rec = results.read_run(f)
        runs[(rec["task"], rec["variant"]["label"])] = rec
    needle = runs[("needle", "rtn w2 g64")]
    assert needle["status"] == "ok" and needle["metrics"]["n_items"] == 4
    assert set(needle["breakdown"]["length"]) == {"512", "1024"}
    assert needle["task_meta"]["kind"] == "long context"
    assert set(runs[("var_track", "baseline")]["breakdown"]["hops"]) == {"1", "2"}
    long = runs[("wikitext2_long", "rtn w2 g64")]["metrics"]
    assert list(long["by_position"]) == ["0-512", "512-1K", "1K-2K"] and long["kl_mean@512-1K"] > 0
    assert runs[("wikitext2_long", "baseline")]["metrics"]["kl_mean"] == 0


@pytest.mark.slow  # three whole CLI sweeps (long_sweep: about 60 s)
def test_long_context_report(long_sweep):
    report = long_sweep / "default" / "report"
    names = {p.name for p in report.glob("*.png")}
    assert "needle_by_length__hf.png" in names and "var_track_by_hops__hf.png" in names
    assert "needle_depth_x_length__hf.png" in names and "wikitext2_long_kl_by_position__hf.png" in names
    page = (report / "index.html").read_text()
    assert "needle: acc at length=512" in page and "needle: acc at length=1024" in page
    assert "wikitext2_long: mean KL at 512-1K" in page
    assert "long context" in page  # a kind of work in the recommendation


# --------------------------------------------------------------------------- bad input: one line, before work


@pytest.mark.parametrize("lengths, expect", [
    ("[8192]", "8192 tokens is above the model's window (max_position_embeddings=4096)"),
    ("[0]", "0 is not a positive integer"),
    ("[1.5]", "1.5 is not a positive integer"),
])
def test_bad_lengths(long_model, tiny_data, tmp_path, lengths, expect):
    proc = run_cli(*args(long_model, tiny_data, tmp_path, "task=needle", f"task.options.lengths={lengths}"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert not (tmp_path / "default").exists()


def test_a_haystack_too_short(long_model, tiny_data, tmp_path):
    """A WikiText-2 test file of a few hundred tokens cannot hold a 4096-token prompt."""
    from conftest import synthetic_text

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "wikitext2" / "test.txt").write_text(synthetic_text(20, 2))
    proc = run_cli(*args(long_model, data, tmp_path, "method=none", "task=needle", "task.options.lengths=[4096]"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "haystack" in line and "shorter than the longest length, 4096 tokens" in line, line


def test_long_window_above_the_window(long_model, tiny_data, tmp_path):
    proc = run_cli(*args(long_model, tiny_data, tmp_path, "task=wikitext2_long", "task.seq_len=8192"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "task.seq_len=8192" in proc.stderr and "max_position_embeddings=4096" in proc.stderr


# --------------------------------------------------------------------------- the real model (slow)


@pytest.mark.slow
def test_smollm2_retrieves_needles(tmp_path):
    """The embedded model finds a needle at 512 and 1024 tokens (what makes this kind of work worth watching)."""
    proc = run_cli(f"results_dir={tmp_path}", "method=none", "task=needle", "task.options.lengths=[512,1024]",
                   "task.limit=2", "preset=smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (f,) = (tmp_path / "default" / "runs").glob("needle__*.json")
    rec = results.read_run(f)
    assert rec["status"] == "ok" and rec["metrics"]["acc"] >= 0.5, rec["metrics"]
    assert load_tokenizer(tokenizer_source(ModelConfig())) is not None
