"""Calibration data and per-block input capture, shared by every method that needs data.

Data (``calibration.dataset``)
    ``wikitext2``: the *validation* file ``wikitext2/valid.txt`` (never the
    test file the fidelity task scores); ``gsm8k``: ``gsm8k/train.jsonl``
    (question + answer); or a user's ``.jsonl`` (a ``text`` field per line)
    or ``.txt`` file given as ``calibration.path``. The text is tokenised
    once and ``n_samples`` windows of ``seq_len`` tokens are drawn at random
    offsets with ``seed`` (as the GPTQ reference samples its calibration
    set).

Capture
    ``capture_inputs`` runs the embeddings once with a hook that stops at the
    first decoder block, keeping that block's inputs, in chunks of
    ``batch_size`` sequences. The keyword arguments each block receives
    (attention masks, rotary embeddings: Gemma 3 gives sliding and global
    layers different ones) depend only on the input shape, so they are
    recorded once, per block, from a single full forward of one chunk.
    Methods then walk the model block by block (``block_forward``), so
    memory stays at about one block plus its activations.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from quanteval.data import data_file, read_jsonl_numbered

log = logging.getLogger(__name__)

BUILTIN = {"wikitext2": "wikitext2/valid.txt", "gsm8k": "gsm8k/train.jsonl"}


def read_text(path: Path) -> str:
    """The text of a .txt file, or of a .jsonl file's records (``text``, or question + answer)."""
    if path.suffix != ".jsonl":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"{path}: calibration file is empty")
        return text
    parts = []
    for i, rec in read_jsonl_numbered(path):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object with a 'text' field")
        if "text" in rec:
            parts.append(str(rec["text"]))
        elif "question" in rec and "answer" in rec:
            parts.append(f"{rec['question']}\n{rec['answer']}")
        else:
            raise ValueError(f"{path}:{i}: no 'text' (or 'question'/'answer') field")
    return "\n\n".join(parts)


def calibration_file(dataset: str, path: str | None, data_root: Path | None) -> Path:
    """Which file a calibration config reads (FileNotFoundError naming it when missing)."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"calibration.path={path}: no such file")
        return p
    if dataset not in BUILTIN:
        raise ValueError(f"calibration.dataset={dataset!r}: choose wikitext2, gsm8k, or set calibration.path")
    if data_root is None:
        raise FileNotFoundError("data_dir: needed for calibration.dataset=" + dataset)
    return data_file(data_root, BUILTIN[dataset])


def calibration_ids(tokenizer, file: Path, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from ``file``: (n_samples, seq_len) int64."""
    if n_samples <= 0:
        raise ValueError(f"calibration n_samples={n_samples}: must be positive")
    ids = tokenizer(read_text(file), add_special_tokens=False)["input_ids"]
    if len(ids) <= seq_len:
        raise ValueError(f"{file}: {len(ids)} tokens, too short for calibration seq_len={seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(n_samples)]
    return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.long)


@dataclass
class BlockInputs:
    """Inputs of the first decoder block, and the keyword arguments every block receives.

    ``hidden``: chunks of (batch, seq_len, hidden) on the model's device;
    ``kwargs[i]``: the keyword arguments block ``i`` is called with (shape-dependent only).
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict]

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


class _Stop(Exception):
    """Raised by a capture hook to stop a forward pass once what it needs is recorded."""


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


@torch.no_grad()
def capture_inputs(model, adapter, input_ids: torch.Tensor, batch_size: int = 8) -> BlockInputs:
    """Capture the first block's inputs for every calibration sequence (see module docstring)."""
    blocks = model.get_submodule(adapter.blocks)
    device = next(model.parameters()).device
    bs = _largest_divisor(input_ids.shape[0], batch_size)  # equal chunks: block kwargs are shape-dependent
    chunks = input_ids.split(bs)
    hidden: list[torch.Tensor] = []

    def grab_hidden(module, args, kwargs):
        hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab_hidden, with_kwargs=True)
    try:
        for chunk in chunks:
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()

    per_block: list[dict] = [{} for _ in blocks]

    def grab_kwargs(i):
        def hook(module, args, kwargs):
            per_block[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == len(blocks) - 1:
                raise _Stop  # the last block's kwargs are in: skip its work and the (batch, L, vocab) logits

        return hook

    handles = [b.register_forward_pre_hook(grab_kwargs(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model(input_ids=chunks[0].to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return BlockInputs(hidden=hidden, kwargs=per_block)


@torch.no_grad()
def block_forward(block, hidden: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """Run one decoder block over every chunk: the next block's inputs."""
    outs = []
    for h in hidden:
        out = block(h, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs
