"""The allocator's setting (``quanteval.allocator``): glibc's default against a fixed 1 MB mmap threshold.

Two workloads, each as separate ``quanteval`` processes alternating ``QUANTEVAL_MMAP_THRESHOLD=0``
(glibc's default) and the default setting (1 MB), each under ``/usr/bin/time -v``:

- **evaluate**: one variant's jobs (RTN w8 on the default preset's seven tasks) in one results directory
  whose baseline and quantisation are computed first, once (a warm-up sweep, untimed): the generation
  batch's seconds (the run files' ``generation.batch_s``), the evaluation's, and whether every answer is
  the same under both settings;
- **quantise**: GPTQ w4 on WikiText-2 in a fresh results directory each time (its calibration and its
  Hessians allocate and free blocks of a few MB): the run file's ``quantize_s`` and its KL.

For each process: wall time and peak RSS. Run it on an otherwise idle machine (about 3 min per process)::

    python benchmarks/allocator.py --out results/bench/allocator --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"glibc": "0", "1MB": str(1 << 20)}
QUANTEVAL = [sys.executable, "-c", "import sys; sys.argv[0]='quanteval'; from quanteval.cli import main; main()"]


def _sweep(results: Path, name: str, threshold: str | None, *overrides: str) -> dict:
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if threshold is not None:
        env["QUANTEVAL_MMAP_THRESHOLD"] = threshold
    cmd = ["/usr/bin/time", "-v", *QUANTEVAL, f"results_dir={results}", f"sweep_name={name}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"quanteval {name} failed:\n{proc.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None}


def _runs(results: Path, name: str) -> dict:
    """Per sweep: the generation batch's seconds, the evaluation's seconds, and every answer by task."""
    from quanteval.results import read_items

    batch, evals, answers = None, 0.0, {}
    for f in sorted((results / name / "runs").glob("*.json")):
        rec = json.loads(f.read_text())
        evals += (rec.get("timings") or {}).get("eval_s", 0.0)
        gen = rec.get("generation") or {}
        batch = gen.get("batch_s", batch)
        if rec.get("items_file"):
            answers[rec["task"]] = [it.get("output") for it in read_items(f.parent / rec["items_file"])]
    return {"batch_s": batch, "eval_s": round(evals, 1), "answers": answers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/bench/allocator"))
    ap.add_argument("--repeats", type=int, default=1, help="processes per setting, alternating")
    ap.add_argument("--first-repeat", type=int, default=0, help="number the repeats from here (a rerun into --out)")
    ap.add_argument("--settings", default=",".join(f"{k}={v}" for k, v in SETTINGS.items()),
                    help="label=bytes, comma-separated (0: glibc's default)")
    ap.add_argument("--no-quantise", action="store_true", help="the evaluate workload only")
    a = ap.parse_args()
    settings = dict(x.split("=", 1) for x in a.settings.split(","))
    results = (a.out / "results").resolve()
    variant = ["method=rtn", "bits=8"]
    _sweep(results, "warm", None, "method=none,rtn", "bits=8")  # the baseline and RTN w8's weights, cached
    rows = []
    for i in range(a.first_repeat, a.first_repeat + a.repeats):
        for label, threshold in settings.items():
            name = f"{label}-{i}"
            row = {"setting": label, "repeat": i, **_sweep(results, name, threshold, *variant), **_runs(results, name)}
            rows.append(row)
            print(f"{label:<6} #{i}: wall {row['wall_s']:.1f} s, generation batch {row['batch_s']} s, "
                  f"evaluation {row['eval_s']} s, peak RSS {row['peak_rss_mb']} MB", flush=True)
    reference = rows[0]["answers"]
    same = all(r["answers"] == reference for r in rows)
    for r in rows:
        del r["answers"]
    quant = []
    for i in range(a.first_repeat, a.first_repeat + a.repeats) if not a.no_quantise else ():
        for label, threshold in settings.items():
            fresh = (a.out / f"quantise-{label}-{i}").resolve()
            row = {"setting": label, "repeat": i,
                   **_sweep(fresh, "gptq", threshold, "method=gptq", "bits=4", "task=wikitext2")}
            rec = next(json.loads(f.read_text()) for f in (fresh / "gptq" / "runs").glob("wikitext2*gptq*.json"))
            row.update(quantize_s=round(rec["timings"]["quantize_s"], 1), kl_mean=rec["metrics"]["kl_mean"])
            quant.append(row)
            print(f"{label:<6} #{i}: GPTQ w4 quantise {row['quantize_s']} s (wall {row['wall_s']} s, "
                  f"peak RSS {row['peak_rss_mb']} MB), KL {row['kl_mean']:.4g}", flush=True)
    out = {"variant": variant, "settings": settings, "rows": rows, "same_answers": same, "quantise": quant,
           "same_kl": len({r["kl_mean"] for r in quant}) == 1 if quant else None}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"allocator-{a.first_repeat}.json").write_text(json.dumps(out, indent=1))
    print(f"same answers under both settings: {same}")


if __name__ == "__main__":
    main()
