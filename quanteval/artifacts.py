"""Files people already have, as variants: a GGUF file of any type, or a compressed-tensors checkpoint folder.

``method=artifact artifact=FILE`` evaluates a quantised file against its base (the usual ``model=``):
the same baseline, KL, flips, CIs and report as a variant quanteval quantises itself. This module
*identifies* a file, cheaply and before any heavy work; ``quanteval.methods.artifact`` reads its
tensors. No torch here: the CLI, ``Variant`` and ``plan=true`` call it for every job.

- **GGUF** (any type: the k-quants and i-quants too): read by the ``gguf`` package's ``GGUFReader``,
  with one check of quanteval's own first: every tensor's bytes lie inside the file, so a truncated
  download is named by its file and first cut tensor (the reader alone fails with a numpy reshape
  error). The type is the file's ``general.file_type`` (``Q4_K_M``), else its most common tensor type.
- **compressed-tensors** (what llm-compressor and ``quanteval-export`` write and vLLM serves): a folder
  with ``config.json`` whose ``quantization_config.quant_method`` is ``compressed-tensors`` and its
  ``*.safetensors`` weights. The type is its config groups' weight schemes (``int4 g64 asym``).
- **GPTQ / AWQ folders** (AutoGPTQ / AutoAWQ layouts) are refused in one line: transformers reads them
  only through gptqmodel / autoawq, which pull a CUDA build of torch (see the issue note).

An artifact's identity is its content: ``sha256`` of the file (or of the folder's files) is in the run
key, so a file replaced at the same path is a new variant, and a file is hashed once per process.

>>> Artifact("/x/m.gguf", "gguf", "m.gguf", "Q4_0", 4, "ab" * 32, 10).label
'm.gguf Q4_0'
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

GGUF_MAGIC = b"GGUF"
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")  # GGUF tensor types that are not quantised
READERS = {  # kind -> (import name, how to install it)
    "gguf": ("gguf", "pip install gguf (a dependency of quanteval: reinstall it)"),
    "compressed-tensors": ("compressed_tensors", "pip install 'quanteval[artifacts]'"),
}


class ArtifactError(ValueError):
    """A file that cannot be evaluated as an artifact; the message is one line naming it."""


@dataclass(frozen=True)
class Artifact:
    """A quantised file, identified: where, what kind, which type, and its content hash."""

    path: str  # resolved
    kind: str  # gguf | compressed-tensors
    name: str  # the file or folder name, as labels show it
    type: str  # "Q4_K_M", "Q8_0", "int4 g64 asym"
    nominal_bits: int  # the type's nominal width (Q4_K_M: 4), for bit-width colours and rows
    sha256: str
    bytes: int  # the file's size (a folder: its files')

    @property
    def label(self) -> str:
        return f"{self.name} {self.type}"

    def settings(self) -> dict:
        """What a run's key holds of it: its content, not only where it lies."""
        return {"kind": self.kind, "name": self.name, "type": self.type, "sha256": self.sha256, "bytes": self.bytes}


def inspect(path: str) -> Artifact:
    """Identify the artifact at ``path`` (ArtifactError, one line, when it is not one); once per file version."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ArtifactError(f"artifact={path}: no such file or folder")
    p = p.resolve()
    st = p.stat()
    return _inspect(str(p), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _inspect(path: str, size: int, mtime_ns: int) -> Artifact:
    p = Path(path)
    if p.is_dir():
        return _inspect_folder(p)
    with open(p, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ArtifactError(f"{p}: neither a GGUF file (it starts with {head!r}, not b'GGUF') nor a checkpoint folder")
    _need_reader("gguf", p)
    reader = gguf_reader(str(p), size, mtime_ns)
    type_name = _gguf_type(reader, gguf_tensor_types(reader))
    return Artifact(str(p), "gguf", p.name, type_name, _nominal(type_name), _sha256([p]), size)


def _need_reader(kind: str, p: Path) -> None:
    module, how = READERS[kind]
    if importlib.util.find_spec(module) is None:
        raise ArtifactError(f"{p}: reading a {kind} artifact needs the {module} package, which is not installed: {how}")


# --------------------------------------------------------------------------- GGUF


@lru_cache(maxsize=4)
def gguf_reader(path: str, size: int = 0, mtime_ns: int = 0):
    """The ``gguf`` package's reader of ``path``, after checking that every tensor lies inside the file
    (ArtifactError naming the file and the first cut tensor). ``size``/``mtime_ns`` key the cache."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class CheckedReader(GGUFReader):
        def _build_tensors(self, start_offs, fields):  # the package's own step, after quanteval's extent check
            end = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qtype = GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise ArtifactError(f"{path}: corrupt GGUF: tensor {name} has an unknown type id "
                                        f"{int(raw_dtype[0])}") from None
                block, type_size = GGML_QUANT_SIZES[qtype]
                n = 1
                for d in dims.tolist():
                    n *= int(d)
                n_bytes = n * type_size // block
                start = int(start_offs + offset[0])
                if start + n_bytes > end:
                    raise ArtifactError(f"{path}: truncated or corrupt GGUF: tensor {name} ({qtype.name}, "
                                        f"{n_bytes} bytes at offset {start}) runs past the end of the file "
                                        f"({end} bytes); download it again")
            return super()._build_tensors(start_offs, fields)

    try:
        return CheckedReader(path)
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - the reader's header errors: one line naming the file
        raise ArtifactError(f"{path}: truncated or corrupt GGUF header (before any tensor): "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def gguf_tensor_types(reader) -> Counter:
    """How many tensors of each type the file holds: ``{"Q4_1": 210, "F32": 61, "Q8_0": 1}``."""
    return Counter(t.tensor_type.name for t in reader.tensors)


def _gguf_type(reader, types: Counter) -> str:
    """The file's type: ``general.file_type`` as llama.cpp names it (``Q4_K_M``), else the most common
    quantised tensor type (else F16/F32)."""
    from gguf import LlamaFileType

    field = reader.fields.get("general.file_type")
    if field is not None:
        try:
            name = LlamaFileType(int(field.contents())).name
            if name != "GUESSED":
                return name.removeprefix("MOSTLY_")
        except (ValueError, TypeError):
            pass
    quantised = Counter({t: n for t, n in types.items() if t not in FLOAT_TYPES})
    return (quantised or types).most_common(1)[0][0]


def _nominal(type_name: str) -> int:
    """The nominal bits of a type name: its first number (``Q4_K_M`` 4, ``IQ2_XS`` 2), 16 for a float type.

    >>> _nominal("Q4_K_M"), _nominal("IQ2_XXS"), _nominal("MXFP4"), _nominal("F16"), _nominal("int8 channel sym")
    (4, 2, 4, 16, 8)
    """
    if type_name.upper() in FLOAT_TYPES or type_name.upper() in ("ALL_F32",):
        return 16
    m = re.search(r"(\d+)", type_name)
    return int(m.group(1)) if m else 16


# --------------------------------------------------------------------------- checkpoint folders


def _inspect_folder(p: Path) -> Artifact:
    conf = p / "config.json"
    if not conf.is_file():
        raise ArtifactError(f"{p}: a folder without config.json: neither a GGUF file nor a checkpoint folder")
    try:
        config = json.loads(conf.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{conf}: not readable JSON ({e})") from None
    qc = config.get("quantization_config") or config.get("compression_config")
    if not qc:
        raise ArtifactError(f"{p}: config.json has no quantization_config: a float checkpoint, not a quantised "
                            f"one; evaluate it as the model (model=hf model.name_or_path={p})")
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise ArtifactError(f"{p}: a {method} checkpoint (quantization_config.quant_method={method}); quanteval reads "
                            f"GGUF files and compressed-tensors folders (llm-compressor, quanteval-export, vLLM): "
                            f"transformers reads {method} folders only through gptqmodel / autoawq, which pull a "
                            f"CUDA build of torch")
    _need_reader("compressed-tensors", p)
    files = weight_files(p)
    scheme = ct_type(qc)
    extra = [f for f in sorted(p.iterdir()) if f.is_file() and f.suffix in (".json", ".model", ".txt", ".jinja")]
    return Artifact(str(p), "compressed-tensors", p.name, scheme, _nominal(scheme),
                    _sha256(files + extra), sum(f.stat().st_size for f in files + extra))


def weight_files(p: Path) -> list[Path]:
    """A checkpoint folder's safetensors files (the index's shards, each present), else ArtifactError."""
    index = p / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        for s in shards:
            if not (p / s).is_file():
                raise ArtifactError(f"{p}: the checkpoint's index names {s}, which is missing")
        return [p / s for s in shards]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ArtifactError(f"{p}: a checkpoint folder without weights (no *.safetensors file)")
    return files


def ct_type(qc: dict) -> str:
    """A compressed-tensors config's weight schemes in a few words: ``int4 g64 asym``, joined by ``+``.

    >>> ct_type({"config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int", "strategy": "group",
    ...                                                     "group_size": 64, "symmetric": False}}}})
    'int4 g64 asym'
    """
    words = []
    for group in (qc.get("config_groups") or {}).values():
        w = (group or {}).get("weights") or {}
        if not w:
            continue
        strategy = w.get("strategy") or "tensor"
        shape = f"g{w.get('group_size')}" if strategy == "group" else strategy
        word = f"{w.get('type', 'int')}{w.get('num_bits')} {shape} {'sym' if w.get('symmetric', True) else 'asym'}"
        if word not in words:
            words.append(word)
    return " + ".join(words) or qc.get("format", "compressed")


def _sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()
