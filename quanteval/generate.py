"""Batched greedy generation with stop strings, for the generative tasks.

Written here rather than calling ``model.generate`` (or lm-eval's HFLM, which
calls it) because three things ``generate`` does not do are most of the cost
of generation on a CPU (``benchmarks/b2_generation.py`` measures it):

- **finished sequences leave the batch at once** (their rows are dropped
  from the KV cache, in place: the last rows move into their places, ``_drop``),
  where ``generate`` computes padding for them until the longest one ends;
- **the batch is refilled**: when a quarter of the rows have finished, the
  next prompts are prefilled and merged into the running batch (continuous
  batching), so the batch stays full until the queue is empty;
- **the KV cache grows in place**: keys and values live in buffers with spare
  capacity (``_GrowingLayer``, ``GROW`` positions at a time), so a step writes one
  position instead of copying the whole cache (``DynamicCache`` appends with
  ``torch.cat``, which costs a fifth of a decode step at 300 tokens);
- **padding costs no memory on a CPU**: rows are left-padded to the widest, and a
  batch's cache was about 40% padding. Its buffers are zero pages mapped for them
  alone (``_zeros``), resident only once written, and a row is copied (growing,
  dropping rows, refilling) only from its first attended position (``_copy_live``):
  resident memory follows the tokens the rows hold, not rows x widest. Written here
  because neither transformers' caches nor torch's allocator can leave pages unwritten
  (``new_zeros`` writes every byte).

Semantics (those of lm-eval's ``HFLM.generate_until``, so scores match):

- greedy: the next token is the argmax of the logits;
- prompts are tokenised without added special tokens (a chat template
  already carries them) unless ``add_special_tokens=True``;
- a sequence ends at an end-of-sequence token (the model's
  ``generation_config.eos_token_id``, any of them, or the tokenizer's), at
  the token cap, or when one of ``stop`` appears in the text of its last
  tokens decoded *with* special tokens (so a stop string may be a special
  token such as ``<|im_end|>``); the returned text is decoded without special
  tokens and cut before the first stop string;
- requests that may decode the most steps go first (their token cap less their draft; then the
  longest prompt): a batch lasts as long as its last answer, and a long answer that joined late
  decoded at the tail nearly alone (longest-processing-time-first; measured below). Prompts are
  left-padded, with position ids that skip the padding; a merged row's cache is left-padded
  with zeros that the attention mask hides. Padding changes nothing but
  float rounding: ``tests/test_generate.py`` checks the tokens against
  unbatched ``model.generate`` and counts the steps where the top two logits
  were within 1e-4 (numerical ties, the only allowed difference).

``batch_size="auto"`` sizes the batch from the KV cache each row needs and the
memory free on the device (``auto_batch_size``); on a CPU a prefill then takes only the
prompts whose cache, left-padded with the batch's to the widest row, stays within the KV
budget (a row with a long prompt or draft pads every other row to its width). Running out of memory, on CUDA
(``OutOfMemoryError``) or on the CPU (the allocator's ``RuntimeError``, e.g. under
``RLIMIT_AS`` or a cgroup limit), halves the batch and goes on with the prompts not yet
finished: the answers already finished are kept, none is lost or computed twice. (A CPU
that overcommits memory is more often stopped by the kernel's OOM killer, which no process
can catch: hence the budget.) One prefill takes at most ``PREFILL_BUDGET`` rows x width² (one 8K prompt,
two 4K ones on a CPU), and each of its forward calls at most ``PREFILL_TOKENS`` padded tokens (its
activations are transient but count in the peak); the decode batch is refilled from the queue as before.

**Requests from several tasks in one batch.** ``generate_requests`` takes prompts that each
carry their own token cap and stop strings (``Request``), so all of a variant's generative
tasks can share one continuous batch: the batch stays full where one task's few prompts would
leave it at low occupancy (``quanteval.evaluate.generative.generate_together``).

Text is decoded with ``skip_special_tokens=True``; bytes that are not valid
UTF-8 (a byte-level BPE model can emit half a character) come back as
U+FFFD, so every output is a valid ``str`` that can be stored and scored.
"""

from __future__ import annotations

import errno
import inspect
import logging
import math
import mmap
import os
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from quanteval import allocator, hf_cache

log = logging.getLogger(__name__)

CPU_MAX_BATCH = 32  # a 2-core CPU gains little past this (tokens/s: bs 8 ~41, 16 ~66, 32 ~83 on SmolLM2)
CUDA_MAX_BATCH = 256
# one prefill call holds at most rows x width^2 <= this (left-padded rows, attention quadratic in width):
# 32 prompts of 1K tokens, but 2 of 4K and 1 of 8K (long-context tasks), which 8 left-padded 8K rows
# would take minutes and gigabytes for. Prompts of the short tasks (< 1K tokens) are never split by it.
PREFILL_BUDGET = {"cpu": 32 * 1024**2, "cuda": 256 * 2048**2}
PREFILL_SLACK = 1.25  # a prefill computes at most this many padded tokens per real one (length_groups)
# padded tokens one forward call of a prefill takes at most (rows x width; a longer prompt goes alone): its
# activations (the MLP's 3 x 1536 floats per token, ~20 kB/token for SmolLM2) are transient, but a refill
# at a full KV budget adds them to the cache. With 4K tokens the default sweep's peak was such a prefill
# (RTN w8's first rows, with their drafts): 1K took that batch from 1,900 to 1,709 MiB, and one variant
# alone from 1,829 to 1,796 MiB (README, B3); 1K tokens still keep 2 cores busy
PREFILL_TOKENS = {"cpu": 1024, "cuda": 256 * 2048}
CPU_KV_BUDGET = 512 << 20  # bytes of left-padded KV cache a CPU batch is sized for (auto_batch_size; see _zeros)
TIE = 1e-4  # a top-2 logit gap below this is a numerical tie: float rounding may pick either token
TRIM = 8  # a row drop re-lays the cache out when its kept rows share 1/TRIM of its columns as padding (_drop)
GROW = 64  # positions a row's KV buffer grows by when full (a copy every GROW steps, not one per step)


@dataclass
class Generation:
    """One continuation.

    >>> g = Generation("4", n_tokens=2, finish="eos", tokens=[19, 2])
    """

    text: str  # decoded continuation, cut before the first stop string
    n_tokens: int  # tokens generated (including the one that completed a stop string or EOS)
    finish: str  # "eos" | "stop" | "length"
    tokens: list[int] = field(default_factory=list, repr=False)  # the generated ids, n_tokens of them
    drafted: int = 0  # of those, taken from the request's draft (verified, not decoded one by one)
    draft_ties: int = 0  # draft tokens within TIE of the model's argmax but not it (numerical ties)


def _eos_ids(model, tokenizer) -> set[int]:
    """The generation config's end-of-sequence ids and the tokenizer's (HFLM stops on both)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    out = set() if ids is None else set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}
    if tokenizer.eos_token_id is not None:
        out.add(int(tokenizer.eos_token_id))
    return out


def _cut(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s]
    cuts = [c for c in cuts if c >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# ---------------------------------------------------------------- KV cache that grows in place

_cache_utils = hf_cache.load()  # transformers' cache module, without hqq's import cost
DynamicCache = getattr(_cache_utils, "DynamicCache", None)  # None: an older transformers, the model's own cache
DynamicLayer = getattr(_cache_utils, "DynamicLayer", None)


if DynamicLayer is not None:

    class _GrowingLayer(DynamicLayer):
        """A full-attention layer's keys/values as views ``[:, :, :n]`` of buffers with spare capacity."""

        def __init__(self, reserve: int):
            super().__init__()
            self.reserve = reserve  # positions allocated beyond the current length when the buffer grows
            self._k = self._v = None  # (B, H, capacity, D)
            self.slot = None  # (a _Stack, where): its first buffers are views of the stack's (``_Stack.cache``)
            self.starts = None  # each row's first attended position (``_mark``): a copy skips the padding before it

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.get_seq_length()
            m = n + key_states.shape[-2]
            if self._k is None or m > self._k.shape[-2]:
                self._reallocate(key_states, m + self.reserve, n)
            self._k[:, :, n:m] = key_states  # (B, H, new, D)
            self._v[:, :, n:m] = value_states
            self.keys, self.values = self._k[:, :, :m], self._v[:, :, :m]
            return self.keys, self.values

        def _reallocate(self, like: torch.Tensor, capacity: int, n: int) -> None:
            if self.slot is not None and not n:  # the first buffers: this layer's rows of a shared stack
                stack, where = self.slot
                self.slot = None
                k, v = stack.views(where, like)
                if k.shape[-2] >= capacity:
                    self._k, self._v = k, v
                    return
            b, h, _, d = like.shape
            k, v = _zeros((b, h, capacity, d), like), _zeros((b, h, capacity, d), like)
            if n:
                starts = self.starts if self.starts is not None and len(self.starts) == b else None
                _copy_live(k, 0, 0, self.keys, starts)
                _copy_live(v, 0, 0, self.values, starts)
            self._k, self._v = k, v

        def set(self, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
            """Adopt buffers ``k, v`` (B, H, capacity, D) whose first ``n`` positions are filled."""
            self._k, self._v = k, v
            self.keys, self.values = k[:, :, :n], v[:, :, :n]
            self.is_initialized = True

        def batch_select_indices(self, indices: torch.Tensor, lead: int = 0, starts=None) -> None:
            """Keep rows ``indices``, dropping the first ``lead`` positions (padding in every kept row).
            ``starts``: the kept rows' first attended positions (after ``lead``), where known: only those
            positions and the ones after them are copied (one copy, of the trimmed width only)."""
            n = self.get_seq_length()
            if self._k is None:
                return
            if starts is None:  # slice, then index: one copy, of the trimmed width only
                self.set(self._k[:, :, lead:][indices], self._v[:, :, lead:][indices], n - lead)
                return
            _, h, cap, d = self._k.shape
            k, v = _zeros((len(indices), h, cap - lead, d), self._k), _zeros((len(indices), h, cap - lead, d), self._k)
            rows = indices.tolist()
            _copy_live(k, 0, 0, self._k[:, :, lead:n], starts, rows)
            _copy_live(v, 0, 0, self._v[:, :, lead:n], starts, rows)
            self.set(k, v, n - lead)

        def move_rows(self, moves: list[tuple[int, int]], order: list[int]) -> None:
            """Keep ``b = len(order)`` rows, in place (``order``: each kept place's old row, as ``_drop``
            returns it): row ``src`` of each ``(src, dst)`` in ``moves`` is copied into row ``dst`` (a finished
            row's), from its first attended position; the rows at ``b`` and past it are no longer part of the
            cache, and their pages go back to the system (``_release_rows``). A moved row's positions before
            its first attended one are padding and must read as zeros, as everywhere (the attention mask hides
            them, and a zero cannot be NaN): what the finished row wrote there is zeroed."""
            n, rows = self.get_seq_length(), self._k.shape[0]
            known = self.starts is not None and len(self.starts) == rows  # else: whole rows are copied
            starts = self.starts if known else [0] * rows
            for src, dst in moves:
                s, d = starts[src], starts[dst]
                for buf in (self._k, self._v):
                    buf[dst, :, s:n] = buf[src, :, s:n]  # different rows: no overlap
                    if d < s:
                        buf[dst, :, d:s] = 0
            b = len(order)
            self.starts = [starts[i] for i in order] if known else None
            for buf in (self._k, self._v):
                _release_rows(buf, b, rows)
            self._k, self._v = self._k[:b], self._v[:b]
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

        def reset(self) -> None:
            self._k = self._v = None
            super().reset()


class _Stack:
    """Key/value buffers for the rows of several prefills (``rows`` in all), each group's rows right-aligned
    at the widest group's ``width``: a group's cache layers write straight into their rows' slice
    (``_GrowingLayer.slot``), so stacking the groups into one batch copies nothing and never holds the
    parts and the whole at once (``_merge`` would: about 0.35 GB more at the default sweep's first prefill).
    The buffers are zeroed: padding positions are masked, and must not be NaN."""

    def __init__(self, rows: int, width: int, reserve: int):
        self.rows, self.width, self.reserve = rows, width, reserve
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (rows, H, width + reserve, D)
        self.row0 = 0  # the next group's first row

    def cache(self, model, n: int, width: int):
        """The growing cache of the next group (``n`` rows, prompts up to ``width`` tokens)."""
        cache = _growing_cache(model, self.reserve)
        for i, layer in enumerate(cache.layers):
            layer.slot = (self, (i, self.row0, n, width))
        self.row0 += n
        return cache

    def views(self, where: tuple[int, int, int, int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s buffers for rows ``row0 : row0 + n``, from position ``self.width - width``."""
        index, row0, n, width = where
        if index not in self.buffers:
            _, h, _, d = like.shape
            shape = (self.rows, h, self.width + self.reserve, d)
            self.buffers[index] = _zeros(shape, like), _zeros(shape, like)
        k, v = self.buffers[index]
        return k[row0:row0 + n, :, self.width - width:], v[row0:row0 + n, :, self.width - width:]

    def adopt(self, cache) -> None:
        """Make ``cache`` (a group's) hold every row: its layers take the whole buffers."""
        for i, layer in enumerate(cache.layers):
            k, v = self.buffers[i]
            layer.set(k, v, self.width)
        self.buffers = {}


def _growing_cache(model, reserve: int):
    """A ``DynamicCache`` whose layers all grow in place, or None when the model has other layer kinds
    (sliding-window layers keep only a window, so rows of different lengths cannot be merged)."""
    if DynamicCache is None:
        return None
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - a transformers without config-aware caches
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [_GrowingLayer(reserve) for _ in cache.layers]
    return cache


def _lazy(t: torch.Tensor) -> bool:
    """Whether ``t`` lives where untouched pages cost no memory (a CPU; see ``_zeros``)."""
    return t.device.type == "cpu"


def _zeros(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Zeroed KV buffers of ``like``'s dtype and device. On a CPU, in an anonymous private mapping of their
    own: the kernel gives its pages zeroed and only when first written (a read of an unwritten page maps the
    shared zero page, which no process's resident set counts), and ``munmap`` returns them all when the
    tensor is freed. So the left padding of a batch's rows and a buffer's room to grow cost no memory until
    written, and a freed buffer leaves no hole in ``malloc``'s heap (a heap buffer is zeroed by writing it,
    and its freed blocks stay resident until reused or trimmed). An ``mmap`` that fails for want of memory
    raises ``MemoryError`` (as the allocator's failure would: the engine halves its batch)."""
    if not _lazy(like):
        return like.new_zeros(shape)
    size = math.prod(shape) * like.element_size()
    if not size:
        return like.new_zeros(shape)
    try:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise MemoryError(f"KV cache buffer of {size} bytes: {e}") from e
        raise
    t = torch.frombuffer(buf, dtype=like.dtype).view(shape)  # the tensor holds the mapping until freed
    addr = t.data_ptr()
    ref = weakref.ref(buf, lambda r, a=addr: _MAPPED.pop(a, None) if _MAPPED.get(a) is r else None)
    _MAPPED[addr] = ref
    return t


_MAPPED: dict[int, weakref.ref] = {}  # start address -> the mapping of a live buffer of _zeros


def _release_rows(t: torch.Tensor, b: int, end: int) -> None:
    """Hand rows ``b:end`` of ``t`` (a view of a ``_zeros`` buffer, rows outermost) back to the system: their
    whole pages are unmapped from the resident set (``MADV_DONTNEED``; they would read as zeros). Nothing
    happens for a buffer ``_zeros`` did not map, or where ``madvise`` is missing."""
    if end <= b or not t.is_contiguous() or not hasattr(mmap, "MADV_DONTNEED"):
        return
    base = t.untyped_storage().data_ptr()
    ref = _MAPPED.get(base)
    buf = ref() if ref is not None else None
    if buf is None:
        return
    row = t.stride(0) * t.element_size()
    lo = t.data_ptr() - base + b * row
    lo, hi = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE, (lo + (end - b) * row) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        buf.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _starts(mask: torch.Tensor) -> list[int] | None:
    """Each row's first attended position (the width of its left padding) where copies skip the padding (a
    CPU's lazily mapped buffers, ``_zeros``); None elsewhere (a copy takes every position)."""
    return mask.ne(0).int().argmax(1).tolist() if _lazy(mask) else None


def _mark(cache, starts: list[int] | None) -> None:
    """Tell ``cache``'s growing layers their rows' first attended positions (``_starts``), so that growing
    copies a row from there."""
    for layer in getattr(cache, "layers", ()):
        if isinstance(layer, _GrowingLayer):
            layer.starts = starts


def _copy_live(dst: torch.Tensor, row0: int, col0: int, src: torch.Tensor, starts=None, rows=None) -> None:
    """``dst[row0 + j, :, col0 + s_j : col0 + w] = src[rows[j], :, s_j:]`` for each ``j`` (``rows``: every row
    of ``src`` by default; w: its positions), ``s_j = starts[j]``: a row's positions before its first attended
    one are padding, masked, and left as ``dst`` has them (zeros, not written: see ``_zeros``). Runs of rows
    that follow each other in ``src`` with the same start are copied at once; without ``starts`` every
    position is."""
    rows = range(src.shape[0]) if rows is None else rows
    starts = [0] * len(rows) if starts is None else starts
    w = src.shape[2]
    j = 0
    while j < len(rows):
        e, s = j + 1, starts[j]
        while e < len(rows) and starts[e] == s and rows[e] == rows[e - 1] + 1:
            e += 1
        dst[row0 + j:row0 + e, :, col0 + s:col0 + w] = src[rows[j]:rows[e - 1] + 1, :, s:]
        j = e


def _drop(cache, keep: list[int], mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Keep rows ``keep`` (ascending indices) of ``cache`` and ``mask``: (the kept rows' mask, the old index of
    each kept row in its new place). In place where it can (a growing cache whose kept rows share fewer than
    ``1/TRIM`` of their columns as padding): the last kept rows move into the places of the finished ones
    before them, so a finished row costs a copy of at most as many rows as finished, where ``_select`` copied
    every kept row of every layer into new buffers (on 64 GSM8K prompts at batch 32, 45 drops took 8.7 s of
    136 s). Otherwise ``_select``, which also drops the leading columns that are padding in every kept row."""
    b = len(keep)
    growing = b and all(isinstance(la, _GrowingLayer) and la._k is not None for la in cache.layers)
    live = mask[keep].any(0).nonzero() if growing else None
    lead = int(live[0]) if live is not None and len(live) else 0
    if not growing or lead * TRIM >= mask.shape[1]:
        return _select(cache, torch.tensor(keep, device=mask.device, dtype=torch.long), mask), keep
    kept = set(keep)
    moves = list(zip([i for i in keep if i >= b], [j for j in range(b) if j not in kept]))  # (src, dst)
    order = list(range(b))
    for src, dst in moves:
        order[dst] = src
    for layer in cache.layers:
        layer.move_rows(moves, order)
    return mask[torch.tensor(order, device=mask.device, dtype=torch.long)], order


def _select(cache, indices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep rows ``indices`` of ``cache`` (in place) and of ``mask``; returns the kept rows' mask.

    The leading positions that are padding in every kept row are dropped too (a growing cache only): a
    row that joined the batch later was left-padded to the width of the oldest rows, and once those
    have finished, attending to (and keeping) that padding is wasted work and memory.
    """
    mask = mask[indices]  # (kept, width)
    if not isinstance(cache.layers[0], _GrowingLayer):  # sliding-window layers: rows only
        cache.batch_select_indices(indices)
        return mask
    live = mask.any(0).nonzero()
    lead = int(live[0]) if len(live) else 0  # leading all-padding columns
    mask = mask[:, lead:]
    starts = _starts(mask)
    for layer in cache.layers:
        layer.batch_select_indices(indices, lead, starts)
    _mark(cache, starts)
    return mask


def _merge(caches: list, masks: list[torch.Tensor], reserve: int) -> torch.Tensor:
    """Stack the rows of ``caches`` into the first one (in place), each left-padded to the widest;
    returns the stacked mask. One allocation per layer, however many parts; each row's positions before
    its first attended one (padding) are not copied (``_copy_live``)."""
    w = max(m.shape[1] for m in masks)
    starts = [_starts(m) for m in masks]
    for layers in zip(*(c.layers for c in caches)):
        k0 = layers[0].keys  # (B0, H, w0, D)
        shape = (sum(la.keys.shape[0] for la in layers), k0.shape[1], w + reserve, k0.shape[3])
        k, v = _zeros(shape, k0), _zeros(shape, k0)
        b = 0
        for la, s in zip(layers, starts):  # (Bi, H, wi, D) each, right-aligned at w
            n, wi = la.keys.shape[0], la.keys.shape[2]
            _copy_live(k, b, w - wi, la.keys, s)
            _copy_live(v, b, w - wi, la.values, s)
            b += n
            if la is not layers[0]:  # a part's layer, copied: freed now, not when the whole part is
                la._k = la._v = la.keys = la.values = None
        layers[0].set(k, v, w)
    # each part's rows are right-aligned at w: their starts move by w - (the part's width)
    _mark(caches[0], None if None in starts else [x + w - m.shape[1] for s, m in zip(starts, masks) for x in s])
    return _stack_masks(masks, w)


def _stack_masks(masks: list[torch.Tensor], w: int) -> torch.Tensor:
    """The rows of ``masks`` stacked, each left-padded with zeros to width ``w``."""
    return torch.cat([torch.cat([m.new_zeros(m.shape[0], w - m.shape[1]), m], dim=1) for m in masks], dim=0)


def length_groups(lengths: Sequence[int], slack: float = PREFILL_SLACK,
                  max_tokens: int | None = None) -> list[list[int]]:
    """Split prompts (indices into ``lengths``, longest first) into groups whose left-padded prefill
    computes at most ``slack`` x their real tokens: one padded prefill of prompts from 470 tokens down to
    60 spends most of its matmuls on padding (6.3K real tokens of the default sweep's 48 prompts cost
    22.6K padded ones). With ``max_tokens`` a group also holds at most that many padded tokens (rows x
    its widest), unless it is one prompt.

    >>> length_groups([400, 390, 120, 100, 30])
    [[0, 1], [2, 3], [4]]
    >>> length_groups([400, 390, 120, 100, 30], max_tokens=500)
    [[0], [1], [2, 3], [4]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        padded = (len(g) + 1) * lengths[g[0]] if g else 0  # the group's padded tokens with prompt i in it
        if (g and padded <= slack * (sum(lengths[j] for j in g) + lengths[i])
                and (max_tokens is None or padded <= max_tokens)):
            g.append(i)
        else:
            groups.append([i])
    return groups


# ---------------------------------------------------------------- batch size


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes, from the model's config."""
    from quanteval.kvcache import key_elements

    return 2 * key_elements(model) * next(model.parameters()).element_size()


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def auto_batch_size(model, n_prompts: int, max_len: int, free_bytes: int | None = None,
                    mean_len: int | None = None, kv_budget: int | None = None) -> int:
    """The batch the memory budget holds: each row needs its KV cache (``mean_len`` tokens on average,
    prompt + cap; ``max_len`` at most) plus a prefill's activations. The budget is half the free memory,
    and on a CPU at most ``kv_budget`` bytes of KV cache (default ``CPU_KV_BUDGET``; the sweep passes
    ``preset.gen_kv_budget_mb``). A full fp32 cache of 32 rows x 1K tokens is 1.5 GB for SmolLM2: the budget
    keeps a sweep's peak memory predictable. Capped at ``CPU_MAX_BATCH`` / ``CUDA_MAX_BATCH`` and at the
    number of prompts.

    >>> # a row of 1 000 tokens at 100 kB/token is 0.3 GB with the margins: 4 GB free holds 6
    """
    device = next(model.parameters()).device
    free = _free_bytes(device) if free_bytes is None else free_bytes
    hidden = model.config.get_text_config(decoder=True).hidden_size if hasattr(model.config, "get_text_config") \
        else model.config.hidden_size
    per_row = 2 * kv_bytes_per_token(model) * max_len + 16 * hidden * max_len * 4
    cap = CUDA_MAX_BATCH if device.type == "cuda" else CPU_MAX_BATCH
    rows = int(free * 0.5) // max(per_row, 1)
    if device.type != "cuda":
        budget = CPU_KV_BUDGET if kv_budget is None else kv_budget
        rows = min(rows, budget // max(kv_bytes_per_token(model) * (mean_len or max_len), 1))
    return max(1, min(cap, n_prompts, rows))


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class Request:
    """One prompt's generation: its token ids, cap and stop strings.

    >>> Request([1, 2, 3], max_new_tokens=64, stop=("\\n\\n",))
    Request(ids=[1, 2, 3], max_new_tokens=64, stop=('\\n\\n',), draft=())
    """

    ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    # tokens expected to be the model's own greedy continuation (e.g. the part of the baseline's answer a
    # teacher-forced pass of this model agreed with): prefilled with the prompt, verified against the
    # prefill's logits and taken as generated, so decoding starts after them (see _Engine._verify)
    draft: tuple[int, ...] = ()


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an allocator's out-of-memory error: CUDA's, or the CPU allocator's ``RuntimeError``
    ("DefaultCPUAllocator: can't allocate memory", raised when ``malloc`` fails, e.g. under ``RLIMIT_AS``)."""
    if isinstance(e, (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e).lower())


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = (),
             batch_size: int | str = "auto", add_special_tokens: bool = False,
             desc: str = "generate") -> list[Generation]:
    """Greedy continuations of ``prompts`` (in their order); see the module docstring.

    >>> gens = generate(model, tok, ["Q: 2+2?\\nA:"], max_new_tokens=8, stop=["\\n"])  # doctest: +SKIP
    >>> gens[0].text, gens[0].finish  # doctest: +SKIP
    (' 4', 'stop')
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    requests = [Request(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"], max_new_tokens, tuple(stop))
                for p in prompts]
    return generate_requests(model, tokenizer, requests, batch_size, desc)


@torch.no_grad()
def generate_requests(model, tokenizer, requests: Sequence[Request], batch_size: int | str = "auto",
                      desc: str = "generate", kv_budget: int | None = None) -> list[Generation]:
    """Greedy continuations of ``requests``, each with its own cap and stop strings (in their order).
    ``batch_size="auto"`` sizes the batch by ``auto_batch_size``, with ``kv_budget`` bytes of KV cache on
    a CPU."""
    if not requests:
        return []
    bad = next((r for r in requests if r.max_new_tokens < 1), None)
    if bad is not None:
        raise ValueError(f"max_new_tokens={bad.max_new_tokens}: must be >= 1")
    device = next(model.parameters()).device.type
    kv_cap = None  # bytes of padded KV cache a prefill may bring the batch to (a CPU's "auto" batch)
    if batch_size == "auto":
        lengths = [len(r.ids) + r.max_new_tokens for r in requests]
        bs = auto_batch_size(model, len(requests), max(lengths), mean_len=sum(lengths) // len(lengths),
                             kv_budget=kv_budget)
        if device != "cuda":  # as auto_batch_size's budget
            kv_cap = CPU_KV_BUDGET if kv_budget is None else kv_budget
    elif isinstance(batch_size, int) and batch_size >= 1:
        bs = batch_size
    else:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive integer or 'auto'")
    out: list[Generation | None] = [None] * len(requests)
    if device == "cpu":
        allocator.trim()  # what earlier work freed goes back to the system before the batch's cache grows
    bar = tqdm(total=len(requests), desc=desc, leave=False, unit="item")
    try:
        while True:
            pending = [i for i, g in enumerate(out) if g is None]
            if not pending:
                return out  # type: ignore[return-value]
            engine = _Engine(model, tokenizer, requests, pending, out, bs, bar, kv_cap)
            try:
                engine.run()
            except Exception as e:  # noqa: BLE001 - only the allocator's out-of-memory errors are retried
                if not is_oom(e) or bs == 1:
                    raise
                del engine  # its cache buffers
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                done = sum(g is not None for g in out)
                log.warning("generation ran out of memory at batch size %d (%s): going on at %d with the %d "
                            "prompt(s) not finished (%d finished are kept)", bs, str(e).splitlines()[0][:120],
                            bs // 2, len(out) - done, done)
                bs //= 2
    finally:
        bar.close()


class _Engine:
    """One pass over the pending requests: a queue, a running batch, refills (see the module docstring).
    Finished generations are written to ``out`` as they end, so an interrupted pass keeps them."""

    def __init__(self, model, tokenizer, requests, pending, out, batch_size, bar, kv_cap=None):
        self.model, self.tok, self.reqs = model, tokenizer, requests
        # the batch's padded KV cache (rows x widest row) a prefill may bring it to, in tokens: rows whose
        # prompts and drafts are much longer than the others' would otherwise pad every row to their width
        self.kv_cap = kv_cap // kv_bytes_per_token(model) if kv_cap else None
        self.bs, self.out, self.bar = batch_size, out, bar
        self.device = next(model.parameters()).device
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        self.prefill_budget, self.prefill_tokens = PREFILL_BUDGET[kind], PREFILL_TOKENS[kind]
        self.eos = _eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(self.eos) if self.eos else 0)
        self.cache_kw = _cache_kwarg(model)
        self.stackable = _growing_cache(model, 0) is not None  # rows can join a running batch (refills)
        self.reserve = min(GROW, max(requests[i].max_new_tokens for i in pending))  # cache positions grown at once
        # drafts: prefilled with their prompts, verified, and taken as generated (at least one token is decoded)
        self.drafts = {i: list(requests[i].draft[: requests[i].max_new_tokens - 1]) for i in pending
                       if requests[i].draft and requests[i].max_new_tokens > 1}
        self.queue = sorted(pending, key=self._order)  # the most decode steps first, then the longest prompt
        self.tokens: dict[int, list[int]] = {}  # tokens so far of each row in the batch
        self.ties: dict[int, int] = {}  # per request: draft tokens that only tie with the model's argmax
        # tokens decoded to look for a stop string, per request (decoding fewer is cheaper on every step)
        self.windows = {i: max((len(x) for x in requests[i].stop), default=0) + 8 for i in pending}

    def _ids(self, r: int) -> list[int]:
        """What row ``r``'s prefill reads: its prompt, then its draft (if it still has one)."""
        return self.reqs[r].ids + self.drafts.get(r, [])

    def _order(self, r: int) -> tuple[int, int]:
        """Queue order: the most decode steps request ``r`` may take first (its cap less its draft), then
        the longest prompt. A batch lasts as long as its longest answer; in prompt order IFEval's 512-token
        answers (short prompts) joined after DialogSum's long prompts and decoded at the tail nearly alone:
        the default sweep's baseline batch took 600 decode steps, 511 in this order, with 15% less
        attention (rows x cached width) and the same answers (``benchmarks/queue_order.py``)."""
        return -(self.reqs[r].max_new_tokens - len(self.drafts.get(r, ()))), -len(self._ids(r))

    def run(self) -> None:
        refill_at = max(1, self.bs // 4)  # free rows that trigger a refill (fewer refills, fuller prefills)
        rows: list[int] = []
        cache = mask = pos = logits = None
        while rows or self.queue:
            free = self.bs - len(rows)
            if self.queue and (not rows or (free >= refill_at and self.stackable)):
                taken = self._take(free, len(rows), mask.shape[1] if rows else 0)
                part = self._prefill(taken) if taken else None
                if part is not None and rows:
                    mask = _merge([cache, part[1]], [mask, part[2]], self.reserve)
                    rows, pos, logits = rows + part[0], torch.cat([pos, part[3]]), torch.cat([logits, part[4]])
                elif part is not None:
                    rows, cache, mask, pos, logits = part
                if not rows:  # every row taken ended inside its draft or fell back to the queue
                    continue
            nxt = logits.argmax(-1)  # (alive,)
            keep = []
            for j, r in enumerate(rows):
                self.tokens[r].append(int(nxt[j]))
                if not self._finished(r, self.tokens[r]):
                    keep.append(j)
            if len(keep) < len(rows):
                mask, keep = _drop(cache, keep, mask) if keep else (mask[:0], keep)
                sel = torch.tensor(keep, device=self.device, dtype=torch.long)
                rows, pos, nxt = [rows[j] for j in keep], pos[sel], nxt[sel]
            if rows:
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                                 logits_to_keep=1, **{self.cache_kw: cache})
                cache = getattr(out, "cache", None) or out.past_key_values
                pos = pos + 1
                logits = out.logits[:, -1]

    def _take(self, n: int, batch: int = 0, batch_width: int = 0) -> list[int]:
        """Up to ``n`` prompts from the head of the queue, in its order, as many as one prefill's budget
        holds (rows x the widest of them, squared), and as many as the KV budget (``kv_cap``) holds once
        they join the ``batch`` rows of ``batch_width`` positions (left-padded to the widest, plus
        ``reserve``): none when it holds no more, at least one when the batch is empty, and a prompt
        wider than the prefill's budget alone."""
        taken, width = [], 0
        for r in self.queue[:n]:
            w, k = max(width, len(self._ids(r))), len(taken) + 1
            if k > 1 and k * w * w > self.prefill_budget:
                break
            if (self.kv_cap is not None and (batch or taken)
                    and (batch + k) * (max(w, batch_width) + self.reserve) > self.kv_cap):
                break
            taken.append(r)
            width = w
        self.queue = self.queue[len(taken):]
        return taken

    def _prefill(self, rows: list[int]):
        """Prefill of ``rows``' prompts (and drafts): (rows, cache, mask, next positions, last logits), their
        caches left-padded to the longest, or None when no row is left to decode (each ended inside its
        draft, or its draft was refused and it went back to the queue). Prompts of very different lengths
        are prefilled in groups of similar length (``length_groups``), each straight into its rows of one
        set of buffers (``_Stack``), where the cache can be (a growing one)."""
        groups = length_groups([len(self._ids(r)) for r in rows], max_tokens=self.prefill_tokens) \
            if self.stackable else [range(len(rows))]
        groups = [[rows[i] for i in g] for g in groups]
        widths = [max(len(self._ids(r)) for r in g) for g in groups]
        stack = _Stack(len(rows), max(widths), self.reserve) if len(groups) > 1 else None
        parts = [self._prefill_group(g, stack.cache(self.model, len(g), w) if stack else None)
                 for g, w in zip(groups, widths)]
        rows = [r for g in groups for r in g]
        cache = parts[0][0]
        if stack is None:
            mask = parts[0][1]
        else:
            stack.adopt(cache)  # every row, in the first group's cache (the others' are views of it)
            mask = _stack_masks([p[1] for p in parts], stack.width)
        pos, logits = torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])
        drop, b = [], 0
        for g, p in zip(groups, parts):
            drop += [b + i for i in p[4]]
            b += len(g)
        del parts, stack  # the groups' caches: views of the adopted buffers
        _mark(cache, _starts(mask))
        if drop:
            dropped = set(drop)
            keep = [i for i in range(len(rows)) if i not in dropped]
            if not keep:
                return None
            mask, keep = _drop(cache, keep, mask)
            sel = torch.tensor(keep, device=self.device, dtype=torch.long)
            rows, pos, logits = [rows[i] for i in keep], pos[sel], logits[sel]
        return rows, cache, mask, pos, logits

    def _prefill_group(self, rows: list[int], cache=None):
        """One left-padded prefill of ``rows``' prompts and drafts, into ``cache`` (a new growing one by
        default): (cache, mask, next positions, last logits, the indices of the rows to drop: those
        that ended inside their draft, or whose draft was refused)."""
        seqs = [self._ids(r) for r in rows]
        n, width = len(seqs), max(len(x) for x in seqs)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, x in enumerate(seqs):  # left padding
            ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, width - len(x):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # (n, width): position ids that skip the padding
        if cache is None:
            cache = _growing_cache(self.model, self.reserve)
        kwargs = {self.cache_kw: cache} if cache is not None else {}
        drop: list[int] = []
        if any(r in self.drafts for r in rows):  # the hidden states of every position, to verify the drafts
            from quanteval.models import output_logits

            out = self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                           **kwargs)
            hidden = out.last_hidden_state  # (n, width, H)
            logits = output_logits(self.model, hidden[:, -1])  # (n, V), as the model's own head gives it
            drop = [i for i, r in enumerate(rows) if r in self.drafts and not self._verify(r, hidden[i])]
        else:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                             **kwargs)
            logits = out.logits[:, -1]
        cache = getattr(out, "cache", None) or out.past_key_values
        for i, r in enumerate(rows):
            draft = self.drafts.get(r, [])  # a refused draft was removed by _verify
            self.tokens[r] = []
            for t in draft:  # taken as generated, one at a time: a draft may end its request (a stop string)
                self.tokens[r].append(t)
                if self._finished(r, self.tokens[r]):
                    drop.append(i)
                    break
        return cache, mask, pos[:, -1:] + 1, logits, drop

    def _verify(self, r: int, hidden: torch.Tensor) -> bool:
        """Whether row ``r``'s draft is the model's own greedy continuation: at each draft position the
        draft token is the argmax of this prefill's logits, or within ``TIE`` of it (a numerical tie,
        counted). Otherwise the draft is dropped, the request goes back to the queue to be decoded plainly,
        and it is logged: a draft never puts a token the model would not choose into an answer.
        ``hidden``: (width, H), the row's prefill, its draft the last positions."""
        from quanteval.models import output_logits

        draft = torch.tensor(self.drafts[r], device=hidden.device)
        d = len(draft)
        h = hidden[-1 - d:-1]  # (d, H): the positions that predict draft[0], ..., draft[d - 1]
        ties = 0
        for s in range(0, d, 128):
            logits = output_logits(self.model, h[s:s + 128])  # (c, V)
            best = logits.max(-1).values
            gap = best - logits.gather(1, draft[s:s + 128, None])[:, 0]  # 0 where the draft token is the argmax
            if bool((gap >= TIE).any()):
                j = s + int((gap >= TIE).nonzero()[0])
                log.warning("a draft disagreed with the model at its token %d of %d (top logit %.4g above the "
                            "draft token's): that answer is decoded without it", j, d, float(gap[j - s]))
                self.drafts.pop(r)
                self.queue.append(r)
                return False
            ties += int((gap > 0).sum())
        self.ties[r] = ties
        return True

    def _finished(self, r: int, toks: list[int]) -> bool:
        """Record row ``r``'s generation if its last token ends it."""
        req = self.reqs[r]
        t, finish = toks[-1], None
        if t in self.eos:
            finish = "eos"
        elif req.stop and _cut(self.tok.decode(toks[-self.windows[r]:], skip_special_tokens=False), req.stop)[1]:
            finish = "stop"  # checked with special tokens kept: a stop string may be one (e.g. "<|im_end|>")
        elif len(toks) == req.max_new_tokens:
            finish = "length"
        if finish is None:
            return False
        kept = toks[:-1] if finish == "eos" else toks
        text, _ = _cut(self.tok.decode(kept, skip_special_tokens=True), req.stop)
        drafted = min(len(self.drafts.get(r, ())), len(toks))
        self.out[r] = Generation(text, len(toks), finish, list(toks), drafted, self.ties.pop(r, 0))
        self.tokens.pop(r, None)
        self.bar.update(1)
        return True
