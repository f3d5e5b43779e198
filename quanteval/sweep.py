"""Run one job of the grid: load (cached per process), quantise, evaluate, store.

Hydra's launcher calls ``run_job`` once per job. Work that several jobs
share is done once:

- the model is loaded once per process (``_MODEL``) and each variant is built
  from a saved copy of the baseline weights;
- the baseline's task outputs are computed once and kept on disk (see each
  task's ``baseline``), keyed by everything that changes them;
- a job whose run file already holds ``status: ok`` is skipped (resume);
  ``rerun=true`` recomputes it.

A job that fails writes a ``status: failed`` run file with a one-line error
(never one that looks complete) and the sweep goes on with the next job.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import re
import resource
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import quanteval
from quanteval import results
from quanteval.accounting import compression
from quanteval.config import RunConfig
from quanteval.data import resolve_data_dir
from quanteval.methods import METHODS, QuantSpec, apply_result
from quanteval.models import LoadedModel, adapter_for, load_model, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

_MODEL: dict = {}  # process-level cache: {"key": ..., "loaded": LoadedModel, "base_state": {...}}
_CALIB: dict = {}  # process-level cache: {calibration key: BlockInputs}, one entry at a time
_DONE: set[str] = set()  # run keys finished by this process (rerun=true still computes each once)
_REFRESHED: set[Path] = set()  # cache files written by this process (rerun=true rewrites each once)


@dataclass
class JobContext:
    """Everything a task needs to score the model currently in memory."""

    cfg: RunConfig
    loaded: LoadedModel
    data_root: Path
    cache_dir: Path
    model_key: str  # identifies the baseline weights (name + provenance + dtype)

    def needs(self, path: Path) -> bool:
        """Whether a cache file must be (re)computed: missing, or ``rerun`` and not yet refreshed here."""
        return not path.exists() or (self.cfg.rerun and path not in _REFRESHED)

    def wrote(self, path: Path) -> None:
        _REFRESHED.add(path)


def sweep_dir(cfg: RunConfig) -> Path:
    return Path(cfg.results_dir).resolve() / cfg.sweep_name


def cache_dir(cfg: RunConfig) -> Path:
    """Caches shared by every sweep under one results_dir."""
    return Path(cfg.results_dir).resolve() / "cache"


def _model_key(cfg: RunConfig) -> dict:
    return {"model": dataclasses.asdict(cfg.model), "dtype": cfg.dtype, "device": cfg.device}


def run_settings(cfg: RunConfig) -> dict:
    """Every setting that changes this run's result; hashed into the run key."""
    settings = {
        **_model_key(cfg),
        "variant": cfg.variant(),
        "task": dataclasses.asdict(cfg.task),
        "preset": _preset_settings(cfg),
        "quanteval": quanteval.__version__,
        "git": results.git_commit(),
    }
    if cfg.runtime != "fakequant":  # only then: the keys of fake-quant runs stay as they were
        settings["runtime"] = {"runtime": cfg.runtime, "kernel": cfg.kernel}
    if cfg.method.quantizes:
        settings["method"] = dataclasses.asdict(cfg.method)
        settings["quantize_embeddings"] = cfg.quantize_embeddings
        if METHODS[cfg.method.name].needs_calibration:
            settings["calibration"] = calibration_settings(cfg)
    return settings


def _preset_settings(cfg: RunConfig) -> dict:
    """The preset's fields that change this task's result (so resizing one task keeps the others' runs)."""
    p, kind, name = cfg.preset, cfg.task.kind, cfg.task.name
    if kind == "wikitext2":
        return {"n_windows": p.n_windows, "seq_len": p.seq_len}
    if kind == "lmeval":
        return {"limit": p.limits.get("lmeval")}
    return {"limit": p.limits.get(name), "max_new_tokens": p.max_new_tokens.get(name),
            "sandbox": cfg.sandbox, "judge": cfg.judge}


def preset_skips(cfg: RunConfig) -> str | None:
    """Why the preset's grid leaves this job out (None when it runs).

    ``preset.method_bits`` trims the default Cartesian grid (e.g. GPTQ/AWQ only at 4 and 3 bits
    on a CPU); ``use_preset_grid`` is turned off by the CLI when the user sets ``bits`` explicitly.
    """
    allowed = cfg.preset.method_bits.get(cfg.method.name)
    if not cfg.use_preset_grid or allowed is None or cfg.bits in allowed:
        return None
    return (f"not in preset {cfg.preset.name}'s grid (preset.method_bits.{cfg.method.name}={list(allowed)}); "
            f"set bits explicitly to run it")


def calibration_settings(cfg: RunConfig) -> dict:
    return {"dataset": cfg.calibration.dataset, "path": cfg.calibration.path, "seed": cfg.seed,
            "n_samples": cfg.preset.calib_samples, "seq_len": cfg.preset.calib_seq_len}


def calibration_inputs(cfg: RunConfig, ctx: "JobContext", adapter):
    """First-block inputs of the calibration set: captured once per model and settings, per process."""
    from quanteval.calibration import calibration_file, calibration_ids, capture_inputs

    key = results.run_key({"model": ctx.model_key, **calibration_settings(cfg)})
    if key not in _CALIB:
        _CALIB.clear()
        c = cfg.calibration
        file = calibration_file(c.dataset, c.path, ctx.data_root)
        ids = calibration_ids(ctx.loaded.tokenizer, file, cfg.preset.calib_samples, cfg.preset.calib_seq_len, cfg.seed)
        log.info("capturing first-block inputs: %d x %d tokens from %s", *ids.shape, file.name)
        _CALIB[key] = capture_inputs(ctx.loaded.model, adapter, ids, c.batch_size)
    return _CALIB[key]


def quant_cache_path(cfg: RunConfig) -> Path:
    """Where this variant's quantisation result is cached: keyed by the run's settings without the task's.

    The quanteval version is in the key, the git commit is not: a commit that changes a method bumps
    the version.
    """
    return cache_dir(cfg) / "quant" / f"{cfg.method.name}-{quant_key(run_settings(cfg))}.pt"


def quant_key(settings: dict) -> str:
    """The quantisation cache key of a run's settings: all but the task's, the git commit and the runtime."""
    return results.run_key({k: v for k, v in settings.items() if k not in ("task", "preset", "git", "runtime")})


def quantize(cfg: RunConfig, ctx: "JobContext"):
    """The method's result for this job: from the on-disk cache, else computed once (under a lock) and cached.

    The cache key is the run's settings without the task's: every task reuses one result.
    """
    from filelock import FileLock

    from quanteval.methods import QuantResult

    path = quant_cache_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # parallel jobs of one variant (other tasks) wait and reuse it
        if not ctx.needs(path):
            log.info("reusing cached %s result %s", cfg.method.name, path.name)
            result = QuantResult.load(path)
            result.info = {**result.info, "from_cache": True}
            return result
        result = _compute_quant(cfg, ctx, METHODS[cfg.method.name])
        result.info["from_cache"] = False
        result.save(path)
        ctx.wrote(path)
        return result


def _compute_quant(cfg: RunConfig, ctx: "JobContext", method):
    model = ctx.loaded.model
    adapter = adapter_for(model)
    calib = calibration_inputs(cfg, ctx, adapter) if method.needs_calibration else None
    spec = QuantSpec(cfg.bits, cfg.group_size, cfg.sym, cfg.quantize_embeddings)
    torch.manual_seed(cfg.seed)
    return method.compute(model, adapter, spec, cfg.method, calib)


def run_path(cfg: RunConfig, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cfg.variant()["label"]).strip("-")
    return sweep_dir(cfg) / "runs" / f"{cfg.task.name}__{cfg.model.name}__{slug}__{key[:12]}.json"


def get_model(cfg: RunConfig) -> tuple[LoadedModel, str]:
    """The baseline model for ``cfg``, loaded once per process and restored to baseline weights."""
    key = results.run_key(_model_key(cfg))
    if _MODEL.get("key") != key:
        _MODEL.clear()  # one model in memory at a time
        device = resolve_device(cfg.device)
        loaded = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device))
        base_state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
        _MODEL.update(key=key, loaded=loaded, base_state=base_state, dirty=False)
    elif _MODEL.get("packed"):  # modules were swapped for QuantLinear: rebuild from the saved weights
        loaded = _MODEL["loaded"]
        _MODEL["loaded"] = type(loaded)(**{**loaded.__dict__, "model": _rebuild(loaded.model, _MODEL["base_state"])})
        _MODEL["packed"] = False
    elif _MODEL["dirty"]:
        _MODEL["loaded"].model.load_state_dict(_MODEL["base_state"])
    _MODEL["dirty"] = False
    return _MODEL["loaded"], key


def _rebuild(model, base_state: dict):
    """A fresh model of ``model``'s config holding ``base_state`` (after ``pack_model`` swapped its modules)."""
    from transformers import AutoModelForCausalLM

    dtype = next(iter(base_state.values())).dtype
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    fresh.load_state_dict(base_state)
    fresh.generation_config = model.generation_config
    return fresh.to(next(model.parameters()).device).eval()


def _versions() -> dict:
    import transformers

    return {"quanteval": quanteval.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def items_path(run_file: Path) -> Path:
    """Per-item records of a run, beside its run file (JSONL)."""
    return run_file.with_name(run_file.stem + ".items.jsonl")


def fidelity_kl(cfg: RunConfig) -> tuple[float | None, Path]:
    """This variant's WikiText-2 mean KL to the baseline, from its run in this sweep (run first if missing)."""
    from quanteval.config import WikiText2Config

    wt = dataclasses.replace(cfg, task=WikiText2Config())
    path = run_path(wt, results.run_key(run_settings(wt)))
    rec = results.read_run(path) if results.completed(path) else run_job(wt)
    return (rec.get("metrics") or {}).get("kl_mean") if rec.get("status") == "ok" else None, path


def collapse_reason(cfg: RunConfig, task) -> str | None:
    """Why this job's generation is skipped (the variant collapsed), or None."""
    if not getattr(task, "generative", False) or not cfg.method.quantizes or cfg.force_generate:
        return None
    kl, path = fidelity_kl(cfg)
    if kl is None or kl <= cfg.collapse_kl:
        return None
    return (f"collapsed on language-model fidelity: WikiText-2 mean KL {kl:.3g} > collapse_kl={cfg.collapse_kl:g} "
            f"({path.name}); generation skipped, force_generate=true runs it")


def lock_path(path: Path) -> Path:
    """The lock file guarding one run file (under ``<sweep>/locks/``, out of the runs folder)."""
    return path.parent.parent / "locks" / (path.stem + ".lock")


def log_path(path: Path) -> Path:
    """The log of one run, beside its run file."""
    return path.with_suffix(".log")


class _RunLog:
    """Copies quanteval's log records to the run's own log file while the run computes."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.logger = logging.getLogger("quanteval")
        self.level = self.logger.level
        self.logger.setLevel(min(self.level or logging.INFO, logging.INFO))
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
        self.handler.close()


def run_job(cfg: RunConfig) -> dict:
    """Run (or skip, when done) one job; returns its run record.

    Jobs of parallel sweeps (a SLURM array, two sweeps on one results_dir) share the store: each run
    is computed under its own file lock, and a job that finds the run finished by another reads it.
    The OS releases the lock when its holder dies (``kill -9`` included), so a killed job's lock is
    never stale; its half-written files are temporary files that nothing reads.
    """
    from filelock import FileLock

    settings = run_settings(cfg)
    key = results.run_key(settings)
    path = run_path(cfg, key)
    if key in _DONE and path.exists():  # reached again in this process (e.g. the baseline under each bits value)
        return results.read_run(path)
    done = _finished(cfg, path)
    if done:
        log.info("done already, skipping: %s", path.name)
        return done
    skip = preset_skips(cfg)
    if skip:
        log.info("%s: %s", cfg.variant()["label"], skip)
        return {"status": "skipped", "reason": skip}
    lock = FileLock(str(lock_path(path)))
    lock_path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        log.info("%s is being computed by another job: waiting for it", path.name)
        lock.acquire()
    try:
        done = _finished(cfg, path)  # another job may have finished it while this one waited
        if done:
            _DONE.add(key)
            return done
        with _RunLog(log_path(path)):
            log.info("run %s: %s %s (key %s)", path.name, cfg.task.name, cfg.variant()["label"], key[:12])
            return _compute(cfg, settings, key, path)
    finally:
        lock.release()


def _finished(cfg: RunConfig, path: Path) -> dict | None:
    """The run record at ``path`` when it needs no recomputing (not ``rerun``; a collapsed run is
    recomputed under ``force_generate``), else None."""
    if cfg.rerun or not results.completed(path):
        return None
    done = results.read_run(path)
    return None if done["status"] == "collapsed" and cfg.force_generate else done


def _compute(cfg: RunConfig, settings: dict, key: str, path: Path) -> dict:
    from quanteval.evaluate import get_task
    from quanteval.packed import model_bytes  # packed codes count as packed

    base_record = {
        "run_key": key, "sweep_name": cfg.sweep_name, "task": cfg.task.name,
        "variant": cfg.variant(), "config": dataclasses.asdict(cfg), "settings": settings,
    }
    timings: dict[str, float] = {}
    items = None
    try:
        task = get_task(cfg.task)
        collapsed = collapse_reason(cfg, task)
        if collapsed:
            log.info("%s %s: %s", cfg.task.name, cfg.variant()["label"], collapsed)
            record = {**base_record, "status": "collapsed", "reason": collapsed, "metrics": {},
                      "model": {"name": cfg.model.name},
                      "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            results.write_run(path, record)
            _DONE.add(key)
            return record
        t0 = time.perf_counter()
        loaded, model_key = get_model(cfg)
        timings["load_s"] = time.perf_counter() - t0
        model = loaded.model
        device = next(model.parameters()).device
        ctx = JobContext(cfg, loaded, resolve_data_dir(cfg.data_dir), cache_dir(cfg), model_key)
        t0 = time.perf_counter()
        task.baseline(ctx)  # computed once, cached on disk; needs the baseline weights
        timings["baseline_s"] = time.perf_counter() - t0
        param_count = sum(p.numel() for p in model.parameters())
        layers, quant_info = {}, {}
        if cfg.method.quantizes:
            t0 = time.perf_counter()
            result = quantize(cfg, ctx)
            _MODEL["dirty"] = True
            if cfg.runtime == "packed":
                from quanteval.packed import pack_model

                _MODEL["packed"] = True
                pack_model(model, result, backend=cfg.kernel)
            else:
                apply_result(model, result)
            layers = result.layers
            timings["quantize_s"] = time.perf_counter() - t0
            quant_info = result.info
        t0 = time.perf_counter()
        metrics = task.score(ctx)
        timings["eval_s"] = time.perf_counter() - t0
        per_window = metrics.pop("per_window", None)
        items = metrics.pop("items", None)
        extra = {k: metrics.pop(k) for k in ("breakdown", "primary_metric", "sandbox") if k in metrics}
        if extra.get("sandbox") == "none":
            extra["unsafe"] = "generated code ran without the sandbox (sandbox=none)"
        record = {
            **base_record,
            "status": "ok",
            "model": {"name": cfg.model.name, "provenance": _provenance_line(loaded.provenance),
                      **loaded.provenance},
            "metrics": metrics,
            "per_window": per_window,
            **extra,
            "compression": compression(param_count, layers),
            "quantization": quant_info,
            "timings": timings,
            "peak_memory_mb": _peak_memory_mb(device),
            "memory": {"runtime": cfg.runtime, "resident_bytes": model_bytes(model)},
            "versions": _versions(),
            "device": str(device),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    except Exception as e:  # noqa: BLE001 - recorded as a failed run, and the sweep goes on
        line = f"{type(e).__name__}: {e}".splitlines()[0]
        log.error("run failed (%s): %s", cfg.variant()["label"], line)
        log.debug("%s", traceback.format_exc())
        record = {**base_record, "status": "failed", "error": line, "timings": timings,
                  "model": {"name": cfg.model.name},
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if items is not None:  # the items first: a run file with status ok always has its items beside it
        from quanteval.evaluate.generative import write_items

        write_items(items_path(path), items)
        record["items_file"] = items_path(path).name
    results.write_run(path, record)
    _DONE.add(key)
    if record["status"] == "ok":
        log.info("%s %s: %s", cfg.task.name, cfg.variant()["label"], _summary(record["metrics"]))
    return record


def _provenance_line(p: dict) -> str:
    return "; ".join(str(p[k]) for k in ("source", "note") if p.get(k)) + f" (dtype {p.get('dtype')})"


def _summary(m: dict) -> str:
    keys = [k for k in ("ppl", "kl_mean", "same_top1", "primary", "tf_kl_mean", "flip_rate") if k in m]
    return " ".join(f"{k}={m[k]:.4g}" for k in keys)

