"""The results store: one JSON file per run (one variant x one task).

Layout::

    <results_dir>/<sweep_name>/runs/<task>__<variant>__<key12>.json
    <results_dir>/<sweep_name>/report/index.html

A run file holds ``schema_version``, ``run_key``, ``status`` (``ok`` |
``failed``), the resolved ``config``, ``model`` (name and provenance),
``variant`` (method, bits, group size, sym, label), ``task``, ``metrics``,
``compression`` (effective bits per weight, whole-model bytes, group layout),
``timings``, ``peak_memory_mb``, ``versions``, ``device`` and ``created``; newer files also hold
``task_meta`` (the task's kind of work, licence and chart hints). ``RunRecord.read(path)`` gives a
run file as typed dataclasses (what the report reads); ``read_run`` gives the plain dict.

Files are written to a temporary name and renamed, so a killed sweep never
leaves a half-written run file; a rerun skips runs whose file exists with
``status == "ok"``.

This module must not import torch: the report reads results on machines
without it.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> write_run(d / "runs" / "x.json", {"run_key": "k", "status": "ok", "metrics": {"ppl": 3.0}})
>>> load(d)["ppl"].tolist()
[3.0]
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)


def run_key(settings: dict[str, Any]) -> str:
    """A stable hash of every setting that changes a run's result."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the source tree quanteval runs from, when it is a git checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class WriteError(OSError):
    """A result or cache file could not be written (disk full, read-only, ...); the old file is intact."""


def save_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` by ``write(tmp)`` to a temporary file in the same folder, then a rename.

    A reader sees the old file or the new one, never half of one: a job killed mid-write (even by
    ``kill -9``) leaves only a ``.<name>.*.tmp`` file, which nothing reads. A failed write (a full
    disk) removes the temporary file and raises ``WriteError`` in one line naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, WriteError):
            raise
        what = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        err = WriteError(f"{path}: could not write it ({what}); "
                         f"{'the previous file is intact' if path.exists() else 'nothing was written'}")
        err.errno = e.errno
        raise err from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see ``save_atomic``)."""
    save_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def torch_save_atomic(path: Path, obj) -> None:
    """``torch.save`` to ``path`` atomically (see ``save_atomic``)."""
    import torch

    save_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_run(path: Path, record: dict) -> None:
    """Write one run record atomically (``schema_version`` is added)."""
    write_atomic(Path(path), json.dumps({"schema_version": SCHEMA_VERSION, **record}, indent=1, default=str))


def read_run(path: Path) -> dict:
    """Read one run file; raises ``ValueError`` naming the file when it is not a valid run."""
    try:
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable run file ({e})") from e
    if not isinstance(rec, dict) or "run_key" not in rec or "status" not in rec:
        raise ValueError(f"{path}: not a quanteval run file (no run_key/status)")
    return rec


def _section(cls, d: Any, name: str):
    """``cls`` from the keys of mapping ``d`` that are its fields; other keys are ignored, None values and a
    None ``d`` take the defaults."""
    if d is None:
        return cls()
    if not isinstance(d, dict):
        raise ValueError(f"{name}: must be a mapping, not {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known and v is not None})


@dataclass(frozen=True)
class VariantInfo:
    """What was run: ``method`` ("none" for the baseline), ``bits``, ``group_size``, ``sym``, ``label``."""

    method: Optional[str] = None
    bits: Optional[int] = None
    group_size: Optional[int] = None
    sym: Optional[bool] = None
    label: Optional[str] = None  # e.g. "gptq w4 g64", "baseline", "rtn w4 g64 · kv4", "w16 · kv4"
    kv: dict = field(default_factory=dict)  # a quantised KV cache: {"bits", "group_size", "method"}


@dataclass(frozen=True)
class ModelInfo:
    """The model: its config name and where its weights came from (keys the report never reads are dropped)."""

    name: Optional[str] = None
    provenance: Optional[str] = None  # one line: source; loader (dtype)
    source: Optional[str] = None
    note: Optional[str] = None
    dtype: Optional[str] = None
    n_params: Optional[int] = None


@dataclass(frozen=True)
class Compression:
    """Sizes of the quantised model: effective bits per weight (scales included) and whole-model bytes."""

    effective_bits: Optional[float] = None
    model_bytes: Optional[int] = None
    baseline_bytes: Optional[int] = None
    quantized_weights: Optional[int] = None
    group_layout: dict = field(default_factory=dict)  # "in=<features>" -> {group_size, n_groups, last_group}


@dataclass(frozen=True)
class TaskMeta:
    """What the report needs of a run's task (as ``quanteval_tasks.TaskInfo.to_json`` writes it).

    ``charts`` holds hint dicts: ``{"by_tag": "k"}`` (the primary metric by the values of item tag k,
    from the record's ``breakdown``) and ``{"kl_by_position": True}`` (teacher-forced KL by position).
    """

    kind: Optional[str] = None  # kind of work ("math", "chat", ...); None: not declared
    licence: str = ""
    charts: tuple[dict, ...] = ()
    primary: Optional[str] = None
    binary: Optional[bool] = None
    calibration_domain: tuple[str, ...] = ()  # calibration sets that are in-domain for the task
    rows_by: Optional[str] = None  # an item tag: the matrix also gets a verdict row per value (needle: length)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "TaskMeta":
        meta = _section(cls, d, "task_meta")
        meta = replace(meta, calibration_domain=tuple(meta.calibration_domain or ()))
        if not isinstance(meta.charts, (list, tuple)) or not all(isinstance(h, dict) for h in meta.charts):
            raise ValueError(f"task_meta.charts={meta.charts!r}: must be a list of hint mappings")
        return replace(meta, charts=tuple(meta.charts))


@dataclass(frozen=True)
class RunRecord:
    """One run file as typed fields: the report reads these instead of the nested dict.

    Sections the file lacks (a failed or collapsed run has no compression, per_window, ...) take
    empty defaults; keys this class does not know are ignored, so older and newer files both load.

    >>> r = RunRecord.from_dict({"run_key": "k", "status": "ok", "task": "gsm8k",
    ...     "variant": {"method": "rtn", "bits": 4, "label": "rtn w4 g64"}, "metrics": {"primary": 0.5},
    ...     "some_future_key": 1})
    >>> r.variant.label, r.metrics["primary"], r.compression.effective_bits, r.task_meta
    ('rtn w4 g64', 0.5, None, None)
    """

    run_key: str
    status: str  # "ok" | "collapsed" | "failed"
    schema_version: Optional[int] = None
    sweep_name: Optional[str] = None
    task: Optional[str] = None
    variant: VariantInfo = field(default_factory=VariantInfo)
    model: ModelInfo = field(default_factory=ModelInfo)
    metrics: dict = field(default_factory=dict)  # metric name -> value (numbers, except a few counts/strings)
    per_window: dict = field(default_factory=dict)  # WikiText-2: {"nll_mean", "kl_mean", "same_top1"} -> lists
    items_file: Optional[str] = None  # the *.items.jsonl beside the run file
    breakdown: dict = field(default_factory=dict)  # tag -> tag value -> {"n", <metric>: value, ...}
    primary_metric: Optional[str] = None
    sandbox: Optional[str] = None
    unsafe: Optional[str] = None  # why generated code ran unsandboxed
    compression: Compression = field(default_factory=Compression)
    quantization: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)  # step -> seconds
    # a generative run's share of its generation batch: {"batched_with", "prompts", "batch_s", "tokens",
    # "share_s", "drafted" (tokens taken from the baseline's answer), "draft_ties", ...}
    generation: dict = field(default_factory=dict)
    peak_memory_mb: Optional[float] = None
    memory: dict = field(default_factory=dict)  # {"runtime", "resident_bytes"}
    # the packed KV cache (quanteval.kvsize): {"bits", "group_size", "key_elements_per_token",
    # "bytes_per_token", "context", "bytes_at_context", "residual_tokens"}
    kv_cache: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    device: Optional[str] = None
    created: Optional[str] = None  # ISO time, UTC
    settings: dict = field(default_factory=dict)  # what the run key hashes
    config: dict = field(default_factory=dict)  # the resolved run config
    error: Optional[str] = None  # status "failed": one line
    reason: Optional[str] = None  # status "collapsed": why generation was skipped
    task_meta: Optional[TaskMeta] = None  # absent in the files 0.2.0 wrote

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        """A record from a run file's dict; ValueError naming the section when one has the wrong shape."""
        if not isinstance(d, dict) or d.get("run_key") is None or d.get("status") is None:
            raise ValueError("not a quanteval run record (no run_key/status)")
        for name in ("metrics", "per_window", "breakdown", "quantization", "timings", "generation", "memory",
                     "versions", "settings", "config"):
            if d.get(name) is not None and not isinstance(d[name], dict):
                raise ValueError(f"{name}: must be a mapping, not {type(d[name]).__name__}")
        rec = _section(cls, d, "record")
        return replace(rec, variant=_section(VariantInfo, d.get("variant"), "variant"),
                       model=_section(ModelInfo, d.get("model"), "model"),
                       compression=_section(Compression, d.get("compression"), "compression"),
                       task_meta=TaskMeta.from_dict(d["task_meta"]) if d.get("task_meta") is not None else None)

    @classmethod
    def read(cls, path: Path) -> "RunRecord":
        """The run file at ``path``; ValueError naming the file when it is not a valid run."""
        d = read_run(path)
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def completed(path: Path) -> bool:
    """True when ``path`` holds a finished run: successful, or skipped as collapsed (nothing to redo)."""
    try:
        return read_run(path).get("status") in ("ok", "collapsed")
    except (ValueError, FileNotFoundError):
        return False


def run_files(path: Path) -> list[Path]:
    """All run files under a sweep folder (``<sweep>/runs/*.json``) or a results root."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: results directory does not exist")
    return sorted(p for p in path.rglob("runs/*.json") if not p.name.startswith("."))


def _flat_row(rec: dict) -> dict:
    v, m, c = rec.get("variant", {}), rec.get("model", {}), rec.get("compression", {})
    row = {
        "run_key": rec["run_key"],
        "status": rec["status"],
        "sweep": rec.get("sweep_name"),
        "task": rec.get("task"),
        "model": m.get("name"),
        "method": v.get("method"),
        "bits": v.get("bits"),
        "group_size": v.get("group_size"),
        "sym": v.get("sym"),
        "label": v.get("label"),
        "effective_bits": c.get("effective_bits"),
        "model_bytes": c.get("model_bytes"),
        "error": rec.get("error"),
        "reason": rec.get("reason"),
        "primary_metric": rec.get("primary_metric"),
        "unsafe": rec.get("unsafe"),
    }
    row.update(rec.get("metrics", {}))
    return row


ID_COLUMNS = ["run_key", "status", "sweep", "task", "model", "method", "bits", "group_size", "sym", "label",
              "effective_bits", "model_bytes"]


def read_items(path: Path) -> list[dict]:
    """The per-item records of a ``*.items.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_items(run_file: Path, rec: dict) -> list[dict] | None:
    """The per-item records beside a run file, or None when the run has none."""
    name = rec.get("items_file")
    return read_items(Path(run_file).with_name(name)) if name else None


def primary_value(item: dict, primary: str | None) -> float | None:
    """An item's primary metric (a task score, or a comparison with the baseline such as mt_bench's); None if absent."""
    if not primary:
        return None
    v = (item.get("scores") or {}).get(primary, item.get(primary))
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _item_row(ids: dict, rec: dict, it: dict) -> dict:
    primary = rec.get("primary_metric")
    tf = it.get("tf") or {}
    return {**ids, "item_id": str(it.get("id")), "output": str(it.get("output", "")),
            "primary_metric": primary, "primary_value": primary_value(it, primary),
            "flip": it.get("flip"), "same_output": it.get("same_output"),
            "tf_kl_mean": tf.get("kl_mean"), "tf_top1": tf.get("top1"), "tf_tokens": tf.get("n_tokens"),
            "scores": json.dumps(it.get("scores") or {}, default=str),
            "tags": json.dumps(it.get("tags") or {}, default=str)}


def load(path: str | os.PathLike, table: str = "runs") -> "pandas.DataFrame":  # noqa: F821
    """Results under ``path`` (a sweep folder or a results root) as a DataFrame.

    ``table="runs"``: one row per run, metrics as columns. ``"metrics"``: tidy, one row per run x
    metric (``metric``, ``value``), as the report's ``results.csv``. ``"items"``: one row per item of
    the generative tasks, as the report's ``items.csv``. Unreadable files are skipped with a warning
    (the report lists them).
    """
    import pandas as pd

    if table not in ("runs", "metrics", "items"):
        raise ValueError(f"table={table!r}: must be runs, metrics or items")
    rows = []
    for p in run_files(Path(path)):
        try:
            rec = read_run(p)
        except ValueError as e:
            log.warning("%s", e)
            continue
        flat = _flat_row(rec)
        if table == "runs":
            rows.append(flat)
        elif table == "metrics":
            ids = {k: flat.get(k) for k in ID_COLUMNS}
            for metric, value in (rec.get("metrics") or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append({**ids, "metric": metric, "value": float(value)})
        else:
            ids = {k: flat.get(k) for k in ID_COLUMNS}
            try:
                rows.extend(_item_row(ids, rec, it) for it in run_items(p, rec) or [])
            except (OSError, ValueError) as e:
                log.warning("%s: unreadable items file (%s)", p, e)
    return pd.DataFrame(rows)
