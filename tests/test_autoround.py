"""method=autoround: Intel's auto-round itself, on the tiny random Llama and quanteval's calibration ids."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("auto_round")

from quanteval.config import AutoRoundConfig  # noqa: E402
from quanteval.methods import CalibrationIds, QuantSpec, apply_result, quantized_layer_names  # noqa: E402
from quanteval.methods import autoround as ar  # noqa: E402
from quanteval.methods.rtn import rtn_layer  # noqa: E402
from quanteval.models import adapter_for  # noqa: E402
from quanteval.primitives import group_index  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

# (sym, iters, group_size): asym in auto-round's RTN mode and tuned, at a group size that leaves short last
# groups (64 = 48 + 16); sym tuned, and sym's "optimised RTN" (with lm_head by RTN: quantize_embeddings)
RUNS = {"asym-rtn": (False, 0, 48), "asym-tuned": (False, 5, 48), "sym-tuned": (True, 5, 32),
        "sym-rtn": (True, 0, 32)}


@pytest.fixture(scope="module")
def setup(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = torch.randint(3, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))  # (nsamples, seqlen)
    return model, tok, ids


@pytest.fixture(scope="module")
def runs(setup):
    """Each run's result, the model auto-round fake-quantised (kept from inside ``autoround_model``), and
    whether the input model's weights were left as they were."""
    model, tok, ids = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, qmodels, run_autoround = {}, [], ar.run_autoround

    def keep(*args, **kwargs):
        qmodel, info = run_autoround(*args, **kwargs)
        qmodels.append(qmodel)
        return qmodel, info

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ar, "run_autoround", keep)
        for key, (sym, iters, g) in RUNS.items():
            spec = QuantSpec(bits=4, group_size=g, sym=sym, quantize_embeddings=key == "sym-rtn")
            cfg = AutoRoundConfig(iters=iters, batch_size=4)  # the whole calibration set each step
            result = ar.autoround_model(model, adapter_for(model), spec, cfg, CalibrationIds(ids, tok))
            out[key] = (spec, result, qmodels[-1])
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return out, unchanged


@pytest.mark.parametrize("key", RUNS)
def test_dequantization_is_autorounds_own_bit_for_bit(setup, runs, key):
    model, _, ids = setup
    spec, result, qmodel = runs[0][key]
    block_layers = [n for n in result.layers if n != "lm_head"]
    for name in block_layers:
        assert torch.equal(result.layers[name].dequantize(), qmodel.get_submodule(name).weight), name
    applied = copy.deepcopy(model)
    apply_result(applied, result)
    if not spec.quantize_embeddings:  # the whole model then computes what auto-round's own does
        with torch.no_grad():
            assert torch.equal(applied(ids).logits, qmodel(ids).logits)


def test_rtn_mode_equals_autorounds_quant_function(setup, runs):
    """iters=0 asym is auto-round's int_asym quantiser with no tuning: called here directly, it gives the
    same dequantised weights, scales and zero points (short last group included)."""
    from auto_round.data_type.int import quant_tensor_asym

    model, _, _ = setup
    spec, result, _ = runs[0]["asym-rtn"]
    for name, lq in result.layers.items():
        w = model.get_submodule(name).weight.detach()
        qdq, scale, zp = quant_tensor_asym(w, bits=4, group_size=spec.group_size)
        assert torch.equal(lq.dequantize(), qdq), name
        assert torch.equal(lq.scales, scale.reshape(lq.scales.shape)), name
        assert torch.equal(lq.zeros.float(), zp.reshape(lq.zeros.shape)), name


@pytest.mark.parametrize("key", RUNS)
def test_codes_zeros_and_shapes(setup, runs, key):
    model, _, _ = setup
    spec, result, _ = runs[0][key]
    assert list(result.layers) == quantized_layer_names(model, adapter_for(model), spec)
    assert result.affine and result.info["library"].startswith("auto-round ")
    assert result.info["iters"] == RUNS[key][1] and result.info["autoround_quantize_s"] > 0
    for name, lq in result.layers.items():
        out_f, in_f = model.get_submodule(name).weight.shape
        n_groups = -(-in_f // spec.group_size)
        assert lq.codes.dtype == torch.uint8 and lq.codes.shape == (out_f, in_f)
        assert int(lq.codes.max()) <= 15
        assert lq.zeros.dtype == torch.uint8 and lq.zeros.shape == (out_f, n_groups)
        assert lq.scales.shape == (out_f, n_groups)
        assert torch.equal(lq.g_idx, group_index(in_f, spec.group_size))
        assert (lq.bits, lq.group_size, lq.sym) == (4, spec.group_size, spec.sym)
        if spec.sym:
            assert bool((lq.zeros == 8).all())
        else:
            assert 0 < int(lq.zeros.max()) <= 15 and bool((lq.scales > 0).all())


def test_sym_scales_are_signed_and_outside_layers_get_rtn(setup, runs):
    """auto-round's sym puts the 2^(b-1) end on each group's largest magnitude, so scales take both signs;
    with quantize_embeddings lm_head (tied here) is quanteval's RTN of the untouched weight."""
    model, _, _ = setup
    spec, result, _ = runs[0]["sym-rtn"]
    scales = torch.cat([lq.scales.flatten() for n, lq in result.layers.items() if n != "lm_head"])
    assert bool((scales < 0).any()) and bool((scales > 0).any())
    assert scales.dtype == torch.float32  # the optimised RTN's searched scales are not cast to fp16
    tuned = runs[0]["sym-tuned"][1].layers["model.layers.0.mlp.up_proj"].scales
    assert tuned.dtype == torch.float16
    expect = rtn_layer(model.lm_head.weight.detach(), 4, spec.group_size, True)
    assert torch.equal(result.layers["lm_head"].dequantize(), expect.dequantize())


def test_the_input_model_is_unchanged(setup, runs):
    model, _, _ = setup
    assert runs[1]
    assert next(model.parameters()).dtype == torch.float32 and not hasattr(model.model.layers[0].mlp.up_proj, "scale")


def test_tuning_changes_weights_and_does_not_hurt_the_output(setup, runs):
    """Sanity, not a claim: 5 steps move some weights off RTN, and the model's output on the calibration ids
    is not worse than RTN's by much. (Per-layer error on float activations is no yardstick: auto-round tunes
    each block on the previous blocks' *quantised* outputs, so later blocks move away from it on purpose.)"""
    model, _, ids = setup
    _, rtn, _ = runs[0]["asym-rtn"]  # auto-round's own RTN mode, at the same group size
    _, tuned, _ = runs[0]["asym-tuned"]
    changed = [n for n in tuned.layers if not torch.equal(tuned.layers[n].codes, rtn.layers[n].codes)
               or not torch.equal(tuned.layers[n].scales, rtn.layers[n].scales)]
    assert changed

    def output_error(result):
        q = copy.deepcopy(model)
        apply_result(q, result)
        with torch.no_grad():
            ref, got = model(ids).logits.log_softmax(-1), q(ids).logits.log_softmax(-1)
        return torch.nn.functional.kl_div(got, ref, log_target=True, reduction="batchmean").item()

    assert output_error(tuned) <= 1.25 * output_error(rtn)


def test_unreadable_layer_names_it():
    lin = torch.nn.Linear(8, 2)
    with pytest.raises(ar.AutoRoundError, match="without a scale"):
        ar.layer_from_autoround(lin, QuantSpec(4, 4, False))
    lin.weight.data.fill_(0.03)  # code round(0.3) + 3 = 3: not scale * (q - zp)
    lin.scale, lin.zp = torch.full((2, 2), 0.1, dtype=torch.float16), torch.full((2, 2), 3.0)
    with pytest.raises(ar.AutoRoundError, match="differs from auto-round's"):
        ar.layer_from_autoround(lin, QuantSpec(4, 4, False))
