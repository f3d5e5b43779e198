"""``method=hqq``: Half-Quadratic Quantization (Badri & Shaji 2023, https://mobiusml.github.io/hqq_blog/),
through the ``hqq`` library itself (mobiusml/hqq, ``hqq.core.quantize.HQQLinear``); nothing re-implemented.

HQQ needs no calibration data. Each group of ``group_size`` weights gets a float scale and a float zero
from its min/max; then hqq's proximal solver moves the zero to lower the ``l_p`` (p < 1) reconstruction
error, which makes it robust to outlier weights. The codes are packed as hqq packs them (8 and 4 bits
in uint8, 2 bits four to a uint8, 3 bits ten to an int32 word, the group count padded to a multiple
of 10), and the scale and zero are stored in the compute dtype. A float zero is not ``scale * (code -
zero)`` with an integer zero, so a layer's result is a ``FormatQuant``: ``HQQLinear.dequantize()``'s
output, bit for bit, and the exact bits of ``W_q`` and of every tensor in ``HQQLinear.meta``.

How quanteval drives hqq (0.2.8):

- ``BaseQuantizeConfig(nbits, group_size, axis)``; ``group_size=-1`` (per channel) is hqq's
  ``group_size=None``: one group per row of ``in`` weights along ``axis=1``. ``round_zero`` keeps
  hqq's default (on at 4 bits only). ``method.optimize`` is the ``optimize`` entry of the config's
  ``weight_quant_params`` (``BaseQuantizeConfig`` has no argument for it).
- ``HQQLinear(copy, config, compute_dtype=compute_dtype(w), device="cpu")`` on a copy of the
  weight (hqq deletes the parameters of the linear it is given), so results don't depend on the device
  the model is on. hqq stores the scale and zero in the compute dtype, so it is a 16-bit one: bf16 for
  a bf16 model (a GPU), else fp16 (hqq's own default, also for the fp32 model on the CPU). Storage bits
  are then what hqq ships whatever the device (4.5 bits per weight at 4 bits g64), as every other
  method here counts 16-bit scales.
- **The solver settings (``lp_norm``, ``beta``, ``kappa``, ``iters``) are not part of hqq's public
  API**: neither ``BaseQuantizeConfig`` nor ``HQQLinear`` takes them, and ``Quantizer.quantize``
  calls the class attribute ``Quantizer.optimize_weights`` (``optimize_weights_proximal``) without
  ``opt_params``. ``proximal_solver`` sets that attribute to ``optimize_weights_proximal`` with
  ``opt_params`` from ``method`` for the duration of one ``HQQLinear`` and restores it afterwards
  (the hook hqq itself swaps its solvers through); with the defaults the result is hqq's own.
- In hqq 0.2.8 ``optimize_weights_proximal`` is ``optimize_weights_proximal_legacy``: it reads
  ``kappa`` but never applies it (``beta`` stays fixed), so ``method.kappa`` changes nothing, and it
  stops at the first iteration whose mean absolute error does not fall, so ``method.iters`` is a cap.

    quanteval method=hqq bits=4,3,2 group_size=64
    quanteval method=hqq method.axis=0 method.lp_norm=1.0
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import time
from contextlib import contextmanager
from typing import Optional

import torch
from tqdm import tqdm

from quanteval.config import HQQConfig
from quanteval.formats import HQQ_BITS, NoFormat
from quanteval.methods import QuantResult, QuantSpec, quantized_layer_names
from quanteval.primitives import FormatQuant, exact_float

log = logging.getLogger(__name__)


def check_bits(bits: int) -> None:
    """A ``NoFormat`` (a ValueError) naming hqq's widths when ``bits`` is not one of them."""
    if bits not in HQQ_BITS:
        raise NoFormat(f"method=hqq has no {bits}-bit width: supported bits are "
                       f"{', '.join(str(b) for b in HQQ_BITS)}")


def hqq_group_size(shape: tuple[int, int], group_size: int, axis: int) -> Optional[int]:
    """The ``group_size`` hqq is given for a weight of ``shape`` (out, in): None (hqq's per channel) for -1.

    Groups must tile the grouped dimension (``in`` along ``axis=1``, ``out`` along ``axis=0``) and be a
    multiple of 8 (``BaseQuantizeConfig``'s own rule); anything else is a one-line ValueError.

    >>> hqq_group_size((1536, 576), 64, 1), hqq_group_size((1536, 576), -1, 1)
    (64, None)
    """
    if group_size == -1:
        return None
    dim = shape[1] if axis == 1 else shape[0]
    if group_size <= 0 or group_size % 8 or dim % group_size:
        raise ValueError(f"method=hqq: group_size={group_size} must be -1 (per channel) or a multiple of 8 "
                         f"that divides the grouped dimension ({dim}, axis={axis}) of a {shape[0]}x{shape[1]} weight")
    return group_size


def quant_config(bits: int, group_size: Optional[int], method_cfg: HQQConfig) -> dict:
    """hqq's ``BaseQuantizeConfig`` for one layer, with ``method.optimize`` in its weight parameters."""
    from hqq.core.quantize import BaseQuantizeConfig

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=method_cfg.axis)
    cfg["weight_quant_params"]["optimize"] = method_cfg.optimize  # no BaseQuantizeConfig argument for it
    return cfg


def opt_params(method_cfg: HQQConfig) -> dict:
    """The ``opt_params`` of hqq's proximal solver, from ``method``."""
    return {"lp_norm": method_cfg.lp_norm, "beta": method_cfg.beta, "kappa": method_cfg.kappa,
            "iters": method_cfg.iters}


@contextmanager
def proximal_solver(method_cfg: HQQConfig):
    """hqq's ``optimize_weights_proximal`` with ``method``'s settings as ``Quantizer.optimize_weights``
    for the block, restored afterwards (hqq takes no solver settings through its public API)."""
    from hqq.core.optimize import optimize_weights_proximal
    from hqq.core.quantize import Quantizer

    saved = Quantizer.optimize_weights
    Quantizer.optimize_weights = functools.partial(optimize_weights_proximal, opt_params=opt_params(method_cfg))
    try:
        yield
    finally:
        Quantizer.optimize_weights = saved


def compute_dtype(w: torch.Tensor) -> torch.dtype:
    """The 16-bit dtype hqq computes and stores scale and zero in for ``w``: bf16 for bf16, else fp16."""
    return torch.bfloat16 if w.dtype == torch.bfloat16 else torch.float16


def stored_bits(w_q: torch.Tensor, meta: dict) -> int:
    """Bits of the tensors ``HQQLinear`` keeps for a weight: the packed codes and every tensor in its meta
    (the scale and zero; not the bias)."""
    tensors = [w_q, *(v for v in meta.values() if torch.is_tensor(v))]
    return sum(t.numel() * t.element_size() * 8 for t in tensors)


def hqq_layer(w: torch.Tensor, bits: int, group_size: int, method_cfg: HQQConfig) -> FormatQuant:
    """One weight ``w`` (out, in) through hqq's ``HQQLinear`` and back through its ``dequantize()``;
    ``w`` is not modified.

    >>> q = hqq_layer(torch.randn(128, 64), 4, 64, HQQConfig())  # doctest: +SKIP
    >>> q.format, q.bits_per_weight  # fp16 scale and zero per 64 weights  # doctest: +SKIP
    ('hqq b4 g64', 4.5)
    """
    from hqq.core.quantize import HQQLinear

    check_bits(bits)
    out_f, in_f = w.shape
    group = hqq_group_size((out_f, in_f), group_size, method_cfg.axis)
    linear = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
    # a copy on the CPU: HQQLinear deletes the parameters of the layer it quantises
    linear.weight = torch.nn.Parameter(w.detach().to("cpu", copy=True), requires_grad=False)  # (out, in)
    with proximal_solver(method_cfg):
        hq = HQQLinear(linear, quant_config(bits, group, method_cfg), compute_dtype=compute_dtype(w), device="cpu")
    w_hat = hq.dequantize().reshape(out_f, in_f)  # (out, in), compute dtype
    meta, params = hq.meta, hq.quant_config["weight_quant_params"]
    return FormatQuant(
        format=f"hqq b{bits} g{group_size}",
        weight=exact_float(w_hat),
        storage_bits=stored_bits(hq.W_q, meta),  # W_q: (ceil(groups / 10), g) int32 at 3 bits
        detail={"nbits": meta["nbits"], "group_size": meta["group_size"], "axis": meta["axis"],
                "packing": meta["packing"], "optimize": params["optimize"], "round_zero": params["round_zero"],
                "compute_dtype": str(compute_dtype(w)).replace("torch.", "")},
    )


def hqq_model(model, adapter, spec: QuantSpec, method_cfg: HQQConfig, calib=None) -> QuantResult:
    """HQQ of every quantised linear of ``model`` at its bits (``spec.bits_for``) / ``spec.group_size``;
    ``model`` is not modified (``spec.sym`` does not apply: hqq's zero is a float)."""
    for b in {spec.bits, *(b for _, b in spec.layer_bits)}:
        check_bits(b)
    if method_cfg.optimize and method_cfg.kappa != HQQConfig.kappa:
        log.warning("method.kappa=%s has no effect: hqq %s's proximal solver never applies kappa",
                    method_cfg.kappa, importlib.metadata.version("hqq"))
    t0 = time.perf_counter()
    layers = {}
    for name in tqdm(quantized_layer_names(model, adapter, spec), desc=f"hqq b{spec.bits}", unit="layer"):
        layers[name] = hqq_layer(model.get_submodule(name).weight, spec.bits_for(name), spec.group_size, method_cfg)
    info = {"library": "hqq", "version": importlib.metadata.version("hqq"), "axis": method_cfg.axis,
            "optimize": method_cfg.optimize, "solver": "hqq.core.optimize.optimize_weights_proximal",
            "opt_params": opt_params(method_cfg), "quantize_s": time.perf_counter() - t0}
    log.info("hqq b%d g%d: %d layers in %.1f s", spec.bits, spec.group_size, len(layers), info["quantize_s"])
    return QuantResult(layers=layers, info=info)
