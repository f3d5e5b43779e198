"""``method=llmcompressor``: the deployed library's own GPTQ, RTN or AWQ, in the same sweep and report.

llm-compressor pins an older transformers than quanteval's, so it runs in a virtual environment of its
own, made once (``python -m quanteval.methods.llmcompressor --setup``, under ``$QUANTEVAL_CACHE``), as a
subprocess (``llmcompressor_worker.py``). It is called, not re-implemented: quanteval hands it the baseline
model (saved as safetensors), the very calibration token ids its own methods use, and the recipe; the
worker returns llm-compressor's integer values, scales and zero points per linear, which become
ordinary ``LayerQuant`` results here, cached, keyed and applied like quanteval's own. A test checks that
their dequantisation equals llm-compressor's own ``dequantize`` of the same values.

    quanteval method=llmcompressor method.modifier=gptq bits=4,3

Value mapping: llm-compressor's signed integers ``q`` in ``[-2^(b-1), 2^(b-1) - 1]`` and zero points
``zp`` become quanteval's unsigned ``code = q + 2^(b-1)`` and ``zero = zp + 2^(b-1)``, so
``scale * (code - zero) == scale * (q - zp)`` exactly; scales stay in llm-compressor's float32.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from quanteval.methods import CalibrationIds, QuantResult, QuantSpec
from quanteval.primitives import LayerQuant, group_index

log = logging.getLogger(__name__)

LLMC_VERSION = "0.14.0.1"  # the version this adapter was checked against (its venv installs exactly this)
WORKER = Path(__file__).with_name("llmcompressor_worker.py")
SETUP = "python -m quanteval.methods.llmcompressor --setup"


class LLMCompressorError(RuntimeError):
    """llm-compressor could not run; the message is one line."""


def venv_dir() -> Path:
    """Where llm-compressor's own venv lives: ``$QUANTEVAL_LLMC_VENV``, else under the quanteval cache."""
    from quanteval.models import cache_root

    return Path(os.environ.get("QUANTEVAL_LLMC_VENV") or cache_root() / "venvs" / f"llmcompressor-{LLMC_VERSION}")


def venv_python() -> Path:
    """The venv's python; LLMCompressorError naming the setup command when the venv is missing or broken."""
    py = venv_dir() / "bin" / "python"
    if not py.exists() or not (venv_dir() / "ok").exists():
        raise LLMCompressorError(f"method=llmcompressor: its virtual environment {venv_dir()} is not made; "
                                 f"make it once with: {SETUP}")
    return py


def setup() -> Path:
    """Make llm-compressor's venv (torch as installed here, llmcompressor==LLMC_VERSION); a few minutes, once."""
    d = venv_dir()
    py = d / "bin" / "python"
    if (d / "ok").exists() and py.exists():
        return py  # made already
    steps = [[sys.executable, "-m", "venv", str(d)],
             [str(py), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"],
             [str(py), "-m", "pip", "install", "-q", f"llmcompressor=={LLMC_VERSION}"]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise LLMCompressorError(f"{' '.join(cmd[:4])} ... failed: {last}; the venv is at {d}")
    (d / "ok").write_text(LLMC_VERSION + "\n")
    return py


def job_for(spec: QuantSpec, method_cfg) -> dict:
    """The worker's recipe for a spec and ``LLMCompressorConfig``."""
    return {"modifier": method_cfg.modifier, "bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
            "actorder": method_cfg.actorder, "dampening_frac": method_cfg.dampening_frac,
            "block_size": method_cfg.block_size}


def run_worker(model, tokenizer, ids: torch.Tensor, job: dict, timeout_s: float | None = None) -> dict:
    """Save the model and ids, run the worker in llm-compressor's venv, return what it wrote."""
    py = venv_python()
    with tempfile.TemporaryDirectory(prefix="quanteval-llmc-") as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        torch.save(ids.cpu(), tmp / "calib.pt")
        job = {**job, "model_dir": str(tmp / "model"), "calibration": str(tmp / "calib.pt"),
               "out": str(tmp / "out.pt")}
        (tmp / "job.json").write_text(json.dumps(job))
        log.info("llm-compressor %s %s-bit: running in %s", job["modifier"], job["bits"], venv_dir())
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["TOKENIZERS_PARALLELISM"] = "false"
        # -I: isolated, so the worker's folder (which holds this module, named like the library) is not on its path
        proc = subprocess.run([str(py), "-I", str(WORKER), str(tmp / "job.json")], capture_output=True, text=True,
                              env=env, timeout=timeout_s)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise LLMCompressorError(f"llm-compressor ({job['modifier']}) failed: {last}")
        return torch.load(tmp / "out.pt", weights_only=False)


def layer_from_llmc(layer: dict, spec: QuantSpec) -> LayerQuant:
    """One linear of the worker's output as a ``LayerQuant`` (see the module docstring for the mapping)."""
    off = 2 ** (spec.bits - 1)
    q = layer["q"].to(torch.int16)  # (out, in)
    in_f = q.shape[1]
    g_idx = layer["g_idx"]
    if g_idx is None:
        g_idx = group_index(in_f, spec.group_size)
    scale = layer["scale"].float()
    if scale.dim() == 1:
        scale = scale[:, None]
    zp = layer["zero_point"].to(torch.int16).reshape(scale.shape)
    return LayerQuant(bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                      codes=(q + off).to(torch.uint8), scales=scale, zeros=(zp + off).to(torch.uint8),
                      g_idx=g_idx.to(torch.int32))


def llmcompressor_model(model, adapter, spec: QuantSpec, method_cfg, calib: CalibrationIds) -> QuantResult:
    """llm-compressor's quantisation of every linear in ``model``'s blocks, on the calibration token ids."""
    from quanteval.methods import quantized_layer_names

    if spec.quantize_embeddings:
        raise LLMCompressorError("method=llmcompressor: quantize_embeddings=true is not supported (its recipe "
                                 "ignores lm_head, as llm-compressor's examples do)")
    out = run_worker(model, calib.tokenizer, calib.ids, job_for(spec, method_cfg))
    names = quantized_layer_names(model, adapter, spec)
    missing = [n for n in names if n not in out["layers"]]
    if missing:
        raise LLMCompressorError(f"llm-compressor left {len(missing)} linears unquantised (e.g. {missing[0]})")
    layers = {n: layer_from_llmc(out["layers"][n], spec) for n in names}
    info = {"library": f"llm-compressor {out['versions']['llmcompressor']}", "versions": out["versions"],
            "llmc_quantize_s": out["quantize_s"], "llmc_peak_rss_mb": out["peak_rss_mb"]}
    return QuantResult(layers=layers, info=info)


if __name__ == "__main__":  # python -m quanteval.methods.llmcompressor --setup
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if sys.argv[1:] != ["--setup"]:
        sys.exit(f"usage: {SETUP}")
    try:
        log.info("llm-compressor's venv is ready: %s", setup())
    except LLMCompressorError as e:
        sys.exit(f"quanteval: error: {e}")
