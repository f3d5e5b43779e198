"""Run one job of the grid: load (once per session), quantise (cached), evaluate, store.

Hydra's launcher calls ``run_job(cfg, session)`` once per job; the CLI keeps one ``Session`` per
process (``quanteval.session``), so work that several jobs share is done once:

- the model is loaded once per process and each variant starts from the baseline weights; a variant's
  later jobs score the weights its first job applied, when they need no baseline weights (``kept_weights``);
- each variant's quantisation result and each task's baseline outputs are cached on disk, keyed by
  everything that changes them (``quanteval.variant``), under file locks that parallel jobs share;
- a job whose run file already holds ``status: ok`` is skipped (resume); ``rerun=true`` recomputes it.

A generative run of a quantised variant depends on the variant's WikiText-2 run: when that run has
not finished yet it is run first (the collapse gate reads it). A variant whose WikiText-2 mean KL
exceeds ``collapse_kl`` is recorded as ``collapsed`` on its generative tasks without generating.

A job that fails writes a ``status: failed`` run file with a one-line error (never one that looks
complete) and the sweep goes on with the next job.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import resource
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

import quanteval
from quanteval import allocator, results
from quanteval.accounting import compression
from quanteval.config import RunConfig, WikiText2Config
from quanteval.data import resolve_data_dir
from quanteval.evaluate import Task, TaskContext, TaskResult, baseline_cached, task_for
from quanteval.methods import METHODS, CalibrationIds, QuantResult, QuantSpec, apply_result
from quanteval.models import adapter_for
from quanteval.session import Session
from quanteval.variant import Run

log = logging.getLogger(__name__)


def quantize(run: Run, ctx: TaskContext) -> QuantResult:
    """The variant's quantisation result: from the on-disk cache, else computed once (under a lock) and cached.

    The cache key is the run's settings without the task's (``Variant.quant_key``): every task reuses one
    result. The quanteval version is in the key, the git commit is not: a commit that changes a method
    bumps the version.
    """
    variant = run.variant

    def compute() -> QuantResult:
        method = METHODS[variant.method.name]
        extra = {}
        if variant.method.name == "mixed":  # its sensitivity tables first (found by key, run when missing)
            extra["rows_by_bits"] = sensitivity_rows(run, ctx.session)
            ctx.loaded = ctx.session.model(variant)  # the tables' runs leave the baseline weights in place
        model = ctx.loaded.model
        adapter = adapter_for(model)
        calib = None
        if method.calibration == "inputs" and getattr(variant.method, "base", None) != "rtn":
            calib = ctx.session.calibration(variant, ctx.loaded, ctx.data_root, adapter)
        elif method.calibration == "ids":
            calib = CalibrationIds(ctx.session.calibration_ids(variant, ctx.loaded, ctx.data_root),
                                   ctx.loaded.tokenizer)
        spec = QuantSpec(variant.bits, variant.group_size, variant.sym, variant.quantize_embeddings)
        torch.manual_seed(variant.seed)
        result = method.compute(model, adapter, spec, variant.method, calib, **extra)
        result.info["from_cache"] = False
        return result

    def load(path: Path) -> QuantResult:
        log.info("reusing cached %s result %s", variant.method.name, path.name)
        result = QuantResult.load(path)
        result.info = {**result.info, "from_cache": True}
        return result

    if not METHODS[variant.method.name].cached:  # read from a file (method=artifact): kept in memory only
        return ctx.session.kept(variant.quant_key, compute)
    return ctx.cached(run.quant_path, compute, save=lambda path, result: result.save(path), load=load)


def sensitivity_runs(run: Run) -> list[Run]:
    """The ``task=sensitivity`` runs a ``method=mixed`` variant reads: its base method at each of its
    choices, with the run's model, group size and symmetry (the base's default knobs, no KV quantisation,
    WikiText-2 validation windows of the preset's length)."""
    from quanteval.config import MIXED_BASES, SensitivityConfig

    m = run.cfg.method
    base = MIXED_BASES[m.base]()
    task = SensitivityConfig(seq_len=run.cfg.preset.seq_len)  # the preset's window length (512 by default)
    return [Run.of(dataclasses.replace(run.cfg, method=base, bits=b, task=task, kv_bits=16,
                                       use_preset_grid=False, rerun=False))
            for b in sorted(m.choices)]


def sensitivity_rows(run: Run, session: Session) -> dict[int, list[dict]]:
    """{bits: the sensitivity table's rows} for ``run``'s mixed variant, computing the missing tables."""
    from quanteval.evaluate.generative import read_items

    out = {}
    for table in sensitivity_runs(run):
        rec = run_one(table, session)
        if rec.get("status") != "ok":
            raise RuntimeError(f"method=mixed: its sensitivity table {table.path.name} failed: {rec.get('error')}")
        out[table.cfg.bits] = read_items(table.items_path)
    return out


def _versions() -> dict:
    import transformers

    return {"quanteval": quanteval.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def gate_run(run: Run, task: Task) -> Run | None:
    """The run whose result the collapse gate reads before ``run`` (its variant's WikiText-2 run), or None."""
    if not task.generative or run.variant.is_baseline or run.cfg.force_generate:
        return None
    return run.with_task(WikiText2Config())


def collapse_reason(run: Run, gate: Run | None) -> str | None:
    """Why this run's generation is skipped (its variant collapsed on WikiText-2), or None.

    Reads the finished WikiText-2 run; a failed or missing one gates nothing."""
    if gate is None or not results.completed(gate.path):
        return None
    rec = results.read_run(gate.path)
    kl = (rec.get("metrics") or {}).get("kl_mean") if rec.get("status") == "ok" else None
    if kl is None or kl <= run.cfg.collapse_kl:
        return None
    return (f"collapsed on language-model fidelity: WikiText-2 mean KL {kl:.3g} > collapse_kl={run.cfg.collapse_kl:g} "
            f"({gate.path.name}); generation skipped, force_generate=true runs it")


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


def run_job(cfg: RunConfig, session: Session) -> dict:
    """Run (or skip, when done) one job; returns its run record.

    Jobs of parallel sweeps (a SLURM array, two sweeps on one results_dir) share the store: each run
    is computed under its own file lock, and a job that finds the run finished by another reads it.
    The OS releases the lock when its holder dies (``kill -9`` included), so a killed job's lock is
    never stale; its half-written files are temporary files that nothing reads.
    """
    from quanteval import threads

    threads.configure()  # this process's share of the cores, now (parallel local jobs share them)
    allocator.configure()  # QUANTEVAL_MMAP_THRESHOLD: large freed blocks go back to the system (less memory, slower)
    run = Run.of(cfg)
    gate = gate_run(run, task_for(cfg.task))
    if gate is not None and not results.completed(gate.path):
        run_one(gate, session)  # the collapse gate reads it: run it first
    return run_one(run, session)


def run_one(run: Run, session: Session) -> dict:
    """Run (or skip, when done) one run, with no dependencies run first; returns its run record."""
    from filelock import FileLock

    path = run.path
    if run.key in session.done and path.exists():  # reached again (e.g. the baseline under each bits value)
        return results.read_run(path)
    done = _finished(run)
    if done:
        log.info("done already, skipping: %s", path.name)
        return done
    skip = run.preset_skip()
    if skip:
        log.info("%s: %s", run.variant.label, skip)
        return {"status": "skipped", "reason": skip}
    run.lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run.lock_path))
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        log.info("%s is being computed by another job: waiting for it", path.name)
        lock.acquire()
    try:
        done = _finished(run)  # another job may have finished it while this one waited
        if done:
            session.done.add(run.key)
            return done
        with _RunLog(run.log_path):
            log.info("run %s: %s %s (key %s)", path.name, run.task, run.variant.label, run.key[:12])
            return _compute(run, session)
    finally:
        lock.release()
        allocator.trim()  # the run's freed memory back to the system, not carried into the next run


def siblings(run: Run, session: Session) -> list[Run]:
    """The other generative runs of ``run``'s variant in the session's grid that are still to compute
    (not finished, not left out by the preset), in the grid's order: their answers can share this run's
    generation batch. Empty when the jobs do not run in this process (the session has no grid)."""
    out, seen = [], {run.key}
    settings = run.variant.settings()
    for cfg in session.grid:
        if not task_for(cfg.task).generative:
            continue
        other = Run.of(dataclasses.replace(cfg, rerun=run.cfg.rerun))
        if other.key in seen or other.variant.settings() != settings:
            continue
        seen.add(other.key)
        if other.key in session.done or other.preset_skip() is not None or _finished(other) is not None:
            continue
        out.append(other)
    return out


def _finished(run: Run) -> dict | None:
    """The run record at ``run.path`` when it needs no recomputing (not ``rerun``; a collapsed run is
    recomputed under ``force_generate``), else None."""
    if run.cfg.rerun or not results.completed(run.path):
        return None
    done = results.read_run(run.path)
    return None if done["status"] == "collapsed" and run.cfg.force_generate else done


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _compute(run: Run, session: Session) -> dict:
    from quanteval.packed import model_bytes  # packed codes count as packed

    cfg, variant = run.cfg, run.variant
    task = task_for(cfg.task)
    base_record = {
        "run_key": run.key, "sweep_name": cfg.sweep_name, "task": run.task,
        "variant": variant.info(), "config": dataclasses.asdict(cfg), "settings": run.settings,
    }
    meta = task.task_meta()
    if meta is not None:
        base_record["task_meta"] = meta
    timings: dict[str, float] = {}
    scored: TaskResult | None = None
    try:
        collapsed = collapse_reason(run, gate_run(run, task))
        if collapsed:
            log.info("%s %s: %s", run.task, variant.label, collapsed)
            record = {**base_record, "status": "collapsed", "reason": collapsed, "metrics": {},
                      "model": {"name": cfg.model.name}, "created": _now()}
            results.write_run(run.path, record)
            session.done.add(run.key)
            return record
        t0 = time.perf_counter()
        keep = kept_weights(run, task, session)
        loaded = session.model(variant, keep=keep)
        timings["load_s"] = time.perf_counter() - t0
        model = loaded.model
        device = next(model.parameters()).device
        ctx = TaskContext(run, loaded, resolve_data_dir(cfg.data_dir), session)
        if task.generative:
            ctx.siblings = [TaskContext(r, loaded, ctx.data_root, session) for r in siblings(run, session)]
        t0 = time.perf_counter()
        task.baseline(ctx)  # computed once, cached on disk; needs the baseline weights
        timings["baseline_s"] = time.perf_counter() - t0
        param_count = sum(p.numel() for p in model.parameters())
        compressed, quant_info = compression(param_count, {}), {}
        if keep is not None:  # the weights the variant's previous job applied, as they are
            kept_record = session.applied_record()
            compressed, quant_info = kept_record["compression"], {**kept_record["quantization"], "from_cache": True,
                                                                  "weights": "kept from the previous job"}
        elif variant.quantizes:
            t0 = time.perf_counter()
            result = quantize(run, ctx)
            session.modified(swapped=variant.runtime == "packed" or result.swaps_modules)
            if not getattr(task, "applies_result", True):  # the task applies it itself (task=sensitivity):
                ctx.result = result  # it gets the baseline weights back (computing GPTQ wrote into them)
                ctx.loaded = loaded = session.model(variant)
                model = loaded.model
            elif variant.runtime == "packed":
                from quanteval.packed import pack_model

                pack_model(model, result, backend=variant.kernel)
            else:
                apply_result(model, result)
            compressed, quant_info = compression(param_count, result.layers), result.info
            if variant.runtime == "fakequant" and not result.swaps_modules and getattr(task, "applies_result", True):
                session.applied(weights_key(variant), {"compression": compressed, "quantization": quant_info})
            timings["quantize_s"] = time.perf_counter() - t0
            # the model holds what scoring needs (or ctx.result, for a task that applies it itself): the
            # result's codes and scales (0.1-0.2 GB for SmolLM2) are not kept through the generation batch
            del result
        if variant.kv.quantizes:  # the cache, after the weights (calibration and the baseline saw neither)
            from quanteval.kvcache import install

            install(model, variant.kv, adapter_for(model))
        t0 = time.perf_counter()
        scored = task.score(ctx)
        timings["eval_s"] = time.perf_counter() - t0
        gen = scored.generation
        if gen is not None:  # a shared generation batch: each task books its share of it, by tokens
            booked = gen["batch_s"] if gen["generated_by"] == run.task else 0.0
            timings["eval_s"] += gen["share_s"] - booked
            timings["generate_share_s"] = gen["share_s"]
        extra = ({k: getattr(scored, k) for k in ("breakdown", "primary_metric", "sandbox")}
                 if scored.primary_metric is not None else {})  # generative tasks: all three, as in 0.2.0
        if scored.generation is not None:
            extra["generation"] = scored.generation
        if scored.sandbox == "none":
            extra["unsafe"] = "generated code ran without the sandbox (sandbox=none)"
        record = {
            **base_record,
            "status": "ok",
            "model": {"name": cfg.model.name, "provenance": _provenance_line(loaded.provenance),
                      **loaded.provenance},
            "metrics": scored.metrics,
            "per_window": scored.per_window,
            **extra,
            "compression": compressed,
            "quantization": quant_info,
            "timings": timings,
            "peak_memory_mb": _peak_memory_mb(device),
            "memory": {"runtime": variant.runtime, "resident_bytes": model_bytes(model)},
            "kv_cache": kv_cache_record(model, variant.kv, run, scored),
            "versions": _versions(),
            "device": str(device),
            "created": _now(),
        }
    except Exception as e:  # noqa: BLE001 - recorded as a failed run, and the sweep goes on
        session.forget_applied()  # the next job starts from the baseline weights
        line = f"{type(e).__name__}: {e}".splitlines()[0]
        log.error("run failed (%s): %s", variant.label, line)
        log.debug("%s", traceback.format_exc())
        record = {**base_record, "status": "failed", "error": line, "timings": timings,
                  "model": {"name": cfg.model.name}, "created": _now()}
        scored = None
    if scored is not None and scored.items is not None:  # the items first: an ok run file always has them
        from quanteval.evaluate.generative import write_items

        write_items(run.items_path, scored.items)
        record["items_file"] = run.items_path.name
    results.write_run(run.path, record)
    session.done.add(run.key)
    if record["status"] == "ok":
        log.info("%s %s: %s", run.task, variant.label, _summary(record["metrics"]))
    return record


def weights_key(variant) -> str:
    """What identifies a fake-quant variant's weights in memory: its quantisation result's key (a KV-cache
    variant of the same weights shares it; the cache is installed per job)."""
    return f"{variant.quant_key}:{variant.runtime}"


def kept_weights(run: Run, task: Task, session: Session) -> str | None:
    """The key of the weights ``run`` can be scored on as the model holds them (``weights_key``), or None.

    A variant's jobs run one after another in a process (Hydra's basic launcher), and the first one applies
    its result in place (fake-quant). The next job needs the baseline weights only to compute a missing
    baseline cache; when its task's caches are all present (``Task.cache_paths``), it scores the weights
    in memory instead of restoring the baseline and applying the same result again (about 0.9 s a job
    on SmolLM2: the restore, the cached result read, the apply). Never with ``rerun`` (the baseline
    caches are recomputed) or for a task that applies the result itself (``task=sensitivity``)."""
    variant = run.variant
    if not variant.quantizes or variant.runtime != "fakequant" or run.cfg.rerun:
        return None
    key = weights_key(variant)
    if not getattr(task, "applies_result", True) or not session.holds(key):
        return None
    return key if baseline_cached(task, TaskContext(run, None, resolve_data_dir(run.cfg.data_dir))) else None


def kv_cache_record(model, spec, run: Run, scored: TaskResult) -> dict:
    """The KV cache's packed size (``quanteval.kvsize``): bytes per token and at the longest context this
    run evaluated (its items' ``length`` tags, else its windows' length; None for short tasks)."""
    from quanteval import kvsize
    from quanteval.kvcache import key_elements

    elements = key_elements(model)
    lengths = [(it.get("tags") or {}).get("length") for it in (scored.items or []) if isinstance(it, dict)]
    lengths = [int(x) for x in lengths if isinstance(x, (int, float))]
    seq = (run.settings.get("preset") or {}).get("seq_len")
    context = max(lengths) if lengths else int(seq) if isinstance(seq, int) else None
    out = {"bits": spec.bits, "group_size": spec.group_size if spec.quantizes else None,
           "key_elements_per_token": elements,
           "bytes_per_token": kvsize.bytes_per_token(elements, spec), "context": context}
    if context:
        out["bytes_at_context"] = kvsize.kv_bytes(elements, spec, context)
        out["residual_tokens"] = kvsize.residual_tokens(spec, context)
    return out


def _provenance_line(p: dict) -> str:
    return "; ".join(str(p[k]) for k in ("source", "note") if p.get(k)) + f" (dtype {p.get('dtype')})"


def _summary(m: dict) -> str:
    keys = [k for k in ("ppl", "kl_mean", "same_top1", "primary", "tf_kl_mean", "flip_rate") if k in m]
    return " ".join(f"{k}={m[k]:.4g}" for k in keys)
