"""B3 probe: where a sweep's peak resident memory is reached, stage by stage.

Runs ``quanteval`` with the given overrides in this process, with a thread that reads ``VmRSS`` from
``/proc/self/status`` every ``--every`` seconds and tags each reading with what the sweep was doing (the
last log line quanteval wrote, and the progress bar running, if any). At the end it prints the process's
peak (``VmHWM``, which counts memory-mapped weight pages once touched, as ``/usr/bin/time -v`` does), the
highest reading of each stage, and writes every reading to ``--out`` (JSON) for a plot.

    python benchmarks/memory_peak.py --out results/bench/memory -- results_dir=/tmp/mem method=none,rtn bits=8

Memory needs no idle machine, but the seconds it prints are not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path


def status() -> dict[str, float]:
    d = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("VmRSS", "VmHWM")))
    return {k: int(v.split()[0]) / 1024 for k, v in d.items()}  # MB


class _Stage(logging.Handler):
    """Keeps the last quanteval log message (what the sweep is doing now)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.now = "start"

    def emit(self, record):
        if record.name.startswith("quanteval"):
            self.now = record.getMessage()[:110]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=float, default=0.25, help="seconds between readings")
    ap.add_argument("--out", type=Path, default=Path("results/bench/memory"))
    ap.add_argument("overrides", nargs="*", help="quanteval's overrides (after --)")
    a = ap.parse_args()

    from tqdm.auto import tqdm

    stage = _Stage()
    logging.getLogger("quanteval").addHandler(stage)  # not the root logger's: Hydra replaces those
    readings, stop = [], threading.Event()
    t0 = time.perf_counter()

    def bar() -> str:
        try:  # tqdm's live bars: a weak set that other threads change (a bar may be half made or closed)
            bars = [b for b in list(getattr(tqdm, "_instances", ())) if not getattr(b, "disable", False)]
            inner = [b for b in bars if not (getattr(b, "desc", "") or "").startswith("sweep")]  # the phase's bar
            return (getattr((inner or bars)[-1], "desc", "") or "") if bars else ""
        except Exception:  # noqa: BLE001 - a reading without its bar, rather than a sampler that stops
            return ""

    def sample():
        while not stop.wait(a.every):
            readings.append({"t": round(time.perf_counter() - t0, 2), "rss_mb": status()["VmRSS"],
                             "stage": stage.now, "bar": bar()})

    threading.Thread(target=sample, daemon=True).start()
    from quanteval.cli import main as quanteval

    sys.argv = ["quanteval", *a.overrides]
    try:
        quanteval()
    except SystemExit as e:  # Hydra exits after the sweep
        if e.code not in (0, None):
            raise
    finally:
        stop.set()
        peak = status()["VmHWM"]
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "memory_peak.json").write_text(json.dumps({"overrides": a.overrides, "peak_mb": peak,
                                                            "readings": readings}, indent=0))
    by_stage: dict[tuple, float] = {}
    for r in readings:
        key = (r["bar"], r["stage"])
        by_stage[key] = max(by_stage.get(key, 0), r["rss_mb"])
    print(f"peak (VmHWM) {peak:.0f} MB over {len(readings)} readings; the highest stages:", file=sys.stderr)
    for (b, s), mb in sorted(by_stage.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {mb:6.0f} MB  {b or '-':34s} {s}", file=sys.stderr)


if __name__ == "__main__":
    main()
