"""Language-model fidelity on WikiText-2: perplexity, and agreement with the baseline.

Windows
    The test file's text is tokenised once, without added special tokens, and
    cut into non-overlapping windows of ``seq_len`` tokens; the first
    ``n_windows`` are scored. In each window every position after the first is
    scored (``seq_len - 1`` predictions per window), so no window sees context
    from another.

Agreement with the baseline (as llama.cpp's ``--kl-divergence`` reports it)
    token KL(base || quant): mean, median, p90, p99, max; the rate at which the
    top token is the same; mean delta-p of the true next token
    (p_quant - p_base).

Baseline cache
    The baseline is run once per (model, windows, top_k) and stores, per
    position, its top-k log-probs, their token ids, the log of the remaining
    tail mass, and its log-prob of the true next token. Variants are then
    compared against that file without rerunning the baseline, and so is the
    baseline's own run (``compare_baseline``, ``sequence_compare_baseline``):
    compared with itself, its KL is 0 and its top token the same everywhere by
    definition, and its NLL is in the file, so a second pass over the same
    windows (as long as a variant's evaluation) would only repeat them.
    KL is computed over the k+1 buckets (top-k tokens + one tail bucket).
    Merging the tail into one bucket can only lower KL (log-sum inequality),
    so the reported KL is a lower bound on the full-vocabulary KL; with
    k = 64 the gap is small because the tail mass is small where it matters.

Memory
    One window at a time, and the (positions x vocab) log-softmax in chunks of
    ``CHUNK`` positions, so Gemma's 262k vocabulary fits. Past ``LONG`` tokens (the long-window task,
    ``task=wikitext2_long``) the logits themselves are made chunk by chunk from the hidden states.

Long windows
    With windows longer than 512 tokens, ``compare`` also reports KL, NLL and same-top-1 by position
    bucket (0-512, 512-1K, 1-2K, 2-4K, 4-8K, ...): whether quantisation error grows with distance into
    the context. Per-window bucket means are kept for paired CIs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)
CHUNK = 128  # positions per log-softmax chunk


def make_windows(tokenizer, text: str, n_windows: int, seq_len: int) -> torch.Tensor:
    """Non-overlapping token windows: (n_windows, seq_len) int64."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = n_windows * seq_len
    if len(ids) < need:
        raise ValueError(
            f"preset.n_windows x preset.seq_len = {need} tokens, but the text has only {len(ids)}"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(n_windows, seq_len)


@dataclass
class BaselineStats:
    """What the baseline leaves on disk; positions P = seq_len - 1 per window."""

    topk_logp: torch.Tensor  # (N, P, k) float32
    topk_idx: torch.Tensor  # (N, P, k) int32
    tail_logp: torch.Tensor  # (N, P) float32, log of 1 - sum(top-k probs)
    true_logp: torch.Tensor  # (N, P) float32

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        from quanteval.results import torch_save_atomic

        torch_save_atomic(path, self.__dict__)

    @classmethod
    def load(cls, path: Path) -> "BaselineStats":
        return cls(**torch.load(path, weights_only=True))


LONG = 2048  # windows longer than this get their logits chunk by chunk (_ChunkedLogits)
POSITION_EDGES = (0, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)  # by-position buckets


class _ChunkedLogits:
    """A long window's logits, made ``CHUNK`` positions at a time from the decoder's hidden states by the
    model's own output head: at 8K positions the full (P, V) float32 logits of SmolLM2 are 1.6 GB.
    Sliced like a tensor (``[s:e]``); ``shape[0]`` is P."""

    def __init__(self, model, window: torch.Tensor):
        device = next(model.parameters()).device
        out = model.get_decoder()(input_ids=window[None].to(device), use_cache=False)
        self.hidden = out.last_hidden_state[0, :-1]  # (P, H)
        self.model = model
        self.shape = (self.hidden.shape[0], model.get_output_embeddings().weight.shape[0])
        self.device = self.hidden.device

    def __getitem__(self, sl: slice) -> torch.Tensor:
        from quanteval.models import output_logits

        return output_logits(self.model, self.hidden[sl])


def _logits(model, window: torch.Tensor):
    """Logits predicting tokens 1..L-1 of one window: (P, V) float32 (chunked past ``LONG`` tokens)."""
    if window.shape[0] > LONG:
        return _ChunkedLogits(model, window)
    device = next(model.parameters()).device
    out = model(input_ids=window[None].to(device), use_cache=False)
    return out.logits[0, :-1].float()  # (P, V)


def position_buckets(n_positions: int) -> list[tuple[str, int, int]]:
    """The by-position buckets of a window of ``n_positions`` predictions: (label, start, end).

    >>> position_buckets(1023)
    [('0-512', 0, 512), ('512-1K', 512, 1023)]
    """
    def k(v: int) -> str:
        return f"{v // 1024}K" if v >= 1024 else str(v)

    out = []
    for lo, hi in zip(POSITION_EDGES, POSITION_EDGES[1:]):
        if lo >= n_positions:
            break
        out.append((f"{k(lo)}-{k(hi)}", lo, min(hi, n_positions)))
    return out


def _tail_logp(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``idx``: logp (P, V), idx (P, k) -> (P,)."""
    rest = logp.scatter(1, idx, float("-inf"))  # (P, V) with the top-k masked out
    return torch.logsumexp(rest, dim=1)


def _base_positions(logits: torch.Tensor, target: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """The baseline's top-k log-probs, their ids, tail mass and true-token log-prob at each position."""
    cols = {k: [] for k in ("topk_logp", "topk_idx", "tail_logp", "true_logp")}
    for s in range(0, logits.shape[0], CHUNK):
        logp = torch.log_softmax(logits[s : s + CHUNK], dim=-1)  # (c, V)
        vals, idx = logp.topk(top_k, dim=-1)  # (c, k)
        cols["topk_logp"].append(vals)
        cols["topk_idx"].append(idx.int())
        cols["tail_logp"].append(_tail_logp(logp, idx))
        cols["true_logp"].append(logp.gather(1, target[s : s + CHUNK, None])[:, 0])
    return {k: torch.cat(v).cpu() for k, v in cols.items()}


def _compare_positions(logits: torch.Tensor, target: torch.Tensor, base: dict[str, torch.Tensor]) -> dict:
    """Per position: KL(base || model) over the top-k + tail buckets, NLL, same top token, delta-p."""
    out = {k: [] for k in ("kl", "nll", "same", "dp")}
    for s in range(0, logits.shape[0], CHUNK):
        e = min(s + CHUNK, logits.shape[0])
        logq = torch.log_softmax(logits[s:e], dim=-1)  # (c, V)
        idx = base["topk_idx"][s:e].long().to(logq.device)  # (c, k)
        p_logp = base["topk_logp"][s:e].to(logq.device)  # (c, k)
        p_tail = base["tail_logp"][s:e].to(logq.device)  # (c,)
        q_logp = logq.gather(1, idx)  # (c, k)
        q_tail = _tail_logp(logq, idx)  # (c,)
        kl = (p_logp.exp() * (p_logp - q_logp)).sum(1) + p_tail.exp() * (p_tail - q_tail)
        out["kl"].append(kl.clamp(min=0).cpu())
        q_true = logq.gather(1, target[s:e, None])[:, 0]
        out["nll"].append(-q_true.cpu())
        out["same"].append((logq.argmax(1) == idx[:, 0]).cpu())
        out["dp"].append((q_true.exp() - base["true_logp"][s:e].to(q_true.device).exp()).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def baseline_stats(model, windows: torch.Tensor, top_k: int) -> BaselineStats:
    """Run the baseline over ``windows`` and keep its top-k + tail + true-token log-probs."""
    parts = {k: [] for k in ("topk_logp", "topk_idx", "tail_logp", "true_logp")}
    for w in tqdm(windows, desc="baseline windows", leave=False):
        logits = _logits(model, w)  # (P, V)
        cols = _base_positions(logits, w[1:].to(logits.device), top_k)
        for k in parts:
            parts[k].append(cols[k])
    return BaselineStats(**{k: torch.stack(v) for k, v in parts.items()})


@torch.no_grad()
def compare(model, windows: torch.Tensor, base: BaselineStats) -> dict:
    """Perplexity of ``model`` and its agreement with the baseline, per token and per window."""
    cols = []
    for n, w in enumerate(tqdm(windows, desc="eval windows", leave=False)):
        logits = _logits(model, w)  # (P, V)
        cols.append(_compare_positions(logits, w[1:].to(logits.device), {k: v[n] for k, v in base.__dict__.items()}))
    return _summary(cols, windows.shape[0], windows.shape[1] - 1)


def _self_positions(true_logp: torch.Tensor) -> dict[str, torch.Tensor]:
    """``_compare_positions`` of the baseline against its own statistics, without a second forward pass:
    the same logits give KL 0, the same top token and delta-p 0 at every position, and its NLL is minus
    the true token's log-prob it recorded (the same float values a second pass computes)."""
    return {"kl": torch.zeros_like(true_logp), "nll": -true_logp, "same": torch.ones_like(true_logp, dtype=torch.bool),
            "dp": torch.zeros_like(true_logp)}


def compare_baseline(base: BaselineStats) -> dict:
    """``compare`` of the baseline model itself, from the statistics its one pass recorded (``baseline_stats``):
    the same metrics as a second pass over the windows, which cost as long as a variant's evaluation."""
    n_win, per = base.true_logp.shape
    return _summary([_self_positions(t) for t in base.true_logp], n_win, per)


def _summary(cols: list[dict[str, torch.Tensor]], n_win: int, per: int) -> dict:
    """``compare``'s metrics from each window's per-position columns (``_compare_positions``)."""
    kl = torch.cat([c["kl"] for c in cols]).double()
    nll = torch.cat([c["nll"] for c in cols]).double()
    same = torch.cat([c["same"] for c in cols]).double()
    extra = {}
    buckets = position_buckets(per)
    if len(buckets) > 1:  # long windows: does the error grow with distance into the context?
        kl_w, nll_w, same_w = kl.view(n_win, per), nll.view(n_win, per), same.view(n_win, per)
        extra["by_position"] = {label: {"kl_mean": float(kl_w[:, a:b].mean()), "nll_mean": float(nll_w[:, a:b].mean()),
                                        "same_top1": float(same_w[:, a:b].mean()), "n_tokens": n_win * (b - a),
                                        "kl_mean_per_window": kl_w[:, a:b].mean(1).tolist()}
                                for label, a, b in buckets}
    return {
        "ppl": float(nll.mean().exp()),
        "kl_mean": float(kl.mean()),
        "kl_median": float(kl.median()),
        "kl_p90": float(kl.quantile(0.90)),
        "kl_p99": float(kl.quantile(0.99)),
        "kl_max": float(kl.max()),
        "same_top1": float(same.mean()),
        "delta_p_mean": float(torch.cat([c["dp"] for c in cols]).double().mean()),
        "n_tokens": int(kl.numel()),
        "n_windows": n_win,
        # per-window values, for paired bootstrap over windows in the report
        "per_window": {
            "nll_mean": nll.view(n_win, per).mean(1).tolist(),
            "kl_mean": kl.view(n_win, per).mean(1).tolist(),
            "same_top1": same.view(n_win, per).mean(1).tolist(),
        },
        **extra,
    }


# Teacher-forced fidelity on texts (generative tasks): a sequence is (token ids, start), and the
# positions scored are the tokens from ``start`` on (the reference answer after its prompt).

def _sequence_logits(model, ids: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting tokens start..L-1, and those tokens; only the needed positions reach lm_head."""
    device = next(model.parameters()).device
    x = torch.tensor(ids, dtype=torch.long, device=device)[None]
    n = len(ids) - start  # positions scored
    out = model(input_ids=x, use_cache=False, logits_to_keep=n + 1)
    return out.logits[0, :-1].float(), x[0, start:]


@torch.no_grad()
def sequence_baseline(model, seqs: list[tuple[list[int], int]], top_k: int) -> list[dict[str, torch.Tensor]]:
    """The baseline's top-k statistics on each sequence's scored positions."""
    out = []
    for ids, start in tqdm(seqs, desc="baseline teacher-forced", leave=False):
        logits, target = _sequence_logits(model, ids, start)
        out.append(_base_positions(logits, target, top_k))
    return out


DRAFT_MARGIN = 1e-3  # a text token counts as the model's own greedy choice by at least this logit margin


def own_prefix(logits: torch.Tensor, target: torch.Tensor, margin: float = DRAFT_MARGIN) -> int:
    """How many leading tokens of ``target`` are the model's own greedy choices: the argmax of ``logits``
    (P, V) by at least ``margin`` over the runner-up, so that a pass with other float rounding (a batched
    prefill, decoding) picks the same token. Greedy decoding from the same prompt reproduces them.

    >>> own_prefix(torch.tensor([[3.0, 1.0], [0.0, 2.0], [1.0, 1.0]]), torch.tensor([0, 1, 0]))
    2
    """
    top = logits.topk(2, dim=-1)  # values, indices: (P, 2)
    return _own_run(top.values, top.indices, target, margin)


def _own_run(top_values: torch.Tensor, top_indices: torch.Tensor, target: torch.Tensor, margin: float) -> int:
    """``own_prefix`` from each position's top-2 values (logits or log-probs) and their ids: (P, >= 2)."""
    own = (top_indices[:, 0] == target) & (top_values[:, 0] - top_values[:, 1] >= margin)  # (P,)
    return int(own.long().cumprod(0).sum())


@torch.no_grad()
def sequence_compare(model, seqs: list[tuple[list[int], int]], base: list[dict[str, torch.Tensor]]) -> list[dict]:
    """Per sequence: mean NLL, mean KL to the baseline, same-top-token rate, KL at each position, and
    ``own_prefix``: the leading tokens of the text that are this model's own greedy choices (a draft for
    its generation when the text is the baseline's answer)."""
    out = []
    for (ids, start), b in zip(tqdm(seqs, desc="teacher-forced", leave=False), base):
        logits, target = _sequence_logits(model, ids, start)
        out.append(_sequence_record(_compare_positions(logits, target, b), own_prefix(logits, target)))
    return out


def sequence_compare_baseline(seqs: list[tuple[list[int], int]], base: list[dict[str, torch.Tensor]]) -> list[dict]:
    """``sequence_compare`` of the baseline model itself, from the statistics its one pass recorded
    (``sequence_baseline``), without a second pass: KL 0 and the same top token everywhere, the NLL
    it recorded. ``own_prefix`` (the leading tokens that are its own greedy choices, by ``DRAFT_MARGIN``)
    comes from its recorded top-2 log-probs, whose gap is the logits' gap up to float rounding."""
    out = []
    for (ids, start), b in zip(seqs, base):
        own = _own_run(b["topk_logp"], b["topk_idx"].long(), torch.tensor(ids[start:]), DRAFT_MARGIN)
        out.append(_sequence_record(_self_positions(b["true_logp"]), own))
    return out


def _sequence_record(c: dict[str, torch.Tensor], own: int) -> dict:
    return {"n_tokens": int(c["kl"].numel()), "nll_mean": float(c["nll"].double().mean()),
            "kl_mean": float(c["kl"].double().mean()), "top1": float(c["same"].double().mean()),
            "own_prefix": own, "kl_pos": [round(float(v), 5) for v in c["kl"]]}
