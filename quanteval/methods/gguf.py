"""``method=gguf``: llama.cpp's GGUF block formats, made and read by the ``gguf`` package's own code.

The ``gguf`` package (ggml-org/llama.cpp ``gguf-py``, already a dependency: transformers reads GGUF
files with it) ports llama.cpp's reference quantisers to numpy: ``gguf.quants.quantize`` writes the
very bytes llama.cpp's ``quantize`` tool writes for Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 and MXFP4, and
``gguf.quants.dequantize`` reads them back. This module calls both and keeps their result; it
re-implements nothing.

- Blocks are 32 weights along a row (the input dimension), each with its own fp16 scale (``_0``
  types), fp16 scale and fp16 minimum (``_1`` types), or an E8M0 shared exponent (MXFP4). The storage
  bits are the bytes the library wrote: Q8_0 8.5, Q5_1 6, Q5_0 5.5, Q4_1 5, Q4_0 4.5, MXFP4 4.25 bits
  per weight.
- ``bits`` picks the type (8 -> Q8_0, 5 -> Q5_1, 4 -> Q4_1; ``quanteval.formats``); ``method.type=``
  any of the six. ``group_size`` and ``sym`` don't apply.
- The k-quants (Q2_K ... Q6_K) are not here: the gguf package can dequantise them but not quantise them.

A caveat for the embedded model: SmolLM2 ships as a Q4_1 GGUF, so its "baseline" weights are already
Q4_1 values, and re-quantising them to Q4_1 (or to anything finer) is near-lossless by construction.
The report states the model's source; Gemma-3 (shipped as Q4_K_M) is a fairer test of Q4_x.

    quanteval method=gguf bits=8,5,4
    quanteval method=gguf method.type=MXFP4
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from quanteval.formats import resolve
from quanteval.methods import QuantResult, QuantSpec, quantized_layer_names
from quanteval.primitives import FormatQuant, exact_float

log = logging.getLogger(__name__)


def gguf_layer(w: torch.Tensor, type_name: str) -> FormatQuant:
    """One weight (out, in) quantised to ``type_name`` by the gguf package, and its own dequantisation.

    >>> q = gguf_layer(torch.randn(4, 64), "Q4_0")
    >>> q.format, q.bits_per_weight
    ('gguf Q4_0', 4.5)
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[type_name]
    block, _ = GGML_QUANT_SIZES[qtype]
    rows, cols = w.shape
    if cols % block:
        raise ValueError(f"gguf {type_name}: a row of {cols} weights is not a whole number of {block}-weight blocks")
    data = quants.quantize(w.detach().float().cpu().numpy(), qtype)  # (out, bytes per row) uint8: llama.cpp's bytes
    w_hat = torch.from_numpy(quants.dequantize(data, qtype).copy()).reshape(rows, cols)  # float32
    return FormatQuant(f"gguf {type_name}", exact_float(w_hat), storage_bits=int(data.nbytes) * 8,
                       detail={"type": type_name, "block": block})


def gguf_model(model, adapter, spec: QuantSpec, method_cfg, calib=None) -> QuantResult:
    """Every quantised linear of ``model`` in the type ``spec.bits`` / ``method.type`` names; ``model`` is not modified."""
    import importlib.metadata

    type_name, _ = resolve("gguf", spec.bits, method_cfg.type)
    t0 = time.perf_counter()
    layers = {}
    for name in tqdm(quantized_layer_names(model, adapter, spec), desc=f"gguf {type_name}", unit="layer"):
        layers[name] = gguf_layer(model.get_submodule(name).weight, type_name)
    info = {"library": "gguf", "version": importlib.metadata.version("gguf"), "type": type_name,
            "quantize_s": time.perf_counter() - t0}
    log.info("gguf %s: %d layers in %.1f s", type_name, len(layers), info["quantize_s"])
    return QuantResult(layers=layers, info=info)
