"""A ``Session``: what one process keeps between the jobs it runs, passed to them (never a module global).

- the model, loaded once and restored to its baseline weights before each variant (after fake-quant
  the saved weights are copied back; after ``runtime=packed`` swapped its linears, it is rebuilt);
- the calibration set's first-block inputs, captured once per model and calibration settings (one
  capture kept at a time: they are large);
- the cache files it wrote, so ``rerun=true`` recomputes each once per process, not once per job;
- the runs it finished, so a run reached again (the baseline under each bits value) is read back.

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


@dataclass
class _Model:
    key: str
    loaded: object  # quanteval.models.LoadedModel
    base_state: dict  # the baseline weights, to restore between variants
    state: str = "clean"  # clean | modified (fake-quant weights in place) | packed (linears swapped)


@dataclass
class Session:
    """Per-process state of a sweep; one is made by the CLI and handed to every job it runs."""

    refreshed: set[Path] = field(default_factory=set)  # cache files written by this process
    done: set[str] = field(default_factory=set)  # run keys finished by this process
    _model: Optional[_Model] = None
    _calib: Optional[tuple[str, object]] = None  # (calibration key, BlockInputs)
    _kept: Optional[tuple[str, object]] = None  # (key, value): the last result read from a file (Session.kept)

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

    def model(self, variant):
        """The baseline model of ``variant`` (a ``quanteval.variant.Variant``), loaded once per process
        and restored to its baseline weights."""
        from quanteval.models import load_model, resolve_device, resolve_dtype

        m = self._model
        if m is None or m.key != variant.model_key:
            self._model = None
            self._calib = None  # captured from the previous model
            device = resolve_device(variant.device)
            loaded = load_model(variant.model, device, resolve_dtype(variant.dtype, device))
            base_state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
            self._model = m = _Model(variant.model_key, loaded, base_state)
        elif m.state == "packed":  # modules were swapped (QuantLinear, Linear8bitLt): rebuild from the saved weights
            m.loaded = replace(m.loaded, model=_rebuild(m.loaded.model, m.base_state))
        elif m.state == "modified":
            m.loaded.model.load_state_dict(m.base_state)
        m.state = "clean"
        return m.loaded

    def modified(self, swapped: bool = False) -> None:
        """The model in memory no longer holds the baseline weights (``swapped``: some of its linears were
        replaced by other modules, packed ones or a library's, so it is rebuilt before the next variant)."""
        if self._model is not None:
            self._model.state = "packed" if swapped else "modified"

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


def _rebuild(model, base_state: dict):
    """A fresh model of ``model``'s config holding ``base_state`` (after ``pack_model`` swapped its modules)."""
    from transformers import AutoModelForCausalLM

    dtype = next(iter(base_state.values())).dtype
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    fresh.load_state_dict(base_state)
    fresh.generation_config = model.generation_config
    return fresh.to(next(model.parameters()).device).eval()
