"""The allocator's setting (quanteval.allocator): with QUANTEVAL_MMAP_THRESHOLD, freed large blocks go back
to the system."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from quanteval import allocator

# glibc's default: after a 16 MB block is freed the mmap threshold rises to 16 MB, so 100 blocks of 2 MB
# come from the heap; a small heap block after each one keeps it from the heap's top, so freeing them
# keeps them resident. With the threshold fixed at 1 MB they are mmapped, and freeing them returns them.
PROBE = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[2])
from quanteval import allocator
if sys.argv[1] == "configure":  # QUANTEVAL_MMAP_THRESHOLD=1048576
    assert allocator.configure(allocator.threshold_from({allocator.SETTING: "1048576"})) == 1 << 20
elif sys.argv[1] == "off":  # unset: glibc's default
    assert allocator.configure(allocator.threshold_from({})) is None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)
before = rss()
blocks, pins = [], []
for _ in range(100):
    blocks.append(libc.malloc(2 << 20))
    ctypes.memset(blocks[-1], 1, 2 << 20)
    pins.append(libc.malloc(100 << 10))  # heap blocks between them (below either threshold)
    ctypes.memset(pins[-1], 1, 100 << 10)
for b in blocks:
    libc.free(b)
if sys.argv[1] == "trim":  # glibc's default, then trim(): the free pages go back (between a sweep's phases)
    assert allocator.trim()
print(rss() - before)
"""


def _kept_mb(mode: str) -> int:
    root = os.path.dirname(os.path.dirname(allocator.__file__))
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV}
    out = subprocess.run([sys.executable, "-c", PROBE, mode, root], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


@pytest.mark.skipif(allocator._glibc() is None, reason="not glibc: configure() leaves the allocator alone")
def test_freed_blocks_go_back_to_the_system_only_with_the_threshold_fixed():
    assert _kept_mb("default") >= 150  # glibc's default keeps the 200 MB freed
    assert _kept_mb("off") >= 150
    assert _kept_mb("configure") <= 30  # the 10 MB of small blocks stay


@pytest.mark.skipif(allocator._glibc() is None, reason="not glibc: trim() is a no-op")
def test_trim_returns_the_heaps_free_pages_under_glibcs_default():
    assert _kept_mb("trim") <= 30  # the 200 MB freed inside the heap (pinned by small blocks) go back


def test_the_setting_and_a_bad_value_in_one_line(monkeypatch):
    assert allocator.threshold_from({}) == 0  # off unless asked for: it trades time for memory
    assert allocator.threshold_from({allocator.SETTING: str(allocator.SUGGESTED)}) == 1 << 20
    assert allocator.threshold_from({allocator.SETTING: "65536"}) == 65536
    assert allocator.threshold_from({allocator.SETTING: "0"}) == 0
    for bad in ("1MB", "-1", str(2**31)):
        with pytest.raises(ValueError, match=f"QUANTEVAL_MMAP_THRESHOLD='{bad}': must be a number of bytes"):
            allocator.threshold_from({allocator.SETTING: bad})


def test_the_users_own_setting_is_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_DONE", {})
    monkeypatch.setenv(allocator.ENV, "65536")
    monkeypatch.setenv(allocator.SETTING, "1048576")
    assert allocator.configure() is None
    assert allocator.configure() is None  # once per process


def test_bad_threshold_fails_before_any_work(tmp_path):
    from conftest import run_cli

    proc = run_cli("preset=smoke", f"results_dir={tmp_path}", env={allocator.SETTING: "1MB"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "quanteval: error: QUANTEVAL_MMAP_THRESHOLD='1MB': must be a number of bytes from 0 (glibc's default) to 2147483647")
    assert not (tmp_path / "default").exists()
