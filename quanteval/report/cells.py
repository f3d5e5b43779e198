"""The verdict matrix: one cell per (model, task row, variant), with a paired bootstrap CI and a label.

Rows (per model)
    ``wikitext2``: perplexity (quality: ppl_base / ppl_q), mean KL and same-top-token rate (fidelity);
    each generative task: its primary metric (quality) and its teacher-forced KL (fidelity);
    ``lmeval`` tasks: their first metric (quality).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from quanteval.results import primary_value, run_items

log = logging.getLogger(__name__)

KINDS = {  # kinds of work -> tasks, for the recommendation
    "chat": ("ifeval", "mt_bench"),
    "summarization": ("dialogsum",),
    "math": ("gsm8k", "arith_chain"),
    "code": ("humaneval",),
    "language modelling": ("wikitext2",),
}
LABELS = ("survives", "survives?", "degrades?", "degrades", "collapses?", "collapses")


@dataclass(frozen=True)
class Thresholds:
    """Verdict thresholds (documented defaults); set in config (``report.*``) or on the CLI."""

    survives: float = 0.97  # retained quality at or above: survives
    collapses: float = 0.5  # retained quality below: collapses
    kl_survives: float = 0.1  # mean KL below: survives
    kl_collapses: float = 1.0  # mean KL at or above: collapses
    top1_survives: float = 0.9  # same-top-token rate at or above: survives
    top1_collapses: float = 0.5  # same-top-token rate below: collapses
    floor: float = 0.05  # a baseline within this of chance is "at floor"
    chance: dict = field(default_factory=dict)  # task -> chance level (default 0)
    n_boot: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.collapses < self.survives:
            raise ValueError("thresholds: need 0 < collapses < survives")
        if not 0 < self.kl_survives < self.kl_collapses:
            raise ValueError("thresholds: need 0 < kl_survives < kl_collapses")
        if not 0 < self.top1_collapses < self.top1_survives <= 1:
            raise ValueError("thresholds: need 0 < top1_collapses < top1_survives <= 1")


@dataclass
class Cell:
    model: str
    row: str  # e.g. "gsm8k: exact_match,flexible-extract", "wikitext2: mean KL"
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

    def to_json(self) -> dict:
        d = asdict(self)
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


def _signature(rec: dict) -> str:
    """Evaluation settings that must match for runs to be compared (task config + preset part)."""
    s = rec.get("settings") or {}
    task = dict(s.get("task") or {})
    return json.dumps({"task": task, "preset": s.get("preset"), "model": s.get("model")}, sort_keys=True, default=str)


@dataclass
class RunData:
    rec: dict
    items: Optional[list[dict]]  # per-item records (generative / lmeval), None otherwise
    path: Optional[Path] = None  # the run file


def load_items(run_file: Path, rec: dict) -> Optional[list[dict]]:
    try:
        return run_items(run_file, rec)
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable items file (%s)", run_file, e)
        return None


def build_cells(runs: list[RunData], t: Thresholds) -> tuple[list[Cell], list[str]]:
    """Every cell of every model's matrix, and warnings (e.g. mixed evaluation settings)."""
    warnings: list[str] = []
    groups: dict[tuple[str, str, str], list[RunData]] = {}
    for r in runs:
        rec = r.rec
        model = (rec.get("model") or {}).get("name") or "?"
        groups.setdefault((model, rec.get("task") or "?", _signature(rec)), []).append(r)
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
    return cells, warnings


def _sizes(runs: list[RunData]) -> dict[tuple[str, str], tuple[float, int]]:
    out = {}
    for r in runs:
        c, v = r.rec.get("compression") or {}, r.rec.get("variant") or {}
        if c.get("effective_bits") is not None:
            out[((r.rec.get("model") or {}).get("name") or "?", v.get("label") or "?")] = (
                c["effective_bits"], c.get("model_bytes"))
    return out


def _variant(rec: dict) -> dict:
    v, c = rec.get("variant") or {}, rec.get("compression") or {}
    return {"label": v.get("label") or "?", "method": v.get("method") or "?", "bits": v.get("bits"),
            "effective_bits": c.get("effective_bits"), "model_bytes": c.get("model_bytes"),
            "run_key": rec.get("run_key", "?")}


def _task_cells(model: str, task: str, members: list[RunData], t: Thresholds, sig: str, suffix: str) -> list[Cell]:
    base = next((r for r in members if (r.rec.get("variant") or {}).get("method") == "none"
                 and r.rec.get("status") == "ok"), None)
    cells = []
    for r in members:
        rec = r.rec
        rows = _rows(task, rec, base.rec if base else None)
        for row, kind, decides in rows:
            cell = Cell(model=model, row=row + suffix, task=task, kind=kind, decides=decides, group=sig, **_variant(rec))
            _fill(cell, r, base, t)
            cells.append(cell)
    return cells


def _rows(task: str, rec: dict, base: Optional[dict]) -> list[tuple[str, str, bool]]:
    """(row name, kind, decides) for a run of ``task``."""
    if task == "wikitext2":
        return [("wikitext2: perplexity", "quality", False), ("wikitext2: mean KL", "kl", True),
                ("wikitext2: same top-1", "top1", False)]
    primary = rec.get("primary_metric") or (base or {}).get("primary_metric")
    if primary:
        # a primary that only measures agreement with the baseline's answer (mt_bench's ROUGE-L to it) is not
        # quality: free-form answers diverge after a few tokens even at 8 bits, so teacher-forced KL decides
        agreement_only = primary.endswith("_vs_base")
        return [(f"{task}: {primary}", "quality", not agreement_only),
                (f"{task}: teacher-forced KL", "kl", agreement_only)]
    metrics = (rec.get("metrics") or (base or {}).get("metrics") or {})
    first = next((k for k in metrics if k not in ("n_items",)), None)
    return [(f"{task}: {first}", "quality", True)] if first else []


def _fill(cell: Cell, r: RunData, base: Optional[RunData], t: Thresholds) -> None:
    rec = r.rec
    status = rec.get("status")
    if status == "collapsed":
        cell.verdict, cell.note = "collapses", str(rec.get("reason") or "collapsed")
        return
    if status != "ok":
        cell.verdict, cell.note = "failed", str(rec.get("error") or status)
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
    if cell.task == "wikitext2":
        _fill_windows(cell, rec, base.rec, t)
    else:
        _fill_items(cell, r, base, t)


def _value(cell: Cell, rec: dict) -> Optional[float]:
    m = rec.get("metrics") or {}
    key = {"wikitext2: perplexity": "ppl", "wikitext2: mean KL": "kl_mean", "wikitext2: same top-1": "same_top1"}
    if cell.task == "wikitext2":
        v = m.get(key[cell.row.split(" [")[0]])
    elif cell.kind == "kl":
        v = m.get("tf_kl_mean")
    else:
        v = m.get(cell.row.split(": ", 1)[1].split(" [")[0])
    return None if v is None else float(v)


def _fill_windows(cell: Cell, rec: dict, base: dict, t: Thresholds) -> None:
    pw, bw = rec.get("per_window") or {}, base.get("per_window") or {}
    if cell.kind == "quality":  # perplexity: retained = ppl_base / ppl_q = exp(mean(nll_b - nll_q))
        q, b = np.asarray(pw.get("nll_mean") or []), np.asarray(bw.get("nll_mean") or [])
        cell.retained = (cell.base_value / cell.value) if cell.value else None
        if len(q) and len(q) == len(b):
            cell.ci = _bootstrap(len(q), lambda i: float(np.exp((b[i] - q[i]).mean())), t.n_boot)
            cell.value_ci = _bootstrap(len(q), lambda i: float(np.exp(q[i].mean())), t.n_boot)
        if cell.retained is not None:
            cell.verdict = label_high(cell.retained, cell.ci, t.survives, t.collapses)
        return
    name = "kl_mean" if cell.kind == "kl" else "same_top1"
    q = np.asarray(pw.get(name) or [])
    if len(q) > 1:
        cell.ci = cell.value_ci = _bootstrap(len(q), lambda i: float(q[i].mean()), t.n_boot)
    if cell.value is None:
        return
    if cell.kind == "kl":
        cell.verdict = label_low(cell.value, cell.ci, t.kl_survives, t.kl_collapses)
    else:
        cell.verdict = label_high(cell.value, cell.ci, t.top1_survives, t.top1_collapses)


def _fill_items(cell: Cell, r: RunData, base: RunData, t: Thresholds) -> None:
    m = r.rec.get("metrics") or {}
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
    primary = r.rec.get("primary_metric")
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


def recommend(cells: list[Cell]) -> dict[str, dict[str, dict]]:
    """Per model, per kind of work (and "all tasks"): the smallest variant whose deciding cells all survive.

    A deciding cell is each task's primary quality row (its fidelity label when the baseline is at
    floor) and WikiText-2's mean KL. "survives" must be unqualified: its CI clears the threshold.
    """
    out: dict[str, dict[str, dict]] = {}
    for model in sorted({c.model for c in cells}):
        mc = [c for c in cells if c.model == model and c.decides]
        tasks_here = {c.task for c in mc}
        kinds = {k: [x for x in v if x in tasks_here] for k, v in KINDS.items()}
        kinds = {k: v for k, v in kinds.items() if v}
        kinds["all tasks"] = sorted(tasks_here)
        variants: dict[str, list[Cell]] = {}
        for c in mc:
            if c.method != "none":
                variants.setdefault(c.label, []).append(c)
        out[model] = {}
        for kind, tasks in kinds.items():
            ok = []
            for label, vc in variants.items():
                rel = [c for c in vc if c.task in tasks]
                if {c.task for c in rel} == set(tasks) and all(c.verdict == "survives" for c in rel):
                    ok.append(rel[0])
            if ok:
                best = min(ok, key=lambda c: (c.model_bytes or math.inf, -(c.effective_bits or 0)))
                out[model][kind] = {"tasks": tasks, "variant": best.label, "model_bytes": best.model_bytes,
                                    "effective_bits": best.effective_bits, "run_key": best.run_key}
            else:
                out[model][kind] = {"tasks": tasks, "variant": None,
                                    "reason": "no quantised variant survives every task of this kind: "
                                              "keep the baseline or widen the grid"}
    return out
