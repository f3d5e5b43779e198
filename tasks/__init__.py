"""quanteval's task definitions: lm-eval YAML files with their Python loaders and scorers beside them.

Installed as ``quanteval_tasks``. Each task is ``<name>.yaml`` (an lm-eval task named
``quanteval_<name>``) plus ``<name>.py``. lm-eval loads the YAML's ``!function`` references by
file path, so the modules import shared code absolutely (``quanteval_tasks.common``), never
relatively. ``lm_eval.tasks.TaskManager(include_path=task_dirs())`` finds every task.

Adding a task is two files, ``<name>.yaml`` and ``<name>.py``, in this folder or in a folder named
by ``$QUANTEVAL_TASK_PATH`` (``os.pathsep``-separated). Everything quanteval needs to know about
the task is in the YAML's ``metadata.quanteval`` block (lm-eval ignores it), read here by
``task_table()`` without importing lm-eval or torch (the report reads it too)::

    metadata:
      quanteval:
        chat: true                 # apply the model's chat template to doc_to_text
        primary: acc               # the headline metric (metric or "metric,filter")
        binary: true               # the primary metric is 0/1 per item: flips and McNemar apply
        teacher_forced: reference  # teacher-forced KL on doc_to_target ("reference") or the baseline's answer
        tags: [k]                  # doc fields copied into each item record (breakdowns)
        sweep:                     # how quanteval sweeps and reports it (not hashed into the baseline key)
          kind: math               # the kind of work, for the report's recommendation
          licence: "..."           # credited on report pages that show the task's text
          limit_per: {tag: k, option: per_k}   # a limit counts items per value of tag k, passed as option per_k
          options: [seed, k_min, k_max]        # metadata keys exposed as task.options (their defaults)
          presets: {smoke: {limit: 2, max_new_tokens: 32}, default: {...}, full: {...}}
          charts: [{by_tag: k}, {kl_by_position: true}]   # extra report charts
          calibration_domain: [gsm8k]  # calibrating on these sets is in-domain for this task (report marks it)
          model_options: true      # give the loader the model's tokenizer, window and preset (long context)
          rows_by: length          # the report's matrix also gets a verdict row per value of this tag

>>> table = task_table()
>>> table["gsm8k"].kind, table["gsm8k"].sizes("default")
('math', (8, 256))
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

TASK_DIR = Path(__file__).resolve().parent
TASK_PATH_ENV = "QUANTEVAL_TASK_PATH"
KINDS_OF_WORK = ("chat", "summarization", "math", "code", "long context", "language modelling", "other")
REQUIRED = ("chat", "primary", "binary", "teacher_forced")


@dataclass(frozen=True)
class TaskInfo:
    """What quanteval knows of one task, from its YAML's ``metadata.quanteval`` block."""

    name: str
    yaml: Path  # tasks/<name>.yaml
    module: Path  # tasks/<name>.py
    chat: bool
    primary: str
    binary: bool
    teacher_forced: str  # "reference" | "baseline"
    tags: tuple[str, ...] = ()
    kind: str = "other"  # kind of work (KINDS_OF_WORK)
    licence: str = ""
    limit_per: Optional[tuple[str, str]] = None  # (tag, loader option): the limit counts items per tag value
    options: dict[str, Any] = field(default_factory=dict)  # task.options defaults
    presets: dict[str, dict[str, int]] = field(default_factory=dict)  # preset -> {limit, max_new_tokens}
    charts: tuple[dict, ...] = ()
    calibration_domain: tuple[str, ...] = ()  # calibration sets that are this task's own domain
    # the loader is given the model's tokenizer (option ``tokenizer``: a folder or .gguf file), context window
    # (``window``) and the preset's name (``preset``): items sized in the model's own tokens (needle, var_track)
    model_options: bool = False
    rows_by: Optional[str] = None  # an item tag: the report's matrix gets a verdict row per value of it

    def sizes(self, preset: str) -> tuple[Optional[int], Optional[int]]:
        """(items, token cap) for a preset name; a preset the task does not list takes its ``default``."""
        p = self.presets.get(preset, self.presets.get("default", {}))
        return p.get("limit"), p.get("max_new_tokens")

    def to_json(self) -> dict:
        """What a run record keeps of its task (so a report needs no task files)."""
        return {"kind": self.kind, "licence": self.licence, "charts": list(self.charts),
                "primary": self.primary, "binary": self.binary, "calibration_domain": list(self.calibration_domain),
                **({"rows_by": self.rows_by} if self.rows_by else {})}


def task_dirs() -> list[Path]:
    """The folders searched for tasks: this package's, then those in ``$QUANTEVAL_TASK_PATH``."""
    extra = [Path(p) for p in os.environ.get(TASK_PATH_ENV, "").split(os.pathsep) if p.strip()]
    return [TASK_DIR, *extra]


def yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML with lm-eval's ``!function module.fn`` tags read as plain strings."""

    Loader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {loader.construct_scalar(node)}")
    return Loader


def read_info(path: Path) -> TaskInfo:
    """The ``TaskInfo`` of one ``<name>.yaml``; ValueError naming the file and the field when it is wrong."""
    import yaml

    path = Path(path)
    name = path.stem
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml_loader())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not a readable task YAML ({' '.join(str(e).split())})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a task YAML (a mapping with task:, metadata:, ...)")
    if doc.get("task") != f"quanteval_{name}":
        raise ValueError(f"{path}: task: must be quanteval_{name} (the file's name), not {doc.get('task')!r}")
    meta = (doc.get("metadata") or {})
    q = meta.get("quanteval")
    if not isinstance(q, dict):
        raise ValueError(f"{path}: metadata.quanteval is missing")
    for k in REQUIRED:
        if k not in q:
            raise ValueError(f"{path}: metadata.quanteval.{k} is missing")
    if q["teacher_forced"] not in ("reference", "baseline"):
        raise ValueError(f"{path}: metadata.quanteval.teacher_forced={q['teacher_forced']!r}: "
                         "must be reference or baseline")
    s = q.get("sweep") or {}
    kind = s.get("kind", "other")
    if kind not in KINDS_OF_WORK:
        raise ValueError(f"{path}: metadata.quanteval.sweep.kind={kind!r}: must be one of {', '.join(KINDS_OF_WORK)}")
    lp = s.get("limit_per")
    if lp is not None and not (isinstance(lp, dict) and set(lp) == {"tag", "option"}):
        raise ValueError(f"{path}: metadata.quanteval.sweep.limit_per: must be {{tag: ..., option: ...}}")
    presets = s.get("presets") or {}
    for pname, sizes in presets.items():
        for k, v in (sizes or {}).items():
            if k not in ("limit", "max_new_tokens") or not (isinstance(v, int) and v > 0):
                raise ValueError(f"{path}: metadata.quanteval.sweep.presets.{pname}.{k}={v!r}: "
                                 "limit and max_new_tokens must be positive integers")
    missing = [o for o in s.get("options") or [] if o not in meta]
    if missing:
        raise ValueError(f"{path}: metadata.quanteval.sweep.options names {missing[0]!r}, which metadata does not set")
    module = path.with_suffix(".py")
    if not module.exists():
        raise ValueError(f"{path}: its module {module.name} is missing beside it")
    return TaskInfo(
        name=name, yaml=path, module=module, chat=bool(q["chat"]), primary=str(q["primary"]),
        binary=bool(q["binary"]), teacher_forced=q["teacher_forced"], tags=tuple(q.get("tags") or ()),
        kind=kind, licence=str(s.get("licence", q.get("licence", ""))),  # dialogsum's licence predates `sweep`
        limit_per=(lp["tag"], lp["option"]) if lp else None,
        options={o: meta[o] for o in s.get("options") or []},
        presets={k: dict(v or {}) for k, v in presets.items()}, charts=tuple(s.get("charts") or ()),
        calibration_domain=tuple(s.get("calibration_domain") or ()), model_options=bool(s.get("model_options")),
        rows_by=s.get("rows_by"))


@lru_cache(maxsize=8)
def _table(dirs: tuple[Path, ...]) -> dict[str, TaskInfo]:
    table: dict[str, TaskInfo] = {}
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"{TASK_PATH_ENV}: {d} is not a folder")
        for path in sorted(d.glob("*.yaml")):
            info = read_info(path)
            if info.name in table:
                raise ValueError(f"{path}: task {info.name} is defined twice (also {table[info.name].yaml})")
            table[info.name] = info
    return table


def task_table() -> dict[str, TaskInfo]:
    """Every task quanteval can run, by name (this package's and ``$QUANTEVAL_TASK_PATH``'s)."""
    return dict(_table(tuple(task_dirs())))


def load_module(info: TaskInfo):
    """The Python module beside a task's YAML (``quanteval_tasks.<name>`` for this package's tasks)."""
    import importlib
    import importlib.util
    import sys

    if info.module.parent == TASK_DIR:
        return importlib.import_module(f"quanteval_tasks.{info.name}")
    name = f"quanteval_user_tasks.{info.name}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, info.module)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def hashed_yaml_text(path: Path) -> str:
    """A task YAML's text without its ``metadata.quanteval.sweep`` block: what the baseline cache key hashes.

    The block only says how to sweep and report the task; what of it changes a result (item count,
    token cap, options) enters the key as the values it produces. So editing a licence or a chart hint
    keeps the cached baseline answers, and so does moving sizes from a preset file into the YAML.
    """
    out, skip_indent = [], None
    for line in Path(path).read_text(encoding="utf-8").splitlines(keepends=True):
        indent = len(line) - len(line.lstrip(" "))
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        if line.lstrip(" ").startswith("sweep:") and indent >= 4:
            skip_indent = indent
            continue
        out.append(line)
    return "".join(out)
