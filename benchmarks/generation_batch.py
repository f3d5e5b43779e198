"""One generation batch, engine against engine: its time, its peak memory, and whether the answers agree.

The batch is the default sweep's baseline batch: the 48 prompts of its six generative tasks, each with its
own token cap and stop strings, as the sweep builds them. ``--dump`` captures them once by running the
README's main command for the baseline (``method=none``) until it reaches ``generate_requests``, and saves
them (pickled ``Request`` objects). Then each ``--engine`` (a checkout of quanteval: ``.`` for this one, or
a ``git worktree`` of another commit) runs the batch in a fresh process: SmolLM2-135M in fp32 from the
converted cache, the sweep's ``batch_size="auto"`` with ``--budget-mib`` of KV budget. Engines alternate,
``--repeats`` times each, on an otherwise idle machine (2 cores: two torch processes slow each other).

Each run records its seconds, the process's resident memory before the batch (the model loaded, its
memory-mapped weights not yet touched) and its peak (``VmHWM``: the weights' pages once touched count, as
``/usr/bin/time -v`` counts them), the tokens generated, and its answers; the summary says whether every
run's answers equal the first's.

    git worktree add /tmp/prev <commit>
    python benchmarks/generation_batch.py --dump --out results/bench/batch        # about 4 min, once
    python benchmarks/generation_batch.py --engine /tmp/prev --engine . --repeats 2 --out results/bench/batch
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DUMP = r"""
import os, pickle, sys
import quanteval.generate as G
OUT = sys.argv[1]
def dump(model, tok, requests, *a, **k):
    with open(OUT, "wb") as f:
        pickle.dump(list(requests), f)
    print("dumped", len(requests), "requests", k, file=sys.stderr)
    os._exit(0)
G.generate_requests = dump
from quanteval.cli import main
sys.argv = ["quanteval", *sys.argv[2:]]
main()
"""

RUN = r"""
import json, pickle, sys, time
import torch
import quanteval.generate as G
from quanteval.config import ModelConfig
from quanteval.models import load_model
requests, budget = sys.argv[1], int(sys.argv[2]) << 20
loaded = load_model(ModelConfig(), torch.device("cpu"), torch.float32)  # the sweep's loader, default model
model, tok = loaded.model, loaded.tokenizer
reqs = pickle.load(open(requests, "rb"))
def status(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) // 1024
before = status("VmRSS")
t0 = time.perf_counter()
gens = G.generate_requests(model, tok, reqs, "auto", kv_budget=budget)
print(json.dumps({"engine": G.__file__, "seconds": round(time.perf_counter() - t0, 1), "rss_before_mib": before,
                  "peak_mib": status("VmHWM"), "tokens": sum(g.n_tokens for g in gens),
                  "texts": [g.text for g in gens]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", action="store_true", help="capture the default sweep's baseline batch first")
    ap.add_argument("--engine", action="append", default=[], help="a quanteval checkout (repeatable)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget-mib", type=int, default=384)
    ap.add_argument("--out", type=Path, default=Path("results/bench/batch"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    requests = a.out / "requests.pkl"
    if a.dump:
        res = a.out / "dump-results"
        subprocess.run([sys.executable, "-c", DUMP, str(requests), f"results_dir={res}", "method=none"], check=True)
    if not a.engine:
        return
    if not requests.exists():
        sys.exit(f"{requests}: no captured batch; run with --dump first")
    rows = []
    for rep in range(a.repeats):
        for engine in a.engine:
            env = dict(os.environ, PYTHONPATH=str(Path(engine).resolve()))
            # -P: the working directory is not put before PYTHONPATH (run from a checkout, ``python -c``
            # imported that checkout's quanteval whatever --engine said; results before 2026-12-07 22:20 UTC
            # compared the working directory's engine with itself)
            out = subprocess.run([sys.executable, "-P", "-c", RUN, str(requests), str(a.budget_mib)], env=env,
                                 check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            if not Path(row["engine"]).resolve().is_relative_to(Path(engine).resolve()):
                sys.exit(f"--engine {engine}: the run imported {row['engine']} instead")
            row.update(checkout=engine, repeat=rep, budget_mib=a.budget_mib)
            rows.append(row)
            print(f"{engine}: {row['seconds']} s, resident before {row['rss_before_mib']} MiB, "
                  f"peak {row['peak_mib']} MiB, {row['tokens']} tokens", flush=True)
    first = rows[0]["texts"]
    same = [r["texts"] == first for r in rows]
    print(f"answers equal to the first run's: {sum(same)} of {len(rows)} runs")
    for r in rows:
        r["same_answers_as_first"] = r.pop("texts") == first
    (a.out / f"generation-batch-{time.strftime('%Y-%m-%d')}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
