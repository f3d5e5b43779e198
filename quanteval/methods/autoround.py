"""``method=autoround``: Intel's AutoRound (Cheng et al. 2023, "Optimize Weight Rounding via Signed
Gradient Descent"), through the ``auto-round`` library itself (checked against 0.16.1), not re-implemented.

    quanteval method=autoround bits=4 method.iters=50

AutoRound tunes, block by block, a rounding offset per weight and (``enable_minmax_tuning``) a factor on
each group's min and max, with signed gradient descent on the block's output error. ``iters=0`` is the
library's own RTN mode (for ``sym`` its "optimised RTN": a scale search weighted by the activations' mean
squares, so it still reads the calibration data).

Calibration: auto-round is handed quanteval's own calibration token ids, one ``{"input_ids": (1, seq_len),
"attention_mask": ones}`` dict per sequence (its ``dataset`` accepts such a list; its default is a hub
download). The mask says what quanteval's calibration means (every position attended); without it
auto-round would mask the pad token (SmolLM2's is ``<|im_end|>``, which the chat half holds) and the last
position. Its loss still skips those positions, as it does for its own data.

It runs on a float32 copy of the model (``model`` is left as it was) with ``amp=False``: on a CPU auto-round
would otherwise cast the model to bf16, and its fake-quantised weights, ``scale * (q - zp)`` rounded to bf16,
would no longer be exactly what its scales and integers say.

Reading the result: after ``quantize()`` (no export) each tuned linear holds auto-round's fake-quantised
weight ``scale * (q - zp)`` (float32) and, as attributes, ``scale`` (out, n_groups) and ``zp``. Codes are
``round(w / scale) + zp``, and the layer is accepted only if ``LayerQuant.dequantize()`` gives back that weight
bit for bit (``AutoRoundError`` otherwise). Value mapping:

- asym: ``zp`` is an integer tensor (out, n_groups) in [0, 2^b - 1]; scales are fp16 values.
- sym: auto-round's integers are ``q`` in [-2^(b-1), 2^(b-1) - 1] with ``zp = 2^(b-1)`` (an int), so
  ``code = q + 2^(b-1)`` and ``zero = 2^(b-1)``, quanteval's own sym zero. Its scales are *signed*: a group
  whose most negative weight is the larger one in magnitude gets a positive scale, otherwise a negative one,
  so the 2^(b-1) end of the range lands on the largest magnitude ("full range"). ``LayerQuant`` keeps them
  negative; ``scale * (code - zero)`` holds for either sign.
- scales are kept as auto-round made them: fp16 values from the tuned path and asym RTN, float32 from the
  sym optimised RTN (``opt_rtn_int_sym`` never casts its searched scales to fp16).

Only the decoder blocks' linears are quantised here (auto-round leaves lm_head alone by default); with
``quantize_embeddings`` those layers get RTN (``rtn_outside_blocks``), as GPTQ and AWQ do.
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from quanteval.methods import CalibrationIds, QuantResult, QuantSpec, quantized_layer_names, rtn_outside_blocks
from quanteval.primitives import LayerQuant, group_index, group_width

log = logging.getLogger(__name__)

AUTOROUND_VERSION = "0.16.1"  # the version this adapter was checked against (tests/test_autoround.py)


class AutoRoundError(RuntimeError):
    """auto-round's result could not be read as integer codes, scales and zero points; one line."""


def calibration_dataset(ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """quanteval's calibration ids (n, seq_len) as auto-round's ``dataset``: one dict per sequence.

    >>> [d["input_ids"].shape for d in calibration_dataset(torch.zeros(2, 5, dtype=torch.long))]
    [torch.Size([1, 5]), torch.Size([1, 5])]
    """
    rows = ids.cpu().long().split(1, dim=0)  # n x (1, seq_len)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows]


def signround_config(spec: QuantSpec, method_cfg):
    """auto-round's ``SignRoundConfig`` for a spec and ``AutoRoundConfig``; auto-round itself turns
    ``iters=0`` into its RTN config."""
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig

    return SignRoundConfig(iters=method_cfg.iters, lr=method_cfg.lr,
                           enable_minmax_tuning=method_cfg.enable_minmax_tuning,
                           bits=spec.bits, group_size=spec.group_size, sym=spec.sym, data_type="int")


def run_autoround(model, spec: QuantSpec, method_cfg, calib: CalibrationIds) -> tuple[torch.nn.Module, dict]:
    """auto-round on a float32 copy of ``model``: (the copy, fake-quantised by auto-round, and timings).

    ``model`` is not modified. Tuning runs on ``model``'s device.
    """
    from auto_round import AutoRound

    n, seq_len = calib.ids.shape
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    work = copy.deepcopy(model).float().eval()
    log.info("auto-round %s: %s-bit g%s%s, iters=%s, %d x %d calibration tokens on %s", _version(), spec.bits,
             spec.group_size, " sym" if spec.sym else "", method_cfg.iters, n, seq_len, device)
    ar = AutoRound(work, tokenizer=calib.tokenizer, alg_configs=signround_config(spec, method_cfg),
                   dataset=calibration_dataset(calib.ids), nsamples=n, seqlen=seq_len,
                   batch_size=min(method_cfg.batch_size, n), device_map=str(device),
                   # float32 throughout (see the module docstring); no inductor compile, no offload to disk
                   amp=False, enable_torch_compile=False, low_cpu_mem_usage=False)
    t1 = time.perf_counter()
    qmodel, _ = ar.quantize()
    t2 = time.perf_counter()
    return qmodel, {"autoround_setup_s": round(t1 - t0, 2), "autoround_quantize_s": round(t2 - t1, 2)}


def layer_from_autoround(linear: torch.nn.Module, spec: QuantSpec) -> LayerQuant:
    """One linear as auto-round left it (fake-quantised weight, ``scale``, ``zp``) as a ``LayerQuant``
    whose dequantisation is that weight bit for bit (see the module docstring for the mapping)."""
    maxq = 2**spec.bits - 1
    w = linear.weight.detach().float().cpu()  # (out, in)
    out_f, in_f = w.shape
    g_idx = group_index(in_f, spec.group_size)  # (in,)
    n_groups = -(-in_f // group_width(in_f, spec.group_size))
    scale = getattr(linear, "scale", None)
    if scale is None:
        raise AutoRoundError("auto-round left it without a scale (not quantised)")
    scales = scale.detach().cpu().reshape(out_f, n_groups)  # (out, n_groups), fp16 or float32 as made
    zp = linear.zp
    if torch.is_tensor(zp):
        zeros = zp.detach().float().cpu().reshape(out_f, n_groups)  # (out, n_groups)
    else:  # sym: one int, 2^(b-1)
        zeros = torch.full((out_f, n_groups), float(zp))
    if spec.sym and not bool((zeros == 2 ** (spec.bits - 1)).all()):
        raise AutoRoundError(f"sym zero points other than {2 ** (spec.bits - 1)}")
    if not bool((zeros == zeros.round()).all()) or zeros.min() < 0 or zeros.max() > maxq:
        raise AutoRoundError(f"zero points outside the integers 0..{maxq}")
    s, z = scales.float()[:, g_idx.long()], zeros[:, g_idx.long()]  # (out, in)
    codes = torch.round(w / s) + z  # exact: w is s * (q - zp) in float32
    if codes.min() < 0 or codes.max() > maxq:
        raise AutoRoundError(f"codes outside 0..{maxq}")
    lq = LayerQuant(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, codes=codes.to(torch.uint8),
                    scales=scales, zeros=zeros.to(torch.uint8), g_idx=g_idx)
    if not torch.equal(lq.dequantize(), w):
        raise AutoRoundError("scale * (code - zero) differs from auto-round's fake-quantised weight")
    return lq


def autoround_model(model, adapter, spec: QuantSpec, method_cfg, calib: CalibrationIds) -> QuantResult:
    """auto-round's quantisation of every linear in ``model``'s decoder blocks, on the calibration ids.

    ``method_cfg`` is an ``AutoRoundConfig`` whose ``iters`` is already resolved (the preset's by default).
    """
    if method_cfg.iters is None:
        raise ValueError("method.iters: unresolved (the variant takes preset.autoround_iters)")
    qmodel, info = run_autoround(model, spec, method_cfg, calib)
    block_names = [n for n in quantized_layer_names(model, adapter, spec) if n.startswith(f"{adapter.blocks}.")]
    layers = {}
    for name in block_names:
        try:
            layers[name] = layer_from_autoround(qmodel.get_submodule(name), spec)
        except AutoRoundError as e:
            raise AutoRoundError(f"{name}: {e}") from None
    layers.update(rtn_outside_blocks(model, adapter, spec))
    info = {"library": f"auto-round {_version()}", "iters": method_cfg.iters, **info}
    log.info("auto-round: %d linears in %.1f s", len(block_names), info["autoround_quantize_s"])
    return QuantResult(layers=layers, info=info)


def _version() -> str:
    import auto_round

    return auto_round.__version__
