"""Evaluation tasks: the ``Task`` protocol and the ``TASKS`` table.

A task config's ``kind`` picks its class in ``TASKS``; ``task_for(task_config)`` builds one. Every task
answers four calls, given a ``TaskContext`` (the run, the model in memory, the data root, the session):

- ``preset_settings(cfg) -> dict``: the preset's fields that change this task's result (they enter
  the run key, so resizing one task keeps the other tasks' runs);
- ``cache_paths(ctx) -> list[Path]``: the baseline cache files it reads (``plan=true`` checks them;
  needs no model);
- ``baseline(ctx)``: compute and cache on disk what it needs from the unquantised model (called
  with the baseline weights in memory; a no-op when the cache exists);
- ``score(ctx) -> TaskResult``: the metrics of the model in memory;
- ``task_meta() -> dict | None``: what run files keep of the task for the report (kind of work,
  licence, chart hints), so a report of copied results needs no task files.

``generative`` says whether the collapse gate applies: a generative task is skipped for a variant
whose WikiText-2 run collapsed. Generative tasks are ``tasks/<name>.yaml`` + ``tasks/<name>.py``
(see ``quanteval_tasks``), all run by ``GenerativeTask``::

    task = task_for(GenerativeTaskConfig(name="gsm8k"))
    task.baseline(ctx)
    result = task.score(ctx)        # TaskResult(metrics={"exact_match,flexible-extract": ...}, items=[...])
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, TypeVar

from quanteval import results
from quanteval.data import data_file

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class TaskResult:
    """What ``Task.score`` returns: run-level metrics, and what the run file keeps beside them."""

    metrics: dict[str, Any]  # name -> number (the run file's "metrics")
    items: Optional[list[dict]] = None  # per-item records (written to <run>.items.jsonl)
    per_window: Optional[dict] = None  # WikiText-2: per-window values for the report's bootstrap
    breakdown: Optional[dict] = None  # primary metric and KL by each tag value
    primary_metric: Optional[str] = None  # the headline metric's name
    sandbox: Optional[str] = None  # the sandbox generated code ran in (code tasks)
    generation: Optional[dict] = None  # generative tasks: which tasks shared the generation batch, its time


@dataclass
class TaskContext:
    """Everything a task needs to score the model in memory for one run."""

    run: Any  # quanteval.variant.Run
    loaded: Any  # quanteval.models.LoadedModel, or None (plan=true: paths only)
    data_root: Path
    session: Any = None  # quanteval.session.Session (None: nothing is computed)
    # the same variant's other generative runs still to compute in this process (TaskContexts): their
    # answers may be generated in this run's batch (quanteval.evaluate.generative.generate_together)
    siblings: list = field(default_factory=list)
    # the variant's quantisation result, for a task that applies it itself (``applies_result = False``)
    result: Any = None

    @property
    def cfg(self):
        return self.run.cfg

    @property
    def cache_dir(self) -> Path:
        return self.run.cache_dir

    @property
    def model_key(self) -> str:
        """Identifies the baseline weights (model + provenance settings + dtype + device)."""
        return self.run.variant.model_key

    def cached(self, path: Path, compute: Callable[[], T], save: Callable[[Path, T], None],
               load: Optional[Callable[[Path], T]] = None, requires: tuple[Path, ...] = ()) -> T:
        """``Session.cached`` with this run's ``rerun``."""
        return self.session.cached(path, compute, save, load, rerun=self.cfg.rerun, requires=requires)


class Task(Protocol):
    """What the sweep asks of a task (see the module docstring)."""

    generative: bool

    def preset_settings(self, cfg) -> dict: ...

    def task_meta(self) -> Optional[dict]: ...

    def cache_paths(self, ctx: TaskContext) -> list[Path]: ...

    def baseline(self, ctx: TaskContext) -> None: ...

    def score(self, ctx: TaskContext) -> TaskResult: ...


def baseline_cached(task: Task, ctx: TaskContext) -> bool:
    """Whether every baseline cache file ``task`` reads exists (needs no model: ``ctx.loaded`` may be None)."""
    return all(p.exists() for p in task.cache_paths(ctx))


class WikiText2:
    """Perplexity and KL / top-1 agreement with the baseline (``quanteval.evaluate.fidelity``)."""

    generative = False

    def __init__(self, task_config=None):
        self.config = task_config

    @staticmethod
    def sizes(cfg) -> tuple[int, int]:
        """(n_windows, seq_len): the task's own (``task=wikitext2_long``), else the preset's."""
        t = cfg.task
        return getattr(t, "n_windows", None) or cfg.preset.n_windows, getattr(t, "seq_len", None) or cfg.preset.seq_len

    def preset_settings(self, cfg) -> dict:
        n_windows, seq_len = self.sizes(cfg)
        return {"n_windows": n_windows, "seq_len": seq_len}

    def task_meta(self) -> dict:
        long = getattr(self.config, "name", "wikitext2") == "wikitext2_long"
        return {"kind": "long context" if long else "language modelling", "licence": "WikiText-2, CC BY-SA 3.0.",
                "charts": [{"kl_by_position_bucket": True}] if long else []}

    @classmethod
    def _windows(cls, ctx: TaskContext):
        from quanteval.evaluate import fidelity

        n_windows, seq_len = cls.sizes(ctx.cfg)
        path = data_file(ctx.data_root, ctx.cfg.task.file)
        return _windows_cached(fidelity.make_windows, ctx.loaded.tokenizer, path, n_windows, seq_len)

    def cache_paths(self, ctx: TaskContext) -> list[Path]:
        return [self._baseline_path(ctx)]

    @staticmethod
    def _baseline_path(ctx: TaskContext) -> Path:
        import quanteval

        n_windows, seq_len = WikiText2.sizes(ctx.cfg)
        key = results.run_key({"model": ctx.model_key, "file": ctx.cfg.task.file, "top_k": ctx.cfg.task.top_k,
                               "n_windows": n_windows, "seq_len": seq_len, "quanteval": quanteval.__version__})
        return ctx.cache_dir / "baseline" / f"wikitext2-{key}.pt"

    def baseline(self, ctx: TaskContext) -> None:
        from quanteval.evaluate import fidelity

        def compute():
            log.info("computing the baseline's WikiText-2 log-probs once: %s", path.name)
            return fidelity.baseline_stats(ctx.loaded.model, self._windows(ctx), ctx.cfg.task.top_k)

        path = self._baseline_path(ctx)
        ctx.cached(path, compute, save=lambda p, stats: stats.save(p))

    def score(self, ctx: TaskContext) -> TaskResult:
        from quanteval.evaluate import fidelity

        base = fidelity.BaselineStats.load(self._baseline_path(ctx))
        if ctx.run.variant.is_baseline:  # compared with itself: from the statistics its one pass recorded
            metrics = fidelity.compare_baseline(base)
        else:
            metrics = fidelity.compare(ctx.loaded.model, self._windows(ctx), base)
        per_window = metrics.pop("per_window")
        for label, b in (metrics.get("by_position") or {}).items():  # a row per bucket, with per-window CIs
            per_window[f"kl_mean@{label}"] = b.pop("kl_mean_per_window")
            metrics[f"kl_mean@{label}"] = b["kl_mean"]
        return TaskResult(metrics=metrics, per_window=per_window)


@lru_cache(maxsize=4)
def _windows_cached(make, tokenizer, path: Path, n_windows: int, seq_len: int):
    return make(tokenizer, path.read_text(encoding="utf-8"), n_windows, seq_len)


class LMEvalTask:
    """Any lm-eval task (``task=lmeval task.name=<name>``), scored by lm-eval on the variant in memory."""

    generative = False  # may be log-likelihood based: never skipped by the collapse gate

    def __init__(self, task_config=None):
        self.config = task_config

    def preset_settings(self, cfg) -> dict:
        return {"limit": cfg.preset.limits.get("lmeval")}

    def task_meta(self) -> None:  # an lm-eval task declares no kind of work
        return None

    def baseline(self, ctx: TaskContext) -> None:  # lm-eval scores each variant on its own; nothing to cache
        return None

    def cache_paths(self, ctx: TaskContext) -> list[Path]:
        return []

    def score(self, ctx: TaskContext) -> TaskResult:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        t = ctx.cfg.task
        limit = t.limit or ctx.cfg.preset.limits.get("lmeval")
        tm = lmeval_task_manager(t.include_path)
        if t.name not in tm.all_tasks:
            raise ValueError(f"task.name={t.name}: not an lm-eval task"
                             + (f" (nor in task.include_path={t.include_path})" if t.include_path else ""))
        lm = HFLM(pretrained=ctx.loaded.model, tokenizer=ctx.loaded.tokenizer, batch_size=t.batch_size)
        out = simple_evaluate(model=lm, tasks=[t.name], task_manager=tm, limit=limit, num_fewshot=t.num_fewshot,
                              log_samples=True, apply_chat_template=t.apply_chat_template, bootstrap_iters=0,
                              random_seed=ctx.cfg.seed, numpy_random_seed=ctx.cfg.seed,
                              torch_random_seed=ctx.cfg.seed, fewshot_random_seed=ctx.cfg.seed)
        res = out["results"][t.name]
        metrics = {k.replace(",none", ""): float(v) for k, v in res.items()
                   if isinstance(v, (int, float)) and "_stderr" not in k}
        items = []
        for s in out["samples"][t.name]:
            items.append({"id": str(s["doc_id"]), "output": _short(s.get("filtered_resps")),
                          "scores": {m: s[m] for m in s.get("metrics", []) if m in s}})
        metrics["n_items"] = len(items)
        return TaskResult(metrics=metrics, items=items)


def lmeval_task_manager(include_path: Optional[str]):
    """lm-eval's ``TaskManager``, with ``include_path``'s YAML tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()


def check_include_path(include_path: str) -> None:
    """Every YAML in an lm-eval ``include_path`` parses (lm-eval's own loader, ``!function`` tags and all).

    lm-eval skips a YAML it cannot parse with a log line and then says the task does not exist; this
    names the file and the error instead, before any model is loaded. ValueError in one line.
    """
    import yaml

    from quanteval_tasks import yaml_loader

    root = Path(include_path)
    if not root.is_dir():
        raise ValueError(f"task.include_path={include_path}: not a folder of lm-eval YAML tasks")
    files = sorted(root.rglob("*.yaml"))
    if not files:
        raise ValueError(f"task.include_path={include_path}: no *.yaml task files in it")
    for f in files:
        try:
            doc = yaml.load(f.read_text(encoding="utf-8"), Loader=yaml_loader())
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{f}: not a valid lm-eval task YAML ({' '.join(str(e).split())})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{f}: not a valid lm-eval task YAML (a mapping of task:, dataset_path:, ...)")


def _short(x, cap: int = 2000) -> str:
    text = x if isinstance(x, str) else json.dumps(x, default=str)
    return text[:cap]


def _generative(task_config):
    from quanteval.evaluate.generative import GenerativeTask

    return GenerativeTask(task_config.name)


# task config kind -> the class that runs it (conf/task/<name>.yaml or tasks/<name>.yaml picks the kind)
def _sensitivity(task_config):
    from quanteval.evaluate.sensitivity import SensitivityTask

    return SensitivityTask(task_config)


TASKS: dict[str, Callable[[Any], Task]] = {
    "wikitext2": WikiText2,
    "sensitivity": _sensitivity,  # per-unit KL of one method and bits (quanteval.sensitivity)
    "generative": _generative,  # every tasks/<name>.yaml
    "lmeval": LMEvalTask,
}


def task_for(task_config) -> Task:
    """The task that runs ``task_config`` (by its ``kind``)."""
    try:
        make = TASKS[task_config.kind]
    except KeyError:
        raise ValueError(f"task.kind={task_config.kind!r}: must be one of {', '.join(TASKS)}") from None
    return make(task_config)
