"""The README's table of every method at about 8, 4 and 3 bits: sizes, fidelity and seconds to quantise.

Reads the run files of one sweep (WikiText-2 fidelity plus one chat task's teacher-forced KL) and prints
a markdown table with one row per (method, bits) cell of the grid it is given, "n/a" with the reason
where a method has no type at that width (``quanteval.formats``). Reading only: it computes nothing.

Make the sweep first (default preset, the embedded SmolLM2; 32 min on 2 idle CPU cores, 2026-12-02)::

    quanteval sweep_name=formats method=none,rtn,bnb,hqq,gguf bits=8,4,3 task=wikitext2
    quanteval sweep_name=formats method=gptq,awq,autoround bits=4,3 task=wikitext2
    quanteval sweep_name=formats method=none,rtn,hqq,gguf bits=8,4,3 task=mt_bench
    quanteval sweep_name=formats method=gptq,awq,autoround bits=4,3 task=mt_bench
    quanteval sweep_name=formats method=bnb bits=4 task=mt_bench   # not int8: its CPU kernel decodes slowly
    python benchmarks/formats_table.py results/formats --chat-task mt_bench

``quantize_s`` is the run's own quantisation time (``timings.quantize_s`` of its WikiText-2 run, which
computed the result; later tasks read it from the cache).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quanteval.formats import FORMATS, HQQ_BITS, NoFormat, family, resolve


def _runs(sweep: Path) -> dict[tuple[str, str], dict]:
    out = {}
    for p in sorted((sweep / "runs").glob("*.json")):
        rec = json.loads(p.read_text())
        if rec.get("status") == "ok":
            out[(rec["task"], rec["variant"]["label"])] = rec
    return out


def _label(method: str, bits: int, group_size: int) -> tuple[str | None, str | None]:
    """The variant label a cell gets, or (None, why) when the method has no type at these bits."""
    if method in FORMATS:
        try:
            t, _ = resolve(method, bits, None)
        except NoFormat as e:
            return None, str(e).split(": ", 1)[-1] if ": " in str(e) else str(e)
        return f"{method} {t}", None
    if method == "hqq" and bits not in HQQ_BITS:
        return None, f"hqq packs {', '.join(map(str, HQQ_BITS))} bits"
    return f"{method} w{bits} g{group_size}", None


def table(sweep: Path, methods: list[str], bits: list[int], chat_task: str, group_size: int = 64) -> str:
    runs = _runs(sweep)
    base = runs.get(("wikitext2", "baseline"))
    lines = [f"| method | family | variant | eff. bits | model MB | ppl | mean KL | same top-1 | {chat_task} tf-KL "
             f"| quantise s |", "|---|---|---|---|---|---|---|---|---|---|"]
    if base:
        m = base["metrics"]
        lines.append(f"| baseline | | baseline | 16 | {base['compression']['model_bytes'] / 1e6:.1f} | {m['ppl']:.2f} "
                     f"| 0 | 1 | 0 | |")
    for method in methods:
        for b in bits:
            label, why = _label(method, b, group_size)
            if label is None:
                lines.append(f"| {method} | {family(method)} | {b} bits: n/a | n/a | | | | | | {why} |")
                continue
            wt = runs.get(("wikitext2", label))
            if wt is None:
                lines.append(f"| {method} | {family(method)} | {label} | not run | | | | | | |")
                continue
            m, c = wt["metrics"], wt["compression"]
            chat = runs.get((chat_task, label))
            tf = f"{chat['metrics']['tf_kl_mean']:.3f}" if chat and "tf_kl_mean" in chat["metrics"] else "not run"
            q = wt.get("timings", {}).get("quantize_s")
            lines.append(f"| {method} | {family(method)} | {label} | {c['effective_bits']:.2f} | {c['model_bytes'] / 1e6:.1f} "
                         f"| {m['ppl']:.2f} | {m['kl_mean']:.4f} | {m['same_top1']:.3f} | {tf} | "
                         f"{q:.1f} |" if q is not None else "|")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path, help="the sweep folder (<results_dir>/<sweep_name>)")
    ap.add_argument("--methods", default="rtn,gptq,awq,autoround,bnb,hqq,gguf")
    ap.add_argument("--bits", default="8,4,3")
    ap.add_argument("--chat-task", default="mt_bench")
    args = ap.parse_args()
    print(table(args.sweep, args.methods.split(","), [int(b) for b in args.bits.split(",")], args.chat_task))


if __name__ == "__main__":
    main()
