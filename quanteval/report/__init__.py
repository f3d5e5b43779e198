"""The report: reads a sweep's run files and writes a self-contained folder (HTML, charts, exports).

This package reads results only and never imports torch (directly or through another quanteval
module), so reports build anywhere, e.g. on results copied from a cluster.

- ``build(sweep_dir, out_dir=None, thresholds=None) -> Report``: write ``index.html`` (default
  ``<sweep_dir>/report/``), charts, drill-down pages and exports; ``build_report`` returns the path.
- ``Thresholds``: verdict thresholds (see ``quanteval.report.cells``).
- ``summary(cells)``: the compact verdict table printed at the end of a sweep.
- ``main(argv)``: the ``quanteval-report`` console script; ``--fail-on collapses|degrades`` exits 1
  when any deciding cell matches, to gate a deployment pipeline.

Example::

    $ quanteval-report results/default --fail-on collapses
    results/default/report/index.html
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from quanteval.report.cells import Cell, Thresholds
from quanteval.report.html import Report, build, build_report, verdict

__all__ = ["Report", "Thresholds", "build", "build_report", "failing", "main", "summary", "verdict"]

PROG = "quanteval-report"
FAIL_LEVELS = {"collapses": ("collapses", "collapses?"),
               "degrades": ("degrades", "degrades?", "collapses", "collapses?", "survives?")}
SHORT = {"survives": "ok", "survives?": "ok?", "degrades?": "deg?", "degrades": "DEG", "collapses?": "COL?",
         "collapses": "COL", "baseline": "base", "failed": "FAIL", "no baseline": "nobase", "unknown": "-"}


class _UsageError(Exception):
    """Raised instead of argparse's exit so that every error is one line on stderr."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


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


def _parser() -> argparse.ArgumentParser:
    d = Thresholds()
    p = _Parser(prog=PROG, description="Write the report (index.html, charts, item pages, exports) of a quanteval sweep.")
    p.add_argument("sweep_dir", type=Path, help="sweep folder holding runs/*.json")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep_dir>/report)")
    p.add_argument("--fail-on", choices=sorted(FAIL_LEVELS), default=None,
                   help="exit 1 when any deciding cell collapses (or degrades), CI included")
    for name, help_ in (("survives", "retained quality at or above: survives"),
                        ("collapses", "retained quality below: collapses"),
                        ("kl_survives", "mean KL below: survives"), ("kl_collapses", "mean KL at or above: collapses"),
                        ("top1_survives", "same-top-token rate at or above: survives"),
                        ("top1_collapses", "same-top-token rate below: collapses"),
                        ("floor", "a baseline within this of chance is 'at floor'")):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name),
                       help=f"{help_} (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Build the report and print the path of its index.html; 2 on bad input, 1 when --fail-on matches."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = _parser().parse_args(argv)
        t = Thresholds(survives=args.survives, collapses=args.collapses, kl_survives=args.kl_survives,
                       kl_collapses=args.kl_collapses, top1_survives=args.top1_survives,
                       top1_collapses=args.top1_collapses, floor=args.floor)
        report = build(args.sweep_dir, args.out, t)
    except (_UsageError, ValueError, OSError) as e:
        message = " ".join(str(e).split())  # always one line
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    for w in report.warnings:
        print(f"{PROG}: warning: {w}", file=sys.stderr)
    print(report.index)
    if args.fail_on:
        bad = failing(report.cells, args.fail_on)
        if bad:
            names = ", ".join(sorted({f"{c.row} {c.label} ({c.verdict})" for c in bad})[:10])
            print(f"{PROG}: {len(bad)} cell(s) match --fail-on {args.fail_on}: {names}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
