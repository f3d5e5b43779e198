"""Quantisation methods: each computes a ``QuantResult``; one function applies any result.

``METHODS`` maps the name used in ``conf/method/<name>.yaml`` to a ``Method``
whose ``compute`` returns a result (the module ``quanteval/methods/<name>.py``)::

    m = METHODS["gptq"]
    calib = capture_inputs(model, adapter, ids) if m.needs_calibration else None
    result = m.compute(model, adapter, spec, method_cfg, calib)
    apply_result(model, result)   # fake-quant: dequantised weights written in place

Compute, then apply: a ``QuantResult`` is plain tensors, so it can be cached,
exported, packed by ``kernels/`` and tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from quanteval.methods.rtn import rtn_layer
from quanteval.primitives import FormatQuant, LayerQuant, layer_from_dict


@dataclass(frozen=True)
class QuantSpec:
    """What every method is asked for: bits, group size, symmetry, and whether embeddings are included."""

    bits: int
    group_size: int
    sym: bool
    quantize_embeddings: bool = False
    # per-layer bits that override ``bits`` (method=mixed): (module path, bits) pairs
    layer_bits: tuple[tuple[str, int], ...] = ()

    def bits_for(self, name: str) -> int:
        """The bits of the linear at module path ``name``.

        >>> QuantSpec(4, 64, False, layer_bits=(("model.layers.0.mlp.down_proj", 8),)).bits_for("model.layers.0.mlp.down_proj")
        8
        """
        return dict(self.layer_bits).get(name, self.bits)


@dataclass
class Fold:
    """A per-channel divisor folded into a producer module's output (AWQ's scales).

    ``kind`` is ``rmsnorm`` (w <- w / s), ``gemma_rmsnorm`` (w <- (1 + w) / s - 1)
    or ``linear`` (rows of weight and bias divided by s).
    """

    module: str
    kind: str
    scale: torch.Tensor  # (channels,)


@dataclass
class QuantResult:
    """A model's quantisation: one result per quantised linear, plus folds.

    A layer's result is a ``LayerQuant`` (affine: ``scale * (code - zero)``, what RTN, GPTQ, AWQ and
    AutoRound make, and what ``runtime=packed`` and export hold) or a ``FormatQuant`` (a library's own
    format: NF4, HQQ, GGUF blocks; its dequantised weight and exact storage bits).
    """

    layers: dict[str, LayerQuant | FormatQuant]
    folds: list[Fold] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # method statistics (timings, damping rises, ...)
    # other parameters set verbatim, by state-dict name: an artifact's own norms, float embeddings and
    # biases (method=artifact); empty for every method that quantises the base's weights
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        from quanteval.results import torch_save_atomic

        blob = {"layers": {k: v.to_dict() for k, v in self.layers.items()},
                "folds": [(f.module, f.kind, f.scale) for f in self.folds], "info": self.info}
        if self.tensors:
            blob["tensors"] = dict(self.tensors)
        torch_save_atomic(path, blob)

    @property
    def affine(self) -> bool:
        """Whether every layer is a ``LayerQuant`` (what ``runtime=packed`` and export can hold)."""
        return all(isinstance(lq, LayerQuant) for lq in self.layers.values())

    @property
    def swaps_modules(self) -> bool:
        """Whether applying it replaces modules (a ``FormatQuant`` with a ``module``), not only weights."""
        return any(getattr(lq, "module", None) is not None for lq in self.layers.values())

    def formats(self) -> list[str]:
        """The non-affine formats in this result, e.g. ``["bnb nf4"]``."""
        return sorted({lq.format for lq in self.layers.values() if isinstance(lq, FormatQuant)})

    @classmethod
    def load(cls, path: Path) -> "QuantResult":
        blob = torch.load(path, weights_only=True)
        return cls(
            layers={k: layer_from_dict(v) for k, v in blob["layers"].items()},
            folds=[Fold(*f) for f in blob["folds"]],
            info=blob["info"],
            tensors=blob.get("tensors", {}),
        )


@torch.no_grad()
def apply_fold(module: torch.nn.Module, kind: str, scale: torch.Tensor) -> None:
    """Divide ``module``'s output channels by ``scale`` (the consumer weights carry the product)."""
    s = scale.to(module.weight.device, torch.float32)
    w = module.weight.data
    if kind == "rmsnorm":
        w.copy_((w.float() / s).to(w.dtype))
    elif kind == "gemma_rmsnorm":
        w.copy_(((1 + w.float()) / s - 1).to(w.dtype))
    elif kind == "linear":
        w.copy_((w.float() / s[:, None]).to(w.dtype))
        if module.bias is not None:
            module.bias.data.copy_((module.bias.float() / s).to(module.bias.dtype))
    else:
        raise ValueError(f"unknown fold kind {kind!r}")


@torch.no_grad()
def apply_result(model: torch.nn.Module, result: QuantResult) -> bool:
    """Apply any method's result to ``model`` in place; returns whether modules were swapped.

    Each layer's weight becomes its dequantised weight (fake-quant), except a ``FormatQuant`` that names
    a ``module``: that linear is replaced by the module ``REPLACEMENTS[module]`` builds (bitsandbytes'
    ``Linear8bitLt`` for LLM.int8), so the model no longer has its original modules. ``result.tensors``
    (an artifact's other parameters) are copied in first.
    """
    if result.tensors:
        own = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
        for name, t in result.tensors.items():
            if name not in own:
                raise KeyError(f"{name}: the model has no such parameter or buffer")
            own[name].data.copy_(t.to(own[name].device, own[name].dtype))
    for f in result.folds:
        apply_fold(model.get_submodule(f.module), f.kind, f.scale)
    swapped = False
    for name, lq in result.layers.items():
        linear = model.get_submodule(name)
        if getattr(lq, "module", None) is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, REPLACEMENTS[lq.module](linear, lq))
            swapped = True
            continue
        w = linear.weight
        w.data.copy_(lq.dequantize(torch.float32).to(w.device, w.dtype))
    return swapped


def quantized_layer_names(model: torch.nn.Module, adapter, spec: QuantSpec) -> list[str]:
    """Full module paths of the linears a method quantises, in execution order."""
    n_blocks = len(model.get_submodule(adapter.blocks))
    names = [f"{adapter.blocks}.{i}.{lin}" for i in range(n_blocks) for lin in adapter.all_linears]
    return names + outside_block_names(model, adapter, spec)


def outside_block_names(model: torch.nn.Module, adapter, spec: QuantSpec) -> list[str]:
    """The quantised layers outside the decoder blocks: lm_head, and the embedding when untied.

    Empty unless ``spec.quantize_embeddings``.
    """
    if not spec.quantize_embeddings:
        return []
    if getattr(model.config, "tie_word_embeddings", False):
        return [adapter.lm_head]
    return [adapter.lm_head, adapter.embed]


def rtn_outside_blocks(model: torch.nn.Module, adapter, spec: QuantSpec) -> dict[str, LayerQuant]:
    """RTN of ``outside_block_names`` from the model's current weights, on the CPU; ``model`` is not modified.

    GPTQ and AWQ calibrate the decoder blocks only (the inputs of lm_head and
    the embedding are not captured), so both quantise these layers with RTN.

    >>> rtn_outside_blocks(model, adapter, QuantSpec(4, 64, False))  # doctest: +SKIP
    {}
    >>> list(rtn_outside_blocks(model, adapter, QuantSpec(4, 64, False, quantize_embeddings=True)))  # doctest: +SKIP
    ['lm_head']
    """
    return {name: rtn_layer(model.get_submodule(name).weight.detach(), spec.bits, spec.group_size, spec.sym).cpu()
            for name in outside_block_names(model, adapter, spec)}


def rtn_model(model, adapter, spec: QuantSpec, method_cfg=None, calib=None) -> QuantResult:
    """RTN on every quantised linear of ``model`` (no calibration)."""
    layers = {}
    for name in quantized_layer_names(model, adapter, spec):
        w = model.get_submodule(name).weight.detach()
        layers[name] = rtn_layer(w, spec.bits_for(name), spec.group_size, spec.sym).cpu()
    return QuantResult(layers=layers)


@dataclass(frozen=True)
class Method:
    """A registry entry: how to compute a result, and what calibration it is given.

    ``calibration``: None, ``"inputs"`` (the first decoder block's inputs, ``BlockInputs``: quanteval's own
    block-by-block methods) or ``"ids"`` (the calibration token ids, ``CalibrationIds``: a library that runs
    the model itself). Every result is cached on disk by the sweep (``quanteval.sweep.quantize``), so
    parallel jobs and later sweeps share it.
    """

    compute: Callable[..., QuantResult]
    calibration: str | None = None
    # the library a method calls, imported inside its module only: (import name, pip extra that installs it)
    library: tuple[str, str] | None = None
    affine: bool = True  # False: its results are FormatQuant (refused by runtime=packed and export)
    # False: the result is read from a file, which is its own cache (method=artifact): not written to the
    # quantisation cache, kept in memory for the jobs that follow (Session.kept)
    cached: bool = True

    def missing_library(self) -> str | None:
        """One line naming the extra to install when the method's library is not importable, else None."""
        import importlib.util

        if self.library is None or importlib.util.find_spec(self.library[0]) is not None:
            return None
        return (f"the {self.library[0]} package is not installed: pip install 'quanteval[{self.library[1]}]' "
                f"(or pip install {self.library[0].replace('_', '-')})")

    @property
    def needs_calibration(self) -> bool:
        return self.calibration is not None


@dataclass(frozen=True)
class CalibrationIds:
    """What an ``"ids"`` method is given: the calibration token ids (n, seq_len) and the model's tokenizer."""

    ids: torch.Tensor
    tokenizer: object


def _lazy(module: str, fn: str) -> Callable[..., QuantResult]:
    def compute(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(module), fn)(*args, **kwargs)

    return compute


METHODS: dict[str, Method | None] = {
    "none": None,  # the baseline: nothing to compute
    "rtn": Method(rtn_model),
    "gptq": Method(_lazy("quanteval.methods.gptq", "gptq_model"), calibration="inputs"),
    "awq": Method(_lazy("quanteval.methods.awq", "awq_model"), calibration="inputs"),
    # llm-compressor's own GPTQ / RTN / AWQ, in its venv (quanteval/methods/llmcompressor.py)
    "llmcompressor": Method(_lazy("quanteval.methods.llmcompressor", "llmcompressor_model"), calibration="ids"),
    # other libraries' formats, each through the library itself (types per bits: quanteval/formats.py)
    "bnb": Method(_lazy("quanteval.methods.bnb", "bnb_model"), library=("bitsandbytes", "methods"), affine=False),
    "hqq": Method(_lazy("quanteval.methods.hqq", "hqq_model"), library=("hqq", "methods"), affine=False),
    "gguf": Method(_lazy("quanteval.methods.gguf", "gguf_model"), library=("gguf", "methods"), affine=False),
    "autoround": Method(_lazy("quanteval.methods.autoround", "autoround_model"), calibration="ids",
                        library=("auto_round", "methods")),
    # a file people already have (a GGUF file, a compressed-tensors folder), against its base
    "artifact": Method(_lazy("quanteval.methods.artifact", "artifact_model"), affine=False, cached=False),
    # one bit width per unit under a budget, from sensitivity tables (quanteval/methods/mixed.py); its
    # base's calibration (GPTQ's block inputs) is captured for any base, RTN ignores it
    "mixed": Method(_lazy("quanteval.methods.mixed", "mixed_model"), calibration="inputs"),
}

# FormatQuant.module -> builder(linear, layer) of the module a layer runs as (see apply_result)
REPLACEMENTS: dict[str, Callable[..., torch.nn.Module]] = {
    "bnb_int8": _lazy("quanteval.methods.bnb", "int8_module"),
}
