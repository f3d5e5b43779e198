"""Calibration data and per-block input capture, shared by every method that needs data.

Data (``calibration.dataset``)
    ``mix`` (the default): WikiText-2 valid plus GSM8K *train* conversations
    (the question as the user turn, the reference solution without its
    calculator annotations as the assistant turn) in the model's own chat
    template (``Question: ... Answer: ...`` for ``model.prompt_format=plain``);
    ``chat_share`` of the ``n_samples`` sequences come from the chat text, the
    rest from WikiText-2, shuffled together (AWQ's search reads the first
    ones). Calibrating on encyclopaedic text alone overfits GPTQ to it: at 3
    bits it drifted further than RTN on chat-template text (FIELD_NOTES). The
    mix never holds an item a task evaluates (``leaked_item`` checks it before
    any work), and a report marks math tasks as calibrated in-domain.
    ``wikitext2``: the *validation* file ``wikitext2/valid.txt`` (never the
    test file the fidelity task scores); ``gsm8k``: ``gsm8k/train.jsonl``
    (question + answer); or a user's ``.jsonl`` (a ``text`` field per line)
    or ``.txt`` file given as ``calibration.path``. The text is tokenised
    once and windows of ``seq_len`` tokens are drawn at random offsets with
    ``seed`` (as the GPTQ reference samples its calibration set), without a
    BOS token, every position attended.

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
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from quanteval.data import data_file, read_jsonl_numbered

log = logging.getLogger(__name__)

BUILTIN = {"wikitext2": "wikitext2/valid.txt", "gsm8k": "gsm8k/train.jsonl"}
MIX = ("wikitext2", "gsm8k")  # dataset=mix: (plain text, chat-formatted conversations)
_CALC = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations


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


def _windows(ids: list[int], n: int, seq_len: int, rng: random.Random, what: object) -> list[list[int]]:
    if len(ids) <= seq_len:
        raise ValueError(f"{what}: {len(ids)} tokens, too short for calibration seq_len={seq_len}")
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(n)]
    return [ids[s : s + seq_len] for s in starts]


def calibration_ids(tokenizer, file: Path, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from ``file``: (n_samples, seq_len) int64."""
    if n_samples <= 0:
        raise ValueError(f"calibration n_samples={n_samples}: must be positive")
    ids = tokenizer(read_text(file), add_special_tokens=False)["input_ids"]
    return torch.tensor(_windows(ids, n_samples, seq_len, random.Random(seed), file), dtype=torch.long)


def chat_conversations(file: Path, tokenizer, prompt_format: str, seed: int, n_tokens: int) -> str:
    """GSM8K train rows as conversations in the model's chat template, shuffled, until about ``n_tokens``."""
    rows = [rec for _, rec in read_jsonl_numbered(file)]
    random.Random(seed).shuffle(rows)
    parts, total = [], 0
    for rec in rows:
        q, a = str(rec["question"]), _CALC.sub("", str(rec["answer"]))
        if prompt_format == "plain" or not getattr(tokenizer, "chat_template", None):
            text = f"Question: {q}\nAnswer: {a}\n\n"
        else:
            text = tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                                 tokenize=False)
        parts.append(text)
        total += len(text) // 3  # about 3-4 characters a token: enough text, not the whole file
        if total >= n_tokens:
            break
    return "".join(parts)


def mix_ids(tokenizer, data_root: Path, n_samples: int, seq_len: int, seed: int, chat_share: float,
            prompt_format: str) -> torch.Tensor:
    """The ``mix`` calibration set: (n_samples, seq_len) int64, ``chat_share`` of it chat-formatted GSM8K train."""
    if n_samples <= 0:
        raise ValueError(f"calibration n_samples={n_samples}: must be positive")
    n_chat = min(n_samples - 1, max(1, round(n_samples * chat_share))) if n_samples > 1 else 1
    n_text = n_samples - n_chat
    rng = random.Random(seed)
    text_file, chat_file = (data_file(data_root, BUILTIN[k]) for k in MIX)
    seqs = []
    if n_text:
        seqs += _windows(tokenizer(read_text(text_file), add_special_tokens=False)["input_ids"], n_text, seq_len,
                         rng, text_file)
    chat = chat_conversations(chat_file, tokenizer, prompt_format, seed, 4 * n_chat * seq_len)
    seqs += _windows(tokenizer(chat, add_special_tokens=False)["input_ids"], n_chat, seq_len, rng, chat_file)
    rng.shuffle(seqs)  # interleaved: methods that search on the first sequences (AWQ) see both kinds
    return torch.tensor(seqs, dtype=torch.long)


def calibration_token_ids(calib, tokenizer, data_root: Path | None, prompt_format: str) -> torch.Tensor:
    """The calibration token ids of a ``quanteval.variant.Calibration``: the one entry every method uses."""
    if calib.is_mix:
        if data_root is None:
            raise FileNotFoundError("data_dir: needed for calibration.dataset=mix")
        return mix_ids(tokenizer, data_root, calib.n_samples, calib.seq_len, calib.seed, calib.chat_share,
                       prompt_format)
    file = calibration_file(calib.dataset, calib.path, data_root)
    return calibration_ids(tokenizer, file, calib.n_samples, calib.seq_len, calib.seed)


def _norm(text: str) -> str:
    return " ".join(str(text).split()).lower()


@lru_cache(maxsize=8)
def _evaluated_texts(path: Path) -> dict[str, int]:
    """Every string field (of 20+ characters) of a task's data file, normalised -> its line."""
    out: dict[str, int] = {}
    for line, rec in read_jsonl_numbered(path):
        for v in (rec.values() if isinstance(rec, dict) else []):
            if isinstance(v, str) and len(v) >= 20:
                out.setdefault(_norm(v), line)
    return out


def leaked_item(calibration_file_: Path, task_files: dict[str, Path]) -> tuple[str, Path, int, int] | None:
    """(task, its data file, its line, the calibration line) of the first calibration record whose question
    or text is an item a task evaluates; None when the calibration set is disjoint from every task's data."""
    if calibration_file_.suffix != ".jsonl":
        return None
    for cline, rec in read_jsonl_numbered(calibration_file_):
        if not isinstance(rec, dict):
            continue
        texts = [_norm(rec[k]) for k in ("question", "text") if isinstance(rec.get(k), str)]
        for task, path in task_files.items():
            seen = _evaluated_texts(path)
            for t in texts:
                if t in seen:
                    return task, path, seen[t], cline
    return None


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
