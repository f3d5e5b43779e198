"""AWQ: exact folds, never worse than RTN on its search, result/model consistency, GQA, clipping, every adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from quanteval.calibration import block_forward, capture_inputs
from quanteval.config import AWQConfig
from quanteval.methods import QuantResult, QuantSpec, apply_result, quantized_layer_names, rtn_model
from quanteval.methods.awq import (
    OC_BATCH,
    awq_block,
    awq_model,
    clamp_groups,
    clip_max,
    fake_quant,
    group_slices,
    scale_group,
    scaled_basis,
    search_subset,
)
from quanteval.methods.rtn import rtn_layer
from quanteval.models import ADAPTERS, adapter_for
from quanteval.primitives import dequantize, minmax_params, quantize_codes

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
}
SPEC3 = QuantSpec(bits=3, group_size=32, sym=False)


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors: one thread (conftest)


def tiny(family: str = "llama", kv_heads: int = 4, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-block random model with random norm weights (so folds are not trivially exact)."""
    config_cls, model_cls = FAMILIES[family]
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**kw, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma multiplies by (1 + w): keep it positive
                p.uniform_(-0.5, 0.5) if family.startswith("gemma") else p.uniform_(0.5, 1.5)
    return model


def calib_for(model, seed: int = 0):
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(seed))
    return capture_inputs(model, adapter_for(model), ids, batch_size=2)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


# --------------------------------------------------------------------------- folds


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("group_idx", range(4))
def test_fold_leaves_block_output_unchanged(family, group_idx):
    model = tiny(family, kv_heads=4)  # MHA: v -> o applies too
    calib = calib_for(model)
    adapter = adapter_for(model)
    group = adapter.scale_groups[group_idx]
    block = model.get_submodule(adapter.blocks)[0]
    before = block_forward(block, calib.hidden, calib.kwargs[0])
    prev_w = block.get_submodule(group.prev).weight.detach().clone()
    s = torch.rand(prev_w.shape[0], generator=torch.Generator().manual_seed(1)) * 1.5 + 0.5
    scale_group(block, group, s)
    after = block_forward(block, calib.hidden, calib.kwargs[0])
    assert not torch.equal(block.get_submodule(group.prev).weight, prev_w)
    for x, y in zip(after, before):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the search


def test_alpha_zero_without_clip_is_rtn():
    model = tiny()
    r = awq_model(model, adapter_for(model), SPEC3, AWQConfig(n_grid=1, clip=False), calib_for(model))
    rtn = rtn_model(model, adapter_for(model), SPEC3)
    assert set(r.info["alphas"].values()) == {0.0}
    assert all(torch.equal(f.scale, torch.ones_like(f.scale)) for f in r.folds)
    for name, lq in rtn.layers.items():
        assert torch.equal(r.layers[name].codes, lq.codes), name


def test_scale_search_not_worse_than_rtn():
    model = tiny()
    adapter, calib = adapter_for(model), calib_for(model)
    awq = awq_model(model, adapter, SPEC3, AWQConfig(clip=False), calib)
    rtn = awq_model(model, adapter, SPEC3, AWQConfig(n_grid=1, clip=False), calib)
    for group, (best, at_zero) in awq.info["losses"].items():
        assert best <= at_zero, group
    assert any(a > 0 for a in awq.info["alphas"].values())
    # block 0 sees the same inputs in both runs
    assert awq.info["block_mse"][0] <= rtn.info["block_mse"][0]


@pytest.mark.parametrize("search_tokens", [1024, 64])  # 64: the first of two chunks; awq_model carries only it
def test_result_reproduces_the_blocks_awq_quantised(tmp_path, search_tokens):
    cfg = AWQConfig(n_grid=5, clip_grid=10, search_tokens=search_tokens)
    spec = QuantSpec(bits=4, group_size=32, sym=False)
    model = tiny()
    original = copy.deepcopy(model)
    adapter, calib = adapter_for(model), calib_for(model)
    result = awq_model(model, adapter, spec, cfg, calib)
    assert same_state(model, original)  # compute, then apply: the model is untouched

    in_place = copy.deepcopy(original)  # the same loop, quantising the blocks in place, carrying every chunk
    hidden = calib.hidden
    assert len(hidden) == 2 and result.info["search_tokens"] == min(search_tokens, calib.n_tokens)
    for i, block in enumerate(in_place.get_submodule(adapter.blocks)):
        found = awq_block(block, adapter, spec, cfg, search_subset(hidden, calib.kwargs[i], cfg.search_tokens))
        hidden = block_forward(block, hidden, calib.kwargs[i])
        for name, lq in found.layers.items():
            assert torch.equal(result.layers[f"model.layers.{i}.{name}"].codes, lq.codes)

    result.save(tmp_path / "awq.pt")  # the sweep caches AWQ results: replay the loaded one
    apply_result(model, QuantResult.load(tmp_path / "awq.pt"))
    assert not same_state(model, original)
    assert same_state(model, in_place)


def test_deterministic():
    model = tiny()
    adapter, calib = adapter_for(model), calib_for(model)
    cfg = AWQConfig(n_grid=5, clip_grid=10)
    a = awq_model(model, adapter, SPEC3, cfg, calib)
    b = awq_model(model, adapter, SPEC3, cfg, calib)
    assert a.info["alphas"] == b.info["alphas"]
    for name in a.layers:
        assert torch.equal(a.layers[name].codes, b.layers[name].codes)
        assert torch.equal(a.layers[name].scales, b.layers[name].scales)
    assert all(torch.equal(f.scale, g.scale) for f, g in zip(a.folds, b.folds))


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_v_to_o_skipped_under_gqa_only(kv_heads):
    model = tiny(kv_heads=kv_heads)
    r = awq_model(model, adapter_for(model), SPEC3, AWQConfig(n_grid=4, clip=False), calib_for(model))
    v_folds = [f.module for f in r.folds if f.module.endswith("v_proj")]
    if kv_heads == 2:
        assert r.info["skipped"] == [f"model.layers.{i}.self_attn.v_proj->self_attn.o_proj" for i in range(2)]
        assert v_folds == []
    else:
        assert r.info["skipped"] == []
        assert v_folds == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
        assert "model.layers.1.self_attn.v_proj" in r.info["alphas"]
    assert len(r.folds) == 2 * (4 if kv_heads == 4 else 3)


# --------------------------------------------------------------------------- one unit alone (method=mixed)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@torch.no_grad()
def test_scaled_basis_keeps_the_function_and_every_layer_on_it_is_the_awq_model(family):
    """task=sensitivity applies an AWQ unit alone in the scaled basis: that basis computes the baseline, and
    with every quantised layer written into it, it is the model ``apply_result`` makes."""
    model = tiny(family, kv_heads=4)  # v -> o folded too (no GQA)
    adapter = adapter_for(model)
    result = awq_model(model, adapter, QuantSpec(2, 32, False), AWQConfig(n_grid=5, clip_grid=10), calib_for(model))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    base = model(ids).logits
    basis = copy.deepcopy(model)
    scaled_basis(basis, adapter, result.folds)
    assert not same_state(basis, model)  # the norms and weights moved ...
    torch.testing.assert_close(basis(ids).logits, base, rtol=1e-4, atol=1e-4)  # ... the function did not
    for name, lq in result.layers.items():
        basis.get_submodule(name).weight.copy_(lq.dequantize())
    applied = copy.deepcopy(model)
    apply_result(applied, result)
    assert same_state(basis, applied)
    with pytest.raises(ValueError, match="AWQ folds into 'model.layers.9.post_attention_layernorm'"):
        scaled_basis(copy.deepcopy(model), adapter, [type(result.folds[0])("model.layers.9.post_attention_layernorm",
                                                                          "rmsnorm", torch.ones(64))])


def test_per_layer_bits_search_and_store_each_unit_at_its_width():
    model = tiny()
    adapter, calib = adapter_for(model), calib_for(model)
    cfg = AWQConfig(n_grid=5, clip_grid=10)
    mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    layer_bits = tuple((f"model.layers.{i}.{n}", 8 if i == 1 and n in mlp else 2) for i in range(2)
                       for n in adapter.all_linears)
    mixed = awq_model(model, adapter, QuantSpec(8, 32, False, layer_bits=layer_bits), cfg, calib)
    assert {n: lq.bits for n, lq in mixed.layers.items()} == dict(layer_bits)
    w2 = awq_model(model, adapter, QuantSpec(2, 32, False), cfg, calib)
    for name in adapter.all_linears:  # block 0 is all at 2 bits, with the same inputs: the uniform w2 result
        assert torch.equal(mixed.layers[f"model.layers.0.{name}"].codes, w2.layers[f"model.layers.0.{name}"].codes)
    same = awq_model(model, adapter, QuantSpec(2, 32, False, layer_bits=tuple((n, 2) for n, _ in layer_bits)),
                     cfg, calib)
    assert all(torch.equal(same.layers[n].codes, w2.layers[n].codes) for n in w2.layers)


# --------------------------------------------------------------------------- clipping


def _group_err(clipped, w, x, cols, spec):
    """Per-row MSE of group ``cols``'s partial output, RTN of ``clipped`` vs the original ``w``: (out,)."""
    s, z = minmax_params(clipped[:, cols], spec.bits, spec.sym)
    q = dequantize(quantize_codes(clipped[:, cols], s[:, None], z[:, None], spec.bits), s[:, None], z[:, None])
    return (x[:, cols] @ q.T - x[:, cols] @ w[:, cols].T).pow(2).mean(0)


@pytest.mark.parametrize("rows, cols, group_size", [(192, 64, 32), (300, 80, 32), (192, 48, -1)])
def test_clip_any_row_count_and_ragged_groups(rows, cols, group_size):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(rows, cols, generator=g), torch.randn(256, cols, generator=g)
    spec = QuantSpec(bits=3, group_size=group_size, sym=False)
    max_val = clip_max(w, x, spec, n_grid=20, max_shrink=0.5)
    slices = group_slices(cols, group_size)
    assert max_val.shape == (rows, len(slices))
    for j, c in enumerate(slices):
        org_max = w[:, c].abs().amax(1)
        assert (max_val[:, j] <= org_max).all() and (max_val[:, j] >= org_max * 0.55 - 1e-6).all()
        clipped = torch.clamp(w, -max_val[:, j : j + 1], max_val[:, j : j + 1])
        assert (_group_err(clipped, w, x, c, spec) <= _group_err(w, w, x, c, spec) + 1e-5).all()
    assert (max_val < w.abs().amax(1, keepdim=True)).any()  # some rows do shrink


def loop_clip_max(w, x, spec, n_grid, max_shrink):
    """The group-by-group clipping search as first written: the MSE of each group's partial outputs."""
    slices = group_slices(w.shape[1], spec.group_size)
    best = torch.empty(w.shape[0], len(slices))  # (out, n_groups)
    for j, cols in enumerate(slices):
        xg = x[:, cols]  # (tokens, g)
        for r in range(0, w.shape[0], OC_BATCH):
            wg = w[r : r + OC_BATCH, cols]  # (rb, g)
            org_out = xg @ wg.T  # (tokens, rb)
            org_max = wg.abs().amax(dim=1)  # (rb,)
            best_max, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
            for i in range(int(max_shrink * n_grid)):
                max_val = org_max * (1 - i / n_grid)  # (rb,)
                cw = torch.clamp(wg, -max_val[:, None], max_val[:, None])
                s, z = minmax_params(cw, spec.bits, spec.sym)
                qw = dequantize(quantize_codes(cw, s[:, None], z[:, None], spec.bits), s[:, None], z[:, None])
                err = (xg @ qw.T - org_out).pow(2).mean(dim=0)  # (rb,)
                better = err < min_err
                min_err, best_max = torch.where(better, err, min_err), torch.where(better, max_val, best_max)
            best[r : r + OC_BATCH, j] = best_max
    return best


def _group_loss64(w, x, cols, max_val, spec):
    """float64 MSE of group ``cols``'s partial outputs after clamping to ``max_val: (out,)`` and RTN: (out,)."""
    cw = torch.clamp(w[:, cols], -max_val[:, None], max_val[:, None])
    s, z = minmax_params(cw, spec.bits, spec.sym)
    q = dequantize(quantize_codes(cw, s[:, None], z[:, None], spec.bits), s[:, None], z[:, None])
    return (x[:, cols].double() @ (q - w[:, cols]).double().T).pow(2).mean(0)


@pytest.mark.parametrize(
    "rows, cols, tokens, group_size, bits, sym",
    [
        (192, 64, 256, 32, 3, False),
        (300, 80, 256, 32, 3, False),  # a short last group of 16, a short last row batch
        (192, 48, 256, -1, 3, False),
        (576, 576, 512, 64, 3, False),  # SmolLM2 q/o shapes
        (260, 1536, 512, 128, 4, True),
        (100, 200, 512, 48, 2, False),  # 4 x 48 + 8
        (64, 80, 32, -1, 4, False),  # a group wider than the token count: the partial-output path
        (64, 80, 32, 48, 3, True),  # both paths in one call: a full group of 48 > 32 tokens, a tail of 32
    ],
)
def test_clip_matches_the_group_loop(rows, cols, tokens, group_size, bits, sym):
    g = torch.Generator().manual_seed(rows + cols + tokens)
    w = torch.randn(rows, cols, generator=g) * 0.05
    x = torch.randn(tokens, cols, generator=g) * (torch.rand(cols, generator=g) * 4)  # uneven channel scales
    x[:, 3] *= 30  # one outlier channel, as in real activations
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
    fast, slow = clip_max(w, x, spec, 20, 0.5), loop_clip_max(w, x, spec, 20, 0.5)
    assert fast.shape == slow.shape
    # the same thresholds, except where two candidates' losses tie to float rounding
    differ = (fast != slow).nonzero().tolist()
    assert len(differ) <= fast.numel() // 1000
    slices = group_slices(cols, group_size)
    for r, j in differ:
        a, b = (float(_group_loss64(w[r : r + 1], x, slices[j], m[r : r + 1, j], spec)) for m in (fast, slow))
        assert a == pytest.approx(b, rel=1e-5), (r, j)
    assert torch.equal(clamp_groups(w, fast, group_size), torch.cat(
        [torch.clamp(w[:, c], -fast[:, j : j + 1], fast[:, j : j + 1]) for j, c in enumerate(slices)], dim=1))


def test_clip_thresholds_equal_on_random_data():
    # the Gram-matrix loss and the partial-output loss agree to float rounding: on these draws, exactly
    g = torch.Generator().manual_seed(0)
    for rows, cols, group_size in [(192, 64, 32), (300, 80, 32), (576, 576, 64), (576, 1536, 128)]:
        w, x = torch.randn(rows, cols, generator=g), torch.randn(512, cols, generator=g)
        spec = QuantSpec(bits=3, group_size=group_size, sym=False)
        assert torch.equal(clip_max(w, x, spec, 20, 0.5), loop_clip_max(w, x, spec, 20, 0.5)), (rows, cols)


@pytest.mark.parametrize("group_size", [-1, 32, 48])
def test_fake_quant_is_rtn_dequantised(group_size):
    w = torch.randn(40, 80, generator=torch.Generator().manual_seed(group_size))
    spec = QuantSpec(bits=3, group_size=group_size, sym=False)
    assert torch.equal(fake_quant(w, spec), rtn_layer(w, 3, group_size, False).dequantize())


def test_odd_widths_end_to_end():
    # q/k/v have 4 x 48 = 192 rows, gate/up 300 rows (256 + 44), down_proj's 300 inputs are 9 x 32 + 12
    model = tiny(kv_heads=4, head_dim=48, intermediate_size=300)
    original = copy.deepcopy(model)
    r = awq_model(model, adapter_for(model), SPEC3, AWQConfig(n_grid=4, clip_grid=10), calib_for(model))
    assert r.layers["model.layers.0.self_attn.v_proj"].shape == (192, 64)
    assert r.layers["model.layers.0.mlp.down_proj"].scales.shape == (64, 10)
    apply_result(original, r)
    assert torch.isfinite(original(torch.arange(16)[None]).logits).all()


def test_search_subset_takes_whole_sequences_within_budget():
    hidden = [torch.randn(2, 32, 8), torch.randn(2, 32, 8)]
    mask = torch.zeros(2, 1, 32, 32)
    kw = {"attention_mask": mask, "position_embeddings": (torch.ones(1, 32, 4), torch.ones(1, 32, 4))}
    assert [h.shape[0] for h, _ in search_subset(hidden, kw, 4096)] == [2, 2]
    three = search_subset(hidden, kw, 100)
    assert [h.shape[0] for h, _ in three] == [2, 1]
    assert three[1][1]["attention_mask"].shape == (1, 1, 32, 32)  # batch-shaped kwargs cut to match
    assert three[1][1]["position_embeddings"][0].shape == (1, 32, 4)
    assert [h.shape[0] for h, _ in search_subset(hidden, kw, 10)] == [1]  # at least one sequence


# --------------------------------------------------------------------------- every adapter


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_adapter_end_to_end(family):
    assert family in ADAPTERS
    model = tiny(family, kv_heads=1)
    original = copy.deepcopy(model)
    adapter = adapter_for(model)
    spec = QuantSpec(bits=4, group_size=32, sym=False, quantize_embeddings=True)
    r = awq_model(model, adapter, spec, AWQConfig(n_grid=5, clip_grid=10, search_tokens=64), calib_for(model))
    assert list(r.layers) == quantized_layer_names(model, adapter, spec)
    assert r.info["search_tokens"] == 64
    assert len(r.info["skipped"]) == 2 and len(r.folds) == 6
    assert same_state(model, original)
    apply_result(model, r)
    assert torch.isfinite(model(torch.arange(16)[None]).logits).all()
