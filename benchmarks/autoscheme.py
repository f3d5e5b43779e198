"""Issue 19's peer: auto-round's AutoScheme at method=mixed's budgets, measured in the same run.

    python benchmarks/autoscheme.py --results results       # budgets 3.3 3.8 4.31; reads sweep "mixed"
    python benchmarks/autoscheme.py --budgets 3.8 --out benchmarks/results/autoscheme-DATE.json

For each budget AutoScheme (auto-round 0.16.1, ``auto_round.AutoScheme``) picks one scheme per linear of
the decoder blocks among int W2/W3/W4/W8 g64 asymmetric (method=mixed's default choices) so that its
average bits, scales and zero points counted (its own accounting, the same as quanteval's for these
layouts), stay within the budget. auto-round then quantises the model with those schemes at ``iters=0``
(its RTN mode), so the row to compare it with is ``mixed-rtn`` at the same budget: the two differ in how
the bits are chosen (AutoScheme: its gradient-weighted loss estimate per layer on its calibration text,
a DP over layers; quanteval: measured KL per unit on WikiText-2 validation, an exact DP).

Nothing of AutoScheme is re-implemented: this script calls it and reads what it left. Every quantised
linear is read back as codes, scales and zeros (``quanteval.methods.autoround.layer_from_autoround``,
which rejects a layer whose dequantisation is not auto-round's fake-quantised weight bit for bit), and
the effective bits are quanteval's own accounting of those layers.

Calibration (AutoScheme's ``dataset`` must be a name or a file): 16 windows of 256 tokens of WikiText-2
*validation* (AutoScheme's default sample count and length), decoded to text and written to a temporary
JSON file. Evaluation: the fidelity task's 16 x 512 WikiText-2 *test* windows, KL and perplexity
against the unquantised model computed here (the same numbers the sweep's ``wikitext2`` runs report;
the baseline's perplexity is printed beside the sweep's as a check). Seconds are wall time on this
machine and mean something only on an idle one: the first budget's include AutoScheme's scoring of every
option (cached for the run, in a temporary directory), the later ones its solve and auto-round's RTN.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

CHOICES = (2, 3, 4, 8)
GROUP = 64


def run(budgets: list[float], n_calib: int, calib_len: int) -> dict:
    os.environ.setdefault("AR_ALLOW_W8_ASYM", "1")  # W8 asym is a legal choice here (compressed-tensors serves it)
    import torch
    from auto_round import AutoRound, AutoScheme
    from auto_round import __version__ as ar_version
    from auto_round.schemes import QuantizationScheme

    from quanteval.accounting import compression
    from quanteval.config import ModelConfig
    from quanteval.data import data_file, resolve_data_dir
    from quanteval.evaluate import fidelity
    from quanteval.methods import QuantSpec
    from quanteval.methods.autoround import layer_from_autoround
    from quanteval.models import adapter_for, load_model

    loaded = load_model(ModelConfig(), torch.device("cpu"), torch.float32)
    model, tok = loaded.model, loaded.tokenizer
    adapter = adapter_for(model)
    data = resolve_data_dir(None)
    test = fidelity.make_windows(tok, data_file(data, "wikitext2/test.txt").read_text(), 16, 512)
    valid = fidelity.make_windows(tok, data_file(data, "wikitext2/valid.txt").read_text(), n_calib, calib_len + 8)
    with torch.no_grad():
        base = fidelity.baseline_stats(model, test, 64)
        base_ppl = float(base.true_logp.double().mean().neg().exp())
    param_count = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    options = [QuantizationScheme(bits=b, group_size=GROUP, sym=False, data_type="int", act_bits=16) for b in CHOICES]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # AutoScheme caches its per-scheme scores (by model, data and scheme) under ~/.cache/auto_round: a
        # cache of this run's own, so the first budget pays the scoring and the later ones reuse it, every run
        os.environ["AR_AUTO_SCHEME_CACHE"] = str(Path(tmp) / "scores")
        calib = Path(tmp) / "wikitext2-valid.json"
        calib.write_text(json.dumps([tok.decode(w) for w in valid]))
        for budget in budgets:
            work = copy.deepcopy(model)
            t0 = time.perf_counter()
            scheme = AutoScheme(avg_bits=budget, options=options, dataset=str(calib), nsamples=n_calib,
                                seqlen=calib_len, device_map="cpu", enable_torch_compile=False)
            ar = AutoRound(work, tokenizer=tok, scheme=scheme, iters=0, dataset=str(calib), nsamples=n_calib,
                           seqlen=calib_len, device_map="cpu", amp=False, enable_torch_compile=False,
                           low_cpu_mem_usage=False)
            qmodel, _ = ar.quantize()
            seconds = time.perf_counter() - t0
            layers, bits = {}, {}
            for name, mod in qmodel.named_modules():
                if not name.startswith(f"{adapter.blocks}.") or not isinstance(mod, torch.nn.Linear):
                    continue
                b = int(ar.layer_config[name]["bits"])
                bits[name] = b
                layers[name] = layer_from_autoround(mod, QuantSpec(bits=b, group_size=GROUP, sym=False))
            with torch.no_grad():
                m = fidelity.compare(qmodel, test, base)
            eff = compression(param_count, layers)["effective_bits"]
            hist = {b: sum(v == b for v in bits.values()) for b in CHOICES}
            rows.append({"budget": budget, "effective_bits": eff, "kl_mean": m["kl_mean"], "ppl": m["ppl"],
                         "same_top1": m["same_top1"], "seconds": round(seconds, 1), "layers_by_bits": hist,
                         "bits": bits})
            print(f"AutoScheme {budget}: effective {eff:.3f} b, KL {m['kl_mean']:.4g}, ppl {m['ppl']:.2f}, "
                  f"layers by bits {hist}, {seconds:.0f} s", file=sys.stderr, flush=True)
            del work, qmodel, ar
    return {"library": f"auto-round {ar_version}", "choices": list(CHOICES), "group_size": GROUP,
            "calibration": f"WikiText-2 validation, {n_calib} x {calib_len} tokens", "baseline_ppl": base_ppl,
            "evaluation": "WikiText-2 test, 16 x 512 tokens", "rows": rows}


def table(result: dict, results: Path | None) -> str:
    mixed = {}
    if results is not None and (results / "mixed" / "runs").is_dir():
        sys.path.insert(0, str(Path(__file__).parent))
        from mixed import newest

        for r in newest(sorted((results / "mixed" / "runs").glob("wikitext2__*.json"))):
            mixed[r["variant"]["label"]] = r
    out = [f"baseline ppl here {result['baseline_ppl']:.3f}"
           + (f", in the sweep {mixed['baseline']['metrics']['ppl']:.3f}" if "baseline" in mixed else ""), "",
           "| budget | AutoScheme + auto-round RTN: eff. bits | KL | ppl | seconds | mixed-rtn: eff. bits | KL | ppl |",
           "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        m = next((v for k, v in mixed.items() if k.startswith("mixed-rtn")
                  and abs(v["quantization"]["mixed"]["budget"] - r["budget"]) < 1e-6), None)
        ours = (f"{m['compression']['effective_bits']:.3f} | {m['metrics']['kl_mean']:.3g} | "
                f"{m['metrics']['ppl']:.2f}" if m else "not run | | ")
        out.append(f"| {r['budget']} | {r['effective_bits']:.3f} | {r['kl_mean']:.3g} | {r['ppl']:.2f} | "
                   f"{r['seconds']:.0f} | {ours} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[3.3, 3.8, 4.31])
    ap.add_argument("--results", type=Path, help="a results dir whose sweep 'mixed' holds the mixed-rtn rows")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    a = ap.parse_args()
    result = run(a.budgets, a.n_calib, a.calib_len)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result, a.results))


if __name__ == "__main__":
    main()
