"""Where evaluation and calibration data come from.

The data directory is, in order: the config key ``data_dir``, the
environment variable ``QUANTEVAL_DATA``, then ``../shared/data`` (relative to
the working directory, then to the repository) when present. Files are never
copied into the repository. When ``SHA256SUMS`` sits in the data directory,
a file is verified against it the first time it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def resolve_data_dir(data_dir: str | None) -> Path:
    """The data directory, or a one-line FileNotFoundError saying how to set it."""
    if data_dir:
        path = Path(data_dir).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"data_dir={data_dir}: no such directory")
        return path
    env = os.environ.get("QUANTEVAL_DATA")
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"QUANTEVAL_DATA={env}: no such directory")
        return path
    for cand in (Path.cwd() / ".." / "shared" / "data", REPO / ".." / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    raise FileNotFoundError(
        "data_dir: no data directory found; pass data_dir=/path/to/data or set QUANTEVAL_DATA"
    )


@lru_cache(maxsize=None)
def _checksums(root: Path) -> dict[str, str]:
    sums = root / "SHA256SUMS"
    if not sums.exists():
        return {}
    out = {}
    for line in sums.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.lstrip("*").strip()] = digest
    return out


@lru_cache(maxsize=None)
def data_file(root: Path, rel: str) -> Path:
    """``root/rel``, checked to exist and (when listed in SHA256SUMS) to match its checksum."""
    path = root / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found (data_dir={root})")
    expected = _checksums(root).get(rel)
    if expected:
        h = hashlib.sha256(path.read_bytes()).hexdigest()
        if h != expected:
            raise ValueError(f"{path}: checksum mismatch with {root / 'SHA256SUMS'} (damaged copy?)")
    return path


def read_jsonl_numbered(path: Path) -> list[tuple[int, object]]:
    """(line number, record) of each non-blank line; a malformed line raises ValueError naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: malformed JSON line ({e.msg})") from e
    if not rows:
        raise ValueError(f"{path}: empty dataset")
    return rows


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file (see ``read_jsonl_numbered`` for the errors)."""
    return [rec for _, rec in read_jsonl_numbered(path)]
