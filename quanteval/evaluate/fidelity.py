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
    compared against that file without rerunning the baseline.
    KL is computed over the k+1 buckets (top-k tokens + one tail bucket).
    Merging the tail into one bucket can only lower KL (log-sum inequality),
    so the reported KL is a lower bound on the full-vocabulary KL; with
    k = 64 the gap is small because the tail mass is small where it matters.

Memory
    One window at a time, and the (positions x vocab) log-softmax in chunks of
    ``CHUNK`` positions, so Gemma's 262k vocabulary fits.
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
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.__dict__, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "BaselineStats":
        return cls(**torch.load(path, weights_only=True))


def _logits(model, window: torch.Tensor) -> torch.Tensor:
    """Logits predicting tokens 1..L-1 of one window: (P, V) float32."""
    device = next(model.parameters()).device
    out = model(input_ids=window[None].to(device), use_cache=False)
    return out.logits[0, :-1].float()  # (P, V)


def _tail_logp(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``idx``: logp (P, V), idx (P, k) -> (P,)."""
    rest = logp.scatter(1, idx, float("-inf"))  # (P, V) with the top-k masked out
    return torch.logsumexp(rest, dim=1)


@torch.no_grad()
def baseline_stats(model, windows: torch.Tensor, top_k: int) -> BaselineStats:
    """Run the baseline over ``windows`` and keep its top-k + tail + true-token log-probs."""
    parts = {k: [] for k in ("topk_logp", "topk_idx", "tail_logp", "true_logp")}
    for w in tqdm(windows, desc="baseline windows", leave=False):
        logits = _logits(model, w)  # (P, V)
        target = w[1:].to(logits.device)  # (P,)
        cols = {k: [] for k in parts}
        for s in range(0, logits.shape[0], CHUNK):
            logp = torch.log_softmax(logits[s : s + CHUNK], dim=-1)  # (c, V)
            vals, idx = logp.topk(top_k, dim=-1)  # (c, k)
            cols["topk_logp"].append(vals)
            cols["topk_idx"].append(idx.int())
            cols["tail_logp"].append(_tail_logp(logp, idx))
            cols["true_logp"].append(logp.gather(1, target[s : s + CHUNK, None])[:, 0])
        for k in parts:
            parts[k].append(torch.cat(cols[k]).cpu())
    return BaselineStats(**{k: torch.stack(v) for k, v in parts.items()})


@torch.no_grad()
def compare(model, windows: torch.Tensor, base: BaselineStats) -> dict:
    """Perplexity of ``model`` and its agreement with the baseline, per token and per window."""
    kl_all, nll_all, same_all, dp_all = [], [], [], []
    for n, w in enumerate(tqdm(windows, desc="eval windows", leave=False)):
        logits = _logits(model, w)  # (P, V)
        target = w[1:].to(logits.device)
        for s in range(0, logits.shape[0], CHUNK):
            e = min(s + CHUNK, logits.shape[0])
            logq = torch.log_softmax(logits[s:e], dim=-1)  # (c, V)
            idx = base.topk_idx[n, s:e].long().to(logq.device)  # (c, k)
            p_logp = base.topk_logp[n, s:e].to(logq.device)  # (c, k)
            p_tail = base.tail_logp[n, s:e].to(logq.device)  # (c,)
            q_logp = logq.gather(1, idx)  # (c, k)
            q_tail = _tail_logp(logq, idx)  # (c,)
            kl = (p_logp.exp() * (p_logp - q_logp)).sum(1) + p_tail.exp() * (p_tail - q_tail)
            kl_all.append(kl.clamp(min=0).cpu())
            q_true = logq.gather(1, target[s:e, None])[:, 0]
            nll_all.append(-q_true.cpu())
            same_all.append((logq.argmax(1) == idx[:, 0]).cpu())
            dp_all.append((q_true.exp() - base.true_logp[n, s:e].to(q_true.device).exp()).cpu())
    kl = torch.cat(kl_all).double()
    nll = torch.cat(nll_all).double()
    n_win, per = windows.shape[0], windows.shape[1] - 1
    return {
        "ppl": float(nll.mean().exp()),
        "kl_mean": float(kl.mean()),
        "kl_median": float(kl.median()),
        "kl_p90": float(kl.quantile(0.90)),
        "kl_p99": float(kl.quantile(0.99)),
        "kl_max": float(kl.max()),
        "same_top1": float(torch.cat(same_all).double().mean()),
        "delta_p_mean": float(torch.cat(dp_all).double().mean()),
        "n_tokens": int(kl.numel()),
        "n_windows": n_win,
        # per-window values, for paired bootstrap over windows in the report
        "per_window": {
            "nll_mean": nll.view(n_win, per).mean(1).tolist(),
            "kl_mean": kl.view(n_win, per).mean(1).tolist(),
        },
    }
