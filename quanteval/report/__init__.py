"""The report: reads a sweep's run files and writes a self-contained folder (HTML, charts, exports).

This package reads results only and never imports torch (directly or through another quanteval
module), so reports build anywhere, e.g. on results copied from a cluster.

- ``build(sweep_dir, out_dir=None, thresholds=None) -> Report``: write ``index.html`` (default
  ``<sweep_dir>/report/``), charts, drill-down pages and exports; ``build_report`` returns the path.
- ``Thresholds``: verdict thresholds (``quanteval.thresholds``, re-exported here).
- ``summary(cells)``: the compact verdict table printed at the end of a sweep.
- ``failing(cells, level)``: the deciding cells ``--fail-on level`` matches.

The ``quanteval-report`` console script is ``quanteval.cli.report_main`` (every entry point lives in
``quanteval/cli.py``); it returns 0, 1 when ``--fail-on collapses|degrades`` matches a deciding cell
(to gate a deployment pipeline), 2 on bad input. Its threshold flags (``--survives``,
``--kl-collapses``, ...) are ``Thresholds.flags()``; a value outside its range is one line, e.g.
``quanteval-report: error: --survives=2: must be in (collapses, 1] (collapses=0.5)``, before
anything is read::

    $ quanteval-report results/default --fail-on collapses
    results/default/report/index.html
"""

from __future__ import annotations

from quanteval.report.cells import Cell
from quanteval.report.html import Report, build, build_report, verdict
from quanteval.thresholds import Thresholds

__all__ = ["Report", "Thresholds", "build", "build_report", "failing", "summary", "verdict"]

FAIL_LEVELS = {"collapses": ("collapses", "collapses?"),
               "degrades": ("degrades", "degrades?", "collapses", "collapses?", "survives?")}
SHORT = {"survives": "ok", "survives?": "ok?", "degrades?": "deg?", "degrades": "DEG", "collapses?": "COL?",
         "collapses": "COL", "baseline": "base", "failed": "FAIL", "no baseline": "nobase", "unknown": "-"}


def failing(cells: list[Cell], level: str) -> list[Cell]:
    """Deciding cells whose verdict matches ``--fail-on level`` (a "?" counts: the CI reaches there)."""
    return [c for c in cells if c.decides and c.verdict in FAIL_LEVELS[level]]


def summary(cells: list[Cell]) -> str:
    """A compact text table per model: deciding rows x variants (ordered by effective bits)."""
    out = []
    for model in sorted({c.model for c in cells}):
        mc = [c for c in cells if c.model == model and c.decides]
        cols = sorted({(c.effective_bits or 0, c.label) for c in mc if c.method != "none"}, reverse=True)
        rows = list(dict.fromkeys(c.row for c in mc))
        look = {(c.row, c.label): c for c in mc}
        w = max([len(r) for r in rows] + [10])
        head = " ".join(f"{lab[:12]:>12}" for _, lab in cols)
        out.append(f"{model}\n{'':<{w}} {head}")
        for r in rows:
            cells_txt = " ".join(f"{SHORT.get(look[(r, lab)].verdict, '?') if (r, lab) in look else '':>12}"
                                 for _, lab in cols)
            out.append(f"{r:<{w}} {cells_txt}")
    out.append("ok = survives, DEG = degrades, COL = collapses, ? = CI straddles a threshold")
    return "\n".join(out)
