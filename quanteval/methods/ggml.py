"""llama.cpp's own quantisers (ggml's C code), called through ctypes: the k-quants that ``method=gguf`` needs.

No Python package quantises k-quants: the ``gguf`` package (llama.cpp's ``gguf-py``) ports only Q8_0,
Q5_x, Q4_x and MXFP4 to numpy, and reads (dequantises) the rest. So the k-quants (Q6_K ... Q2_K) and
IQ4_NL (llama.cpp's fallback for Q3_K and Q2_K) are made by ggml itself: ``ggml_quantize_chunk`` in
``libggml-base.so``, the very function ``llama-quantize`` calls per tensor (``src/llama-quant.cpp``),
with no importance matrix, as ``llama-quantize`` without ``--imatrix``.

The library is the prebuilt Linux x64 build that node-llama-cpp publishes on npm
(``@node-llama-cpp/linux-x64``, a plain C build of ggml-org/llama.cpp). ``setup()``, once, runs
``npm pack`` for the pinned version, checks the library's SHA-256 and copies it (its only needs are
libc, libm, libstdc++ and libgcc_s) into ``<quanteval cache>/ggml/<version>/``:

    python -m quanteval.methods.ggml --setup

``QUANTEVAL_GGML_LIB=/path/to/libggml-base.so`` uses a library of your own instead (your own llama.cpp
build, any platform); it must name the ggml types as the ``gguf`` package numbers them.

    >>> import numpy as np
    >>> quantize(np.zeros((2, 256), np.float32), "Q4_K").shape  # doctest: +SKIP
    (2, 144)
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

NPM_PACKAGE = "@node-llama-cpp/linux-x64"
NPM_VERSION = "3.22.1"  # the build this module was checked against: ggml 0.25.1, commit 0ad4a86
LIB_MEMBER = "package/bins/linux-x64/libggml-base.so"
LIB_SHA256 = "6c342c8aeb20cb31a18099d6f79de4de6703814d1cfd5c4d754a8643087e486e"  # of LIB_MEMBER in NPM_VERSION
EXTRA_MEMBERS = {"package/LICENSE": "LICENSE", "package/bins/linux-x64/_nlcBuildMetadata.json": "build.json"}
SETUP = "python -m quanteval.methods.ggml --setup"
ENV_LIB = "QUANTEVAL_GGML_LIB"

# The types quanteval asks ggml_quantize_chunk for. It aborts the whole process (GGML_ASSERT) on a type it
# does not quantise, a row that is not whole blocks, or a missing importance matrix, so quantize() checks
# all three first. The legacy types are here for the cross-check against the gguf package's numpy port.
TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "MXFP4", "IQ4_NL", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")


class GGMLError(RuntimeError):
    """ggml's library could not be set up or loaded; the message is one line."""


def lib_dir() -> Path:
    """Where ``setup()`` puts the library: ``<quanteval cache>/ggml/<npm version>/``."""
    from quanteval.models import cache_root

    return cache_root() / "ggml" / NPM_VERSION


def lib_path() -> Path:
    """The library ``library()`` loads: ``$QUANTEVAL_GGML_LIB``, else the one ``setup()`` made."""
    own = os.environ.get(ENV_LIB)
    return Path(own) if own else lib_dir() / "libggml-base.so"


def setup() -> Path:
    """Download the pinned prebuilt library with ``npm pack`` and keep it in ``lib_dir()``; once, idempotent.
    With ``$QUANTEVAL_GGML_LIB`` set, only check that library."""
    if os.environ.get(ENV_LIB):
        library()
        return lib_path()
    d = lib_dir()
    if (d / "ok").exists() and (d / "libggml-base.so").exists():
        return d / "libggml-base.so"  # set up already
    npm = shutil.which("npm")
    if npm is None:
        raise GGMLError(f"npm is not installed; {SETUP} downloads llama.cpp's prebuilt ggml library with it "
                        f"(install Node.js, or set {ENV_LIB}=/path/to/your/libggml-base.so)")
    spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
    d.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quanteval-ggml-", dir=d.parent) as tmp:
        tmp = Path(tmp)
        proc = subprocess.run([npm, "pack", spec, "--loglevel=error"], cwd=tmp, capture_output=True, text=True)
        tgz = sorted(tmp.glob("*.tgz"))
        if proc.returncode != 0 or not tgz:
            raise GGMLError(f"npm pack {spec} failed: {_npm_error(proc.stderr, proc.returncode)}")
        staged = tmp / "lib"
        staged.mkdir()
        with tarfile.open(tgz[0]) as tar:  # by name only: nothing else in the archive is written
            for member, name in {LIB_MEMBER: "libggml-base.so", **EXTRA_MEMBERS}.items():
                try:
                    (staged / name).write_bytes(tar.extractfile(member).read())
                except KeyError:
                    raise GGMLError(f"{spec}: the package holds no {member}") from None
        digest = hashlib.sha256((staged / "libggml-base.so").read_bytes()).hexdigest()
        if digest != LIB_SHA256:
            raise GGMLError(f"{spec}: libggml-base.so has SHA-256 {digest}, not the pinned {LIB_SHA256}")
        _check(ctypes.CDLL(str(staged / "libggml-base.so")), staged / "libggml-base.so")
        (staged / "ok").write_text(f"{spec} sha256={digest}\n")
        if (d / "ok").exists():
            return d / "libggml-base.so"  # another setup finished meanwhile
        if d.exists():
            shutil.rmtree(d)  # a half-made folder from an interrupted setup (no ok marker)
        staged.rename(d)
    return d / "libggml-base.so"


def _npm_error(stderr: str, returncode: int) -> str:
    """The line of npm's error output that says what went wrong (not its code, errno or log file)."""
    lines = [line.removeprefix("npm error").strip() for line in stderr.splitlines() if line.startswith("npm error")]
    said = [line for line in lines if not line.startswith(("code ", "syscall ", "errno ", "A complete log"))]
    return (said or stderr.strip().splitlines() or [f"exit code {returncode}"])[0]


def _declare(lib: ctypes.CDLL) -> None:
    """The C signatures used here (ggml.h)."""
    i64, size = ctypes.c_int64, ctypes.c_size_t
    sigs = {
        "ggml_quantize_chunk": (size, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, i64, i64, i64, ctypes.c_void_p]),
        "ggml_quantize_requires_imatrix": (ctypes.c_bool, [ctypes.c_int]),
        "ggml_row_size": (size, [ctypes.c_int, i64]),
        "ggml_blck_size": (i64, [ctypes.c_int]),
        "ggml_type_size": (size, [ctypes.c_int]),
        "ggml_type_name": (ctypes.c_char_p, [ctypes.c_int]),
        "ggml_get_type_traits": (ctypes.POINTER(_TypeTraits), [ctypes.c_int]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


class _TypeTraits(ctypes.Structure):
    """ggml.h ``struct ggml_type_traits`` (its leading fields; only ``to_float`` is called, in ``dequantize``)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


def _check(lib: ctypes.CDLL, path: Path) -> None:
    """The library names and sizes every type in ``TYPES`` as the gguf package numbers them, else GGMLError."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        _declare(lib)
    except AttributeError as e:
        raise GGMLError(f"{path} is not a ggml library with the quantisation API ({e})") from None
    for name in TYPES:
        t = GGMLQuantizationType[name]
        got = (lib.ggml_type_name(t) or b"").decode()
        sizes = (lib.ggml_blck_size(t), lib.ggml_type_size(t))
        if got.upper() != name or sizes != GGML_QUANT_SIZES[t]:
            raise GGMLError(f"{path}: ggml type {int(t)} is {got!r} {sizes}, not the gguf package's {name} "
                            f"{GGML_QUANT_SIZES[t]}; use a ggml of the same numbering")


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """ggml's library, loaded and checked once; GGMLError naming the setup command when it is not there."""
    path = lib_path()
    if os.environ.get(ENV_LIB):
        if not path.is_file():
            raise GGMLError(f"{ENV_LIB}={path}: no such file")
    elif not (lib_dir() / "ok").exists() or not path.is_file():
        raise GGMLError(f"llama.cpp's ggml library (for the k-quants) is not set up in {lib_dir()}; "
                        f"set it up once with: {SETUP}")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise GGMLError(f"{path} does not load: {e}") from None
    _check(lib, path)
    return lib


def missing() -> str | None:
    """One line saying why ``library()`` would fail (naming the setup command), else None."""
    try:
        library()
    except GGMLError as e:
        return str(e)
    return None


def version() -> str:
    """Which ggml quantised: 'ggml 0.25.1 (0ad4a86), @node-llama-cpp/linux-x64@3.22.1' (or the user's own path)."""
    lib = library()
    ver = "ggml"
    if hasattr(lib, "ggml_version") and hasattr(lib, "ggml_commit"):  # exported by recent ggml only
        lib.ggml_version.restype = lib.ggml_commit.restype = ctypes.c_char_p
        ver = f"ggml {lib.ggml_version().decode()} ({lib.ggml_commit().decode()})"
    source = f"{ENV_LIB}={lib_path()}" if os.environ.get(ENV_LIB) else f"{NPM_PACKAGE}@{NPM_VERSION}"
    return f"{ver}, {source}"


def _type(lib: ctypes.CDLL, type_name: str, cols: int) -> int:
    """The ggml type number of ``type_name``, after the checks that keep ggml from aborting the process."""
    from gguf import GGMLQuantizationType

    if type_name not in TYPES:
        raise ValueError(f"ggml {type_name}: quanteval quantises only {', '.join(TYPES)} with ggml")
    t = int(GGMLQuantizationType[type_name])
    if lib.ggml_quantize_requires_imatrix(t):
        raise ValueError(f"ggml {type_name}: needs an importance matrix, which quanteval does not make")
    block = lib.ggml_blck_size(t)
    if cols % block:
        raise ValueError(f"ggml {type_name}: a row of {cols} weights is not a whole number of {block}-weight blocks")
    return t


def quantize(w: np.ndarray, type_name: str) -> np.ndarray:
    """``w`` (rows, cols) quantised row by row by ggml's ``ggml_quantize_chunk`` (no importance matrix):
    the bytes llama.cpp writes for the tensor, as uint8 (rows, bytes per row)."""
    lib = library()
    rows, cols = w.shape
    t = _type(lib, type_name, cols)
    src = np.ascontiguousarray(w, dtype=np.float32)  # (rows, cols)
    dst = np.empty((rows, lib.ggml_row_size(t, cols)), dtype=np.uint8)  # (rows, row bytes)
    written = lib.ggml_quantize_chunk(t, src.ctypes.data, dst.ctypes.data, 0, rows, cols, None)
    if written != dst.nbytes:
        raise GGMLError(f"ggml_quantize_chunk({type_name}) wrote {written} bytes, not {dst.nbytes}")
    return dst


def dequantize(data: np.ndarray, type_name: str, cols: int) -> np.ndarray:
    """ggml's own dequantisation (its type's ``to_float``) of ``quantize``'s bytes: float32 (rows, cols).

    ``method=gguf`` reads k-quants with the gguf package; this is the C reference its tests compare to."""
    lib = library()
    t = _type(lib, type_name, cols)
    traits = lib.ggml_get_type_traits(t).contents
    if (traits.type_name, traits.type_size) != (lib.ggml_type_name(t), lib.ggml_type_size(t)):
        raise GGMLError("ggml_get_type_traits: this ggml's struct ggml_type_traits is laid out differently")
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(traits.to_float)
    src = np.ascontiguousarray(data, dtype=np.uint8)  # (rows, row bytes)
    out = np.empty((src.shape[0], cols), dtype=np.float32)  # (rows, cols)
    to_float(src.ctypes.data, out.ctypes.data, out.size)
    return out


if __name__ == "__main__":  # python -m quanteval.methods.ggml --setup
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if sys.argv[1:] != ["--setup"]:
        sys.exit(f"usage: {SETUP}")
    try:
        path = setup()
        library.cache_clear()
        log.info("llama.cpp's ggml library is ready: %s (%s)", path, version())
    except GGMLError as e:
        sys.exit(f"quanteval: error: {e}")
