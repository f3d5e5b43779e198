"""A finished row leaving the batch: in place (``generate._drop``) against the copying ``_select``, in one batch.

The batch is the default sweep's baseline batch captured by ``benchmarks/generation_batch.py --dump`` (its 48
prompts of six tasks, pickled ``Request`` objects). Each run is a fresh process: SmolLM2-135M in fp32 from the
converted cache, the sweep's ``batch_size="auto"`` with a 512 MiB KV budget, and one way of dropping rows:
``in-place`` (this engine) or ``copy`` (``_drop`` replaced by the copying ``_select`` it replaced, which re-lays
every kept row of every layer out in new buffers and drops the leading columns that are padding in every kept
row). The ways alternate, ``--repeats`` times each, on an otherwise idle machine. Each run records the batch's
seconds, the seconds spent dropping rows (``_drop`` / ``_select``) and merging refills, the decode forward
calls' seconds, the attention's work (rows x cached width, summed over the decode steps), and whether its
answers equal the first run's.

    python benchmarks/generation_batch.py --dump --out results/bench/batch     # once: captures the batch
    python benchmarks/row_drop.py --requests results/bench/batch/requests.pkl --repeats 3 --out results/bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RUN = r"""
import collections, json, pickle, sys, time
import torch
import quanteval.generate as G
from quanteval.config import ModelConfig
from quanteval.models import load_model
requests, way = sys.argv[1], sys.argv[2]
loaded = load_model(ModelConfig(), torch.device("cpu"), torch.float32)
model, tok = loaded.model, loaded.tokenizer
reqs = pickle.load(open(requests, "rb"))
seconds, calls = collections.Counter(), collections.Counter()
def timed(obj, name, label):
    f = getattr(obj, name)
    def w(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); seconds[label] += time.perf_counter() - t; calls[label] += 1
        return r
    setattr(obj, name, w)
if way == "copy":
    G._drop = lambda cache, keep, mask: (G._select(cache, torch.tensor(keep), mask), keep)
timed(G, "_drop", "drop"); timed(G, "_merge", "merge")
forward, work = model.forward, [0]
def fwd(*a, **k):
    decode = k["input_ids"].shape[1] == 1
    if decode:
        work[0] += k["attention_mask"].numel()
    t = time.perf_counter(); o = forward(*a, **k)
    seconds["decode" if decode else "prefill"] += time.perf_counter() - t
    calls["decode" if decode else "prefill"] += 1
    return o
model.forward = fwd
t0 = time.perf_counter()
gens = G.generate_requests(model, tok, reqs, "auto", kv_budget=512 << 20)
print(json.dumps({"engine": G.__file__, "way": way, "seconds": round(time.perf_counter() - t0, 1),
                  "parts_s": {k: round(v, 2) for k, v in seconds.items()}, "calls": dict(calls),
                  "rows_x_width": work[0], "texts": [g.text for g in gens]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=Path, required=True, help="the batch captured by generation_batch.py --dump")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    a = ap.parse_args()
    if not a.requests.exists():
        sys.exit(f"--requests {a.requests}: no such file; capture it with generation_batch.py --dump")
    rows = []
    for rep in range(a.repeats):
        for way in ("copy", "in-place"):
            out = subprocess.run([sys.executable, "-P", "-c", RUN, str(a.requests), way], check=True,
                                 capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row["repeat"] = rep
            rows.append(row)
            p = row["parts_s"]
            print(f"{way:>8}: {row['seconds']} s (dropping rows {p.get('drop', 0)} s in {row['calls'].get('drop', 0)} "
                  f"calls, merges {p.get('merge', 0)} s, decode {p.get('decode', 0)} s), rows x width "
                  f"{row['rows_x_width'] / 1e6:.2f} M", flush=True)
    first = rows[0]["texts"]
    for r in rows:
        r["same_answers_as_first"] = r.pop("texts") == first
    print(f"answers equal to the first run's: {sum(r['same_answers_as_first'] for r in rows)} of {len(rows)} runs")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"row-drop-{time.strftime('%Y-%m-%d')}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
