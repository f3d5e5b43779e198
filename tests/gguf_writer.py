"""Write test GGUF files with the ``gguf`` package's own writer (``GGUFWriter``) and quantisers.

``requantize(src, out, "Q4_0")`` copies a GGUF file's metadata (config, tokenizer, chat template) and
writes its linears re-quantised to the type by ``gguf.quants.quantize``; norms are copied, and the
embedding is written in F32 holding the source's dequantised values exactly (so a file made from the
embedded SmolLM2 differs from its base only in its linears, like an RTN variant with embeddings in float).
The tensor names and llama.cpp's Q/K row order are the source file's, untouched.

    python tests/gguf_writer.py SRC.gguf OUT.gguf Q4_0
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def requantize(src: Path, out: Path, type_name: str, embedding: str = "F32", cut_after: int | None = None) -> Path:
    """``src`` re-quantised to ``type_name`` at ``out``; ``cut_after`` truncates the file to that many bytes
    (a broken download, for tests)."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, quants

    reader = GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    writer = GGUFWriter(str(out), arch)
    qtype = GGMLQuantizationType[type_name]
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(int(LlamaFileType[f"MOSTLY_{type_name}"]))
    for t in reader.tensors:
        if t.tensor_type.name in ("F32", "F16"):
            writer.add_tensor(t.name, np.asarray(t.data))
            continue
        w = quants.dequantize(t.data, t.tensor_type)  # (rows, cols) float32, in the file's own row order
        if t.name == "token_embd.weight" and embedding == "F32":
            writer.add_tensor(t.name, w.astype(np.float32))
            continue
        q = quants.quantize(w, qtype)
        writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if cut_after is not None:
        with open(out, "r+b") as f:
            f.truncate(cut_after)
    return out


if __name__ == "__main__":
    print(requantize(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]))
