"""method=hqq: bit for bit hqq's own dequantisation, its exact storage bits, the solver settings passed
through, the model untouched, and one-line errors for what hqq cannot do."""

from __future__ import annotations

import functools
import inspect
import math

import pytest
import torch

hqq = pytest.importorskip("hqq")

from hqq.core.optimize import optimize_weights_proximal  # noqa: E402
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from quanteval.config import HQQConfig  # noqa: E402
from quanteval.methods import QuantResult, QuantSpec, apply_result, quantized_layer_names  # noqa: E402
from quanteval.methods.hqq import hqq_layer, hqq_model  # noqa: E402
from quanteval.methods.rtn import rtn_fake_quant  # noqa: E402
from quanteval.models import adapter_for  # noqa: E402
from quanteval.primitives import FormatQuant  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")  # reproducible floats (conftest)

OUT, IN = 1536, 576  # SmolLM2-135M's gate/up_proj
META_BITS = 16  # hqq keeps scale and zero in its 16-bit compute dtype (fp16 for an fp32 model, bf16 for bf16)


@pytest.fixture(scope="module")
def w() -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)) * 0.02  # (out, in)


def reference(w: torch.Tensor, bits: int, group_size, axis: int = 1, optimize: bool = True) -> HQQLinear:
    """An HQQLinear built straight from hqq's documented API on a fresh layer holding ``w``."""
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=axis)
    cfg["weight_quant_params"]["optimize"] = optimize
    return HQQLinear(linear, cfg, compute_dtype=torch.bfloat16 if w.dtype == torch.bfloat16 else torch.float16,
                     device="cpu")


def library_bits(hq: HQQLinear) -> int:
    """W_q, scale and zero as hqq keeps them; and nothing else in its meta is a tensor."""
    assert {k for k, v in hq.meta.items() if torch.is_tensor(v)} == {"scale", "zero"}
    return sum(t.numel() * t.element_size() * 8 for t in (hq.W_q, hq.meta["scale"], hq.meta["zero"]))


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


# --------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("bits, dtype, axis", [(8, torch.float32, 1), (4, torch.float32, 1), (3, torch.float32, 1),
                                               (2, torch.float32, 1), (4, torch.bfloat16, 1), (3, torch.float32, 0)])
def test_weight_is_hqqs_own_dequantisation_bit_for_bit(w, bits, dtype, axis):
    x = w.to(dtype)
    before = x.clone()
    q = hqq_layer(x, bits, 64, HQQConfig(axis=axis))
    ref = reference(x, bits, 64, axis).dequantize()  # (out, in)
    assert isinstance(q, FormatQuant) and q.format == f"hqq b{bits} g64"
    assert q.shape == (OUT, IN) and ref.shape == (OUT, IN)
    assert torch.equal(q.dequantize(ref.dtype), ref)
    assert torch.equal(q.weight.to(ref.dtype).to(q.weight.dtype), q.weight)  # exact_float never rounds
    assert torch.equal(x, before)  # the input is not modified
    assert q.detail == {"nbits": bits, "group_size": 64, "axis": axis, "packing": Quantizer.bit_to_packing[bits],
                        "optimize": True, "round_zero": bits == 4,
                        "compute_dtype": "bfloat16" if dtype == torch.bfloat16 else "float16"}


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_storage_bits_are_the_librarys_own_tensors(w, bits, dtype):
    x = w.to(dtype)
    q = hqq_layer(x, bits, 64, HQQConfig())
    assert q.storage_bits == library_bits(reference(x, bits, 64))
    groups = OUT * IN // 64
    # hqq packs 3-bit codes ten to an int32 word, the group count padded to a multiple of 10
    code_bits = 32 * math.ceil(groups / 10) * 64 if bits == 3 else bits * OUT * IN
    assert q.storage_bits == code_bits + 2 * groups * META_BITS  # a scale and a zero per group
    meta = 2 * META_BITS / 64
    code_rate = 3.2 if bits == 3 else bits
    assert code_rate + meta <= q.bits_per_weight < code_rate + meta + 0.01


def test_per_channel_is_hqqs_group_size_none(w):
    q = hqq_layer(w, 4, -1, HQQConfig())
    ref = reference(w, 4, None)
    assert torch.equal(q.dequantize(), ref.dequantize())
    assert q.detail["group_size"] == IN and q.format == "hqq b4 g-1"
    assert q.storage_bits == library_bits(ref) == 4 * OUT * IN + 2 * OUT * META_BITS  # one scale and zero per row


@pytest.mark.parametrize("group_size", [0, -2, 12, 48, 1024])
def test_a_group_size_hqq_cannot_take_is_one_line(group_size):
    with pytest.raises(ValueError, match="group_size") as e:
        hqq_layer(torch.randn(32, 64), 4, group_size, HQQConfig())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bits", [1, 5, 6, 7, 16])
def test_bits_hqq_has_no_width_for_name_the_supported_ones(bits):
    with pytest.raises(ValueError, match=r"supported bits are 8, 4, 3, 2"):
        hqq_layer(torch.randn(32, 64), bits, 32, HQQConfig())
    with pytest.raises(ValueError, match=rf"no {bits}-bit width"):  # before any layer is touched
        hqq_model(None, None, QuantSpec(bits, 32, False), HQQConfig())


def test_error_falls_with_bits_and_beats_rtn(w):
    errs = {}
    for bits in (8, 4, 3, 2):
        errs[bits] = (hqq_layer(w, bits, 64, HQQConfig()).dequantize() - w).abs().mean().item()
        rtn = (rtn_fake_quant(w, bits, 64, sym=False) - w).abs().mean().item()
        assert errs[bits] < rtn, (bits, errs[bits], rtn)  # HQQ's solver lowers RTN's min/max start
    assert errs[8] < errs[4] < errs[3] < errs[2]


# --------------------------------------------------------------------------- the solver settings


def test_config_defaults_are_hqqs_solver_defaults():
    defaults = inspect.signature(optimize_weights_proximal).parameters["opt_params"].default
    cfg = HQQConfig()
    assert {k: getattr(cfg, k) for k in defaults} == defaults
    assert BaseQuantizeConfig()["weight_quant_params"]["optimize"] is cfg.optimize is True
    assert BaseQuantizeConfig()["weight_quant_params"]["axis"] == cfg.axis


def test_optimize_false_is_hqqs_min_max(w):
    q = hqq_layer(w, 3, 64, HQQConfig(optimize=False))
    assert torch.equal(q.dequantize(), reference(w, 3, 64, optimize=False).dequantize())
    assert not torch.equal(q.dequantize(), hqq_layer(w, 3, 64, HQQConfig()).dequantize())
    assert q.detail["optimize"] is False


def test_solver_settings_reach_hqqs_solver_and_it_is_restored(w, monkeypatch):
    solver = Quantizer.optimize_weights
    cfg = HQQConfig(lp_norm=1.0, beta=30.0, iters=5)
    q = hqq_layer(w, 3, 64, cfg)
    assert Quantizer.optimize_weights is solver
    assert not torch.equal(q.dequantize(), hqq_layer(w, 3, 64, HQQConfig()).dequantize())
    params = {"lp_norm": 1.0, "beta": 30.0, "kappa": cfg.kappa, "iters": 5}
    monkeypatch.setattr(Quantizer, "optimize_weights", functools.partial(optimize_weights_proximal, opt_params=params))
    assert torch.equal(q.dequantize(), reference(w, 3, 64).dequantize())


# --------------------------------------------------------------------------- the model


def test_model_is_unchanged_and_apply_result_writes_hqqs_weights(tmp_path):
    model = tiny_llama()
    adapter = adapter_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = QuantSpec(bits=4, group_size=32, sym=False, quantize_embeddings=True)
    r = hqq_model(model, adapter, spec, HQQConfig())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert list(r.layers) == quantized_layer_names(model, adapter, spec) and "lm_head" in r.layers
    assert not r.affine and r.formats() == ["hqq b4 g32"]
    assert r.info["library"] == "hqq" and r.info["version"] == hqq.__version__
    for name, lq in r.layers.items():
        w = before[f"{name}.weight"]
        assert torch.equal(lq.dequantize(), reference(w, 4, 32).dequantize()), name
    assert apply_result(model, r) is False
    for name, lq in r.layers.items():
        assert torch.equal(model.get_submodule(name).weight, lq.weight.float()), name
    r.save(tmp_path / "hqq.pt")  # a cached result reads back the same
    back = QuantResult.load(tmp_path / "hqq.pt")
    for name, lq in r.layers.items():
        got = back.layers[name]
        assert torch.equal(got.weight, lq.weight) and got.storage_bits == lq.storage_bits and got.detail == lq.detail
