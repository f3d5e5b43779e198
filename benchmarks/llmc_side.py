"""The llm-compressor side of the peer benchmark; runs inside its own venv (it pins transformers<=5.17).

Loads the converted SmolLM2 safetensors directory, runs ``oneshot`` with
GPTQModifier or QuantizationModifier (RTN) on exactly the calibration token
ids quanteval used, times it, and saves each quantised linear's
quantise-dequantise weight so quanteval's evaluator scores both libraries'
results identically. Only torch, transformers, datasets and llmcompressor
are imported here.

    .venv-llmc/bin/python benchmarks/llmc_side.py MODEL_DIR CALIB.pt OUT_DIR gptq 4 64
"""

import json
import resource
import sys
import time
from pathlib import Path

import torch


def main(model_dir: str, calib: str, out_dir: str, method: str, bits: int, group: int) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    ids = torch.load(calib)  # (n, seq_len)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    if method == "gptq":
        # actorder=None: the same column order as quanteval's default (llm-compressor defaults to static)
        recipe = GPTQModifier(config_groups={"g0": scheme}, ignore=["lm_head"], actorder=None,
                              block_size=128, dampening_frac=0.01)
    else:
        recipe = QuantizationModifier(config_groups={"g0": scheme}, ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], processor=tok, shuffle_calibration_samples=False)
    quant_s = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    qdq = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if hasattr(m, "weight_scale") and isinstance(m, torch.nn.Linear):
                args = m.quantization_scheme.weights
                qdq[name] = fake_quantize(m.weight, m.weight_scale, m.weight_zero_point, args).contiguous()
                qdq[name + ".__scale"] = m.weight_scale.detach().float().contiguous()  # (out, n_groups)
                qdq[name + ".__zero"] = m.weight_zero_point.detach().float().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(qdq, str(out / f"llmc-{method}-w{bits}.safetensors"))
    import llmcompressor

    (out / f"llmc-{method}-w{bits}.json").write_text(json.dumps({
        "library": f"llm-compressor {llmcompressor.__version__}", "method": method, "bits": bits,
        "load_s": load_s, "quantize_s": quant_s, "peak_rss_mb": peak_mb, "n_layers": len(qdq)}))


if __name__ == "__main__":
    m, c, o, meth, b, g = sys.argv[1:7]
    main(m, c, o, meth, int(b), int(g))
