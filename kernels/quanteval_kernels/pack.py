"""Bit packing of integer weight codes into int32 words, and the packed layer a kernel reads.

Pure tensor code: no ``nn.Module``, no files, no ``quanteval`` imports.

Layout (``pack_codes``)
    Each output row is one little-endian bitstream along the input dimension:
    code ``j`` of a row occupies stream bits ``[j * b, (j + 1) * b)`` and word
    ``t`` holds stream bits ``[32 t, 32 t + 32)``, bit 0 being the least
    significant. So 32 codes fill exactly ``b`` words and nothing is wasted:
    at 3 bits codes 10 and 21 of each 32 straddle two words (bits 30-32 and
    63-65). At 2, 4 and 8 bits no code straddles (16, 8, 4 codes per word).

    A row of ``in`` codes takes ``ceil(in * b / 32)`` words; the unused high
    bits of its last word are zero (padding), and ``unpack_codes`` needs
    ``in_features`` to drop them. Codes are unsigned (``0 .. 2**b - 1``).

    This is compressed-tensors' ``pack-quantized`` layout
    (``pack_to_int32``: signed values offset by ``2**(b-1)``, which are our
    unsigned codes), so an export writes these words unchanged.

Widths: 2, 3, 4 and 8 bits are packed. 5-7 bits stay fake-quant only: no
kernel here is written for them (a ValueError says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PACKED_BITS", "PackedLinearWeights", "check_bits", "n_words", "pack_codes", "pack_layer", "unpack_codes"]

PACKED_BITS = (2, 3, 4, 8)
_MASK32 = (1 << 32) - 1
_CHUNK = 1 << 24  # codes per chunk of rows in pack/unpack: 128 MiB of int64 temporaries at most


def check_bits(bits: int) -> None:
    """ValueError unless ``bits`` is a packed width."""
    if bits in PACKED_BITS:
        return
    if bits in (5, 6, 7):
        raise ValueError(f"bits={bits}: 5-7 bit widths stay fake-quant only (packed widths: 2, 3, 4, 8)")
    raise ValueError(f"bits={bits}: packed widths are 2, 3, 4 and 8")


def n_words(in_features: int, bits: int) -> int:
    """int32 words of one packed row: ``ceil(in * bits / 32)``.

    >>> n_words(576, 3), n_words(10, 4)
    (54, 2)
    """
    return -(-in_features * bits // 32)


def _word_positions(bits: int) -> list[tuple[int, int, bool]]:
    """For each of 32 codes in a ``bits``-word block: (word, bit offset, straddles into the next word)."""
    return [(j * bits // 32, j * bits % 32, j * bits % 32 + bits > 32) for j in range(32)]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes: (out, in)`` (integers in ``[0, 2**bits - 1]``) into ``(out, ceil(in * bits / 32))`` int32.

    >>> pack_codes(torch.tensor([[1, 2, 3]]), 2).tolist()  # 1 | 2 << 2 | 3 << 4
    [[57]]
    """
    check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes: integer tensor required, got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes: shape (out, in) required, got {tuple(codes.shape)}")
    maxq = 2**bits - 1
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi > maxq:
            bad = lo if lo < 0 else hi
            raise ValueError(f"code {bad} is out of range for bits={bits} (codes must be in [0, {maxq}])")
    rows = max(1, _CHUNK // max(codes.shape[1], 1))  # bound the int64 temporaries
    return torch.cat([_pack_rows(c, bits) for c in codes.split(rows)]) if codes.shape[0] else \
        torch.zeros(0, n_words(codes.shape[1], bits), dtype=torch.int32, device=codes.device)


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    out_f, in_f = codes.shape
    n_blk = -(-in_f // 32)
    v = torch.zeros(out_f, n_blk * 32, dtype=torch.int64, device=codes.device)
    v[:, :in_f] = codes.to(torch.int64)  # zero padding to whole 32-code blocks
    v = v.view(out_f, n_blk, 32)  # (out, blocks, 32)
    words = torch.zeros(out_f, n_blk, bits, dtype=torch.int64, device=codes.device)  # (out, blocks, bits)
    for j, (w, off, straddles) in enumerate(_word_positions(bits)):
        words[:, :, w] |= (v[:, :, j] << off) & _MASK32
        if straddles:
            words[:, :, w + 1] |= v[:, :, j] >> (32 - off)
    words = words.view(out_f, n_blk * bits)[:, : n_words(in_f, bits)]
    words = torch.where(words >= 2**31, words - 2**32, words)  # unsigned 32-bit -> int32 bit pattern
    return words.to(torch.int32).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: ``(out, n_words)`` int32 -> ``(out, in_features)`` uint8.

    >>> unpack_codes(torch.tensor([[57]], dtype=torch.int32), 2, 3).tolist()
    [[1, 2, 3]]
    """
    check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed: (out, n_words) int32 required, got {tuple(packed.shape)} {packed.dtype}")
    if packed.shape[1] != n_words(in_features, bits):
        raise ValueError(f"packed has {packed.shape[1]} words per row; in_features={in_features} at "
                         f"bits={bits} needs {n_words(in_features, bits)}")
    rows = max(1, _CHUNK // max(in_features, 1))  # bound the int64 temporaries
    return torch.cat([_unpack_rows(p, bits, in_features) for p in packed.split(rows)]) if packed.shape[0] else \
        torch.zeros(0, in_features, dtype=torch.uint8, device=packed.device)


def _unpack_rows(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    out_f = packed.shape[0]
    n_blk = -(-in_features // 32)
    p = torch.zeros(out_f, n_blk * bits, dtype=torch.int64, device=packed.device)
    p[:, : packed.shape[1]] = packed.to(torch.int64) & _MASK32  # int32 bit pattern -> unsigned
    p = p.view(out_f, n_blk, bits)  # (out, blocks, bits)
    codes = torch.empty(out_f, n_blk, 32, dtype=torch.uint8, device=packed.device)  # (out, blocks, 32)
    maxq = 2**bits - 1
    for j, (w, off, straddles) in enumerate(_word_positions(bits)):
        v = p[:, :, w] >> off
        if straddles:
            v = v | (p[:, :, w + 1] << (32 - off))
        codes[:, :, j] = v & maxq
    return codes.view(out_f, n_blk * 32)[:, :in_features]


def _n_major(t: torch.Tensor) -> torch.Tensor:
    """The same ``(out, k)`` values stored with ``out`` contiguous (strides ``(1, out)``)."""
    return t.t().contiguous().t()


@dataclass
class PackedLinearWeights:
    """One linear layer's packed weights, as ``dequant_matmul`` reads them.

    ``packed (out, n_words)`` int32 (``pack_codes`` layout along ``in``),
    ``scales (out, n_groups)`` fp16, ``zeros (out, n_groups)`` uint8. All three
    are stored *output-major* (strides ``(1, out)``, i.e. a contiguous
    ``(n_words, out)`` / ``(n_groups, out)`` buffer viewed transposed) so a
    kernel's tile of consecutive output channels reads consecutive addresses,
    the layout GPTQ kernels use. Shapes and indexing are unchanged.

    Scales stay fp16 whatever the activation dtype: quanteval's scales are
    fp16 values (``quanteval.primitives.round_scale_fp16``), which bf16 would
    round. Zeros are integers in ``[0, 2**bits - 1]``, one byte each.

    ``g_idx (in,)`` int32 is None when groups are contiguous runs of
    ``group_size`` columns (the last one may be shorter). When the layer's
    groups are a permutation of that (GPTQ ``act_order``), ``pack_layer``
    reorders the columns so they are, and ``perm (in,)`` int64 records the
    order: ``y = x[..., perm] @ W_sorted.T``, which lets the kernel load one
    scale per tile instead of one per weight. Any other ``g_idx`` is kept
    and read per column.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None
    perm: torch.Tensor | None
    bits: int
    group_size: int  # -1: one group per row
    in_features: int
    out_features: int

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {k: getattr(self, k) for k in ("packed", "scales", "zeros", "g_idx", "perm")}


def contiguous_groups(in_features: int, group_size: int) -> torch.Tensor:
    """Group of each column for contiguous groups: ``(in,)`` int32 (as ``quanteval.primitives.group_index``)."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return torch.arange(in_features, dtype=torch.int32) // group_size


def pack_layer(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None,
               bits: int, group_size: int) -> PackedLinearWeights:
    """Pack one layer's quantisation (a ``LayerQuant``'s tensors) for the kernels.

    codes (out, in) integers, scales (out, n_groups), zeros (out, n_groups)
    integers, g_idx (in,) or None. Stored on ``codes.device``.

    >>> w = pack_layer(torch.tensor([[0, 1, 2, 3]]), torch.ones(1, 1), torch.zeros(1, 1), None, 2, -1)
    >>> w.packed.tolist(), w.g_idx, w.perm
    ([[228]], None, None)
    """
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size={group_size}: must be -1 or a positive integer")
    out_f, in_f = codes.shape
    n_groups = 1 if group_size == -1 else -(-in_f // group_size)
    if scales.shape != (out_f, n_groups) or zeros.shape != (out_f, n_groups):
        raise ValueError(f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)}: expected ({out_f}, {n_groups}) "
                         f"for in={in_f}, group_size={group_size}")
    device = codes.device
    contiguous = contiguous_groups(in_f, group_size).to(device)
    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(device, torch.int32)
        if torch.equal(g_idx, contiguous):
            g_idx = None
        else:
            order = torch.argsort(g_idx, stable=True)
            if torch.equal(g_idx[order], contiguous):  # act_order: a permutation of contiguous groups
                codes, g_idx, perm = codes[:, order], None, order
    zq = zeros.to(torch.int64)
    if zq.numel() and (int(zq.min()) < 0 or int(zq.max()) > 2**bits - 1):
        raise ValueError(f"zeros must be integers in [0, {2**bits - 1}] for bits={bits}")
    return PackedLinearWeights(
        packed=_n_major(pack_codes(codes, bits)),
        scales=_n_major(scales.to(torch.float16)),
        zeros=_n_major(zq.to(torch.uint8)),
        g_idx=g_idx,
        perm=perm,
        bits=bits,
        group_size=group_size,
        in_features=in_f,
        out_features=out_f,
    )
