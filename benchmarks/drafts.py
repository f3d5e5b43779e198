"""Drafts from the baseline's answers (``preset.gen_draft``): what they save, and that they change no answer.

Runs the same sweep twice into one results directory (the baseline and the quantisation are computed once,
in the first), as two sweep names: ``gen_draft=false`` (plain decoding) then ``gen_draft=true``. Each
variant's generation batch is timed by the sweep itself (its run files' ``generation.batch_s``); this
prints, per variant, both batch times, the tokens taken from drafts, the draft ties, and whether every
answer is the same in both.

Two workloads show the two regimes of the CPU engine:

- ``--workload default``: the default preset's seven tasks (48 prompts, one batch of 32 that is refilled
  once): the batch's time is set by its longest answers (IFEval's, up to 512 tokens), which decode step by
  step whatever the others do;
- ``--workload throughput``: IFEval alone, 64 items at a 256-token cap: more prompts than the batch holds,
  so every decode step saved is time saved.

Run it on an otherwise idle machine::

    python benchmarks/drafts.py --workload throughput --out results/bench/drafts          # about 9 min
    python benchmarks/drafts.py --workload default --out results/bench/drafts             # about 12 min

``--summarize DIR`` only reads a results directory such runs wrote. It writes ``drafts-<workload>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

WORKLOADS = {
    "default": ["method=rtn", "bits=8"],
    "throughput": ["method=none,rtn", "bits=8", "task=ifeval", "task.limit=64", "preset.max_new_tokens.ifeval=256"],
}


def summarize(results: Path) -> list[dict]:
    """Per variant and sweep: the generation batch's seconds and tokens, drafted tokens, ties; answers compared."""
    from quanteval.results import read_items

    rows = {}
    for flag in ("false", "true"):
        for f in sorted((results / f"draft-{flag}" / "runs").glob("*.json")):
            rec = json.loads(f.read_text())
            gen = rec.get("generation")
            if not gen:
                continue
            row = rows.setdefault(rec["variant"]["label"], {"variant": rec["variant"]["label"], "answers": {}})
            items = read_items(f.parent / rec["items_file"])
            row["answers"].setdefault(flag, {})[rec["task"]] = [it["output"] for it in items]
            row[f"batch_s_{flag}"] = gen["batch_s"]
            row["batch_tokens"] = gen["batch_tokens"]
            row[f"drafted_{flag}"] = row.get(f"drafted_{flag}", 0) + gen.get("drafted", 0)
            row[f"draft_ties_{flag}"] = row.get(f"draft_ties_{flag}", 0) + gen.get("draft_ties", 0)
    out = []
    for row in rows.values():
        answers = row.pop("answers")
        row["same_answers"] = answers["false"] == answers["true"] if len(answers) == 2 else None
        row["speedup"] = round(row["batch_s_false"] / row["batch_s_true"], 3) if row.get("batch_s_true") else None
        row["drafted_share"] = round(row.get("drafted_true", 0) / row["batch_tokens"], 3)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="throughput")
    ap.add_argument("--out", type=Path, default=Path("results/bench/drafts"))
    ap.add_argument("--summarize", type=Path, help="only read this results directory")
    a = ap.parse_args()
    results = a.summarize or (a.out / a.workload).resolve()
    if not a.summarize:
        for flag in ("false", "true"):
            cmd = [sys.executable, "-c", "import sys; sys.argv[0]='quanteval'; from quanteval.cli import main; main()",
                   f"results_dir={results}", f"sweep_name=draft-{flag}", f"preset.gen_draft={flag}", *WORKLOADS[a.workload]]
            subprocess.run(cmd, check=True, capture_output=True)
    rows = summarize(results)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"drafts-{a.workload}.json").write_text(json.dumps({"workload": a.workload, "args": WORKLOADS[a.workload],
                                                                "rows": rows}, indent=1))
    print(f"{'variant':<14}{'plain s':>9}{'drafts s':>10}{'speedup':>9}{'drafted':>9}{'ties':>6}  same answers")
    for r in rows:
        print(f"{r['variant']:<14}{r.get('batch_s_false', 0):>9.1f}{r.get('batch_s_true', 0):>10.1f}"
              f"{r['speedup'] or 0:>9.2f}{r['drafted_share']:>9.0%}{r.get('draft_ties_true', 0):>6}  {r['same_answers']}")


if __name__ == "__main__":
    main()
