"""Hostile code is contained, recorded as a failure with a reason, and the harness keeps running."""

from __future__ import annotations

import os
import socket

import pytest

from quanteval.sandbox import SandboxUnavailable, bwrap_path, run_python

pytestmark = pytest.mark.skipif(bwrap_path() is None, reason="bubblewrap not installed (.ci/run installs it)")


def test_plain_code_passes():
    out = run_python("print(6 * 7)")
    assert out.ok and out.reason == "passed" and out.stdout_tail == "42\n"


def test_fork_bomb():
    out = run_python("import os\nwhile True:\n    os.fork()\n", timeout_s=5)
    assert not out.ok and out.reason in ("timeout", "cpu") and out.wall_s < 15
    assert run_python("print('next run works')").ok


def test_infinite_loop():
    out = run_python("while True:\n    pass\n", timeout_s=2)
    assert not out.ok and out.reason in ("timeout", "cpu") and out.wall_s < 10


def test_huge_allocation():
    out = run_python("x = bytearray(10 * 1024**3)\n")
    assert not out.ok and out.reason == "memory"


def test_canary_outside_is_untouched(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    out = run_python(f"import os\nos.remove({str(canary)!r})\n")
    assert not out.ok and out.reason.startswith("error:")
    assert canary.read_text() == "alive"


def test_big_file_write():
    # 1 GiB in 1 MiB chunks, so the file-size limit (not the memory limit) is what stops it;
    # Python ignores SIGXFSZ, so the write fails with EFBIG instead of a signal.
    code = "with open('big.bin', 'wb') as f:\n    for _ in range(1024):\n        f.write(b'0' * (1 << 20))\n"
    out = run_python(code)
    assert not out.ok and (out.reason == "file size" or "File too large" in out.reason)


def test_big_file_write_in_one_call():
    out = run_python("with open('big.bin', 'wb') as f:\n    f.write(b'0' * (1 << 30))\n")
    assert not out.ok and out.reason in ("file size", "memory")


def test_loopback_socket_unreachable():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        out = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
    finally:
        srv.close()
    assert not out.ok and out.reason.startswith("error:") and "connected" not in out.stdout_tail


def test_parent_environment_secret_not_visible(monkeypatch):
    monkeypatch.setenv("QUANTEVAL_TEST_SECRET", "hunter2")
    out = run_python("import os\nprint(os.environ['QUANTEVAL_TEST_SECRET'])\n")
    assert not out.ok and out.reason == "error: KeyError: 'QUANTEVAL_TEST_SECRET'"
    assert "hunter2" not in out.stdout_tail


def test_parent_environ_file_has_no_secret(monkeypatch):
    monkeypatch.setenv("QUANTEVAL_TEST_SECRET", "hunter2")
    code = ("import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read(), flush=True)\n"
            f"print(open('/proc/{os.getpid()}/environ', 'rb').read())\n")  # the harness's own pid
    out = run_python(code)
    assert not out.ok and out.reason.startswith("error:") and "hunter2" not in out.stdout_tail


def test_huge_stdout_is_capped():
    out = run_python("import sys\nsys.stdout.write('x' * (100 * 1024 * 1024))\n")
    assert not out.ok and out.reason == "output limit" and len(out.stdout_tail) <= 4096


def test_kill_parent_does_not_reach_harness():
    # getppid() and 1 are the sandbox's own init; the harness's pid does not exist in its namespace.
    code = ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n"
            f"os.kill({os.getpid()}, signal.SIGKILL)\nprint('after')")
    out = run_python(code)
    assert not out.ok and (out.reason.startswith("error: ProcessLookupError") or out.reason.startswith("killed"))
    assert "after" not in out.stdout_tail
    assert run_python("print('next run works')").ok  # and this process is still here


def test_fail_closed_without_bwrap(monkeypatch):
    import quanteval.sandbox as sb

    monkeypatch.setattr(sb, "bwrap_path", lambda: None)
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        sb.run_python("print(1)")
    assert sb.run_python("print(1)", unsafe=True).ok  # the explicit, labelled opt-out
