"""Keys are pinned: every cache key and run key of quanteval 0.2.0 is unchanged, for every job of the
default grid, the smoke grid and a few others (packed runtime, calibration settings, lm-eval tasks).

``fixtures/keys-0.2.0.json`` was written by the 0.2.0 code (before the Variant/Run refactor): for each
job, its run settings without the git commit, their key, its quantisation cache file name and its
task's baseline cache file names. A changed key would silently orphan every cache users have.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quanteval import cli, results
from quanteval.data import resolve_data_dir
from quanteval.evaluate import TaskContext, task_for
from quanteval.variant import Run

FIXTURE = Path(__file__).parent / "fixtures" / "keys-0.2.0.json"
PINNED = json.loads(FIXTURE.read_text())
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _state(cfg) -> dict:
    run = Run.of(cfg)
    settings = {k: v for k, v in run.settings.items() if k != "git"}
    ctx = TaskContext(run, None, resolve_data_dir(cfg.data_dir))
    return {"job": f"{cfg.method.name} bits={cfg.bits} task={cfg.task.name}",
            "settings": json.loads(json.dumps(settings, default=str)),
            "run_key_nogit": results.run_key(settings),
            "quant": run.quant_path.name if run.quant_path else None,
            "baseline": [p.name for p in task_for(cfg.task).cache_paths(ctx)],
            "skipped": run.preset_skip() is not None}


@pytest.mark.skipif(not SHARED.exists(), reason="the baseline keys of the generative tasks hash ../shared/data's item ids")
@pytest.mark.parametrize("grid", sorted(PINNED))
def test_keys_of_every_job_are_those_of_0_2_0(grid):
    jobs, cfgs, _, _ = cli.expand_grid(PINNED[grid]["overrides"])
    pinned = PINNED[grid]["jobs"]
    assert len(cfgs) == len(pinned)
    for cfg, want in zip(cfgs, pinned):
        got = _state(cfg)
        assert got["job"] == want["job"]
        if "settings" in want:  # stored once per distinct run: the full settings, to show what moved
            assert got["settings"] == want["settings"], want["job"]
        for k in ("run_key_nogit", "quant", "baseline", "skipped"):
            assert got[k] == want[k], f"{grid}: {want['job']}: {k} changed"


def test_run_key_includes_the_git_commit():
    """The git commit is part of the run key (not of the cache keys): a new commit reruns, caches stay."""
    jobs, cfgs, _, _ = cli.expand_grid(["preset=smoke", "method=rtn", "bits=4", "task=wikitext2"])
    run = Run.of(cfgs[0])
    assert run.settings["git"] == results.git_commit()
    assert run.key == results.run_key(run.settings)
