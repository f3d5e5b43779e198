"""needle: RULER's needle-in-a-haystack retrieval on a WikiText-2 haystack, by context length and depth.

The items are made by lm-eval's own RULER generator (``lm_eval.tasks.ruler.prepare_niah.generate_input_output``,
with its ``niah_utils.TEMPLATE`` prompt), given a haystack of real text: the WikiText-2 test file read from
the data directory (never copied into this repository; lm-eval's own essay haystack is downloaded from the
hub, which is not reachable here). RULER's needle is "One of the special magic numbers for <key> is:
<7-digit number>."; ``keys`` alternates between one key (niah_single) and several keys of which one is
asked (niah_multikey). An item is scored 1 when every asked number appears in the answer (RULER's
``string_match_all``).

**Length** is the prompt's token count with the model's chat template applied (the tokenizer is the
model's: quanteval passes it as the ``tokenizer`` option). The haystack is the longest prefix of words
that keeps the prompt within ``length`` tokens; the item records the count it reached (``n_tokens``).
**Depth** is where the asked needle sits in the haystack, in percent, rounded to 10 (RULER places needles
at random depths from 0 to 100%, seeded here per item).

Items depend only on ``(seed, length, i)`` and the tokenizer, so raising ``per_length`` keeps the earlier
ones. The lengths are checked before any work (``check_options``): positive integers, within the model's
``max_position_embeddings``, and not longer than the haystack. ``lengths: auto`` (the default) is
1K, 2K, 4K and 8K tokens (the CPU set), plus 16K-128K under ``preset=full``, within the model's window.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from quanteval_tasks.common import to_dataset

HAYSTACK = "wikitext2/test.txt"  # relative to the data directory
CPU_LENGTHS = (1024, 2048, 4096, 8192)  # lengths: auto (the CPU set; preset=full adds LONG_LENGTHS)
LONG_LENGTHS = (16384, 32768, 65536, 131072)


def resolve_lengths(lengths, window: int | None = None, preset: str | None = None) -> list[int]:
    """``lengths`` as given, or for ``auto`` the CPU set (1K-8K) plus, with ``preset=full``, 16K-128K; auto
    keeps the lengths within the model's window.

    >>> resolve_lengths("auto", 8192, "full"), resolve_lengths("auto", 2048), resolve_lengths([300])
    ([1024, 2048, 4096, 8192], [1024, 2048], [300])
    """
    if lengths == "auto":
        chosen = CPU_LENGTHS + (LONG_LENGTHS if preset == "full" else ())
        return [n for n in chosen if window is None or n <= window] or [min(chosen)]
    return check_lengths(lengths)


def _ruler():
    """lm-eval's RULER generator and template (NLTK's Punkt data set up first: lm-eval would download it)."""
    from quanteval_tasks.ifeval import ensure_punkt

    ensure_punkt()
    from lm_eval.tasks.ruler import niah_utils, prepare_niah

    return prepare_niah, niah_utils.TEMPLATE


def check_lengths(lengths) -> list[int]:
    """``lengths`` as a list of positive integers (ValueError in one line naming the bad one).

    >>> check_lengths([1024, 2048])
    [1024, 2048]
    """
    if isinstance(lengths, (int, str)) or not hasattr(lengths, "__iter__"):
        lengths = [lengths]
    out = []
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"task.options.lengths: {n!r} is not a positive integer number of tokens")
        out.append(n)
    if not out:
        raise ValueError("task.options.lengths: empty")
    return out


def check_window(lengths: list[int], window: int | None) -> None:
    """ValueError naming the first length above the model's window (``max_position_embeddings``)."""
    over = [n for n in lengths if window and n > window]
    if over:
        raise ValueError(f"task.options.lengths: {over[0]} tokens is above the model's window "
                         f"(max_position_embeddings={window})")


@lru_cache(maxsize=2)
def haystack_words(data_dir: str | None) -> tuple[str, ...]:
    from quanteval.data import data_file, resolve_data_dir

    text = data_file(resolve_data_dir(data_dir), HAYSTACK).read_text(encoding="utf-8")
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))


def prompt_tokens(tok, text: str) -> int:
    """Tokens of ``text`` as the model sees it: in the chat template when it has one."""
    if getattr(tok, "chat_template", None):  # encoded as quanteval's runner encodes it: rendered, no added specials
        prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return len(tok(prompt, add_special_tokens=False)["input_ids"])
    return len(tok(text)["input_ids"])


def check_options(options: dict, window: int | None, tok, data_dir: str | None, preset: str | None = None) -> None:
    """Before any work: lengths are positive integers, within the model's window, and the haystack holds
    the longest (ValueError in one line)."""
    lengths = resolve_lengths(options.get("lengths", "auto"), window, preset)
    check_window(lengths, window)
    words = haystack_words(data_dir)
    have = len(tok(" ".join(words[: 2 * max(lengths)]))["input_ids"])
    if have < max(lengths):
        raise ValueError(f"task.options.lengths: the haystack ({HAYSTACK}, {have} tokens) is shorter than the "
                         f"longest length, {max(lengths)} tokens")


def fit(make, tok, length: int, lo: int, hi: int):
    """The item ``make(k)`` for the largest ``k`` in ``[lo, hi]`` whose prompt (``make(k)[0]``) fits in ``length``
    tokens, and its token count; None when none does (binary search: the prompt grows with ``k``)."""
    best = None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        item = make(mid)
        n = prompt_tokens(tok, item[0])
        if n <= length:
            lo, best = mid, (item, n)
        else:
            hi = mid - 1
    return best


def _item(prepare_niah, template, words, tok, length: int, n_keys: int, seed: int) -> dict:
    """One RULER item whose prompt is as long as fits in ``length`` tokens."""
    def make(n_words: int):
        state = random.getstate()
        random.seed(seed)  # the generator draws keys, values and depths from the global random module
        try:
            return prepare_niah.generate_input_output(
                n_words, list(words[:n_words]), type_haystack="essay", num_needle_k=n_keys,
                type_needle_k="words", num_needle_v=1, type_needle_v="numbers", template=template,
                num_needle_q=1, random_seed=seed)
        finally:
            random.setstate(state)

    best = fit(make, tok, length, 0, 2 * length)  # haystack words
    if best is None:
        raise ValueError(f"task needle: length {length} leaves no room for the question and its needles")
    (text, answers, query), n = best
    needle = text.find(answers[0])
    start = text.find("\n") + 1  # the context follows the template's first line
    end = text.rfind("\nWhat ")
    depth = int(round(10 * (needle - start) / max(end - start, 1))) * 10
    return {"text": text, "answers": list(answers), "query": query, "n_tokens": n,
            "depth": min(max(depth, 0), 100)}


def docs(data_dir=None, seed=0, lengths="auto", keys=(1, 4), per_length=4, tokenizer=None, window=None, preset=None,
         **_):
    """``per_length`` items at each length, alternating through ``keys`` (1: a single needle; k > 1: k
    needles, one asked)."""
    from quanteval.models import load_tokenizer

    if tokenizer is None:
        raise ValueError("task needle: the tokenizer option is missing (quanteval passes the model's)")
    lengths = resolve_lengths(lengths, window, preset)
    keys = [int(k) for k in (keys if hasattr(keys, "__iter__") else [keys])]
    tok = load_tokenizer(str(tokenizer))
    prepare_niah, template = _ruler()
    words = haystack_words(data_dir)
    out = []
    for length in lengths:
        for i in range(int(per_length)):
            n_keys = keys[i % len(keys)]
            item = _item(prepare_niah, template, words, tok, length, n_keys, seed * 1_000_003 + length * 1009 + i)
            out.append({"id": f"L{length}-{i}", "length": length, "keys": n_keys, **item})
    return out


def dataset(**kwargs):
    return to_dataset(docs(**kwargs))


def doc_to_text(doc: dict) -> str:
    return doc["text"]


def doc_to_target(doc: dict) -> str:
    return f"The special magic number for {doc['query']} mentioned in the provided text is {doc['answers'][0]}."


def process_results(doc: dict, results: list[str]) -> dict:
    """RULER's string_match_all: 1 when every asked number appears in the answer.

    >>> process_results({"answers": ["1234567"]}, ["It is 1234567."]), process_results({"answers": ["12"]}, ["no"])
    ({'acc': 1.0}, {'acc': 0.0})
    """
    answer = results[0] if results else ""
    return {"acc": float(all(a.lower() in answer.lower() for a in doc["answers"]))}
