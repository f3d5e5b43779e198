"""Typed run records (``quanteval.results.RunRecord``) on run files quanteval 0.2.0 wrote, and the report on them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from quanteval_tasks import task_table

from quanteval.report import build
from quanteval.results import Compression, ModelInfo, RunRecord, TaskMeta, VariantInfo

FIXTURE = Path(__file__).parent / "fixtures" / "runs-0.2.0"
FILES = {  # run file -> (status, task, variant label)
    "gsm8k__hf__baseline__7626bd0e9750.json": ("ok", "gsm8k", "baseline"),
    "gsm8k__hf__rtn-w2-g64__5144097fe33d.json": ("collapsed", "gsm8k", "rtn w2 g64"),
    "gsm8k__hf__rtn-w4-g64__e6065bc5021e.json": ("ok", "gsm8k", "rtn w4 g64"),
    "no_such_task__hf__rtn-w4-g64__deda7c9f7a2b.json": ("failed", "no_such_task", "rtn w4 g64"),
    "wikitext2__hf__baseline__60d71df1b8dc.json": ("ok", "wikitext2", "baseline"),
    "wikitext2__hf__rtn-w2-g64__b1dd9e3554e8.json": ("ok", "wikitext2", "rtn w2 g64"),
    "wikitext2__hf__rtn-w4-g64__2a14e0ddc05f.json": ("ok", "wikitext2", "rtn w4 g64"),
}


def test_fixture_lists_every_run_file():
    assert sorted(p.name for p in (FIXTURE / "runs").glob("*.json")) == sorted(FILES)


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_0_2_0_run_file_loads(name):
    status, task, label = FILES[name]
    path = FIXTURE / "runs" / name
    rec = RunRecord.read(path)
    raw = json.loads(path.read_text())
    assert (rec.status, rec.task, rec.variant.label, rec.run_key) == (status, task, label, raw["run_key"])
    assert rec.model.name == "hf" and rec.sweep_name == "fixture" and rec.task_meta is None
    assert rec.metrics == (raw.get("metrics") or {})
    if status == "ok":
        assert rec.versions["quanteval"] == "0.2.0" and rec.compression.effective_bits is not None
        assert rec.model.provenance.startswith("/tmp/fx/tiny_llama") and rec.model.n_params == 86848
    if task == "wikitext2" and status == "ok":
        assert {"ppl", "kl_mean", "same_top1"} <= set(rec.metrics) and len(rec.per_window["nll_mean"]) == 2
    if task == "gsm8k" and status == "ok":
        assert rec.primary_metric == "exact_match,flexible-extract" and rec.primary_metric in rec.metrics
        assert rec.items_file and (path.parent / rec.items_file).exists()
        assert set(rec.breakdown["n_steps"]["2"]) >= {"n", "exact_match,flexible-extract"}
    if status == "collapsed":
        assert rec.reason.startswith("collapsed on language-model fidelity") and rec.compression == Compression()
    if status == "failed":
        assert rec.error == "ValueError: task.name=no_such_task: not an lm-eval task" and rec.timings["load_s"] > 0


def test_unknown_keys_and_missing_sections():
    rec = RunRecord.from_dict({"run_key": "k", "status": "ok", "from_the_future": [1],
                               "variant": {"method": "gptq", "bits": 3, "label": "gptq w3", "act_order": True},
                               "model": {"name": "m", "gguf_sha256": "ab"}, "compression": None, "metrics": None,
                               "task_meta": {"kind": "code", "charts": [{"by_tag": "k"}], "new_hint_field": 1}})
    assert rec.variant == VariantInfo(method="gptq", bits=3, label="gptq w3")
    assert rec.model == ModelInfo(name="m") and rec.compression == Compression() and rec.metrics == {}
    assert rec.task_meta == TaskMeta(kind="code", charts=({"by_tag": "k"},))


def test_task_meta_is_what_the_sweep_writes():
    for info in task_table().values():
        meta = TaskMeta.from_dict(info.to_json())
        assert (meta.kind, meta.licence, meta.charts) == (info.kind, info.licence, info.charts)
        assert (meta.primary, meta.binary) == (info.primary, info.binary)


@pytest.mark.parametrize("bad, message", [
    ({"status": "ok"}, "no run_key/status"),
    ({"run_key": "k", "status": "ok", "variant": "rtn"}, "variant: must be a mapping, not str"),
    ({"run_key": "k", "status": "ok", "metrics": [1.0]}, "metrics: must be a mapping, not list"),
    ({"run_key": "k", "status": "ok", "task_meta": {"charts": "by_tag"}}, "task_meta.charts='by_tag'"),
])
def test_malformed_records_name_the_file(tmp_path, bad, message):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="x.json: ") as e:
        RunRecord.read(path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def fixture_report(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("records") / "sweep"
    shutil.copytree(FIXTURE, sweep)
    return build(sweep), sweep


def test_report_on_0_2_0_runs(fixture_report):
    report, sweep = fixture_report
    assert report.unreadable == [] and report.index.exists()
    cells = {(c.task, c.metric, c.label): c for c in report.cells}
    assert {t for t, _, _ in cells} == {"wikitext2", "gsm8k"}  # the failed lm-eval run names no metric: no row
    assert cells[("wikitext2", "kl_mean", "rtn w4 g64")].verdict == "survives"
    assert cells[("wikitext2", "ppl", "baseline")].verdict == "baseline"
    collapsed = cells[("gsm8k", "exact_match,flexible-extract", "rtn w2 g64")]
    assert collapsed.verdict == "collapses" and collapsed.note.startswith("collapsed on language-model fidelity")
    floor = cells[("gsm8k", "exact_match,flexible-extract", "rtn w4 g64")]
    assert floor.note == "baseline at floor" and floor.verdict == "survives"  # judged by its teacher-forced KL
    page = report.index.read_text()
    assert "failed: <span class=error>ValueError: task.name=no_such_task: not an lm-eval task</span>" in page
    assert "Kinds: math: gsm8k; language modelling: wikitext2." in page  # from gsm8k's YAML and the built-in
    assert "gsm8k: GSM8K (openai/grade-school-math), MIT licence." in page
    assert (sweep / "report" / "gsm8k_kl_pos__hf.png").exists()
    assert set(report.recommendation["hf"]) == {"math", "language modelling", "all tasks"}
