"""method=gguf's k-quants: made by llama.cpp's own C code (ggml, through ctypes), read by the gguf package.

Checked: the gguf package's reading of ggml's bytes is the layer's weight and equals ggml's own
``to_float``; the storage bits are the format's block sizes; ggml's Q4_0 bytes equal the gguf package's
numpy port (the two quantisers agree); llama.cpp's per-tensor fallbacks; a small model end to end.

Most need ggml's library (``python -m quanteval.methods.ggml --setup``); without it they skip, unless
QUANTEVAL_REQUIRE_GGML=1 (CI), when a missing library fails them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from quanteval.methods import ggml
from quanteval.methods.gguf import K_QUANTS, gguf_layer, missing_ggml, tensor_type

WHY_MISSING = ggml.missing()
if WHY_MISSING is not None and os.environ.get("QUANTEVAL_REQUIRE_GGML") == "1":
    raise RuntimeError(f"QUANTEVAL_REQUIRE_GGML=1 but {WHY_MISSING}")
needs_ggml = pytest.mark.skipif(WHY_MISSING is not None, reason=f"ggml's library is not set up ({ggml.SETUP})")


def _weight(rows: int = 64, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3, 7] = 0.9  # an outlier, as real weights have
    return w


# ---------------------------------------------------------------- llama.cpp's fallback rule (no library needed)

def test_fallbacks_follow_llama_quant_cpp():
    assert tensor_type("Q4_K", 1536) == ("Q4_K", None)  # SmolLM2's down_proj: 6 x 256
    assert tensor_type("Q4_K", 576) == ("Q5_0", "rows of 576 are not a multiple of 256")
    assert [tensor_type(t, 576)[0] for t in K_QUANTS] == ["Q8_0", "Q5_1", "Q5_0", "IQ4_NL", "IQ4_NL"]
    assert tensor_type("Q4_K", 48) == ("F16", "rows of 48 are a multiple of neither 256 nor 32")
    assert tensor_type("Q4_1", 576) == ("Q4_1", None)  # the legacy types have no fallback


def test_a_missing_library_is_one_line_naming_the_setup(monkeypatch, tmp_path):
    from quanteval.config import GGUFConfig
    from quanteval.methods import QuantSpec
    from quanteval.methods.gguf import gguf_model

    monkeypatch.setenv("QUANTEVAL_CACHE", str(tmp_path))
    monkeypatch.delenv(ggml.ENV_LIB, raising=False)
    ggml.library.cache_clear()
    try:
        why = missing_ggml("Q4_K")
        assert why is not None and "\n" not in why and why.endswith("python -m quanteval.methods.ggml --setup")
        assert missing_ggml("Q4_1") is None and missing_ggml("Q8_0") is None
        with pytest.raises(ggml.GGMLError, match="set it up once with: python -m quanteval.methods.ggml --setup"):
            gguf_model(torch.nn.Module(), None, QuantSpec(4, 64, False), GGUFConfig(type="Q4_K"))
        monkeypatch.setenv(ggml.ENV_LIB, str(tmp_path / "nope.so"))
        ggml.library.cache_clear()
        assert f"{ggml.ENV_LIB}={tmp_path / 'nope.so'}: no such file" in missing_ggml("Q2_K")
        monkeypatch.delenv(ggml.ENV_LIB)
        monkeypatch.setattr(ggml.shutil, "which", lambda name: None)
        with pytest.raises(ggml.GGMLError, match="^npm is not installed; python -m quanteval.methods.ggml --setup"):
            ggml.setup()
    finally:
        monkeypatch.undo()
        ggml.library.cache_clear()


def test_a_failed_download_says_why_in_one_line():
    stderr = ("npm error code ETARGET\nnpm error notarget No matching version found for x@0.0.9.\n"
              "npm error A complete log of this run can be found in: /root/.npm/_logs/x.log\n")
    assert ggml._npm_error(stderr, 1) == "notarget No matching version found for x@0.0.9."
    assert ggml._npm_error("", 1) == "exit code 1"


# ---------------------------------------------------------------- ggml's bytes, the gguf package's reading

@needs_ggml
@pytest.mark.parametrize("type_name", K_QUANTS)
def test_kquant_is_the_packages_reading_of_ggmls_bytes(type_name):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    w = _weight()
    q = gguf_layer(w, type_name)
    qtype = GGMLQuantizationType[type_name]
    data = ggml.quantize(w.numpy(), type_name)
    assert torch.equal(q.weight.float(), torch.from_numpy(quants.dequantize(data, qtype)))
    assert np.array_equal(quants.dequantize(data, qtype), ggml.dequantize(data, type_name, 512))  # == ggml's to_float
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert block == 256 and q.storage_bits == data.nbytes * 8 == 64 * (512 // 256) * type_size * 8
    expected = {"Q6_K": 6.5625, "Q5_K": 5.5, "Q4_K": 4.5, "Q3_K": 3.4375, "Q2_K": 2.625}[type_name]
    assert q.bits_per_weight == expected
    assert q.format == f"gguf {type_name}" and q.module is None
    assert q.detail == {"type": type_name, "block": 256, "requested": type_name, "fallback": None}


@needs_ggml
@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0", "Q5_1"])
def test_ggml_and_the_gguf_package_write_the_same_bytes(type_name):
    from gguf import GGMLQuantizationType, quants

    w = _weight().numpy()
    assert np.array_equal(ggml.quantize(w, type_name), quants.quantize(w, GGMLQuantizationType[type_name]))


@needs_ggml
def test_ggml_refuses_what_would_abort_it():
    with pytest.raises(ValueError, match="not a whole number of 256-weight blocks"):
        ggml.quantize(np.zeros((2, 576), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="quantises only"):
        ggml.quantize(np.zeros((2, 256), np.float32), "IQ2_XS")  # needs an importance matrix


@needs_ggml
@pytest.mark.parametrize("requested, used, bits", [("Q4_K", "Q5_0", 5.5), ("Q3_K", "IQ4_NL", 4.5),
                                                   ("Q2_K", "IQ4_NL", 4.5), ("Q6_K", "Q8_0", 8.5),
                                                   ("Q5_K", "Q5_1", 6.0)])
def test_rows_that_are_not_superblocks_fall_back(requested, used, bits):
    from gguf import GGMLQuantizationType, quants

    w = _weight(64, 576)
    q = gguf_layer(w, requested)
    assert q.format == f"gguf {used}" and q.bits_per_weight == bits
    assert q.detail == {"type": used, "block": 32, "requested": requested,
                        "fallback": "rows of 576 are not a multiple of 256"}
    qtype = GGMLQuantizationType[used]
    data = ggml.quantize(w.numpy(), used) if used == "IQ4_NL" else quants.quantize(w.numpy(), qtype)
    assert torch.equal(q.weight.float(), torch.from_numpy(quants.dequantize(data, qtype)))


@needs_ggml
def test_rows_that_are_not_blocks_of_the_fallback_are_f16():
    w = _weight(8, 48)
    q = gguf_layer(w, "Q4_K")
    assert q.format == "gguf F16" and q.bits_per_weight == 16
    assert q.detail["requested"] == "Q4_K" and q.detail["fallback"] == "rows of 48 are a multiple of neither 256 nor 32"
    assert torch.equal(q.weight.float(), w.half().float())


@needs_ggml
def test_error_shrinks_with_the_width():
    w = _weight()
    err = {t: (gguf_layer(w, t).weight.float() - w).abs().mean().item() for t in ("Q6_K", "Q4_K", "Q2_K")}
    assert err["Q6_K"] < err["Q4_K"] < err["Q2_K"], err


# ---------------------------------------------------------------- a small model end to end

@needs_ggml
def test_a_model_of_mixed_widths_records_each_layers_type(caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    from quanteval.accounting import compression
    from quanteval.config import GGUFConfig
    from quanteval.methods import QuantSpec, apply_result
    from quanteval.methods.gguf import gguf_model
    from quanteval.models import adapter_for

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=288, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    adapter = adapter_for(model)
    with caplog.at_level("INFO", logger="quanteval.methods.gguf"):
        result = gguf_model(model, adapter, QuantSpec(4, 64, False), GGUFConfig(type="Q4_K"))
    down = {n: lq for n, lq in result.layers.items() if n.endswith("down_proj")}
    assert len(down) == 2 and all(lq.format == "gguf Q5_0" for lq in down.values())  # in 288 = 9 x 32
    assert all(lq.format == "gguf Q4_K" for n, lq in result.layers.items() if n not in down)  # in 256
    assert result.info["layer_types"] == {"Q4_K": 12, "Q5_0": 2} and result.info["fallbacks"] == {"Q5_0": 2}
    assert result.info["quantizer"].startswith("ggml")
    assert ("gguf Q4_K: 12 of 14 layers kept Q4_K; 2 fell back to Q5_0 (rows of 288 are not a multiple of 256)"
            in caplog.text)
    c = compression(sum(p.numel() for p in model.parameters()), result.layers)
    assert c["formats"] == {"gguf Q4_K": 12, "gguf Q5_0": 2}
    n_k = sum(lq.weight.numel() for n, lq in result.layers.items() if n not in down)
    n_0 = sum(lq.weight.numel() for lq in down.values())
    assert c["effective_bits"] == pytest.approx((n_k * 4.5 + n_0 * 5.5) / (n_k + n_0))
    assert apply_result(model, result) is False
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 64, (1, 8))).logits).all()


@needs_ggml
def test_setup_is_idempotent(monkeypatch):
    if os.environ.get(ggml.ENV_LIB):
        pytest.skip(f"{ggml.ENV_LIB} is set: the library is the user's own")

    def no_download(*args, **kwargs):
        raise AssertionError("setup ran npm again")

    monkeypatch.setattr(ggml.subprocess, "run", no_download)
    assert ggml.setup() == ggml.lib_path()
