"""The packed runtime on the tiny random Llama: packed model vs fake-quant model, and its memory.

Tolerance: on a CPU in float32 the torch backend rebuilds exactly the
fake-quant weights and calls the same ``F.linear``, so logits are held to
1e-5 (absolute; they are O(1)) and must agree on the top token everywhere.
The interpreted Triton kernel sums in another order: 1e-4.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quanteval.calibration import capture_inputs
from quanteval.config import AWQConfig, GPTQConfig
from quanteval.generate import generate
from quanteval.methods import QuantSpec, apply_result, rtn_model
from quanteval.methods.awq import awq_model
from quanteval.methods.gptq import gptq_model
from quanteval.models import adapter_for
from quanteval.packed import QuantLinear, model_bytes, pack_model

PROMPTS = ["the king of the north", "one two three", "the river city was"]


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors: one thread (conftest)


@pytest.fixture(scope="module")
def base(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, tok


def _calib(model):
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    return capture_inputs(model, adapter_for(model), ids, batch_size=2)


def quantize(model, kind: str):
    m = copy.deepcopy(model)
    adapter = adapter_for(m)
    if kind == "rtn4_embeddings":  # tied lm_head quantised too
        return rtn_model(m, adapter, QuantSpec(4, 32, False, quantize_embeddings=True))
    if kind == "rtn2_channel_sym":
        return rtn_model(m, adapter, QuantSpec(2, -1, True))
    if kind == "rtn8_partial_groups":  # 64 = 48 + 16, 128 = 2 x 48 + 32
        return rtn_model(m, adapter, QuantSpec(8, 48, False))
    if kind == "gptq3_act_order":
        return gptq_model(m, adapter, QuantSpec(3, 32, False), GPTQConfig(act_order=True, static_groups=False), _calib(m))
    if kind == "awq4_folds":
        return awq_model(m, adapter, QuantSpec(4, 32, False), AWQConfig(n_grid=4, clip_grid=4), _calib(m))
    raise KeyError(kind)


def windows(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["rtn4_embeddings", "rtn2_channel_sym", "rtn8_partial_groups",
                                  "gptq3_act_order", "awq4_folds"])
def test_packed_model_matches_fake_quant(base, kind):
    model, tok = base
    result = quantize(model, kind)
    fake = copy.deepcopy(model)
    apply_result(fake, result)
    packed = pack_model(copy.deepcopy(model), result, backend="torch")
    n_packed = sum(isinstance(m, QuantLinear) for m in packed.modules())
    assert n_packed == len(result.layers)
    if kind == "awq4_folds":
        assert result.folds
    with torch.no_grad():
        ids = windows(model.config.vocab_size)
        a, b = fake(ids).logits, packed(ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    gen_fake = generate(fake, tok, PROMPTS, max_new_tokens=12, batch_size=2)
    gen_packed = generate(packed, tok, PROMPTS, max_new_tokens=12, batch_size=2)
    assert [g.text for g in gen_packed] == [g.text for g in gen_fake]


def test_model_bytes_counts_packed_storage(base):
    model, _ = base
    result = quantize(model, "rtn4_embeddings")
    packed = pack_model(copy.deepcopy(model), result, backend="torch")
    fp32 = model_bytes(model)
    assert fp32 == sum(p.numel() * 4 for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    freed = sum(model.get_submodule(n).weight.nbytes for n in result.layers if n != "lm_head")  # lm_head: tied
    added = sum(sum(t.nbytes for t in (m.packed, m.scales, m.zeros)) + (m.perm.nbytes if m.perm is not None else 0)
                for m in packed.modules() if isinstance(m, QuantLinear))
    assert model_bytes(packed) == fp32 - freed + added
    assert model_bytes(packed) < fp32


def test_unpackable_widths_fail_before_the_model_changes(base):
    model, _ = base
    result = rtn_model(copy.deepcopy(model), adapter_for(model), QuantSpec(5, 32, False))
    target = copy.deepcopy(model)
    with pytest.raises(ValueError, match="5-7 bit widths stay fake-quant only"):
        pack_model(target, result)
    assert not any(isinstance(m, QuantLinear) for m in target.modules())


def test_triton_backend_on_cpu_needs_the_interpreter(base, monkeypatch):
    model, _ = base
    result = quantize(model, "rtn2_channel_sym")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="use backend='torch'"):
        pack_model(copy.deepcopy(model), result, backend="triton")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_packed_model_on_interpreted_triton(base, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, _ = base
    result = quantize(model, "gptq3_act_order")
    fake = copy.deepcopy(model)
    apply_result(fake, result)
    packed = pack_model(copy.deepcopy(model), result, backend="triton")
    with torch.no_grad():
        ids = windows(model.config.vocab_size)[:1, :24]
        a, b = fake(ids).logits, packed(ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


# ---------------------------------------------------------------- runtime=packed in a sweep


def _sweep_args(tiny_model, tiny_data, out, *extra):
    return ["model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}", f"results_dir={out}",
            "preset=smoke", "preset.n_windows=2", "preset.seq_len=64", "preset.max_new_tokens.arith_chain=8",
            "preset.limits.arith_chain=1", *extra]


def test_packed_runtime_sweep_matches_fake_quant_and_records_real_bytes(tiny_model, tiny_data, tmp_path):
    from conftest import run_cli
    from quanteval import results

    got = {}
    for runtime in ("fakequant", "packed"):
        out = tmp_path / runtime
        proc = run_cli(*_sweep_args(tiny_model, tiny_data, out, "method=none,rtn", "bits=4,3",
                                    "task=wikitext2,arith_chain", f"runtime={runtime}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        for f in results.run_files(out / "default"):
            rec = results.read_run(f)
            items = results.run_items(f, rec) or []
            got[runtime, rec["task"], rec["variant"]["label"]] = (rec, [it["output"] for it in items])
    for (runtime, task, label), (rec, outputs) in got.items():
        if runtime != "packed":
            continue
        fq, fq_outputs = got["fakequant", task, label]
        assert rec["memory"]["runtime"] == "packed" and fq["memory"]["runtime"] == "fakequant"
        assert outputs == fq_outputs  # identical greedy texts
        if task == "wikitext2":
            for k in ("ppl", "kl_mean"):
                assert rec["metrics"][k] == pytest.approx(fq["metrics"][k], rel=1e-4, abs=1e-6), (label, k)
            assert rec["metrics"]["same_top1"] == fq["metrics"]["same_top1"]
        if label == "baseline":
            assert rec["memory"]["resident_bytes"] == fq["memory"]["resident_bytes"]
        else:  # packed codes hold fewer bytes than the float weights fake-quant keeps
            assert rec["memory"]["resident_bytes"] < fq["memory"]["resident_bytes"]
    w3 = got["packed", "wikitext2", "rtn w3 g64"][0]["memory"]["resident_bytes"]
    w4 = got["packed", "wikitext2", "rtn w4 g64"][0]["memory"]["resident_bytes"]
    assert w3 < w4


@pytest.mark.parametrize("extra, needle", [
    (["bits=5"], "bits=5: runtime=packed holds 2, 3, 4 and 8 bits"),
    (["kernel=triton"], "kernel=torch"),
])
def test_packed_runtime_bad_input_is_one_line(tiny_model, tiny_data, tmp_path, extra, needle):
    from conftest import run_cli

    proc = run_cli(*_sweep_args(tiny_model, tiny_data, tmp_path, "method=rtn", "task=wikitext2", "runtime=packed",
                                *extra), env={"TRITON_INTERPRET": "0"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
