"""AWQ: activation-aware weight quantisation (Lin et al. 2023, arXiv:2306.00978).

Follows the reference implementation mit-han-lab/llm-awq (``awq/quantize/
auto_scale.py``, ``auto_clip.py``, ``pre_quant.py``), block by block:

1. **Scale search.** For each ``ScaleGroup`` of the adapter table (a producer
   ``prev`` feeding ``linears``), with ``x_mean`` the mean |x| of each input
   channel, try ``s = x_mean ** a`` for ``a`` in ``k / n_grid``
   (``duo_scaling``: ``x_mean ** a / w_mean ** (1 - a)``), normalised by
   ``sqrt(s.max() * s.min())``. Each linear's weight becomes
   ``RTN(W * s) / s`` and the output of the group's ``inspect`` module is
   compared (MSE) with its full-precision output; the best ``s`` is folded
   into ``prev`` (``apply_fold``: its output is divided by ``s``) and
   multiplied into the linears' columns. ``a = 0`` (``s = 1``, plain RTN) is
   in the grid, so without duo scaling the search is never worse than RTN on
   the search tokens. v -> o is skipped when v's output width differs from
   o's input width (GQA), as in the reference.
2. **Clipping search** (``clip``): for every linear but q/k, each output row
   and group gets the max |w| shrink (``1 - i / clip_grid`` for
   ``i < max_shrink * clip_grid``) minimising the MSE of that group's partial
   output ``x_g @ w_g``; weights are clamped to ``[-max_val, max_val]``.
   All groups of a row batch are searched at once, and the loss is computed
   as ``d @ sigma @ d`` (``d`` the group's quantisation error, ``sigma`` the
   group's ``x_g.T @ x_g / tokens``): the same MSE up to float rounding, at
   ``g`` instead of ``tokens`` multiply-adds per weight.
3. **Quantise** every linear of the block with RTN (``quanteval.methods.rtn``)
   on the scaled and clipped weights.

Token budget: both searches use the first ``search_tokens`` calibration
tokens (``AWQConfig.search_tokens``), taken as whole sequences (at least one) from the
captured chunks; the clipping search subsamples those with a stride down to
about ``CLIP_TOKENS = 512`` tokens (the reference's ``n_sample_token``). The
reference runs its searches over its whole calibration set instead. Only the
captured chunks that hold those sequences are carried from block to block
(at the default budget, one chunk of 8 of the 32 sequences): the others would
never reach a search, and carrying them was most of AWQ's forward time.

Per-layer bits (method=mixed): a linear is searched, clipped and quantised at
``QuantSpec.bits_for`` its name, so a scale group (one unit of the mix) is
searched at the width it will be stored at.

Compute, then apply: ``awq_model`` works on a copy of each block and leaves
``model`` unchanged; ``apply_result`` replays the folds, then writes the
quantised layers. ``scaled_basis`` replays the folds and the column scales
only, so one unit's quantised layers can be applied alone (task=sensitivity).
Departures from the reference: the next block's inputs come
from the *quantised* block (the reference feeds full-precision outputs
forward), and the quantiser is the project's (fp16 scales, zero inside the
range, ragged last group; see ``quanteval.primitives``), used by the searches
and the final quantisation alike.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from quanteval.calibration import BlockInputs, block_forward
from quanteval.config import AWQConfig
from quanteval.methods import Fold, QuantResult, QuantSpec, apply_fold, rtn_outside_blocks
from quanteval.methods.rtn import quantize_rows, rtn_fake_quant, rtn_layer
from quanteval.primitives import LayerQuant, group_width

log = logging.getLogger(__name__)

CLIP_TOKENS = 512  # clipping search: tokens kept by the stride subsample (reference n_sample_token)
OC_BATCH = 256  # clipping search: output rows per batch (reference oc_batch_size); the last may be shorter
NO_CLIP = ("q_proj", "k_proj")  # q/k meet in a bmm, so their clipping error is not measured (reference)


# --------------------------------------------------------------------------- tensor primitives


def fake_quant(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN quantise-dequantise of ``w: (out, in)`` in float32, on ``w.device``."""
    return rtn_fake_quant(w, spec.bits, spec.group_size, spec.sym)


def spec_of(spec: QuantSpec, name: str) -> QuantSpec:
    """``spec`` at the bits of linear ``name`` (``QuantSpec.bits_for``: method=mixed gives each unit its own)."""
    return dataclasses.replace(spec, bits=spec.bits_for(name), layer_bits=()) if spec.layer_bits else spec


def block_spec(spec: QuantSpec, prefix: str) -> QuantSpec:
    """``spec`` with its per-layer bits renamed relative to the block at ``prefix`` (``model.layers.3.``)."""
    return dataclasses.replace(spec, layer_bits=tuple((n[len(prefix):], b) for n, b in spec.layer_bits
                                                      if n.startswith(prefix)))


def group_slices(in_features: int, group_size: int) -> list[slice]:
    """Column slices of the quantisation groups (the last one may be shorter)."""
    g = group_width(in_features, group_size)
    return [slice(c, min(c + g, in_features)) for c in range(0, in_features, g)]


def weight_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over rows of |w| normalised by each group's row max (reference ``get_weight_scale``): (in,)."""
    w = w.float().abs()  # (out, in)
    parts = [w[:, c] / w[:, c].amax(dim=1, keepdim=True).clamp(min=1e-12) for c in group_slices(w.shape[1], group_size)]
    return torch.cat(parts, dim=1).mean(dim=0)  # (in,)


def candidate_scale(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``x_mean ** alpha`` (duo: ``/ w_mean ** (1 - alpha)``), normalised so ``max * min = 1``: (in,)."""
    s = x_mean.pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def clip_max(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, n_grid: int, max_shrink: float) -> torch.Tensor:
    """Best clipping threshold of each row and group (reference ``auto_clip_layer``).

    w: (out, in), x: (tokens, in) -> max_val: (out, n_groups). Candidates are
    ``max|w_g| * (1 - i / n_grid)`` for ``i < int(max_shrink * n_grid)``; the
    loss is the MSE over tokens of the group's partial output ``x_g @ w_g.T``
    (first strict minimum wins; see ``_clip_groups`` for how it is computed).
    The full groups are searched together, the short last group (if any) after.
    """
    w, x = w.float(), x.float()
    (out_f, in_f), n_tok = w.shape, x.shape[0]
    g = group_width(in_f, spec.group_size)
    n_full, tail = divmod(in_f, g)
    full = n_full * g
    parts = []
    if n_full:
        wg = w[:, :full].reshape(out_f, n_full, g)  # (out, n, g)
        xg = x[:, :full].reshape(n_tok, n_full, g).transpose(0, 1).contiguous()  # (n, tokens, g)
        parts.append(_clip_groups(wg, xg, spec, n_grid, max_shrink))
    if tail:
        wt = w[:, full:].unsqueeze(1)  # (out, 1, tail)
        parts.append(_clip_groups(wt, x[None, :, full:].contiguous(), spec, n_grid, max_shrink))
    return torch.cat(parts, dim=1)  # (out, n_groups)


def _clip_groups(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, n_grid: int, max_shrink: float) -> torch.Tensor:
    """``clip_max`` for ``n`` groups of equal width ``g``: w: (out, n, g), x: (n, tokens, g) -> max_val: (out, n).

    With ``d`` a row's quantisation error on a group, the loss
    ``mean_t (x_g[t] . d)^2`` equals ``d @ sigma @ d`` with ``sigma = x_g.T @ x_g / tokens``:
    that costs ``g`` instead of ``tokens`` multiply-adds per weight, so it is
    used whenever ``g <= tokens`` (the loss then differs from the partial
    outputs' MSE by float rounding only).
    """
    out_f, n, g = w.shape
    n_tok = x.shape[1]
    sigma = torch.bmm(x.transpose(1, 2), x) / n_tok if g <= n_tok else None  # (n, g, g)
    best = torch.empty(out_f, n, device=w.device)  # (out, n)
    for r in range(0, out_f, OC_BATCH):
        wg = w[r : r + OC_BATCH]  # (rb, n, g)
        rb = wg.shape[0]
        org_max = wg.abs().amax(dim=2)  # (rb, n)
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)  # (rb, n)
            cw = torch.clamp(wg, -max_val[..., None], max_val[..., None])  # (rb, n, g)
            codes, scale, zero = quantize_rows(cw.view(rb * n, g), spec.bits, spec.sym)  # (rb * n, g), (rb * n, 1) x2
            d = codes.sub_(zero).mul_(scale).view(rb, n, g).sub_(wg).transpose(0, 1)  # RTN(cw) - w: (n, rb, g)
            if sigma is not None:
                err = (torch.bmm(d, sigma) * d).sum(dim=2).T  # (rb, n)
            else:
                err = torch.bmm(d, x.transpose(1, 2)).pow(2).mean(dim=2).T  # (n, rb, tokens) -> (rb, n)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, max_val, best_max)
        best[r : r + rb] = best_max
    return best


def clamp_groups(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w: (out, in)`` clamped group by group to ``[-max_val, max_val]`` (max_val: (out, n_groups)); float32."""
    g = group_width(w.shape[1], group_size)
    m = max_val.to(w.device).repeat_interleave(g, dim=1)[:, : w.shape[1]]  # (out, in): each group's max_val
    return torch.clamp(w.float(), -m, m)


# --------------------------------------------------------------------------- module surgery


@dataclass
class BlockAWQ:
    """What ``awq_block`` found for one block; module names are relative to the block."""

    layers: dict[str, LayerQuant]
    folds: list[Fold]
    alphas: dict[str, float] = field(default_factory=dict)  # prev -> chosen alpha
    losses: dict[str, tuple[float, float]] = field(default_factory=dict)  # prev -> (best, alpha=0) inspect MSE
    skipped: list[str] = field(default_factory=list)  # "prev->linear" groups not scaled (shape mismatch)
    block_mse: float = float("nan")  # MSE of the quantised block's output vs full precision, search tokens
    timings: dict[str, float] = field(default_factory=dict)


Call = tuple[bool, tuple, dict]  # (hidden passed positionally, other args, kwargs) of an inspect module


def _call(module: torch.nn.Module, call: Call, x: torch.Tensor) -> torch.Tensor:
    """Re-run ``module`` as the block called it, with hidden input ``x``; float32 output."""
    positional, rest, kwargs = call
    out = module(x, *rest, **kwargs) if positional else module(hidden_states=x, **kwargs)
    return (out[0] if isinstance(out, tuple) else out).float()


def _run_block(block: torch.nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    outs = []
    for h, kw in inputs:
        out = block(h, **kw)
        outs.append((out[0] if isinstance(out, tuple) else out).float())
    return outs


def _mse(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    sq = sum(float((x.float() - y.float()).pow(2).sum()) for x, y in zip(a, b))
    return sq / sum(x.numel() for x in a)


def _capture(block, adapter, inputs):
    """One pass over the search tokens: every linear's input, every inspect module's call, the block output.

    feats: linear -> [(bs, L, in)] per chunk; calls: inspect -> [Call] per chunk.
    """
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in adapter.all_linears}
    inspects = {g.inspect or g.linears[0] for g in adapter.scale_groups}
    calls: dict[str, list[Call]] = {name: [] for name in inspects}
    hidden_in: dict[str, list[torch.Tensor]] = {name: [] for name in inspects}

    def grab_input(name):
        return lambda module, args, out: feats[name].append(args[0].detach())

    def grab_call(name):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            if args:
                hidden_in[name].append(args[0])
                calls[name].append((True, tuple(args[1:]), kwargs))
            else:
                hidden_in[name].append(kwargs.pop("hidden_states"))
                calls[name].append((False, (), kwargs))

        return hook

    handles = [block.get_submodule(n).register_forward_hook(grab_input(n)) for n in adapter.all_linears]
    handles += [block.get_submodule(n).register_forward_pre_hook(grab_call(n), with_kwargs=True) for n in inspects]
    try:
        base_out = _run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    for g in adapter.scale_groups:
        name = g.inspect or g.linears[0]
        if not torch.equal(hidden_in[name][0], feats[g.linears[0]][0]):
            raise ValueError(f"adapter {adapter.family}: the input of {name!r} is not the input of {g.linears[0]!r}")
    return feats, calls, base_out


@torch.no_grad()
def scale_group(block: torch.nn.Module, group, s: torch.Tensor) -> None:
    """Fold ``1 / s`` into ``group.prev`` and multiply the columns of ``group.linears`` by ``s`` (in place)."""
    apply_fold(block.get_submodule(group.prev), group.prev_kind, s)
    for name in group.linears:
        w = block.get_submodule(name).weight
        w.copy_((w.float() * s.to(w.device)[None, :]).to(w.dtype))  # (out, in) * (1, in)


@torch.no_grad()
def search_scale(block, group, xs: list[torch.Tensor], calls: list[Call], spec: QuantSpec, cfg: AWQConfig):
    """Grid search of the group's scale (reference ``_search_module_scale``); weights are restored.

    xs: the group's input chunks (bs, L, in). Returns (alpha, s: (in,), losses per alpha).
    """
    inspect = block.get_submodule(group.inspect or group.linears[0])
    linears = [block.get_submodule(n) for n in group.linears]
    originals = [lin.weight.detach().clone() for lin in linears]
    w32 = [w.float() for w in originals]  # (out, in) each
    x_mean = sum(x.float().abs().reshape(-1, x.shape[-1]).sum(0) for x in xs) / sum(x[..., 0].numel() for x in xs)
    w_mean = weight_mean(torch.cat(w32), spec.group_size) if cfg.duo_scaling else None
    org_out = [_call(inspect, c, x) for c, x in zip(calls, xs)]
    losses, best, best_s, best_alpha = [], float("inf"), None, 0.0
    try:
        for k in range(cfg.n_grid):
            alpha = k / cfg.n_grid
            s = candidate_scale(x_mean, w_mean, alpha).to(w32[0].device)  # (in,)
            for name, lin, w in zip(group.linears, linears, w32):  # RTN(W * s) / s, cast to the weight's dtype
                lin.weight.copy_(fake_quant(w * s, spec_of(spec, name)).div_(s))
            loss = _mse([_call(inspect, c, x) for c, x in zip(calls, xs)], org_out)
            losses.append(loss)
            if loss < best:
                best, best_s, best_alpha = loss, s, alpha
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
    if best_s is None:
        raise FloatingPointError(f"AWQ scale search for {group.prev}: no finite loss ({losses})")
    return best_alpha, best_s, losses


@torch.no_grad()
def awq_block(block, adapter, spec: QuantSpec, cfg: AWQConfig, inputs: list[tuple[torch.Tensor, dict]]) -> BlockAWQ:
    """Scale, clip and quantise one block in place; ``inputs`` are its search chunks with their kwargs.

    Each linear is searched, clipped and quantised at ``spec.bits_for`` its block-relative name (a scale
    group's linears are one unit of method=mixed, so they share a width).

    Afterwards the block holds the dequantised weights and the folded norms,
    so its forward is the quantised block's.
    """
    t = defaultdict(float)
    t0 = time.perf_counter()
    feats, calls, base_out = _capture(block, adapter, inputs)
    t["forward"] += time.perf_counter() - t0
    out = BlockAWQ(layers={}, folds=[])

    t0 = time.perf_counter()
    for g in adapter.scale_groups:
        prev, first = block.get_submodule(g.prev), block.get_submodule(g.linears[0])
        if g.prev_kind == "linear" and prev.weight.shape[0] != first.weight.shape[1]:
            out.skipped.append(f"{g.prev}->{'+'.join(g.linears)}")
            continue
        alpha, s, losses = search_scale(block, g, feats[g.linears[0]], calls[g.inspect or g.linears[0]], spec, cfg)
        scale_group(block, g, s)
        s = s.float().cpu()
        out.folds.append(Fold(g.prev, g.prev_kind, s))
        out.alphas[g.prev] = alpha
        out.losses[g.prev] = (min(losses), losses[0])
        scaled = [(x.float() / s.to(x.device)).to(x.dtype) for x in feats[g.linears[0]]]  # the fold, seen by x
        for name in g.linears:
            feats[name] = scaled
    t["scale"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    if cfg.clip:
        for name in adapter.all_linears:
            if name.endswith(NO_CLIP):
                continue
            w = block.get_submodule(name).weight
            x = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats[name]])  # (tokens, in)
            x = x[:: max(1, x.shape[0] // CLIP_TOKENS)]
            max_val = clip_max(w, x, spec_of(spec, name), cfg.clip_grid, cfg.max_shrink)  # (out, n_groups)
            w.copy_(clamp_groups(w, max_val, spec.group_size).to(w.dtype))
    t["clip"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    for name in adapter.all_linears:
        w = block.get_submodule(name).weight
        lq = rtn_layer(w.detach(), spec.bits_for(name), spec.group_size, spec.sym)
        w.copy_(lq.dequantize())
        out.layers[name] = lq.cpu()  # stored results live on the CPU, whatever device the block was on
    t["quantize"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    out.block_mse = _mse(_run_block(block, inputs), base_out)
    t["forward"] += time.perf_counter() - t0
    out.timings = dict(t)
    return out


def search_subset(hidden: list[torch.Tensor], kwargs: dict, budget: int) -> list[tuple[torch.Tensor, dict]]:
    """The first whole sequences of ``hidden`` holding at most ``budget`` tokens (at least one sequence).

    A chunk cut short gets its batch-shaped kwargs (e.g. an eager attention mask) cut to match.
    """
    inputs, used = [], 0
    for h in hidden:
        bs, seq_len = h.shape[:2]
        k = min(bs, (budget - used) // seq_len)
        if not inputs:
            k = max(k, 1)
        if k <= 0:
            break
        inputs.append((h[:k], kwargs if k == bs else _cut_batch(kwargs, bs, k)))
        used += k * seq_len
        if k < bs:
            break
    return inputs


def _cut_batch(value, bs: int, k: int):
    if torch.is_tensor(value):
        return value[:k] if value.dim() > 0 and value.shape[0] == bs else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cut_batch(v, bs, k) for v in value)
    if isinstance(value, dict):
        return {key: _cut_batch(v, bs, k) for key, v in value.items()}
    return value


@torch.no_grad()
def awq_model(model, adapter, spec: QuantSpec, method_cfg: AWQConfig, calib: BlockInputs) -> QuantResult:
    """AWQ on every block of ``model``; ``model`` itself is left unchanged (each block is worked on a copy).

    >>> result = awq_model(model, adapter, QuantSpec(4, 64, False), AWQConfig(), calib)  # doctest: +SKIP
    >>> apply_result(model, result)   # folds (norm scales) first, then the quantised linears  # doctest: +SKIP
    """
    if calib is None:
        raise ValueError("AWQ needs calibration inputs (calib=None)")
    t_start = time.perf_counter()
    blocks = model.get_submodule(adapter.blocks)
    layers: dict[str, LayerQuant] = {}
    folds: list[Fold] = []
    info: dict = {"alphas": {}, "losses": {}, "skipped": [], "block_mse": [],
                  "search_tokens_budget": method_cfg.search_tokens}
    timings: dict[str, float] = defaultdict(float)
    used = search_subset(calib.hidden, {}, method_cfg.search_tokens)
    info["search_tokens"] = sum(h.shape[0] * h.shape[1] for h, _ in used)
    # Only the chunks the searches read are carried to the next block (whole, so each chunk's forward is the
    # same computation as it would be among all of them): the rest of the calibration set never reaches a search.
    hidden = calib.hidden[: len(used)]
    for i in tqdm(range(len(blocks)), desc="AWQ blocks", leave=False):
        prefix = f"{adapter.blocks}.{i}."
        work = copy.deepcopy(blocks[i])
        inputs = search_subset(hidden, calib.kwargs[i], method_cfg.search_tokens)
        found = awq_block(work, adapter, block_spec(spec, prefix), method_cfg, inputs)
        t0 = time.perf_counter()
        if i + 1 < len(blocks):
            hidden = block_forward(work, hidden, calib.kwargs[i])  # later blocks see the quantised outputs
        timings["forward"] += time.perf_counter() - t0
        del work
        layers.update({prefix + name: lq for name, lq in found.layers.items()})
        folds += [Fold(prefix + f.module, f.kind, f.scale) for f in found.folds]
        info["alphas"].update({prefix + k: v for k, v in found.alphas.items()})
        info["losses"].update({prefix + k: list(v) for k, v in found.losses.items()})
        info["skipped"] += [prefix + s for s in found.skipped]
        info["block_mse"].append(found.block_mse)
        for k, v in found.timings.items():
            timings[k] += v
        log.debug("AWQ block %d: alphas %s, block mse %.3g", i, found.alphas, found.block_mse)
    layers.update(rtn_outside_blocks(model, adapter, spec))  # embeddings / lm_head: plain RTN
    timings["total"] = time.perf_counter() - t_start
    info["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return QuantResult(layers=layers, folds=folds, info=info)


@torch.no_grad()
def scaled_basis(model, adapter, folds: list[Fold]) -> None:
    """Move ``model`` (in place) into the basis its AWQ result was quantised in, without quantising it.

    Every fold's ``1 / s`` goes into its producer and ``s`` into the columns of its group's linears (as
    the search did), so the model computes what it computed before, up to the weights' rounding, and its
    linears hold the weights AWQ scaled (before its clipping and rounding). Then one unit's quantised linears can
    replace their scaled weights alone: the model is the baseline but for that unit (task=sensitivity).
    Applying every layer of the result on top gives ``apply_result``'s model.
    """
    blocks = model.get_submodule(adapter.blocks)
    by_module = {f.module: f for f in folds}
    for i, block in enumerate(blocks):
        for g in adapter.scale_groups:
            f = by_module.pop(f"{adapter.blocks}.{i}.{g.prev}", None)
            if f is not None:
                scale_group(block, g, f.scale)
    if by_module:
        raise ValueError(f"AWQ folds into {sorted(by_module)[0]!r}: no scale group of adapter {adapter.family} "
                         f"produces it")
