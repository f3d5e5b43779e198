"""Two quanteval jobs on the same cores: torch's default threads against ``quanteval.threads``' shares.

Each worker is a fresh process that loads SmolLM2-135M (fp32, CPU) and runs the same fixed work: three
teacher-forced passes over 4 x 512 tokens (a WikiText-2 window's shape) and 64 decode steps at batch 8.
Three runs, one after the other:

- ``alone``: one worker with the default threads (every core);
- ``2 x default``: two workers at once, each with torch's default (every core: oversubscribed);
- ``2 x shared``: two workers at once, each registered as a quanteval job and given its share
  (``quanteval.threads.job_threads``: cores / live jobs), as every ``quanteval`` job does now.

It reports each run's wall time per worker and against ``alone`` (the ratio is what a user running
two sweeps side by side sees). Run on an otherwise idle machine::

    python benchmarks/contention.py --out benchmarks/results

It prints a table and writes ``contention-<date>.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

WORKER = r"""
import sys, time, torch
from pathlib import Path
from quanteval import threads
from quanteval.config import ModelConfig
from quanteval.models import load_model
mode, folder, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
if mode == "shared":
    threads.register(folder)
    t0 = time.time()
    while threads.running_jobs(folder) < n and time.time() - t0 < 60:  # every worker registered
        time.sleep(0.05)
    torch.set_num_threads(threads.job_threads({}, folder)[0])
model = load_model(ModelConfig(), torch.device("cpu"), torch.float32).model
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 40000, (4, 512), generator=g)
t0 = time.perf_counter()
with torch.no_grad():
    for _ in range(3):
        model(input_ids=ids)
    out = model(input_ids=ids[:, :256].repeat(2, 1), use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    for _ in range(64):
        out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
print(f"RESULT {time.perf_counter() - t0:.2f} {torch.get_num_threads()}", flush=True)
"""


def _run(mode: str, n: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, mode, folder, str(n)], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) for _ in range(n)]
        out = []
        for p in procs:
            stdout, _ = p.communicate(timeout=1800)
            line = next(x for x in stdout.splitlines() if x.startswith("RESULT"))
            seconds, threads = line.split()[1:]
            out.append({"seconds": float(seconds), "threads": int(threads)})
        return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    rows = {"alone": _run("default", 1), "2 x default": _run("default", 2), "2 x shared": _run("shared", 2)}
    alone = rows["alone"][0]["seconds"]
    print("| run | threads per worker | seconds per worker | x alone |\n|---|---|---|---|")
    for name, ws in rows.items():
        secs = [w["seconds"] for w in ws]
        print(f"| {name} | {', '.join(str(w['threads']) for w in ws)} | {', '.join(f'{s:.1f}' for s in secs)} | "
              f"{max(secs) / alone:.2f} |")
    result = {"date": str(date.today()), "runs": rows, "alone_s": alone}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"contention-{date.today()}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
