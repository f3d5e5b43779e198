"""Thread shares of parallel local jobs (quanteval.threads): the registry of live jobs and the choice."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from quanteval import threads


def test_env_and_slurm_win_and_bad_values_are_one_line(tmp_path):
    assert threads.job_threads({"QUANTEVAL_THREADS": "3", "SLURM_CPUS_PER_TASK": "8"}, tmp_path) == \
        (3, "QUANTEVAL_THREADS=3")
    assert threads.job_threads({"SLURM_CPUS_PER_TASK": "8"}, tmp_path)[0] == 8
    with pytest.raises(ValueError, match="QUANTEVAL_THREADS='0': must be a positive integer"):
        threads.job_threads({"QUANTEVAL_THREADS": "0"}, tmp_path)


def test_cores_are_divided_among_live_jobs_and_dead_ones_are_forgotten(tmp_path):
    holder = ("import sys, time; sys.path.insert(0, %r); from quanteval import threads; "
              "threads.register(__import__('pathlib').Path(sys.argv[1])); print('up', flush=True); time.sleep(60)")
    import quanteval
    root = str(__import__("pathlib").Path(quanteval.__file__).parent.parent)
    procs = [subprocess.Popen([sys.executable, "-c", holder % root, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "up"
        assert threads.running_jobs(tmp_path) == 3
        n, why = threads.job_threads({}, tmp_path)
        assert n == max(1, threads.cores() // 3) and "3 quanteval job(s)" in why
        procs[0].kill()  # kill -9: its lock is released by the OS, its file is removed by the next count
        procs[0].wait()
        assert threads.running_jobs(tmp_path) == 2
        assert len(list(tmp_path.glob("*.lock"))) == 2
    finally:
        for p in procs:
            p.kill()
            p.wait()
    time.sleep(0.1)
    assert threads.running_jobs(tmp_path) == 0 and not list(tmp_path.glob("*.lock"))


def test_bad_thread_count_fails_before_any_work(tmp_path):
    from conftest import run_cli

    proc = run_cli("preset=smoke", f"results_dir={tmp_path}", env={"QUANTEVAL_THREADS": "many"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "quanteval: error: QUANTEVAL_THREADS='many': must be a positive integer"
    assert not (tmp_path / "default").exists()
