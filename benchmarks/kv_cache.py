"""The README's KV-cache tables: the cache alone (16-bit weights, kv 8/4/2) against 4-bit weights (RTN w4 with
kv 16/4), on WikiText-2 KL, the long-window KL by position, and needle accuracy by length.

Runs (default preset, the embedded SmolLM2, 2 idle CPU cores) and then reads the sweep ``kv`` under
``--results``::

    quanteval sweep_name=kv method=none kv_bits=16,8,4,2 task=wikitext2,wikitext2_long,needle
    quanteval sweep_name=kv method=rtn bits=4 kv_bits=16,4 task=wikitext2,wikitext2_long,needle
    python benchmarks/kv_cache.py --results results            # add --run to run the two sweeps first

Sizes are the packed cache's (``quanteval.kvsize``): fp16 at kv16; b bits plus an fp16 scale and minimum
per group of 32, and the key residual at 16 bits, otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from long_context import _runs  # the sweep's run files by (task, label): benchmarks/long_context.py

ORDER = ["baseline", "w16 · kv8", "w16 · kv4", "w16 · kv2", "rtn w4 g64", "rtn w4 g64 · kv4"]


def _fmt(v, spec="{:.3g}") -> str:
    return "–" if v is None else spec.format(v)


def tables(sweep: Path) -> str:
    runs = _runs(sweep)
    labels = [lab for lab in ORDER if any(k[1] == lab for k in runs)]
    out = ["| variant | WikiText-2 KL | ppl | same top-1 | KV bytes/token | KV at 8K, MB | weights MB |",
           "|---|---|---|---|---|---|---|"]
    for lab in labels:
        r = runs.get(("wikitext2", lab))
        if not r or r.get("status") != "ok":
            continue
        m, kv = r["metrics"], r.get("kv_cache", {})
        long = runs.get(("wikitext2_long", lab)) or {}
        at8k = (long.get("kv_cache") or {}).get("bytes_at_context")
        out.append(f"| {lab} | {m['kl_mean']:.3g} | {m['ppl']:.2f} | {m['same_top1']:.3f} | "
                   f"{_fmt(kv.get('bytes_per_token'), '{:.0f}')} | {_fmt(at8k and at8k / 1e6, '{:.1f}')} | "
                   f"{r['compression']['model_bytes'] / 1e6:.0f} |")
    out.append("")
    wl = {lab: runs.get(("wikitext2_long", lab)) for lab in labels}
    buckets = next((list(r["metrics"]["by_position"]) for r in wl.values()
                    if r and r.get("metrics", {}).get("by_position")), [])
    out.append("| variant | " + " | ".join(f"KL {b}" for b in buckets) + " | KL all | last / first |")
    out.append("|---" * (len(buckets) + 3) + "|")
    for lab, r in wl.items():
        if not r or r.get("status") != "ok":
            continue
        byp = r["metrics"]["by_position"]
        first, last = byp[buckets[0]]["kl_mean"], byp[buckets[-1]]["kl_mean"]
        ratio = last / first if first else None
        out.append(f"| {lab} | " + " | ".join(_fmt(byp[b]["kl_mean"]) for b in buckets)
                   + f" | {r['metrics']['kl_mean']:.3g} | {_fmt(ratio, '{:.2f}')} |")
    out.append("")
    needle = {lab: runs.get(("needle", lab)) for lab in labels}
    lengths = sorted({int(k) for r in needle.values() if r and r.get("breakdown") for k in r["breakdown"]["length"]})
    out.append("| variant | " + " | ".join(f"needle @ {n // 1024}K" for n in lengths)
               + " | needle all | flips vs baseline | tf-KL |")
    out.append("|---" * (len(lengths) + 4) + "|")
    for lab, r in needle.items():
        if not r or r.get("status") != "ok":
            continue
        b, m = r["breakdown"]["length"], r["metrics"]
        cells = [f"{b[str(n)]['acc']:.2f} ({b[str(n)]['n']})" if str(n) in b else "–" for n in lengths]
        flips = m.get("flip_rate")
        out.append(f"| {lab} | " + " | ".join(cells) + f" | {m['acc']:.2f} | {_fmt(flips, '{:.2f}')} | "
                   f"{_fmt(m.get('tf_kl_mean'))} |")
    out.append("")
    out.append("| variant | wikitext2 s | wikitext2_long s | needle s |")
    out.append("|---|---|---|---|")
    for lab in labels:
        secs = [(runs.get((t, lab)) or {}).get("timings", {}).get("eval_s") for t in ("wikitext2", "wikitext2_long", "needle")]
        out.append(f"| {lab} | " + " | ".join(_fmt(s, "{:.0f}") for s in secs) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results", type=Path)
    ap.add_argument("--run", action="store_true", help="run the two sweeps first")
    a = ap.parse_args()
    if a.run:
        common = [f"results_dir={a.results}", "sweep_name=kv", "task=wikitext2,wikitext2_long,needle"]
        subprocess.run(["quanteval", *common, "method=none", "kv_bits=16,8,4,2"], check=True)
        subprocess.run(["quanteval", *common, "method=rtn", "bits=4", "kv_bits=16,4"], check=True)
    print(tables(a.results / "kv"))


if __name__ == "__main__":
    main()
