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

MAX_CAPACITY = 50_000_000  # DP table cells; a model whose sizes share no larger divisor is refused


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
    if all("storage_bits" in by[b][u] for b in choices for u in units):
        # the exact bits each unit's quantised linears store at each width, as the tables measured them
        # (hqq's packing included); in units of their greatest common divisor, rounded up (never over budget)
        # where that would make too large a table
        raw = [[int(by[b][u]["storage_bits"]) for b in choices] for u in units]
        quantum = reduce(math.gcd, (c for row in raw for c in row))
        quantum = max(quantum, math.ceil(budget * weights / MAX_CAPACITY))
        cost = [[-(-c // quantum) for c in row] for row in raw]
    else:  # tables written before they held storage bits: the affine layout's count
        groups = {}
        for u in units:  # a unit's groups: rows x groups per row, summed over its linears
            n = 0
            for name in layers[u]:
                rows, cols = sizes[name]
                n += rows * math.ceil(cols / group_size)
            groups[u] = n
        quantum = reduce(math.gcd, groups.values())
        # bits per group at width b: g * b codes + scale and zero (last groups of a row may be shorter: the
        # default group sizes divide every width of the embedded models, and the cost then is exact)
        per_group = {b: group_size * b + group_bits(b, sym) for b in choices}
        cost = [[groups[u] // quantum * per_group[b] for b in choices] for u in units]
    capacity = int(math.floor(budget * weights / quantum + 1e-9))
    if capacity > MAX_CAPACITY:
        raise ValueError(f"method=mixed: the exact solve needs {capacity:,} table cells (> {MAX_CAPACITY:,}); "
                         f"the units' sizes share too small a divisor")
    kl = [[float(by[b][u]["predicted"]) for b in choices] for u in units]
    picked, total = solve(kl, cost, capacity)
    bits = {u: choices[c] for u, c in zip(units, picked)}
    used = sum(cost[i][c] for i, c in enumerate(picked)) * quantum
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
    if method_cfg.base == "rtn":
        from quanteval.methods import rtn_model

        result = rtn_model(model, adapter, mixed)
    elif method_cfg.base == "hqq":
        from quanteval.config import HQQConfig
        from quanteval.methods.hqq import hqq_model

        result = hqq_model(model, adapter, mixed, HQQConfig())
    else:
        from quanteval.config import GPTQConfig
        from quanteval.methods.gptq import gptq_model

        result = gptq_model(model, adapter, mixed, GPTQConfig(), calib)
    result.info = {**result.info, "mixed": {k: v for k, v in p.items() if k != "layer_bits"}}
    return result
