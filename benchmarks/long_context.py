"""The README's long-context tables: needle accuracy by length, var_track by hops, KL by position, time per variant.

Runs (default preset, the embedded SmolLM2; about 40 minutes on 2 idle CPU cores) and then reads the
sweep ``long`` under ``--results``::

    quanteval sweep_name=long method=none,rtn bits=8,4,3 task=wikitext2,needle,var_track,wikitext2_long
    quanteval sweep_name=long method=gptq,awq bits=4 task=wikitext2,needle,var_track,wikitext2_long
    python benchmarks/long_context.py --results results            # add --run to run the two sweeps first

The time per variant is the sum of its long-context runs' evaluation seconds (``timings.eval_s`` of
needle, var_track and wikitext2_long). The baseline's row is its scoring only: computing its answers and
log-probs once is ``timings.baseline_s`` (285 + 62 + 78 s on 2026-12-02), cached for every variant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

LONG_TASKS = ("needle", "var_track", "wikitext2_long")
ORDER = ["baseline", "rtn w8 g64", "rtn w4 g64", "rtn w3 g64", "gptq w4 g64", "awq w4 g64"]


def _runs(sweep: Path) -> dict[tuple[str, str], dict]:
    out = {}
    for p in sorted((sweep / "runs").glob("*.json")):
        rec = json.loads(p.read_text())
        out[(rec["task"], rec["variant"]["label"])] = rec
    return out


def _fmt(v, spec="{:.2f}") -> str:
    return "–" if v is None else spec.format(v)


def tables(sweep: Path) -> str:
    runs = _runs(sweep)
    labels = [lab for lab in ORDER if any(k[1] == lab for k in runs)]
    out = []
    needle = {lab: runs.get(("needle", lab)) for lab in labels}
    lengths = sorted({int(k) for r in needle.values() if r and r.get("breakdown") for k in r["breakdown"]["length"]})
    out.append("| variant | " + " | ".join(f"needle @ {n // 1024}K" for n in lengths) + " | needle all | tf-KL |")
    out.append("|---" * (len(lengths) + 3) + "|")
    for lab, r in needle.items():
        if not r or r.get("status") != "ok":
            out.append(f"| {lab} | " + " | ".join("–" for _ in lengths) + f" | {(r or {}).get('status', '–')} | |")
            continue
        b = r["breakdown"]["length"]
        cells = [f"{b[str(n)]['acc']:.2f} ({b[str(n)]['n']})" if str(n) in b else "–" for n in lengths]
        out.append(f"| {lab} | " + " | ".join(cells) + f" | {r['metrics']['acc']:.2f} | {_fmt(r['metrics'].get('tf_kl_mean'), '{:.3g}')} |")
    out.append("")
    vt = {lab: runs.get(("var_track", lab)) for lab in labels}
    hops = sorted({int(k) for r in vt.values() if r and r.get("breakdown") for k in r["breakdown"]["hops"]})
    out.append("| variant | " + " | ".join(f"var_track {h} hop{'s' if h > 1 else ''}" for h in hops) + " | tf-KL |")
    out.append("|---" * (len(hops) + 2) + "|")
    for lab, r in vt.items():
        if not r or r.get("status") != "ok":
            continue
        b = r["breakdown"]["hops"]
        out.append(f"| {lab} | " + " | ".join(f"{b[str(h)]['acc']:.2f} ({b[str(h)]['n']})" for h in hops)
                   + f" | {_fmt(r['metrics'].get('tf_kl_mean'), '{:.3g}')} |")
    out.append("")
    wl = {lab: runs.get(("wikitext2_long", lab)) for lab in labels}
    buckets = next((list(r["metrics"]["by_position"]) for r in wl.values() if r and r.get("metrics", {}).get("by_position")), [])
    out.append("| variant | " + " | ".join(f"KL {b}" for b in buckets) + " | KL all | ppl |")
    out.append("|---" * (len(buckets) + 3) + "|")
    for lab, r in wl.items():
        if not r or r.get("status") != "ok":
            continue
        m = r["metrics"]
        out.append(f"| {lab} | " + " | ".join(_fmt(m["by_position"][b]["kl_mean"], "{:.3g}") for b in buckets)
                   + f" | {m['kl_mean']:.3g} | {m['ppl']:.2f} |")
    out.append("")
    out.append("| variant | needle s | var_track s | wikitext2_long s | long-context total |")
    out.append("|---|---|---|---|---|")
    for lab in labels:
        secs = [(runs.get((t, lab)) or {}).get("timings", {}).get("eval_s") for t in LONG_TASKS]
        total = sum(s for s in secs if s)
        out.append(f"| {lab} | " + " | ".join(_fmt(s, "{:.0f}") for s in secs) + f" | {total / 60:.1f} min |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results", type=Path)
    ap.add_argument("--run", action="store_true", help="run the two sweeps first")
    a = ap.parse_args()
    if a.run:
        tasks = "task=wikitext2,needle,var_track,wikitext2_long"
        common = [f"results_dir={a.results}", "sweep_name=long", tasks]
        subprocess.run(["quanteval", *common, "method=none,rtn", "bits=8,4,3"], check=True)
        subprocess.run(["quanteval", *common, "method=gptq,awq", "bits=4"], check=True)
    print(tables(a.results / "long"))


if __name__ == "__main__":
    main()
