"""Tidy exports beside the report: results.csv/.parquet, items.csv/.parquet, verdicts.json.

``results.*`` is one row per run x metric and ``items.*`` one row per item; both are exactly what
``quanteval.results.load(sweep_dir, table="metrics" | "items")`` returns. ``verdicts.json`` holds
one entry per model x task row x variant (label, CI, note), the thresholds, and the recommendation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from quanteval import results
from quanteval.report.cells import Cell
from quanteval.thresholds import Thresholds


def write_exports(out: Path, sweep_dir: Path, cells: list[Cell], recommendation: dict, t: Thresholds) -> None:
    for table, stem in (("metrics", "results"), ("items", "items")):
        df = results.load(sweep_dir, table=table)
        df.to_csv(out / f"{stem}.csv", index=False)
        df.to_parquet(out / f"{stem}.parquet", index=False)
    doc = {"thresholds": dataclasses.asdict(t), "recommendation": recommendation,
           "verdicts": [c.to_json() for c in cells]}
    results.write_atomic(out / "verdicts.json", json.dumps(doc, indent=1, default=str))
