"""PNG charts of quality against effective bits per weight, drawn with matplotlib's Agg canvas.

Two charts per (model, task): perplexity vs effective bits and mean KL vs
effective bits, one line per quantisation method. Figures are drawn on an
explicit ``FigureCanvasAgg`` so that pyplot and its global backend state are
never touched, and nothing here imports torch.

>>> import pandas as pd, tempfile, pathlib
>>> df = pd.DataFrame({"model": ["m", "m"], "task": ["t", "t"], "status": ["ok", "ok"],
...                    "method": ["none", "rtn"], "effective_bits": [16.0, 4.5],
...                    "ppl": [10.0, 12.0], "kl_mean": [0.0, 0.2]})
>>> [c.filename for c in write_charts(df, pathlib.Path(tempfile.mkdtemp()), 0.1, 1.0)]
['ppl_vs_bits.png', 'kl_vs_bits.png']
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

# One colour per method across every chart; methods not listed share the fallback cycle.
METHOD_COLORS = {"none": "#444444", "rtn": "#1f77b4", "gptq": "#ff7f0e", "awq": "#2ca02c"}
FALLBACK_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
CHART_PREFIXES = ("ppl_vs_bits", "kl_vs_bits")


@dataclass(frozen=True)
class Chart:
    """One written chart: its file name (relative to the report folder) and a caption."""

    filename: str
    caption: str


def method_color(method: str, others: list[str]) -> str:
    """The colour of ``method``; unknown methods take fallback colours in the order of ``others``."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return FALLBACK_COLORS[others.index(method) % len(FALLBACK_COLORS)] if method in others else "#000000"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    log.debug("wrote %s", path)


def _plot_methods(ax, rows: pd.DataFrame, metric: str, others: list[str]) -> None:
    """One line per method (baseline excluded), points sorted by effective bits."""
    for method, g in rows[rows["method"] != "none"].groupby("method", sort=True):
        g = g.sort_values("effective_bits")
        ax.plot(g["effective_bits"], g[metric], marker="o", label=str(method), color=method_color(method, others))


def _ppl_chart(rows: pd.DataFrame, path: Path, title: str, others: list[str]) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    _plot_methods(ax, rows, "ppl", others)
    base = rows.loc[rows["method"] == "none", "ppl"]
    if len(base):
        ax.axhline(base.iloc[0], linestyle="--", color=METHOD_COLORS["none"], label=f"baseline ({base.iloc[0]:.3g})")
    values = rows["ppl"]
    if values.min() > 0 and values.max() / values.min() > 10:
        ax.set_yscale("log")
    ax.set(title=title, xlabel="effective bits per weight", ylabel="perplexity (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(fig, path)


def _kl_chart(
    rows: pd.DataFrame, path: Path, title: str, others: list[str], kl_survives: float, kl_collapses: float
) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    _plot_methods(ax, rows[rows["kl_mean"] > 0], "kl_mean", others)  # log axis: the baseline's KL is 0
    ax.axhline(kl_survives, linestyle=":", color="#2e7d32", label=f"survives < {kl_survives:g}")
    ax.axhline(kl_collapses, linestyle=":", color="#c62828", label=f"collapses ≥ {kl_collapses:g}")
    ax.set_yscale("log")
    ax.set(title=title, xlabel="effective bits per weight", ylabel="mean KL(baseline ‖ quantised), nats")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)


def write_charts(df: pd.DataFrame, out_dir: Path, kl_survives: float, kl_collapses: float) -> list[Chart]:
    """Draw both charts for every (model, task) with data into ``out_dir``; return them in order.

    File names are ``ppl_vs_bits.png`` / ``kl_vs_bits.png`` when the sweep has
    one model and one task, otherwise the model (and task) names are appended.
    Charts of earlier builds in ``out_dir`` are removed first.
    """
    for prefix in CHART_PREFIXES:
        for old in out_dir.glob(f"{prefix}*.png"):
            old.unlink()
    need = {"status", "model", "task", "method", "effective_bits"}
    if df.empty or not need <= set(df.columns):
        return []
    ok = df[(df["status"] == "ok") & df["effective_bits"].notna()]
    others = sorted({str(m) for m in ok["method"].dropna()} - set(METHOD_COLORS))
    several_models, several_tasks = ok["model"].nunique() > 1, ok["task"].nunique() > 1
    charts: list[Chart] = []
    for (model, task), rows in ok.groupby(["model", "task"], sort=True, dropna=False):
        suffix = (f"__{_slug(model)}" if several_models else "") + (f"__{_slug(task)}" if several_tasks else "")
        title = f"{model} — {task}"
        if "ppl" in rows and rows["ppl"].notna().any():
            name = f"ppl_vs_bits{suffix}.png"
            _ppl_chart(rows[rows["ppl"].notna()], out_dir / name, title, others)
            charts.append(Chart(name, f"Perplexity vs effective bits: {title}"))
        if "kl_mean" in rows and (rows["kl_mean"] > 0).any():
            name = f"kl_vs_bits{suffix}.png"
            _kl_chart(rows[rows["kl_mean"].notna()], out_dir / name, title, others, kl_survives, kl_collapses)
            charts.append(Chart(name, f"Mean KL vs effective bits: {title}"))
    return charts
