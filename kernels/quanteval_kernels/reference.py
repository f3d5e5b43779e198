"""Torch reference for dequant-matmul on packed weights: the ground truth the Triton kernel is tested against.

It unpacks the whole weight, dequantises it in float32 with the same formula
as ``quanteval.primitives.LayerQuant.dequantize`` (``scale * (code - zero)``,
per column's group), then runs ``F.linear`` in the activation dtype. So on a
CPU in float32 a layer built from a ``LayerQuant`` gives the same weight,
bit for bit, as the fake-quant model, and the same matmul.

It materialises ``W: (out, in)`` on every call: a reference and the CPU
fallback, not a fast path (the weights are packed at rest, not in flight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quanteval_kernels.pack import check_bits, unpack_codes

__all__ = ["dequantize_packed", "dequant_matmul"]


def _group_of_column(in_features: int, group_size: int, g_idx: torch.Tensor | None, device) -> torch.Tensor:
    """(in,) int64: each column's group."""
    if g_idx is not None:
        return g_idx.to(device, torch.int64)
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int64, device=device)
    return torch.arange(in_features, device=device) // group_size


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                      in_features: int, g_idx: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W_hat: (out, in)`` from packed codes: ``scale[:, g] * (code - zero[:, g])`` in float32, cast to ``dtype``.

    packed (out, n_words) int32, scales / zeros (out, n_groups), g_idx (in,) or None (contiguous groups).

    >>> from quanteval_kernels.pack import pack_codes
    >>> p = pack_codes(torch.tensor([[0, 1, 2, 3]]), 2)
    >>> dequantize_packed(p, torch.tensor([[0.5]]), torch.tensor([[1]]), 2, -1, 4).tolist()
    [[-0.5, 0.0, 0.5, 1.0]]
    """
    check_bits(bits)
    codes = unpack_codes(packed, bits, in_features)  # (out, in) uint8
    g = _group_of_column(in_features, group_size, g_idx, packed.device)  # (in,)
    s = scales.float()[:, g]  # (out, in)
    z = zeros.float()[:, g]  # (out, in)
    return (s * (codes.float() - z)).to(dtype)


def dequant_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W_hat.T``: x (..., in) -> (..., out), in ``x.dtype``."""
    w = dequantize_packed(packed, scales, zeros, bits, group_size, x.shape[-1], g_idx, dtype=x.dtype)  # (out, in)
    return F.linear(x, w)
