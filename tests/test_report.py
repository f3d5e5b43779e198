"""Tests for quanteval.report: the HTML report built from synthetic run files (no torch)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from quanteval.report import Thresholds, build_report, main, verdict
from quanteval.results import write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE_BYTES = 269_030_016
XSS_LABEL = "rtn w3 <script>alert(1)</script>"

# (run_key, method, bits, effective_bits, ppl, kl_mean, label, expected verdict)
RUNS = [
    ("base", "none", None, 16.0, 20.0, 0.0, "baseline", "baseline"),
    ("rtn8", "rtn", 8, 8.5, 20.1, 0.01, "rtn w8 g64", "survives"),
    ("rtn4", "rtn", 4, 4.375, 38.3, 0.357, "rtn w4 g64", "degrades"),
    ("rtn3", "rtn", 3, 3.375, 120.0, 1.0, XSS_LABEL, "collapses"),
    ("rtn2", "rtn", 2, 2.375, 5000.0, 6.5, "rtn w2 g64", "collapses"),
    ("gptq4", "gptq", 4, 4.375, 22.0, 0.08, "gptq w4 g64", "survives"),
]


def _record(key, method, bits, eff, ppl, kl, label, model="smollm2_135m"):
    return {
        "run_key": key, "status": "ok", "sweep_name": "default", "task": "wikitext2",
        "model": {"name": model, "provenance": f"{model} <GGUF> dequantized to float32", "n_params": 134515008},
        "variant": {"method": method, "bits": bits, "group_size": None if bits is None else 64,
                    "sym": None if bits is None else False, "label": label},
        "metrics": {"ppl": ppl, "kl_mean": kl, "kl_median": kl / 2, "kl_p90": kl * 2, "kl_p99": kl * 5,
                    "kl_max": kl * 20, "same_top1": 1.0 - min(kl, 0.9), "delta_p_mean": -kl / 10, "n_tokens": 8176},
        "compression": {"effective_bits": eff, "model_bytes": int(BASE_BYTES * eff / 16), "baseline_bytes": BASE_BYTES},
        "timings": {"load_s": 1.0, "quantize_s": 0.1, "eval_s": 2.0}, "peak_memory_mb": 100.0,
        "device": "cpu", "created": "2026-11-27T10:00:00",
    }


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("results") / "default"
    for run in RUNS:
        write_run(d / "runs" / f"wikitext2__{run[0]}.json", _record(*run[:7]))
    failed = {"run_key": "rtn1", "status": "failed", "sweep_name": "default", "task": "wikitext2",
              "model": {"name": "smollm2_135m"}, "variant": {"method": "rtn", "bits": 1, "label": "rtn w1"},
              "error": "RuntimeError: scale is <nan>"}
    write_run(d / "runs" / "wikitext2__rtn1.json", failed)
    (d / "runs" / "broken.json").write_text('{"run_key": "x", "status": ')
    return d


@pytest.fixture(scope="module")
def report(sweep: Path) -> str:
    index = build_report(sweep)
    assert index == sweep / "report" / "index.html"
    return index.read_text()


def _verdicts(page: str) -> dict[str, str]:
    return dict((k, v) for v, k in re.findall(r'<tr class="v-(\w+)" data-run-key="([^"]+)">', page))


def test_images_exist_and_are_png(sweep, report):
    srcs = re.findall(r'<img src="([^"]+)"', report)
    assert set(srcs) == {"ppl_vs_bits.png", "kl_vs_bits.png"}
    for src in srcs:
        data = (sweep / "report" / src).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_verdicts_and_order(report):
    verdicts = _verdicts(report)
    assert verdicts == {**{r[0]: r[7] for r in RUNS}, "rtn1": "failed"}
    # sorted by effective bits descending; the failed run (no compression) comes last
    assert list(verdicts)[:2] == ["base", "rtn8"] and list(verdicts)[-1] == "rtn1"


def test_failed_unreadable_and_escaping(report):
    assert "RuntimeError: scale is &lt;nan&gt;" in report
    unreadable = report.split("<h2>Unreadable runs</h2>")[1]
    assert "runs/broken.json" in unreadable and "wikitext2__rtn4" not in unreadable
    assert "<script>" not in report
    assert "rtn w3 &lt;script&gt;alert(1)&lt;/script&gt;" in report
    assert "smollm2_135m &lt;GGUF&gt; dequantized to float32" in report


def test_several_models_get_one_chart_each(tmp_path):
    d = tmp_path / "two"
    for model in ("model_a", "model/b"):
        for run in RUNS[:3]:
            write_run(d / "runs" / f"{model.replace('/', '_')}__{run[0]}.json", _record(*run[:7], model=model))
    out = tmp_path / "elsewhere"
    page = build_report(d, out_dir=out).read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(srcs) == ["kl_vs_bits__model_a.png", "kl_vs_bits__model_b.png",
                            "ppl_vs_bits__model_a.png", "ppl_vs_bits__model_b.png"]
    assert all((out / s).stat().st_size > 0 for s in srcs)


def test_verdict_and_thresholds():
    t = Thresholds(kl_survives=0.05, kl_collapses=0.5)
    assert [verdict(x, t) for x in (0.0, 0.049, 0.05, 0.49, 0.5, 3.0)] == [
        "survives", "survives", "degrades", "degrades", "collapses", "collapses"]
    assert verdict(float("nan")) == "unknown"
    for bad in ({"kl_survives": 1.0, "kl_collapses": 1.0}, {"kl_survives": -0.1}, {"kl_collapses": float("inf")}):
        with pytest.raises(ValueError):
            Thresholds(**bad)


def test_missing_and_empty_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        build_report(tmp_path / "nope")
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        build_report(tmp_path / "empty")


def test_cli(sweep, tmp_path, capsys):
    out = tmp_path / "cli_out"
    assert main([str(sweep), "--out", str(out), "--kl-survives", "0.5", "--kl-collapses", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    assert _verdicts((out / "index.html").read_text())["rtn4"] == "survives"

    for argv in ([str(tmp_path / "missing")], [str(sweep), "--kl-survives", "3"], [str(sweep), "--kl-survives", "x"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("quanteval-report: error: ") and err.count("\n") == 1, err


def test_report_never_imports_torch(sweep):
    code = (
        "import quanteval.report, sys; assert 'torch' not in sys.modules; "
        f"quanteval.report.build_report({str(sweep)!r}); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
