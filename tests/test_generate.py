"""The generation engine: token-identical to unbatched ``model.generate``, whatever the batching.

Batching changes only float rounding (padding is masked, a merged row's cache
is left-padded with masked zeros), so the tokens must equal unbatched greedy
``model.generate``'s, except at a step where ``generate``'s top two logits are
within ``TIE`` (a numerical tie, where rounding may pick either). Such ties are
counted and printed; any other difference fails. One thread, so the reference
is reproducible.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

import quanteval.generate as G
from quanteval.generate import Generation, auto_batch_size, generate

from conftest import WORDS, talking

TIE = 1e-4




def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40))) for _ in range(n)]


def reference(model, tok, prompt: str, max_new: int, eos: set[int]) -> tuple[list[int], torch.Tensor]:
    """Unbatched greedy ``model.generate``: its tokens and the logits of each step (steps, vocab)."""
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    gc = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(eos),
                          pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else min(eos))
    out = model.generate(**ids, generation_config=gc, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, ids["input_ids"].shape[1]:].tolist(), torch.stack(out.logits)[:, 0].float()


def compare(gen: Generation, ref: list[int], logits: torch.Tensor) -> str:
    """'same', 'tie' (first difference at a step whose top-2 logits are within TIE) or a description."""
    for j, t in enumerate(gen.tokens):
        if j >= len(ref):
            return f"runs past the reference's end at step {j}"
        if t != ref[j]:
            top2 = logits[j].topk(2).values
            gap = float(top2[0] - top2[1])
            return "tie" if gap < TIE else f"step {j}: {t} != {ref[j]} (top-2 gap {gap:.3g})"
    if gen.finish != "stop" and gen.tokens != ref:  # EOS and the cap end both engines at the same step
        return f"ends at {len(gen.tokens)} tokens ({gen.finish}), the reference at {len(ref)}"
    return "same"


def check_against_reference(model, tok, ps, max_new, stop, batch_sizes, capsys=None) -> dict:
    eos = G._eos_ids(model, tok)
    refs = [reference(model, tok, p, max_new, eos) for p in ps]
    ties = {}
    for bs in batch_sizes:
        gens = generate(model, tok, ps, max_new, stop=stop, batch_size=bs)
        verdicts = [compare(g, *r) for g, r in zip(gens, refs)]
        bad = [(i, v) for i, v in enumerate(verdicts) if v not in ("same", "tie")]
        assert not bad, f"batch_size={bs}: {bad}"
        ties[bs] = verdicts.count("tie")
        assert all(len(g.tokens) == g.n_tokens for g in gens)
    print(f"numerical ties (top-2 logits within {TIE}) per batch size: {ties}")
    return {"ties": ties, "finish": {g.finish for g in gens}}


def test_batched_equals_unbatched_generate(tiny_model, one_thread, monkeypatch):
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = talking(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), tok)
    merges = []
    real_merge = G._merge
    monkeypatch.setattr(G, "_merge", lambda *a: merges.append(1) or real_merge(*a))
    trims = []  # leading columns dropped when rows left (padding in every row still running)
    real_select = G._select

    def select(cache, indices, mask):
        kept = real_select(cache, indices, mask)
        trims.append(mask.shape[1] - kept.shape[1])
        return kept

    monkeypatch.setattr(G, "_select", select)
    moved = []  # rows moved in place into the places of finished ones (_drop)
    real_move = G._GrowingLayer.move_rows
    monkeypatch.setattr(G._GrowingLayer, "move_rows", lambda self, moves, order: moved.append(len(moves)) or real_move(self, moves, order))
    groups = []  # prefills split by prompt length (stacked into one cache)
    real_groups = G.length_groups
    monkeypatch.setattr(G, "length_groups", lambda lengths, **kw: groups.append(real_groups(lengths, **kw)) or groups[-1])
    ps = prompts(12)
    out = check_against_reference(model, tok, ps, 24, stop=["king war"], batch_sizes=[1, 4, 12, "auto"])
    assert {"eos", "length"} <= out["finish"]  # rows ended at different steps
    assert merges, "no refill happened: the continuous-batching path was not exercised"
    assert max(trims) > 0, "no padding column was dropped: the trim path was not exercised"
    assert max(moved) > 0, "no row was moved in place: the in-place drop path was not exercised"
    assert max(map(len, groups)) > 1, "no prefill was split by length: the grouped prefill was not exercised"
    assert sum(out["ties"].values()) <= len(ps)  # ties are rare; many would mean a real difference


def test_sliding_window_model_equals_unbatched_generate(tiny_model, one_thread):
    """Gemma-3's sliding-window layers cannot be merged: the engine batches without refills, still exact."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                           tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=0)
    model = talking(Gemma3ForCausalLM(cfg), tok)
    assert G._growing_cache(model, 8) is None
    check_against_reference(model, tok, prompts(6, seed=1), 20, stop=[], batch_sizes=[3, 6])


def test_stop_string_ends_generation_and_text_is_cut(tiny_model, one_thread):
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = talking(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), tok)
    ps = prompts(6, seed=2)
    free = generate(model, tok, ps, 24, batch_size=6)
    text = next(g.text for g in free if len(g.text) > 6)
    stop = text[3:6]
    gens = generate(model, tok, ps, 24, stop=[stop], batch_size=2)
    assert any(g.finish == "stop" for g in gens)
    for f, g in zip(free, gens):
        assert stop not in g.text and f.text.startswith(g.text)


def test_auto_batch_size_fits_memory(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    per_tok = G.kv_bytes_per_token(model)
    assert per_tok == 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 KV heads x head_dim 16 x fp32
    per_row = 2 * per_tok * 100 + 16 * 64 * 100 * 4
    assert auto_batch_size(model, 1000, 100, free_bytes=2 * 5 * per_row) == 5
    assert auto_batch_size(model, 1000, 100, free_bytes=0) == 1
    assert auto_batch_size(model, 3, 100, free_bytes=10**12) == 3
    assert auto_batch_size(model, 1000, 100, free_bytes=10**12) == G.CPU_MAX_BATCH


def test_bad_batch_size_is_one_line_error(tiny_model):
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch_size=0"):
        generate(model, tok, ["the king"], 4, batch_size=0)
    assert generate(model, tok, [], 4) == []


@pytest.mark.slow
def test_smollm2_batched_equals_unbatched_generate(one_thread):
    from quanteval.config import ModelConfig
    from quanteval.data import resolve_data_dir
    from quanteval.evaluate.generative import load_spec, prompt_for, stop_strings
    from quanteval.models import load_model

    loaded = load_model(ModelConfig(), torch.device("cpu"), torch.float32)
    spec = load_spec("gsm8k", resolve_data_dir(None), 6, 48, {})
    ps = [prompt_for(spec, loaded.tokenizer, d, "chat", "smollm2")[0] for d in spec.docs]
    check_against_reference(loaded.model, loaded.tokenizer, ps, 48, stop=stop_strings(spec, "chat"),
                            batch_sizes=[2, 6])


def test_requests_of_several_tasks_in_one_batch_equal_unbatched_generate(tiny_model, one_thread, monkeypatch):
    """Cross-task batching: each request keeps its own cap and stop strings in a shared batch, and its tokens
    are unbatched ``model.generate``'s (up to counted ties)."""
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = talking(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), tok)
    eos = G._eos_ids(model, tok)
    merges = []
    real_merge = G._merge
    monkeypatch.setattr(G, "_merge", lambda *a: merges.append(1) or real_merge(*a))
    short, long_ = prompts(5, seed=3), prompts(7, seed=4)
    free = generate(model, tok, short, 24, batch_size=5)
    text = next(g.text for g in free if len(g.text) > 6)
    stop = (text[3:6],)
    reqs = [G.Request(tok(p, add_special_tokens=False)["input_ids"], 6, stop) for p in short] + \
           [G.Request(tok(p, add_special_tokens=False)["input_ids"], 20, ()) for p in long_]
    gens = G.generate_requests(model, tok, reqs, batch_size=4)
    ties = 0
    for g, r, p in zip(gens, reqs, short + long_):
        ref = reference(model, tok, p, r.max_new_tokens, eos)
        verdict = compare(g, *ref)
        assert verdict in ("same", "tie"), verdict
        ties += verdict == "tie"
        assert g.n_tokens <= r.max_new_tokens
        assert not any(s in g.text for s in r.stop)
    assert all(g.n_tokens <= 6 for g in gens[:5]) and max(g.n_tokens for g in gens[5:]) > 6
    assert any(g.finish == "stop" for g in gens[:5])  # the first group's stop string applies to it
    assert merges  # rows of both groups were refilled into one running batch
    assert ties <= 2


OOM_SCRIPT = r"""
import resource, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
import quanteval.generate as G
torch.set_num_threads(1)
G.PREFILL_TOKENS["cpu"] = 1 << 30  # one prefill call for the whole batch (the cap would split it and fit)
tok = AutoTokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                  eos_token_id=tok.eos_token_id, pad_token_id=0)
model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()  # eager: full attention scores
reqs = [G.Request([5 + (i * 7 + j) % 50 for j in range(1500)], 3) for i in range(16)]
G.generate_requests(model, tok, reqs[:1], batch_size=1)  # warm up the allocator and the kernels
want = G.generate_requests(model, tok, reqs[:4], batch_size=1)
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
# 16 rows of 1 500 tokens need 16 x 8 heads x 1500^2 x 4 B = 1.15 GB of attention scores in one prefill
resource.setrlimit(resource.RLIMIT_AS, (vm + 600 * 2**20, resource.RLIM_INFINITY))
got = G.generate_requests(model, tok, reqs, batch_size=16)
assert len(got) == 16 and all(g is not None for g in got)
assert [g.tokens for g in got[:4]] == [g.tokens for g in want], "answers changed under the retry"
print("OK", [g.n_tokens for g in got])
"""


def test_cpu_out_of_memory_halves_the_batch_and_keeps_every_item(tiny_model, tmp_path):
    """Under RLIMIT_AS the CPU allocator raises RuntimeError: the batch is halved until it fits, and every
    request gets its answer (the same answer as at batch size 1)."""
    import subprocess
    import sys

    script = tmp_path / "oom.py"
    script.write_text(OOM_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tiny_model)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
    assert "ran out of memory at batch size 16" in proc.stderr  # the retry really happened


def test_is_oom_recognises_the_allocators_errors():
    assert G.is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"))
    assert G.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not G.is_oom(RuntimeError("shape mismatch"))
    assert not G.is_oom(ValueError("out of memory"))


def test_cpu_batch_is_sized_from_the_kv_budget(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(
        __import__("transformers").LlamaConfig(vocab_size=64, hidden_size=576, num_hidden_layers=30,
                                               num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                               intermediate_size=64))
    per_tok = G.kv_bytes_per_token(model)
    assert per_tok == 2 * 30 * 3 * 64 * 4  # SmolLM2-135M's shape: 46 kB per token in fp32
    rows = G.CPU_KV_BUDGET // (per_tok * 1000)
    assert auto_batch_size(model, 1000, 1000, free_bytes=10**12, mean_len=1000) == rows < G.CPU_MAX_BATCH
    short = G.CPU_KV_BUDGET // (per_tok * G.CPU_MAX_BATCH)  # the longest rows a full batch fits at
    assert auto_batch_size(model, 1000, 1000, free_bytes=10**12, mean_len=short) == G.CPU_MAX_BATCH
    assert auto_batch_size(model, 1000, 1000, free_bytes=10**12, mean_len=short + 1) == G.CPU_MAX_BATCH - 1
    # preset.gen_kv_budget_mb: a smaller budget holds proportionally fewer rows
    assert auto_batch_size(model, 1000, 1000, free_bytes=10**12, mean_len=300, kv_budget=256 << 20) \
        == (256 << 20) // (per_tok * 300) == 19


def test_the_kv_budget_is_a_preset_setting_outside_the_run_key():
    from quanteval.config import GenerativeTaskConfig, ModelConfig, PresetConfig, RTNConfig, RunConfig
    from quanteval.variant import Run

    assert PresetConfig().gen_kv_budget_mb == G.CPU_KV_BUDGET >> 20
    with pytest.raises(ValueError, match="preset.gen_kv_budget_mb=0: must be a positive integer"):
        PresetConfig(gen_kv_budget_mb=0)
    keys = {Run.of(RunConfig(model=ModelConfig(), method=RTNConfig(), task=GenerativeTaskConfig(name="gsm8k"),
                             preset=PresetConfig(gen_kv_budget_mb=mb), bits=4)).key for mb in (256, 1024)}
    assert len(keys) == 1  # greedy answers do not depend on the batch it sizes


def test_drafts_give_the_plain_answers_and_a_wrong_one_falls_back(tiny_model, one_thread, caplog):
    """A draft (tokens expected to be the model's own greedy continuation) is prefilled, verified and taken
    as generated: the answers are plain decoding's (up to counted ties). A draft with a token the model would
    not choose is refused: that request is decoded plainly, the refusal logged, its answer still plain."""
    import dataclasses
    import logging

    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = talking(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), tok)
    ps = prompts(8, seed=5)
    reqs = [G.Request(tok(p, add_special_tokens=False)["input_ids"], 24, ("king war",)) for p in ps]
    plain = G.generate_requests(model, tok, reqs, batch_size=4)
    # drafts: the first half of each plain answer; request 3's has one token changed
    cut = [max(1, g.n_tokens // 2) for g in plain]
    drafted = [dataclasses.replace(r, draft=tuple(g.tokens[:c])) for r, g, c in zip(reqs, plain, cut)]
    wrong = list(drafted[3].draft)
    wrong[-1] = (wrong[-1] + 1) % len(tok)
    drafted[3] = dataclasses.replace(drafted[3], draft=tuple(wrong))
    with caplog.at_level(logging.WARNING, logger="quanteval.generate"):
        got = G.generate_requests(model, tok, drafted, batch_size=4)
    assert "a draft disagreed with the model" in caplog.text
    for i, (g, p) in enumerate(zip(got, plain)):
        assert g.tokens == p.tokens or g.draft_ties, (i, g.tokens, p.tokens)
        assert g.text == p.text and g.finish == p.finish
        assert g.drafted == (0 if i == 3 else min(cut[i], g.n_tokens)), (i, g.drafted)
    assert sum(g.drafted for g in got) > 0


def test_a_draft_that_ends_its_request_is_the_whole_answer(tiny_model, one_thread):
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = talking(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), tok)
    ids = tok("the king of the north", add_special_tokens=False)["input_ids"]
    plain = G.generate_requests(model, tok, [G.Request(ids, 12)], batch_size=1)[0]
    stop = tok.decode(plain.tokens[2:4])  # a stop string completed inside the draft
    req = G.Request(ids, 12, (stop,), draft=tuple(plain.tokens[:6]))
    got = G.generate_requests(model, tok, [req], batch_size=1)[0]
    want = G.generate_requests(model, tok, [G.Request(ids, 12, (stop,))], batch_size=1)[0]
    assert got.finish == want.finish == "stop" and got.text == want.text and got.tokens == want.tokens
    assert got.drafted == got.n_tokens  # nothing was decoded


def test_grouped_prefill_writes_one_cache_equal_to_merging_the_groups(tiny_model, one_thread, monkeypatch):
    """Prompts of very different lengths are prefilled in groups, each straight into its rows of one set of
    buffers (``_Stack``): the keys and values at every attended position are bit for bit those of
    prefilling each group into its own cache and merging them (``_merge``, the previous way), and no merge
    copy is made. (``_merge`` does not copy a row's left padding, which the stack's group prefill wrote: the
    masked positions may differ, and the merged ones are zeros.)"""
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = talking(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), tok)
    lengths = [60, 57, 30, 28, 9, 7, 6]
    vocab = model.config.vocab_size - 5
    reqs = [G.Request([5 + (i * 13 + j * 7) % vocab for j in range(n)], 8) for i, n in enumerate(lengths)]
    merges = []
    real_merge = G._merge
    monkeypatch.setattr(G, "_merge", lambda *a: merges.append(1) or real_merge(*a))

    def engine():
        return G._Engine(model, tok, reqs, list(range(len(reqs))), [None] * len(reqs), len(reqs),
                         __import__("tqdm").tqdm(disable=True))

    eng = engine()
    rows = eng._take(len(reqs))
    groups = G.length_groups([len(eng._ids(r)) for r in rows])
    assert len(groups) == 3
    rows_got, cache, mask, pos, logits = eng._prefill(rows)
    assert not merges  # stacked in place
    ref = engine()
    parts = [ref._prefill_group([rows[i] for i in g]) for g in groups]
    want_mask = real_merge([p[0] for p in parts], [p[1] for p in parts], ref.reserve)
    assert rows_got == [rows[i] for g in groups for i in g]
    assert torch.equal(mask, want_mask)
    assert torch.equal(logits, torch.cat([p[3] for p in parts])) and torch.equal(pos, torch.cat([p[2] for p in parts]))
    attended = torch.zeros(mask.shape[0], 1, cache.layers[0]._k.shape[2], 1, dtype=torch.bool)
    attended[:, 0, :mask.shape[1], 0] = mask.bool()
    for got, want in zip(cache.layers, parts[0][0].layers):
        assert got._k.shape == want._k.shape and got.keys.shape == want.keys.shape
        for g, w in ((got._k, want._k), (got._v, want._v)):
            assert torch.equal(g * attended, w * attended)
            assert not (w * ~attended).any()  # the merge wrote no padding


def test_a_prefill_never_pads_the_batch_past_the_kv_budget(tiny_model, one_thread, monkeypatch):
    """On a CPU with ``batch_size="auto"`` a prefill takes only as many prompts as the KV budget holds once
    every row is left-padded to the widest (prompt and draft) plus ``reserve``; a batch is never left empty.
    The answers are the same as with no such cap."""
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = talking(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), tok)
    per_tok = G.kv_bytes_per_token(model)
    lengths = [90, 12, 11, 10, 10, 9, 8, 8, 7, 6]
    vocab = model.config.vocab_size - 5
    reqs = [G.Request([5 + (i * 11 + j * 3) % vocab for j in range(n)], 6) for i, n in enumerate(lengths)]
    cap_tokens = 4 * (12 + 6)  # the reserve is min(GROW, cap) = 6: four short rows, or one long one
    seen = []  # (rows, width + reserve) of the batch after each prefill and refill
    real_take = G._Engine._take

    def take(self, n, batch=0, batch_width=0):
        taken = real_take(self, n, batch, batch_width)
        if taken:
            width = max([batch_width] + [len(self._ids(r)) for r in taken])
            seen.append((batch + len(taken), width + self.reserve))
        return taken

    monkeypatch.setattr(G._Engine, "_take", take)
    got = G.generate_requests(model, tok, reqs, batch_size="auto", kv_budget=cap_tokens * per_tok)
    assert seen[0] == (1, 96)  # the long prompt alone: over the cap, but a batch is never empty
    assert all(rows * width <= cap_tokens for rows, width in seen[1:]), seen
    assert max(rows for rows, _ in seen) > 1
    monkeypatch.setattr(G._Engine, "_take", real_take)
    plain = G.generate_requests(model, tok, reqs, batch_size=len(reqs))
    assert [g.tokens for g in got] == [g.tokens for g in plain]


def test_each_prefill_call_takes_at_most_prefill_tokens(tiny_model, one_thread, monkeypatch):
    """A prefill's forward calls take at most ``PREFILL_TOKENS`` padded tokens (rows x width) each, a longer
    prompt alone; the groups go into one cache, and the answers are those of one uncapped prefill."""
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = talking(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), tok)
    lengths = [70, 33, 32, 31, 30, 30, 29, 12, 11, 10]
    vocab = model.config.vocab_size - 5
    reqs = [G.Request([5 + (i * 17 + j * 5) % vocab for j in range(n)], 7) for i, n in enumerate(lengths)]
    plain = G.generate_requests(model, tok, reqs, batch_size=len(reqs))  # one group: 10 x 70 > the cap below
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    monkeypatch.setitem(G.PREFILL_TOKENS, "cpu", 64)
    try:
        got = G.generate_requests(model, tok, reqs, batch_size=len(reqs))
    finally:
        hook.remove()
    prefills = [s for s in shapes if s[1] > 1]
    assert prefills[0] == (1, 70)  # over the cap alone
    assert all(r * w <= 64 for r, w in prefills[1:]), prefills
    assert len(prefills) >= 5 and sum(r for r, _ in prefills) == len(reqs)  # one prefill, in capped calls
    assert [g.tokens for g in got] == [g.tokens for g in plain]



def _anon_mib() -> float:
    return int([x for x in open("/proc/self/status") if x.startswith("RssAnon")][0].split()[1]) / 1024


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads RssAnon from /proc")
def test_kv_padding_and_room_to_grow_take_no_memory_on_a_cpu():
    """A CPU batch's KV buffers (``_zeros``) are mapped zero pages that become resident only when written, and
    merging, dropping rows and growing copy a row only from its first attended position (``_copy_live``): left
    padding and the room to grow cost no resident memory. Two parts of 16 rows x 4 heads, 4,096 and 1,024
    positions wide, whose rows attend to their last 16 and 64 positions, merge into buffers of 32 rows x 4,160
    positions (260 MiB for keys and values); of those only the attended 2.5 MiB (and the pages they share)
    become resident. The same after a row is dropped and the buffers grow. Attended values are kept exactly;
    everything else reads as zeros."""
    def part(width, live, seed):
        g = torch.Generator().manual_seed(seed)
        k, v = torch.zeros(16, 4, width, 64), torch.zeros(16, 4, width, 64)
        k[:, :, width - live:] = torch.randn(16, 4, live, 64, generator=g)
        v[:, :, width - live:] = torch.randn(16, 4, live, 64, generator=g)
        layer = G._GrowingLayer(64)
        layer.set(k, v, width)
        mask = torch.zeros(16, width, dtype=torch.long)
        mask[:, width - live:] = 1
        return layer, mask

    class Cache:
        def __init__(self, layer):
            self.layers = [layer]

    (wide, m_wide), (narrow, m_narrow) = part(4096, 16, 0), part(1024, 64, 1)
    live_wide, live_narrow = wide._k[:, :, -16:].clone(), narrow._k[:, :, -64:].clone()
    live_mib = 2 * 4 * 64 * 4 * 16 * (64 + 16) / 2**20
    slack_mib = 2 * 32 * 4 * 2 * 4096 / 2**20  # a page at each end of every row's attended span
    cache = Cache(narrow)
    with torch.no_grad():
        before = _anon_mib()
        mask = G._merge([cache, Cache(wide)], [m_narrow, m_wide], 64)  # the narrow part's rows, then the wide's
        resident = _anon_mib() - before
        k = narrow._k
        assert mask.shape == (32, 4096) and k.shape == (32, 4, 4096 + 64, 64)
        assert resident < live_mib + slack_mib, f"{resident:.1f} MiB resident, {live_mib:.1f} MiB attended"
        assert torch.equal(k[:16, :, 4096 - 64:4096], live_narrow) and torch.equal(k[16:, :, 4096 - 16:4096], live_wide)
        assert not k[:16, :, :4096 - 64].any() and not k[16:, :, :4096 - 16].any() and not k[:, :, 4096:].any()

        before = _anon_mib()
        mask = G._select(cache, torch.arange(1, 32), mask)  # drop the first row
        assert mask.shape == (31, 64)  # the leading columns, padding in every kept row, were dropped
        narrow._reallocate(narrow.keys, 64 + 2 * 64, 64)  # grow
        assert _anon_mib() - before < live_mib + 2 * slack_mib
        k = narrow._k
        assert k.shape == (31, 4, 192, 64)
        assert torch.equal(k[:15, :, :64], live_narrow[1:]) and torch.equal(k[15:, :, 48:64], live_wide)
        assert not k[15:, :, :48].any() and not k[:, :, 64:].any()


def test_rows_dropped_in_place_equal_a_copying_select():
    """A finished row is dropped in place (``_drop``): the last kept rows move into the places of finished ones
    before them. Each kept row's keys and values, its mask and its first attended position are those the
    copying ``_select`` gives (which re-lays every kept row out), in the order ``_drop`` returns; a moved row's
    padding reads as zeros even where the finished row it replaced had values (here NaN); the memory past the
    kept rows is no longer part of the cache. When the kept rows share too many padding columns, ``_drop``
    re-lays them out with ``_select``, which drops those columns."""
    class Cache:
        def __init__(self, layer):
            self.layers = [layer]

    def batch(starts, width=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        k, v = torch.zeros(len(starts), 2, width, 8), torch.zeros(len(starts), 2, width, 8)
        mask = torch.zeros(len(starts), width, dtype=torch.long)
        for i, s in enumerate(starts):
            k[i, :, s:] = torch.randn(2, width - s, 8, generator=g)
            v[i, :, s:] = torch.randn(2, width - s, 8, generator=g)
            mask[i, s:] = 1
        layer = G._GrowingLayer(16)
        layer.set(G._zeros((len(starts), 2, width + 16, 8), k), G._zeros((len(starts), 2, width + 16, 8), v), width)
        layer._k[:, :, :width], layer._v[:, :, :width] = k, v
        layer.starts = list(starts)
        return Cache(layer), mask, k, v

    with torch.no_grad():
        starts = [0, 3, 9, 30, 12, 20]
        cache, mask, k, v = batch(starts)
        cache.layers[0]._k[1, :, 3:], cache.layers[0]._v[1, :, 3:] = float("nan"), float("nan")  # finished
        kept_mask, order = G._drop(cache, [0, 2, 4, 5], mask)
        assert order == [0, 4, 2, 5]  # rows 4 and 5 moved into finished rows 1 and 3; rows 4 and 5 are gone
        layer = cache.layers[0]
        assert layer.keys.shape == (4, 2, 40, 8) and layer._k.shape[0] == 4
        assert torch.equal(layer.keys, k[order]) and torch.equal(layer.values, v[order])  # NaN zeroed: equal
        assert torch.equal(kept_mask, mask[order]) and layer.starts == [starts[i] for i in order]

        ref, ref_mask, _, _ = batch(starts)
        got = G._select(ref, torch.tensor(order), ref_mask)
        assert torch.equal(got, kept_mask) and torch.equal(ref.layers[0].keys, layer.keys)

        if __import__("os").path.exists("/proc/self/status"):  # the dropped rows' memory goes back at once
            cache, mask, _, _ = batch([0] * 8, width=32768)  # 8 rows x 2 x 32,784 x 8 floats: 16 MiB of keys
            cache.layers[0]._k.fill_(1.0), cache.layers[0]._v.fill_(1.0)  # every page resident
            before = _anon_mib()
            G._drop(cache, [0, 1, 2, 3], mask)  # rows 4-7 finish: 8 MiB of keys and 8 MiB of values
            assert before - _anon_mib() > 15  # (the process's other allocations move RssAnon by a few hundred kB)

        cache, mask, k, _ = batch([0, 30, 28, 29])  # row 0 finishes: the rest share 28 padding columns
        kept_mask, order = G._drop(cache, [1, 2, 3], mask)
        assert order == [1, 2, 3] and kept_mask.shape == (3, 12)  # re-laid out by _select, padding dropped
        assert torch.equal(cache.layers[0].keys, k[1:, :, 28:])


def test_requests_that_may_decode_the_most_steps_go_first(tiny_model, one_thread, monkeypatch):
    """The queue runs first the requests that may take the most decode steps (their cap less their draft),
    then the longest prompts: a long answer behind a short prompt starts in the first prefill, not at the
    batch's tail. The answers are those of one batch holding every request."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = talking(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), tok)
    vocab = model.config.vocab_size - 5
    ids = [[5 + (i * 17 + j * 5) % vocab for j in range(n)] for i, n in enumerate([40, 30, 5, 8, 6])]
    plain = G.generate_requests(model, tok, [G.Request(x, 24) for x in ids], batch_size=5)
    caps = [4, 4, 24, 24, 12]
    draft = tuple(plain[3].tokens[:20])  # request 3's own answer: 20 of its 24 tokens come as a draft
    reqs = [G.Request(x, c, draft=draft if i == 3 else ()) for i, (x, c) in enumerate(zip(ids, caps))]
    eng = G._Engine(model, tok, reqs, list(range(5)), [None] * 5, 2, tqdm(disable=True))
    assert eng.queue == [2, 4, 0, 1, 3]  # steps 24, 12, then 4 each: prompts 40, 30, then 8 + a 20-token draft
    first = []
    real_prefill = G._Engine._prefill
    monkeypatch.setattr(G._Engine, "_prefill", lambda self, rows: first.append(list(rows)) or real_prefill(self, rows))
    got = G.generate_requests(model, tok, reqs, batch_size=2)
    assert first[0] == [2, 4]
    for g, p, c in zip(got, plain, caps):  # each answer is the plain one's first tokens, to its own cap
        assert g.tokens == p.tokens[:c]
    assert got[3].drafted == 20
