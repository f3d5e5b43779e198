"""The report: reads a sweep's run files and writes a self-contained folder (HTML, charts, exports).

This package reads results only and never imports torch (directly or through another quanteval
module), so reports build anywhere, e.g. on results copied from a cluster.

- ``build(sweep_dir, out_dir=None, thresholds=None) -> Report``: write ``index.html`` (default
  ``<sweep_dir>/report/``), charts, drill-down pages and exports; ``build_report`` returns the path.
- ``Thresholds``: verdict thresholds (``quanteval.thresholds``, re-exported here).
- ``summary(cells)``: the compact verdict table printed at the end of a sweep.
- ``failing(cells, level)``: the deciding cells ``--fail-on level`` matches.
- ``main(argv)``: the ``quanteval-report`` console script; returns its exit status (0, 1 when
  ``--fail-on collapses|degrades`` matches a deciding cell, to gate a deployment pipeline, 2 on bad
  input). Its threshold flags (``--survives``, ``--kl-collapses``, ...) are ``Thresholds.flags()``;
  a value outside its range is one line, e.g. ``quanteval-report: error: --survives=2: must be in
  (collapses, 1] (collapses=0.5)``, before anything is read.

Example::

    $ quanteval-report results/default --fail-on collapses
    results/default/report/index.html
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from quanteval.report.cells import Cell
from quanteval.report.html import Report, build, build_report, verdict
from quanteval.thresholds import ThresholdError, Thresholds

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


def _as_typed(kind: type):
    """An argparse ``type`` that checks the text reads as ``kind`` but keeps the text, so that a range error
    quotes the value as it was typed (``--survives=2``, not ``2.0``)."""
    def check(text: str) -> str:
        kind(text)  # a ValueError reads "argument --x: invalid float value: 'y'"
        return text

    check.__name__ = kind.__name__
    return check


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Write the report (index.html, charts, item pages, exports) of a quanteval sweep.")
    p.add_argument("sweep_dir", type=Path, help="sweep folder holding runs/*.json")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep_dir>/report)")
    p.add_argument("--fail-on", choices=sorted(FAIL_LEVELS), default=None,
                   help="exit 1 when any deciding cell collapses (or degrades), CI included")
    for name, default, help_ in Thresholds.flags():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_as_typed(type(default)), default=None,
                       help=f"{help_} (default: {default})")
    return p


def _thresholds(args: argparse.Namespace) -> Thresholds:
    """The thresholds the flags set (the others keep their defaults); a bad value raises _UsageError naming its flag."""
    kinds = {name: type(default) for name, default, _ in Thresholds.flags()}
    given = {name: getattr(args, name) for name in kinds if getattr(args, name) is not None}
    try:
        return Thresholds(**{name: kinds[name](text) for name, text in given.items()})
    except ThresholdError as e:
        raise _UsageError(ThresholdError(e.name, given.get(e.name, e.value), e.rule).flag()) from None


def main(argv: list[str] | None = None) -> int:
    """Build the report and print the path of its index.html; 2 on bad input, 1 when --fail-on matches.

    ``argv`` defaults to ``sys.argv[1:]``; errors and warnings go to stderr, one line each::

        main(["results/default", "--fail-on", "collapses", "--kl-survives", "0.05"])
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = _parser().parse_args(argv)
        t = _thresholds(args)
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
