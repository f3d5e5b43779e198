"""The HTML report of one sweep: a verdict-coloured table of every run, charts, and unreadable files.

``build_report(sweep_dir)`` reads ``<sweep_dir>/runs/*.json`` through
``quanteval.results`` and writes ``<sweep_dir>/report/index.html`` next to its
PNG charts (relative links, so the folder can be copied or zipped whole).
Every string that comes from a run file is HTML-escaped. Nothing here imports
torch.

>>> import tempfile, pathlib
>>> from quanteval.results import write_run
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> write_run(d / "runs" / "b.json", {"run_key": "b", "status": "ok", "task": "t",
...     "model": {"name": "m", "provenance": "p"}, "variant": {"method": "none", "label": "baseline"},
...     "metrics": {"ppl": 9.0, "kl_mean": 0.0}, "compression": {"effective_bits": 16.0}})
>>> build_report(d).name
'index.html'
"""

from __future__ import annotations

import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from quanteval import results
from quanteval.report.charts import write_charts

log = logging.getLogger(__name__)

VERDICT_COLORS = {  # row background per verdict
    "baseline": "#e3eefc",
    "survives": "#dff3e0",
    "degrades": "#fff1cc",
    "collapses": "#fbdada",
    "failed": "#e6e6e6",
    "unknown": "#ffffff",
}

# (column, header, formatter); "model_mb" is derived from model_bytes.
COLUMNS = [
    ("task", "task", "{}"),
    ("model", "model", "{}"),
    ("label", "label", "{}"),
    ("method", "method", "{}"),
    ("bits", "bits", "{:g}"),
    ("group_size", "group", "{:g}"),
    ("sym", "sym", "{}"),
    ("effective_bits", "effective bits", "{:.3f}"),
    ("model_mb", "model MB", "{:,.1f}"),
    ("ppl", "ppl", "{:.3f}"),
    ("kl_mean", "KL mean", "{:.4g}"),
    ("kl_p99", "KL p99", "{:.4g}"),
    ("same_top1", "same top-1", "{:.3f}"),
    ("delta_p_mean", "Δp mean", "{:+.4f}"),
    ("primary", "task score", "{:.3f}"),
    ("tf_kl_mean", "teacher-forced KL", "{:.4g}"),
    ("flip_rate", "flip rate", "{:.3f}"),
    ("same_output", "same answer", "{:.3f}"),
]


@dataclass(frozen=True)
class Thresholds:
    """Where a run's mean KL (nats/token, vs the unquantised baseline) changes its verdict.

    ``kl_survives`` (default 0.1): mean KL below this means the model *survives*
    the quantisation. ``kl_collapses`` (default 1.0): mean KL at or above this
    means it *collapses*. In between it *degrades*.

    >>> Thresholds(kl_survives=0.05).kl_collapses
    1.0
    """

    kl_survives: float = 0.1
    kl_collapses: float = 1.0

    def __post_init__(self) -> None:
        for name in ("kl_survives", "kl_collapses"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Thresholds.{name} must be a positive finite number, got {value!r}")
        if self.kl_survives >= self.kl_collapses:
            raise ValueError(
                f"Thresholds.kl_survives ({self.kl_survives}) must be below kl_collapses ({self.kl_collapses})"
            )


def verdict(kl_mean: float | None, thresholds: Thresholds | None = None) -> str:
    """``"survives"``, ``"degrades"`` or ``"collapses"`` for a mean KL; ``"unknown"`` when it is missing.

    >>> verdict(0.05), verdict(0.5), verdict(1.0), verdict(None)
    ('survives', 'degrades', 'collapses', 'unknown')
    """
    t = thresholds or Thresholds()
    if kl_mean is None or pd.isna(kl_mean):
        return "unknown"
    if kl_mean < t.kl_survives:
        return "survives"
    return "degrades" if kl_mean < t.kl_collapses else "collapses"


def _row_verdict(row: pd.Series, thresholds: Thresholds) -> str:
    if row.get("status") == "collapsed":  # generation skipped by the collapse short-circuit
        return "collapses"
    if row.get("status") != "ok":
        return "failed"
    if row.get("method") == "none":
        return "baseline"
    kl = row.get("kl_mean")
    if kl is None or pd.isna(kl):  # generative tasks: teacher-forced KL on their texts
        kl = row.get("tf_kl_mean")
    return verdict(kl, thresholds)


def _read_sweep(sweep_dir: Path) -> tuple[pd.DataFrame, dict[str, str], list[tuple[Path, str]]]:
    """The runs table, each model's provenance (its baseline's when present), and the unreadable files."""
    files = results.run_files(sweep_dir)  # FileNotFoundError for a missing dir
    if not files:
        raise ValueError(f"{sweep_dir}: no run files (expected <sweep>/runs/*.json)")
    provenance: dict[str, str] = {}
    unreadable: list[tuple[Path, str]] = []
    for path in files:
        try:
            rec = results.read_run(path)
        except ValueError as e:
            unreadable.append((path, str(e)))
            continue
        model = rec.get("model") or {}
        name, prov = str(model.get("name")), model.get("provenance")
        is_base = (rec.get("variant") or {}).get("method") == "none"
        if prov and (is_base or name not in provenance):
            provenance[name] = str(prov)
    if unreadable:
        log.warning("%d unreadable run file(s) under %s", len(unreadable), sweep_dir)
    df = results.load(sweep_dir)
    for col in ["run_key", "status", "error", "reason", "unsafe", "model_bytes", *(c for c, _, _ in COLUMNS)]:
        if col not in df:
            df[col] = None  # e.g. no readable run measured kl_p99
    df["model_mb"] = pd.to_numeric(df["model_bytes"], errors="coerce") / 1e6
    df["effective_bits"] = pd.to_numeric(df["effective_bits"], errors="coerce")
    df = df.sort_values(["model", "effective_bits", "task", "label"], ascending=[True, False, True, True],
                        na_position="last", key=lambda s: s if s.name == "effective_bits" else s.astype(str))
    return df.reset_index(drop=True), provenance, unreadable


def _cell(value: object, fmt: str) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "—"
    try:
        return html.escape(fmt.format(value + 0.0 if isinstance(value, float) else value))  # no "-0.0000"
    except (ValueError, TypeError):  # e.g. a string where a number was expected
        return html.escape(str(value))


def _table(df: pd.DataFrame, thresholds: Thresholds) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in COLUMNS) + "<th>verdict</th><th>status</th>"
    rows = []
    for _, row in df.iterrows():
        v = _row_verdict(row, thresholds)
        status = html.escape(str(row["status"]))
        if v == "failed":
            status += f": <span class=error>{_cell(row['error'], '{}')}</span>"
        elif row["status"] == "collapsed":
            status += f": {_cell(row.get('reason'), '{}')}"
        if isinstance(row.get("unsafe"), str):
            status += " <b>(unsafe: no sandbox)</b>"
        cells = "".join(f"<td>{_cell(row[c], fmt)}</td>" for c, _, fmt in COLUMNS)
        key = html.escape(str(row["run_key"]), quote=True)
        rows.append(f'<tr class="v-{v}" data-run-key="{key}">{cells}<td>{v}</td><td>{status}</td></tr>')
    body = "\n".join(rows) or f'<tr><td colspan="{len(COLUMNS) + 2}">No readable runs.</td></tr>'
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _legend(t: Thresholds) -> str:
    items = {
        "baseline": "the unquantised model every other run is compared with",
        "survives": f"mean KL &lt; {t.kl_survives:g}",
        "degrades": f"{t.kl_survives:g} ≤ mean KL &lt; {t.kl_collapses:g}",
        "collapses": f"mean KL ≥ {t.kl_collapses:g}",
        "failed": "the run raised an error (shown in the status column)",
        "unknown": "no KL measured for this task",
    }
    lis = "".join(f'<li><span class="chip v-{k}">{k}</span> {text}</li>' for k, text in items.items())
    return (
        "<p>Each row is coloured by its verdict, from the mean KL divergence (nats per token) of the "
        "quantised model's next-token distribution from the baseline's. Thresholds: survives below "
        f"{t.kl_survives:g}, collapses at or above {t.kl_collapses:g} (set with <code>--kl-survives</code> "
        f"and <code>--kl-collapses</code>).</p>\n<ul class=legend>{lis}</ul>"
    )


def _page(sweep_dir: Path, df: pd.DataFrame, provenance: dict[str, str], charts: list, unreadable: list,
          thresholds: Thresholds) -> str:
    esc = html.escape
    models = "".join(f"<li><b>{esc(m)}</b>: {esc(p)}</li>" for m, p in sorted(provenance.items())) or "<li>—</li>"
    figs = "\n".join(
        f'<figure><img src="{esc(c.filename, quote=True)}" alt="{esc(c.caption, quote=True)}">'
        f"<figcaption>{esc(c.caption)}</figcaption></figure>" for c in charts
    ) or "<p>No data to chart.</p>"
    bad = "".join(f"<li><code>{esc(str(p.relative_to(sweep_dir)))}</code>: {esc(msg)}</li>" for p, msg in unreadable)
    bad_html = f"<ul>{bad}</ul>" if bad else "<p>None.</p>"
    style = "\n".join(f".v-{k} {{ background: {c}; }}" for k, c in VERDICT_COLORS.items())
    n_ok = int((df["status"] == "ok").sum())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>quanteval report: {esc(sweep_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }}
th {{ background: #f4f4f4; }} td:nth-child(-n+4) {{ text-align: left; }}
.error {{ color: #a00; }} .chip {{ padding: 0 0.5em; border: 1px solid #aaa; }}
figure {{ display: inline-block; margin: 1em; }} img {{ max-width: 100%; }}
{style}
</style></head>
<body>
<h1>quanteval report</h1>
<p>Sweep: <code>{esc(str(sweep_dir))}</code> — {len(df)} run(s), {n_ok} ok, {len(unreadable)} unreadable file(s).</p>
<h2>Models</h2>
<ul>{models}</ul>
<h2>Verdicts</h2>
{_legend(thresholds)}
<h2>Runs</h2>
{_table(df, thresholds)}
<h2>Charts</h2>
{figs}
<h2>Unreadable runs</h2>
{bad_html}
</body></html>
"""


def build_report(sweep_dir: Path, out_dir: Path | None = None, thresholds: Thresholds | None = None) -> Path:
    """Write ``index.html`` and its PNG charts for the sweep at ``sweep_dir``; return index.html's path.

    ``out_dir`` defaults to ``<sweep_dir>/report``. Raises ``FileNotFoundError``
    when ``sweep_dir`` does not exist and ``ValueError`` when it holds no run files.
    Unreadable run files do not stop the build; they are listed in the report.
    """
    sweep_dir = Path(sweep_dir)
    thresholds = thresholds or Thresholds()
    df, provenance, unreadable = _read_sweep(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = write_charts(df, out_dir, thresholds.kl_survives, thresholds.kl_collapses)
    index = out_dir / "index.html"
    index.write_text(_page(sweep_dir, df, provenance, charts, unreadable, thresholds), encoding="utf-8")
    log.info("wrote %s (%d runs, %d charts)", index, len(df), len(charts))
    return index
