"""Keys are pinned: every cache key and run key of quanteval 0.2.0 is unchanged, for every job of the
default grid, the smoke grid and a few others (packed runtime, calibration settings, lm-eval tasks),
except where a default changed on purpose since (``upgraded`` lists each change).

``fixtures/keys-0.2.0.json`` was written by the 0.2.0 code (before the Variant/Run refactor): for each
job, its run settings without the git commit, their key, its quantisation cache file name and its
task's baseline cache file names. A changed key would silently orphan every cache users have.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from quanteval import cli, results
from quanteval.data import resolve_data_dir
from quanteval.evaluate import TaskContext, task_for
from quanteval.variant import Run, quant_key_of

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


def upgraded(settings: dict) -> dict:
    """0.2.0's settings of a run under today's defaults. The only changes since (issue 13, on purpose):
    GPTQ's act_order and static_groups default to true (llm-compressor's actorder=static), and the
    default calibration set is the WikiText-2 + chat mix, whose share enters the key."""
    s = copy.deepcopy(settings)
    if s.get("method", {}).get("name") == "gptq":
        s["method"].update(act_order=True, static_groups=True)
    c = s.get("calibration")
    if c is not None and c["dataset"] == "wikitext2" and c["path"] is None:  # 0.2.0's default set
        c.update(dataset="mix", chat_share=0.5)
    return s


@pytest.mark.skipif(not SHARED.exists(), reason="the baseline keys of the generative tasks hash ../shared/data's item ids")
@pytest.mark.parametrize("grid", sorted(PINNED))
def test_keys_of_every_job_are_those_of_0_2_0(grid):
    """Every key is 0.2.0's, except where today's defaults changed the settings (``upgraded``): there the
    settings are 0.2.0's with exactly those changes."""
    jobs, cfgs, _, _ = cli.expand_grid(PINNED[grid]["overrides"])
    pinned = PINNED[grid]["jobs"]
    assert len(cfgs) == len(pinned)
    new_key = {}  # 0.2.0 run key -> today's, for runs whose defaults changed
    for cfg, want in zip(cfgs, pinned):
        got = _state(cfg)
        assert got["job"] == want["job"]
        assert got["baseline"] == want["baseline"] and got["skipped"] == want["skipped"], want["job"]
        if "settings" in want:  # stored once per distinct run: the full settings, to show what moved
            expected = upgraded(want["settings"])
            assert got["settings"] == expected, want["job"]
            new_key[want["run_key_nogit"]] = results.run_key(expected)
            if expected == want["settings"]:
                assert got["quant"] == want["quant"], f"{grid}: {want['job']}: quant cache key changed"
            elif got["quant"] is not None:
                assert got["quant"] == f"{cfg.method.name}-{quant_key_of(expected)}.pt"
        assert got["run_key_nogit"] == new_key[want["run_key_nogit"]], f"{grid}: {want['job']}: run key changed"
        if new_key[want["run_key_nogit"]] == want["run_key_nogit"]:
            assert got["quant"] == want["quant"], f"{grid}: {want['job']}: quant cache key changed"


@pytest.mark.skipif(not SHARED.exists(), reason="the baseline keys of the generative tasks hash ../shared/data's item ids")
def test_the_old_gptq_defaults_give_the_old_keys():
    """``calibration.dataset=wikitext2 method.act_order=false method.static_groups=false`` is 0.2.0's GPTQ,
    key for key."""
    pinned = {r["job"]: r for r in PINNED["default"]["jobs"] if r["job"].startswith("gptq")}
    jobs, cfgs, _, _ = cli.expand_grid(["method=gptq", "calibration.dataset=wikitext2", "method.act_order=false",
                                        "method.static_groups=false"])
    assert len(cfgs) == len(pinned)
    for cfg in cfgs:
        got = _state(cfg)
        want = pinned[got["job"]]
        assert (got["run_key_nogit"], got["quant"]) == (want["run_key_nogit"], want["quant"]), got["job"]


def test_run_key_includes_the_git_commit():
    """The git commit is part of the run key (not of the cache keys): a new commit reruns, caches stay."""
    jobs, cfgs, _, _ = cli.expand_grid(["preset=smoke", "method=rtn", "bits=4", "task=wikitext2"])
    run = Run.of(cfgs[0])
    assert run.settings["git"] == results.git_commit()
    assert run.key == results.run_key(run.settings)
