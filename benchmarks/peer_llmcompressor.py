"""Peer benchmark: quanteval's GPTQ and RTN against llm-compressor's, on SmolLM2-135M, in one run.

Same model (the converted GGUF baseline), same calibration token ids
(WikiText-2 valid, ``--n-samples`` x ``--seq-len``, seed 0), same bits and
group size (g64: llm-compressor needs the group size to divide the width),
same evaluation (quanteval's WikiText-2 fidelity code on test windows). Each
quantisation runs in a fresh process so its peak RSS is its own; both load
the same fp32 model. AWQ is not compared here: llm-compressor's
AWQModifier needs an accelerator ("Cannot access accelerator device when
none is available"), so the AWQ comparison is pending a GPU machine.

Run (creates .venv-llmc with llm-compressor the first time)::

    python benchmarks/peer_llmcompressor.py --out results/bench/peer

It prints a table and writes ``peer.json`` and ``peer.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-llmc"


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "llmcompressor", "gguf"], check=True)
    return py


def _model_and_calib(n_samples: int, seq_len: int):
    from quanteval.calibration import calibration_file, calibration_ids
    from quanteval.config import ModelConfig
    from quanteval.data import resolve_data_dir
    from quanteval.models import load_model
    import torch

    loaded = load_model(ModelConfig(), torch.device("cpu"), torch.float32)
    root = resolve_data_dir(None)
    ids = calibration_ids(loaded.tokenizer, calibration_file("wikitext2", None, root), n_samples, seq_len, 0)
    return loaded, ids, root


def ours(out: Path, method: str, bits: int, group: int, n_samples: int, seq_len: int) -> None:
    """One quantisation in this (fresh) process: time, breakdown and peak RSS; saves the result."""
    import torch

    from quanteval.calibration import capture_inputs
    from quanteval.config import GPTQConfig
    from quanteval.methods import METHODS, QuantSpec
    from quanteval.models import adapter_for

    t0 = time.perf_counter()
    loaded, ids, _ = _model_and_calib(n_samples, seq_len)
    load_s = time.perf_counter() - t0
    model, adapter = loaded.model, adapter_for(loaded.model)
    spec = QuantSpec(bits, group, False)
    t0 = time.perf_counter()
    calib = capture_inputs(model, adapter, ids, 8) if method == "gptq" else None
    capture_s = time.perf_counter() - t0
    result = METHODS[method].compute(model, adapter, spec, GPTQConfig(), calib)
    quant_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.save(out / f"ours-{method}-w{bits}.pt")
    info = {k: v for k, v in result.info.items() if k.endswith("_s")}
    import quanteval

    (out / f"ours-{method}-w{bits}.json").write_text(json.dumps({
        "library": f"quanteval {quanteval.__version__}", "method": method, "bits": bits, "load_s": load_s,
        "quantize_s": quant_s, "breakdown_s": {"capture_s": capture_s, **info}, "peak_rss_mb": peak}))
    torch.save(ids, out / "calib.pt")


def evaluate(out: Path, runs: list[tuple[str, int]], n_windows: int, eval_len: int) -> dict:
    """Score every saved result with quanteval's fidelity code against one baseline."""
    import torch
    from safetensors.torch import load_file

    from quanteval.data import data_file
    from quanteval.evaluate.fidelity import baseline_stats, compare, make_windows
    from quanteval.methods import QuantResult, apply_result

    loaded, _, root = _model_and_calib(1, 8)
    model = loaded.model
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    text = data_file(root, "wikitext2/test.txt").read_text()
    windows = make_windows(loaded.tokenizer, text, n_windows, eval_len)
    base = baseline_stats(model, windows, 64)
    scores = {"baseline": compare(model, windows, base)}
    weights, levels, ours_levels = {}, {}, {}
    for method, bits in runs:
        for lib in ("ours", "llmc"):
            model.load_state_dict(base_state)
            if lib == "ours":
                res = QuantResult.load(out / f"ours-{method}-w{bits}.pt")
                apply_result(model, res)
                w = {n: lq.dequantize() for n, lq in res.layers.items()}
                ours_levels[(method, bits)] = {
                    n: lq.codes.float() - lq.zeros.float()[:, lq.g_idx.long()] for n, lq in res.layers.items()}
            else:
                blob = load_file(str(out / f"llmc-{method}-w{bits}.safetensors"))
                w = {n: t for n, t in blob.items() if "__" not in n}
                with torch.no_grad():
                    for n, t in w.items():
                        model.get_submodule(n).weight.copy_(t)
                # signed integer levels (code - zero) of the peer, to compare rounding decisions
                levels[(method, bits)] = {
                    n: torch.round(t / blob[n + ".__scale"].repeat_interleave(64, 1)) for n, t in w.items()}
            weights[(lib, method, bits)] = w
            m = compare(model, windows, base)
            m.pop("per_window")
            scores[f"{lib}-{method}-w{bits}"] = m
    ident = {}
    for method, bits in runs:
        a, b = weights[("ours", method, bits)], weights[("llmc", method, bits)]
        diffs = [(a[n] - b[n]).abs() for n in a]
        ident[f"{method}-w{bits}"] = {
            "layers": len(a), "same_layer_set": sorted(a) == sorted(b),
            "max_abs_diff": float(max(d.max() for d in diffs)),
            "fraction_identical": float(sum((d == 0).sum() for d in diffs) / sum(d.numel() for d in diffs)),
            # same integer level (code - zero) chosen for a weight: the rounding decisions agree
            "fraction_same_level": float(
                sum((ours_levels[(method, bits)][n] == levels[(method, bits)][n]).sum() for n in a)
                / sum(d.numel() for d in diffs)),
        }
    return {"scores": scores, "weights": ident}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench/peer")
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--n-windows", type=int, default=16)
    ap.add_argument("--step", default="all", help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.step.startswith("ours:"):
        _, method, bits = a.step.split(":")
        return ours(out, method, int(bits), 64, a.n_samples, a.seq_len)
    py = ensure_venv()
    from quanteval.config import ModelConfig
    from quanteval.models import _converted_dir, gguf_path

    model_dir = _converted_dir(ModelConfig(), gguf_path(ModelConfig()))
    runs = [("rtn", b) for b in map(int, a.bits.split(","))] + [("gptq", b) for b in map(int, a.bits.split(","))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for method, bits in runs:
        base = [sys.executable, __file__, "--out", str(out), "--n-samples", str(a.n_samples), "--seq-len", str(a.seq_len)]
        subprocess.run(base + ["--step", f"ours:{method}:{bits}"], check=True, env=env)
        subprocess.run([str(py), str(REPO / "benchmarks" / "llmc_side.py"), str(model_dir), str(out / "calib.pt"),
                        str(out), method, str(bits), "64"], check=True, env=env)
    res = evaluate(out, runs, a.n_windows, 512)
    rows = []
    for method, bits in runs:
        o = json.loads((out / f"ours-{method}-w{bits}.json").read_text())
        p = json.loads((out / f"llmc-{method}-w{bits}.json").read_text())
        so, sp = res["scores"][f"ours-{method}-w{bits}"], res["scores"][f"llmc-{method}-w{bits}"]
        rows.append({"variant": f"{method} w{bits} g64", "ours_s": o["quantize_s"], "llmc_s": p["quantize_s"],
                     "time_ratio": o["quantize_s"] / p["quantize_s"], "ours_peak_mb": o["peak_rss_mb"],
                     "llmc_peak_mb": p["peak_rss_mb"], "ours_ppl": so["ppl"], "llmc_ppl": sp["ppl"],
                     "ppl_ratio": so["ppl"] / sp["ppl"], "ours_kl": so["kl_mean"], "llmc_kl": sp["kl_mean"],
                     "ours_breakdown": o["breakdown_s"]})
    report = {"rows": rows, "weights": res["weights"], "baseline_ppl": res["scores"]["baseline"]["ppl"],
              "settings": vars(a), "peer": p["library"]}
    (out / "peer.json").write_text(json.dumps(report, indent=1))
    hdr = "| variant | ours s | llmc s | time ratio | ours peak MB | llmc peak MB | ours ppl | llmc ppl | ours KL | llmc KL |"
    lines = [hdr, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ours_s']:.1f} | {r['llmc_s']:.1f} | {r['time_ratio']:.2f} | "
                     f"{r['ours_peak_mb']:.0f} | {r['llmc_peak_mb']:.0f} | {r['ours_ppl']:.2f} | {r['llmc_ppl']:.2f} | "
                     f"{r['ours_kl']:.4f} | {r['llmc_kl']:.4f} |")
    lines.append("")
    lines.append(f"baseline ppl {report['baseline_ppl']:.2f}; peer {report['peer']}; weights: "
                 + json.dumps(res["weights"]))
    (out / "peer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
