"""Effective bits per weight of an affine group layout, without torch (config checks and the mixed solve).

A group of ``g`` weights at ``b`` bits stores ``g * b`` code bits, an fp16 scale and a ``b``-bit zero
point, as ``quanteval.accounting.storage_bits`` counts a ``LayerQuant``.

>>> round(effective_bits(3, 64), 2), round(effective_bits(4, 64), 2)
(3.3, 4.31)
"""

from __future__ import annotations

SCALE_BITS = 16  # an fp16 scale per group


def group_bits(bits: int, sym: bool = False) -> int:
    """Bits one group stores beyond its codes: the fp16 scale, and the zero point when asymmetric."""
    return SCALE_BITS + (0 if sym else bits)


def effective_bits(bits: int, group_size: int, sym: bool = False, in_features: int = 4096) -> float:
    """Bits per weight at ``bits`` with groups of ``group_size`` (-1: one group per row of ``in_features``)."""
    g = in_features if group_size == -1 else group_size
    return bits + group_bits(bits, sym) / g
