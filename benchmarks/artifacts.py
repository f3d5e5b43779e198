"""The README's table of files evaluated as artifacts against their base (the embedded SmolLM2), beside RTN.

Writes a Q8_0 and a Q4_0 GGUF of SmolLM2 with the gguf package's writer (``tests/gguf_writer.py``: the
linears re-quantised, the embedding kept in F32), runs the sweeps below (default preset, WikiText-2),
exports the GPTQ w4 run with ``quanteval-export`` and reads that folder back as an artifact, then prints
a markdown table. About 12 minutes on 2 idle CPU cores::

    python benchmarks/artifacts.py --results results --files results/artifact-files

The sweeps it runs (``sweep_name=artifacts``):

    quanteval method=none,artifact artifact=Q8_0.gguf,Q4_0.gguf,<the embedded Q4_1 file> bits=4 task=wikitext2
    quanteval method=rtn bits=8 task=wikitext2
    quanteval method=rtn bits=4 group_size=32 sym=true task=wikitext2     # Q4_0's own layout: 32-blocks, symmetric
    quanteval method=gptq bits=4 task=wikitext2
    quanteval-export <its run file> --out <files>/gptq-w4-export
    quanteval method=artifact artifact=<files>/gptq-w4-export bits=4 task=wikitext2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test GGUF writer


def _quanteval(*args: str) -> None:
    t0 = time.time()
    subprocess.run(["quanteval", *args], check=True)
    print(f"# quanteval {' '.join(args)}: {time.time() - t0:.0f} s", file=sys.stderr)


def _runs(sweep: Path) -> dict[str, dict]:
    out = {}
    for p in sorted((sweep / "runs").glob("wikitext2__*.json")):
        rec = json.loads(p.read_text())
        if rec.get("status") == "ok":
            out[rec["variant"]["label"]] = {**rec, "_path": str(p)}
    return out


def table(sweep: Path) -> str:
    runs = _runs(sweep)
    lines = ["| variant | kind | effective bits | ppl | mean KL | same top-1 | read / quantise s |", "|---|---|---|---|---|---|---|"]
    for label, rec in sorted(runs.items(), key=lambda kv: -(kv[1]["compression"]["effective_bits"] or 0)):
        m, c = rec["metrics"], rec["compression"]
        kind = (rec["variant"].get("artifact") or {}).get("kind") or rec["variant"]["method"]
        secs = rec.get("timings", {}).get("quantize_s")
        lines.append(f"| {label} | {kind} | {c['effective_bits']:.4g} | {m['ppl']:.2f} | {m['kl_mean']:.4g} | "
                     f"{m['same_top1']:.3f} | {'' if secs is None else f'{secs:.0f}'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results", type=Path)
    ap.add_argument("--files", default=Path("results/artifact-files"), type=Path)
    ap.add_argument("--table-only", action="store_true", help="print the table of an existing sweep")
    args = ap.parse_args()
    sweep = args.results / "artifacts"
    if not args.table_only:
        from gguf_writer import requantize

        from quanteval.config import ModelConfig
        from quanteval.models import gguf_path

        src = gguf_path(ModelConfig())
        args.files.mkdir(parents=True, exist_ok=True)
        q8 = requantize(src, args.files / "SmolLM2-135M-Instruct.Q8_0.gguf", "Q8_0")
        q4 = requantize(src, args.files / "SmolLM2-135M-Instruct.Q4_0.gguf", "Q4_0")
        common = [f"results_dir={args.results}", "sweep_name=artifacts", "task=wikitext2"]
        _quanteval(*common, "method=none,artifact", f"artifact={q8},{q4},{src}", "bits=4")
        _quanteval(*common, "method=rtn", "bits=8")
        _quanteval(*common, "method=rtn", "bits=4", "group_size=32", "sym=true")
        _quanteval(*common, "method=gptq", "bits=4")
        export = args.files / "gptq-w4-export"
        subprocess.run(["quanteval-export", _runs(sweep)["gptq w4 g64"]["_path"], "--out", str(export)], check=True)
        _quanteval(*common, "method=artifact", f"artifact={export}", "bits=4")
    print(table(sweep))


if __name__ == "__main__":
    main()
