"""``method=gguf``: llama.cpp's GGUF block formats, made by llama.cpp's own code and read by its ``gguf`` package.

Two quantisers, one reader; nothing is re-implemented:

- The ``gguf`` package (ggml-org/llama.cpp ``gguf-py``, already a dependency: transformers reads GGUF
  files with it) ports llama.cpp's reference quantisers to numpy: ``gguf.quants.quantize`` writes the
  very bytes llama.cpp's ``quantize`` tool writes for Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 and MXFP4.
- The k-quants (Q6_K, Q5_K, Q4_K, Q3_K, Q2_K) and IQ4_NL have no Python quantiser, so ggml's C
  ``ggml_quantize_chunk`` makes them (``quanteval.methods.ggml``: a prebuilt libggml-base, set up once with
  ``python -m quanteval.methods.ggml --setup``), with no importance matrix.
- ``gguf.quants.dequantize`` reads every type back (a test checks it equals ggml's own ``to_float``).

Layout and size. Q8_0 ... MXFP4 are blocks of 32 weights along a row (the input dimension), each with
an fp16 scale (``_0``), an fp16 scale and minimum (``_1``) or an E8M0 exponent (MXFP4). A k-quant is a
super-block of 256 weights (QK_K) holding 16 or 8 sub-blocks with quantised scales. The storage bits are
the bytes the library wrote: Q8_0 8.5, Q6_K 6.5625, Q5_1 6, Q5_0 5.5, Q5_K 5.5, Q4_1 5, Q4_0 4.5,
Q4_K 4.5, IQ4_NL 4.5, MXFP4 4.25, Q3_K 3.4375, Q2_K 2.625 bits per weight.

Per-tensor fallbacks, as ``llama-quantize`` makes them (``src/llama-quant.cpp``,
``llama_tensor_get_type``): a k-quant needs rows (in_features) that are whole 256-weight super-blocks;
any other tensor falls back (``K_FALLBACK``), and to F16 when its rows are not whole blocks of the
fallback either. On SmolLM2 (hidden 576, intermediate 1536) only down_proj (in 1536 = 6 x 256) keeps a
k-quant. Each layer's ``FormatQuant.format`` is the type it actually holds ("gguf Q5_0"), so
``compression()["formats"]`` counts layers per real type; the variant keeps the requested type's label
("gguf Q4_K"), ``detail`` records requested type and reason, and ``result.info["fallbacks"]`` the counts.
A requested type is used for every linear (as ``llama-quantize --pure``), not llama.cpp's Q4_K_M mix.

- ``bits`` picks the type (8 -> Q8_0, 6 -> Q6_K, 5 -> Q5_1, 4 -> Q4_1, 3 -> Q3_K, 2 -> Q2_K;
  ``quanteval.formats``); ``method.type=`` any of the eleven. ``group_size`` and ``sym`` don't apply.

A caveat for the embedded model: SmolLM2 ships as a Q4_1 GGUF, so its "baseline" weights are already
Q4_1 values, and re-quantising them to Q4_1 (or to anything finer) is near-lossless by construction.
The report states the model's source; Gemma-3 (shipped as Q4_K_M) is a fairer test of Q4_x.

    quanteval method=gguf bits=8,5,4
    quanteval method=gguf method.type=MXFP4
    quanteval method=gguf bits=6,3,2          # k-quants: python -m quanteval.methods.ggml --setup, once
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import torch
from tqdm import tqdm

from quanteval.formats import resolve
from quanteval.methods import QuantResult, QuantSpec, quantized_layer_names
from quanteval.primitives import FormatQuant, exact_float

log = logging.getLogger(__name__)

PACKAGE_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "MXFP4", "F16")  # quantised by the gguf package
GGML_TYPES = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL")  # quantised by ggml's C code
K_QUANTS = GGML_TYPES[:5]
QK_K = 256  # weights per k-quant super-block
# llama.cpp src/llama-quant.cpp, llama_tensor_get_type: the type a k-quant falls back to when a row is not a
# multiple of QK_K (then F16 when it is not whole blocks of the fallback either). Q3_K and Q2_K go to IQ4_NL
# in current llama.cpp (an older note, and candle's port, say Q4_0): quanteval follows llama.cpp.
K_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def tensor_type(type_name: str, in_features: int) -> tuple[str, str | None]:
    """The type llama.cpp stores a tensor of rows ``in_features`` in when asked for ``type_name``, and why
    it is another (None when it is not).

    >>> tensor_type("Q4_K", 1536), tensor_type("Q4_K", 576), tensor_type("Q4_K", 48)[0]
    (('Q4_K', None), ('Q5_0', 'rows of 576 are not a multiple of 256'), 'F16')
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if type_name not in K_QUANTS or in_features % QK_K == 0:
        return type_name, None
    fallback = K_FALLBACK[type_name]
    block, _ = GGML_QUANT_SIZES[GGMLQuantizationType[fallback]]
    if in_features % block:
        return "F16", f"rows of {in_features} are a multiple of neither {QK_K} nor {block}"
    return fallback, f"rows of {in_features} are not a multiple of {QK_K}"


def gguf_layer(w: torch.Tensor, type_name: str) -> FormatQuant:
    """One weight (out, in) as llama.cpp stores it when asked for ``type_name`` (after its per-tensor
    fallback), quantised by the gguf package or ggml and dequantised by the gguf package.

    >>> q = gguf_layer(torch.randn(4, 64), "Q4_0")
    >>> q.format, q.bits_per_weight
    ('gguf Q4_0', 4.5)
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    rows, cols = w.shape
    used, reason = tensor_type(type_name, cols)
    qtype = GGMLQuantizationType[used]
    block, _ = GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"gguf {used}: a row of {cols} weights is not a whole number of {block}-weight blocks")
    w32 = w.detach().float().cpu().numpy()  # (out, in)
    if used in GGML_TYPES:
        from quanteval.methods import ggml

        data = ggml.quantize(w32, used)  # (out, bytes per row) uint8: llama.cpp's bytes
    else:
        data = quants.quantize(w32, qtype)  # (out, bytes per row) uint8; F16: (out, in) float16
    w_hat = torch.from_numpy(quants.dequantize(data, qtype).copy()).reshape(rows, cols)  # float32
    return FormatQuant(f"gguf {used}", exact_float(w_hat), storage_bits=int(data.nbytes) * 8,
                       detail={"type": used, "block": block, "requested": type_name, "fallback": reason})


def missing_ggml(type_name: str) -> str | None:
    """One line naming the setup command when ``type_name`` needs ggml's library and it is not set up, else None.

    >>> missing_ggml("Q4_1") is None
    True
    """
    if type_name not in GGML_TYPES:
        return None
    from quanteval.methods import ggml

    why = ggml.missing()
    return None if why is None else f"gguf {type_name} is quantised by llama.cpp's own code: {why}"


def fallback_summary(type_name: str, layers: dict) -> str:
    """One line: how many layers kept ``type_name`` and what the others fell back to, and why.

    >>> fq = lambda t, why: FormatQuant(f"gguf {t}", torch.zeros(1, 1), 1, {"type": t, "fallback": why})
    >>> fallback_summary("Q4_K", {"a": fq("Q4_K", None), "b": fq("Q5_0", "rows of 576 are not a multiple of 256")})
    'gguf Q4_K: 1 of 2 layers kept Q4_K; 1 fell back to Q5_0 (rows of 576 are not a multiple of 256)'
    """
    kept = sum(lq.detail["type"] == type_name for lq in layers.values())
    head = f"gguf {type_name}: {kept} of {len(layers)} layers kept {type_name}"
    by_type: dict[str, Counter] = {}
    for lq in layers.values():
        if lq.detail["fallback"] is not None:
            by_type.setdefault(lq.detail["type"], Counter())[lq.detail["fallback"]] += 1
    parts = [f"{sum(why.values())} fell back to {t} ({'; '.join(why)})" for t, why in by_type.items()]
    return "; ".join([head, *parts])


def gguf_model(model, adapter, spec: QuantSpec, method_cfg, calib=None) -> QuantResult:
    """Every quantised linear of ``model`` in the type ``spec.bits`` / ``method.type`` names, with llama.cpp's
    per-tensor fallbacks; ``model`` is not modified."""
    import importlib.metadata

    type_name, _ = resolve("gguf", spec.bits, method_cfg.type)
    quantizer = f"gguf {importlib.metadata.version('gguf')}"
    if type_name in GGML_TYPES:
        from quanteval.methods import ggml

        quantizer = ggml.version()  # loads the library first: a missing setup fails here, in one line
    t0 = time.perf_counter()
    layers = {}
    for name in tqdm(quantized_layer_names(model, adapter, spec), desc=f"gguf {type_name}", unit="layer"):
        layers[name] = gguf_layer(model.get_submodule(name).weight, type_name)
    used = Counter(lq.detail["type"] for lq in layers.values())
    info = {"library": "gguf", "version": importlib.metadata.version("gguf"), "type": type_name,
            "quantizer": quantizer, "layer_types": dict(used),
            "fallbacks": {t: n for t, n in used.items() if t != type_name},
            "quantize_s": time.perf_counter() - t0}
    log.info("gguf %s: %d layers in %.1f s (%s)", type_name, len(layers), info["quantize_s"], quantizer)
    if info["fallbacks"]:
        log.info("%s", fallback_summary(type_name, layers))
    return QuantResult(layers=layers, info=info)
