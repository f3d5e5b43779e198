"""GPU benchmark: the Triton dequant-matmul kernel, and quantisation / fidelity timings, CUDA vs CPU.

Kernels, at (M, K, N) = (1, 8192, 28672), (16, 8192, 28672), (1, 4096, 14336)
and 4, 3, 2 bits (group 128, asymmetric, random codes):

- achieved bandwidth = (packed weights + scales + zeros + x + y bytes) / time,
  against the device's copy bandwidth (read + write bytes per second of a
  1 GiB device-to-device copy): decode is memory bound, so this fraction is
  the figure of merit;
- speedup against ``torch.matmul`` with an fp16 weight;
- correctness against the float32 reference (``quanteval_kernels.reference``)
  with the tests' bound (``tests/test_kernels.py``), reported as the worst
  ``error / bound`` (<= 1 passes);
- L2 is flushed before every timed call (a buffer twice the L2 size is
  zeroed); every call is a replayed CUDA graph: M = 1 is how decode
  launches, and for M = 16 it keeps Python's launch overhead out of the
  kernel's time as well;
- a few alternative tile configurations are timed too (``--no-config-sweep``
  skips them): ``pick_config`` is a heuristic written without a GPU.

Quantisation and fidelity: RTN and GPTQ (g128, 4 bits) and one fidelity
evaluation (baseline statistics + compare, quanteval.evaluate.fidelity) on
randomly initialised models with SmolLM2-135M's and Gemma-3-270M's configs,
on CUDA (bf16) and on the CPU (fp32, all cores).

    python benchmarks/gpu_kernels.py --out benchmarks/results/gpu-kernels.json
    python benchmarks/gpu_kernels.py --dry-run     # tiny shapes, CPU, Triton interpreter: checks the script

Writes JSON and prints a markdown table. Depends on torch, triton and this repo.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

SHAPES = [(1, 8192, 28672), (16, 8192, 28672), (1, 4096, 14336)]
DRY_SHAPES = [(1, 256, 96), (16, 256, 64)]
BITS = (4, 3, 2)
GROUP = 128
SMOLLM2 = dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
               max_position_embeddings=8192)
GEMMA3_270M = dict(family="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                   num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                   sliding_window=512, query_pre_attn_scalar=256, max_position_embeddings=32768,
                   tie_word_embeddings=True)


# --------------------------------------------------------------------------- timing


class Timer:
    """Median wall time of ``fn`` in microseconds; CUDA events on a GPU, with L2 flushed before each call."""

    def __init__(self, device, reps: int):
        import torch

        self.torch, self.device, self.reps = torch, device, reps
        self.cuda = device.type == "cuda"
        if self.cuda:
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            self.flush_buf = torch.empty(max(2 * l2, 256 << 20), dtype=torch.uint8, device=device)

    def __call__(self, fn) -> float:
        torch = self.torch
        times = []
        for _ in range(self.reps):
            if self.cuda:
                self.flush_buf.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        return sorted(times)[len(times) // 2]


def graphed(fn, device):
    """``fn`` captured once in a CUDA graph; returns the replay (fn must be warmed up: compiled)."""
    import torch

    if device.type != "cuda":
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def copy_bandwidth(device, timer: Timer, nbytes: int) -> float:
    """Read + write bytes per second of a large device-to-device copy (GB/s)."""
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * nbytes / timer(lambda: b.copy_(a)) / 1e3


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- kernels


def candidate_configs(M: int, K: int):
    from quanteval_kernels.triton_dequant import KernelConfig

    if M <= 16:
        rows = [(32, 128, 1, 4, 4), (64, 128, 1, 4, 4), (64, 256, 1, 4, 3), (128, 128, 1, 4, 4), (64, 128, 2, 4, 4),
                (32, 256, 4, 4, 3)]
        return [KernelConfig(16, bn, bk, sk, w, s) for bn, bk, sk, w, s in rows if bk <= K]
    return [KernelConfig(64, 128, 64, 1, 4, 3), KernelConfig(128, 64, 64, 1, 4, 3)]


def bench_kernel(M: int, K: int, N: int, bits: int, device, timer: Timer, copy_gbps: float, sweep: bool) -> dict:
    import torch

    from quanteval_kernels import dequantize_packed, pack_layer
    from quanteval_kernels.triton_dequant import dequant_matmul, pick_config

    g = torch.Generator(device=device).manual_seed(bits)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    n_groups = -(-K // GROUP)
    codes = torch.randint(0, 2**bits, (N, K), generator=g, device=device, dtype=torch.uint8)
    scales = torch.rand(N, n_groups, generator=g, device=device) * 0.01 + 1e-3
    zeros = torch.randint(0, 2**bits, (N, n_groups), generator=g, device=device)
    w = pack_layer(codes, scales, zeros, None, bits, GROUP)
    del codes
    x = torch.randn(M, K, generator=g, device=device).to(dtype)
    w_ref = dequantize_packed(w.packed, w.scales, w.zeros, bits, GROUP, K)  # (N, K) float32

    def run(cfg=None):
        return dequant_matmul(x, w.packed, w.scales, w.zeros, bits, GROUP, config=cfg)

    y = run()
    sync(device)
    y_ref = x.float() @ w_ref.T
    eps = {torch.float16: 2**-10, torch.float32: 1e-6}[dtype]
    bound = eps * (x.float().abs() @ w_ref.abs().T + y_ref.abs()) + 1e-6
    err_ratio = float(((y.float() - y_ref).abs() / bound).max())
    w16 = w_ref.to(dtype)
    del w_ref, y_ref, bound
    moved = sum(t.nbytes for t in (w.packed, w.scales, w.zeros, x, y))

    def timed(fn):
        fn()  # compile / warm up
        sync(device)
        return timer(graphed(fn, device))

    t_kernel = timed(run)
    t_torch = timed(lambda: torch.matmul(x, w16.T))
    row = {"M": M, "K": K, "N": N, "bits": bits, "group_size": GROUP, "dtype": str(dtype).replace("torch.", ""),
           "config": asdict(pick_config(M, N, K, bits, GROUP, False, device)), "us": round(t_kernel, 2),
           "GBps": round(moved / t_kernel / 1e3, 1), "frac_of_copy": round(moved / t_kernel / 1e3 / copy_gbps, 3),
           "torch_fp16_us": round(t_torch, 2), "speedup_vs_torch": round(t_torch / t_kernel, 3),
           "err_over_bound": round(err_ratio, 4), "correct": err_ratio <= 1.0}
    if sweep:
        tried = [(timed(lambda c=c: run(c)), c) for c in candidate_configs(M, K)]
        best_t, best = min(tried, key=lambda tc: tc[0])
        row.update(best_us=round(best_t, 2), best_config=asdict(best),
                   best_frac_of_copy=round(moved / best_t / 1e3 / copy_gbps, 3),
                   sweep=[{"us": round(t, 2), **asdict(c)} for t, c in tried])
    return row


# --------------------------------------------------------------------------- quantisation and fidelity


def random_model(spec: dict, dry: bool):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    spec = dict(spec)
    family = spec.pop("family")
    if dry:  # the same families, tiny
        spec.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                    num_attention_heads=4, num_key_value_heads=2)
    cls, cfg_cls = (LlamaForCausalLM, LlamaConfig) if family == "llama" else (Gemma3ForCausalLM, Gemma3TextConfig)
    torch.manual_seed(0)
    return cls(cfg_cls(**spec)).eval()


def bench_methods(name: str, base, device, dtype, args) -> dict:
    """RTN and GPTQ (4 bits, g128) on a copy of ``base`` on ``device``, then one fidelity evaluation."""
    import torch

    from quanteval.calibration import capture_inputs
    from quanteval.config import GPTQConfig
    from quanteval.evaluate.fidelity import baseline_stats, compare
    from quanteval.methods import QuantSpec, apply_result, rtn_model
    from quanteval.methods.gptq import gptq_model
    from quanteval.models import adapter_for

    def clock(fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return out, round(time.perf_counter() - t0, 3)

    model = copy.deepcopy(base).to(device, dtype)
    adapter = adapter_for(model)
    spec = QuantSpec(4, GROUP, False)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    calib_ids = torch.randint(0, vocab, (args.calib_samples, args.seq_len), generator=g)
    windows = torch.randint(0, vocab, (args.windows, args.seq_len), generator=g)
    _, rtn_s = clock(lambda: rtn_model(model, adapter, spec))
    base_stats, base_s = clock(lambda: baseline_stats(model, windows, 64))
    calib, capture_s = clock(lambda: capture_inputs(model, adapter, calib_ids, 8))
    result, gptq_s = clock(lambda: gptq_model(model, adapter, spec, GPTQConfig(), calib))
    apply_result(model, result)
    metrics, compare_s = clock(lambda: compare(model, windows, base_stats))
    return {"model": name, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "rtn_s": rtn_s, "capture_s": capture_s, "gptq_s": gptq_s,
            "baseline_stats_s": base_s, "fidelity_compare_s": compare_s, "kl_mean": round(metrics["kl_mean"], 5),
            "calib_tokens": args.calib_samples * args.seq_len, "fidelity_tokens": args.windows * args.seq_len}


# --------------------------------------------------------------------------- report


def table(report: dict) -> str:
    lines = [f"# Triton dequant-matmul on {report['device']} (copy bandwidth {report['copy_GBps']:.0f} GB/s)", "",
             "| M | K | N | bits | us | GB/s | of copy | torch fp16 us | speedup | best us (of copy) | err/bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["kernels"]:
        best = f"{r['best_us']} ({r['best_frac_of_copy']:.0%})" if "best_us" in r else "-"
        lines.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['bits']} | {r['us']} | {r['GBps']} | "
                     f"{r['frac_of_copy']:.0%} | {r['torch_fp16_us']} | {r['speedup_vs_torch']}x | {best} | "
                     f"{r['err_over_bound']}{'' if r['correct'] else ' FAIL'} |")
    if report["methods"]:
        lines += ["", "| model | device | RTN s | capture s | GPTQ s | baseline stats s | fidelity compare s |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["methods"]:
            lines.append(f"| {r['model']} | {r['device']} ({r['dtype']}, {r['threads']} thr) | {r['rtn_s']} | "
                         f"{r['capture_s']} | {r['gptq_s']} | {r['baseline_stats_s']} | {r['fidelity_compare_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default: print only)")
    ap.add_argument("--parts", default="kernels,methods", help="kernels, methods, or both")
    ap.add_argument("--no-config-sweep", action="store_true", help="time only pick_config's tiles")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU side of the method timings")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= {"kernels", "methods"}:
        ap.error(f"--parts {args.parts}: choose from kernels, methods")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read by quanteval_kernels.triton_dequant at call time
        args.reps, args.calib_samples, args.windows, args.seq_len = 2, 2, 1, 32
    import torch
    import triton

    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        print("gpu_kernels: no CUDA device; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    timer = Timer(device, args.reps)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "triton": triton.__version__, "dry_run": args.dry_run,
              "copy_GBps": round(copy_bandwidth(device, timer, (1 << 30) if device.type == "cuda" else 64 << 20), 1),
              "kernels": [], "methods": []}
    if "kernels" in parts:
        for M, K, N in DRY_SHAPES if args.dry_run else SHAPES:
            for bits in BITS:
                row = bench_kernel(M, K, N, bits, device, timer, report["copy_GBps"], not args.no_config_sweep)
                print(f"kernel M={M} K={K} N={N} w{bits}: {row['us']} us, {row['frac_of_copy']:.0%} of copy, "
                      f"{row['speedup_vs_torch']}x torch, err/bound {row['err_over_bound']}", file=sys.stderr)
                report["kernels"].append(row)
                torch.cuda.empty_cache() if device.type == "cuda" else None
    if "methods" in parts:
        for name, spec in (("smollm2_135m", SMOLLM2), ("gemma3_270m", GEMMA3_270M)):
            base = random_model(spec, args.dry_run)
            runs = [(device, torch.bfloat16)] if device.type == "cuda" else []
            if not args.no_cpu:
                runs.append((torch.device("cpu"), torch.float32))
            for dev, dtype in runs:
                row = bench_methods(name, base, dev, dtype, args)
                print(f"methods {name} {dev.type}: {row}", file=sys.stderr)
                report["methods"].append(row)
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0 if all(r["correct"] for r in report["kernels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
