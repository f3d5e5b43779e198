"""Sweeps at scale, on the tiny model: plan, caches, kill -9 resume, locks, parallel jobs, disk full, logs.

Every sweep here is the real console script in a subprocess (Hydra and all).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from quanteval import results

GRID = ["method=none,rtn,gptq", "bits=4,3", "task=wikitext2,arith_chain"]


def _args(tiny_model: Path, tiny_data: Path, out: Path, *extra: str) -> list[str]:
    return ["model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}", f"results_dir={out}",
            "preset=smoke", "preset.n_windows=2", "preset.seq_len=64", "preset.calib_samples=4",
            "preset.calib_seq_len=64", "preset.max_new_tokens.arith_chain=8", "preset.limits.arith_chain=1",
            *extra]


def outcomes(out: Path) -> dict:
    """What a sweep computed, by (task, variant): status, metrics and per-item outputs (no timings)."""
    got = {}
    for f in results.run_files(out / "default"):
        rec = results.read_run(f)
        items = results.run_items(f, rec)
        got[(rec["task"], rec["variant"]["label"])] = (
            rec["status"], rec.get("metrics"), [(it["id"], it["output"]) for it in items or []])
    return got


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_data, tmp_path_factory):
    """The uninterrupted in-process sweep of GRID."""
    out = tmp_path_factory.mktemp("ref")
    proc = run_cli(*_args(tiny_model, tiny_data, out, *GRID))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_every_run_has_its_log_and_the_sweep_bar(reference):
    out, proc = reference
    runs = out / "default" / "runs"
    jsons = [p for p in runs.glob("*.json")]
    assert len(jsons) == 10  # baseline x 2 tasks + (rtn, gptq) x (4, 3) x 2 tasks
    for p in jsons:
        log = p.with_suffix(".log").read_text()
        assert f"run {p.name}" in log
    assert "sweep: 100%" in proc.stderr and "10/10" in proc.stderr
    assert "gptq" in proc.stderr and "block" in proc.stderr  # quantisation shows progress per block


def test_plan_shows_done_and_to_do_without_running(tiny_model, tiny_data, reference, tmp_path):
    out, _ = reference
    before = sorted(p.name for p in (out / "default" / "runs").iterdir())
    proc = run_cli(*_args(tiny_model, tiny_data, out, "method=none,rtn,gptq", "bits=4,3,2",
                          "task=wikitext2,arith_chain", "plan=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "default" / "runs").iterdir()) == before  # nothing ran
    lines = proc.stdout.splitlines()
    rtn3 = [ln for ln in lines if ln.startswith("wikitext2") and "rtn w3" in ln]
    rtn2 = [ln for ln in lines if ln.startswith("wikitext2") and "rtn w2" in ln]
    assert rtn3 and "ok" in rtn3[0] and "cached" in rtn3[0]
    assert rtn2 and "to do" in rtn2[0] and "to compute" in rtn2[0]
    assert "14 distinct runs: 10 done, 4 to run." in proc.stdout
    est = proc.stdout.split("Estimated time")[1]
    assert "eval" in est and "unknown" not in est.split("total")[0].split("eval")[1].splitlines()[0]
    # a fresh results_dir: everything to do, and no timings to estimate from
    proc = run_cli(*_args(tiny_model, tiny_data, tmp_path, "method=rtn", "bits=4", "task=wikitext2", "plan=true"))
    assert proc.returncode == 0 and "0 done, 1 to run" in proc.stdout and "total        unknown" in proc.stdout
    assert not (tmp_path / "default").exists()


@pytest.mark.slow
def test_kill_9_at_several_points_then_resume_equals_uninterrupted(tiny_model, tiny_data, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "killed"
    runs = out / "default" / "runs"
    cmd = [sys.executable, "-c", "import sys; sys.argv[0]='quanteval'; from quanteval.cli import main; main()",
           *_args(tiny_model, tiny_data, out, *GRID)]

    def run_until(condition, timeout=300):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        t0 = time.time()
        while proc.poll() is None and time.time() - t0 < timeout:
            if condition():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.05)
        proc.wait()
        return False

    n_runs = lambda: len(list(runs.glob("*.json"))) if runs.exists() else 0  # noqa: E731
    # 1: as the first baseline is computed; 2: after one more run; 3: after three more (mid-GPTQ or
    # mid-generation, whichever comes). Counts are relative, so a fast machine cannot skip a kill point.
    killed = [run_until(lambda: (out / "cache" / "baseline").exists())]
    start = n_runs()
    killed.append(run_until(lambda: n_runs() >= start + 1))
    start = n_runs()
    killed.append(run_until(lambda: n_runs() >= start + 3))
    assert all(killed), f"the sweep ended before a kill point: {killed}"
    finished_before = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json") if results.completed(p)}
    assert 4 <= len(finished_before) < 10
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    assert all(after[n] == t for n, t in finished_before.items())  # only what was missing was computed
    assert outcomes(out) == outcomes(ref)


@pytest.mark.slow
def test_submitit_local_sweep_equals_in_process_and_baseline_computed_once(tiny_model, tiny_data, reference,
                                                                           tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is the 'cluster' extra; CI installs it")
    ref, _ = reference
    # 4 variants (RTN and GPTQ at 4 and 3 bits) of WikiText-2 as 4 parallel subprocesses, each of which
    # needs the baseline's log-probs: one computes them, the other three wait for the lock and read them
    grid = ["method=rtn,gptq", "bits=4,3", "task=wikitext2"]
    proc = run_cli(*_args(tiny_model, tiny_data, tmp_path, *grid, "hydra/launcher=local"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = outcomes(tmp_path)
    want = {k: v for k, v in outcomes(ref).items() if k[0] == "wikitext2" and k[1] != "baseline"}
    assert len(got) == 4 and got == want
    logs = "".join(p.read_text() for p in (tmp_path / "default" / "runs").glob("*.log"))
    assert logs.count("computing the baseline's WikiText-2 log-probs once") == 1
    assert list((tmp_path / "default" / "hydra").rglob(".submitit/*"))  # it went through submitit


@pytest.mark.slow
def test_two_sweeps_at_once_share_the_store(tiny_model, tiny_data, reference, tmp_path):
    ref, _ = reference
    cmd = [sys.executable, "-c", "import sys; sys.argv[0]='quanteval'; from quanteval.cli import main; main()",
           *_args(tiny_model, tiny_data, tmp_path, "method=none,rtn", "bits=4,3", "task=wikitext2")]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    got = outcomes(tmp_path)
    assert got == {k: v for k, v in outcomes(ref).items() if k[0] == "wikitext2" and "gptq" not in k[1]}
    logs = "".join(p.read_text() for p in (tmp_path / "default" / "runs").glob("*.log"))
    assert logs.count("computing the baseline's WikiText-2 log-probs once") == 1
    assert logs.count("run ") == 3  # each run computed by one of the two sweeps


def test_lock_of_a_killed_job_is_released(tmp_path):
    from filelock import FileLock

    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"from filelock import FileLock; import time; "
                               f"l = FileLock({str(lock)!r}); l.acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(TimeoutError):
        FileLock(str(lock)).acquire(timeout=0.2)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.exists()  # the file stays behind ...
    with FileLock(str(lock)).acquire(timeout=5):  # ... but the dead job's lock is gone with it
        pass


def test_full_disk_while_writing_a_cache(tmp_path, monkeypatch):
    import torch

    from quanteval.methods import QuantResult
    from quanteval.methods.rtn import rtn_layer

    path = tmp_path / "quant" / "rtn-abc.pt"
    good = QuantResult(layers={"l": rtn_layer(torch.randn(4, 8), 4, 4, False)})
    good.save(path)
    before = path.read_bytes()

    def full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(results.WriteError) as e:
        QuantResult(layers={"l": rtn_layer(torch.randn(4, 8), 3, 4, False)}).save(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "disk is full" in msg and "previous file is intact" in msg
    assert path.read_bytes() == before and QuantResult.load(path).layers["l"].bits == 4
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_every_setting_invalidates_the_quantisation_cache(monkeypatch):
    """The quant cache key changes with each setting that changes the result, and with the version."""
    import quanteval
    from quanteval.config import (CalibrationConfig, GPTQConfig, ModelConfig, PresetConfig, RunConfig,
                                  WikiText2Config)
    from quanteval.variant import Run

    def quant_cache_path(cfg):
        return Run.of(cfg).quant_path

    base = RunConfig(model=ModelConfig(), method=GPTQConfig(), task=WikiText2Config(), preset=PresetConfig(), bits=4)
    key = quant_cache_path(base).name
    changes = {
        "bits": dataclasses.replace(base, bits=3),
        "group_size": dataclasses.replace(base, group_size=32),
        "sym": dataclasses.replace(base, sym=True),
        "seed": dataclasses.replace(base, seed=1),
        "dtype": dataclasses.replace(base, dtype="bfloat16"),
        "quantize_embeddings": dataclasses.replace(base, quantize_embeddings=True),
        "model": dataclasses.replace(base, model=ModelConfig(name="other")),
        "calibration": dataclasses.replace(base, calibration=CalibrationConfig(dataset="wikitext2", path="x.txt")),
        "calib_samples": dataclasses.replace(base, preset=dataclasses.replace(base.preset, calib_samples=8)),
        "calib_seq_len": dataclasses.replace(base, preset=dataclasses.replace(base.preset, calib_seq_len=128)),
    }
    for f in dataclasses.fields(GPTQConfig):
        v = getattr(base.method, f.name)
        if f.name == "name":
            continue
        new = (not v) if isinstance(v, bool) else (v / 2 if isinstance(v, (int, float)) else None)
        if new is not None:
            changes[f"method.{f.name}"] = dataclasses.replace(base, method=dataclasses.replace(base.method, **{f.name: new}))
    for what, cfg in changes.items():
        assert quant_cache_path(cfg).name != key, f"changing {what} kept the cache key"
    # what does not change the result keeps the key: the task, the preset's evaluation sizes
    assert quant_cache_path(dataclasses.replace(base, task=WikiText2Config(top_k=8))).name == key
    assert quant_cache_path(dataclasses.replace(base, preset=dataclasses.replace(base.preset, n_windows=3))).name == key
    monkeypatch.setattr(quanteval, "__version__", "9.9.9")
    assert quant_cache_path(base).name != key


def test_every_setting_invalidates_the_baseline_caches(tiny_data, monkeypatch):
    import quanteval
    from quanteval.config import GenerativeTaskConfig, ModelConfig, NoneConfig, PresetConfig, RunConfig, WikiText2Config
    from quanteval.evaluate import TaskContext, task_for
    from quanteval.variant import Run

    def paths(cfg, model="m"):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=model))  # other baseline weights
        return task_for(cfg.task).cache_paths(TaskContext(Run.of(cfg), None, tiny_data))

    wt = RunConfig(model=ModelConfig(), method=NoneConfig(), task=WikiText2Config(), preset=PresetConfig())
    gen = dataclasses.replace(wt, task=GenerativeTaskConfig(name="gsm8k", limit=2))
    for base, changed in [
        (wt, dataclasses.replace(wt, preset=dataclasses.replace(wt.preset, n_windows=3))),
        (wt, dataclasses.replace(wt, preset=dataclasses.replace(wt.preset, seq_len=128))),
        (wt, dataclasses.replace(wt, task=WikiText2Config(top_k=8))),
        (gen, dataclasses.replace(gen, task=GenerativeTaskConfig(name="gsm8k", limit=3))),
        (gen, dataclasses.replace(gen, task=GenerativeTaskConfig(name="gsm8k", limit=2, max_new_tokens=7))),
        (gen, dataclasses.replace(gen, sandbox="none")),
    ]:
        assert paths(base) != paths(changed)
    assert paths(wt, "m") != paths(wt, "other model") and paths(gen, "m") != paths(gen, "other model")
    before = paths(wt) + paths(gen)
    monkeypatch.setattr(quanteval, "__version__", "9.9.9")
    assert paths(wt) + paths(gen) != before


def test_launcher_without_its_plugin_is_one_line(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    import importlib.util

    from quanteval import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if "submitit" in name else real(name, *a))  # as if not installed
    monkeypatch.setattr(sys, "argv", ["quanteval", *_args(tiny_model, tiny_data, tmp_path, "hydra/launcher=slurm")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1
    assert "hydra/launcher=slurm" in lines[0] and "pip install 'quanteval[cluster]'" in lines[0]
