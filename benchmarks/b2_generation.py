"""B2: quanteval's generation engine against lm-eval's ``HFLM.generate_until``, in one run.

Same model (SmolLM2-135M-Instruct, fp32, CPU unless cuda is present), the same
GSM8K chat prompts (the first ``--n`` test items, built by the gsm8k task; 128 by
default, the issue's workload), the same stop strings and ``max_gen_toks``, greedy,
the same batch size (32 unless ``--batch-size``; 0 is quanteval's auto batch size)
and thread count. Each engine runs once after a short warm-up on two other prompts.
Tokens per second counts the tokens quanteval generated. Texts that differ are
checked where they part: a teacher-forced pass gives the top-2 logit gap there, and
a gap below ``TIE`` is counted as a numerical tie, anything else as a real difference.

Run::

    python benchmarks/b2_generation.py --out results/bench/b2

It prints a table and writes ``b2-hflm-bs<N>.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128, help="GSM8K prompts")
    ap.add_argument("--max-gen-toks", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32, help="both engines (0: quanteval's auto batch size)")
    ap.add_argument("--hflm-batch-size", type=int, default=0,
                    help="HFLM's batch size (0: the same as quanteval's; 1 is lm-eval's default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="a local transformers model directory instead of the embedded SmolLM2 (the GPU session's "
                         "random-initialised one: benchmarks/gpu_kit.py)")
    ap.add_argument("--out", type=Path, default=Path("results/bench/b2"))
    args = ap.parse_args(argv)

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from quanteval.config import ModelConfig
    from quanteval.data import resolve_data_dir
    from quanteval.evaluate.generative import load_spec, prompt_for, stop_strings
    from quanteval.generate import auto_batch_size, generate
    from quanteval.models import load_model, resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device("auto")
    cfg = ModelConfig() if args.model_dir is None else ModelConfig(name=args.model_dir.name, source="hf",
                                                                   name_or_path=str(args.model_dir))
    loaded = load_model(cfg, device, torch.float32)
    tok = loaded.tokenizer
    spec = load_spec("gsm8k", resolve_data_dir(None), args.n + 2, args.max_gen_toks, {})
    prompts = [prompt_for(spec, tok, d, "chat", "smollm2")[0] for d in spec.docs]
    warm, prompts = prompts[:2], prompts[2:]
    stops = stop_strings(spec, "chat")
    if not args.batch_size:
        longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
        args.batch_size = auto_batch_size(loaded.model, len(prompts), longest + args.max_gen_toks)
    hflm_bs = args.hflm_batch_size or args.batch_size
    lm = HFLM(pretrained=loaded.model, tokenizer=AutoTokenizer.from_pretrained(tok.name_or_path),
              batch_size=hflm_bs, max_length=4096)

    def hflm(ps):
        reqs = [Instance(request_type="generate_until", doc={}, idx=0,
                         arguments=(p, {"until": list(stops), "max_gen_toks": args.max_gen_toks, "do_sample": False}))
                for p in ps]
        return lm.generate_until(reqs, disable_tqdm=True)

    def ours(ps):
        return generate(loaded.model, tok, ps, args.max_gen_toks, stop=stops, batch_size=args.batch_size)

    hflm(warm), ours(warm)
    t0 = time.perf_counter()
    gens = ours(prompts)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts = hflm(prompts)
    t_hflm = time.perf_counter() - t0
    n_tokens = sum(g.n_tokens for g in gens)
    same = sum(g.text == t for g, t in zip(gens, texts))
    gaps = [divergence_gap(loaded.model, tok, p, g, t) for p, g, t in zip(prompts, gens, texts) if g.text != t]
    out = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": cfg.name, "threads": args.threads, "n_prompts": len(prompts), "batch_size": args.batch_size, "hflm_batch_size": hflm_bs,
        "max_gen_toks": args.max_gen_toks, "tokens": n_tokens,
        "quanteval_s": round(t_ours, 2), "hflm_s": round(t_hflm, 2),
        "quanteval_tok_s": round(n_tokens / t_ours, 2), "hflm_tok_s": round(n_tokens / t_hflm, 2),
        "speedup": round(t_hflm / t_ours, 3), "identical_texts": same,
        # texts that differ: the top-2 logit gap where they part (a tie below TIE: rounding may pick either)
        "divergence_gaps": gaps, "ties": sum(g < TIE for g in gaps), "real_differences": sum(g >= TIE for g in gaps),
        "finish": {f: sum(g.finish == f for g in gens) for f in ("eos", "stop", "length")},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"b2-hflm-bs{hflm_bs}.json").write_text(json.dumps(out, indent=1))
    print(f"{'engine':<12}{'seconds':>10}{'tok/s':>10}\n{'quanteval':<12}{t_ours:>10.1f}{n_tokens / t_ours:>10.1f}\n"
          f"{'lm-eval HFLM':<12}{t_hflm:>10.1f}{n_tokens / t_hflm:>10.1f}\n"
          f"speedup {t_hflm / t_ours:.2f}x; identical texts {same}/{len(prompts)} (+{out['ties']} ties, "
          f"{out['real_differences']} real differences); {n_tokens} tokens")
    return out


TIE = 1e-4  # top-2 logit gap below which greedy decoding may pick either token (as tests/test_generate.py)


def divergence_gap(model, tok, prompt: str, gen, other: str) -> float:
    """Where ``gen``'s text and ``other`` part: the top-2 logit gap of a teacher-forced pass over the
    prompt and ``gen``'s tokens before that point (a gap below ``TIE`` is a numerical tie)."""
    import torch

    j = 0
    while j < len(gen.tokens) and other.startswith(tok.decode(gen.tokens[: j + 1], skip_special_tokens=True)):
        j += 1
    ids = tok(prompt, add_special_tokens=False)["input_ids"] + gen.tokens[:j]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=model.device), logits_to_keep=1).logits[0, -1].float()
    top2 = logits.topk(2).values
    return round(float(top2[0] - top2[1]), 6)


if __name__ == "__main__":
    main()
