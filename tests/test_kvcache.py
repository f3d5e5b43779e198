"""The KV-cache axis (quanteval.kvcache, quanteval.kvsize): primitives, one view in every pass, keys, sizes,
bad input, and one small sweep with its report."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import run_cli
from quanteval import kvcache, kvsize
from quanteval.kvsize import KVSpec
from quanteval.models import ADAPTERS

TIE = 1e-4


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    m.config.tie_word_embeddings = False  # spread-out logits (a random untied head), so ties are rare
    m.lm_head.weight = torch.nn.Parameter(torch.randn(m.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)))
    return m


@pytest.fixture
def kv4(model):
    kvcache.install(model, KVSpec(4, 8), ADAPTERS["llama"])
    yield model
    kvcache.uninstall(model)


# ---------------------------------------------------------------- primitives


def test_values_are_quantised_per_token_within_half_a_step():
    v = torch.randn(2, 3, 5, 16) * torch.linspace(0.1, 4, 16)
    for bits in (8, 4, 2):
        q = kvcache.quantize_values(v, bits, 8)
        g = v.view(2, 3, 5, 2, 8)
        step = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / (2**bits - 1)
        err = (q.view(2, 3, 5, 2, 8) - g).abs()
        assert (err <= step * 0.5 * 1.01 + 1e-3).all()
        assert len(q.view(2, 3, 5, 2, 8)[0, 0, 0, 0].unique()) <= 2**bits


def test_keys_are_grouped_per_channel_on_each_rows_own_positions():
    torch.manual_seed(0)
    k = torch.randn(1, 2, 21, 4)  # 21 real tokens: groups of 8 -> two full, 5 residual
    pos = torch.arange(21)[None]
    q, full = kvcache.quantize_keys(k, pos, 4, 8)
    assert full[0].tolist() == [True] * 16 + [False] * 5
    assert torch.equal(q[..., 16:, :], k[..., 16:, :])  # the residual is left in full precision
    assert not torch.equal(q[..., :16, :], k[..., :16, :])
    for g in range(2):  # one channel's group: at most 16 levels, over its 8 tokens
        assert len(q[0, 0, 8 * g:8 * g + 8, 1].unique()) <= 16
    padded = torch.cat([torch.zeros(1, 2, 3, 4), k], dim=2)  # the same row behind 3 padding slots
    qp, fp = kvcache.quantize_keys(padded, torch.arange(-3, 21)[None], 4, 8)
    assert torch.equal(qp[..., 3:, :], q) and torch.equal(fp[0, 3:], full[0]) and not fp[0, :3].any()


# ---------------------------------------------------------------- one view in every pass


def _step_by_step(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    from transformers import DynamicCache

    from quanteval.generate import _cache_kwarg

    kw = _cache_kwarg(model)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids[:, :prefill], use_cache=True, **{kw: cache})
    logits = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{kw: cache})
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("chunk", [512, 12])  # 12: a long prefill's query chunks, not aligned to groups
@torch.no_grad()
def test_teacher_forcing_sees_what_decoding_sees(model, kv4, chunk, monkeypatch):
    """A whole-window pass (no cache) gives the logits of decoding token by token, and of a prefill
    followed by decoding: no query sees a key quantised with a scale from tokens after it."""
    monkeypatch.setattr(kvcache, "QUERY_CHUNK", chunk)
    ids = torch.randint(3, model.config.vocab_size, (1, 45), generator=torch.Generator().manual_seed(2))
    tf = model(input_ids=ids, use_cache=False).logits
    for prefill in (1, 13, 16):
        assert torch.allclose(tf, _step_by_step(model, ids, prefill), atol=1e-5), prefill


@torch.no_grad()
def test_the_cache_changes_logits_and_uninstall_restores_them(model):
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    base = model(input_ids=ids, use_cache=False).logits
    kls = []
    for bits in (8, 4, 2):
        kvcache.install(model, KVSpec(bits, 8), ADAPTERS["llama"])
        q = model(input_ids=ids, use_cache=False).logits
        kvcache.uninstall(model)
        kls.append(torch.nn.functional.kl_div(q.log_softmax(-1), base.log_softmax(-1), log_target=True,
                                              reduction="batchmean").item())
    assert 0 < kls[0] < kls[1] < kls[2], kls  # fewer bits, further from the baseline
    # the first 8 positions' logits differ only through the values (their key group is never full early)
    assert torch.equal(model(input_ids=ids, use_cache=False).logits, base)  # uninstalled: the model's own


@torch.no_grad()
def test_batched_generation_equals_one_prompt_at_a_time(model, kv4, tiny_model):
    """Groups follow each row's own positions: left padding, refills and merges change nothing but rounding."""
    from transformers import AutoTokenizer

    from quanteval.generate import generate
    from test_generate import prompts

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ps = prompts(7, seed=4)
    batched = generate(model, tok, ps, max_new_tokens=30, batch_size=4)
    ties = 0
    for p, g in zip(ps, batched):
        one = generate(model, tok, [p], max_new_tokens=30, batch_size=1)[0]
        if one.tokens == g.tokens:
            continue
        j = next(i for i, (a, b) in enumerate(zip(one.tokens, g.tokens)) if a != b)
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"] + one.tokens[:j]])
        top2 = model(input_ids=ids, use_cache=False).logits[0, -1].topk(2).values
        assert float(top2[0] - top2[1]) < TIE, f"prompt {p!r} differs at step {j} without a tie"
        ties += 1
    print(f"{ties} numerical tie(s) in {len(ps)} prompts")
    assert ties <= 1


# ---------------------------------------------------------------- sizes, keys, labels


def test_bytes_count_scales_and_the_key_residual():
    e = 30 * 3 * 64
    assert kvsize.bytes_per_token(e, KVSpec()) == e * 4  # fp16 keys and values
    assert kvsize.bytes_per_token(e, KVSpec(4, 32)) == 2 * e * (4 + 1) / 8  # + fp16 scale and min per 32
    assert kvsize.residual_tokens(KVSpec(4, 32), 4100) == 4
    full = kvsize.kv_bytes(e, KVSpec(4, 32), 4096)
    assert kvsize.kv_bytes(e, KVSpec(4, 32), 4100) == full + 4 * kvsize.bytes_per_token(e, KVSpec(4, 32)) / 2 + 4 * e * 2
    assert kvsize.kv_bytes(e, KVSpec(2, 32), 4096) < full < kvsize.kv_bytes(e, KVSpec(8, 32), 4096) \
        < kvsize.kv_bytes(e, KVSpec(), 4096)


def _cfg(**kw):
    from quanteval.config import ModelConfig, NoneConfig, PresetConfig, RTNConfig, RunConfig, WikiText2Config

    method = NoneConfig() if kw.pop("none", False) else RTNConfig()
    return RunConfig(model=ModelConfig(), method=method, task=WikiText2Config(), preset=PresetConfig(), **kw)


def test_kv16_leaves_keys_unchanged_and_kv_shares_the_weights():
    from quanteval.variant import Run, Variant, quant_key_of

    plain, k16, k4 = Run.of(_cfg()), Run.of(_cfg(kv_bits=16)), Run.of(_cfg(kv_bits=4))
    assert plain.key == k16.key and "kv" not in plain.settings
    assert k4.key != plain.key and k4.settings["kv"] == {"bits": 4, "group_size": 32, "method": "rtn"}
    assert k4.variant.quant_key == plain.variant.quant_key == quant_key_of(k4.settings)  # same weights
    assert k4.variant.label == "rtn w4 g64 · kv4" and k4.path.name.startswith("wikitext2__smollm2_135m__rtn-w4-g64-kv4__")
    only = Variant.of(_cfg(none=True, kv_bits=2))
    assert only.label == "w16 · kv2" and not only.is_baseline and only.info()["method"] == "kv"
    assert Variant.of(_cfg(none=True)).is_baseline
    assert Variant.of(_cfg(kv_bits=4, kv_group_size=16)).label == "rtn w4 g64 · kv4 g16"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw, needle", [
    ({"kv_bits": 3}, "kv_bits=3: must be one of 16, 8, 4, 2"),
    ({"kv_group_size": 1}, "kv_group_size=1"),
    ({"kv_method": "kivi"}, "kv_method='kivi'"),
])
def test_bad_kv_settings_name_the_field(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        _cfg(**kw)


def test_unknown_layout_and_head_dim_are_refused():
    from transformers import Gemma3TextConfig, LlamaConfig, MambaConfig

    with pytest.raises(ValueError, match="sliding"):
        kvcache.check(Gemma3TextConfig(), KVSpec(4, 32))
    with pytest.raises(ValueError, match="unknown KV cache layout"):
        kvcache.check(MambaConfig(), KVSpec(4, 32))
    with pytest.raises(ValueError, match=r"kv_group_size=48: must divide the head dimension \(64\)"):
        kvcache.check(LlamaConfig(hidden_size=576, num_attention_heads=9), KVSpec(4, 48))


def _args(tiny_model, tiny_data, results, *extra):
    return ["model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}", f"results_dir={results}",
            "preset=smoke", "preset.n_windows=2", "preset.seq_len=64", "task=wikitext2", *extra]


@pytest.mark.parametrize("extra, needle", [
    (["kv_bits=16,3"], "kv_bits=3: must be one of 16, 8, 4, 2"),
    (["kv_bits=4", "kv_group_size=12"], "kv_group_size=12: must divide the head dimension (16)"),
])
def test_cli_refuses_bad_kv_input_in_one_line(tiny_model, tiny_data, tmp_path, extra, needle):
    proc = run_cli(*_args(tiny_model, tiny_data, tmp_path, "method=none", *extra))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "default").exists()


# ---------------------------------------------------------------- a sweep with the cache axis


def test_sweep_with_a_kv_axis_records_sizes_and_reports_columns(tiny_model, tiny_data, tmp_path):
    proc = run_cli(*_args(tiny_model, tiny_data, tmp_path, "method=none", "kv_bits=16,8,2", "kv_group_size=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(*_args(tiny_model, tiny_data, tmp_path, "method=rtn", "bits=4", "kv_bits=16,4",
                          "kv_group_size=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {}
    for f in (tmp_path / "default" / "runs").glob("wikitext2__*.json"):
        rec = json.loads(f.read_text())
        runs[rec["variant"]["label"].replace(" g8", "")] = rec  # kv_group_size=8 is not the default: labelled
    assert set(runs) == {"baseline", "w16 · kv8", "w16 · kv2", "rtn w4 g64", "rtn w4 g64 · kv4"}
    kl = {k: r["metrics"]["kl_mean"] for k, r in runs.items()}
    assert kl["baseline"] == 0 and 0 < kl["w16 · kv8"] < kl["w16 · kv2"]
    assert kl["rtn w4 g64 · kv4"] != kl["rtn w4 g64"]
    e = 2 * 2 * 16  # tiny model: 2 layers x 2 KV heads x head dim 16
    assert runs["baseline"]["kv_cache"]["bytes_per_token"] == e * 4
    assert runs["w16 · kv2"]["kv_cache"]["bytes_per_token"] == 2 * e * (2 + 32 / 8) / 8
    assert runs["w16 · kv2"]["kv_cache"]["context"] == 64
    assert runs["rtn w4 g64 · kv4"]["quantization"]["from_cache"] is True  # the w4 weights, reused
    html = (tmp_path / "default" / "report" / "index.html").read_text()
    for label in ("w16 · kv8 g8", "w16 · kv2 g8", "rtn w4 g64 · kv4 g8"):
        assert label in html, label
    assert "+ KV" in html and "@ 64" in html  # each column's size: weights + the cache at the stated context
    assert list((tmp_path / "default" / "report").glob("kv__*.png"))  # KL by KV-cache bits
    verdicts = json.loads((tmp_path / "default" / "report" / "verdicts.json").read_text())
    cells = [c for c in verdicts["verdicts"] if c["task"] == "wikitext2" and c["kind"] == "kl"]
    kv2 = next(c for c in cells if c["label"] == "w16 · kv2 g8")
    base = next(c for c in cells if c["label"] == "baseline")
    assert kv2["kv_context"] == 64 and kv2["kv_bytes"] == kvsize.kv_bytes(e, KVSpec(2, 8), 64) < base["kv_bytes"]
