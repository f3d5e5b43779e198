"""``task=sensitivity``: the per-unit sensitivity table of the run's method and bits, as a run of its own.

The run file's metrics summarise the table (units, measured KL sum and max, the proxy's Spearman rho);
its items file holds one record per unit (``quanteval.sensitivity.SensitivityTable.rows``), which
``method=mixed`` reads back by the run's key and the report draws as a layers x unit types heatmap.
The sweep gives this task the uniform result without applying it (``applies_result = False``): the
units are applied one at a time to the baseline weights. For AWQ the baseline is first moved into the
basis its result was quantised in (``quanteval.methods.awq.scaled_basis``: the norms hold the folds, the
linears the scaled weights), which computes the baseline's function, so a unit's quantised layers apply
alone there.
"""

from __future__ import annotations

import logging

from quanteval.evaluate import TaskContext, TaskResult

log = logging.getLogger(__name__)


class SensitivityTask:
    generative = False
    applies_result = False  # the sweep hands the uniform result over in ctx.result

    def __init__(self, task_config=None):
        self.config = task_config

    def preset_settings(self, cfg) -> dict:
        return {}  # its sizes are the task's own (task.n_windows, task.seq_len)

    def task_meta(self) -> dict:
        return {"kind": "sensitivity", "licence": "WikiText-2, CC BY-SA 3.0.", "charts": [{"sensitivity": True}]}

    def cache_paths(self, ctx: TaskContext) -> list:
        return []

    def baseline(self, ctx: TaskContext) -> None:
        return None  # the baseline's block inputs are computed in the run (they are cheap next to the units)

    def score(self, ctx: TaskContext) -> TaskResult:
        from quanteval.data import data_file
        from quanteval.evaluate import fidelity
        from quanteval.models import adapter_for
        from quanteval.sensitivity import measure

        if not ctx.run.variant.quantizes:
            raise ValueError("task=sensitivity: needs a method that quantises (method=rtn, gptq, ...), not "
                             "method=none")
        result = ctx.result
        if result is None or not result.layers or result.swaps_modules:  # hqq's float zeros are still weights
            raise ValueError(f"task=sensitivity: method={ctx.cfg.method.name} gives no affine per-layer result "
                             f"to apply one unit at a time")
        t = ctx.cfg.task
        text = data_file(ctx.data_root, t.file).read_text(encoding="utf-8")
        windows = fidelity.make_windows(ctx.loaded.tokenizer, text, t.n_windows, t.seq_len)
        model = ctx.loaded.model
        adapter = adapter_for(model)
        if result.folds:  # AWQ: into the basis its layers were quantised in, the baseline's function kept
            from quanteval.methods.awq import scaled_basis

            ctx.session.modified()  # the next variant gets the baseline weights back
            scaled_basis(model, adapter, result.folds)
        table = measure(model, adapter, windows, result.layers, t.top_k, t.sample, ctx.cfg.seed)
        kls = [k for k in table.kl if k is not None]
        metrics = {"n_units": len(table.units), "n_measured": len(kls), "kl_sum": sum(table.predicted),
                   "kl_max": max(kls) if kls else None, "proxy_rho": table.rho, "proxy_used": table.proxy_used}
        log.info("sensitivity: %d units, KL sum %.4g, proxy Spearman rho %.3f", len(table.units),
                 metrics["kl_sum"], table.rho)
        return TaskResult(metrics=metrics, items=table.rows())
