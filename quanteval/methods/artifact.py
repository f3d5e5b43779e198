"""``method=artifact``: a quantised file's own weights, dequantised by the libraries that define its format.

    quanteval method=none,artifact artifact=SmolLM2-135M-Instruct-Q4_K_M.gguf bits=4
    quanteval method=none,artifact artifact=a.gguf,b.gguf,ckpt/ bits=4     # several files: a comma list

The file is identified by ``quanteval.artifacts`` (kind, type, content hash); this module checks it
against the base and turns it into a ``QuantResult``, so it is applied, scored and reported like any
variant. Nothing is re-implemented:

- **GGUF**: transformers' own GGUF loader (``load_gguf_checkpoint``) maps llama.cpp's tensor names to
  the model's, reverses llama.cpp's Q/K row permutation, and dequantises each tensor with the ``gguf``
  package's ``dequantize`` (every type, k-quants and i-quants included). Each tensor's type and bytes
  come from the ``gguf`` package's reader of the same file.
- **compressed-tensors**: ``AutoModelForCausalLM.from_pretrained(DIR,
  quantization_config=CompressedTensorsConfig(dequantize=True))``, compressed-tensors' own
  decompression; each layer's bytes are its tensors in the safetensors files.

What the result holds: every 2-D tensor the file stores quantised (the linears, and the embedding
when the file quantises it, as llama.cpp's mixes do) is a ``FormatQuant`` ("gguf Q4_K", "ct int4 g64
asym") whose ``storage_bits`` are the bytes the file spends on it, so effective bits come from the
file itself, tensor by tensor; every other tensor (norms, float embeddings, biases) is set verbatim
(``QuantResult.tensors``): an AWQ checkpoint's folded norms, or a file made from another fine-tune,
is evaluated as it is. ``result.info["tensors"]`` lists every tensor of the file with its type and bytes
(the report's drill-down shows them).

The base must match the file: architecture, tied embeddings, every tensor's shape and the vocabulary
are checked (``check_base``) before any heavy work, and the first mismatch is named.

A file is not copied into the quantisation cache (it is its own cache): it is read once per process
and kept in memory for the jobs that follow (``Session.kept``). Reading SmolLM2-135M's GGUF takes
about 13 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch

from quanteval import hf_cache
from quanteval.artifacts import FLOAT_TYPES, Artifact, ArtifactError, gguf_reader, inspect, weight_files
from quanteval.methods import QuantResult
from quanteval.models import gguf_config_tokens
from quanteval.primitives import FormatQuant, exact_float

log = logging.getLogger(__name__)

SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                     "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U32": 4, "U16": 2, "U64": 8}


# --------------------------------------------------------------------------- the base check


def check_base(artifact: Artifact, model_cfg) -> None:
    """ArtifactError (one line) naming the first difference between the file and the base model:
    architecture, tied embeddings, a tensor's shape (or a missing tensor), the vocabulary."""
    import dataclasses

    _check_base(artifact, json.dumps(dataclasses.asdict(model_cfg), sort_keys=True))


@lru_cache(maxsize=16)
def _check_base(artifact: Artifact, model_json: str) -> None:
    from quanteval.config import ModelConfig

    model_cfg = ModelConfig(**json.loads(model_json))
    try:
        base_conf, base_tokens = base_facts(model_cfg)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"model={model_cfg.name}: the base's config or tokenizer does not load: {_line(e)}") from None
    try:
        art_conf, art_tokens, art_shapes = artifact_facts(artifact, base_conf)
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken config.json / tokenizer.json / GGUF metadata: one line
        raise ArtifactError(f"{artifact.path}: its config or tokenizer does not load: {_line(e)}") from None
    who = f"{artifact.name}"
    base = f"the base's (model={model_cfg.name})"
    if art_conf.model_type != base_conf.model_type:
        raise ArtifactError(f"{who}: architecture {art_conf.model_type} differs from {base}, {base_conf.model_type}")
    tie_a, tie_b = bool(getattr(art_conf, "tie_word_embeddings", False)), bool(getattr(base_conf, "tie_word_embeddings", False))
    if tie_a != tie_b:
        raise ArtifactError(f"{who}: tie_word_embeddings={tie_a} differs from {base}, {tie_b}")
    base_shapes = meta_shapes(base_conf)
    for name, shape in art_shapes.items():
        if name in base_shapes and tuple(base_shapes[name]) != tuple(shape):
            raise ArtifactError(f"{who}: tensor {name} is {_shape(shape)}, {base} is {_shape(base_shapes[name])}")
    missing = [n for n in base_shapes if n not in art_shapes and not (tie_b and n == "lm_head.weight")]
    if missing:
        raise ArtifactError(f"{who}: has no tensor for {missing[0]} (of {base}; {len(missing)} missing in all)")
    if art_tokens is not None and base_tokens is not None:
        # the tokens both list, id by id (the embedding's rows were checked above: a GGUF converter may pad
        # its token list to the embedding's size, e.g. Qwen's [PAD151665] ..., which a tokenizer does not list)
        for i, (a, b) in enumerate(zip(art_tokens, base_tokens)):
            if a != b:
                raise ArtifactError(f"{who}: vocabulary differs from {base} at token {i}: {a!r} vs {b!r}")


def _line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _shape(s) -> str:
    return "x".join(str(int(d)) for d in s)


def base_facts(model_cfg):
    """The base model's config and token list, without loading its weights."""
    from transformers import AutoConfig, AutoTokenizer

    if model_cfg.source == "gguf_package":
        from quanteval.models import gguf_path

        config, tokens = gguf_config_tokens(str(gguf_path(model_cfg)))
        return config, tokens
    path = model_cfg.name_or_path
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    return config, tok.convert_ids_to_tokens(list(range(len(tok))))


def meta_shapes(config) -> dict[str, tuple]:
    """Every parameter's shape of a model of ``config``, built on the meta device (no memory, no weights)."""
    hf_cache.load()  # before the model's classes import transformers' cache module
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def artifact_facts(artifact: Artifact, base_conf):
    """The artifact's config, token list (None when it has none) and tensor shapes by the model's names."""
    if artifact.kind == "gguf":
        config, tokens = gguf_config_tokens(artifact.path)
        shapes = {hf: shape for _, hf, _, shape, _ in gguf_tensors(artifact, base_conf) if hf is not None}
        return config, tokens, shapes
    from transformers import AutoConfig

    path = Path(artifact.path)
    config = AutoConfig.from_pretrained(path)
    plain = config.to_dict()
    plain.pop("quantization_config", None)
    plain.pop("_name_or_path", None)
    shapes = meta_shapes(AutoConfig.for_model(**plain))
    tokens = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    return config, tokens, shapes


def gguf_tensors(artifact: Artifact, base_conf) -> list[tuple]:
    """Every tensor of a GGUF file: (gguf name, the model's name or None, type, shape (out, in), bytes).

    Names are mapped by transformers' own GGUF name map, built on a meta model of ``base_conf``."""
    hf_cache.load()
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    st = Path(artifact.path).stat()
    reader = gguf_reader(artifact.path, st.st_size, st.st_mtime_ns)
    arch = str(reader.fields["general.architecture"].contents())
    art_conf, _ = gguf_config_tokens(artifact.path)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(base_conf)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=art_conf.to_dict())
    name_map = get_gguf_hf_weights_map(meta, processor)
    return [(t.name, name_map.get(t.name), t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())),
             int(t.n_bytes)) for t in reader.tensors]


# --------------------------------------------------------------------------- reading the file


def artifact_model(model, adapter, spec, method_cfg, calib=None) -> QuantResult:
    """The artifact at ``method_cfg.path`` (the run's ``artifact=``) as a result for ``model`` (its base);
    ``model`` is not modified."""
    artifact = inspect(method_cfg.path)
    t0 = time.perf_counter()
    if artifact.kind == "gguf":
        layers, tensors, rows, library = _read_gguf(artifact, model)
    else:
        layers, tensors, rows, library = _read_compressed_tensors(artifact, model)
    for name, t in [*((n, lq.weight) for n, lq in layers.items()), *tensors.items()]:
        if not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{artifact.path}: corrupt tensor {name}: it dequantises to inf or NaN")
    set_names = {f"{n}.weight" for n in layers} | set(tensors)
    missing = [n for n, _ in model.named_parameters() if n not in set_names]
    if missing:
        raise ArtifactError(f"{artifact.name}: has no tensor for {missing[0]} ({len(missing)} missing in all)")
    types = Counter(r[2] for r in rows)
    info = {"library": library, "artifact": {**artifact.settings(), "path": artifact.path},
            "tensor_types": dict(types), "file_tensor_bytes": sum(r[4] for r in rows),
            # [file name, model name, type, shape, bytes] of every tensor in the file
            "tensors": [list(r[:3]) + [list(r[3]), r[4]] for r in rows],
            "read_s": time.perf_counter() - t0}
    log.info("artifact %s: %d quantised tensors, %d float, %s (%.1f s)", artifact.label, len(layers), len(tensors),
             ", ".join(f"{t} x{n}" for t, n in types.most_common()), info["read_s"])
    return QuantResult(layers=layers, tensors=tensors, info=info)


def _read_gguf(artifact: Artifact, model):
    import importlib.metadata

    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    rows = gguf_tensors(artifact, model.config)
    parsed = load_gguf_checkpoint(artifact.path, return_tensors=True, model_to_load=model)
    by_name = {hf: (gname, type_, n_bytes) for gname, hf, type_, _, n_bytes in rows if hf is not None}
    layers, tensors = {}, {}
    for hf, t in parsed["tensors"].items():
        gname, type_, n_bytes = by_name[hf]
        if t.dim() == 2 and type_ not in FLOAT_TYPES and hf.endswith(".weight"):
            layers[hf.removesuffix(".weight")] = FormatQuant(f"gguf {type_}", exact_float(t), storage_bits=8 * n_bytes,
                                                              detail={"type": type_, "gguf": gname})
        else:
            tensors[hf] = t
    return layers, tensors, rows, f"gguf {importlib.metadata.version('gguf')} (through transformers' GGUF loader)"


def _read_compressed_tensors(artifact: Artifact, model):
    import importlib.metadata

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = Path(artifact.path)
    file_tensors: dict[str, tuple[str, tuple, int]] = {}  # name -> (dtype, shape, bytes)
    for f in weight_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                n = 1
                for d in shape:
                    n *= int(d)
                file_tensors[k] = (dtype, shape, n * SAFETENSORS_BYTES.get(dtype, 4))
    dtype = next(model.parameters()).dtype
    src = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                               quantization_config=CompressedTensorsConfig(dequantize=True))
    state = src.state_dict()
    quantised = sorted(k.removesuffix(".weight_scale") for k in file_tensors if k.endswith(".weight_scale"))
    layers, tensors, rows = {}, {}, []
    owner = {}  # file tensor -> the quantised module it belongs to
    for m in quantised:
        for k in file_tensors:
            if k == f"{m}.weight" or k.startswith(f"{m}.weight_"):
                owner[k] = m
    for m in quantised:
        bits = sum(file_tensors[k][2] for k, o in owner.items() if o == m) * 8
        layers[m] = FormatQuant(f"ct {artifact.type}", exact_float(state[f"{m}.weight"].detach().float()), bits,
                                detail={"tensors": sorted(k.rsplit(".", 1)[1] for k, o in owner.items() if o == m)})
    for k, t in state.items():
        if k.removesuffix(".weight") not in layers:
            tensors[k] = t.detach().clone()
    for k, (dt, shape, n_bytes) in sorted(file_tensors.items()):
        rows.append((k, owner.get(k, k), f"ct {artifact.type}" if k in owner else dt, shape, n_bytes))
    del src
    return layers, tensors, rows, f"compressed-tensors {importlib.metadata.version('compressed-tensors')}"
