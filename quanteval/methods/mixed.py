"""method=mixed: one bit width per unit, the summed sensitivity KL minimised within a bits budget.

The problem is a multiple-choice knapsack: each unit ``u`` (a block's q/k/v, o, gate/up or down) takes one
width ``b`` from ``method.choices``; it costs the unit's storage at ``b`` (codes, an fp16 scale and a
zero point per group: ``quanteval.methods_bits``) and adds ``KL(u, b)``, the KL to the baseline with
``u`` alone quantised at ``b`` (a ``task=sensitivity`` table per width). Minimise the sum of KL (the
additivity assumption, checked by the report's predicted-against-measured chart) with total storage at
most ``budget`` x the quantised weights.

**Solve: exact dynamic programming**, not greedy. Costs are integers once divided by the greatest common
divisor of the units' storage bits (SmolLM2 at g64: 1 728 groups' worth), so the table over used capacity is exact;
SmolLM2's 120 units x 4 widths fill a table of about 0.5 M capacities in about a second. ``solve`` is a
pure function of plain numbers, tested against brute force.

**Quantise**: the base method with each linear's bits (``QuantSpec.layer_bits``): RTN and HQQ per layer,
GPTQ block by block with each group solved at its unit's width, so later blocks see the mixed outputs, as
in a uniform run. A unit's cost is the bits its linears store in the table's own result (hqq's fp16 zeros
and 3-bit packing included); tables from before that was recorded are costed by the affine layout. The sensitivity tables come from the sweep (``quanteval.sweep.quantize`` finds them by key
and runs them first when missing); this module gets their rows.
"""

from __future__ import annotations

import logging
import math
from functools import reduce

import numpy as np

from quanteval.methods import QuantResult, QuantSpec
from quanteval.methods_bits import group_bits

log = logging.getLogger(__name__)

MAX_CAPACITY = 50_000_000  # DP table cells; beyond it costs are rounded up to a coarser unit


def solve(kl: list[list[float]], cost: list[list[int]], capacity: int) -> tuple[list[int], float]:
    """The choice per unit minimising ``sum kl[u][c]`` with ``sum cost[u][c] <= capacity``: (choices, total KL).

    >>> solve([[3.0, 1.0], [2.0, 0.5]], [[1, 3], [1, 2]], 4)
    ([0, 1], 3.5)
    """
    best = np.full(capacity + 1, np.inf)  # best[c]: least KL with exactly c capacity used
    best[0] = 0.0
    picks = np.zeros((len(kl), capacity + 1), dtype=np.int8)
    for u, (ks, cs) in enumerate(zip(kl, cost)):
        new = np.full(capacity + 1, np.inf)
        for c, (k, w) in enumerate(zip(ks, cs)):
            if w > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[w:] = best[: capacity + 1 - w] + k
            better = cand < new
            new[better] = cand[better]
            picks[u][better] = c
        best = new
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        raise ValueError("method.budget: no choice of widths fits the budget")
    total, choices = float(best[end]), [0] * len(kl)
    for u in range(len(kl) - 1, -1, -1):
        c = int(picks[u][end])
        choices[u] = c
        end -= cost[u][c]
    return choices, total


def plan(rows_by_bits: dict[int, list[dict]], sizes: dict[str, tuple[int, int]], group_size: int, sym: bool,
         budget: float) -> dict:
    """The widths per unit: ``rows_by_bits`` {bits: sensitivity rows}, ``sizes`` {module path: (out, in)}.

    Returns {"bits": {unit: bits}, "layer_bits": {module path: bits}, "predicted_kl", "effective_bits"}."""
    choices = sorted(rows_by_bits)
    units = [r["unit"] for r in rows_by_bits[choices[0]]]
    by = {b: {r["unit"]: r for r in rows_by_bits[b]} for b in choices}
    missing = [(b, u) for b in choices for u in units if u not in by[b]]
    if missing:
        raise ValueError(f"sensitivity table for bits={missing[0][0]} lacks unit {missing[0][1]}")
    layers = {u: by[choices[0]][u]["layers"] for u in units}
    weights = sum(sizes[name][0] * sizes[name][1] for u in units for name in layers[u])
    if group_size == -1:  # one group per row: codes cost in_features x b per row
        raise ValueError("method=mixed: group_size=-1 (per channel) is not supported; use a group size")

    def stored(u: str, b: int) -> int:
        """The bits unit ``u`` stores at width ``b``: its table's own count (hqq's packing included), or for a
        table written before it held one, the affine layout's (codes, fp16 scale and zero per group; a row's
        last group may be shorter, but the default group sizes divide every width of the embedded models)."""
        row = by[b][u]
        if "storage_bits" in row:
            return int(row["storage_bits"])
        n_groups = sum(sizes[name][0] * math.ceil(sizes[name][1] / group_size) for name in layers[u])
        return n_groups * (group_size * b + group_bits(b, sym))

    raw = [[stored(u, b) for b in choices] for u in units]
    # integer costs in units of their greatest common divisor (exact), coarser and rounded up (never over
    # the budget) only where the exact table would exceed MAX_CAPACITY cells
    quantum = max(reduce(math.gcd, (c for row in raw for c in row)), math.ceil(budget * weights / MAX_CAPACITY))
    cost = [[-(-c // quantum) for c in row] for row in raw]
    capacity = int(math.floor(budget * weights / quantum + 1e-9))
    kl = [[float(by[b][u]["predicted"]) for b in choices] for u in units]
    picked, total = solve(kl, cost, capacity)
    bits = {u: choices[c] for u, c in zip(units, picked)}
    used = sum(raw[i][c] for i, c in enumerate(picked))
    return {"bits": bits, "layer_bits": {name: bits[u] for u in units for name in layers[u]},
            "predicted_kl": total, "effective_bits": used / weights, "budget": budget,
            "solver": "dynamic programming (exact multiple-choice knapsack)"}


def mixed_model(model, adapter, spec: QuantSpec, method_cfg, calib, rows_by_bits: dict[int, list[dict]]) -> QuantResult:
    """Quantise ``model`` by ``method_cfg.base`` at the widths ``plan`` picks from ``rows_by_bits``."""
    import dataclasses

    from quanteval.methods import quantized_layer_names

    names = quantized_layer_names(model, adapter, spec)
    sizes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    p = plan(rows_by_bits, sizes, spec.group_size, spec.sym, method_cfg.budget)
    mixed = dataclasses.replace(spec, bits=max(method_cfg.choices), layer_bits=tuple(sorted(p["layer_bits"].items())))
    counts = {b: sum(1 for v in p["bits"].values() if v == b) for b in sorted(set(p["bits"].values()))}
    log.info("mixed %s at %.3f bits (budget %g): units per width %s, predicted KL %.4g", method_cfg.base,
             p["effective_bits"], method_cfg.budget, counts, p["predicted_kl"])
    from quanteval.config import MIXED_BASES
    from quanteval.methods import METHODS

    # the base through the method table, with its defaults; GPTQ takes the block inputs, RTN and HQQ ignore them
    result = METHODS[method_cfg.base].compute(model, adapter, mixed, MIXED_BASES[method_cfg.base](), calib)
    result.info = {**result.info, "mixed": {k: v for k, v in p.items() if k != "layer_bits"}}
    return result
