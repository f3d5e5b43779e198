"""The packed runtime: quantised linears hold only packed weights and run dequant-matmul.

Fake-quant (``quanteval.methods.apply_result``) writes dequantised float
weights into the model: right for measuring quality, but the model is as
large as the baseline. ``pack_model`` replaces each quantised ``nn.Linear``
by a ``QuantLinear`` holding the packed codes, fp16 scales and integer zeros
(``quanteval_kernels.pack``), so the weights are as small in memory as the
method claims, and the matmul runs on a ``quanteval_kernels`` backend:
the Triton kernel on CUDA, the torch reference (which unpacks the weight on
every call) on a CPU.

What stays float:

- a quantised embedding (``quantize_embeddings`` with untied embeddings) is
  written dequantised into the ``nn.Embedding`` (fake-quant): a lookup reads
  a few rows, so there is no kernel for it;
- a quantised ``lm_head`` tied to the embeddings is packed, and the shared
  embedding weight is overwritten with the dequantised values, as
  ``apply_result`` does through the tie; the embedding then stays float.

On a CPU in float32 the packed model computes the same weights as the
fake-quant one, bit for bit, and the same ``F.linear``; tests/test_packed.py
holds the logits to 1e-5 (absolute) of each other.

>>> # model = load_model(...).model
>>> # pack_model(model, result)           # in place; returns model
>>> # model_bytes(model) < baseline bytes
"""

from __future__ import annotations

import torch
from torch import nn

from quanteval.methods import QuantResult, apply_fold
from quanteval_kernels import PackedLinearWeights, check_bits, pack_layer, packed_linear, resolve_backend

__all__ = ["QuantLinear", "model_bytes", "pack_model"]


class QuantLinear(nn.Module):
    """A linear layer holding packed weights (buffers) and an optional float bias.

    The buffers keep ``PackedLinearWeights``' output-major strides through
    ``.to(device)``. Cast the model to its dtype *before* packing: a later
    ``model.to(dtype)`` would also cast the fp16 scales.
    """

    def __init__(self, w: PackedLinearWeights, bias: torch.Tensor | None = None, backend: str = "auto") -> None:
        super().__init__()
        resolve_backend(backend, w.packed.device)  # an impossible backend fails here, not at the first call
        self.in_features, self.out_features = w.in_features, w.out_features
        self.bits, self.group_size, self.backend = w.bits, w.group_size, backend
        for name, t in w.tensors().items():
            self.register_buffer(name, t)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def weights(self) -> PackedLinearWeights:
        return PackedLinearWeights(self.packed, self.scales, self.zeros, self.g_idx, self.perm, self.bits,
                                   self.group_size, self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_linear(x, self.weights(), self.backend)  # (..., out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, act_order={self.perm is not None or self.g_idx is not None}, "
                f"backend={self.backend}")


def _tied(model: nn.Module) -> set[int]:
    """ids of parameters reachable under two names (tied embeddings)."""
    seen: set[int] = set()
    tied: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return tied


@torch.no_grad()
def pack_model(model: nn.Module, result: QuantResult, backend: str = "auto") -> nn.Module:
    """Apply ``result`` to ``model`` in place with packed weights; returns ``model``.

    Folds are applied first (as ``apply_result`` does); every ``nn.Linear`` in
    ``result.layers`` becomes a ``QuantLinear``; embeddings are fake-quant (see
    the module docstring). Bit widths without a kernel (5-7) raise before the
    model is touched.
    """
    if not result.affine:
        raise ValueError(f"runtime=packed holds affine integer results only, not {', '.join(result.formats())}: "
                         f"use runtime=fakequant")
    for lq in result.layers.values():
        check_bits(lq.bits)
    for f in result.folds:
        apply_fold(model.get_submodule(f.module), f.kind, f.scale)
    tied = _tied(model)
    for name, lq in result.layers.items():
        module = model.get_submodule(name)
        w_hat = None
        if not isinstance(module, nn.Linear) or id(module.weight) in tied:
            w_hat = lq.dequantize(torch.float32).to(module.weight.device, module.weight.dtype)
            module.weight.copy_(w_hat)  # the embedding (or the embedding tied to this lm_head): fake-quant
        if not isinstance(module, nn.Linear):
            continue
        dev = module.weight.device
        packed = pack_layer(lq.codes.to(dev), lq.scales.to(dev), lq.zeros.to(dev), lq.g_idx.to(dev), lq.bits,
                            lq.group_size)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, QuantLinear(packed, module.bias, backend))
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes held in memory by the model's parameters and buffers; shared storage counted once."""
    seen: set[tuple] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
