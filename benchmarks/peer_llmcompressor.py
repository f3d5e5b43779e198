"""Peer benchmark: quanteval's GPTQ and RTN against llm-compressor's, on SmolLM2-135M, in one run.

Both sides at llm-compressor's defaults: GPTQ with activation order and static groups (llm-compressor's
``actorder=static``; quanteval's default since issue 13), dampening 0.01, block size 128; RTN as
``QuantizationModifier``. Same model (the converted GGUF baseline, fp32), same calibration token ids
(``--calibration``, ``--n-samples`` x ``--seq-len``, seed 0; no BOS token, every position attended, on
both sides), same bits and group size (g64: llm-compressor needs the group size to divide the width),
same evaluation (quanteval's WikiText-2 fidelity code on test windows). llm-compressor runs through
``method=llmcompressor``'s own worker (its venv, a subprocess), so the benchmark measures exactly what a
sweep runs; each quantisation is a fresh process, so its peak RSS is its own. AWQ is not compared:
llm-compressor's AWQModifier needs an accelerator.

Run (make llm-compressor's venv once first: ``python -m quanteval.methods.llmcompressor --setup``)::

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



def _model_and_calib(n_samples: int, seq_len: int, calibration: str):
    import torch

    from quanteval.calibration import calibration_token_ids
    from quanteval.config import ModelConfig
    from quanteval.data import resolve_data_dir
    from quanteval.models import load_model
    from quanteval.variant import Calibration

    loaded = load_model(ModelConfig(), torch.device("cpu"), torch.float32)
    root = resolve_data_dir(None)
    calib = Calibration(calibration, None, 0, n_samples, seq_len, 8)
    return loaded, calibration_token_ids(calib, loaded.tokenizer, root, "chat"), root


def ours(out: Path, method: str, bits: int, group: int, n_samples: int, seq_len: int, calibration: str) -> None:
    """One quanteval quantisation in this (fresh) process: time, breakdown and peak RSS; saves the result."""
    import torch

    from quanteval.calibration import capture_inputs
    from quanteval.config import GPTQConfig
    from quanteval.methods import METHODS, QuantSpec
    from quanteval.models import adapter_for

    t0 = time.perf_counter()
    loaded, ids, _ = _model_and_calib(n_samples, seq_len, calibration)
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


def peer(out: Path, method: str, bits: int, group: int, n_samples: int, seq_len: int, calibration: str) -> None:
    """llm-compressor's quantisation through method=llmcompressor's worker (its own process and venv)."""
    import torch

    from quanteval.config import LLMCompressorConfig
    from quanteval.methods import QuantResult, QuantSpec
    from quanteval.methods.llmcompressor import job_for, layer_from_llmc, run_worker

    loaded, ids, _ = _model_and_calib(n_samples, seq_len, calibration)
    assert torch.equal(ids, torch.load(out / "calib.pt")), "both sides must see the same calibration ids"
    spec = QuantSpec(bits, group, False)
    got = run_worker(loaded.model, loaded.tokenizer, ids, job_for(spec, LLMCompressorConfig(modifier=method)))
    QuantResult(layers={n: layer_from_llmc(v, spec) for n, v in got["layers"].items()}).save(
        out / f"llmc-{method}-w{bits}.pt")
    (out / f"llmc-{method}-w{bits}.json").write_text(json.dumps({
        "library": f"llm-compressor {got['versions']['llmcompressor']}", "method": method, "bits": bits,
        "load_s": got["load_s"], "quantize_s": got["quantize_s"], "peak_rss_mb": got["peak_rss_mb"]}))


def evaluate(out: Path, runs: list[tuple[str, int]], n_windows: int, eval_len: int) -> dict:
    """Score every saved result with quanteval's fidelity code against one baseline; compare the levels."""
    from quanteval.data import data_file
    from quanteval.evaluate.fidelity import baseline_stats, compare, make_windows
    from quanteval.methods import QuantResult, apply_result

    loaded, _, root = _model_and_calib(1, 8, "wikitext2")
    model = loaded.model
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    text = data_file(root, "wikitext2/test.txt").read_text()
    windows = make_windows(loaded.tokenizer, text, n_windows, eval_len)
    base = baseline_stats(model, windows, 64)
    scores = {"baseline": compare(model, windows, base)}
    results = {}
    for method, bits in runs:
        for lib in ("ours", "llmc"):
            model.load_state_dict(base_state)
            res = QuantResult.load(out / f"{lib}-{method}-w{bits}.pt")
            apply_result(model, res)
            results[(lib, method, bits)] = res
            m = compare(model, windows, base)
            m.pop("per_window")
            scores[f"{lib}-{method}-w{bits}"] = m
    agree = {}
    for method, bits in runs:
        a, b = results[("ours", method, bits)].layers, results[("llmc", method, bits)].layers
        # the integer level (code - zero) each side chose for each weight: the rounding decisions
        lev = {lib: {n: lq.codes.float() - lq.zeros.float()[:, lq.g_idx.long()] for n, lq in layers.items()}
               for lib, layers in (("ours", a), ("llmc", b))}
        n_all = sum(t.numel() for t in lev["ours"].values())
        diffs = [(a[n].dequantize() - b[n].dequantize()).abs() for n in a]
        agree[f"{method}-w{bits}"] = {
            "layers": len(a), "same_layer_set": sorted(a) == sorted(b),
            "fraction_same_level": float(sum((lev["ours"][n] == lev["llmc"][n]).sum() for n in a) / n_all),
            "fraction_identical_weight": float(sum((d == 0).sum() for d in diffs) / n_all),
            "max_abs_diff": float(max(d.max() for d in diffs)),
        }
    return {"scores": scores, "weights": agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench/peer")
    ap.add_argument("--n-samples", type=int, default=32, help="calibration sequences (the default preset's)")
    ap.add_argument("--calibration", default="wikitext2", choices=["wikitext2", "mix"])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--n-windows", type=int, default=16)
    ap.add_argument("--step", default="all", help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.step != "all":  # one quantisation, in this fresh process
        side, method, bits = a.step.split(":")
        fn = ours if side == "ours" else peer
        return fn(out, method, int(bits), 64, a.n_samples, a.seq_len, a.calibration)
    from quanteval.methods.llmcompressor import venv_python

    venv_python()  # the one-line error naming the setup command, before any work
    runs = [("rtn", b) for b in map(int, a.bits.split(","))] + [("gptq", b) for b in map(int, a.bits.split(","))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for method, bits in runs:
        base = [sys.executable, __file__, "--out", str(out), "--n-samples", str(a.n_samples), "--seq-len",
                str(a.seq_len), "--calibration", a.calibration]
        subprocess.run(base + ["--step", f"ours:{method}:{bits}"], check=True, env=env)
        subprocess.run(base + ["--step", f"llmc:{method}:{bits}"], check=True, env=env)
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
