"""Round-to-nearest (RTN) weight quantisation: the baseline every method is compared with.

Each group of ``group_size`` input columns gets its own scale and zero from its
min/max (see ``quanteval.primitives`` for the conventions); every weight is
rounded to the nearest code. No calibration data is used.

All groups are quantised at once: the full groups as one ``(out * n_full, g)``
matrix with a group per row, then the short last group (when ``group_size``
does not divide ``in``) as an ``(out, tail)`` matrix. Each step is a row
min/max or elementwise, the same operations as ``minmax_params`` and
``quantize_codes``, so the result is bit-identical to quantising group by
group. Outputs live on ``w.device``.
"""

from __future__ import annotations

import torch

from quanteval.primitives import LayerQuant, group_index, group_width, minmax_params


def group_rows(w: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """The groups of ``w: (out, in)`` as matrices holding one group per row (views where possible).

    ``[(out * n_full, g)]`` for the full groups (row ``r * n_full + j`` is row ``r``'s group ``j``),
    then ``(out, tail)`` for a short last group.

    >>> [tuple(p.shape) for p in group_rows(torch.zeros(3, 10), 4)]
    [(6, 4), (3, 2)]
    """
    out_f, in_f = w.shape
    g = group_width(in_f, group_size)
    n_full, tail = divmod(in_f, g)
    pieces = []
    if n_full:
        pieces.append(w[:, : n_full * g].reshape(out_f * n_full, g))  # (out * n_full, g)
    if tail:
        pieces.append(w[:, n_full * g :])  # (out, tail)
    return pieces


def quantize_rows(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN of each row of ``w: (rows, g)`` as one group: codes (rows, g), scale (rows, 1), zero (rows, 1).

    float32 throughout; equal to ``minmax_params`` + ``quantize_codes``, computed in place.
    """
    scale, zero = minmax_params(w, bits, sym)  # (rows,) each
    scale, zero = scale[:, None], zero[:, None]  # (rows, 1)
    codes = torch.div(w.float(), scale)  # the one (rows, g) allocation
    codes.round_().add_(zero).clamp_(0, 2**bits - 1)
    return codes, scale, zero


def _join(parts: list[torch.Tensor], out_f: int) -> torch.Tensor:
    """Per-piece results back to ``(out, ...)`` column order."""
    parts = [p.reshape(out_f, -1) for p in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def rtn_params(w: torch.Tensor, bits: int, group_size: int, sym: bool):
    """RTN codes, scales and zeros of ``w: (out, in)``, all float32 on ``w.device``.

    Returns codes (out, in) integers in [0, maxq], scales (out, n_groups)
    holding fp16 values, zeros (out, n_groups) integers.

    >>> c, s, z = rtn_params(torch.tensor([[-1.0, 0.0, 1.0, 2.0, -3.0]]), bits=2, group_size=4, sym=False)
    >>> c.tolist(), s.tolist(), z.tolist()  # a group of 4, then a short group of 1
    ([[0.0, 1.0, 2.0, 3.0, 0.0]], [[1.0, 1.0]], [[1.0, 3.0]])
    """
    pieces = [quantize_rows(p, bits, sym) for p in group_rows(w, group_size)]
    return tuple(_join([p[k] for p in pieces], w.shape[0]) for k in range(3))


def rtn_fake_quant(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Quantise-dequantise ``w: (out, in)``: float32 on ``w.device``, equal to ``rtn_layer(...).dequantize()``.

    >>> rtn_fake_quant(torch.tensor([[-1.0, 0.0, 0.4, 2.0]]), bits=2, group_size=-1, sym=False).tolist()
    [[-1.0, 0.0, 0.0, 2.0]]
    """
    parts = []
    for p in group_rows(w, group_size):
        codes, scale, zero = quantize_rows(p, bits, sym)
        parts.append(codes.sub_(zero).mul_(scale))  # scale * (codes - zero), in place
    return _join(parts, w.shape[0])


def rtn_layer(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> LayerQuant:
    """Quantise one weight matrix ``w: (out, in)`` group by group.

    >>> q = rtn_layer(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), bits=2, group_size=-1, sym=False)
    >>> q.codes.tolist(), q.scales.float().tolist(), q.zeros.tolist()
    ([[0, 1, 2, 3]], [[1.0]], [[0]])
    """
    codes, scales, zeros = rtn_params(w, bits, group_size, sym)
    return LayerQuant(
        bits=bits,
        group_size=group_size,
        sym=sym,
        codes=codes.to(torch.uint8),
        scales=scales.to(torch.float16),
        zeros=zeros.to(torch.uint8),
        g_idx=group_index(w.shape[1], group_size).to(w.device),
    )
