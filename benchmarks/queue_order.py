"""The generation queue's order, measured on one batch: decode steps, attention work and time.

Runs the default sweep's baseline batch (the 48 prompts ``benchmarks/generation_batch.py --dump``
captured) with the release's queue (``--order steps``: the most decode steps a request may take first,
its cap less its draft) or the one before (``--order prompt``: the longest prompt first), each run in a
fresh process, the orders alternating, on an otherwise idle machine. Every forward call of the model is
timed with its rows and cached width, so a run reports its decode steps, the rows x cached width its
steps attended over (attention work), its prefill time, its seconds, and whether its answers equal the
first run's.

    python benchmarks/generation_batch.py --dump --out results/bench/batch      # once: captures the batch
    python benchmarks/queue_order.py --requests results/bench/batch/requests.pkl --repeats 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RUN = r"""
import json, pickle, sys, time
import torch
import quanteval.generate as G
from quanteval.config import ModelConfig
from quanteval.models import load_model
requests, order, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]) << 20
if order == "prompt":  # the queue before this release: the longest prompt (and draft) first
    G._Engine._order = lambda self, r: (0, -len(self._ids(r)))
loaded = load_model(ModelConfig(), torch.device("cpu"), torch.float32)
model, tok = loaded.model, loaded.tokenizer
calls, inside = [], [0]
forward, decoder = model.forward, model.get_decoder()
dforward = decoder.forward
def timed(*a, **k):  # every forward call of the model: (input shape, cached width, seconds)
    inside[0] += 1
    t = time.perf_counter()
    try:
        out = forward(*a, **k)
    finally:
        inside[0] -= 1
    calls.append((tuple(k["input_ids"].shape), k["attention_mask"].shape[1], time.perf_counter() - t))
    return out
def dtimed(*a, **k):  # a prefill with drafts calls the decoder alone
    t = time.perf_counter()
    out = dforward(*a, **k)
    if not inside[0]:
        calls.append((tuple(k["input_ids"].shape), k["attention_mask"].shape[1], time.perf_counter() - t))
    return out
model.forward, decoder.forward = timed, dtimed
reqs = pickle.load(open(requests, "rb"))
t0 = time.perf_counter()
gens = G.generate_requests(model, tok, reqs, "auto", kv_budget=budget)
seconds = time.perf_counter() - t0
steps = [(s[0], w, dt) for s, w, dt in calls if s[1] == 1]
print(json.dumps({"seconds": round(seconds, 1), "decode_steps": len(steps),
                  "decode_s": round(sum(dt for *_, dt in steps), 1),
                  "prefill_s": round(sum(dt for s, w, dt in calls if s[1] != 1), 1),
                  "row_steps": sum(r for r, _, _ in steps), "row_width": sum(r * w for r, w, _ in steps),
                  "tokens": sum(g.n_tokens for g in gens), "texts": [g.text for g in gens]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=Path, default=Path("results/bench/batch/requests.pkl"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget-mib", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("results/bench/queue-order.json"))
    a = ap.parse_args()
    if not a.requests.exists():
        sys.exit(f"{a.requests}: no captured batch; run benchmarks/generation_batch.py --dump first")
    rows = []
    for rep in range(a.repeats):
        for order in ("prompt", "steps"):
            out = subprocess.run([sys.executable, "-c", RUN, str(a.requests), order, str(a.budget_mib)],
                                 check=True, capture_output=True, text=True).stdout
            row = {"order": order, "repeat": rep, **json.loads(out.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{order}: {row['seconds']} s, {row['decode_steps']} decode steps ({row['decode_s']} s), "
                  f"prefill {row['prefill_s']} s, rows x width {row['row_width']:,}", flush=True)
    first = rows[0]["texts"]
    for r in rows:
        r["same_answers_as_first"] = r.pop("texts") == first
    print(f"answers equal to the first run's: {sum(r['same_answers_as_first'] for r in rows)} of {len(rows)} runs")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                 "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
