"""``method=bnb``: bitsandbytes' NF4 / FP4 weights and LLM.int8, through bitsandbytes itself.

What ``transformers``' ``load_in_4bit`` / ``load_in_8bit`` (and QLoRA) run. bitsandbytes >= 0.46 runs on
the CPU, so the same sweep, items and paired CIs cover it. Nothing here re-implements bitsandbytes:

- **nf4 / fp4** (Dettmers et al. 2023, QLoRA): ``bitsandbytes.functional.quantize_4bit`` on the layer's
  weight (blocks of ``method.blocksize`` weights, an fp32 absmax per block, or with
  ``method.double_quant`` an 8-bit absmax plus a second-level fp32 absmax), then the library's own
  ``dequantize_4bit``. The 4-bit codes are a 16-entry codebook, not ``scale * (code - zero)``, so the
  layer result is a ``FormatQuant``: the dequantised weight and the exact bits of every tensor
  bitsandbytes keeps (packed codes, absmax, code table, nested absmax and code table, offset).
- **int8** (Dettmers et al. 2022, LLM.int8()): bitsandbytes picks outlier *activation* columns (above
  ``method.threshold``) at each forward pass and runs them in float, so no fixed weight expresses it. The
  layer is *run as* bitsandbytes' own ``Linear8bitLt`` (its CPU kernel), built from the int8 weights and
  fp32 row scales bitsandbytes made (``Int8Params``); they are what is counted. The result's ``weight``
  is bitsandbytes' ``int8_vectorwise_dequant`` of them (for inspection and accounting only).

    quanteval method=bnb bits=4,8
    quanteval method=bnb method.type=fp4 method.double_quant=true
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


def _tensor_bits(values) -> int:
    """Bits of every tensor (and float) among ``values``, as the library stores them."""
    total = 0
    for v in values:
        if torch.is_tensor(v):
            total += v.numel() * v.element_size() * 8
        elif isinstance(v, float):  # the nested offset: one fp32
            total += 32
    return total


def bnb_4bit_layer(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> FormatQuant:
    """``w`` (out, in) through bitsandbytes' ``quantize_4bit`` and back through its ``dequantize_4bit``.

    >>> q = bnb_4bit_layer(torch.randn(64, 64), "nf4", 64, False)  # doctest: +SKIP
    >>> q.format, q.bits_per_weight  # doctest: +SKIP
    ('bnb nf4', 4.5...)
    """
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w.detach(), blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=double_quant)  # packed: (out*in/2, 1) uint8
    w_hat = F.dequantize_4bit(packed, state)  # (out, in), w's dtype
    stored = state.as_dict(packed=False)  # absmax, quant_map (+ nested_absmax, nested_quant_map, nested_offset)
    bits = _tensor_bits([packed, *stored.values()])
    return FormatQuant(f"bnb {quant_type}", exact_float(w_hat), storage_bits=bits,
                       detail={"type": quant_type, "blocksize": blocksize, "double_quant": double_quant})


def bnb_int8_layer(w: torch.Tensor, threshold: float) -> FormatQuant:
    """``w`` (out, in) as bitsandbytes' ``Int8Params`` make it: int8 weights and fp32 row scales."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    params = bnb.nn.Int8Params(w.detach().cpu().clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    cb, scb = params.CB, params.SCB  # (out, in) int8, (out,) fp32
    return FormatQuant("bnb int8", exact_float(F.int8_vectorwise_dequant(cb, scb)),
                       storage_bits=_tensor_bits([cb, scb]), module="bnb_int8",
                       detail={"type": "int8", "threshold": threshold},
                       tensors={"CB": cb.clone(), "SCB": scb.clone()})


def int8_module(linear: torch.nn.Linear, lq: FormatQuant) -> torch.nn.Module:
    """The ``Linear8bitLt`` a ``bnb int8`` layer runs as, from its stored int8 weights and row scales
    (``quanteval.methods.REPLACEMENTS["bnb_int8"]``); the bias stays the linear's."""
    import bitsandbytes as bnb

    out_f, in_f = lq.shape
    m = bnb.nn.Linear8bitLt(in_f, out_f, bias=linear.bias is not None, has_fp16_weights=False,
                            threshold=lq.detail["threshold"], device="cpu")
    cb, scb = lq.tensors["CB"].cpu(), lq.tensors["SCB"].cpu()
    m.weight = bnb.nn.Int8Params(cb.clone(), requires_grad=False, has_fp16_weights=False, CB=cb.clone(), SCB=scb.clone())
    if linear.bias is not None:
        m.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    device = linear.weight.device
    if device.type != "cpu":
        m = m.to(device)  # bitsandbytes moves Int8Params itself
    return m


def bnb_model(model, adapter, spec: QuantSpec, method_cfg, calib=None) -> QuantResult:
    """Every quantised linear of ``model`` in the bitsandbytes type ``spec.bits`` / ``method.type`` names;
    ``model`` is not modified."""
    import importlib.metadata

    type_name, _ = resolve("bnb", spec.bits, method_cfg.type)
    if type_name == "int8" and spec.quantize_embeddings:
        raise ValueError("method=bnb int8 replaces decoder linears only (as transformers' load_in_8bit keeps "
                         "lm_head in float): set quantize_embeddings=false")
    t0 = time.perf_counter()
    layers = {}
    for name in tqdm(quantized_layer_names(model, adapter, spec), desc=f"bnb {type_name}", unit="layer"):
        w = model.get_submodule(name).weight
        if type_name == "int8":
            layers[name] = bnb_int8_layer(w, method_cfg.threshold)
        else:
            layers[name] = bnb_4bit_layer(w, type_name, method_cfg.blocksize, method_cfg.double_quant)
        layers[name] = layers[name].cpu()
    info = {"library": "bitsandbytes", "version": importlib.metadata.version("bitsandbytes"), "type": type_name,
            "quantize_s": time.perf_counter() - t0}
    log.info("bnb %s: %d layers in %.1f s", type_name, len(layers), info["quantize_s"])
    return QuantResult(layers=layers, info=info)
