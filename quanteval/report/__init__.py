"""The report: reads a sweep's run files and writes a self-contained HTML page with PNG charts.

This package reads results only and never imports torch (directly or through
another quanteval module), so reports build on machines without it.

- ``build_report(sweep_dir, out_dir=None, thresholds=None) -> Path``: write
  ``<out_dir>/index.html`` (default ``<sweep_dir>/report/``) and its charts.
- ``Thresholds(kl_survives=0.1, kl_collapses=1.0)``: the mean-KL cut-offs of a verdict.
- ``verdict(kl_mean, thresholds)``: ``"survives"`` | ``"degrades"`` | ``"collapses"`` | ``"unknown"``.
- ``main(argv)``: the ``quanteval-report`` console script.

Example::

    $ quanteval-report results/default --kl-survives 0.05
    results/default/report/index.html
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from quanteval.report.html import Thresholds, build_report, verdict

__all__ = ["Thresholds", "build_report", "main", "verdict"]

PROG = "quanteval-report"


class _UsageError(Exception):
    """Raised instead of argparse's exit so that every error is one line on stderr."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    defaults = Thresholds()
    p = _Parser(prog=PROG, description="Write an HTML report (index.html + PNG charts) of a quanteval sweep.")
    p.add_argument("sweep_dir", type=Path, help="sweep folder holding runs/*.json")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep_dir>/report)")
    p.add_argument("--kl-survives", type=float, default=defaults.kl_survives,
                   help="mean KL below this: survives (default: %(default)s)")
    p.add_argument("--kl-collapses", type=float, default=defaults.kl_collapses,
                   help="mean KL at or above this: collapses (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Build the report named by ``argv`` and print the path of its index.html; 2 on bad input."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = _parser().parse_args(argv)
        thresholds = Thresholds(kl_survives=args.kl_survives, kl_collapses=args.kl_collapses)
        index = build_report(args.sweep_dir, args.out, thresholds)
    except (_UsageError, ValueError, OSError) as e:
        message = " ".join(str(e).split())  # always one line
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
