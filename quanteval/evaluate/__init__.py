"""Evaluation tasks.

``get_task(task_config)`` gives, by the config's ``kind``, an object with two methods:

- ``baseline(ctx)``: compute and cache on disk what the task needs from the
  unquantised model (called with baseline weights in memory; a no-op when
  the cache exists);
- ``score(ctx) -> dict``: the metrics of the model currently in memory.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

from quanteval import results
from quanteval.data import data_file
from quanteval.evaluate import fidelity

log = logging.getLogger(__name__)


class WikiText2:
    """Perplexity and KL / top-1 agreement with the baseline (``quanteval.evaluate.fidelity``)."""

    name = "wikitext2"

    @staticmethod
    def _windows(ctx):
        p = ctx.cfg.preset
        path = data_file(ctx.data_root, ctx.cfg.task.file)
        return _windows_cached(ctx.loaded.tokenizer, path, p.n_windows, p.seq_len)

    def cache_paths(self, ctx) -> list[Path]:
        """The baseline cache files this task reads (for ``plan=true``)."""
        return [self._baseline_path(ctx)]

    @staticmethod
    def _baseline_path(ctx) -> Path:
        import quanteval

        key = results.run_key({"model": ctx.model_key, "file": ctx.cfg.task.file, "top_k": ctx.cfg.task.top_k,
                               "n_windows": ctx.cfg.preset.n_windows, "seq_len": ctx.cfg.preset.seq_len,
                               "quanteval": quanteval.__version__})
        return ctx.cache_dir / "baseline" / f"wikitext2-{key}.pt"

    def baseline(self, ctx) -> None:
        from filelock import FileLock

        path = self._baseline_path(ctx)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not ctx.needs(path):
                return
            log.info("computing the baseline's WikiText-2 log-probs once: %s", path.name)
            stats = fidelity.baseline_stats(ctx.loaded.model, self._windows(ctx), ctx.cfg.task.top_k)
            stats.save(path)
            ctx.wrote(path)

    def score(self, ctx) -> dict:
        base = fidelity.BaselineStats.load(self._baseline_path(ctx))
        return fidelity.compare(ctx.loaded.model, self._windows(ctx), base)


@lru_cache(maxsize=4)
def _windows_cached(tokenizer, path: Path, n_windows: int, seq_len: int):
    return fidelity.make_windows(tokenizer, path.read_text(encoding="utf-8"), n_windows, seq_len)


class LMEvalTask:
    """Any lm-eval task (``task=lmeval task.name=<name>``), scored by lm-eval on the variant in memory."""

    generative = False  # may be log-likelihood based: never skipped by the collapse short-circuit

    def baseline(self, ctx) -> None:  # lm-eval scores each variant on its own; nothing to cache
        return None

    def cache_paths(self, ctx) -> list[Path]:
        return []

    def score(self, ctx) -> dict:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        t = ctx.cfg.task
        limit = t.limit or ctx.cfg.preset.limits.get("lmeval")
        tm = TaskManager(include_path=t.include_path) if t.include_path else TaskManager()
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
        return {**metrics, "items": items}


def _short(x, cap: int = 2000) -> str:
    text = x if isinstance(x, str) else json.dumps(x, default=str)
    return text[:cap]


def get_task(task_config):
    """The evaluator for a task config (by its ``kind``)."""
    from quanteval.evaluate.generative import GenerativeTask

    if task_config.kind == "wikitext2":
        return WikiText2()
    if task_config.kind == "generative":
        return GenerativeTask(task_config.name)
    if task_config.kind == "lmeval":
        return LMEvalTask()
    raise ValueError(f"task.kind={task_config.kind!r}: must be wikitext2, generative or lmeval")
