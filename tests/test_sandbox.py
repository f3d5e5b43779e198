"""Hostile code is contained, recorded as a failure with a reason, and the harness keeps running."""

from __future__ import annotations

import ast
import logging
import os
import shutil
import socket
import tempfile

import pytest

import quanteval.sandbox as sb
from quanteval.sandbox import SandboxUnavailable, bwrap_path, process_limit_enforced, run_python

pytestmark = pytest.mark.skipif(bwrap_path() is None, reason="bubblewrap not installed (.ci/run installs it)")


def test_plain_code_passes():
    out = run_python("print(6 * 7)")
    assert out.ok and out.reason == "passed" and out.stdout_tail == "42\n"


FORK_BOMB = "import os\nwhile True:\n    os.fork()\n"
# Forks children that sleep (so they all stay alive) until fork fails, and says how many it made.
COUNTED_FORKS = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
                 "            time.sleep(30)\n            os._exit(0)\n        n += 1\n"
                 "except BlockingIOError:\n    print('forks', n, flush=True)\n    raise\n")


@pytest.mark.skipif(not process_limit_enforced(), reason="process limit not enforced here (see test below)")
def test_fork_bomb_stopped_by_process_limit():
    out = run_python(FORK_BOMB, timeout_s=10)
    assert not out.ok and out.reason.startswith("error:") and "BlockingIOError" in out.stdout_tail, out
    assert out.wall_s < 5  # the limit stopped it, not the timeout
    out = run_python(COUNTED_FORKS, timeout_s=10, nproc=16)
    assert out.reason == "error: BlockingIOError: [Errno 11] Resource temporarily unavailable", out
    assert out.stdout_tail.startswith("forks 14\n") and out.wall_s < 5  # 16 = bwrap's init + the program + 14
    assert run_python("print('next run works')").ok


@pytest.mark.skipif(process_limit_enforced(), reason="process limit enforced here (see test above)")
def test_fork_bomb_stopped_by_timeout():
    out = run_python(FORK_BOMB, timeout_s=5)
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


@pytest.mark.skipif(not os.path.isdir("/var/tmp"), reason="no /var/tmp")
def test_files_outside_tmp_are_read_only():
    # /var/tmp is not under the sandbox's own /tmp, so the code sees the host's files: read-only,
    # even a world-writable file in a world-writable directory; once bwrap runs as uid 65534,
    # a root-only file is unreadable too.
    d = tempfile.mkdtemp(dir="/var/tmp")
    try:
        os.chmod(d, 0o777)
        shared, private = os.path.join(d, "shared.txt"), os.path.join(d, "private.txt")
        for path, mode in ((shared, 0o666), (private, 0o600)):
            with open(path, "w") as f:
                f.write("alive")
            os.chmod(path, mode)
        read_only = "OSError: [Errno 30] Read-only file system"
        attempts = [(f"open({shared!r}, 'a').write('x')", read_only), (f"os.remove({shared!r})", read_only),
                    (f"open({os.path.join(d, 'new.txt')!r}, 'w')", read_only)]
        if os.geteuid() == 0 and process_limit_enforced():  # bwrap as root maps the code onto root, the owner
            attempts.append((f"print(open({private!r}).read())", "PermissionError"))
        for code, error in attempts:
            out = run_python("import os\n" + code + "\n")
            assert not out.ok and out.reason.startswith("error: " + error), (code, out)
        assert sorted(os.listdir(d)) == ["private.txt", "shared.txt"]
        assert all(open(path).read() == "alive" for path in (shared, private))
    finally:
        shutil.rmtree(d)


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


def test_prelude_is_python_38():
    ast.parse(sb._PRELUDE, feature_version=(3, 8))


def test_runnable_by_anyone(tmp_path):
    assert sb.runnable_by_anyone(str(tmp_path / "missing")) is None
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o754)  # not world-executable
    assert sb.runnable_by_anyone(str(script)) is None
    script.chmod(0o755)
    tmp_path.chmod(0o700)  # a directory above it others cannot search, like /root
    assert sb.runnable_by_anyone(str(script)) is None
    tmp_path.chmod(0o755)
    expected = str(script) if all(os.stat(p).st_mode & 0o1 for p in script.parents) else None
    assert sb.runnable_by_anyone(str(script)) == expected
    python = sb.nobody_python()
    assert python is None or sb.runnable_by_anyone(python) == python


@pytest.fixture
def fresh_launch():
    sb._launch.cache_clear()
    yield
    sb._launch.cache_clear()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root drops privileges before bwrap")
def test_root_drops_to_nobody_before_bwrap(fresh_launch):
    if sb.setpriv_path() is None or sb.nobody_python() is None:
        pytest.skip("no setpriv or no interpreter uid 65534 can exec")
    cmd = sb._command(1024, 2, 16, 16, unsafe=False)
    assert cmd[:4] == [sb.setpriv_path(), "--reuid=65534", "--regid=65534", "--clear-groups"]
    assert cmd[4] == bwrap_path() and sb.nobody_python() in cmd and process_limit_enforced()


@pytest.mark.parametrize("missing", ["setpriv_path", "nobody_python"])
def test_without_setpriv_or_reachable_python_warns_and_still_sandboxes(missing, fresh_launch, monkeypatch, caplog):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(sb, missing, lambda: None)
    with caplog.at_level(logging.WARNING, logger="quanteval.sandbox"):
        assert not process_limit_enforced()
        assert run_python("print(6 * 7)").stdout_tail == "42\n"
        assert run_python("print(7 * 7)").ok
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "only by the wall-clock timeout" in warnings[0]  # logged once
    assert sb._command(1024, 2, 16, 16, unsafe=False)[:2] == [bwrap_path(), "--unshare-all"]
