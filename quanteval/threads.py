"""How many threads torch takes in this process, so that parallel local jobs share the cores.

Each torch process takes every core by default. Two such processes on the same cores run 5-8x slower
each, not 2x: their OpenMP threads spin and preempt each other (measured on this project's 2-core
machine: ``benchmarks/contention.py``). So every quanteval process sets its own share at the start of
each job (``configure``), from the first of:

1. ``QUANTEVAL_THREADS=N``: the user's choice;
2. ``SLURM_CPUS_PER_TASK`` (set by SLURM and by the ``slurm`` launcher's ``cpus_per_task``): the
   cores the scheduler gave the job;
3. the cores this process may run on (``os.sched_getaffinity``) divided by the quanteval jobs
   running on this machine now. Each process registers itself with a lock file it holds for its
   life (``$QUANTEVAL_CACHE/jobs/<pid>.lock``, an ``flock``); a file whose lock is free belongs to a
   process that ended (a ``kill -9`` included) and is removed. A job that started alone and took
   every core gives its share back at its next job, when the next run starts.

Written here because neither torch nor Hydra's launchers divide the cores among independent
processes (submitit's local launcher sets no thread count; ``OMP_NUM_THREADS`` must be set before
torch starts and cannot follow jobs that start later).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_REGISTERED: dict = {}  # the open lock file that registers this process (kept for the process's life)


def _jobs_dir() -> Path:
    from quanteval.models import cache_root

    return cache_root() / "jobs"


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
        return os.cpu_count() or 1


def register(folder: Path | None = None) -> None:
    """Register this process as a running quanteval job (once; the lock lasts until the process ends)."""
    folder = folder or _jobs_dir()
    if _REGISTERED.get("folder") == folder:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / f"{os.getpid()}.lock", "w")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:  # an unwritable cache: this process simply is not counted by the others
        log.debug("cannot register this job in %s: %s", folder, e)
        return
    _REGISTERED.update(folder=folder, file=f)


def running_jobs(folder: Path | None = None) -> int:
    """quanteval processes running on this machine now (this one included when registered); removes the
    files of processes that ended."""
    folder = folder or _jobs_dir()
    n = 0
    for path in folder.glob("*.lock") if folder.is_dir() else []:
        try:
            with open(path) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    n += 1  # held: a live process
                    continue
                path.unlink(missing_ok=True)  # free: its process ended
        except OSError:
            continue
    return n


def job_threads(env=os.environ, folder: Path | None = None) -> tuple[int, str]:
    """(threads, why) for this process now; see the module docstring.

    >>> job_threads({"QUANTEVAL_THREADS": "3"})
    (3, 'QUANTEVAL_THREADS=3')
    >>> job_threads({"SLURM_CPUS_PER_TASK": "8"})
    (8, 'SLURM_CPUS_PER_TASK=8')
    """
    for name in ("QUANTEVAL_THREADS", "SLURM_CPUS_PER_TASK"):
        value = env.get(name)
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: must be a positive integer") from None
            if n < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
            return n, f"{name}={n}"
    total, jobs = cores(), max(1, running_jobs(folder))
    return max(1, total // jobs), f"{total} core(s) / {jobs} quanteval job(s) running"


def configure() -> int:
    """Register this process and set torch's intra-op threads to its share (logged when it changes)."""
    import torch

    register()
    n, why = job_threads()
    if torch.get_num_threads() != n:
        log.info("torch threads: %d -> %d (%s)", torch.get_num_threads(), n, why)
        torch.set_num_threads(n)
    return n
