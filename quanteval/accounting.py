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
- **A library format** (``FormatQuant``: NF4, HQQ, GGUF blocks, LLM.int8) brings its own exact
  storage bits, summed from the library's own tensors (codes, absmax, code tables, scales, zeros,
  row scales); the same two numbers follow from them.
"""

from __future__ import annotations

from quanteval.primitives import FormatQuant, group_width

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
    formats = {}
    for name, lq in layers.items():
        rows, cols = lq.shape
        q_bits += storage_bits(lq)
        q_weights += rows * cols
        if isinstance(lq, FormatQuant):
            formats[lq.format] = formats.get(lq.format, 0) + 1
            continue
        g = group_width(cols, lq.group_size)
        n_groups = lq.scales.shape[1]
        layouts[f"in={cols}"] = {"group_size": lq.group_size, "n_groups": n_groups,
                                 "last_group": cols - (n_groups - 1) * g}
    out = {
        "effective_bits": q_bits / q_weights,
        "model_bytes": int(q_bits / 8 + (param_count - q_weights) * FLOAT_BYTES),
        "baseline_bytes": param_count * FLOAT_BYTES,
        "quantized_weights": q_weights,
        "group_layout": layouts,
    }
    if formats:  # {"gguf Q4_1": 150, "gguf Q5_0": 60}: the layers of each format (fallbacks show here)
        out["formats"] = formats
    return out


def storage_bits(lq) -> int:
    """The bits one layer's result stores: a ``FormatQuant``'s own count, or for a ``LayerQuant``
    ``rows * cols * bits`` plus an fp16 scale (and a ``bits``-wide zero when asymmetric) per group."""
    if isinstance(lq, FormatQuant):
        return int(lq.storage_bits)
    rows, cols = lq.shape
    per_group = 16 + (0 if lq.sym else lq.bits)
    return rows * cols * lq.bits + rows * lq.scales.shape[1] * per_group
