"""Evaluation tasks.

``TASKS`` maps the name in ``conf/task/<name>.yaml`` to an object with two methods:

- ``baseline(ctx)``: compute and cache on disk what the task needs from the
  unquantised model (called with baseline weights in memory; a no-op when
  the cache exists);
- ``score(ctx) -> dict``: the metrics of the model currently in memory.
"""

from __future__ import annotations

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


TASKS = {
    "wikitext2": WikiText2(),
}
