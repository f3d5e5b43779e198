"""B3 probe: what the generation batch's KV-cache budget costs in peak memory and buys in speed.

The CPU batch is sized by a budget of KV-cache bytes (``preset.gen_kv_budget_mb``). For each budget this
runs the same small sweep (the baseline and one variant that generates, RTN w8 by default, on
the default preset's seven tasks) in a fresh process and a fresh results directory, and records:

- the process's peak RSS (``ru_maxrss`` of that process alone, read at its exit: it counts the pages of the
  memory-mapped weights once touched, as ``/usr/bin/time -v`` does);
- its wall time, and each generation batch's seconds, prompts and batch size;
- whether every generated answer is the same as at the other budgets (batch shapes change the matmuls'
  summation order, so a tie may flip; differing answers are counted, not hidden). Each budget's answers
  are kept under ``--out``, so budgets measured in separate invocations are compared too.

Run it on an otherwise idle machine (two torch jobs on 2 cores slow each other several-fold)::

    python benchmarks/kv_budget.py --budgets-mib 1024,512,256 --out results/bench/kv_budget

It writes ``kv_budget.json`` (one row per budget, merged with earlier invocations' rows) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import atexit, json, resource, sys
import quanteval.generate as g
STATS = sys.argv[1]
batches = []
_auto = g.auto_batch_size
def auto(*a, **k):
    bs = _auto(*a, **k)
    batches.append({"prompts": a[1] if len(a) > 1 else k.get("n_prompts"), "batch_size": bs})
    return bs
g.auto_batch_size = auto
def done():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(STATS, "w") as f:
        json.dump({"peak_rss": peak, "batches": batches}, f)
atexit.register(done)
from quanteval.cli import main
sys.argv = ["quanteval"] + sys.argv[2:]
main()
"""


def answers(runs: Path) -> dict[str, list[str]]:
    """Each generative run's answers (by the run file's name without its key, which holds the commit)."""
    out = {}
    for f in sorted(runs.glob("*.items.jsonl")):
        name = "__".join(f.name.split("__")[:3])
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows and "output" in rows[0]:
            out[name] = [r["output"] for r in rows]
    return out


def batch_seconds(runs: Path) -> list[dict]:
    seen, out = set(), []
    for f in sorted(runs.glob("*.json")):
        gen = json.loads(f.read_text()).get("generation") or {}
        if gen.get("generated_by") and gen.get("batch_s") is not None:
            key = (gen["generated_by"], f.name.split("__")[2])
            if key not in seen:
                seen.add(key)
                out.append({"variant": key[1], "tasks": gen.get("batched_with"), "prompts": gen.get("prompts"),
                            "seconds": gen["batch_s"], "tokens": gen.get("batch_tokens")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets-mib", default="1024,512,256")
    ap.add_argument("--method", default="none,rtn")
    ap.add_argument("--bits", default="8")
    ap.add_argument("--out", type=Path, default=Path("results/bench/kv_budget"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "kv_budget.json"
    rows = {r["budget_mib"]: r for r in (json.loads(table.read_text()) if table.exists() else [])}
    for mib in [int(x) for x in args.budgets_mib.split(",")]:
        with tempfile.TemporaryDirectory(prefix="kvb-") as tmp:
            stats = Path(tmp) / "stats.json"
            cmd = [sys.executable, "-c", CHILD, str(stats), f"results_dir={tmp}/res", f"method={args.method}",
                   f"bits={args.bits}", f"preset.gen_kv_budget_mb={mib}"]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ))
            wall = time.perf_counter() - t0
            child = json.loads(stats.read_text())
            runs = Path(tmp) / "res" / "default" / "runs"
            (args.out / f"answers-{mib}.json").write_text(json.dumps(answers(runs), indent=0))
            row = {"budget_mib": mib, "wall_s": round(wall, 1), "peak_rss_mb": round(child["peak_rss"] / 1e6),
                   "batch_sizes": sorted({b["batch_size"] for b in child["batches"]}),
                   "generation": batch_seconds(runs), "method": args.method, "bits": args.bits,
                   "date": time.strftime("%Y-%m-%d")}
            rows[mib] = row
            gen_s = sum(g["seconds"] for g in row["generation"])
            print(f"budget {mib:5d} MiB: wall {wall:6.1f} s, peak RSS {row['peak_rss_mb']} MB, batch "
                  f"{row['batch_sizes']}, generation {gen_s:.1f} s", flush=True)
    kept = {m: json.loads((args.out / f"answers-{m}.json").read_text()) for m in rows
            if (args.out / f"answers-{m}.json").exists()}
    for m, row in rows.items():  # answers that differ from each other budget's, run by run
        row["answers"] = sum(len(v) for v in kept.get(m, {}).values())
        row["answers_differing"] = {str(o): sum(a != b for k in kept[m] for a, b in zip(kept[m][k], kept[o].get(k, [])))
                                    for o in kept if o != m and m in kept}
        print(f"budget {m:5d} MiB: {row['answers']} answers; differing from budget (MiB): {row['answers_differing']}")
    table.write_text(json.dumps(sorted(rows.values(), key=lambda r: -r["budget_mib"]), indent=1))


if __name__ == "__main__":
    main()
