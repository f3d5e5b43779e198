"""``quanteval plan=true``: what a sweep will do, what is already done, and how long the rest should take.

Nothing is loaded or computed: each job's run file, quantisation cache and
baseline caches are looked up by their keys (the same functions the sweep
uses), and the time of each phase is estimated from the timings recorded in
earlier run files under the same ``results_dir`` (any sweep): model load,
baseline (only where its cache is missing), quantisation (only where its
cache is missing) and evaluation, per task and method. A phase with no
recorded timing is shown as unknown, never guessed.

    $ quanteval plan=true bits=4,3
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from quanteval import results
from quanteval.config import RunConfig


def recorded_timings(results_dir: Path) -> dict:
    """Timings of earlier ok runs: {"load": [...], "baseline": {task: [...]}, "quantize": {method: [...]},
    "eval": {(task, method): [...]}} (seconds; quantisations loaded from cache and baselines read from
    cache are left out)."""
    t: dict = {"load": [], "baseline": defaultdict(list), "quantize": defaultdict(list), "eval": defaultdict(list)}
    if not Path(results_dir).exists():
        return t
    for f in results.run_files(results_dir):
        try:
            rec = results.read_run(f)
        except ValueError:
            continue
        tm, task, method = rec.get("timings") or {}, rec.get("task"), (rec.get("variant") or {}).get("method")
        if rec.get("status") != "ok":
            continue
        if tm.get("load_s", 0) > 1:  # a job that loaded the model (later jobs of a process reuse it)
            t["load"].append(tm["load_s"])
        if tm.get("baseline_s", 0) > 1:  # a job that computed the baseline (others read the cache)
            t["baseline"][task].append(tm["baseline_s"])
        if "quantize_s" in tm and not (rec.get("quantization") or {}).get("from_cache"):
            t["quantize"][method].append(tm["quantize_s"])
        if "eval_s" in tm:
            t["eval"][(task, method)].append(tm["eval_s"])
    return t


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def job_state(cfg: RunConfig) -> dict:
    """Where one job stands: run done?, quantisation cached?, baseline cached? (no model is loaded)."""
    from quanteval.data import resolve_data_dir
    from quanteval.evaluate import TaskContext, baseline_cached, task_for
    from quanteval.variant import Run

    run = Run.of(cfg)
    if run.preset_skip():
        status = "not in grid"
    elif results.completed(run.path):
        status = results.read_run(run.path)["status"]
    else:
        status = "to do"
    ctx = TaskContext(run, None, resolve_data_dir(cfg.data_dir))
    baseline = baseline_cached(task_for(cfg.task), ctx)
    return {"run": run, "key": run.key, "path": run.path, "status": status, "quant_path": run.quant_path,
            "quant_cached": None if run.quant_path is None else run.quant_path.exists(), "baseline_cached": baseline}


def plan(cfgs: list[RunConfig]) -> str:
    """The plan of a sweep as text (one line per distinct run, then the estimate per phase)."""
    seen, rows = set(), []
    for cfg in cfgs:
        st = job_state(cfg)
        if st["key"] in seen or st["status"] == "not in grid":
            continue
        seen.add(st["key"])
        rows.append((cfg, st))
    timings = recorded_timings(Path(cfgs[0].results_dir).resolve()) if cfgs else {}
    todo = [(c, s) for c, s in rows if s["status"] in ("to do", "failed")]
    load = _median(timings.get("load", []))
    unknown: set[str] = set()
    base_done, quant_done, total = set(), set(), defaultdict(float)
    for cfg, st in todo:
        task, method = cfg.task.name, cfg.method.name
        if not st["baseline_cached"] and task not in base_done:
            base_done.add(task)
            v = _median(timings["baseline"].get(task, []))
            total["baseline"] += v or 0
            unknown.update({"baseline"} if v is None else set())
        if st["quant_cached"] is False and st["quant_path"] not in quant_done:  # one per variant, not per task
            quant_done.add(st["quant_path"])
            v = _median(timings["quantize"].get(method, []))
            total["quantize"] += v or 0
            unknown.update({"quantize"} if v is None else set())
        v = _median(timings["eval"].get((task, method), [])) or _median(
            [x for (t, _), xs in timings["eval"].items() if t == task for x in xs])
        total["eval"] += v or 0
        unknown.update({"eval"} if v is None else set())
    lines = [f"{'task':<12} {'variant':<22} {'status':<10} {'quant cache':<12} {'baseline cache':<14} run file"]
    for cfg, st in rows:
        q = "-" if st["quant_cached"] is None else ("cached" if st["quant_cached"] else "to compute")
        b = "cached" if st["baseline_cached"] else "to compute"
        lines.append(f"{cfg.task.name:<12} {st['run'].variant.label:<22} {st['status']:<10} {q:<12} {b:<14} "
                     f"{st['path'].name}")
    n_done = sum(s["status"] in ("ok", "collapsed") for _, s in rows)
    lines.append(f"\n{len(rows)} distinct runs: {n_done} done, {len(todo)} to run.")
    if todo:
        lines.append("Estimated time (from timings recorded under results_dir):")
        lines.append(f"  load model   {_fmt(load)}")
        for phase in ("baseline", "quantize", "eval"):
            lines.append(f"  {phase:<12} {_fmt(total[phase])}" + ("  (+ phases with no recorded timing)"
                                                                    if phase in unknown else ""))
        known = (load or 0) + sum(total.values())
        nothing = load is None and {"eval"} <= unknown
        lines.append(f"  total        {_fmt(None if nothing else known)}" + ("  at least: some phases have no recorded timing; "
                                                         "run preset=smoke first to record some" if unknown or load is None
                                                         else ""))
    return "\n".join(lines)


def _fmt(s: float | None) -> str:
    if s is None:
        return "unknown"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"
