"""The README's mixed-precision table: uniform RTN/GPTQ at 3 and 4 bits against method=mixed at equal bits.

Runs (default preset, the embedded SmolLM2) and then reads the sweep ``mixed`` under ``--results``::

    quanteval sweep_name=mixed method=none,rtn,gptq bits=8,4,3 task=wikitext2
    quanteval sweep_name=mixed method=mixed method.base=rtn,gptq method.budget=3.3,3.8,4.31 task=wikitext2
    python benchmarks/mixed.py --results results            # add --run to run the two sweeps first

The README's HQQ rows and the auto-round RTN control come from three more sweeps into the same directory::

    quanteval sweep_name=mixed task=wikitext2 method=hqq bits=8,4,3
    quanteval sweep_name=mixed task=wikitext2 method=autoround method.iters=0 bits=3,4
    quanteval sweep_name=mixed task=wikitext2 method=mixed method.base=hqq method.budget=3.3,3.704,4.5

and the AWQ rows from two more::

    quanteval sweep_name=mixed task=wikitext2 method=awq bits=8,4,3
    quanteval sweep_name=mixed task=wikitext2 method=mixed method.base=awq method.budget=3.3,3.8,4.31

The second sweep computes the sensitivity tables it needs (task=sensitivity at 2, 3, 4 and 8 bits, the
default ``method.choices``, for each base) first. A run file is keyed with the git commit, so a sweep
rerun after a commit writes new files beside the old: the tables read the newest file of each variant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path


def newest(paths) -> list[dict]:
    """The newest ok run of each variant label among ``paths`` (older commits' files are skipped)."""
    by = {}
    for p in paths:
        r = json.loads(p.read_text())
        if r.get("status") == "ok" and (r["variant"]["label"] not in by
                                        or r["created"] > by[r["variant"]["label"]]["created"]):
            by[r["variant"]["label"]] = r
    return list(by.values())


def tables(sweep: Path) -> str:
    out = ["| variant | effective bits | measured KL (test) | ppl | predicted KL (validation, sum of units) |",
           "|---|---|---|---|---|"]
    rows = []
    for r in newest(sorted((sweep / "runs").glob("wikitext2__*.json"))):
        mixed = (r.get("quantization") or {}).get("mixed") or {}
        rows.append((r["compression"]["effective_bits"], r["variant"]["label"], r["metrics"]["kl_mean"],
                     r["metrics"]["ppl"], mixed.get("predicted_kl")))
    for eff, label, kl, ppl, pred in sorted(rows, key=lambda x: (-x[0] if x[0] == 16 else x[0], x[1])):
        out.append(f"| {label} | {eff:.3f} | {kl:.3g} | {ppl:.2f} | {'' if pred is None else f'{pred:.3g}'} |")
    out += ["", "| table | units | KL sum | KL max | proxy Spearman rho | seconds |", "|---|---|---|---|---|---|"]
    for r in sorted(newest(sorted((sweep / "runs").glob("sensitivity__*.json"))),
                    key=lambda r: r["variant"]["label"]):
        m = r["metrics"]
        out.append(f"| {r['variant']['label']} | {m['n_measured']}/{m['n_units']} | {m['kl_sum']:.3g} | "
                   f"{m['kl_max']:.3g} | {m['proxy_rho']:.2f} | {r['timings']['eval_s']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results", type=Path)
    ap.add_argument("--run", action="store_true", help="run the two sweeps first")
    a = ap.parse_args()
    if a.run:
        common = [f"results_dir={a.results}", "sweep_name=mixed", "task=wikitext2"]
        subprocess.run(["quanteval", *common, "method=none,rtn,gptq", "bits=8,4,3"], check=True)
        subprocess.run(["quanteval", *common, "method=mixed", "method.base=rtn,gptq", "method.budget=3.3,3.8,4.31"],
                       check=True)
    print(tables(a.results / "mixed"))


if __name__ == "__main__":
    main()
