"""Which library format a ``bits`` value means, for the methods that quantise to a library's own formats.

The one table of it (``FORMATS``), read by the configs, the variant labels, the grid and the report;
torch-free, so the report can read it too.

| method | bits -> type (``bits=``)             | every type (``method.type=``), nominal bits      |
|--------|--------------------------------------|--------------------------------------------------|
| bnb    | 4 -> nf4, 8 -> int8                  | nf4 4, fp4 4, int8 8                             |
| gguf   | 8 -> Q8_0, 6 -> Q6_K, 5 -> Q5_1,     | Q8_0 8, Q5_1 5, Q5_0 5, Q4_1 4, Q4_0 4, MXFP4 4, |
|        | 4 -> Q4_1, 3 -> Q3_K, 2 -> Q2_K      | Q6_K 6, Q5_K 5, Q4_K 4, Q3_K 3, Q2_K 2           |
| hqq    | bits as given: 8, 4, 3, 2            | (no types)                                       |

The gguf k-quants (``_K``) are quantised by llama.cpp's own C code (``quanteval.methods.ggml``, set up once)
and fall back per tensor as llama.cpp does (``quanteval.methods.gguf``); their nominal bits are the
quantised width, their stored bits more (Q4_K 4.5, Q2_K 2.625).

A grid cell whose bits have no type (bnb at 3 bits) is skipped with a logged reason, never given
another type; a whole grid in which a method has no cell to run is refused in one line
(``quanteval.cli``). ``method.type=`` picks a type explicitly, and the variant then runs at that type's
nominal bits. ``group_size`` and ``sym`` don't apply to a typed format (its block layout is the
format's), so they are left out of its key and label: "gguf Q4_1", not "gguf w4 g64".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Formats:
    """A method's formats: the type each ``bits`` value means, and every type with its nominal bits."""

    by_bits: dict  # {bits: type}
    types: dict  # {type: nominal bits}
    note: str = ""  # why some widths have no type

    def supported(self) -> str:
        """One line: 'bits 4 -> nf4, 8 -> int8; method.type= nf4, fp4, int8'."""
        by_bits = ", ".join(f"{b} -> {t}" for b, t in sorted(self.by_bits.items(), reverse=True))
        return f"bits {by_bits}; method.type= {', '.join(self.types)}"


FORMATS: dict[str, Formats] = {
    "bnb": Formats({4: "nf4", 8: "int8"}, {"nf4": 4, "fp4": 4, "int8": 8},
                   note="bitsandbytes has 4-bit (nf4, fp4) and 8-bit (LLM.int8) weights only"),
    "gguf": Formats({8: "Q8_0", 6: "Q6_K", 5: "Q5_1", 4: "Q4_1", 3: "Q3_K", 2: "Q2_K"},
                    {"Q8_0": 8, "Q5_1": 5, "Q5_0": 5, "Q4_1": 4, "Q4_0": 4, "MXFP4": 4,
                     "Q6_K": 6, "Q5_K": 5, "Q4_K": 4, "Q3_K": 3, "Q2_K": 2},  # k-quants: llama.cpp's C code
                    note="llama.cpp has no 7-bit type"),
}

HQQ_BITS = (8, 4, 3, 2)  # hqq's packed widths that quanteval's bit range holds (hqq also has 1)


class NoFormat(ValueError):
    """A bit width or type a method has no format for; the message lists the supported ones."""


def resolve(method: str, bits: int, explicit: Optional[str]) -> tuple[str, int]:
    """The (type, nominal bits) a typed method runs at; raises ``NoFormat`` naming what it supports.

    >>> resolve("gguf", 4, None), resolve("gguf", 8, "Q4_0")
    (('Q4_1', 4), ('Q4_0', 4))
    >>> try:
    ...     resolve("bnb", 3, None)
    ... except NoFormat as e:
    ...     print(e)
    method=bnb has no 3-bit type (bits 8 -> int8, 4 -> nf4; method.type= nf4, fp4, int8): bitsandbytes has 4-bit (nf4, fp4) and 8-bit (LLM.int8) weights only
    """
    f = FORMATS[method]
    if explicit is not None:
        if explicit not in f.types:
            raise NoFormat(f"method.type={explicit!r}: method={method} has no such type ({f.supported()})")
        return explicit, f.types[explicit]
    if bits not in f.by_bits:
        raise NoFormat(f"method={method} has no {bits}-bit type ({f.supported()}): {f.note}")
    return f.by_bits[bits], bits


# The report's families: columns are grouped and coloured by the library a method comes from.
FAMILIES: dict[str, str] = {
    "rtn": "quanteval", "gptq": "quanteval", "awq": "quanteval",
    "llmc-gptq": "llm-compressor", "llmc-rtn": "llm-compressor", "llmc-awq": "llm-compressor",
    "bnb": "bitsandbytes", "hqq": "hqq", "autoround": "auto-round", "gguf": "llama.cpp (gguf)",
    "artifact": "files (artifacts)",
    "kv": "quanteval",  # the KV cache alone (quanteval.kvcache), weights unquantised
}


def family(method: str) -> str:
    """The library family of a method label (``"none"`` is the baseline's own)."""
    return "baseline" if method == "none" else FAMILIES.get(method, "other")
