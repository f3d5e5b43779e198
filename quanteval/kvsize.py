"""The KV cache's settings and size, without torch (the report reads these too).

``KVSpec`` is one variant's cache quantisation: ``bits`` in ``KV_BITS`` (16 = not quantised), the group
size and the method (asymmetric RTN, KIVI-style; ``quanteval.kvcache`` applies it).

Bytes are those of a *packed* cache as a serving stack stores it, whatever the dtype quanteval computes in:

- 16 bits: 2 bytes per element (fp16/bf16 keys and values);
- b bits: ``b`` bits per element plus, per group of ``group_size`` elements, an fp16 scale and an fp16
  minimum (32 bits), for keys (a group spans tokens of one channel) and values (a group spans one
  token's head dimension);
- the key residual: the newest ``context % group_size`` tokens' keys are not quantised yet (their
  channel groups are not full) and count 16 bits per element.

>>> spec = KVSpec(bits=4, group_size=32)
>>> kv_bytes(5760, spec, 4096) == 4096 * bytes_per_token(5760, spec)  # 4096 = 128 full groups
True
>>> bytes_per_token(5760, KVSpec())  # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims, keys and values
23040
"""

from __future__ import annotations

from dataclasses import dataclass

KV_BITS = (16, 8, 4, 2)
KV_METHODS = ("rtn",)
GROUP_OVERHEAD_BITS = 32  # an fp16 scale and an fp16 minimum per group
DEFAULT_CONTEXT = 4096  # the context the report sizes a variant at when the sweep has no long task


@dataclass(frozen=True)
class KVSpec:
    """A KV cache quantisation: ``bits`` per element (16: none), ``group_size`` elements per scale."""

    bits: int = 16
    group_size: int = 32  # tokens per key group (one channel); head-dim elements per value group
    method: str = "rtn"  # asymmetric round-to-nearest over each group's min..max (KIVI)

    def __post_init__(self) -> None:
        if self.bits not in KV_BITS:
            raise ValueError(f"kv_bits={self.bits!r}: must be one of {', '.join(map(str, KV_BITS))} "
                             f"(16 = the cache is not quantised)")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 2:
            raise ValueError(f"kv_group_size={self.group_size!r}: must be an integer >= 2")
        if self.method not in KV_METHODS:
            raise ValueError(f"kv_method={self.method!r}: must be one of {', '.join(KV_METHODS)}")

    @property
    def quantizes(self) -> bool:
        return self.bits != 16

    def settings(self) -> dict:
        """What a run's key hashes (only when the cache is quantised: kv_bits=16 keys stay as they were)."""
        return {"bits": self.bits, "group_size": self.group_size, "method": self.method}

    @property
    def label(self) -> str:
        """``kv4`` (``kv4 g16`` for a group size other than the default)."""
        return f"kv{self.bits}" + ("" if self.group_size == KVSpec.group_size else f" g{self.group_size}")


def bytes_per_token(elements: int, spec: KVSpec) -> float:
    """Bytes one token's keys and values take once their groups are full; ``elements`` is the number of
    key elements per token (layers x KV heads x head dim), the same again for values."""
    if not spec.quantizes:
        return elements * 2 * 2
    per_element = spec.bits + GROUP_OVERHEAD_BITS / spec.group_size
    return 2 * elements * per_element / 8


def residual_tokens(spec: KVSpec, context: int) -> int:
    """Tokens whose keys are still in full precision at ``context`` (their channel groups are not full)."""
    return context % spec.group_size if spec.quantizes else 0


def kv_bytes(elements: int, spec: KVSpec, context: int) -> int:
    """The whole cache's bytes at ``context`` tokens, the key residual counted at 16 bits."""
    if not spec.quantizes:
        return int(context * bytes_per_token(elements, spec))
    r = residual_tokens(spec, context)
    keys_full = elements * (spec.bits + GROUP_OVERHEAD_BITS / spec.group_size) / 8
    values = context * keys_full  # values are quantised per token at once
    return int(values + (context - r) * keys_full + r * elements * 2)
