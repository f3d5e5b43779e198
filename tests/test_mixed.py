"""Sensitivity tables (quanteval.sensitivity, task=sensitivity) and method=mixed (quanteval.methods.mixed):
the exact solve against brute force, a table's units against a direct measurement, bad input, and a sweep."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from conftest import run_cli
from quanteval.methods.mixed import plan, solve
from quanteval.sensitivity import spearman


def test_solve_is_exact_against_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        n, k = rng.randint(1, 5), rng.randint(1, 3)
        kl = [[rng.random() for _ in range(k)] for _ in range(n)]
        cost = [[rng.randint(1, 6) for _ in range(k)] for _ in range(n)]
        cap = rng.randint(sum(map(min, cost)), sum(map(max, cost)))
        best = min((sum(kl[u][c] for u, c in enumerate(cs)), cs) for cs in itertools.product(range(k), repeat=n)
                   if sum(cost[u][c] for u, c in enumerate(cs)) <= cap)
        choices, total = solve(kl, cost, cap)
        assert sum(cost[u][c] for u, c in enumerate(choices)) <= cap
        assert total == pytest.approx(best[0]) and sum(kl[u][c] for u, c in enumerate(choices)) == pytest.approx(total)


def test_plan_meets_the_budget_and_spends_bits_where_kl_is():
    sizes = {f"b{i}.{k}": (64, 128) for i in range(3) for k in "xy"}
    rows = {b: [{"unit": f"{i}.{k}", "layers": [f"b{i}.{k}"], "predicted": (10.0 if (i, k) == (1, "y") else 1.0)
                 / 4 ** b} for i in range(3) for k in "xy"] for b in (2, 4)}
    p = plan(rows, sizes, 64, False, budget=2.7)  # w2 is 2.28 bits, w4 4.31: room for one unit at w4
    assert p["effective_bits"] <= 2.7
    assert p["bits"]["1.y"] == 4 and sum(v == 4 for v in p["bits"].values()) == 1  # the one sensitive unit
    uniform = plan(rows, sizes, 64, False, budget=(2 * 65 + 16) / 64)
    assert set(uniform["bits"].values()) == {2}


def test_spearman():
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(0.894427, abs=1e-5)


@torch.no_grad()
def test_a_units_table_entry_is_the_kl_of_that_unit_alone(tiny_model, tiny_data):
    """The block-input shortcut gives the KL a full forward with only that unit quantised gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quanteval.evaluate import fidelity
    from quanteval.methods import QuantSpec, rtn_model
    from quanteval.models import ADAPTERS
    from quanteval.sensitivity import measure

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    adapter = ADAPTERS["llama"]
    windows = fidelity.make_windows(tok, (tiny_data / "wikitext2" / "valid.txt").read_text(), 2, 48)
    result = rtn_model(model, adapter, QuantSpec(2, 16, False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = measure(model, adapter, windows, result.layers, top_k=16)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the baseline is left in place
    assert len(table.units) == 8 and all(k is not None and k > 0 for k in table.kl)
    base = fidelity.baseline_stats(model, windows, 16)
    j = 6  # block 1 (units 4..7): q/k/v, o, gate/up, down
    u = table.units[j]
    assert u.name == "1.gate/up"
    for name in u.layers:
        model.get_submodule(name).weight.data.copy_(result.layers[name].dequantize())
    direct = fidelity.compare(model, windows, base)["kl_mean"]
    assert table.kl[j] == pytest.approx(direct, rel=1e-4)


def _args(tiny_model, tiny_data, results, *extra):
    return ["model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}", f"results_dir={results}",
            "preset=smoke", "preset.n_windows=2", "preset.seq_len=64", "group_size=16", *extra]


@pytest.mark.parametrize("extra, needle", [
    (["method.budget=1.5"], "method.budget=1.5: must lie between the choices' effective bits"),
    (["method.budget=10"], "method.budget=10: must lie between"),  # w8 at g16 is 9.5 bits
    (["method.choices=[2,9]"], "method.choices=[2, 9]: method.base=rtn supports 2..8 bits, not 9"),
    (["method.base=mixed"], "method.base=mixed"),
    (["method.base=bnb"], "method.base='bnb': must be one of rtn, gptq, awq, hqq"),
    (["method.base=hqq", "method.choices=[2,5]"], "method.choices=[2, 5]: method.base=hqq supports 2, 3, 4, 8 bits, not 5"),
    (["method.base=hqq", "method.choices=[2,4]", "method.budget=5", "runtime=packed"],
     "runtime=packed: method=hqq makes a non-affine result"),  # before any table is computed
    (["method.base=hqq", "method.choices=[2,4]", "method.budget=6.5"], "method.budget=6.5: must lie between the choices' effective bits at group_size=16: 4.00 (w2) and 6.00 (w4)"),
])
def test_bad_mixed_input_names_the_field(tiny_model, tiny_data, tmp_path, extra, needle):
    proc = run_cli(*_args(tiny_model, tiny_data, tmp_path, "method=mixed", "task=wikitext2", *extra))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr


def test_mixed_sweep_computes_its_tables_then_meets_its_budget(tiny_model, tiny_data, tmp_path):
    base = _args(tiny_model, tiny_data, tmp_path)
    proc = run_cli(*base, "method=none,rtn", "bits=2,4", "task=wikitext2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(*base, "method=mixed", "method.choices=[2,4]", "method.budget=3.5", "task=wikitext2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "default" / "runs").glob("*.json")]
    tables = [r for r in runs if r["task"] == "sensitivity"]
    assert sorted(r["variant"]["bits"] for r in tables) == [2, 4]
    for r in tables:
        assert r["metrics"]["n_units"] == 8 and r["metrics"]["n_measured"] == 8
    mixed = next(r for r in runs if r["variant"]["label"].startswith("mixed-rtn"))
    info = mixed["quantization"]["mixed"]
    assert info["effective_bits"] <= 3.5 and set(info["bits"].values()) <= {2, 4}
    assert mixed["compression"]["effective_bits"] == pytest.approx(info["effective_bits"])
    kl = {r["variant"]["label"]: r["metrics"]["kl_mean"] for r in runs if r["task"] == "wikitext2"}
    assert kl["rtn w4 g16"] <= kl[mixed["variant"]["label"]] <= kl["rtn w2 g16"]
    report = tmp_path / "default" / "report"
    assert list(report.glob("sensitivity__*.png")) and list(report.glob("mixed__*.png"))
    assert mixed["variant"]["label"] in (report / "index.html").read_text()  # a column like any other


def test_plan_costs_units_by_the_bits_their_tables_stored():
    """With ``storage_bits`` in the rows (hqq's fp16 zeros, its 3-bit packing) the solve spends exactly those."""
    sizes = {f"b{i}.x": (64, 128) for i in range(4)}
    stored = {2: 2.5, 4: 4.5}  # hqq at g64: an fp16 scale and zero per group
    rows = {b: [{"unit": f"{i}.x", "layers": [f"b{i}.x"], "predicted": (5.0 if i == 2 else 1.0) / 4 ** b,
                 "storage_bits": int(64 * 128 * stored[b])} for i in range(4)] for b in (2, 4)}
    p = plan(rows, sizes, 64, False, budget=3.0)  # (3 x 2.5 + 4.5) / 4 = 3.0: one unit at 4 bits
    assert p["effective_bits"] == pytest.approx(3.0) and p["bits"]["2.x"] == 4
    assert sum(v == 4 for v in p["bits"].values()) == 1
    affine = plan({b: [{k: v for k, v in r.items() if k != "storage_bits"} for r in rs] for b, rs in rows.items()},
                  sizes, 64, False, budget=3.0)  # the affine count (2.28 / 4.31 bits) fits one unit at 4 too
    assert affine["effective_bits"] == pytest.approx((3 * (2 + 18 / 64) + 4 + 20 / 64) / 4)


def test_mixed_hqq_sweep_reads_hqq_tables_and_meets_its_budget(tiny_model, tiny_data, tmp_path):
    pytest.importorskip("hqq")
    base = _args(tiny_model, tiny_data, tmp_path)
    proc = run_cli(*base, "method=mixed", "method.base=hqq", "method.choices=[2,4]", "method.budget=4.5",
                   "task=wikitext2")  # hqq at g16: w2 is 4.0 bits, w4 6.0
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "default" / "runs").glob("*.json")]
    tables = [r for r in runs if r["task"] == "sensitivity"]
    assert sorted((r["variant"]["method"], r["variant"]["bits"]) for r in tables) == [("hqq", 2), ("hqq", 4)]
    (mixed,) = [r for r in runs if r["variant"]["label"].startswith("mixed-hqq")]
    info = mixed["quantization"]["mixed"]
    assert info["effective_bits"] <= 4.5 and set(info["bits"].values()) == {2, 4}
    # the solve's count is hqq's own: the run's accounting of the layers hqq made agrees with it
    assert mixed["compression"]["effective_bits"] == pytest.approx(info["effective_bits"])
    assert set(mixed["compression"]["formats"]) == {"hqq b2 g16", "hqq b4 g16"}
    from quanteval import export as ex

    (path,) = (tmp_path / "default" / "runs").glob("wikitext2__*mixed-hqq*.json")
    with pytest.raises(ex.ExportError, match="holds hqq b[24] g16 layers"):  # float zeros: no integer format
        ex.export(path, tmp_path / "ckpt")


def test_mixed_awq_sweep_measures_units_in_awqs_basis_and_meets_its_budget(tiny_model, tiny_data, tmp_path):
    """AWQ's tables apply each unit in the scaled basis (the folds into the norms, the scales into the
    columns); the mix searches each scale group at its unit's width and keeps AWQ's folds."""
    base = _args(tiny_model, tiny_data, tmp_path)
    proc = run_cli(*base, "method=none,awq", "bits=2,4", "task=wikitext2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(*base, "method=mixed", "method.base=awq", "method.choices=[2,4]", "method.budget=3.5",
                   "task=wikitext2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "default" / "runs").glob("*.json")]
    tables = [r for r in runs if r["task"] == "sensitivity"]
    assert sorted((r["variant"]["method"], r["variant"]["bits"]) for r in tables) == [("awq", 2), ("awq", 4)]
    assert all(r["metrics"]["n_measured"] == 8 and r["metrics"]["kl_max"] > 0 for r in tables)
    (mixed,) = [r for r in runs if r["variant"]["label"].startswith("mixed-awq")]
    info = mixed["quantization"]["mixed"]
    assert info["effective_bits"] <= 3.5 and set(info["bits"].values()) == {2, 4}
    assert mixed["compression"]["effective_bits"] == pytest.approx(info["effective_bits"])
    assert mixed["quantization"]["alphas"]  # AWQ's own search ran, and its folds are in the result
    kl = {r["variant"]["label"]: r["metrics"]["kl_mean"] for r in runs if r["task"] == "wikitext2"}
    assert kl["awq w4 g16"] <= kl[mixed["variant"]["label"]] <= kl["awq w2 g16"]


@pytest.fixture(scope="module")
def mixed_export(tiny_model, tiny_data, tmp_path_factory):
    pytest.importorskip("compressed_tensors")
    from quanteval import export as ex
    from quanteval import results
    from quanteval.methods import QuantResult

    res = tmp_path_factory.mktemp("mixed_export")
    proc = run_cli(*_args(tiny_model, tiny_data, res, "method=mixed", "method.choices=[2,4]",
                          "method.budget=3.6", "task=wikitext2"))  # w2 is 3.125 bits at g16, w4 5.25
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (res / "default" / "runs").glob("wikitext2__*mixed-rtn*.json")
    record = results.read_run(path)
    assert set(record["quantization"]["mixed"]["bits"].values()) == {2, 4}
    out = ex.export(path, res / "ckpt")
    return out, QuantResult.load(ex.quant_cache_path(path, record))


def test_mixed_exports_with_a_config_group_per_width(mixed_export):
    """Each width is its own config group, and every layer's packed codes, read back by compressed-tensors'
    own unpacking, are the run's codes."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    out, result = mixed_export
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = {g["weights"]["num_bits"]: set(g["targets"]) for g in cfg["config_groups"].values()}
    assert sorted(groups) == [2, 4]
    tensors = load_file(out / "model.safetensors")
    for name, lq in result.layers.items():
        assert name in groups[lq.bits]
        shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
        codes = unpack_from_int32(tensors[f"{name}.weight_packed"], lq.bits, shape)
        assert torch.equal(codes.to(torch.int16) + 2 ** (lq.bits - 1), lq.codes.to(torch.int16)), name
        assert torch.equal(tensors[f"{name}.weight_scale"].float(), lq.scales.float()), name


@pytest.mark.xfail(raises=AssertionError, strict=True,
                   reason="transformers 5.24 + compressed-tensors 0.20 (dequantize=True): with two config groups, "
                          "the second group's layers reload wrong (max |dw| about 0.09), though their files decode "
                          "right with compressed-tensors' own unpack_from_int32 (the test above)")
def test_mixed_export_reloads_in_transformers(mixed_export, tiny_model):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from quanteval.methods import apply_result

    out, result = mixed_export
    fake = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    apply_result(fake, result)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    ids = torch.randint(0, fake.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, fake(ids).logits, rtol=0, atol=1e-5)
