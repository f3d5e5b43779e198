"""Effective bits per weight of an affine group layout, without torch (config checks and the mixed solve).

A group of ``g`` weights at ``b`` bits stores ``g * b`` code bits, an fp16 scale and a ``b``-bit zero
point, as ``quanteval.accounting.storage_bits`` counts a ``LayerQuant``.

>>> round(effective_bits(3, 64), 2), round(effective_bits(4, 64), 2)
(3.3, 4.31)

HQQ (``hqq_effective_bits``) stores its scale *and* zero in fp16 and packs 3-bit codes ten to an int32 word,
so its widths cost more: 2.5, 3.7, 4.5 and 8.5 bits at g64 (``HQQLinear``'s own tensors, less the few
groups padded to a multiple of ten at 3 bits; the mixed solve uses the exact counts from the tables).
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


HQQ_CODE_BITS = {8: 8.0, 4: 4.0, 3: 3.2, 2: 2.0}  # hqq's packing: 3-bit codes ten to a 32-bit word


def hqq_effective_bits(bits: int, group_size: int, in_features: int = 4096) -> float:
    """Bits per weight of hqq at ``bits``: packed codes and an fp16 scale and zero per group.

    >>> [round(hqq_effective_bits(b, 64), 2) for b in (2, 3, 4, 8)]
    [2.5, 3.7, 4.5, 8.5]
    """
    g = in_features if group_size == -1 else group_size
    return HQQ_CODE_BITS[bits] + 32 / g


def base_effective_bits(base: str, bits: int, group_size: int, sym: bool = False) -> float:
    """Effective bits of a mixed variant's base method at one width (hqq's own layout, else affine)."""
    return hqq_effective_bits(bits, group_size) if base == "hqq" else effective_bits(bits, group_size, sym)
