"""KV-cache quantisation, KIVI-style, applied where attention reads the cache.

Follows KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"; reference
implementation jy-yuan/KIVI): asymmetric round-to-nearest over each group's min..max, with

- **keys per channel**: a group spans ``group_size`` consecutive tokens of one channel (keys have outlier
  channels; a per-token group would spend its range on them);
- **values per token**: a group spans ``group_size`` elements of one token's head dimension;
- **the key residual**: a key group can only be quantised once its ``group_size`` tokens exist, so the
  newest ``position % group_size`` tokens' keys stay in full precision until their group is full
  (``quanteval.kvsize.residual_tokens`` counts them; the bytes count them at 16 bits). Values are
  quantised as they are written. Groups are aligned to each sequence's own positions (0, G, 2G, ...), so
  left padding and batch composition change nothing.

What a query sees (the same in every pass): the query at position ``i`` reads key ``j`` quantised when
``j``'s group is full at ``i`` (its last position ``<= i``), in full precision otherwise, and every value
quantised. A prefill or a teacher-forced pass over a whole window therefore gives exactly what decoding
the window token by token would (``tests/test_kvcache.py`` checks it): an earlier query of a block never
sees keys quantised with a scale taken from tokens after it.

**Where it runs.** ``install(model, spec)`` makes the model's attention this module's ``_attention``
(registered through transformers' ``AttentionInterface``), so it applies to the generation engine's
cache (``quanteval.generate``: the quantised keys and values are written back into the cache's buffers,
so each group is quantised once, when it fills) and to every pass that uses no cache at all: WikiText-2,
the tasks' teacher-forced scoring, the long windows. ``uninstall`` puts the model's own attention back.
The cache holds the *dequantised* values in the model's dtype: scores are those of a packed cache, the
memory in this process is not; ``quanteval.kvsize`` gives the packed bytes.

**Why not transformers' ``QuantizedCache``.** It returns unquantised keys and values at prefill (a
teacher-forced pass, which uses no cache, would see no quantisation at all) and keeps a 128-token
full-precision residual of keys *and* values (checked in transformers 5.24), so its first 128 tokens
are never quantised and short tasks would measure nothing. A cache class alone cannot give the per-query
view above either: one prefill call returns one key tensor to every query of the call.

Known layouts: decoder blocks whose attention is full causal self-attention over keys and values of
shape (batch, kv heads, tokens, head dim) with RoPE applied before the cache (``Adapter.kv_layout ==
"full"``). Sliding-window layers (Gemma 3) are refused by ``check``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from quanteval.kvsize import KVSpec

log = logging.getLogger(__name__)

NAME = "quanteval_kv"  # the attention implementation's name in transformers' AttentionInterface
QUERY_CHUNK = 512  # queries per attention call of a long prefill (its boolean mask is queries x 2 keys)
_SAVED = "_quanteval_attn_implementation"  # the model's own attention implementation, while installed


# ---------------------------------------------------------------- primitives (pure tensor functions)


def rtn_minmax(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """``x`` quantised and dequantised, one group along ``dim``: asymmetric RTN over the group's min..max,
    the scale and minimum stored as fp16 (the scale rounded up, so the range is covered)."""
    from quanteval.primitives import round_scale_fp16

    maxq = 2**bits - 1
    xf = x.float()
    lo = xf.amin(dim, keepdim=True).half().float()  # the stored minimum (fp16)
    hi = xf.amax(dim, keepdim=True)
    scale = round_scale_fp16(((hi - lo) / maxq).clamp(min=2**-24))
    codes = torch.clamp(torch.round((xf - lo) / scale), 0, maxq)
    return (codes * scale + lo).to(x.dtype)


def quantize_values(v: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Values per token: v (B, H, T, D) with groups of ``group_size`` along D."""
    b, h, t, d = v.shape
    g = v.reshape(b, h, t, d // group_size, group_size)  # (B, H, T, D/G, G)
    return rtn_minmax(g, bits, dim=-1).reshape(b, h, t, d)


def quantize_keys(k: torch.Tensor, positions: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys per channel over token groups aligned to each row's positions.

    k: (B, H, T, D); positions: (B, T) the position of each slot (negative: padding), consecutive along T.
    Returns (quantised keys, full (B, T) bool: the slot's group is full) ; slots of groups not full are
    returned as they were.
    """
    b, h, t, d = k.shape
    g = group_size
    first = positions[:, 0]  # (B,) position of slot 0
    offset = torch.remainder(first, g)  # (B,) slots before slot 0 in its group
    width = ((t + g - 1) // g + 1) * g  # room for the shift
    u = torch.arange(width, device=k.device)[None] - offset[:, None]  # (B, width): slot read at each place
    valid = (u >= 0) & (u < t)
    src = u.clamp(0, t - 1)
    idx = src[:, None, :, None].expand(b, h, width, d)
    aligned = torch.gather(k.float(), 2, idx)  # (B, H, width, D), groups now start at multiples of g
    pos = torch.gather(positions, 1, src)  # (B, width)
    ok = valid & (pos >= 0)
    lo_fill = torch.where(ok[:, None, :, None], aligned, torch.full_like(aligned, float("inf")))
    hi_fill = torch.where(ok[:, None, :, None], aligned, torch.full_like(aligned, float("-inf")))
    n = width // g
    lo = lo_fill.view(b, h, n, g, d).amin(3, keepdim=True).half().float()  # (B, H, n, 1, D)
    hi = hi_fill.view(b, h, n, g, d).amax(3, keepdim=True)
    from quanteval.primitives import round_scale_fp16

    maxq = 2**bits - 1
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    scale = round_scale_fp16(((hi - lo) / maxq).clamp(min=2**-24))
    a = aligned.view(b, h, n, g, d)
    deq = (torch.clamp(torch.round((a - lo) / scale), 0, maxq) * scale + lo).view(b, h, width, d)
    back = torch.gather(deq, 2, (torch.arange(t, device=k.device)[None] + offset[:, None])[:, None, :, None]
                        .expand(b, h, t, d))  # (B, H, T, D) in slot order again
    last_of_group = (torch.div(positions, g, rounding_mode="floor") + 1) * g - 1  # (B, T)
    full = (positions >= 0) & (last_of_group <= positions[:, -1:])
    out = torch.where(full[:, None, :, None], back.to(k.dtype), k)
    return out, full


# ---------------------------------------------------------------- the attention function

_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # torch >= 2.5


def _sdpa(query, key, value, mask, scale):
    """Scaled dot-product attention with grouped-query heads (``enable_gqa`` where torch has it)."""
    groups = query.shape[1] // key.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    if _GQA:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over a KIVI-quantised cache (see the module docstring); transformers' attention interface.

    query (B, Hq, Q, D); key, value (B, Hkv, K, D), the cache's views (written in place) or this call's
    own. Each row's real tokens are its last slots, contiguous (left padding, as quanteval pads); the
    positions come from ``position_ids`` (B, Q) or, without them, are the slots' indices."""
    spec: KVSpec = module._quanteval_kv
    b, hq, q, d = query.shape
    k_len = key.shape[2]
    pos_q = kwargs.get("position_ids")
    if pos_q is None:
        pos_q = torch.arange(k_len - q, k_len, device=query.device)[None]
    pos_q = pos_q.to(query.device).expand(b, q)
    slots = torch.arange(k_len, device=query.device)
    pos_k = pos_q[:, -1:] - (k_len - 1) + slots[None]  # (B, K); negative: left padding
    g, bits = spec.group_size, spec.bits
    value[:, :, k_len - q:] = quantize_values(value[:, :, k_len - q:], bits, g)  # this call's values
    scale = scaling if scaling is not None else d**-0.5
    if q == 1:  # decode: a row whose token fills a group quantises that group's keys, in place
        fills = torch.remainder(pos_q[:, -1] + 1, g) == 0  # (B,)
        if bool(fills.any()):
            rows = fills.nonzero()[:, 0]
            block = key[rows, :, k_len - g:]  # (r, H, G, D): the group just filled
            key[rows, :, k_len - g:] = rtn_minmax(block, bits, dim=2)
        mask = (pos_k >= 0)[:, None, None, :]  # (B, 1, 1, K)
        out = _sdpa(query, key, value, mask, scale)
        return out.transpose(1, 2).contiguous(), None
    full_k = key.clone()  # this call's keys in full precision, for the queries before their group fills
    quantised, full = quantize_keys(key, pos_k, bits, g)
    key.copy_(quantised)  # in place: the cache keeps each full group quantised
    group_last = (torch.div(pos_k, g, rounding_mode="floor") + 1) * g - 1  # (B, K)
    outs = []
    for s in range(k_len - q, k_len, QUERY_CHUNK):  # query slots s..e-1 read key slots < e (causal)
        e = min(s + QUERY_CHUNK, k_len)
        lo = max(0, s - g)  # a full-precision copy is read only within a query's own unfilled group
        pq = pos_q[:, s - (k_len - q):e - (k_len - q), None]  # (B, c, 1)
        pk, last, fl = pos_k[:, None, :e], group_last[:, None, :e], full[:, None, :e]  # (B, 1, e)
        seen = (pk >= 0) & (pk <= pq)  # (B, c, e) causal, no padding
        full_at_q = last <= pq  # the key's group is full when this query runs
        use_q = seen & (full_at_q | ~fl)  # the quantised view (or a residual slot it left alone)
        use_f = (seen & fl & ~full_at_q)[:, :, lo:]  # a full-precision copy of a group that fills later
        own = slots[None, None, :e] == torch.arange(s, e, device=query.device)[None, :, None]
        use_q = use_q | own  # a padding query reads its own slot (never an empty row: no NaN)
        use_q[:, :, lo:] &= ~use_f
        mask = torch.cat([use_q, use_f], dim=2)[:, None]  # (B, 1, c, e + e - lo)
        k_cat = torch.cat([key[:, :, :e], full_k[:, :, lo:e]], dim=2)  # (B, H, e + e - lo, D)
        v_cat = torch.cat([value[:, :, :e], value[:, :, lo:e]], dim=2)
        outs.append(_sdpa(query[:, :, s - (k_len - q):e - (k_len - q)], k_cat, v_cat, mask, scale))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------- install / uninstall


def _attention_modules(model, adapter) -> list:
    return [block.get_submodule(adapter.attention) for block in model.get_submodule(adapter.blocks)]


def check(config, spec: KVSpec) -> None:
    """Refuse, in one line, a model (its ``config``) whose cache layout the adapter table does not know, or
    whose head dimension the value groups do not divide: cheap, before any heavy work."""
    from quanteval.models import ADAPTERS

    model_type = getattr(config, "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None or adapter.kv_layout != "full":
        layout = "unknown" if adapter is None else repr(adapter.kv_layout)
        known = ", ".join(sorted(k for k, a in ADAPTERS.items() if a.kv_layout == "full"))
        raise ValueError(f"kv_bits={spec.bits}: model_type={model_type!r} has a {layout} KV cache layout, which "
                         f"quanteval.kvcache does not handle (full causal self-attention only: {known})")
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim % spec.group_size:
        raise ValueError(f"kv_group_size={spec.group_size}: must divide the head dimension ({head_dim}) of "
                         f"model_type={model_type!r}: a value group spans one token's head dimension")


def key_elements(model) -> int:
    """Key elements one token takes in the cache (layers x KV heads x head dim); values take as many."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers * kv_heads * head_dim


def install(model, spec: KVSpec, adapter) -> None:
    """Make ``model``'s attention read a ``spec``-quantised cache (a no-op at 16 bits)."""
    if not spec.quantizes:
        return
    check(model.config, spec)
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, _attention)
    for m in _attention_modules(model, adapter):
        m._quanteval_kv = spec
    if not hasattr(model, _SAVED):
        setattr(model, _SAVED, model.config._attn_implementation)
    model.set_attn_implementation(NAME)
    log.info("KV cache: %d-bit, groups of %d (keys per channel over tokens, values per token)", spec.bits,
             spec.group_size)


def uninstall(model) -> None:
    """Put ``model``'s own attention back (a no-op when ``install`` was not called)."""
    saved = getattr(model, _SAVED, None)
    if saved is None:
        return
    model.set_attn_implementation(saved)
    delattr(model, _SAVED)
    for m in model.modules():
        if hasattr(m, "_quanteval_kv"):
            del m._quanteval_kv
