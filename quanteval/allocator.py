"""glibc's malloc, told to hand large blocks back to the system when they are freed.

A sweep's peak resident memory on the CPU is set by its generation batches: each decode step allocates
and frees tensors from a few hundred kB to tens of MB (activations, logits, the KV cache's buffers as
they grow). glibc serves a block above its *mmap threshold* with its own ``mmap`` and returns it to the
system on ``free``; below it, the block comes from the heap, which keeps freed memory for reuse and
fragments. The threshold starts at 128 kB but rises, by default, to the size of every mmapped block that
is freed (up to 32 MB): after the first large KV buffer is freed, every tensor up to that size lives in
the heap, and the heap stays as large as the batch's worst moment, into the next job's reload of weights.

``configure`` fixes the threshold at 1 MB (``mallopt(M_MMAP_THRESHOLD)``, which also stops it rising).
Measured with ``benchmarks/memory_peak.py`` on ``method=none,rtn bits=8`` (the default preset, this 2-core
machine, 2026-12-06): peak RSS (``VmHWM``) 3,381 MB with glibc's default, 2,668 MB with a 1 MB
threshold, 2,656 MB with 128 kB (so 1 MB, which maps fewer small blocks, is enough); the sweep was no
slower (4 min 18 s and 4 min 36 s against 7 min 47 s on a busier machine: not a benchmark).

Written here because neither torch (its CPU allocator is ``malloc``'s) nor Python sets it; the setting is
one ``mallopt`` call through ``ctypes``. A user's own ``MALLOC_MMAP_THRESHOLD_`` (glibc's environment
variable) is left alone, and other C libraries (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 1 << 20  # bytes: blocks at least this large are mmapped and returned on free
ENV = "MALLOC_MMAP_THRESHOLD_"

_DONE: dict = {}  # once per process: {"threshold": bytes or None}


def configure(threshold: int = MMAP_THRESHOLD) -> int | None:
    """Fix glibc's mmap threshold at ``threshold`` bytes, once per process; returns the threshold set,
    or None where it was left alone (the user set ``MALLOC_MMAP_THRESHOLD_``; not glibc)."""
    if "threshold" in _DONE:
        return _DONE["threshold"]
    _DONE["threshold"] = None
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
    return libc
