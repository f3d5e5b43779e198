"""Round-to-nearest (RTN) weight quantisation: the baseline every method is compared with.

Each group of ``group_size`` input columns gets its own scale and zero from its
min/max (see ``quanteval.primitives`` for the conventions); every weight is
rounded to the nearest code. No calibration data is used.
"""

from __future__ import annotations

import torch

from quanteval.primitives import LayerQuant, group_index, minmax_params, quantize_codes


def rtn_layer(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> LayerQuant:
    """Quantise one weight matrix ``w: (out, in)`` group by group.

    >>> q = rtn_layer(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), bits=2, group_size=-1, sym=False)
    >>> q.codes.tolist(), q.scales.float().tolist(), q.zeros.tolist()
    ([[0, 1, 2, 3]], [[1.0]], [[0]])
    """
    out_f, in_f = w.shape
    g_idx = group_index(in_f, group_size)  # (in,)
    n_groups = int(g_idx.max()) + 1
    g = in_f if group_size == -1 else group_size
    scales = torch.empty(out_f, n_groups)
    zeros = torch.empty(out_f, n_groups)
    codes = torch.empty(out_f, in_f)
    w = w.float()
    for j in range(n_groups):
        cols = slice(j * g, min((j + 1) * g, in_f))
        s, z = minmax_params(w[:, cols], bits, sym)  # (out,), (out,)
        scales[:, j], zeros[:, j] = s, z
        codes[:, cols] = quantize_codes(w[:, cols], s[:, None], z[:, None], bits)
    return LayerQuant(
        bits=bits,
        group_size=group_size,
        sym=sym,
        codes=codes.to(torch.uint8),
        scales=scales.to(torch.float16),
        zeros=zeros.to(torch.uint8),
        g_idx=g_idx,
    )
