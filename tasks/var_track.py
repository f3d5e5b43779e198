"""var_track: RULER's variable tracking (multi-hop), by the number of hops, at a fixed context length.

The items are made by lm-eval's own RULER generator (``lm_eval.tasks.ruler.vt_utils.generate_input_output``):
a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... of ``hops`` assignments hidden at random places in
RULER's repeated filler text, and the question "find all variables that are assigned the value 12345".
An item is right (``acc`` 1) when the answer names every variable of the chain; ``partial`` is the
share it names (RULER's ``string_match_all`` averages that). Accuracy grouped by ``hops`` shows whether
errors compound with the number of hops, as ``arith_chain`` does with steps.

Length is the prompt's token count with the model's chat template (``needle.prompt_tokens``), fitted by
the number of filler sentences; ``lengths`` as in ``needle`` (default ``[2048]`` on the CPU). Items depend
only on ``(seed, length, hops, i)`` and the tokenizer.
"""

from __future__ import annotations

import random

from quanteval_tasks.common import to_dataset
from quanteval_tasks.needle import check_lengths, check_window, fit, prompt_tokens


def check_options(options: dict, window: int | None, tok, data_dir: str | None, preset: str | None = None) -> None:
    """Lengths are positive integers within the model's window; hops are positive integers (ValueError)."""
    check_window(check_lengths(options.get("lengths", [2048])), window)
    for h in options.get("hops", [1, 2, 4]):
        if isinstance(h, bool) or not isinstance(h, int) or h <= 0:
            raise ValueError(f"task.options.hops: {h!r} is not a positive integer")


def _item(vt, tok, length: int, hops: int, seed: int) -> dict:
    import numpy as np

    def make(n_noise: int):
        state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)  # the generator draws names from random and values from numpy's global state
        np.random.seed(seed % 2**32)
        try:
            return vt.generate_input_output(n_noise, num_chains=1, num_hops=hops)
        finally:
            random.setstate(state)
            np.random.set_state(np_state)

    best = fit(make, tok, length, 1, length)  # filler sentences
    if best is None:
        best = (make(1), prompt_tokens(tok, make(1)[0]))
        if best[1] > length:
            raise ValueError(f"task var_track: length {length} leaves no room for {hops} hops")
    (text, answers), n = best
    return {"text": text, "answers": list(answers), "n_tokens": n}


def docs(data_dir=None, seed=0, lengths=(2048,), hops=(1, 2, 4), per_hops=3, tokenizer=None, window=None, preset=None,
         **_):
    """``per_hops`` items per number of hops at each length."""
    from quanteval.models import load_tokenizer

    from quanteval_tasks.ifeval import ensure_punkt

    if tokenizer is None:
        raise ValueError("task var_track: the tokenizer option is missing (quanteval passes the model's)")
    ensure_punkt()
    from lm_eval.tasks.ruler import vt_utils

    tok = load_tokenizer(str(tokenizer))
    out = []
    for length in check_lengths(lengths):
        for h in hops:
            for i in range(int(per_hops)):
                item = _item(vt_utils, tok, length, int(h), seed * 1_000_003 + length * 1009 + int(h) * 101 + i)
                out.append({"id": f"L{length}-h{h}-{i}", "length": length, "hops": int(h), **item})
    return out


def dataset(**kwargs):
    return to_dataset(docs(**kwargs))


def doc_to_text(doc: dict) -> str:
    return doc["text"]


def doc_to_target(doc: dict) -> str:
    return " ".join(doc["answers"])


def process_results(doc: dict, results: list[str]) -> dict:
    """``acc``: every variable of the chain named; ``partial``: the share named (RULER's string_match_all).

    >>> process_results({"answers": ["ABCDE", "FGHIJ"]}, ["ABCDE and FGHIJ"])
    {'acc': 1.0, 'partial': 1.0}
    >>> process_results({"answers": ["ABCDE", "FGHIJ"]}, ["ABCDE"])
    {'acc': 0.0, 'partial': 0.5}
    """
    answer = (results[0] if results else "").lower()
    found = [a.lower() in answer for a in doc["answers"]]
    return {"acc": float(all(found)), "partial": sum(found) / len(found)}
