"""glibc's malloc, told to hand large blocks back to the system when they are freed.

A sweep's peak resident memory on the CPU is set by its generation batches: each decode step allocates
and frees tensors from a few hundred kB to tens of MB (activations, logits, the KV cache's buffers as
they grow). glibc serves a block above its *mmap threshold* with its own ``mmap`` and returns it to the
system on ``free``; below it, the block comes from the heap, which keeps freed memory for reuse and
fragments. The threshold starts at 128 kB but rises, by default, to the size of every mmapped block that
is freed (up to 32 MB): after the first large KV buffer is freed, every tensor up to that size lives in
the heap, and the heap stays as large as the batch's worst moment, into the next job's reload of weights.

``QUANTEVAL_MMAP_THRESHOLD=<bytes>`` fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also stops
it rising) in every job; unset or ``0`` leaves glibc's default. It is a trade of time for memory, so it is
off by default. Measured on this 2-core machine (2026-12-06):

- ``benchmarks/memory_peak.py`` on ``method=none,rtn bits=8`` (the default preset): peak RSS (``VmHWM``)
  3,381 MB with glibc's default, 2,668 MB at 1 MB, 2,656 MB at 128 kB;
- ``benchmarks/allocator.py`` (separate processes, alternating, idle machine): RTN w8's seven tasks
  peaked at 2,899 and 3,169 MB with glibc's default, 2,604 MB at 1 MB, 2,926 MB at 8 MB; but its
  generation batch took 55.3 and 58.2 s against 65.7 s (1 MB) and 62.0 s (8 MB), and GPTQ w4's
  quantisation 70.3 and 72.1 s against 87.0 s (1 MB) and 83.7 s (8 MB): the page faults of freshly
  mapped blocks. Answers and KL were identical under every setting.

A user short of memory sets ``QUANTEVAL_MMAP_THRESHOLD=1048576``: 0.3–0.7 GB less at the peak in the
figures above, about 20% slower. A user's own ``MALLOC_MMAP_THRESHOLD_`` (glibc's environment variable) is
left alone, and other C libraries (musl, macOS) are left as they are.

Between phases of a sweep (after a run, before a generation batch) ``trim()`` hands the heap's free pages
back to the system (``malloc_trim(0)``): what one phase freed then no longer sits in the next one's
resident memory. That costs no time in the phases themselves, and is always on.

Written here because neither torch (its CPU allocator is ``malloc``'s) nor Python sets it; the setting is
one ``mallopt`` call through ``ctypes``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
SUGGESTED = 1 << 20  # bytes: the threshold that saves the most memory here (the docstring's figures)
ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc's own
SETTING = "QUANTEVAL_MMAP_THRESHOLD"  # quanteval's: bytes, 0 = glibc's default

_DONE: dict = {}  # once per process: {"threshold": bytes or None}


def threshold_from(env=os.environ) -> int:
    """The threshold to set: ``QUANTEVAL_MMAP_THRESHOLD`` (bytes), 0 (glibc's default) when unset; ValueError
    naming the variable when it is not a whole number of bytes."""
    raw = env.get(SETTING)
    if raw is None or raw.strip() == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0 or value > 2**31 - 1:
        raise ValueError(f"{SETTING}={raw!r}: must be a number of bytes from 0 (glibc's default) to 2147483647")
    return value


def configure(threshold: int | None = None) -> int | None:
    """Fix glibc's mmap threshold at ``threshold`` bytes (default: ``threshold_from()``), once per process;
    returns the threshold set, or None where the allocator was left alone (a threshold of 0; the user set
    ``MALLOC_MMAP_THRESHOLD_``; not glibc)."""
    if "threshold" in _DONE:
        return _DONE["threshold"]
    _DONE["threshold"] = None
    threshold = threshold_from() if threshold is None else threshold
    if threshold == 0:
        return None
    if os.environ.get(ENV):
        log.debug("%s=%s is set: the allocator is left as the user chose", ENV, os.environ[ENV])
        return None
    libc = _glibc()
    if libc is None:
        return None
    if libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) != 1:
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) failed: the allocator is left as it is", threshold)
        return None
    _DONE["threshold"] = int(threshold)
    return _DONE["threshold"]


def trim() -> bool:
    """Return the heap's free memory to the system (glibc's ``malloc_trim(0)``: whole free pages anywhere in
    the heap, not only at its top); True if some was returned. A no-op (False) off glibc."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


@functools.cache
def _glibc():
    """The process's C library when it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    return libc
