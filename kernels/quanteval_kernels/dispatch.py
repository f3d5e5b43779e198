"""Pick a dequant-matmul backend: the Triton kernel on CUDA, the torch reference on a CPU.

``BACKENDS`` is read top to bottom: ``auto`` resolves to one of the others.
Triton is an optional dependency (``pip install 'quanteval[kernels]'``) and
is imported only when the Triton backend is used.

>>> import torch
>>> from quanteval_kernels.pack import pack_layer
>>> w = pack_layer(torch.tensor([[0, 1, 2, 3]]), torch.ones(1, 1), torch.ones(1, 1), None, 2, -1)
>>> packed_linear(torch.ones(1, 4), w, backend="torch").tolist()
[[2.0]]
"""

from __future__ import annotations

import importlib.util

import torch

from quanteval_kernels import reference
from quanteval_kernels.pack import PackedLinearWeights

__all__ = ["BACKENDS", "dequant_matmul", "packed_linear", "resolve_backend"]

BACKENDS = ("auto", "triton", "torch")  # auto: triton for CUDA tensors (when installed), else torch


def _triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on ``device`` (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install 'quanteval[kernels]')"
    if device.type == "cuda":
        return None
    import triton

    if device.type == "cpu" and triton.knobs.runtime.interpret:
        return None
    return (f"tensors are on {device.type}: the Triton kernel needs CUDA (on a CPU, only in Triton's slow "
            f"interpreter, with TRITON_INTERPRET=1)")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: ``triton`` on CUDA when Triton is installed, else ``torch``.

    ``triton`` where it cannot run: a RuntimeError that names the fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_unavailable(device) is None else "torch"
    if backend == "triton":
        why = _triton_unavailable(device)
        if why:
            raise RuntimeError(f"backend='triton' cannot run: {why}; use backend='torch' (the reference) instead")
    return backend


def dequant_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int, g_idx: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``x @ W_hat.T`` (x (..., in) -> (..., out)) on the chosen backend; see ``reference.dequant_matmul``."""
    if resolve_backend(backend, x.device) == "triton":
        from quanteval_kernels import triton_dequant

        return triton_dequant.dequant_matmul(x, packed, scales, zeros, bits, group_size, g_idx)
    return reference.dequant_matmul(x, packed, scales, zeros, bits, group_size, g_idx)


def packed_linear(x: torch.Tensor, w: PackedLinearWeights, backend: str = "auto") -> torch.Tensor:
    """``x @ W_hat.T`` for a ``PackedLinearWeights`` (applies its column order ``perm`` first)."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm)  # (..., in) in the packed column order
    return dequant_matmul(x, w.packed, w.scales, w.zeros, w.bits, w.group_size, w.g_idx, backend)
