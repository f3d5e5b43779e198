"""Batched greedy generation with stop strings, for the generative tasks.

Written here rather than calling ``model.generate``: a finished sequence
leaves the batch at once (its rows are dropped from the KV cache), where
``generate`` keeps computing padding for it until the longest one ends. On a
CPU that is most of the cost of instruction-following and chat tasks, whose
answers range from a line to the token cap.

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
- prompts are sorted by length and left-padded, with position ids that
  skip the padding, so padding changes nothing but float rounding.

Text is decoded with ``skip_special_tokens=True``; bytes that are not valid
UTF-8 (a byte-level BPE model can emit half a character) come back as
U+FFFD, so every output is a valid ``str`` that can be stored and scored.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm


@dataclass
class Generation:
    text: str  # decoded continuation, cut before the first stop string
    n_tokens: int  # tokens generated (including the one that completed a stop string or EOS)
    finish: str  # "eos" | "stop" | "length"


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


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = (),
             batch_size: int = 16, add_special_tokens: bool = False, desc: str = "generate") -> list[Generation]:
    """Greedy continuations of ``prompts`` (in their order); see the module docstring."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: list[Generation | None] = [None] * len(prompts)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    cache_kw = _cache_kwarg(model)
    bar = tqdm(total=len(prompts), desc=desc, leave=False, unit="item")
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        for i, g in zip(idx, _generate_batch(model, tokenizer, [encoded[i] for i in idx], max_new_tokens,
                                             stop, eos, pad, device, cache_kw)):
            out[i] = g
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


def _generate_batch(model, tokenizer, seqs, max_new_tokens, stop, eos, pad, device, cache_kw):
    n, width = len(seqs), max(len(x) for x in seqs)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, x in enumerate(seqs):  # left padding
        ids[r, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[r, width - len(x):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    alive = list(range(n))  # original row of each row still in the batch
    new_tokens: list[list[int]] = [[] for _ in range(n)]
    results: list[Generation | None] = [None] * n
    next_pos = pos[:, -1:] + 1
    window = max((len(x) for x in stop), default=0) + 8  # tokens decoded to look for a stop string
    logits = out.logits[:, -1]
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # (alive,)
        keep = []
        for j, r in enumerate(alive):
            t = int(nxt[j])
            new_tokens[r].append(t)
            finish = None
            if t in eos:
                finish = "eos"
            elif stop and _cut(tokenizer.decode(new_tokens[r][-window:], skip_special_tokens=False), stop)[1]:
                finish = "stop"  # checked with special tokens kept: a stop string may be one (e.g. "<|im_end|>")
            elif step + 1 == max_new_tokens:
                finish = "length"
            if finish is None:
                keep.append(j)
            else:
                toks = new_tokens[r][:-1] if finish == "eos" else new_tokens[r]
                text, _ = _cut(tokenizer.decode(toks, skip_special_tokens=True), stop)
                results[r] = Generation(text, len(new_tokens[r]), finish)
        if not keep:
            break
        if len(keep) < len(alive):
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, next_pos, nxt = mask[sel], next_pos[sel], nxt[sel]
            alive = [alive[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                    logits_to_keep=1, **{cache_kw: cache})
        cache = getattr(out, "cache", None) or out.past_key_values
        next_pos = next_pos + 1
        logits = out.logits[:, -1]
    return results
