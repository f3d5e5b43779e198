"""What importing a transformers causal LM costs a process, with and without hqq (``quanteval.hf_cache``).

    python benchmarks/import_cost.py --repeat 5 --out benchmarks/results/import-cost-DATE.json

Each measurement is a fresh interpreter that imports torch, then a Llama model class (which imports
transformers' ``cache_utils``): either plainly (transformers imports hqq when it is installed) or after
``quanteval.hf_cache.load()``. It reports the seconds from torch's import to the model class's, and the
resident memory after (``VmRSS``, with its anonymous and file-backed parts from ``/proc/self/status``).
The two kinds alternate, ``--repeat`` times each; the medians and their ratio are printed. Needs an idle
machine for the seconds (the memory does not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, sys, time
import torch
t0 = time.perf_counter()
if sys.argv[1] == "hf_cache":
    from quanteval import hf_cache
    hf_cache.load()
import transformers.models.llama.modeling_llama
t = time.perf_counter() - t0
d = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith(("VmRSS", "RssAnon", "RssFile")))
print(json.dumps({"seconds": t, "hqq_imported": "hqq" in sys.modules, "modules": len(sys.modules),
                  **{k: int(v.split()[0]) / 1024 for k, v in d.items()}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    runs: dict[str, list[dict]] = {"plain": [], "hf_cache": []}
    for _ in range(a.repeat):
        for kind in runs:
            r = subprocess.run([sys.executable, "-c", PROBE, kind], capture_output=True, text=True, check=True)
            runs[kind].append(json.loads(r.stdout.strip().splitlines()[-1]))
    summary = {}
    for kind, rs in runs.items():
        summary[kind] = {k: statistics.median(r[k] for r in rs) for k in ("seconds", "VmRSS", "RssAnon", "RssFile",
                                                                           "modules")}
        summary[kind]["hqq_imported"] = all(r["hqq_imported"] for r in rs)
        print(f"{kind:9s} {summary[kind]['seconds']:5.2f} s   VmRSS {summary[kind]['VmRSS']:5.0f} MiB "
              f"(anon {summary[kind]['RssAnon']:4.0f}, file {summary[kind]['RssFile']:4.0f})   "
              f"{summary[kind]['modules']:.0f} modules   hqq imported: {summary[kind]['hqq_imported']}")
    ratio = summary["hf_cache"]["seconds"] / summary["plain"]["seconds"]
    print(f"hf_cache / plain: {ratio:.2f}x the seconds, {summary['hf_cache']['VmRSS'] - summary['plain']['VmRSS']:+.0f} "
          "MiB resident")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"runs": runs, "median": summary, "seconds_ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
