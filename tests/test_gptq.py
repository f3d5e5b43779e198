"""Tests for quanteval.methods.gptq: the per-layer solver on random data, the block-by-block driver on tiny models."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from quanteval.calibration import capture_inputs
from quanteval.config import GPTQConfig
from quanteval.methods import METHODS, QuantSpec, apply_result, quantized_layer_names
from quanteval.methods.gptq import GPTQ, gptq_model
from quanteval.methods.rtn import rtn_layer
from quanteval.models import ADAPTERS, adapter_for
from quanteval.primitives import group_index, minmax_params


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """X: (n, d) with a non-diagonal covariance (random mixing) and uneven column scales."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen)
    a = torch.randn(d, d, generator=gen) / d**0.5 + torch.eye(d)
    return z @ a * torch.rand(d, generator=gen).add(0.2)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - W_hat X||^2 with x: (n, in)."""
    return float(((x.double() @ (w.double() - w_hat.double()).T) ** 2).sum())


def solve(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, sym: bool = False, **kw):
    g = GPTQ(w.shape[1], name="test.layer")
    for chunk in x.split(256):
        g.add_batch(chunk)
    return g.quantize(w, bits, group_size, sym, **kw)


def reference_fasterquant(w, h, bits, group_size, sym, blocksize=128, percdamp=0.01, actorder=False,
                          static_groups=False):
    """IST-DASLab/gptq ``fasterquant``, transcribed line by line (quantiser: quanteval's minmax_params)."""
    maxq = 2**bits - 1

    def find_params(x):
        s, z = minmax_params(x, bits, sym)
        return s[:, None], z[:, None]

    def quantize(x, scale, zero):
        return scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)

    W = w.clone().float()
    columns = W.shape[1]
    H = h.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale, zero = find_params(W)
    if static_groups:
        groups = [find_params(W[:, i : i + group_size]) for i in range(0, columns, group_size)]
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w_col = W1[:, i]
            d = Hinv1[i, i]
            if group_size != -1:
                if not static_groups:
                    if (i1 + i) % group_size == 0:
                        scale, zero = find_params(W[:, (i1 + i) : (i1 + i + group_size)])
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    scale, zero = groups[idx // group_size]
            q = quantize(w_col.unsqueeze(1), scale, zero).flatten()
            Q1[:, i] = q
            err1 = (w_col - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
    return Q


# --------------------------------------------------------------------------- one layer, random data


@pytest.fixture(scope="module")
def layer_data():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w[:, 5] *= 8  # an outlier column
    return w, correlated_inputs(2048, 128)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 32, 48])  # 48 on in=128: groups of 48, 48, 32
@pytest.mark.parametrize("sym", [False, True])
def test_error_below_rtn(layer_data, bits, group_size, sym):
    w, x = layer_data
    lq, stats = solve(w, x, bits, group_size, sym)
    rtn = rtn_layer(w, bits, group_size, sym)
    e_gptq, e_rtn = output_error(w, lq.dequantize(), x), output_error(w, rtn.dequantize(), x)
    assert e_gptq < e_rtn
    assert stats["damp"] == 0.01 and stats["damp_rises"] == 0 and stats["loss"] > 0
    assert torch.equal(lq.g_idx, group_index(128, group_size))
    assert lq.scales.dtype == torch.float16 and lq.zeros.dtype == torch.uint8 and lq.codes.dtype == torch.uint8
    assert int(lq.codes.max()) <= 2**bits - 1
    if sym:
        assert (lq.zeros == 2 ** (bits - 1)).all()


def test_short_last_group_layout():
    w, x = torch.randn(16, 72), correlated_inputs(512, 72)
    lq, _ = solve(w, x, 4, 32)  # 72 = 32 + 32 + 8
    assert lq.scales.shape == (16, 3)
    assert torch.bincount(lq.g_idx.long()).tolist() == [32, 32, 8]
    assert output_error(w, lq.dequantize(), x) < output_error(w, rtn_layer(w, 4, 32, False).dequantize(), x)


@pytest.mark.parametrize(
    "group_size,act_order,static_groups,block_size",
    [(-1, False, False, 128), (32, False, False, 128), (48, False, False, 32), (48, True, False, 128),
     (32, True, True, 128), (32, False, True, 16), (-1, True, False, 64)],
)
def test_matches_reference_transcription(layer_data, group_size, act_order, static_groups, block_size):
    w, x = layer_data
    g = GPTQ(128)
    g.add_batch(x)
    lq, _ = g.quantize(w, 3, group_size, False, block_size=block_size, act_order=act_order, static_groups=static_groups)
    q_ref = reference_fasterquant(w, g.H, 3, group_size, False, block_size, 0.01, act_order, static_groups)
    torch.testing.assert_close(lq.dequantize(), q_ref, rtol=0, atol=0)


@pytest.mark.parametrize("in_features", [300, 576])  # H's upper triangle in 2 and 3 column bands
def test_banded_hessian_is_the_full_product(in_features):
    x = correlated_inputs(1024, in_features, seed=1)
    g = GPTQ(in_features)
    for chunk in x.split(300):  # uneven batches: the running average rescales the stale lower triangle too
        g.add_batch(chunk)
    assert torch.equal(g.H, g.H.T)
    torch.testing.assert_close(g.H, 2 * x.T @ x / 1024, rtol=1e-5, atol=1e-4)
    g.add_batch(x[:7])  # reading H mirrored it; later batches still land in the upper blocks
    torch.testing.assert_close(g.H, 2 * torch.cat([x, x[:7]]).T @ torch.cat([x, x[:7]]) / 1031, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("act_order,static_groups", [(True, True), (False, False)])
def test_matches_reference_transcription_wide_layer(act_order, static_groups):
    """A 3-band Hessian and 3 lazy blocks of 128 of a 192 x 384 layer, bit for bit (the transposed column loop)."""
    torch.manual_seed(1)
    w = torch.randn(192, 384) * 0.02
    g = GPTQ(384)
    for chunk in correlated_inputs(2048, 384, seed=2).split(512):
        g.add_batch(chunk)
    lq, _ = g.quantize(w, 4, 64, False, act_order=act_order, static_groups=static_groups)
    q_ref = reference_fasterquant(w, g.H, 4, 64, False, 128, 0.01, act_order, static_groups)
    torch.testing.assert_close(lq.dequantize(), q_ref, rtol=0, atol=0)
    assert lq.scales.is_contiguous() and lq.zeros.is_contiguous()


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order(layer_data, static_groups):
    w, x = layer_data
    x = x * torch.linspace(0.1, 3, 128)  # make the permutation far from the identity
    lq, _ = solve(w, x, 3, 32, act_order=True, static_groups=static_groups)
    assert lq.g_idx.dtype == torch.int32 and lq.g_idx.shape == (128,)
    assert torch.bincount(lq.g_idx.long(), minlength=4).tolist() == [32, 32, 32, 32]  # every group full, none extra
    if static_groups:
        assert torch.equal(lq.g_idx, group_index(128, 32))
    else:
        assert not torch.equal(lq.g_idx, group_index(128, 32))
    # dequantize() reads scales through g_idx in original order: rebuild it column by column
    manual = lq.scales.float()[:, lq.g_idx.long()] * (lq.codes.float() - lq.zeros.float()[:, lq.g_idx.long()])
    assert torch.equal(lq.dequantize(), manual)
    assert output_error(w, lq.dequantize(), x) < output_error(w, rtn_layer(w, 3, 32, False).dequantize(), x)


def test_dead_columns_are_zero(layer_data):
    w, x = layer_data
    x = x.clone()
    x[:, [3, 70]] = 0
    lq, _ = solve(w, x, 4, 32)
    assert (lq.dequantize()[:, [3, 70]] == 0).all()


def test_deterministic(layer_data):
    w, x = layer_data
    a, _ = solve(w, x, 3, 32, act_order=True)
    b, _ = solve(w, x, 3, 32, act_order=True)
    for k in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


def test_hessian_is_token_average():
    x = torch.randn(3, 10, 8)
    g = GPTQ(8)
    for chunk in x.split(1):
        g.add_batch(chunk)
    flat = x.reshape(-1, 8)
    torch.testing.assert_close(g.H, 2 * flat.T @ flat / 30)
    assert g.n_tokens == 30


def test_damping_rises_and_logs(caplog):
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    eigs = torch.linspace(1, 2, 16)
    eigs[0] = -0.05  # mean diag is about 1.4: damp 0.01 leaves it indefinite, 0.1 makes it definite
    g = GPTQ(16, name="blocks.3.mlp.up_proj")
    g.H = q @ torch.diag(eigs) @ q.T
    with caplog.at_level(logging.WARNING, logger="quanteval.methods.gptq"):
        lq, stats = g.quantize(torch.randn(8, 16, generator=gen), 4, -1, False)
    assert stats["damp"] == pytest.approx(0.1) and stats["damp_rises"] == 1
    assert "blocks.3.mlp.up_proj" in caplog.text and "0.1" in caplog.text
    assert torch.isfinite(lq.dequantize()).all()


def test_not_positive_definite_raises():
    g = GPTQ(8, name="blocks.7.self_attn.k_proj")
    g.add_batch(torch.randn(64, 8))
    g.H = torch.ones(8, 8) * 10 - 9 * torch.eye(8)  # diag 1, eigenvalue -9: no damping up to 1.0 helps
    with pytest.raises(ValueError, match=r"blocks\.7\.self_attn\.k_proj.*damping 1"):
        g.quantize(torch.randn(4, 8), 4, -1, False, max_damp=1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_activations_raise(bad):
    g = GPTQ(8, name="model.layers.2.mlp.down_proj")
    x = torch.randn(4, 8)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.down_proj"):
        g.add_batch(x)


# --------------------------------------------------------------------------- tiny models, block by block

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gemma3_text":
        config = transformers.Gemma3TextConfig(**TINY, sliding_window=16, query_pre_attn_scalar=16)
        model = transformers.Gemma3ForCausalLM(config)
    else:
        config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                      "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
        model = transformers.AutoModelForCausalLM.from_config(config_cls(**TINY))
    return model.float().eval()


def calib_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(seed))


def linear_inputs(model, adapter, ids) -> dict[str, torch.Tensor]:
    """Every quantised linear's inputs over ``ids`` in the unquantised model: name -> (tokens, in)."""
    names = quantized_layer_names(model, adapter, QuantSpec(4, -1, False))
    inputs: dict[str, list] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0]))
               for n in names]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for n, v in inputs.items()}


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, -1)])
def test_llama_layers_beat_rtn(bits, group_size):
    model = tiny_model("llama")
    adapter = adapter_for(model)
    ids = calib_ids()
    x = linear_inputs(model, adapter, ids)
    original = {n: model.get_submodule(n).weight.detach().clone() for n in x}
    calib = capture_inputs(model, adapter, ids, batch_size=4)
    hidden_before = [h.clone() for h in calib.hidden]
    result = gptq_model(model, adapter, QuantSpec(bits, group_size, False), GPTQConfig(), calib)

    assert list(result.layers) == list(x)
    assert all(torch.equal(a, b) for a, b in zip(calib.hidden, hidden_before))  # calibration reused by the sweep
    total_gptq = total_rtn = 0.0
    for name, w in original.items():
        e_gptq = output_error(w, result.layers[name].dequantize(), x[name])
        e_rtn = output_error(w, rtn_layer(w, bits, group_size, False).dequantize(), x[name])
        assert e_gptq <= 1.01 * e_rtn, name
        total_gptq, total_rtn = total_gptq + e_gptq, total_rtn + e_rtn
    assert total_gptq < total_rtn
    for key in ("hessian_s", "solve_s", "forward_s", "damp_rises"):
        assert key in result.info


def test_model_weights_hold_result_and_are_deterministic():
    spec, cfg = QuantSpec(3, 32, False), GPTQConfig(act_order=True, static_groups=False)
    runs = []
    for _ in range(2):
        model = tiny_model("llama")
        adapter = adapter_for(model)
        result = gptq_model(model, adapter, spec, cfg, capture_inputs(model, adapter, calib_ids(), batch_size=4))
        for name, lq in result.layers.items():  # written in place, original column order
            assert torch.equal(model.get_submodule(name).weight, lq.dequantize()), name
        runs.append(result)
    for name in runs[0].layers:
        for k in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(runs[0].layers[name], k), getattr(runs[1].layers[name], k)), (name, k)


def test_nan_calibration_names_layer():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    calib = capture_inputs(model, adapter, calib_ids(), batch_size=4)
    calib.hidden[0] = calib.hidden[0].clone()
    calib.hidden[0][0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        gptq_model(model, adapter, QuantSpec(4, 32, False), GPTQConfig(), calib)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_adapters_end_to_end(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    assert adapter is ADAPTERS[family]
    ids = calib_ids()
    spec = QuantSpec(4, 32, False, quantize_embeddings=True)
    calib = capture_inputs(model, adapter, ids, batch_size=4)
    result = METHODS["gptq"].compute(model, adapter, spec, GPTQConfig(act_order=True), calib)
    assert list(result.layers) == quantized_layer_names(model, adapter, spec)
    apply_result(model, result)
    with torch.no_grad():
        logits = model(input_ids=ids[:2], use_cache=False).logits
    assert torch.isfinite(logits).all()
