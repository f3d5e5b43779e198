"""Pure tensor primitives for integer weight quantisation.

Nothing here touches ``nn.Module``, files or config objects (see STYLE.md).
The quantiser follows the GPTQ reference (IST-DASLab/gptq ``quant.py``):

    codes = clamp(round(w / scale) + zero, 0, maxq)
    w_hat = scale * (codes - zero)

Conventions, used by every method and by ``kernels/``:

- ``W`` is a linear layer's weight, shape ``(out, in)``; groups run along ``in``.
- ``group_size = -1`` means one group per output row (per-channel).
- When ``group_size`` does not divide ``in``, the last group is shorter
  (as in the GPTQ reference). SmolLM2 at g128: 576 = 4 x 128 + 64.
- Asymmetric: per-group min/max, each clamped to include 0, ``zero`` is an
  integer in ``[0, maxq]``. Symmetric: ``scale = 2 * max|w| / maxq`` and
  ``zero = (maxq + 1) / 2`` (as in the reference), so a symmetric layer needs
  no stored zeros.
- Scales are stored in fp16, as a packed kernel would store them. They are
  rounded *up* to the next fp16 value so the group's range stays inside the
  code range; the round-trip error is then at most ``stored_scale / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = [
    "LayerQuant",
    "FormatQuant",
    "layer_from_dict",
    "exact_float",
    "group_width",
    "group_index",
    "group_layout",
    "minmax_params",
    "quantize_codes",
    "dequantize",
    "round_scale_fp16",
]


def group_width(in_features: int, group_size: int) -> int:
    """Width of a full group: ``group_size``, or ``in_features`` when ``group_size = -1`` (per-channel).

    Raises ``ValueError`` unless ``group_size`` is -1 or positive.

    >>> group_width(576, 128), group_width(576, -1)
    (128, 576)
    """
    if group_size == 0 or group_size < -1:
        raise ValueError(f"group_size={group_size}: must be -1 or a positive integer")
    return in_features if group_size == -1 else group_size


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """Group of each input column for contiguous groups: ``(in,)`` int32.

    >>> group_index(5, 2).tolist()
    [0, 0, 1, 1, 2]
    """
    return torch.arange(in_features, dtype=torch.int32) // group_width(in_features, group_size)


def group_layout(in_features: int, group_size: int) -> dict:
    """The true group layout of one layer, as recorded in results.

    >>> group_layout(576, 128)
    {'in_features': 576, 'group_size': 128, 'n_groups': 5, 'last_group': 64}
    """
    g = group_width(in_features, group_size)
    n_groups = -(-in_features // g)
    return {
        "in_features": in_features,
        "group_size": group_size,
        "n_groups": n_groups,
        "last_group": in_features - (n_groups - 1) * g,
    }


def round_scale_fp16(scale: torch.Tensor) -> torch.Tensor:
    """Round positive scales up to the next fp16 value; returns float32 holding fp16 values."""
    s16 = scale.to(torch.float16)
    too_small = s16.float() < scale
    s16 = torch.where(too_small, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    return s16.float()


def minmax_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of ``w`` (one group per row), from its min/max.

    w: (rows, cols) -> scale: (rows,) float32 holding fp16 values, zero: (rows,) float32 integers.
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)  # (rows,)
    xmax = w.max(dim=1).values.clamp(min=0)  # (rows,)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    dead = (xmin == 0) & (xmax == 0)  # an all-zero row: any scale works
    xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    scale = round_scale_fp16((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` given broadcastable ``scale`` and ``zero`` (same shape after broadcast)."""
    maxq = 2**bits - 1
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)


@dataclass
class LayerQuant:
    """The quantisation of one linear layer, as plain tensors.

    Every method (RTN, GPTQ, AWQ) returns one of these per layer, so the same
    object can be applied to a model, cached, exported, or packed by ``kernels/``.

    Shapes: ``codes (out, in)`` uint8; ``scales, zeros (out, n_groups)``
    (scales fp16, zeros uint8); ``g_idx (in,)`` int32, the group of each column
    (not monotone when GPTQ's ``act_order`` is on).

    >>> from quanteval.methods.rtn import rtn_layer
    >>> q = rtn_layer(torch.randn(4, 8), bits=4, group_size=4, sym=False)
    >>> q.dequantize().shape, q.scales.shape
    (torch.Size([4, 8]), torch.Size([4, 2]))
    """

    bits: int
    group_size: int
    sym: bool
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scale * (code - zero)`` per element: (out, in)."""
        g = self.g_idx.long()
        s = self.scales.float()[:, g]  # (out, in)
        z = self.zeros.float()[:, g]  # (out, in)
        return (s * (self.codes.float() - z)).to(dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("bits", "group_size", "sym", "codes", "scales", "zeros", "g_idx")}

    def cpu(self) -> "LayerQuant":
        """The same quantisation with every tensor on the CPU, where stored results live.

        >>> LayerQuant(2, -1, False, *[torch.zeros(1, 1)] * 4).cpu().codes.device
        device(type='cpu')
        """
        return LayerQuant(**{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in self.to_dict().items()})


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (codes - zero)`` with broadcastable ``scale``/``zero``."""
    return scale * (codes - zero)


@dataclass
class FormatQuant:
    """The quantisation of one linear layer in a format that is not ``scale * (code - zero)``.

    NF4/FP4 codebooks with an fp32 absmax (and double quantisation), HQQ's float zeros, GGUF's Q4_1/Q5_1
    fp16 minimum and MXFP4's shared exponents cannot be written as a ``LayerQuant``. A method that makes
    one of them (``quanteval/methods/{bnb,hqq,gguf}.py``) runs the library's own quantiser *and its own
    dequantiser*, and keeps:

    - ``format``: the format as labels and results name it, e.g. ``"gguf Q4_1"``, ``"bnb nf4"``;
    - ``weight``: the library's dequantised weight (out, in), held in the narrowest float dtype that
      holds it exactly (``exact_float``), so applying it is bit for bit the library's dequantisation;
    - ``storage_bits``: the exact bits the format stores for this layer (codes, scales, zeros, absmax,
      code tables, ...), summed from the library's own tensors;
    - ``detail``: small JSON facts (e.g. the type llama.cpp fell back to for this tensor);
    - ``module``: None for weight fake-quant; else the name of a module the layer must *run as*
      (``"bnb_int8"``: LLM.int8 picks outlier activation columns at every forward, which no weight can
      express), built by ``quanteval.methods.REPLACEMENTS`` from ``tensors``.

    >>> q = FormatQuant("demo", torch.ones(2, 4), storage_bits=40)
    >>> q.shape, q.dequantize().dtype, q.bits_per_weight
    ((2, 4), torch.float32, 5.0)
    """

    format: str
    weight: torch.Tensor
    storage_bits: int
    detail: dict = field(default_factory=dict)
    module: Optional[str] = None
    tensors: dict = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits / self.weight.numel()

    def to_dict(self) -> dict:
        return {"format": self.format, "weight": self.weight, "storage_bits": int(self.storage_bits),
                "detail": dict(self.detail), "module": self.module, "tensors": dict(self.tensors)}

    def cpu(self) -> "FormatQuant":
        return FormatQuant(self.format, self.weight.cpu(), self.storage_bits, dict(self.detail), self.module,
                           {k: v.cpu() for k, v in self.tensors.items()})


def layer_from_dict(d: dict) -> "LayerQuant | FormatQuant":
    """The layer result a ``to_dict()`` wrote (a cached result): ``FormatQuant`` when it names a format."""
    return FormatQuant(**d) if "format" in d else LayerQuant(**d)


def exact_float(w: torch.Tensor) -> torch.Tensor:
    """``w`` in the narrowest of bf16 / fp16 / fp32 that holds every value exactly (halves a cached
    NF4 result against fp32, and never rounds anything).

    >>> exact_float(torch.tensor([0.5, 1.0])).dtype, exact_float(torch.tensor([0.1])).dtype
    (torch.bfloat16, torch.float32)
    """
    w32 = w.float()
    for dtype in (torch.bfloat16, torch.float16):
        if torch.equal(w32.to(dtype).float(), w32):
            return w32.to(dtype)
    return w32
