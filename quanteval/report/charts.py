"""The report's charts (PNG and SVG), drawn with matplotlib's Agg canvas; one colour per method throughout.

Per model:

- ``quality__<model>__<task>``: each task's score vs effective bits per weight, one line per method
  with a 95% CI band (item or window bootstrap), the baseline dashed;
- ``kl__<model>``: WikiText-2 mean KL vs effective bits (log y), with the verdict thresholds;
- ``flips__<model>``: flip rate vs effective bits, one panel per task with 0/1 scores;
- ``pareto__<model>``: mean retained quality (tasks whose baseline is above floor) vs model size in MB,
  every variant a point, the Pareto frontier drawn through the best;
- the charts a task asks for in its YAML (``sweep.charts``, carried in each run's ``task_meta``):
  ``{by_tag: k}``: the primary metric by the values of item tag ``k`` (from the run's ``breakdown``), one
  line per variant (with Wilson 95% bands for a 0/1 primary; a log-2 axis for context lengths);
  ``{kl_by_position: true}``: mean teacher-forced KL by position along the texts;
  ``{heatmap: [depth, length]}``: the primary metric on a grid of two item tags, one panel per variant
  beside the baseline's (needle); ``{kl_by_position_bucket: true}``: long-window KL by position bucket
  (``task=wikitext2_long``).
  Their files are ``<task>_by_<tag>__<model>`` and ``<task>_kl_pos__<model>``, except that arith_chain's
  by-steps chart keeps the name the README links to, ``arith_steps__<model>``; ``BUILT_IN`` keeps that
  name and the old titles and captions of arith_chain's and gsm8k's charts.

Figures are drawn on an explicit ``FigureCanvasAgg``, so pyplot's global state is never touched, and
nothing here imports torch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from quanteval.formats import family
from quanteval.report.cells import Cell, RunData
from quanteval.results import RunRecord, TaskMeta
from quanteval.results import primary_value as results_primary
from quanteval.thresholds import Thresholds

log = logging.getLogger(__name__)

# colours are by library family (quanteval.formats.FAMILIES): each family one hue, its methods shades of
# it, told apart by marker (METHOD_MARKERS)
FAMILY_COLORS = {"baseline": "#444444", "quanteval": "#1f77b4", "llm-compressor": "#7b4fb0",
                 "bitsandbytes": "#d62728", "hqq": "#8c564b", "auto-round": "#e377c2",
                 "llama.cpp (gguf)": "#2ca02c", "files (artifacts)": "#ff7f0e", "other": "#7f7f7f"}
METHOD_COLORS = {"none": "#444444", "kv": "#17becf",  # kv: the KV cache alone (weights unquantised)
                 "rtn": "#6baed6", "gptq": "#1f77b4", "awq": "#08306b",  # quanteval: blues
                 "llmc-rtn": "#bcbddc", "llmc-gptq": "#7b4fb0", "llmc-awq": "#3f007d",  # llm-compressor: purples
                 "bnb": "#d62728", "hqq": "#8c564b", "autoround": "#e377c2", "gguf": "#2ca02c",
                 "artifact": "#ff7f0e"}
METHOD_MARKERS = {"rtn": "o", "gptq": "s", "awq": "^", "llmc-rtn": "o", "llmc-gptq": "s", "llmc-awq": "^",
                  "bnb": "D", "hqq": "v", "autoround": "P", "gguf": "X", "artifact": "*", "kv": "h"}
FALLBACK_COLORS = ["#bcbd22", "#7f7f7f", "#aec7e8", "#98df8a", "#ff9896", "#c49c94"]
BIT_COLORS = {8: "#2ca02c", 4: "#1f77b4", 3: "#ff7f0e", 2: "#d62728"}


@dataclass(frozen=True)
class Chart:
    """One written chart: its PNG and SVG file names (relative to the report folder) and a caption."""

    filename: str
    svg: str
    caption: str


@dataclass(frozen=True)
class Wording:
    """A task chart's file stem (before ``__<model>``), title (after ``<model> — ``), axes and caption."""

    stem: str
    title: str
    xlabel: str
    ylabel: str
    caption: str  # followed by " (<model>)"


KL_NATS = "mean KL(baseline ‖ quantised), nats"
BUILT_IN = {  # the built-in tasks' charts keep the file names the README links to, and their wording
    ("arith_chain", "by_tag=k"): Wording("arith_steps", "arith_chain: does error compound with steps?",
                                         "number of dependent steps k", "accuracy",
                                         "arith_chain accuracy vs number of steps, per variant"),
    ("gsm8k", "kl_by_position"): Wording("gsm8k_kl_pos", "teacher-forced KL along GSM8K reference solutions",
                                         "token position in the solution", KL_NATS,
                                         "Per-position KL along GSM8K reference solutions"),
}


def wording(task: str, hint: dict, primary: str | None = None) -> Wording:
    """The file stem and texts of the chart ``hint`` asks for on ``task``.

    >>> wording("arith_chain", {"by_tag": "k"}).stem, wording("gsm8k", {"kl_by_position": True}).stem
    ('arith_steps', 'gsm8k_kl_pos')
    >>> wording("my_task", {"by_tag": "level"}, "acc").stem
    'my_task_by_level'
    """
    if "by_tag" in hint:
        tag = str(hint["by_tag"])
        return BUILT_IN.get((task, f"by_tag={tag}")) or Wording(
            f"{_slug(task)}_by_{_slug(tag)}", f"{task}: {primary} by {tag}", tag, str(primary),
            f"{task} {primary} by {tag}, per variant")
    return BUILT_IN.get((task, "kl_by_position")) or Wording(
        f"{_slug(task)}_kl_pos", f"teacher-forced KL along the {task} texts", "token position in the text", KL_NATS,
        f"Per-position KL along the {task} texts")


def method_color(method: str) -> str:
    """A method's colour: a shade of its family's hue (an unknown method: a fixed fallback by name)."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return FALLBACK_COLORS[sum(map(ord, method)) % len(FALLBACK_COLORS)]


def method_marker(method: str) -> str:
    return METHOD_MARKERS.get(method, "o")


def method_legend(method: str) -> str:
    """'gptq (quanteval)': the legend names each method's family."""
    return f"{method} ({family(method)})"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def _save(fig: Figure, out: Path, stem: str, caption: str, charts: list[Chart]) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(out / f"{stem}.png", format="png", dpi=110, bbox_inches="tight")
    fig.savefig(out / f"{stem}.svg", format="svg", bbox_inches="tight")
    charts.append(Chart(f"{stem}.png", f"{stem}.svg", caption))


def write_charts(cells: list[Cell], runs: list[RunData], out: Path, t: Thresholds,
                 metas: dict[str, TaskMeta]) -> list[Chart]:
    """Every chart with data, in the order the index shows them; ``metas``: task -> what it declares
    (``cells.task_metas``). Old charts in ``out`` are removed."""
    for old in list(out.glob("*.png")) + list(out.glob("*.svg")):
        old.unlink()
    charts: list[Chart] = []
    for model in sorted({c.model for c in cells}):
        mc = [c for c in cells if c.model == model]
        mruns = [r for r in runs if r.rec.model.name == model and r.rec.status == "ok"]
        for task in sorted({c.task for c in mc}):
            _quality(model, task, [c for c in mc if c.task == task and c.kind == "quality"], out, charts)
        _kl(model, [c for c in mc if c.task == "wikitext2" and c.metric == "kl_mean"], out, t, charts)
        _kv_axis(model, [c for c in mc if c.task == "wikitext2" and c.metric == "kl_mean"], out, t, charts)
        _mixed(model, mruns, out, charts)
        _flips(model, [c for c in mc if c.kind == "quality" and c.flips is not None], out, charts)
        _pareto(model, mc, out, t, charts)
        for task in sorted({r.rec.task or "?" for r in mruns}):
            truns = [r for r in mruns if (r.rec.task or "?") == task]
            for hint in metas[task].charts:
                if "by_tag" in hint:
                    _by_tag(model, task, str(hint["by_tag"]), truns, out, charts)
                elif hint.get("kl_by_position"):
                    _kl_positions(model, task, truns, out, charts)
                elif "heatmap" in hint:
                    _heatmap(model, task, [str(x) for x in hint["heatmap"]], truns, out, charts)
                elif hint.get("kl_by_position_bucket"):
                    _kl_buckets(model, task, truns, out, charts)
                elif hint.get("sensitivity"):
                    _sensitivity(model, truns, out, charts)
                else:
                    log.warning("%s: chart hint %s is not one the report draws (by_tag, kl_by_position, heatmap, "
                                "kl_by_position_bucket)", task, hint)
    return charts


def _lines(ax, cells: list[Cell], y, band=None) -> None:
    """One line per method (and KV-cache setting) through ``y(cell)``, sorted by effective bits, with an
    optional CI band. Artifacts and cache-only variants (all at 16 bits per weight) are labelled points."""
    order = list(FAMILY_COLORS)  # legend and drawing order: by library family, then method
    series = sorted({(c.method, c.kv_bits or 16) for c in cells if c.method != "none"},
                    key=lambda s: (order.index(family(s[0])) if family(s[0]) in order else len(order), s[0], -s[1]))
    for method, kv in series:
        pts = sorted((c for c in cells if c.method == method and (c.kv_bits or 16) == kv
                      and c.effective_bits is not None and y(c) is not None), key=lambda c: c.effective_bits)
        if not pts:
            continue
        xs = [c.effective_bits for c in pts]
        if method in ("artifact", "kv"):  # a labelled point each (with its CI as an error bar), no line
            _points(ax, pts, y, band)
            continue
        kv_label = "" if kv == 16 else f" · kv{kv}"
        ax.plot(xs, [y(c) for c in pts], marker=method_marker(method), color=method_color(method),
                linestyle="-" if kv == 16 else "--", label=method_legend(method) + kv_label)
        if band:
            lo_hi = [band(c) for c in pts]
            if all(b is not None for b in lo_hi):
                ax.fill_between(xs, [b[0] for b in lo_hi], [b[1] for b in lo_hi], color=method_color(method), alpha=0.15)


def _points(ax, pts: list[Cell], y, band=None) -> None:
    """Artifacts (one marker per file, labelled by its file name and type) or cache-only variants."""
    for i, c in enumerate(pts):
        b = band(c) if band else None
        yerr = None if b is None else [[max(y(c) - b[0], 0)], [max(b[1] - y(c), 0)]]
        ax.errorbar([c.effective_bits], [y(c)], yerr=yerr, marker=method_marker(c.method), linestyle="none",
                    color=method_color(c.method), capsize=3, label=method_legend(c.method) if i == 0 else None)
        ax.annotate(c.label, (c.effective_bits, y(c)), textcoords="offset points", xytext=(4, 4), fontsize=7,
                    color=method_color(c.method))


def _quality(model: str, task: str, cells: list[Cell], out: Path, charts: list[Chart]) -> None:
    for row in dict.fromkeys(c.row for c in cells):
        rc = [c for c in cells if c.row == row and c.value is not None]
        if not any(c.method != "none" for c in rc):
            continue
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        _lines(ax, rc, lambda c: c.value, lambda c: c.value_ci)
        base = next((c for c in rc if c.method == "none"), None)
        if base is not None:
            ax.axhline(base.value, linestyle="--", color=METHOD_COLORS["none"], label=f"baseline ({base.value:.3g})")
        metric = row.removeprefix(f"{task}: ")
        values = [c.value for c in rc]
        perplexity = rc[0].metric == "ppl" or "perplexity" in rc[0].metric
        if perplexity and min(values) > 0 and max(values) / min(values) > 10:
            ax.set_yscale("log")
        ax.set(title=f"{model} — {row}", xlabel="effective bits per weight", ylabel=metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        _save(fig, out, f"quality__{_slug(model)}__{_slug(row)}", f"{row} vs effective bits ({model}), 95% CI bands", charts)


def _kl(model: str, cells: list[Cell], out: Path, t: Thresholds, charts: list[Chart]) -> None:
    cells = [c for c in cells if c.method != "none" and c.value and c.value > 0]
    if not cells:
        return
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    _lines(ax, cells, lambda c: c.value, lambda c: (max(c.ci[0], 1e-6), c.ci[1]) if c.ci else None)
    ax.axhline(t.kl_survives, linestyle=":", color="#2e7d32", label=f"survives < {t.kl_survives:g}")
    ax.axhline(t.kl_collapses, linestyle=":", color="#c62828", label=f"collapses ≥ {t.kl_collapses:g}")
    ax.set_yscale("log")
    ax.set(title=f"{model} — WikiText-2 mean KL to the baseline", xlabel="effective bits per weight",
           ylabel="mean KL(baseline ‖ quantised), nats/token")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out, f"kl__{_slug(model)}", f"Mean KL vs effective bits ({model}), log scale", charts)


def _kv_axis(model: str, cells: list[Cell], out: Path, t: Thresholds, charts: list[Chart]) -> None:
    """WikiText-2 mean KL against the KV cache's bits, one line per weight setting ("w16" for unquantised
    weights): whether a loss comes from the weights, the cache, or both. Drawn when some variant quantises
    its cache."""
    if not any(c.kv_bits for c in cells):
        return
    by_weights: dict[str, list[tuple[int, Cell]]] = {}
    for c in cells:
        weights = "w16" if c.method in ("none", "kv") else c.label.split(" · ")[0]
        by_weights.setdefault(weights, []).append((c.kv_bits or 16, c))
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    xs_all = sorted({b for v in by_weights.values() for b, _ in v}, reverse=True)
    for weights, pts in sorted(by_weights.items()):
        pts = sorted(((b, c) for b, c in pts if c.value and c.value > 0), key=lambda p: -p[0])
        if not pts:
            continue
        m = "kv" if weights == "w16" else pts[0][1].method
        xs = [xs_all.index(b) for b, _ in pts]
        ax.plot(xs, [c.value for _, c in pts], marker=method_marker(m), color=method_color(m), label=f"weights {weights}")
        lo_hi = [c.ci for _, c in pts]
        if all(b is not None for b in lo_hi):
            ax.fill_between(xs, [max(b[0], 1e-6) for b in lo_hi], [b[1] for b in lo_hi], color=method_color(m),
                            alpha=0.15)
    ax.set_xticks(range(len(xs_all)), [f"kv{b}" for b in xs_all])
    ax.axhline(t.kl_survives, linestyle=":", color="#2e7d32", label=f"survives < {t.kl_survives:g}")
    ax.axhline(t.kl_collapses, linestyle=":", color="#c62828", label=f"collapses ≥ {t.kl_collapses:g}")
    ax.set_yscale("log")
    ax.set(title=f"{model} — WikiText-2 mean KL by KV-cache bits", xlabel="KV cache bits (kv16: not quantised)",
           ylabel="mean KL(baseline ‖ variant), nats/token")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out, f"kv__{_slug(model)}", f"Mean KL by KV-cache bits, one line per weight setting ({model}), "
                                            f"log scale, 95% CI bands", charts)


def _flips(model: str, cells: list[Cell], out: Path, charts: list[Chart]) -> None:
    tasks = sorted({c.task for c in cells})
    if not tasks:
        return
    fig = Figure(figsize=(3.2 * len(tasks) + 0.5, 3.6))
    axes = fig.subplots(1, len(tasks), sharey=True, squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        _lines(ax, [c for c in cells if c.task == task], lambda c: c.flips["rate"])
        ax.set(title=task, xlabel="effective bits")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("flip rate (items whose correctness changed)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model} — flips against the baseline")
    _save(fig, out, f"flips__{_slug(model)}", f"Flip rate vs effective bits ({model})", charts)


def _pareto(model: str, cells: list[Cell], out: Path, t: Thresholds, charts: list[Chart]) -> None:
    per_variant: dict[str, list[Cell]] = {}
    for c in cells:
        if c.kind == "quality" and c.decides and c.retained is not None and c.method != "none":
            per_variant.setdefault(c.label, []).append(c)
    pts = [(vc[0].size_bytes / 1e6, float(np.mean([min(c.retained, 1.5) for c in vc])), vc[0])
           for vc in per_variant.values() if vc[0].model_bytes]
    if not pts:
        return
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for mb, q, c in pts:
        ax.scatter(mb, q, color=method_color(c.method), marker=method_marker(c.method), zorder=3)
        ax.annotate(c.label, (mb, q), fontsize=7, xytext=(3, 3), textcoords="offset points")
    frontier, best = [], -np.inf
    for mb, q, _ in sorted(pts, key=lambda p: p[0]):
        if q > best:
            frontier.append((mb, q))
            best = q
    ax.plot([p[0] for p in frontier], [p[1] for p in frontier], color="#555", linestyle="-", label="Pareto frontier")
    for method in sorted({c.method for _, _, c in pts}, key=lambda m: (family(m), m)):
        ax.scatter([], [], color=method_color(method), marker=method_marker(method), label=method_legend(method))
    ax.axhline(1.0, linestyle="--", color=METHOD_COLORS["none"], label="baseline")
    ax.axhline(t.survives, linestyle=":", color="#2e7d32", label=f"survives ≥ {t.survives:g}")
    ctx = next((c.kv_context for _, _, c in pts if c.kv_context), None)
    size = f"weights + KV cache at {ctx:,} tokens, MB" if ctx else "model size, MB"
    ax.set(title=f"{model} — quality vs size", xlabel=size,
           ylabel="mean retained quality (tasks above floor)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out, f"pareto__{_slug(model)}", f"Retained quality vs model size with the Pareto frontier ({model})", charts)


def _tag_values(keys) -> list[tuple[object, str]]:
    """(x, key) for a breakdown's tag values: numbers in numeric order when every key is an integer, else text."""
    try:
        return [(int(k), k) for k in sorted(keys, key=int)]
    except ValueError:
        return [(str(k), k) for k in sorted(keys, key=str)]


def _effective_bits(rec: RunRecord) -> float:
    return rec.compression.effective_bits or 99


def _by_tag(model: str, task: str, tag: str, runs: list[RunData], out: Path, charts: list[Chart]) -> None:
    series = []
    for r in runs:
        by_tag = r.rec.breakdown.get(tag) or {}
        primary = r.rec.primary_metric
        if by_tag and primary:
            xs = _tag_values(by_tag)
            series.append((r.rec, [x for x, _ in xs], [by_tag[k].get(primary) for _, k in xs]))
    if not series:
        return
    w = wording(task, {"by_tag": tag}, series[0][0].primary_metric)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for rec, xs, ys in sorted(series, key=lambda s: -_effective_bits(s[0])):
        v = rec.variant
        bits = v.bits or (v.kv or {}).get("bits")  # a cache-only variant: coloured by its cache's bits
        color = METHOD_COLORS["none"] if v.method == "none" else BIT_COLORS.get(bits, "#9467bd")
        style = {"none": "--", "rtn": "-", "gptq": "-.", "awq": ":", "kv": (0, (1, 1))}.get(v.method, "-")
        ax.plot(xs, ys, marker="h" if v.kv else "o", color=color, linestyle=style, label=v.label)
        ns = [(rec.breakdown[tag].get(k) or {}).get("n") for _, k in _tag_values(rec.breakdown[tag])]
        if all(isinstance(n, int) and n > 0 for n in ns) and all(y is not None and 0 <= y <= 1 for y in ys):
            lo_hi = [wilson(y, n) for y, n in zip(ys, ns)]  # a 0/1 primary: Wilson 95% intervals
            ax.fill_between(xs, [a for a, _ in lo_hi], [b for _, b in lo_hi], color=color, alpha=0.08)
    if all(isinstance(x, int) for x in series[0][1]) and max(series[0][1]) >= 1024:
        ax.set_xscale("log", base=2)  # context lengths: 1K, 2K, 4K, ...
        xs = sorted({x for s in series for x in s[1]})
        ax.set_xticks(xs, [f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x) for x in xs])
        ax.minorticks_off()
    ax.set(title=f"{model} — {w.title}", xlabel=w.xlabel, ylabel=w.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, out, f"{w.stem}__{_slug(model)}", f"{w.caption} ({model})", charts)


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95% interval for a proportion ``p`` of ``n`` items.

    >>> [round(v, 3) for v in wilson(0.5, 4)]
    [0.15, 0.85]
    """
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / d
    return max(0.0, c - h), min(1.0, c + h)


def _heatmap(model: str, task: str, tags: list[str], runs: list[RunData], out: Path, charts: list[Chart]) -> None:
    """The primary metric on a grid of two item tags (needle: depth x length), one panel per variant, the
    baseline's first; each square's count of items is printed in it."""
    ytag, xtag = tags[0], tags[1]
    panels = []
    for r in sorted(runs, key=lambda r: (r.rec.variant.method != "none", -_effective_bits(r.rec))):
        primary = r.rec.primary_metric
        if not r.items or not primary:
            continue
        cells: dict[tuple[str, str], list[float]] = {}
        for it in r.items:
            tg = it.get("tags") or {}
            cells.setdefault((str(tg.get(ytag)), str(tg.get(xtag))), []).append(results_primary(it, primary))
        panels.append((r.rec.variant.label, cells))
    if not panels:
        return
    ys = [k for _, k in _tag_values({k[0] for _, c in panels for k in c})]
    xs = [k for _, k in _tag_values({k[1] for _, c in panels for k in c})]
    ncol = min(4, len(panels))
    nrow = -(-len(panels) // ncol)
    fig = Figure(figsize=(3.2 * ncol, 2.8 * nrow))
    for i, (label, cells) in enumerate(panels):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        grid = np.full((len(ys), len(xs)), np.nan)
        for (yv, xv), vals in cells.items():
            grid[ys.index(yv), xs.index(xv)] = float(np.mean(vals))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for (yv, xv), vals in cells.items():
            ax.text(xs.index(xv), ys.index(yv), str(len(vals)), ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(xs)), xs, fontsize=6)
        ax.set_yticks(range(len(ys)), ys, fontsize=6)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel(xtag, fontsize=7)
        ax.set_ylabel(ytag, fontsize=7)
    fig.subplots_adjust(hspace=0.55, wspace=0.35)
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="accuracy")
    fig.suptitle(f"{model} — {task}: accuracy by {ytag} and {xtag} (numbers: items per square)")
    _save(fig, out, f"{_slug(task)}_{_slug(ytag)}_x_{_slug(xtag)}__{_slug(model)}",
          f"{task} accuracy by {ytag} x {xtag}, each variant beside the baseline ({model})", charts)


def _mixed(model: str, runs: list[RunData], out: Path, charts: list[Chart]) -> None:
    """Mixed-precision variants: the width each unit was given (blocks x unit types), and the solve's
    predicted KL (the sum of the units' sensitivity KL, on validation windows) beside the measured
    WikiText-2 test KL, since additivity is an assumption."""
    mixed = {}
    for r in runs:
        info = (r.rec.quantization or {}).get("mixed")
        if info and r.rec.task == "wikitext2":
            mixed[r.rec.variant.label or "?"] = (info, r.rec.metrics.get("kl_mean"))
    if not mixed:
        return
    labels = sorted(mixed)
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    widths = sorted({b for lab in labels for b in (mixed[lab][0].get("bits") or {}).values()})
    colors = [colormaps["viridis"](x) for x in np.linspace(0.1, 0.95, max(len(widths), 1))]  # one per width
    fig = Figure(figsize=(2.4 * len(labels) + 4.8, 6.0))
    for i, label in enumerate(labels):
        bits = mixed[label][0].get("bits") or {}
        kinds = list(dict.fromkeys(u.split(".", 1)[1] for u in bits))
        n_blocks = 1 + max(int(u.split(".", 1)[0]) for u in bits)
        grid = np.ones((n_blocks, len(kinds), 4))  # RGBA, white where a unit is missing
        for u, b in bits.items():
            blk, kind = u.split(".", 1)
            grid[int(blk), kinds.index(kind)] = colors[widths.index(b)]
        ax = fig.add_subplot(1, len(labels) + 1, i + 1)
        ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest")
        ax.set_xticks(range(len(kinds)), kinds, fontsize=7, rotation=30)
        if i == 0:
            ax.set_ylabel("block", fontsize=8)
        ax.set_title(f"{label}\n{mixed[label][0].get('effective_bits', 0):.2f} bits", fontsize=8)
    fig.legend(handles=[Patch(color=c, label=f"{b} bits") for b, c in zip(widths, colors)], loc="lower center",
               ncol=len(widths), fontsize=8, title="bits given to the unit", title_fontsize=8)
    ax = fig.add_subplot(1, len(labels) + 1, len(labels) + 1)
    pts = [(mixed[lab][0].get("predicted_kl"), mixed[lab][1], lab) for lab in labels]
    pts = [(p, m, lab) for p, m, lab in pts if isinstance(p, (int, float)) and isinstance(m, (int, float))]
    for p, m, lab in pts:
        ax.scatter(p, m, color=method_color(lab.split()[0].removeprefix("mixed-")), zorder=3)  # its base's colour
        ax.annotate(lab, (p, m), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if pts:
        lo = min(min(p, m) for p, m, _ in pts) * 0.8
        hi = max(max(p, m) for p, m, _ in pts) * 1.25
        ax.plot([lo, hi], [lo, hi], linestyle="--", color="#888", label="measured = predicted")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set(xlabel="predicted KL (sum of units, validation)", ylabel="measured KL (WikiText-2 test)")
    ax.set_title("predicted vs measured", fontsize=8)
    fig.subplots_adjust(wspace=0.5, bottom=0.2)
    fig.suptitle(f"{model} — mixed precision: the widths chosen, and the solve's prediction against the measurement")
    _save(fig, out, f"mixed__{_slug(model)}", f"Mixed-precision variants: bits per unit, predicted vs measured KL "
                                               f"({model})", charts)


def _sensitivity(model: str, runs: list[RunData], out: Path, charts: list[Chart]) -> None:
    """Sensitivity tables: blocks x unit types, coloured by each unit's KL alone (log scale), a panel per
    method and bits, with the proxy's Spearman rho in the panel's title."""
    panels = []
    for r in sorted(runs, key=lambda r: (r.rec.variant.label or "")):
        if not r.items:
            continue
        kinds = list(dict.fromkeys(str(it.get("kind")) for it in r.items))
        n_blocks = 1 + max(int(it.get("block", 0)) for it in r.items)
        grid = np.full((n_blocks, len(kinds)), np.nan)
        for it in r.items:
            v = it.get("predicted")
            if isinstance(v, (int, float)) and v > 0:
                grid[int(it["block"]), kinds.index(str(it["kind"]))] = np.log10(v)
        panels.append((r.rec.variant.label or "?", r.rec.metrics.get("proxy_rho"), kinds, grid))
    if not panels:
        return
    finite = np.concatenate([p[3][np.isfinite(p[3])] for p in panels]) if panels else np.array([])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (-6.0, 0.0)
    fig = Figure(figsize=(2.6 * len(panels) + 1.2, 6.0))
    im = None
    for i, (label, rho, kinds, grid) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma_r", vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(kinds)), kinds, fontsize=7, rotation=30)
        if i == 0:
            ax.set_ylabel("block", fontsize=8)
        rho_txt = f"proxy ρ {rho:.2f}" if isinstance(rho, (int, float)) else "proxy ρ –"
        ax.set_title(f"{label}\n{rho_txt}", fontsize=8)
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="log10 KL to the baseline, that unit alone")
    fig.suptitle(f"{model} — sensitivity: each unit quantised alone (WikiText-2 validation windows)")
    _save(fig, out, f"sensitivity__{_slug(model)}",
          f"Per-unit sensitivity: KL with only that unit quantised, blocks x unit types ({model})", charts)


def _kl_buckets(model: str, task: str, runs: list[RunData], out: Path, charts: list[Chart]) -> None:
    """Long-window fidelity: mean KL by position bucket along the window, one line per variant."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    labels: list[str] = []
    for r in sorted(runs, key=lambda r: -_effective_bits(r.rec)):
        v, byp = r.rec.variant, r.rec.metrics.get("by_position") or {}
        if v.method == "none" or not byp:
            continue
        labels = list(byp) if len(byp) > len(labels) else labels
        bits = v.bits or (v.kv or {}).get("bits")  # a cache-only variant: its cache's bits
        ax.plot(range(len(byp)), [b["kl_mean"] for b in byp.values()],
                marker="h" if v.kv else method_marker(v.method), color=method_color(v.method),
                linestyle={8: ":", 4: "-", 3: "--", 2: "-."}.get(bits, "-"), label=v.label)
    if not labels:
        return
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set(title=f"{model} — {task}: KL by position in the window", xlabel="token position (bucket)", ylabel=KL_NATS)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, out, f"{_slug(task)}_kl_by_position__{_slug(model)}",
          f"Mean KL to the baseline by position along long WikiText-2 windows ({model})", charts)


def _kl_positions(model: str, task: str, runs: list[RunData], out: Path, charts: list[Chart]) -> None:
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    drawn = 0
    for r in sorted(runs, key=lambda r: -_effective_bits(r.rec)):
        v = r.rec.variant
        if v.method == "none" or not r.items:
            continue
        rows = [it["tf"]["kl_pos"] for it in r.items if it.get("tf") and it["tf"].get("kl_pos")]
        if not rows:
            continue
        n = max(len(x) for x in rows)
        sums, counts = np.zeros(n), np.zeros(n)
        for x in rows:
            sums[: len(x)] += x
            counts[: len(x)] += 1
        keep = counts >= max(1, len(rows) // 2)  # positions most references reach
        ax.plot(np.arange(n)[keep], (sums / np.maximum(counts, 1))[keep], color=method_color(v.method),
                linestyle={8: ":", 4: "-", 3: "--", 2: "-."}.get(v.bits, "-"), label=v.label)
        drawn += 1
    if not drawn:
        return
    w = wording(task, {"kl_by_position": True})
    ax.set_yscale("log")
    ax.set(title=f"{model} — {w.title}", xlabel=w.xlabel, ylabel=w.ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, out, f"{w.stem}__{_slug(model)}", f"{w.caption} ({model})", charts)
