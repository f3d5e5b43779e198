"""Per-unit sensitivity: quantise one unit at a time, the rest of the model unquantised, and measure the
KL to the baseline it alone causes.

In the spirit of HAWQ-style layer sensitivity and of ModelOpt's AutoQuantize / auto-round's AutoScheme
(which search per-layer formats under a bits budget), but measured, not estimated: the measured KL is
what ``quanteval.methods.mixed`` adds up.

Units
    A block's groups of linears that share an input (``Adapter.linears``): q/k/v, o, gate/up, down; 4 per
    block, 120 on SmolLM2. A unit's quantised weights are taken from the uniform variant's cached result
    (the very GPTQ or RTN weights that variant evaluates) and applied alone.

Measured KL
    On WikiText-2 *validation* windows (``task.file``; never the test windows the fidelity task reports
    on, so choosing a mix by these numbers does not leak into its evaluation). The baseline's input of
    every block is computed once and kept, so measuring a unit of block ``i`` runs blocks ``i..L-1`` and
    the head only. KL is llama.cpp's, over the baseline's top-k tokens plus a tail bucket
    (``quanteval.evaluate.fidelity``).

Proxy
    For every unit, the output error its quantisation causes on the same windows' inputs,
    ``sum over its linears of tr(dW H dW^T)`` with ``H = X^T X`` (what GPTQ minimises), relative to
    ``tr(W H W^T)``. It costs one pass; its Spearman rho against the measured KL is reported beside it.
    Every unit is measured by default (``task.sample=null``); with a sample, the unmeasured units get
    ``alpha * proxy`` (alpha fitted on the sample) only when rho reaches ``PROXY_MIN_RHO``.

Compute, then apply: ``measure`` returns plain data (``SensitivityTable``); the caller stores it as a run.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

PROXY_MIN_RHO = 0.7  # below this the proxy is not used for unmeasured units (they are measured instead)
UNIT_KINDS = {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "q/k/v", ("self_attn.o_proj",): "o",
              ("mlp.gate_proj", "mlp.up_proj"): "gate/up", ("mlp.down_proj",): "down"}


@dataclass(frozen=True)
class Unit:
    """One unit: a block's group of linears sharing an input.

    >>> Unit(3, "o", ("model.layers.3.self_attn.o_proj",)).name
    '3.o'
    """

    block: int
    kind: str  # "q/k/v", "o", "gate/up", "down" (or the linears joined by "+" for an unknown group)
    layers: tuple[str, ...]  # full module paths

    @property
    def name(self) -> str:
        return f"{self.block}.{self.kind}"


def units(model, adapter) -> list[Unit]:
    """Every unit of ``model``, in execution order."""
    n = len(model.get_submodule(adapter.blocks))
    return [Unit(i, UNIT_KINDS.get(tuple(group), "+".join(group)),
                 tuple(f"{adapter.blocks}.{i}.{lin}" for lin in group))
            for i in range(n) for group in adapter.linears]


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan with fewer than 3 pairs.

    >>> spearman([1, 2, 3, 4], [10, 20, 30, 25])
    0.8
    """
    if len(x) < 3:
        return math.nan

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else math.nan


@dataclass
class SensitivityTable:
    """Per unit: measured KL (None where not measured), proxy, the KL the table predicts, and the unit's
    quantised weights' storage bits (for a budget)."""

    units: list[Unit]
    kl: list[float | None]
    proxy: list[float]
    predicted: list[float]
    rho: float  # Spearman rho of proxy against measured KL, over the measured units
    proxy_used: bool  # whether unmeasured units were predicted from the proxy

    storage_bits: list[int] | None = None  # per unit: the bits its quantised linears store (the mixed solve's cost)

    def rows(self) -> list[dict]:
        bits = self.storage_bits or [None] * len(self.units)
        return [{"unit": u.name, "block": u.block, "kind": u.kind, "layers": list(u.layers), "kl": k,
                 "proxy": p, "predicted": q, **({} if b is None else {"storage_bits": b})}
                for u, k, p, q, b in zip(self.units, self.kl, self.proxy, self.predicted, bits)]


class _Weights:
    """A unit's baseline weights, kept while its quantised weights are in the model."""

    def __init__(self, model, unit: Unit, layers: dict):
        self.saved = {name: model.get_submodule(name).weight.detach().clone() for name in unit.layers}
        for name in unit.layers:
            w = model.get_submodule(name).weight
            w.data.copy_(layers[name].dequantize(torch.float32).to(w.device, w.dtype))

    def restore(self, model) -> None:
        for name, w in self.saved.items():
            model.get_submodule(name).weight.data.copy_(w)


def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the last block's output (the final norm, the output head, Gemma's soft cap)."""
    from quanteval.models import output_logits

    return output_logits(model, model.get_decoder().norm(hidden))


@torch.no_grad()
def measure(model, adapter, windows: torch.Tensor, layers: dict, top_k: int = 64, sample: int | None = None,
            seed: int = 0) -> SensitivityTable:
    """The sensitivity table of ``layers`` (a uniform result's weight-only layers, ``LayerQuant`` or
    ``FormatQuant`` without a replacement module, by module path) on ``windows``
    (n, seq_len) of validation text; ``model`` holds the baseline weights and is left holding them."""
    from quanteval.calibration import capture_inputs
    from quanteval.evaluate.fidelity import _base_positions, _compare_positions

    blocks = model.get_submodule(adapter.blocks)
    all_units = [u for u in units(model, adapter) if all(name in layers for name in u.layers)]
    calib = capture_inputs(model, adapter, windows, batch_size=windows.shape[0])
    targets = windows[:, 1:]
    # the baseline's input of every block, its logits' top-k, and each unit's proxy (block by block)
    inputs, proxy = [calib.hidden], {}
    for i, block in enumerate(tqdm(blocks, desc="baseline blocks", leave=False)):
        hs: dict[str, torch.Tensor] = {}

        def grab(name):
            def hook(module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
                hs[name] = hs.get(name, 0) + x.T @ x  # H: (in, in)
            return hook

        mine = [u for u in all_units if u.block == i]
        handles = [model.get_submodule(u.layers[0]).register_forward_pre_hook(grab(u.layers[0])) for u in mine]
        try:
            out = [block(h, **calib.kwargs[i]) for h in inputs[-1]]
        finally:
            for hd in handles:
                hd.remove()
        inputs.append([o[0] if isinstance(o, tuple) else o for o in out])
        for u in mine:
            H = hs[u.layers[0]]
            err = ref = 0.0
            for name in u.layers:
                w = model.get_submodule(name).weight.float()  # (out, in)
                dw = layers[name].dequantize(torch.float32).to(w.device) - w
                err += float(((dw @ H) * dw).sum())
                ref += float(((w @ H) * w).sum())
            proxy[u.name] = err / max(ref, 1e-30)
    base = [_base_positions(_head(model, h)[0, :-1], targets[n], top_k)
            for n, h in enumerate(torch.cat(inputs[-1]).split(1))]

    measured = list(range(len(all_units)))
    if sample is not None and sample < len(all_units):
        measured = sorted(random.Random(seed).sample(measured, sample))
    kl: list[float | None] = [None] * len(all_units)
    for j in tqdm(measured, desc="units", unit="unit", leave=False):
        u = all_units[j]
        kept = _Weights(model, u, layers)
        try:
            hidden = inputs[u.block]
            for b in range(u.block, len(blocks)):
                outs = [blocks[b](h, **calib.kwargs[b]) for h in hidden]
                hidden = [o[0] if isinstance(o, tuple) else o for o in outs]
            total = count = 0.0
            for n, h in enumerate(torch.cat(hidden).split(1)):
                cols = _compare_positions(_head(model, h)[0, :-1], targets[n], base[n])
                total += float(cols["kl"].double().sum())
                count += cols["kl"].numel()
            kl[j] = total / count
        finally:
            kept.restore(model)
    px = [proxy[u.name] for u in all_units]
    pairs = [(px[j], kl[j]) for j in measured]
    rho = spearman([p for p, _ in pairs], [k for _, k in pairs])
    predicted = [k if k is not None else math.nan for k in kl]
    proxy_used = False
    if len(measured) < len(all_units):
        if not (rho >= PROXY_MIN_RHO):
            raise ValueError(f"task.sample={sample}: the proxy ranks the measured units with Spearman rho "
                             f"{rho:.2f} < {PROXY_MIN_RHO}, too poorly to predict the others; measure every "
                             f"unit (task.sample=null)")
        alpha = sum(k for _, k in pairs) / max(sum(p for p, _ in pairs), 1e-30)  # KL ~ alpha * proxy
        predicted = [k if k is not None else alpha * p for k, p in zip(kl, px)]
        proxy_used = True
    from quanteval.accounting import storage_bits

    stored = [sum(storage_bits(layers[name]) for name in u.layers) for u in all_units]
    return SensitivityTable(all_units, kl, px, predicted, rho, proxy_used, stored)
