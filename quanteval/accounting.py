"""Compression accounting: the x-axis of every chart. The one place the convention is written.

- **Effective bits per quantised weight** = total stored bits of the quantised
  layers / their number of weights, where each group stores a 16-bit scale
  and, when asymmetric, a zero of ``bits`` width:
  ``bits + (16 + (bits if asym else 0)) / group_size``, with short last
  groups counted exactly (the count of groups per row is exact).
- **Whole-model bytes** = quantised layers at that rate, plus every other
  parameter (embeddings, lm_head, norms) at 16 bits. 16 bits is what a
  deployed float checkpoint stores (bf16/fp16): the CPU runs compute in fp32
  for speed, but that is not what anyone ships. Tied weights count once.
- The baseline is 16 bits per weight.
"""

from __future__ import annotations

from quanteval.primitives import group_width

FLOAT_BYTES = 2  # bf16/fp16 storage of everything not quantised


def compression(param_count: int, layers: dict) -> dict:
    """Effective bits and whole-model bytes for a result's ``layers`` ({name: LayerQuant}).

    ``param_count`` counts the model's parameters once each (tied weights once).
    """
    if not layers:
        return {"effective_bits": 16.0, "model_bytes": param_count * FLOAT_BYTES,
                "baseline_bytes": param_count * FLOAT_BYTES, "quantized_weights": 0}
    q_bits = 0
    q_weights = 0
    layouts = {}
    for name, lq in layers.items():
        rows, cols = lq.shape
        n_groups = lq.scales.shape[1]
        per_group = 16 + (0 if lq.sym else lq.bits)  # fp16 scale (+ zero at bits width)
        q_bits += rows * cols * lq.bits + rows * n_groups * per_group
        q_weights += rows * cols
        g = group_width(cols, lq.group_size)
        layouts[f"in={cols}"] = {"group_size": lq.group_size, "n_groups": n_groups,
                                 "last_group": cols - (n_groups - 1) * g}
    return {
        "effective_bits": q_bits / q_weights,
        "model_bytes": int(q_bits / 8 + (param_count - q_weights) * FLOAT_BYTES),
        "baseline_bytes": param_count * FLOAT_BYTES,
        "quantized_weights": q_weights,
        "group_layout": layouts,
    }
