"""B1 + B3: a quanteval sweep against a naive pipeline, in one run; and the sweep's peak memory.

**quanteval**: the ``quanteval`` console script on a fresh ``results_dir`` (so
the baseline, calibration and quantisation caches start empty), one sweep per
method, under ``/usr/bin/time -v`` for peak RSS (B3). It also scores WikiText-2
fidelity and teacher-forced KL, which the naive pipeline does not.

**naive**: what a user would write without quanteval, in one process: for each
variant, load the model (from the same converted safetensors cache), quantise
it (quanteval's own RTN/GPTQ code, so the weights are identical), then
``lm_eval.simple_evaluate`` with ``HFLM`` on the same lm-eval task YAMLs, the
same limits and token caps, the chat template, greedy. HFLM's batch size is
``--naive-batch-size`` (default 8: a whole task's 8 items in one batch, the
most favourable setting for it; lm-eval's default is 1). It has no collapse
short-circuit, so a collapsed variant generates to the token cap.

Both pipelines' primary scores are compared per variant and task.

Run (the reduced grid of the 2026-11-27 measurement)::

    python benchmarks/b1_sweep.py --out results/bench/b1

On the whole default grid, ``--default-grid``: the quanteval side is then the README's main command
itself, one ``quanteval`` process on the default sweep (9 variants x 7 tasks, WikiText-2 and arith_chain
included), so its wall time and peak RSS are the default sweep's (B3); the naive side runs the same 9
variants on the five generative tasks lm-eval can score the same way (not arith_chain, whose limit counts
items per chain length; not WikiText-2 fidelity, which it does not measure)::

    python benchmarks/b1_sweep.py --default-grid --out results/bench/b1-full    # about 1 h here

It prints a table and writes ``b1.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


DEFAULT_VARIANTS = "none,rtn:8,rtn:4,rtn:3,rtn:2,gptq:4,gptq:3,awq:4,awq:3"  # conf/config.yaml + method_bits
DEFAULT_TASKS = "ifeval,mt_bench,dialogsum,gsm8k,humaneval"


def run_quanteval(out: Path, variants: list[tuple[str, int]], tasks: list[str], default_grid: bool = False) -> dict:
    """One ``quanteval`` sweep per method (bits as given), or the README's main command alone
    (``default_grid``), timed, with peak RSS from /usr/bin/time."""
    by_method = defaultdict(list)
    for m, b in variants:
        by_method[m].append(b)
    wall, peak = 0.0, 0.0
    head = ["/usr/bin/time", "-v", sys.executable, "-c",
            "import sys; sys.argv[0]='quanteval'; from quanteval.cli import main; main()", f"results_dir={out}"]
    if default_grid:
        commands = {"default grid": head}
    else:
        commands = {m: head + [f"method={m}", f"bits={','.join(map(str, [b for b in bits if b] or [4]))}",
                               f"task=wikitext2,{','.join(tasks)}"] for m, bits in by_method.items()}
    for m, cmd in commands.items():
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall += time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"quanteval {m} failed: {proc.stderr[-2000:]}")
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        peak = max(peak, int(rss.group(1)) / 1024 if rss else 0)
    from quanteval import results

    scores, phases = {}, defaultdict(float)
    for f in results.run_files(out / "default"):
        rec = results.read_run(f)
        for k, v in (rec.get("timings") or {}).items():
            phases[k] += v
        phases[f"eval_{rec['task']}_s"] += (rec.get("timings") or {}).get("eval_s", 0.0)
        if rec["task"] in tasks:
            scores[(rec["variant"]["label"], rec["task"])] = (rec["status"], rec.get("metrics") or {})
    return {"wall_s": wall, "peak_rss_mb": peak, "phases_s": dict(phases), "scores": scores}


def run_naive(variants: list[tuple[str, int]], tasks: list[str], batch_size: int) -> dict:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from quanteval.calibration import calibration_token_ids, capture_inputs
    from quanteval.config import AWQConfig, GPTQConfig, ModelConfig, PresetConfig, RTNConfig, RunConfig, WikiText2Config
    from quanteval.variant import Run
    from quanteval.data import resolve_data_dir
    from quanteval.evaluate.generative import lmeval_name
    from quanteval.methods import METHODS, QuantSpec, apply_result
    from quanteval.models import adapter_for, load_model
    from quanteval_tasks import TASK_DIR, task_table

    from omegaconf import OmegaConf  # the preset's calibration sizes come from conf/preset/default.yaml

    preset = OmegaConf.load(REPO / "conf" / "preset" / "default.yaml")
    sizes = {name: info.sizes("default") for name, info in task_table().items()}  # (items, token cap)
    root = resolve_data_dir(None)
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"data_dir": str(root)})
    method_cfgs = {"rtn": RTNConfig(), "gptq": GPTQConfig(), "awq": AWQConfig()}
    p = PresetConfig(calib_samples=preset.get("calib_samples", 32), calib_seq_len=preset.get("calib_seq_len", 512))
    phases, scores = defaultdict(float), {}
    t_all = time.perf_counter()
    for m, b in variants:
        t0 = time.perf_counter()
        loaded = load_model(ModelConfig(), torch.device("cpu"), torch.float32)
        phases["load_s"] += time.perf_counter() - t0
        label = "baseline"
        if m != "none":
            t0 = time.perf_counter()
            model, adapter = loaded.model, adapter_for(loaded.model)
            calib = None
            if METHODS[m].needs_calibration:  # the sweep's own calibration set (the default mix), same sizes
                c = Run.of(RunConfig(model=ModelConfig(), method=method_cfgs[m], task=WikiText2Config(),
                                     preset=p, bits=b)).variant.calibration
                ids = calibration_token_ids(c, loaded.tokenizer, root, ModelConfig().prompt_format)
                calib = capture_inputs(model, adapter, ids, c.batch_size)
            torch.manual_seed(0)
            apply_result(model, METHODS[m].compute(model, adapter, QuantSpec(b, 64, False), method_cfgs[m], calib))
            phases["quantize_s"] += time.perf_counter() - t0
            label = f"{m} w{b} g64"
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, max_length=4096)
        for task in tasks:
            t0 = time.perf_counter()
            out = simple_evaluate(model=lm, tasks=[lmeval_name(task)], task_manager=tm, limit=sizes[task][0],
                                  apply_chat_template=task_table()[task].chat, gen_kwargs=f"max_gen_toks={sizes[task][1]}",
                                  bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0)
            phases["eval_s"] += time.perf_counter() - t0
            phases[f"eval_{task}_s"] += time.perf_counter() - t0
            res = out["results"][lmeval_name(task)]
            key = _metric(task, res)
            scores[(label, task)] = ("ok", float(res[key]), key.removesuffix(",none"))
        del lm, loaded
    return {"wall_s": time.perf_counter() - t_all, "phases_s": dict(phases), "scores": scores}


def _metric(task: str, res: dict) -> str:
    """The key of lm-eval's result that both pipelines report: the task's primary when lm-eval computes it
    (``metric,filter``, the filter ``none`` unless the primary names one, as GSM8K's
    ``exact_match,flexible-extract`` does), else lm-eval's first (mt_bench's primary, ROUGE-L against the
    baseline's answers, is quanteval's own; lm-eval gives words). quanteval's run files name a metric
    without its ``,none``."""
    from quanteval_tasks import task_table

    primary = task_table()[task].primary
    for key in (primary, f"{primary},none"):
        if "," in key and key in res:
            return key
    keys = [k for k in res if "," in k and "_stderr" not in k and isinstance(res[k], (int, float))]
    if not keys:
        raise KeyError(f"{task}: lm-eval's result has no metric: {sorted(res)}")
    return next((k for k in keys if k.endswith(",none")), keys[0])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="none,rtn:8,rtn:4,rtn:2,gptq:4", help="method:bits, comma-separated")
    ap.add_argument("--tasks", default="gsm8k,dialogsum", help="generative tasks (not arith_chain: its limit is per k)")
    ap.add_argument("--naive-batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("results/bench/b1"))
    ap.add_argument("--default-grid", action="store_true",
                    help=f"the README's main command against the naive pipeline on {DEFAULT_VARIANTS} x {DEFAULT_TASKS}")
    ap.add_argument("--naive-only", action="store_true",
                    help="keep the quanteval side already in --out (quanteval.json, its results) and run the naive side")
    args = ap.parse_args(argv)
    if args.default_grid:
        args.variants, args.tasks = DEFAULT_VARIANTS, DEFAULT_TASKS
    variants = [(v.split(":")[0], int(v.split(":")[1]) if ":" in v else 0) for v in args.variants.split(",")]
    tasks = args.tasks.split(",")
    if "arith_chain" in tasks:
        raise SystemExit("--tasks: arith_chain's limit counts items per k; lm-eval's counts docs: not comparable")
    args.out.mkdir(parents=True, exist_ok=True)
    qe_dir = (args.out / "quanteval").resolve()
    if args.naive_only:
        ours = json.loads((args.out / "quanteval.json").read_text())
        ours["scores"] = {tuple(k.split(" | ")): tuple(v) for k, v in ours["scores"].items()}
    else:
        shutil.rmtree(qe_dir, ignore_errors=True)  # fresh caches: the baseline and quantisations are computed here
        ours = run_quanteval(qe_dir, variants, tasks, args.default_grid)
        (args.out / "quanteval.json").write_text(json.dumps({**ours, "scores": {" | ".join(k): v for k, v in
                                                                             ours["scores"].items()}}, indent=1))
    naive = run_naive(variants, tasks, args.naive_batch_size)
    rows, same = [], 0
    for key, (status, score, metric) in naive["scores"].items():
        q_status, q_metrics = ours["scores"].get(key, (None, {}))
        q_score = q_metrics.get(metric)
        match = q_status == "ok" and q_score is not None and abs(q_score - score) < 1e-9
        same += match
        rows.append({"variant": key[0], "task": key[1], "metric": metric, "naive": score, "quanteval": q_score,
                     "quanteval_status": q_status, "same": match})
    compared = sum(r["quanteval_status"] == "ok" for r in rows)
    result = {"variants": args.variants, "tasks": tasks, "default_grid": args.default_grid, "naive_batch_size": args.naive_batch_size,
              "quanteval_s": round(ours["wall_s"], 1), "naive_s": round(naive["wall_s"], 1),
              "ratio": round(ours["wall_s"] / naive["wall_s"], 3), "quanteval_phases_s": ours["phases_s"],
              "naive_phases_s": naive["phases_s"], "quanteval_peak_rss_mb": round(ours["peak_rss_mb"]),
              "scores": rows, "same_scores": f"{same}/{compared} runs both pipelines scored"}
    (args.out / "b1.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"quanteval {ours['wall_s']:.0f} s, naive {naive['wall_s']:.0f} s: ratio {result['ratio']:.2f}; "
          f"same scores {result['same_scores']}; quanteval peak RSS {ours['peak_rss_mb']:.0f} MB")
    for r in rows:
        print(f"  {r['variant']:<14} {r['task']:<10} {r['metric']:<8} naive {r['naive']:.4f}  quanteval "
              f"{r['quanteval'] if r['quanteval'] is None else round(r['quanteval'], 4)} ({r['quanteval_status']})")
    return result


if __name__ == "__main__":
    main()
