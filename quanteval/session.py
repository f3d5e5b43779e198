"""A ``Session``: what one process keeps between the jobs it runs, passed to them (never a module global).

- the model, loaded once and restored to its baseline weights before each variant (after fake-quant
  the baseline weights are copied back; after ``runtime=packed`` swapped its linears, it is rebuilt).
  The baseline weights are read back from the local safetensors files the model was loaded from
  (``BaseWeights``), one tensor at a time, rather than kept as a second copy in memory (0.54 GB
  for SmolLM2 in fp32); a model loaded from elsewhere (a hub id) keeps the copy;
- which variant's weights the model holds, when a job applied them in place (``applied``): the next job
  of the same variant that needs no baseline weights first scores them as they are (``model(variant,
  keep=key)``), instead of restoring the baseline and applying the same result again;
- the calibration set's first-block inputs, captured once per model and calibration settings (one
  capture kept at a time: they are large);
- the cache files it wrote, so ``rerun=true`` recomputes each once per process, not once per job;
- the runs it finished, so a run reached again (the baseline under each bits value) is read back;
- the sweep's grid when its jobs run in this process (Hydra's basic launcher), so a variant's generative
  tasks can share one generation batch, and the answers generated ahead for the jobs that follow
  (``put_generations`` / ``take_generations``; see ``quanteval.evaluate.generative.generate_together``).

``Session.cached(path, compute, save, load)`` is the one lock / check / compute / mark-written helper
for every cache file (quantisation results and the tasks' baseline caches)::

    result = session.cached(path, compute=lambda: expensive(), save=lambda p, r: r.save(p),
                            load=QuantResult.load, rerun=cfg.rerun)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class BaseWeights:
    """A model's baseline weights, to restore between variants: read back from its safetensors files
    (tensors the files hold, in the model's dtype; a tensor tied to one of them, e.g. a tied ``lm_head``,
    is restored with it), with an in-memory copy only of what the files lack or hold differently."""

    def __init__(self, model, files=()):
        import torch
        from safetensors import safe_open

        state = model.state_dict()
        self.files: dict[str, str] = {}  # state key -> file holding it, with the same shape
        for f in files:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    if k in state and tuple(h.get_slice(k).get_shape()) == tuple(state[k].shape):
                        self.files[k] = str(f)
        from_file = {state[k].data_ptr(): k for k in self.files}
        # the rest: a copy, unless it shares storage with a tensor read from a file (tied weights)
        self.tied = {k: from_file[v.data_ptr()] for k, v in state.items()
                     if k not in self.files and v.data_ptr() in from_file}
        self.copies = {k: v.detach().clone() for k, v in state.items() if k not in self.files and k not in self.tied}
        self.dtype = next(iter(state.values())).dtype if state else torch.float32

    def restore(self, model) -> None:
        """Copy the baseline weights into ``model`` (same keys), one tensor at a time."""
        import torch
        from safetensors import safe_open

        state = model.state_dict()
        by_file: dict[str, list[str]] = {}
        for k, f in self.files.items():
            by_file.setdefault(f, []).append(k)
        with torch.no_grad():
            for f, keys in by_file.items():
                with safe_open(f, "pt") as h:
                    for k in keys:
                        state[k].copy_(h.get_tensor(k))
            for k, v in self.copies.items():
                state[k].copy_(v)
            for k, partner in self.tied.items():  # a method may have untied them (a quantised lm_head)
                if state[k].data_ptr() != state[partner].data_ptr():
                    state[k].copy_(state[partner])

    @property
    def in_memory_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.copies.values())


@dataclass
class _Model:
    key: str
    loaded: object  # quanteval.models.LoadedModel
    base: BaseWeights  # the baseline weights, to restore between variants
    state: str = "clean"  # clean | modified (fake-quant weights in place) | packed (linears swapped)
    applied: Optional[tuple[str, dict]] = None  # (key, what runs record of them): the weights applied in place


@dataclass
class Session:
    """Per-process state of a sweep; one is made by the CLI and handed to every job it runs."""

    refreshed: set[Path] = field(default_factory=set)  # cache files written by this process
    done: set[str] = field(default_factory=set)  # run keys finished by this process
    _model: Optional[_Model] = None
    _calib: Optional[tuple[str, object]] = None  # (calibration key, BlockInputs)
    _kept: Optional[tuple[str, object]] = None  # (key, value): the last result read from a file (Session.kept)
    grid: list = field(default_factory=list)  # RunConfigs of the sweep, when its jobs run in this process
    _generations: dict = field(default_factory=dict)  # key -> (generations, info), generated ahead for a later job

    # ------------------------------------------------------------------ answers generated ahead

    def put_generations(self, key: str, gens: list, info: dict, records: Optional[list] = None) -> None:
        """Keep ``gens`` (one task's answers, generated in another job's batch) for the job of ``key``, with
        its teacher-forced ``records`` when the batch computed them ahead (for drafts)."""
        self._generations[key] = (gens, info, records)

    def take_generations(self, key: str) -> Optional[tuple[list, dict, Optional[list]]]:
        """The (answers, batch record, teacher-forced records) kept for ``key`` (removed: each is used
        once), or None."""
        return self._generations.pop(key, None)

    # ------------------------------------------------------------------ cache files

    def cached(self, path: Path, compute: Callable[[], T], save: Callable[[Path, T], None],
               load: Optional[Callable[[Path], T]] = None, rerun: bool = False, requires: tuple[Path, ...] = ()) -> T:
        """The value cached at ``path``: read (``load``; None without one) when present, else computed
        once, under a file lock that parallel jobs wait on, and saved (``save`` writes ``path`` last,
        after any ``requires`` files it also writes). ``rerun`` recomputes a file once per session."""
        from filelock import FileLock

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            present = path.exists() and all(Path(p).exists() for p in requires)
            if present and not (rerun and path not in self.refreshed):
                return load(path) if load else None
            value = compute()
            save(path, value)
            self.refreshed.add(path)
            return value

    def kept(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()``'s value, kept in memory for the next call with the same ``key`` (one value at a
        time: a result read from a file, e.g. an artifact's, which is its own cache on disk)."""
        if self._kept is None or self._kept[0] != key:
            self._kept = None  # free the previous one first
            self._kept = (key, compute())
        return self._kept[1]

    # ------------------------------------------------------------------ the model

    def model(self, variant, keep: Optional[str] = None):
        """The baseline model of ``variant`` (a ``quanteval.variant.Variant``), loaded once per process
        and restored to its baseline weights; or, with ``keep``, the model as it is when it holds the
        weights applied under that key (``holds``), and restored otherwise."""
        from quanteval.models import load_model, resolve_device, resolve_dtype

        m = self._model
        kept = keep is not None and self.holds(keep)  # the weights applied under ``keep``, left in place
        if kept:
            pass
        elif m is None or m.key != variant.model_key:
            self._model = None
            self._calib = None  # captured from the previous model
            device = resolve_device(variant.device)
            loaded = load_model(variant.model, device, resolve_dtype(variant.dtype, device))
            self._model = m = _Model(variant.model_key, loaded, BaseWeights(loaded.model, loaded.weight_files))
        elif m.state == "packed":  # modules were swapped (QuantLinear, Linear8bitLt): rebuild from the saved weights
            m.loaded = replace(m.loaded, model=_rebuild(m.loaded.model, m.base))
        elif m.state == "modified":
            m.base.restore(m.loaded.model)
        from quanteval.kvcache import uninstall

        uninstall(m.loaded.model)  # the previous variant's KV cache, if it had one
        if not kept:
            m.state, m.applied = "clean", None
        return m.loaded

    def modified(self, swapped: bool = False) -> None:
        """The model in memory no longer holds the baseline weights (``swapped``: some of its linears were
        replaced by other modules, packed ones or a library's, so it is rebuilt before the next variant)."""
        if self._model is not None:
            self._model.state = "packed" if swapped else "modified"
            self._model.applied = None

    def applied(self, key: str, record: dict) -> None:
        """The model now holds the weights applied in place under ``key`` (a variant's result, the model's
        own modules kept), until ``modified`` or a restore; ``record``: what a run records of them (its
        compression and quantisation info), for the jobs that keep them (``applied_record``)."""
        if self._model is not None and self._model.state == "modified":
            self._model.applied = (key, record)

    def holds(self, key: str) -> bool:
        """Whether the model in memory holds the weights applied under ``key``, unchanged since."""
        m = self._model
        return m is not None and m.state == "modified" and m.applied is not None and m.applied[0] == key

    def applied_record(self) -> dict:
        """What ``applied`` was given with the weights the model holds."""
        if self._model is None or self._model.applied is None:
            raise RuntimeError("the model holds no applied weights")
        return self._model.applied[1]

    def forget_applied(self) -> None:
        """Treat the weights in memory as unknown (after a job failed): the next job restores them."""
        if self._model is not None:
            self._model.applied = None

    # ------------------------------------------------------------------ calibration

    def calibration(self, variant, loaded, data_root: Path, adapter):
        """First-block inputs of ``variant``'s calibration set, captured once per model and settings."""
        from quanteval.calibration import capture_inputs

        key = variant.calibration_key()
        if self._calib is None or self._calib[0] != key:
            self._calib = None
            ids = self.calibration_ids(variant, loaded, data_root)
            self._calib = (key, capture_inputs(loaded.model, adapter, ids, variant.calibration.batch_size))
        return self._calib[1]

    def calibration_ids(self, variant, loaded, data_root: Path):
        """``variant``'s calibration token ids, (n_samples, seq_len): the same for every method."""
        from quanteval.calibration import calibration_token_ids

        c = variant.calibration
        ids = calibration_token_ids(c, loaded.tokenizer, data_root, variant.model.prompt_format)
        log.info("calibration: %d x %d tokens (%s)", *ids.shape,
                 "mix, chat share %g" % c.chat_share if c.is_mix else (c.path or c.dataset))
        return ids


def _rebuild(model, base: BaseWeights):
    """A fresh model of ``model``'s config holding the baseline weights (after ``pack_model`` swapped its modules)."""
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(model.config, dtype=base.dtype)
    base.restore(fresh)
    fresh.generation_config = model.generation_config
    return fresh.to(next(model.parameters()).device).eval()
