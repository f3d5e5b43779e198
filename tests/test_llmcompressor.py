"""method=llmcompressor: llm-compressor itself, in its own venv, on the tiny random Llama.

These need llm-compressor's venv (``python -m quanteval.methods.llmcompressor --setup``); ``.ci/run`` makes
it and sets QUANTEVAL_REQUIRE_LLMC=1, so in CI a missing venv fails instead of skipping.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import run_cli
from quanteval.methods import QuantSpec
from quanteval.methods.llmcompressor import LLMCompressorError, job_for, layer_from_llmc, run_worker, venv_python

try:
    venv_python()
    HAVE_VENV = True
except LLMCompressorError:
    HAVE_VENV = False
    if os.environ.get("QUANTEVAL_REQUIRE_LLMC") == "1":
        raise
needs_venv = pytest.mark.skipif(not HAVE_VENV, reason="llm-compressor's venv is not made "
                                                      "(python -m quanteval.methods.llmcompressor --setup)")


def _args(tiny_model, tiny_data, out, *extra):
    return ["model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}", f"results_dir={out}",
            "preset=smoke", "preset.n_windows=2", "preset.seq_len=64", "preset.calib_samples=4",
            "preset.calib_seq_len=64", "task=wikitext2", "group_size=32", *extra]


@pytest.mark.slow
@needs_venv
@pytest.mark.parametrize("modifier, sym", [("gptq", False), ("gptq", True), ("rtn", False)])
def test_our_reading_equals_llmcompressors_own_dequantization(tiny_model, modifier, sym):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quanteval.config import LLMCompressorConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = torch.randint(3, len(tok), (4, 48), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=4, group_size=32, sym=sym)
    out = run_worker(model, tok, ids, job_for(spec, LLMCompressorConfig(modifier=modifier)))
    assert len(out["layers"]) == 2 * 7  # every linear of both blocks
    for name, layer in out["layers"].items():
        lq = layer_from_llmc(layer, spec)
        assert lq.codes.min() >= 0 and lq.codes.max() <= 15
        assert torch.equal(lq.dequantize(), layer["dequantized"]), name  # bit for bit
        if modifier == "rtn":  # RTN leaves the model's weights as they were: its codes are within half a step
            w = model.get_submodule(name).weight.detach()
            step = lq.scales.float()[:, lq.g_idx.long()]
            assert ((lq.dequantize() - w).abs() <= step / 2 + 1e-6).float().mean() > 0.99


@pytest.mark.slow
@needs_venv
def test_a_sweep_with_llmcompressor_beside_quantevals_own(tiny_model, tiny_data, tmp_path):
    from quanteval.results import load

    proc = run_cli(*_args(tiny_model, tiny_data, tmp_path, "method=none,gptq,llmcompressor", "bits=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load(tmp_path / "default").set_index("label")
    assert set(df.status) == {"ok"}
    assert {"baseline", "gptq w4 g32", "llmc-gptq w4 g32"} <= set(df.index)
    llmc, ours = df.loc["llmc-gptq w4 g32"], df.loc["gptq w4 g32"]
    assert llmc.method == "llmc-gptq" and llmc.effective_bits == pytest.approx(ours.effective_bits)
    assert 0 < llmc.kl_mean < 1  # quantised, and not garbage
    index = (tmp_path / "default" / "report" / "index.html").read_text()
    assert "llmc-gptq w4 g32" in index  # its column sits beside quanteval's


@pytest.mark.slow
@needs_venv
def test_a_failing_llmcompressor_run_is_recorded_with_its_last_line(tiny_model, tiny_data, tmp_path):
    from quanteval.results import load

    # group size 48 does not divide the tiny model's 64 input columns: llm-compressor refuses it
    args = _args(tiny_model, tiny_data, tmp_path, "method=rtn,llmcompressor", "bits=4")
    proc = run_cli(*[a if a != "group_size=32" else "group_size=48" for a in args])
    assert proc.returncode == 1
    df = load(tmp_path / "default").set_index("label")
    assert df.loc["rtn w4 g48", "status"] == "ok"  # the sweep's other runs are kept
    err = df.loc["llmc-gptq w4 g48", "error"]
    assert df.loc["llmc-gptq w4 g48", "status"] == "failed" and "llm-compressor (gptq) failed: " in err
    assert "\n" not in err and len(err) > len("llm-compressor (gptq) failed: ") + 5


def test_without_its_venv_the_line_names_the_command(tiny_model, tiny_data, tmp_path):
    proc = run_cli(*_args(tiny_model, tiny_data, tmp_path, "method=llmcompressor", "bits=4"),
                   env={"QUANTEVAL_LLMC_VENV": str(tmp_path / "no-venv")})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "python -m quanteval.methods.llmcompressor --setup" in lines[0] and str(tmp_path / "no-venv") in lines[0]


def test_awq_through_llmcompressor_needs_a_gpu(tiny_model, tiny_data, tmp_path):
    proc = run_cli(*_args(tiny_model, tiny_data, tmp_path, "method=llmcompressor", "method.modifier=awq", "bits=4",
                          "device=cpu"))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "method.modifier=awq" in lines[0] and "needs a GPU" in lines[0]
    assert not (tmp_path / "default").exists()
