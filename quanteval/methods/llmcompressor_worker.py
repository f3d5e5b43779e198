"""The llm-compressor side of ``method=llmcompressor``: run inside llm-compressor's own venv, as a script.

It imports only torch, transformers, datasets, compressed-tensors and llmcompressor (never quanteval:
that venv has an older transformers), so it is run by file path::

    <venv>/bin/python -I llmcompressor_worker.py JOB.json   # -I: this folder's llmcompressor.py must not shadow the library

``JOB.json`` names the model folder (safetensors + config + tokenizer), the calibration token ids
(``torch.save`` of an (n, seq_len) int64 tensor, no BOS added, every position attended), the output
file and the recipe: ``modifier`` (gptq | rtn | awq), ``bits``, ``group_size`` (-1: per channel),
``sym``, and for GPTQ ``actorder`` (static | group | none), ``dampening_frac`` and ``block_size``.

The output (``torch.save``) holds, per quantised linear, llm-compressor's own integer values
(``compressed_tensors...forward.quantize``), scale, zero point and ``g_idx`` (when it keeps one), and
its own dequantisation of them (``...forward.dequantize``), against which quanteval's reading of the
result is tested; plus timings and versions. Any failure exits non-zero with the error on stderr's
last line.
"""

import json
import resource
import sys
import time


def main(job_file: str) -> None:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = json.loads(open(job_file, encoding="utf-8").read())
    torch.manual_seed(job.get("seed", 0))
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    load_s = time.perf_counter() - t0
    ids = torch.load(job["calibration"])  # (n, seq_len) int64
    g = job["group_size"]
    weights = QuantizationArgs(num_bits=job["bits"], type="int", symmetric=job["sym"],
                               strategy="channel" if g == -1 else "group", group_size=None if g == -1 else g)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    ignore = ["lm_head"]
    modifier = job["modifier"]
    if modifier == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        actorder = None if job["actorder"] == "none" else job["actorder"]
        recipe = GPTQModifier(config_groups={"g0": scheme}, ignore=ignore, actorder=actorder,
                              block_size=job["block_size"], dampening_frac=job["dampening_frac"])
    elif modifier == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        recipe = [AWQModifier(config_groups={"g0": scheme}, ignore=ignore)]
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        recipe = QuantizationModifier(config_groups={"g0": scheme}, ignore=ignore)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], processor=tok, shuffle_calibration_samples=False)
    quantize_s = time.perf_counter() - t0
    layers = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if not (isinstance(m, torch.nn.Linear) and hasattr(m, "weight_scale")):
                continue
            args = m.quantization_scheme.weights
            g_idx = getattr(m, "weight_g_idx", None)
            q = quantize(m.weight, m.weight_scale, m.weight_zero_point, args, dtype=torch.int8, global_scale=None)
            layers[name] = {
                "q": q.to(torch.int8).cpu(),  # (out, in) signed integer values
                "scale": m.weight_scale.detach().float().cpu(),  # (out, n_groups)
                "zero_point": m.weight_zero_point.detach().cpu(),  # (out, n_groups), signed
                "g_idx": None if g_idx is None else g_idx.detach().cpu(),
                "dequantized": dequantize(q, m.weight_scale, m.weight_zero_point, args).float().cpu(),
            }
    import compressed_tensors
    import llmcompressor
    import transformers

    torch.save({"layers": layers, "load_s": load_s, "quantize_s": quantize_s,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "versions": {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                             "compressed_tensors": compressed_tensors.__version__,
                             "transformers": transformers.__version__}}, job["out"])


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Exception as e:  # noqa: BLE001 - the parent reads stderr's last line
        import traceback

        traceback.print_exc()
        sys.exit(f"{type(e).__name__}: {' '.join(str(e).split())}")  # to stderr, exit code 1
