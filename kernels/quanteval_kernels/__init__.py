"""quanteval_kernels: bit packing and dequant-matmul kernels (torch reference + Triton).

Imported as ``quanteval_kernels``, from ``kernels/quanteval_kernels/``. Hugging Face
publishes a package named ``kernels`` that transformers (5.25 on) requires and
imports, so the repo's ``kernels/`` folder holds no ``__init__.py``: were it a
package, it would shadow the installed one wherever the repo root is on
``sys.path`` (``python -m pytest`` from the root). Pure tensor code: nothing here imports
``quanteval``, touches ``nn.Module`` or files.

- ``pack``: codes <-> int32 words (2, 3, 4, 8 bits; layout documented there),
  and ``pack_layer`` -> ``PackedLinearWeights``;
- ``reference``: torch dequantise / dequant-matmul, the ground truth;
- ``triton_dequant``: the Triton kernel (CUDA; CPU under ``TRITON_INTERPRET=1``),
  imported only when used;
- ``dispatch``: ``dequant_matmul(..., backend="auto" | "triton" | "torch")``.

>>> import torch
>>> w = pack_layer(torch.randint(0, 16, (8, 40)), torch.rand(8, 2), torch.full((8, 2), 8), None, 4, 32)
>>> packed_linear(torch.randn(3, 40), w, backend="torch").shape
torch.Size([3, 8])
"""

from quanteval_kernels.dispatch import BACKENDS, dequant_matmul, packed_linear, resolve_backend
from quanteval_kernels.pack import (
    PACKED_BITS,
    PackedLinearWeights,
    check_bits,
    pack_codes,
    pack_layer,
    unpack_codes,
)
from quanteval_kernels.reference import dequantize_packed

__all__ = ["BACKENDS", "PACKED_BITS", "PackedLinearWeights", "check_bits", "dequant_matmul", "dequantize_packed",
           "pack_codes", "pack_layer", "packed_linear", "resolve_backend", "unpack_codes"]
