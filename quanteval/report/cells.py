"""The verdict matrix: one cell per (model, task row, variant), with a paired bootstrap CI and a label.

Rows (per model)
    ``wikitext2``: perplexity (quality: ppl_base / ppl_q), mean KL and same-top-token rate (fidelity);
    each generative task: its primary metric (quality) and its teacher-forced KL (fidelity);
    ``lmeval`` tasks: their first metric (quality).

Each cell carries the ``metric`` it reads from its run's ``metrics`` (``ppl``, ``kl_mean``, ``same_top1``,
``tf_kl_mean``, or the task's primary metric), so nothing parses row labels back.

Kinds of work (for the recommendation) come from each task: the run record's ``task_meta``, else the
task's YAML (``quanteval_tasks.task_table``; the run files 0.2.0 wrote hold none); WikiText-2 is the
one built-in task (language modelling), and lm-eval tasks have no kind unless their record declares one.

Quality cells
    retained = score_q / score_base, or (score_q - chance) / (score_base - chance) where the task has a
    chance level (``Thresholds.chance``). Labels: ``survives`` when retained >= ``survives`` (0.97),
    ``collapses`` below ``collapses`` (0.5), ``degrades`` between. When the baseline's score is within
    ``floor`` (0.05) of chance, a ratio means nothing: the cell says "baseline at floor", shows the
    absolute score and flips, and takes its label from the task's teacher-forced KL instead.

Fidelity cells
    Mean KL (lower is better): survives below ``kl_survives`` (0.1), collapses at or above
    ``kl_collapses`` (1.0). Same-top-token rate: survives at or above ``top1_survives`` (0.9),
    collapses below ``top1_collapses`` (0.5).

Uncertainty
    A 95% paired bootstrap: items (or WikiText-2 windows, never single tokens) are resampled with
    replacement, the same indices for the variant and the baseline, ``n_boot`` times (seeded). When the
    interval straddles a threshold the label gets a "?" ("survives?": the point estimate survives but
    the interval reaches below the threshold) rather than pretending.

Runs are grouped by their evaluation settings (task, limits, token caps): runs of one task made with
different settings are never averaged or compared; each group is its own row, with a warning.

Written here rather than taken from a library: the statistics are a few lines of numpy, and what
matters is which unit is resampled and how the thresholds read, which no library decides for us.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from quanteval_tasks import KINDS_OF_WORK, task_table

from quanteval.results import RunRecord, TaskMeta, primary_value, read_items
from quanteval.thresholds import Thresholds

log = logging.getLogger(__name__)

LABELS = ("survives", "survives?", "degrades?", "degrades", "collapses?", "collapses")
WIKITEXT2 = TaskMeta(kind="language modelling", licence="WikiText-2, CC BY-SA 3.0.")  # the one built-in task
FIDELITY_TASKS = ("wikitext2", "wikitext2_long")  # scored over windows against the baseline (per-window CIs)


@dataclass
class Cell:
    model: str
    row: str  # e.g. "gsm8k: exact_match,flexible-extract", "wikitext2: mean KL"
    metric: str  # the metrics key the row reads: "ppl", "kl_mean", "same_top1", "tf_kl_mean", a primary metric
    task: str
    kind: str  # "quality" | "kl" | "top1"
    decides: bool  # the row that decides this task's verdict (for the recommendation)
    label: str  # variant label, e.g. "gptq w4 g64"
    method: str
    bits: Optional[int]
    effective_bits: Optional[float]
    model_bytes: Optional[int]
    run_key: str
    value: Optional[float] = None  # the variant's score / KL / rate
    base_value: Optional[float] = None
    retained: Optional[float] = None  # quality rows
    ci: Optional[tuple[float, float]] = None  # of retained (quality) or of value (fidelity)
    value_ci: Optional[tuple[float, float]] = None  # of the variant's absolute score (charts)
    verdict: str = "unknown"  # one of LABELS, or "baseline", "no baseline", "failed", "unknown"
    note: str = ""  # "baseline at floor", a collapse reason, an error
    flips: Optional[dict] = None  # {"lost", "gained", "rate", "mcnemar_p"}
    fidelity: Optional[float] = None  # teacher-forced KL beside a quality cell
    group: str = ""  # evaluation-settings signature
    in_domain: str = ""  # the calibration set, when the variant was calibrated on this task's own domain
    # the KV cache's packed bytes at ``kv_context`` tokens (16-bit for a weight-only variant): a variant's
    # size is its weights plus this, so cache-quantised and weight-quantised variants compare fairly
    kv_bytes: Optional[int] = None
    kv_context: Optional[int] = None
    kv_bits: Optional[int] = None  # a quantised KV cache's bits (None: 16-bit, not quantised)

    @property
    def size_bytes(self) -> Optional[int]:
        """Weights plus the KV cache at ``kv_context`` (weights only when the runs carry no KV figures)."""
        if self.model_bytes is None:
            return None
        return self.model_bytes + (self.kv_bytes or 0)

    def to_json(self) -> dict:
        """The cell as verdicts.json holds it; ``metric`` is left out (the row names it; 0.2.0's shape)."""
        d = asdict(self)
        del d["metric"]
        d["ci"] = list(self.ci) if self.ci else None
        d["value_ci"] = list(self.value_ci) if self.value_ci else None
        return d


def label_high(value: float, ci: Optional[tuple[float, float]], good: float, bad: float) -> str:
    """Label for a higher-is-better value: survives at/above ``good``, collapses below ``bad``."""
    point = "survives" if value >= good else "collapses" if value < bad else "degrades"
    if ci is None:
        return point
    lo, hi = ci
    if point == "survives":
        return "survives" if lo >= good else "survives?"
    if point == "collapses":
        return "collapses" if hi < bad else "collapses?"
    return "degrades?" if (hi >= good or lo < bad) else "degrades"


def label_low(value: float, ci: Optional[tuple[float, float]], good: float, bad: float) -> str:
    """Label for a lower-is-better value (KL): survives below ``good``, collapses at/above ``bad``."""
    point = "survives" if value < good else "collapses" if value >= bad else "degrades"
    if ci is None:
        return point
    lo, hi = ci
    if point == "survives":
        return "survives" if hi < good else "survives?"
    if point == "collapses":
        return "collapses" if lo >= bad else "collapses?"
    return "degrades?" if (lo < good or hi >= bad) else "degrades"


def _bootstrap(n: int, stat, n_boot: int, seed: int = 0) -> Optional[tuple[float, float]]:
    """Percentile 95% CI of ``stat(idx)`` over ``n_boot`` resamples of range(n) (None when n < 2)."""
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    draws = [stat(rng.integers(0, n, n)) for _ in range(n_boot)]
    draws = [d for d in draws if d is not None and math.isfinite(d)]
    if not draws:
        return None
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def retained_ratio(q: np.ndarray, b: np.ndarray, chance: float) -> Optional[float]:
    denom = b.mean() - chance
    return None if denom <= 0 else float((q.mean() - chance) / denom)


def _signature(rec: RunRecord) -> str:
    """Evaluation settings that must match for runs to be compared (task config + preset part)."""
    s = rec.settings
    task = dict(s.get("task") or {})
    return json.dumps({"task": task, "preset": s.get("preset"), "model": s.get("model")}, sort_keys=True, default=str)


@dataclass
class RunData:
    rec: RunRecord
    items: Optional[list[dict]]  # per-item records (generative / lmeval), None otherwise
    path: Optional[Path] = None  # the run file


def load_items(run_file: Path, rec: RunRecord) -> Optional[list[dict]]:
    """The per-item records beside ``run_file``; None when the run has none or the file is unreadable (a warning)."""
    if not rec.items_file:
        return None
    try:
        return read_items(Path(run_file).with_name(rec.items_file))
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable items file (%s)", run_file, e)
        return None


def task_meta(rec: RunRecord) -> TaskMeta:
    """What a run's task declares: the record's ``task_meta``, else the built-in WikiText-2's, else the task's YAML.

    >>> task_meta(RunRecord(run_key="k", status="ok", task="gsm8k")).kind
    'math'
    >>> task_meta(RunRecord(run_key="k", status="ok", task="hellaswag")).kind is None  # lm-eval: none declared
    True
    """
    if rec.task_meta is not None:
        return rec.task_meta
    if rec.task in FIDELITY_TASKS:
        return WIKITEXT2
    info = task_table().get(rec.task)
    return TaskMeta.from_dict(info.to_json()) if info else TaskMeta()


def task_metas(runs: list[RunData]) -> dict[str, TaskMeta]:
    """Per task name: the first ``task_meta`` its run records hold, else ``task_meta``'s fallback."""
    out: dict[str, TaskMeta] = {}
    for r in runs:
        if r.rec.task_meta is not None:
            out.setdefault(r.rec.task or "?", r.rec.task_meta)
    for r in runs:
        if (r.rec.task or "?") not in out:
            out[r.rec.task or "?"] = task_meta(r.rec)
    return out


def kinds_of_work(metas: dict[str, TaskMeta]) -> dict[str, list[str]]:
    """Kind of work -> its tasks (sorted), kinds in ``KINDS_OF_WORK`` order; tasks with no kind, and
    sensitivity tables (a table, not work a variant is scored on), are left out.

    >>> kinds_of_work({"gsm8k": TaskMeta(kind="math"), "wikitext2": WIKITEXT2, "hellaswag": TaskMeta(),
    ...                "sensitivity": TaskMeta(kind="sensitivity")})
    {'math': ['gsm8k'], 'language modelling': ['wikitext2']}
    """
    kinds: dict[str, list[str]] = {}
    for task in sorted(metas):
        if metas[task].kind and metas[task].kind != "sensitivity":
            kinds.setdefault(metas[task].kind, []).append(task)
    order = {k: i for i, k in enumerate(KINDS_OF_WORK)}
    return dict(sorted(kinds.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def is_table_run(rec: RunRecord) -> bool:
    """Whether a run is a table of its own (``task=sensitivity``), not a score with a verdict."""
    return (rec.task_meta is not None and rec.task_meta.kind == "sensitivity") or rec.task == "sensitivity"


def build_cells(runs: list[RunData], t: Thresholds) -> tuple[list[Cell], list[str]]:
    """Every cell of every model's matrix, and warnings (e.g. mixed evaluation settings)."""
    warnings: list[str] = []
    groups: dict[tuple[str, str, str], list[RunData]] = {}
    for r in runs:
        if is_table_run(r.rec):  # a sensitivity table is not scored against the baseline: its own chart
            continue
        groups.setdefault((r.rec.model.name or "?", r.rec.task or "?", _signature(r.rec)), []).append(r)
    per_task: dict[tuple[str, str], list[str]] = {}
    for model, task, sig in groups:
        per_task.setdefault((model, task), []).append(sig)
    sizes = _sizes(runs)
    cells: list[Cell] = []
    for (model, task, sig), members in sorted(groups.items(), key=lambda kv: kv[0][:2]):
        # the settings most runs share keep the plain row name; the others get their own, numbered rows
        sigs = sorted(per_task[(model, task)], key=lambda g: (-len(groups[(model, task, g)]), g))
        suffix = ""
        if len(sigs) > 1:
            i = sigs.index(sig)
            suffix = f" [other settings {i}]" if i else ""
            msg = (f"{model} / {task}: runs with {len(sigs)} different evaluation settings (limits, token caps "
                   f"or task options); they are shown as separate rows and never averaged")
            if msg not in warnings:
                warnings.append(msg)
        cells.extend(_task_cells(model, task, members, t, sig, suffix))
    for c in cells:  # runs skipped as collapsed carry no compression figures: take their variant's
        if c.effective_bits is None and (c.model, c.label) in sizes:
            c.effective_bits, c.model_bytes = sizes[(c.model, c.label)]
    kv = _kv_sizes(runs)
    for c in cells:
        c.kv_bytes, c.kv_context = kv.get((c.model, c.label), (None, None))
    return cells, warnings


def kv_context(runs: list[RunData], model: str) -> int:
    """The context a model's variants are sized at: the longest any of its runs evaluated, else 4K."""
    from quanteval.kvsize import DEFAULT_CONTEXT

    lengths = [r.rec.kv_cache.get("context") for r in runs if (r.rec.model.name or "?") == model]
    lengths = [x for x in lengths if isinstance(x, int) and x > 0]
    return max(lengths) if lengths else DEFAULT_CONTEXT


def _kv_sizes(runs: list[RunData]) -> dict[tuple[str, str], tuple[int, int]]:
    """(model, label) -> (packed KV bytes at the model's context, that context), from the runs' ``kv_cache``."""
    from quanteval.kvsize import KVSpec, kv_bytes

    out, contexts = {}, {}
    for r in runs:
        kc, model = r.rec.kv_cache, r.rec.model.name or "?"
        elements = kc.get("key_elements_per_token")
        if not elements or kc.get("bits") is None:
            continue
        if model not in contexts:
            contexts[model] = kv_context(runs, model)
        spec = KVSpec(int(kc["bits"]), int(kc.get("group_size") or KVSpec.group_size))
        out[(model, r.rec.variant.label or "?")] = (kv_bytes(int(elements), spec, contexts[model]), contexts[model])
    return out


def _sizes(runs: list[RunData]) -> dict[tuple[str, str], tuple[float, int]]:
    out = {}
    for r in runs:
        c = r.rec.compression
        if c.effective_bits is not None:
            out[(r.rec.model.name or "?", r.rec.variant.label or "?")] = (c.effective_bits, c.model_bytes)
    return out


def _variant(rec: RunRecord) -> dict:
    v, c = rec.variant, rec.compression
    return {"label": v.label or "?", "method": v.method or "?", "bits": v.bits,
            "effective_bits": c.effective_bits, "model_bytes": c.model_bytes, "run_key": rec.run_key,
            "kv_bits": (v.kv or {}).get("bits")}


def _task_cells(model: str, task: str, members: list[RunData], t: Thresholds, sig: str, suffix: str) -> list[Cell]:
    base = next((r for r in members if r.rec.variant.method == "none" and r.rec.status == "ok"), None)
    cells = []
    for r in members:
        for row, metric, kind, decides in _rows(task, r.rec, base.rec if base else None):
            cell = Cell(model=model, row=row + suffix, metric=metric, task=task, kind=kind, decides=decides,
                        group=sig, **_variant(r.rec))
            _fill(cell, r, base, t)
            cell.in_domain = in_domain_calibration(r.rec)
            cells.append(cell)
        tag = task_meta(r.rec).rows_by
        primary = r.rec.primary_metric
        if tag and primary and r.items and r.rec.status == "ok":  # a verdict row per tag value (needle: length)
            for value in sorted({str((it.get("tags") or {}).get(tag)) for it in r.items}, key=_number_first):
                sub, sub_base = subset(r, tag, value, primary), (subset(base, tag, value, primary) if base else None)
                cell = Cell(model=model, row=f"{task}: {primary} at {tag}={value}" + suffix, metric=primary,
                            task=task, kind="quality", decides=False, group=sig, **_variant(r.rec))
                _fill(cell, sub, sub_base, t)
                cells.append(cell)
    return cells


def _number_first(v: str):
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


def subset(r: RunData, tag: str, value: str, primary: str) -> RunData:
    """``r`` restricted to its items whose ``tag`` is ``value``: the primary mean, teacher-forced KL and flips
    recomputed over them (a per-length row of needle)."""
    from dataclasses import replace

    items = [it for it in (r.items or []) if str((it.get("tags") or {}).get(tag)) == value]
    m: dict = {"n_items": len(items)}
    if items:
        m[primary] = float(np.mean([primary_value(it, primary) for it in items]))
        tf = [it["tf"] for it in items if it.get("tf")]
        if tf:
            m["tf_kl_mean"] = sum(x["kl_mean"] * x["n_tokens"] for x in tf) / max(sum(x["n_tokens"] for x in tf), 1)
        if "flips_lost" in r.rec.metrics:
            m["flips_lost"] = sum(it.get("flip") == "lost" for it in items)
            m["flips_gained"] = sum(it.get("flip") == "gained" for it in items)
            m["flip_rate"] = (m["flips_lost"] + m["flips_gained"]) / len(items)
    return RunData(rec=replace(r.rec, metrics=m), items=items, path=r.path)


def in_domain_calibration(rec: RunRecord) -> str:
    """The calibration set a variant saw that is its task's own domain ("" when none): calibration.dataset
    gsm8k, or the default mix (half GSM8K train), is in-domain for the math tasks, whose scores then
    flatter a calibrated method against RTN."""
    calib = rec.settings.get("calibration") or {}
    if calib.get("path"):
        return ""
    seen = {"mix": ("gsm8k",), "gsm8k": ("gsm8k",)}.get(calib.get("dataset"), ())
    domain = set(task_meta(rec).calibration_domain)
    return ", ".join(s for s in seen if s in domain)


def _rows(task: str, rec: RunRecord, base: Optional[RunRecord]) -> list[tuple[str, str, str, bool]]:
    """(row name, metric, kind, decides) for a run of ``task``."""
    if task == "wikitext2":
        return [("wikitext2: perplexity", "ppl", "quality", False), ("wikitext2: mean KL", "kl_mean", "kl", True),
                ("wikitext2: same top-1", "same_top1", "top1", False)]
    if task in FIDELITY_TASKS:  # long windows: the whole window's KL decides; a row per position bucket shows where
        buckets = [k.split("@", 1)[1] for k in (rec.metrics or (base.metrics if base else {})) if k.startswith("kl_mean@")]
        return [(f"{task}: perplexity", "ppl", "quality", False), (f"{task}: mean KL", "kl_mean", "kl", True),
                *[(f"{task}: mean KL at {b}", f"kl_mean@{b}", "kl", False) for b in buckets]]
    primary = rec.primary_metric or (base.primary_metric if base else None)
    if primary:
        # a primary that only measures agreement with the baseline's answer (mt_bench's ROUGE-L to it) is not
        # quality: free-form answers diverge after a few tokens even at 8 bits, so teacher-forced KL decides
        agreement_only = primary.endswith("_vs_base")
        return [(f"{task}: {primary}", primary, "quality", not agreement_only),
                (f"{task}: teacher-forced KL", "tf_kl_mean", "kl", agreement_only)]
    metrics = rec.metrics or (base.metrics if base else {})
    first = next((k for k in metrics if k not in ("n_items",)), None)
    return [(f"{task}: {first}", first, "quality", True)] if first else []


def _fill(cell: Cell, r: RunData, base: Optional[RunData], t: Thresholds) -> None:
    rec = r.rec
    status = rec.status
    if status == "collapsed":
        cell.verdict, cell.note = "collapses", str(rec.reason or "collapsed")
        return
    if status != "ok":
        cell.verdict, cell.note = "failed", str(rec.error or status)
        return
    if cell.method == "none":
        cell.verdict = "baseline"
        cell.value = _value(cell, rec)
        cell.base_value = cell.value
        return
    if base is None:
        cell.verdict, cell.note = "no baseline", "no baseline run for this model and settings"
        cell.value = _value(cell, rec)
        return
    cell.value, cell.base_value = _value(cell, rec), _value(cell, base.rec)
    if cell.task in FIDELITY_TASKS:
        _fill_windows(cell, rec, base.rec, t)
    else:
        _fill_items(cell, r, base, t)


def _value(cell: Cell, rec: RunRecord) -> Optional[float]:
    v = rec.metrics.get(cell.metric)
    return None if v is None else float(v)


def _fill_windows(cell: Cell, rec: RunRecord, base: RunRecord, t: Thresholds) -> None:
    pw, bw = rec.per_window, base.per_window
    if cell.kind == "quality":  # perplexity: retained = ppl_base / ppl_q = exp(mean(nll_b - nll_q))
        q, b = np.asarray(pw.get("nll_mean") or []), np.asarray(bw.get("nll_mean") or [])
        cell.retained = (cell.base_value / cell.value) if cell.value else None
        if len(q) and len(q) == len(b):
            cell.ci = _bootstrap(len(q), lambda i: float(np.exp((b[i] - q[i]).mean())), t.n_boot)
            cell.value_ci = _bootstrap(len(q), lambda i: float(np.exp(q[i].mean())), t.n_boot)
        if cell.retained is not None:
            cell.verdict = label_high(cell.retained, cell.ci, t.survives, t.collapses)
        return
    q = np.asarray(pw.get(cell.metric) or [])
    if len(q) > 1:
        cell.ci = cell.value_ci = _bootstrap(len(q), lambda i: float(q[i].mean()), t.n_boot)
    if cell.value is None:
        return
    if cell.kind == "kl":
        cell.verdict = label_low(cell.value, cell.ci, t.kl_survives, t.kl_collapses)
    else:
        cell.verdict = label_high(cell.value, cell.ci, t.top1_survives, t.top1_collapses)


def _fill_items(cell: Cell, r: RunData, base: RunData, t: Thresholds) -> None:
    m = r.rec.metrics
    items, base_items = r.items or [], base.items or []
    by_id = {it.get("id"): it for it in base_items}
    pairs = [(it, by_id[it.get("id")]) for it in items if it.get("id") in by_id]
    tf = [it.get("tf") for it, _ in pairs if it.get("tf")]
    kl_tok = np.asarray([x["kl_mean"] * x["n_tokens"] for x in tf], dtype=float)
    n_tok = np.asarray([x["n_tokens"] for x in tf], dtype=float)
    cell.fidelity = m.get("tf_kl_mean")
    kl_ci = _bootstrap(len(tf), lambda i: float(kl_tok[i].sum() / n_tok[i].sum()), t.n_boot) if len(tf) else None
    kl_label = (label_low(cell.fidelity, kl_ci, t.kl_survives, t.kl_collapses)
                if cell.fidelity is not None else "unknown")
    if cell.kind == "kl":
        cell.ci = cell.value_ci = kl_ci
        cell.verdict = kl_label
        return
    if "flips_lost" in m:
        cell.flips = {"lost": m["flips_lost"], "gained": m["flips_gained"], "rate": m.get("flip_rate"),
                      "mcnemar_p": m.get("mcnemar_p")}
    primary = r.rec.primary_metric
    chance = float(t.chance.get(cell.task, 0.0))
    if cell.value is None or cell.base_value is None:
        return
    if primary and items:
        qa = np.asarray([primary_value(it, primary) for it in items], dtype=float)
        if np.isfinite(qa).all():
            cell.value_ci = _bootstrap(len(qa), lambda i: float(qa[i].mean()), t.n_boot)
    if cell.base_value - chance <= t.floor:
        cell.note = "baseline at floor"
        cell.verdict = kl_label
        return
    cell.retained = (cell.value - chance) / (cell.base_value - chance)
    if primary and pairs:
        q = np.asarray([primary_value(it, primary) for it, _ in pairs], dtype=float)
        b = np.asarray([primary_value(bi, primary) for _, bi in pairs], dtype=float)
        if np.isfinite(q).all() and np.isfinite(b).all():
            cell.ci = _bootstrap(len(q), lambda i: retained_ratio(q[i], b[i], chance), t.n_boot)
    cell.verdict = label_high(cell.retained, cell.ci, t.survives, t.collapses)


def recommend(cells: list[Cell], kinds: dict[str, list[str]]) -> dict[str, dict[str, dict]]:
    """Per model, per kind of work in ``kinds`` (see ``kinds_of_work``) and "all tasks": the smallest variant
    whose deciding cells all survive.

    A deciding cell is each task's primary quality row (its fidelity label when the baseline is at
    floor) and WikiText-2's mean KL. "survives" must be unqualified: its CI clears the threshold.
    """
    out: dict[str, dict[str, dict]] = {}
    for model in sorted({c.model for c in cells}):
        mc = [c for c in cells if c.model == model and c.decides]
        tasks_here = {c.task for c in mc}
        here = {k: [x for x in v if x in tasks_here] for k, v in kinds.items()}
        here = {k: v for k, v in here.items() if v}
        here["all tasks"] = sorted(tasks_here)
        variants: dict[str, list[Cell]] = {}
        for c in mc:
            if c.method != "none":
                variants.setdefault(c.label, []).append(c)
        out[model] = {}
        for kind, tasks in here.items():
            ok = []
            for label, vc in variants.items():
                rel = [c for c in vc if c.task in tasks]
                if {c.task for c in rel} == set(tasks) and all(c.verdict == "survives" for c in rel):
                    ok.append(rel[0])
            if ok:
                best = min(ok, key=lambda c: (c.size_bytes or math.inf, -(c.effective_bits or 0)))
                out[model][kind] = {"tasks": tasks, "variant": best.label, "model_bytes": best.model_bytes,
                                    "effective_bits": best.effective_bits, "run_key": best.run_key,
                                    "kv_bytes": best.kv_bytes, "kv_context": best.kv_context}
            else:
                out[model][kind] = {"tasks": tasks, "variant": None,
                                    "reason": "no quantised variant survives every task of this kind: "
                                              "keep the baseline or widen the grid"}
    return out
