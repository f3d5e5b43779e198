"""The report built from synthetic run files (no torch): matrix, CIs, labels, pages, exports, CLI, task hints."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import quanteval.thresholds
from quanteval.cli import _report_parser, report_main as main
from quanteval.report import Thresholds, build, build_report, failing, summary, verdict
from quanteval.report.cells import label_high, label_low
from quanteval.results import load, write_atomic, write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE_BYTES = 269_030_016
XSS = "<script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=1\">"
N_ITEMS = 40


def _variant(method, bits):
    if method == "none":
        return {"method": "none", "bits": None, "group_size": None, "sym": None, "label": "baseline"}, 16.0
    eff = bits + 0.3
    return {"method": method, "bits": bits, "group_size": 64, "sym": False, "label": f"{method} w{bits} g64"}, eff


def _base(key, task, method, bits, model="smollm2_135m", limit=8):
    v, eff = _variant(method, bits)
    return {"run_key": key, "status": "ok", "sweep_name": "default", "task": task,
            "model": {"name": model, "provenance": f"{model} <GGUF> dequantized"},
            "variant": v, "compression": {"effective_bits": eff, "model_bytes": int(BASE_BYTES * eff / 16)},
            "settings": {"task": {"name": task}, "preset": {"limit": limit}, "model": {"name": model}}}


def _wikitext(key, method, bits, kl, model="smollm2_135m"):
    rec = _base(key, "wikitext2", method, bits, model)
    nll = [3.0 + kl * (1 + 0.1 * i) for i in range(8)]
    rec["metrics"] = {"ppl": float(pd.Series(nll).mean()), "kl_mean": kl, "same_top1": 1 - min(kl, 0.9)}
    import math

    rec["metrics"]["ppl"] = math.exp(sum(nll) / len(nll))
    rec["per_window"] = {"nll_mean": nll, "kl_mean": [kl * (0.8 + 0.05 * i) for i in range(8)],
                         "same_top1": [1 - min(kl, 0.9)] * 8}
    return rec


def _gsm8k(key, method, bits, correct: list[int], base_correct: list[int] | None, kl, model="smollm2_135m",
           limit=8, outputs=None):
    rec = _base(key, "gsm8k", method, bits, model, limit)
    items = []
    for i, c in enumerate(correct):
        out = (outputs or {}).get(i, f"answer #### {i if c else -1}")
        it = {"id": f"gsm8k-{i}", "input": f"question {i}", "output": out, "finish": "eos", "n_tokens": 10,
              "scores": {"exact_match,flexible-extract": float(c), "exact_match,strict-match": float(c)},
              "extracted": {}, "extra": {}, "tags": {"n_steps": 1 + i % 3},
              "tf": {"n_tokens": 20, "nll_mean": 1.0, "kl_mean": kl * (0.5 + (i % 4) / 4), "top1": 0.9,
                     "kl_pos": [kl] * 20}}
        if base_correct is not None:
            was = base_correct[i]
            it["flip"] = "lost" if was and not c else "gained" if c and not was else None
        items.append(it)
    lost = sum(1 for it in items if it.get("flip") == "lost")
    gained = sum(1 for it in items if it.get("flip") == "gained")
    rec["metrics"] = {"exact_match,flexible-extract": sum(correct) / len(correct), "primary": sum(correct) / len(correct),
                      "tf_kl_mean": kl, "n_items": len(correct), "flips_lost": lost, "flips_gained": gained,
                      "flip_rate": (lost + gained) / len(correct), "mcnemar_p": 1.0}
    rec["primary_metric"] = "exact_match,flexible-extract"
    rec["breakdown"] = {"n_steps": {}}
    return rec, items


def _write(d: Path, rec: dict, items=None):
    path = d / "runs" / f"{rec['task']}__{rec['model']['name']}__{rec['run_key']}.json"
    if items is not None:
        name = path.stem + ".items.jsonl"
        write_atomic(path.with_name(name), "".join(json.dumps(it) + "\n" for it in items))
        rec["items_file"] = name
    write_run(path, rec)


BASE_OK = [1] * 30 + [0] * 10  # the baseline solves 30 of 40


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("results") / "default"
    for key, method, bits, kl in [("b", "none", None, 0.0), ("r8", "rtn", 8, 0.001), ("r4", "rtn", 4, 0.3),
                                  ("g4", "gptq", 4, 0.08), ("r3", "rtn", 3, 0.9), ("r2", "rtn", 2, 8.0)]:
        _write(d, _wikitext(f"wt-{key}", method, bits, kl))
    _write(d, *_gsm8k("gs-b", "none", None, BASE_OK, None, 0.0))
    _write(d, *_gsm8k("gs-r8", "rtn", 8, BASE_OK, BASE_OK, 0.002))  # identical answers: survives
    half = [1] * 15 + [0] * 25
    _write(d, *_gsm8k("gs-r4", "rtn", 4, half, BASE_OK, 0.3, outputs={0: XSS}))  # lost half
    near = [1] * 29 + [0] * 10 + [1]
    _write(d, *_gsm8k("gs-g4", "gptq", 4, near, BASE_OK, 0.05))  # one lost, one gained
    _write(d, *_gsm8k("gs-r3", "rtn", 3, [0] * 40, BASE_OK, 0.9))
    collapsed = _base("gs-r2", "gsm8k", "rtn", 2)
    collapsed.update(status="collapsed", metrics={},
                     reason="collapsed on language-model fidelity: WikiText-2 mean KL 8 > collapse_kl=2")
    _write(d, collapsed)
    failed = _base("gs-bad", "gsm8k", "awq", 4)
    failed.update(status="failed", error="RuntimeError: scale is <nan>")
    _write(d, failed)
    # a task whose baseline is at floor (like tiny models on HumanEval)
    floor_b, items_b = _gsm8k("hv-b", "none", None, [0] * 40, None, 0.0)
    floor_q, items_q = _gsm8k("hv-r4", "rtn", 4, [0] * 39 + [1], [0] * 40, 0.3)
    for rec in (floor_b, floor_q):
        rec["task"] = "humaneval"
        rec["primary_metric"] = "exact_match,flexible-extract"
    _write(d, floor_b, items_b)
    _write(d, floor_q, items_q)
    # the same task at another limit (another sweep): its own rows, a warning
    other, other_items = _gsm8k("gs-other", "rtn", 4, BASE_OK, BASE_OK, 0.1, limit=16)
    _write(d, other, other_items)
    # a second model without a baseline
    _write(d, _wikitext("wt-x4", "rtn", 4, 0.2, model="other_model"))
    (d / "runs" / "broken.json").write_text('{"run_key": "x", "status": ')
    return d


@pytest.fixture(scope="module")
def report(sweep):
    return build(sweep)


def _cell(report, row, label, model="smollm2_135m"):
    return next(c for c in report.cells if c.model == model and c.row == row and c.label == label)


def test_labels_with_uncertainty():
    assert label_high(0.99, (0.98, 1.0), 0.97, 0.5) == "survives"
    assert label_high(0.99, (0.90, 1.0), 0.97, 0.5) == "survives?"
    assert label_high(0.80, (0.70, 0.90), 0.97, 0.5) == "degrades"
    assert label_high(0.80, (0.45, 0.90), 0.97, 0.5) == "degrades?"
    assert label_high(0.30, (0.20, 0.40), 0.97, 0.5) == "collapses"
    assert label_high(0.30, (0.20, 0.60), 0.97, 0.5) == "collapses?"
    assert label_low(0.05, (0.04, 0.06), 0.1, 1.0) == "survives"
    assert label_low(0.05, (0.04, 0.2), 0.1, 1.0) == "survives?"
    assert label_low(2.0, (1.5, 3.0), 0.1, 1.0) == "collapses"
    assert [verdict(x, Thresholds()) for x in (0.0, 0.1, 1.0)] == ["survives", "degrades", "collapses"]
    with pytest.raises(ValueError):
        Thresholds(survives=0.4, collapses=0.5)


def test_quality_cells_ratio_ci_and_flips(report):
    same = _cell(report, "gsm8k: exact_match,flexible-extract", "rtn w8 g64")
    assert same.metric == "exact_match,flexible-extract"
    assert _cell(report, "gsm8k: teacher-forced KL", "rtn w8 g64").metric == "tf_kl_mean"
    assert same.retained == 1.0 and same.ci == (1.0, 1.0) and same.verdict == "survives"
    half = _cell(report, "gsm8k: exact_match,flexible-extract", "rtn w4 g64")
    assert half.retained == pytest.approx(0.5) and half.ci[0] < 0.5 < half.ci[1]
    assert half.verdict == "degrades?"  # 0.5 is not below the collapse threshold, but its CI reaches below
    assert half.flips == {"lost": 15, "gained": 0, "rate": 15 / 40, "mcnemar_p": 1.0}
    near = _cell(report, "gsm8k: exact_match,flexible-extract", "gptq w4 g64")
    assert near.retained == pytest.approx(1.0) and near.ci[0] < 0.97 <= near.ci[1] and near.verdict == "survives?"
    zero = _cell(report, "gsm8k: exact_match,flexible-extract", "rtn w3 g64")
    assert zero.retained == 0 and zero.verdict == "collapses"


def test_fidelity_cells_from_windows(report):
    kl = _cell(report, "wikitext2: mean KL", "gptq w4 g64")
    assert [_cell(report, f"wikitext2: {r}", "gptq w4 g64").metric for r in ("perplexity", "mean KL", "same top-1")] == [
        "ppl", "kl_mean", "same_top1"]
    assert kl.value == 0.08 and kl.ci is not None and kl.ci[0] <= 0.08 * 1.15 and kl.verdict.startswith("survives")
    assert _cell(report, "wikitext2: mean KL", "rtn w2 g64").verdict == "collapses"
    ppl = _cell(report, "wikitext2: perplexity", "rtn w8 g64")
    assert ppl.retained == pytest.approx(ppl.base_value / ppl.value) and ppl.ci[0] <= ppl.retained <= ppl.ci[1]


def test_floor_collapsed_failed_and_no_baseline(report):
    floor = _cell(report, "humaneval: exact_match,flexible-extract", "rtn w4 g64")
    assert floor.note == "baseline at floor" and floor.retained is None
    assert floor.verdict.startswith("degrades")  # from teacher-forced KL 0.3, not from a ratio
    col = _cell(report, "gsm8k: exact_match,flexible-extract", "rtn w2 g64")
    assert col.verdict == "collapses" and "collapse_kl" in col.note
    assert _cell(report, "gsm8k: exact_match,flexible-extract", "awq w4 g64").verdict == "failed"
    nb = _cell(report, "wikitext2: mean KL", "rtn w4 g64", model="other_model")
    assert nb.verdict == "no baseline"


def test_mixed_settings_are_never_averaged(report):
    assert any("different evaluation settings" in w for w in report.warnings)
    rows = {c.row for c in report.cells if c.task == "gsm8k"}
    assert rows == {"gsm8k: exact_match,flexible-extract", "gsm8k: teacher-forced KL",
                    "gsm8k: exact_match,flexible-extract [other settings 1]", "gsm8k: teacher-forced KL [other settings 1]"}
    other = [c for c in report.cells if c.run_key == "gs-other" and c.kind == "quality"]
    assert other[0].verdict == "no baseline"  # its settings have no baseline; it is not compared with another's


def test_recommendation(report):
    rec = report.recommendation["smollm2_135m"]
    assert rec["language modelling"]["variant"] == "gptq w4 g64"  # KL 0.08, CI clear of 0.1, smaller than rtn w8
    assert rec["math"]["variant"] == "rtn w8 g64"  # gptq w4 lost one item and gained one: "survives?" only
    assert rec["all tasks"]["variant"] is None and "no quantised variant" in rec["all tasks"]["reason"]
    page = report.index.read_text()
    assert page.index("Which one do I ship?") < page.index("Verdict matrix")


def test_index_matrix_cells_and_escaping(report):
    page = report.index.read_text()
    matrix = re.search(r'<table class="matrix" data-model="smollm2_135m">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr><th class=rowhead>", matrix)
    cells = re.findall(r'<td class="cell', matrix)
    cols = len(re.findall(r"<th>[^<]*<br><small>", matrix))
    assert cols == 7 and len(cells) == len(rows) * cols  # baseline, rtn 8/4/3/2, gptq 4, awq 4 (failed)
    assert "<script>" not in page and "RuntimeError: scale is &lt;nan&gt;" in page
    assert "runs/broken.json" in page.split("<h2>Unreadable runs</h2>")[1]


def test_item_pages_escape_and_highlight(report, sweep):
    page = (sweep / "report" / "items" / "smollm2_135m__gsm8k__rtn-w4-g64.html").read_text()
    assert XSS not in page and "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page
    assert page.count('class="item flip-lost"') == 15
    assert 'id="f-flipped"' in page and 'id="f-failed"' in page
    assert "MIT licence" in page


def test_charts_and_exports(report, sweep):
    page = report.index.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    names = {s.split("__")[0] for s in srcs}
    assert {"quality", "kl", "flips", "pareto", "gsm8k_kl_pos"} <= names
    for src in srcs:
        assert (sweep / "report" / src).read_bytes().startswith(PNG_MAGIC)
        assert (sweep / "report" / src.replace(".png", ".svg")).read_text().lstrip().startswith("<?xml")
    out = sweep / "report"
    metrics = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(metrics, load(sweep, table="metrics"))
    items = pd.read_parquet(out / "items.parquet")
    pd.testing.assert_frame_equal(items, load(sweep, table="items"))
    assert len(pd.read_csv(out / "results.csv")) == len(metrics)
    assert {"metric", "value", "run_key", "label"} <= set(metrics.columns)
    doc = json.loads((out / "verdicts.json").read_text())
    assert doc["thresholds"]["survives"] == 0.97 and "smollm2_135m" in doc["recommendation"]
    assert len(doc["verdicts"]) == len(report.cells)
    assert {"model", "row", "label", "verdict", "ci"} <= set(doc["verdicts"][0])
    assert "metric" not in doc["verdicts"][0]  # verdicts.json keeps its 0.2 shape


def test_summary_and_fail_on(report, sweep, tmp_path, capsys):
    text = summary(report.cells)
    assert "gsm8k: exact_match,flexible-extract" in text and "COL" in text
    assert failing(report.cells, "collapses")
    assert main([str(sweep), "--out", str(tmp_path / "a"), "--fail-on", "collapses"]) == 1
    err = capsys.readouterr().err
    assert "match --fail-on collapses" in err
    assert main([str(sweep), "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "b" / "index.html")


def test_bad_input(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope"):
        build_report(tmp_path / "nope")
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    with pytest.raises(ValueError, match="no run files"):
        build_report(tmp_path / "empty")
    for argv in ([str(tmp_path / "missing")], [str(tmp_path / "empty")], [str(tmp_path), "--kl-survives", "x"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("quanteval-report: error: ") and err.count("\n") == 1, err


def test_thresholds_are_the_one_class_and_flags_come_from_it(sweep, tmp_path):
    assert Thresholds is quanteval.thresholds.Thresholds
    flags = {a.dest: a.option_strings for a in _report_parser()._actions}
    for name, _, _ in Thresholds.flags():
        assert flags[name] == [f"--{name.replace('_', '-')}"]
    assert main([str(sweep), "--out", str(tmp_path / "r"), "--kl-survives", "0.05", "--n-boot", "200"]) == 0
    t = json.loads((tmp_path / "r" / "verdicts.json").read_text())["thresholds"]
    assert t["kl_survives"] == 0.05 and t["n_boot"] == 200 and t["survives"] == 0.97


@pytest.mark.parametrize("argv, message", [
    (["--survives", "2"], "--survives=2: must be in (collapses, 1]"),
    (["--collapses", "0.99"], "--collapses=0.99: must be in (0, survives) (survives=0.97)"),
    (["--survives", "0.6", "--collapses", "0.7"], "--collapses=0.7: must be in (0, survives) (survives=0.6)"),
    (["--kl-survives", "1"], "--kl-survives=1: must be in (0, kl_collapses) (kl_collapses=1.0)"),
    (["--kl-survives", "0.5", "--kl-collapses", "0.2"], "--kl-survives=0.5: must be in (0, kl_collapses)"),
    (["--floor", "1"], "--floor=1: must be in [0, 1)"),
    (["--top1-survives", "1.5"], "--top1-survives=1.5: must be in (top1_collapses, 1]"),
    (["--n-boot", "50"], "--n-boot=50: must be an integer >= 100"),
])
def test_bad_threshold_flag_is_one_line_before_any_work(tmp_path, capsys, argv, message):
    # the sweep folder does not exist: the error must be the flag's, found before anything is read
    assert main([str(tmp_path / "missing"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"quanteval-report: error: {message}") and err.count("\n") == 1, err


def _tagged(key, task, method, bits, acc_by_tag: dict, tag: str, task_meta=None):
    rec, items = _gsm8k(key, method, bits, BASE_OK, None if method == "none" else BASE_OK, 0.01)
    rec["task"] = task
    rec["breakdown"] = {tag: {str(v): {"n": 10, "exact_match,flexible-extract": a} for v, a in acc_by_tag.items()}}
    if task_meta is not None:
        rec["task_meta"] = task_meta
    return rec, items


def test_task_knowledge_comes_from_the_task(tmp_path):
    d = tmp_path / "sweep"
    # arith_chain as 0.2.0 wrote it (no task_meta): kind, licence and the by-steps chart come from its YAML
    for key, method, bits in (("a-b", "none", None), ("a-r4", "rtn", 4)):
        _write(d, *_tagged(key, "arith_chain", method, bits, {1: 0.9, 2: 0.8, 8: 0.5}, "k"))
    # a task no YAML defines, declared by its records: its kind, licence and chart follow the record
    meta = {"kind": "chat", "licence": "Home-made dialogues, CC0.", "charts": [{"by_tag": "level"}],
            "primary": "exact_match,flexible-extract", "binary": True}
    for key, method, bits in (("m-b", "none", None), ("m-r4", "rtn", 4)):
        _write(d, *_tagged(key, "my_task", method, bits, {"easy": 0.9, "hard": 0.4}, "level", meta))
    report = build(d)
    out = d / "report"
    assert (out / "arith_steps__smollm2_135m.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "my_task_by_level__smollm2_135m.svg").exists()
    kinds = report.recommendation["smollm2_135m"]
    assert kinds["math"]["tasks"] == ["arith_chain"] and kinds["chat"]["tasks"] == ["my_task"]
    page = report.index.read_text()
    assert "Kinds: chat: my_task; math: arith_chain." in page
    assert "arith_chain: Generated by quanteval (seeded)." in page and "my_task: Home-made dialogues, CC0." in page
    assert "Home-made dialogues, CC0." in (out / "items" / "smollm2_135m__my_task__rtn-w4-g64.html").read_text()


def test_report_never_imports_torch(sweep, tmp_path):
    code = ("import quanteval.report, sys; assert 'torch' not in sys.modules; "
            f"quanteval.report.build({str(sweep)!r}, {str(tmp_path / 'r')!r}); assert 'torch' not in sys.modules; "
            "from quanteval.cli import report_main; assert 'torch' not in sys.modules")  # its console script too
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_math_cells_of_a_variant_calibrated_on_gsm8k_train_are_marked_in_domain(tmp_path):
    from quanteval.report.cells import in_domain_calibration
    from quanteval.results import RunRecord

    def rec(task, calibration):
        d = _base("k", task, "gptq", 4)
        if calibration is not None:
            d["settings"]["calibration"] = calibration
        return RunRecord.from_dict(d)

    mix = {"dataset": "mix", "path": None, "chat_share": 0.5}
    assert in_domain_calibration(rec("gsm8k", mix)) == "gsm8k"
    assert in_domain_calibration(rec("arith_chain", {"dataset": "gsm8k", "path": None})) == "gsm8k"
    assert in_domain_calibration(rec("ifeval", mix)) == ""  # not a math task
    assert in_domain_calibration(rec("gsm8k", {"dataset": "wikitext2", "path": None})) == ""
    assert in_domain_calibration(rec("gsm8k", None)) == ""  # RTN: no calibration
    # and the matrix says so on the cell
    sweep = tmp_path / "s"
    base, items = _gsm8k("b", "none", None, BASE_OK, None, 0.0)
    _write(sweep, base, items)
    q, qitems = _gsm8k("q", "gptq", 4, BASE_OK, BASE_OK, 0.05)
    q["settings"]["calibration"] = mix
    _write(sweep, q, qitems)
    html = build_report(sweep).read_text()
    assert "calibrated in-domain (gsm8k train)" in html
