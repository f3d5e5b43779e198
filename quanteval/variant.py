"""What a job is: a ``Variant`` (one model quantised one way) and a ``Run`` (a variant scored on one task).

Both are frozen and built once from a job's ``RunConfig`` (``Variant.of(cfg)``, ``Run.of(cfg)``); the
sweep, ``plan=true`` and ``quanteval-export`` use them and nothing else to find keys and paths:

- ``Variant.quant_key`` keys the variant's quantisation result, cached at
  ``<results_dir>/cache/quant/<method>-<key>.pt`` and shared by every task (and every later sweep);
- ``Run.key`` hashes every setting that changes the run's result (``Run.settings``); the run file is
  ``<results_dir>/<sweep>/runs/<task>__<model>__<variant>__<key12>.json``.

>>> from quanteval.config import ModelConfig, PresetConfig, RTNConfig, RunConfig, WikiText2Config
>>> cfg = RunConfig(model=ModelConfig(), method=RTNConfig(), task=WikiText2Config(), preset=PresetConfig(), bits=4)
>>> Variant.of(cfg).label
'rtn w4 g64'
>>> Run.of(cfg).path.name.startswith("wikitext2__smollm2_135m__rtn-w4-g64__")
True

The settings are laid out exactly as quanteval 0.2.0 laid them out, so every cache and run key of
0.2.0 is unchanged (``tests/test_keys.py`` pins them for the default and smoke grids).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import quanteval
from quanteval import results
from quanteval.config import ArtifactConfig, AutoRoundConfig, MethodConfig, MixedConfig, ModelConfig, RunConfig
from quanteval.kvsize import KVSpec

NOT_IN_QUANT_KEY = ("task", "preset", "git", "runtime", "kv")  # run settings that do not change the weights
KV_SEP = " · "  # between the weights' label and the cache's: "rtn w4 g64 · kv4"


def quant_key_of(settings: dict) -> str:
    """The quantisation cache key of a run's settings (a run file's ``settings`` included):
    all but the task's, the preset's evaluation sizes, the git commit, the runtime and the KV cache's
    (a w4 · kv4 variant shares the w4 variant's weights)."""
    kept = {k: v for k, v in settings.items() if k not in NOT_IN_QUANT_KEY}
    if "kv" in settings and isinstance(kept.get("variant"), dict):  # the variant's label and info without it
        info = {k: v for k, v in kept["variant"].items() if k != "kv"}
        info["label"] = str(info.get("label", "")).split(KV_SEP)[0]
        kept["variant"] = info
    return results.run_key(kept)


@dataclass(frozen=True)
class Calibration:
    """The calibration set of a method that needs one: which text, how much of it, which seed."""

    dataset: str
    path: Optional[str]
    seed: int
    n_samples: int
    seq_len: int
    batch_size: int  # sequences per forward chunk: changes speed, not the result (not keyed)
    chat_share: float = 0.5  # dataset=mix: share of sequences from the chat-formatted text

    @property
    def is_mix(self) -> bool:
        return self.path is None and self.dataset == "mix"

    def settings(self) -> dict:
        s = {"dataset": self.dataset, "path": self.path, "seed": self.seed,
             "n_samples": self.n_samples, "seq_len": self.seq_len}
        if self.is_mix:  # only then: wikitext2 / gsm8k / path keys stay those of 0.2.0
            s["chat_share"] = self.chat_share
        return s


@dataclass(frozen=True)
class Variant:
    """One model quantised one way (or not at all: ``method.name == "none"``), in one runtime."""

    model: ModelConfig
    dtype: str
    device: str
    method: MethodConfig
    bits: int
    group_size: int
    sym: bool
    quantize_embeddings: bool
    seed: int
    calibration: Optional[Calibration]  # None unless the method calibrates
    runtime: str  # fakequant | packed
    kernel: str
    # typed methods (bnb, gguf: quanteval.formats): the library type these bits mean ("Q4_1"), and why
    # there is none when there is none (the run is then skipped with that reason)
    format: Optional[str] = None
    no_format: Optional[str] = None
    artifact: Optional[object] = None  # method=artifact: the file (quanteval.artifacts.Artifact)
    kv: KVSpec = KVSpec()  # the KV cache's quantisation (16 bits: none)

    @classmethod
    def of(cls, cfg: RunConfig) -> "Variant":
        from quanteval.formats import FORMATS, NoFormat, resolve
        from quanteval.methods import METHODS

        method = METHODS[cfg.method.name]
        calib = None
        if method is not None and method.needs_calibration:
            c, p = cfg.calibration, cfg.preset
            calib = Calibration(c.dataset, c.path, cfg.seed, p.calib_samples, p.calib_seq_len, c.batch_size,
                                c.chat_share)
        method_cfg, bits, fmt, no_format = cfg.method, cfg.bits, None, None
        if cfg.method.name in FORMATS:
            try:
                fmt, bits = resolve(cfg.method.name, cfg.bits, cfg.method.type)
            except NoFormat as e:
                no_format = str(e)
        if isinstance(method_cfg, AutoRoundConfig) and method_cfg.iters is None:
            method_cfg = dataclasses.replace(method_cfg, iters=cfg.preset.autoround_iters)  # the preset's
        if isinstance(method_cfg, MixedConfig):  # its bits are per unit (method.budget, method.choices)
            bits = None
        artifact = None
        if isinstance(method_cfg, ArtifactConfig):  # a file: its type and bits are its own (cfg.bits is ignored)
            from quanteval.artifacts import inspect

            artifact = inspect(cfg.artifact)
            fmt, bits = artifact.type, artifact.nominal_bits
            method_cfg = dataclasses.replace(method_cfg, path=artifact.path)
        return cls(cfg.model, cfg.dtype, cfg.device, method_cfg, bits, cfg.group_size, cfg.sym,
                   cfg.quantize_embeddings, cfg.seed, calib, cfg.runtime, cfg.kernel, fmt, no_format, artifact,
                   KVSpec(cfg.kv_bits, cfg.kv_group_size, cfg.kv_method))

    @property
    def quantizes(self) -> bool:
        """Whether the *weights* are quantised (``kv`` says whether the cache is)."""
        return self.method.quantizes

    @property
    def is_baseline(self) -> bool:
        """Neither the weights nor the KV cache quantised: the model every variant is compared with."""
        return not self.quantizes and not self.kv.quantizes

    @property
    def label(self) -> str:
        """``baseline``, or e.g. ``gptq w4 g64`` (`` sym`` appended when symmetric), ``rtn w4 g64 · kv4``
        with a quantised cache, ``w16 · kv4`` for the cache alone."""
        if self.kv.quantizes:
            return (self._weights_label() if self.quantizes else "w16") + KV_SEP + self.kv.label
        return self._weights_label()

    def _weights_label(self) -> str:
        if not self.quantizes:
            return "baseline"
        if self.artifact is not None:  # a file: its name and type, "model-Q4_K_M.gguf Q4_K_M"
            return self.artifact.label
        if self.format is not None:  # a library type names its own layout: "gguf Q4_1"
            return f"{self.method.label_name} {self.format}"
        if self.no_format is not None:
            return f"{self.method.label_name} w{self.bits} (no type)"
        if isinstance(self.method, MixedConfig):  # "mixed-gptq 3.8b g64"
            return f"{self.method.label_name} {self.method.budget:g}b g{self.group_size}" + \
                (" sym" if self.sym else "")
        label = f"{self.method.label_name} w{self.bits}"
        if self.method.uses_group_size:
            label += f" g{self.group_size}"
        return label + (" sym" if self.sym and self.method.uses_sym else "")

    def info(self) -> dict:
        """The variant as run files record it; the baseline carries no bits/group/sym, and a method that
        does not use group_size / sym (bnb, gguf, hqq's sym) carries None for them (so not in its key)."""
        if self.is_baseline:
            return {"method": "none", "bits": None, "group_size": None, "sym": None, "label": "baseline"}
        if not self.quantizes:  # the cache alone: the report's family "kv" (weights unquantised)
            return {"method": "kv", "bits": None, "group_size": None, "sym": None, "label": self.label,
                    "kv": self.kv.settings()}
        info = {"method": self.method.label_name, "bits": self.bits,
                "group_size": self.group_size if self.method.uses_group_size else None,
                "sym": self.sym if self.method.uses_sym else None, "label": self.label}
        if self.format is not None:
            info["format"] = self.format
        if self.artifact is not None:
            info["artifact"] = self.artifact.settings()
        if self.kv.quantizes:
            info["kv"] = self.kv.settings()
        return info

    def model_settings(self) -> dict:
        """What identifies the baseline weights in memory: the model, its dtype and device."""
        return {"model": dataclasses.asdict(self.model), "dtype": self.dtype, "device": self.device}

    @property
    def model_key(self) -> str:
        return results.run_key(self.model_settings())

    def settings(self) -> dict:
        """This variant's part of a run's settings (all of them but the task's, the preset's and git's)."""
        s = {**self.model_settings(), "variant": self.info(), "quanteval": quanteval.__version__}
        if self.runtime != "fakequant":  # only then: the keys of fake-quant runs stay as they were
            s["runtime"] = {"runtime": self.runtime, "kernel": self.kernel}
        if self.kv.quantizes:  # only then: kv_bits=16 leaves every key as it was
            s["kv"] = self.kv.settings()
        if self.quantizes:
            s["method"] = dataclasses.asdict(self.method)
            s["quantize_embeddings"] = self.quantize_embeddings
            if self.calibration is not None:
                s["calibration"] = self.calibration.settings()
        return s

    @property
    def quant_key(self) -> str:
        return quant_key_of(self.settings())

    def quant_path(self, cache_dir: Path) -> Path:
        """Where this variant's quantisation result is cached (``Run.quant_path`` is None for the baseline)."""
        return Path(cache_dir) / "quant" / f"{self.method.name}-{self.quant_key}.pt"

    def calibration_key(self) -> str:
        """Identifies the captured calibration inputs: the baseline weights and the calibration set."""
        return results.run_key({"model": self.model_key, **self.calibration.settings()})


@dataclass(frozen=True)
class Run:
    """One variant scored on one task: its settings, key and files."""

    cfg: RunConfig
    variant: Variant
    settings: dict  # every setting that changes the result (hashed into ``key``)
    key: str

    @classmethod
    def of(cls, cfg: RunConfig) -> "Run":
        from quanteval.evaluate import task_for

        variant = Variant.of(cfg)
        settings = {**variant.settings(), "task": dataclasses.asdict(cfg.task),
                    "preset": task_for(cfg.task).preset_settings(cfg), "git": results.git_commit()}
        return cls(cfg, variant, settings, results.run_key(settings))

    def with_task(self, task) -> "Run":
        """The same variant on another task (e.g. its WikiText-2 run, which the collapse gate reads)."""
        return Run.of(dataclasses.replace(self.cfg, task=task))

    @property
    def task(self) -> str:
        return self.cfg.task.name

    @property
    def results_dir(self) -> Path:
        return Path(self.cfg.results_dir).resolve()

    @property
    def sweep_dir(self) -> Path:
        return self.results_dir / self.cfg.sweep_name

    @property
    def cache_dir(self) -> Path:
        """Caches shared by every sweep under one results_dir."""
        return self.results_dir / "cache"

    @property
    def path(self) -> Path:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.variant.label).strip("-")
        return self.sweep_dir / "runs" / f"{self.task}__{self.cfg.model.name}__{slug}__{self.key[:12]}.json"

    @property
    def items_path(self) -> Path:
        """Per-item records, beside the run file (JSONL)."""
        return self.path.with_name(self.path.stem + ".items.jsonl")

    @property
    def lock_path(self) -> Path:
        """The lock guarding the run file (under ``<sweep>/locks/``, out of the runs folder)."""
        return self.sweep_dir / "locks" / (self.path.stem + ".lock")

    @property
    def log_path(self) -> Path:
        return self.path.with_suffix(".log")

    @property
    def quant_path(self) -> Optional[Path]:
        """The variant's cached quantisation result; None for the baseline and for a method whose result is
        read from a file (method=artifact: the file is its own cache)."""
        from quanteval.methods import METHODS

        v = self.variant
        return v.quant_path(self.cache_dir) if v.quantizes and METHODS[v.method.name].cached else None

    def preset_skip(self) -> Optional[str]:
        """Why the preset's grid leaves this run out (None when it runs).

        ``preset.method_bits`` trims the default Cartesian grid (e.g. GPTQ/AWQ only at 4 and 3 bits on a
        CPU); ``use_preset_grid`` is turned off by the CLI when the user sets ``bits`` explicitly.
        """
        cfg = self.cfg
        if self.variant.no_format is not None:  # bnb at 3 bits: skipped, never given another type
            return self.variant.no_format
        allowed = cfg.preset.method_bits.get(cfg.method.name)
        if not cfg.use_preset_grid or allowed is None or cfg.bits in allowed:
            return None
        return (f"not in preset {cfg.preset.name}'s grid (preset.method_bits.{cfg.method.name}={list(allowed)}); "
                f"set bits explicitly to run it")
