"""Export a run's quantised model as a compressed-tensors checkpoint: ``quanteval-export RUN --out DIR``.

``RUN`` is a run file (``<results>/<sweep>/runs/*.json``) or a run key (or a
prefix of one) found under ``--results-dir``. The checkpoint loads with
``AutoModelForCausalLM.from_pretrained(DIR)`` (transformers decompresses it
through compressed-tensors) and holds the model the run evaluated:

- the quantisation comes from the sweep's cache
  (``<results>/cache/quant/<method>-<key>.pt``), keyed exactly as
  ``quanteval.sweep.quantize`` keys it, from the run's stored settings; a
  method without calibration (RTN) whose result is not cached is recomputed
  from the baseline model loaded in the run's dtype (RTN is deterministic);
  GPTQ/AWQ without their cache file are an error;
- AWQ folds are applied to the float model first, so the saved norm weights
  (and biases) carry them;
- format ``pack-quantized``: ``weight_packed`` int32 rows (the layout of
  ``quanteval_kernels.pack``), ``weight_scale``, ``weight_shape`` and, when
  asymmetric, ``weight_zero_point`` (packed along the output dimension).
  Codes are stored signed (``code - 2**(bits-1)``), so a symmetric result
  (zero ``2**(bits-1)``) needs no zero point;
- compressed-tensors needs the group size to divide the input width; a
  layer with a short last group (SmolLM2 at g128: 576 = 4 x 128 + 64) is
  written at group size ``gcd(group_size, in)`` with each scale repeated,
  which describes the same weights exactly. Each distinct scheme is one
  config group targeting its layers by name;
- not representable, and refused in one line: GPTQ ``act_order`` without
  ``static_groups`` (compressed-tensors dropped per-column ``g_idx``,
  ``actorder='group'``);
- a quantised lm_head tied to the embeddings stays tied: its dequantised
  weight is saved as the (float) embedding, as fake-quant evaluates it, and
  it is not packed; a quantised untied embedding is saved dequantised too.

Widths: whatever the installed compressed-tensors' pack-quantized compressor
accepts (0.20.0: 1-8 bits, packed densely). At 3, 5, 6 and 7 bits that layout
is recent (compressed-tensors PR #732; earlier releases padded each word, and
before PR #715 only 4 and 8 bits were accepted), so those checkpoints need
compressed-tensors >= 0.20 to be read; 2, 4 and 8 bits are unchanged across
versions. The checkpoint records the version it was written with.

Float tensors are saved in the dtype the run used (float32 for CPU runs).
Scales are saved in float32 for a float32 model, else in fp16 (quanteval's
scales are fp16 values; bf16 would round them). Loaded in float32 the
checkpoint gives the fake-quant weights exactly.

Loading (transformers 5.24, compressed-tensors 0.20.0, checked on a CPU):

- symmetric (``sym=true``): ``AutoModelForCausalLM.from_pretrained(DIR)``;
- asymmetric: ``from_pretrained(DIR, quantization_config=
  CompressedTensorsConfig(dequantize=True))``. The default (compressed) load
  fails with a size mismatch on ``weight_zero_point``: transformers builds
  the model on the meta device, where compressed-tensors' compressor leaves
  the zero point unpacked ``(out, n_groups)``, while a real compression packs
  it ``(ceil(out * bits / 32), n_groups)``, as this export does. The
  ``dequantize=True`` path decompresses each layer as it loads and works.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from quanteval import results

log = logging.getLogger(__name__)


class ExportError(Exception):
    """A run that cannot be exported; the message is one line."""


# --------------------------------------------------------------------------- finding the run and its result


def find_run(run: str | Path, results_dir: Path) -> Path:
    """The run file for a path or a run key (prefix) under ``results_dir``."""
    p = Path(run)
    if p.is_file():
        return p
    if p.is_dir():
        raise ExportError(f"{p} is a directory: give a run file (<results>/<sweep>/runs/*.json) or a run key")
    key = str(run)
    matches = {}
    for f in sorted(Path(results_dir).glob("*/runs/*.json")):
        if f.stem.rsplit("__", 1)[-1].startswith(key[:12]):
            rec_key = results.read_run(f).get("run_key", "")
            if rec_key.startswith(key):
                matches.setdefault(rec_key, f)
    if not matches:
        raise ExportError(f"run {key!r} not found: no run file or run key under {Path(results_dir).resolve()}")
    if len(matches) > 1:
        raise ExportError(f"run key {key!r} is ambiguous ({len(matches)} runs match); give more characters")
    return next(iter(matches.values()))


def quant_cache_path(run_file: Path, record: dict) -> Path:
    """Where the sweep cached this run's result (``Variant.quant_key``: settings without task/preset/git)."""
    from quanteval.variant import quant_key_of

    settings = record["settings"]
    key = quant_key_of(settings)
    root = run_file.resolve().parents[2]  # <results>/<sweep>/runs/<file>
    return root / "cache" / "quant" / f"{settings['method']['name']}-{key}.pt"


def cached_result(run_file: Path, record: dict):
    """The run's ``QuantResult`` from the sweep's cache; None when absent and the method needs no
    calibration (RTN: recompute it); ExportError for GPTQ/AWQ without their cache file."""
    from quanteval.methods import METHODS, QuantResult

    path = quant_cache_path(run_file, record)
    if path.exists():
        return QuantResult.load(path)
    v = record["variant"]
    if METHODS[record["settings"]["method"]["name"]].needs_calibration:
        raise ExportError(f"{v['label']}: cached result {path} is missing; rerun the sweep to recreate it")
    return None


def recompute_result(record: dict, model):
    """A calibration-free method's result (RTN), recomputed on the baseline ``model`` (deterministic)."""
    from quanteval.methods import METHODS, QuantSpec
    from quanteval.models import adapter_for

    v = record["variant"]
    spec = QuantSpec(v["bits"], v["group_size"], v["sym"], record["settings"].get("quantize_embeddings", False))
    return METHODS[record["settings"]["method"]["name"]].compute(model, adapter_for(model), spec, None, None)


def load_run_model(record: dict):
    """The run's baseline model on the CPU, in the dtype the run used."""
    from quanteval.config import ModelConfig
    from quanteval.models import load_model, resolve_dtype

    settings = record["settings"]
    dtype = (record.get("model") or {}).get("dtype") or settings.get("dtype", "auto")
    return load_model(ModelConfig(**settings["model"]), torch.device("cpu"), resolve_dtype(dtype, torch.device("cpu")))


# --------------------------------------------------------------------------- the format


def format_bits() -> list[int]:
    """Bit widths the installed compressed-tensors' pack-quantized compressor accepts (asking it)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    ok = []
    for b in range(1, 9):
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=b, type="int"))
        if PackedQuantizationCompressor.can_compress(torch.nn.Linear, scheme):
            ok.append(b)
    return ok


def _scheme_of(lq) -> tuple[int, int, bool]:
    """(bits, group size written, sym): the group size divides ``in`` (-1: per channel)."""
    from quanteval.primitives import group_width

    in_f = lq.codes.shape[1]
    width = group_width(in_f, lq.group_size)
    if width >= in_f:
        return lq.bits, -1, lq.sym  # one group per row
    if in_f % width:
        return lq.bits, math.gcd(width, in_f), lq.sym  # splits every group, the short last one too, into equal parts
    return lq.bits, width, lq.sym


def check_contiguous_groups(lq) -> None:
    """ExportError unless ``lq``'s groups are contiguous runs of columns (the format has no ``g_idx``)."""
    from quanteval.primitives import group_index

    if not torch.equal(lq.g_idx.cpu().to(torch.int32), group_index(lq.codes.shape[1], lq.group_size)):
        raise ExportError("GPTQ act_order without static_groups: compressed-tensors has no per-column g_idx "
                          "(actorder='group' was removed); rerun with method.static_groups=true")


def compressed_tensors_layer(lq, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """One linear's checkpoint tensors (local names) in compressed-tensors' pack-quantized format.

    Equal to what compressed-tensors' own ``PackedQuantizationCompressor.compress`` writes for the
    dequantised weight with these scales and zero points (tests/test_export.py checks it).
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from quanteval.primitives import group_index, group_width

    check_contiguous_groups(lq)
    out_f, in_f = lq.codes.shape
    bits, g, sym = _scheme_of(lq)
    offset = 2 ** (bits - 1)
    width = group_width(in_f, g)
    cols = torch.arange(-(-in_f // width)) * width  # first column of each written group
    src = group_index(in_f, lq.group_size)[cols].long()  # original group of each written group
    scales, zeros = lq.scales[:, src], lq.zeros[:, src]  # (out, n_groups written)
    if sym and not bool((zeros == offset).all()):
        raise ExportError(f"sym=true result with zero points other than {offset}")
    tensors = {
        "weight_packed": pack_to_int32((lq.codes.to(torch.int16) - offset).to(torch.int8), bits),
        "weight_scale": scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([out_f, in_f]),
    }
    if not sym:
        tensors["weight_zero_point"] = pack_to_int32((zeros.to(torch.int16) - offset).to(torch.int8), bits,
                                                     packed_dim=0)
    return tensors


def quantization_config(schemes: dict[tuple[int, int, bool], list[str]]):
    """compressed-tensors' config: one group per scheme, targeting its modules by name."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups = {}
    for i, ((bits, g, sym), names) in enumerate(sorted(schemes.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                                strategy="channel" if g == -1 else "group", group_size=None if g == -1 else g)
        groups[f"group_{i}"] = QuantizationScheme(targets=sorted(names), weights=args)
    return QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed")


# --------------------------------------------------------------------------- export


@torch.no_grad()
def write_checkpoint(model, tokenizer, result, out_dir: Path) -> Path:
    """Apply ``result``'s folds to the float ``model`` and save it, packing its quantised linears."""
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    from quanteval.methods import apply_fold

    for f in result.folds:
        apply_fold(model.get_submodule(f.module), f.kind, f.scale)
    seen: set[int] = set()
    tied: set[int] = set()  # parameters reached under two names (tied embeddings)
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    packed: dict[str, dict[str, torch.Tensor]] = {}
    dtype = next(model.parameters()).dtype
    scale_dtype = torch.float32 if dtype == torch.float32 else torch.float16  # fp16 values: bf16 would round them
    for name, lq in result.layers.items():
        module = model.get_submodule(name)
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in tied:
            packed[name] = compressed_tensors_layer(lq, scale_dtype)
        else:  # tied lm_head or an embedding: saved dequantised (fake-quant)
            module.weight.copy_(lq.dequantize(torch.float32).to(module.weight.dtype))
    state: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for k, t in model.state_dict().items():
        if k.removesuffix(".weight") in packed and k.endswith(".weight"):
            continue
        if t.untyped_storage().data_ptr() in storages:  # a tied weight: transformers re-ties it on load
            continue
        storages.add(t.untyped_storage().data_ptr())
        state[k] = t.contiguous()
    for name, tensors in packed.items():
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
    schemes: dict[tuple[int, int, bool], list[str]] = {}
    for name in packed:
        schemes.setdefault(_scheme_of(result.layers[name]), []).append(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    ModelCompressor(quantization_config=quantization_config(schemes)).update_config(str(out_dir))
    return out_dir


def export(run: str | Path, out_dir: str | Path, results_dir: str | Path = "results") -> Path:
    """Write run ``run``'s quantised model to ``out_dir`` as a compressed-tensors checkpoint.

    >>> # export("results/default/runs/wikitext2__smollm2_135m__gptq-w4-g64__0123456789ab.json", "out/w4")
    >>> # AutoModelForCausalLM.from_pretrained("out/w4")
    """
    run_file = find_run(run, Path(results_dir))
    record = results.read_run(run_file)
    v = record.get("variant") or {}
    if v.get("method") in (None, "none"):
        raise ExportError(f"{run_file.name} is a baseline run (method none): nothing is quantised to export")
    from quanteval.methods import METHODS

    name = ((record.get("settings") or {}).get("method") or {}).get("name", v.get("method"))
    if METHODS.get(name) is not None and not METHODS[name].affine:
        raise ExportError(f"{run_file.name}: method={name} makes a non-affine result ({v.get('label')}), which "
                          f"compressed-tensors' integer format cannot hold; export takes affine methods "
                          f"({', '.join(k for k, m in METHODS.items() if m is not None and m.affine)})")
    if v.get("method") == "kv":
        raise ExportError(f"{run_file.name} quantises the KV cache only ({v.get('label')}): its weights are the "
                          f"baseline's, nothing to export")
    held = format_bits()
    if v["bits"] is not None and v["bits"] not in held:
        raise ExportError(f"bits={v['bits']}: compressed-tensors' pack-quantized format holds "
                          f"{', '.join(map(str, held))}-bit integers")
    result = cached_result(run_file, record)  # before the model loads: a missing cache fails fast
    if result is not None and not result.affine:  # method=mixed over hqq: float zeros, as method=hqq itself
        held_formats = " and ".join(f"{f} layers" for f in result.formats())
        raise ExportError(f"{run_file.name}: {v.get('label')} holds {held_formats} (not scale * (code - zero) with "
                          f"integer zeros), which compressed-tensors' integer format cannot hold")
    for lq in (result.layers.values() if result is not None else ()):
        check_contiguous_groups(lq)
        if lq.bits not in held:  # method=mixed: each layer's own bits (a config group per width)
            raise ExportError(f"bits={lq.bits}: compressed-tensors' pack-quantized format holds "
                              f"{', '.join(map(str, held))}-bit integers")
    loaded = load_run_model(record)
    if result is None:
        result = recompute_result(record, loaded.model)
    path = write_checkpoint(loaded.model, loaded.tokenizer, result, Path(out_dir))
    load = ("AutoModelForCausalLM.from_pretrained(DIR)" if v["sym"] else
            "AutoModelForCausalLM.from_pretrained(DIR, quantization_config=CompressedTensorsConfig(dequantize=True))")
    (path / "quanteval_export.json").write_text(json.dumps(
        {"run_file": str(run_file.resolve()), "run_key": record.get("run_key"), "variant": v, "load": load}, indent=1))
    log.info("exported %s (%s) to %s", v.get("label"), record.get("run_key"), path)
    return path
