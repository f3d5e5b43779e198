"""End to end on a tiny random Llama (no download): sweep, results, resume, validation, report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_cli
from quanteval.results import load


def _args(tiny_model: Path, tiny_data: Path, results: Path, *extra: str) -> list[str]:
    return ["model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}", f"results_dir={results}",
            "preset=smoke", "preset.n_windows=2", "preset.seq_len=64", "preset.calib_samples=4",
            "preset.calib_seq_len=64", "task=wikitext2", *extra]


@pytest.fixture(scope="module")
def swept(tiny_model, tiny_data, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    proc = run_cli(*_args(tiny_model, tiny_data, results))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results, proc


def test_sweep_writes_one_file_per_run(swept):
    results, proc = swept
    runs = sorted((results / "default" / "runs").glob("*.json"))
    # the default grid: baseline (once, whatever bits) + RTN {8,4,3,2} + GPTQ {4,3} + AWQ {4,3}
    assert len(runs) == 9, [r.name for r in runs]
    df = load(results / "default")
    assert set(df["status"]) == {"ok"}
    assert sorted(df.loc[df.method == "rtn", "bits"].tolist()) == [2, 3, 4, 8]
    assert sorted(df.loc[df.method == "gptq", "bits"].tolist()) == [3, 4]
    assert sorted(df.loc[df.method == "awq", "bits"].tolist()) == [3, 4]
    assert "9 distinct run(s) in this preset's grid" in proc.stderr
    base = df[df.method == "none"].iloc[0]
    assert base.kl_mean == pytest.approx(0.0, abs=1e-6) and base.same_top1 == 1.0
    rtn = df[df.method == "rtn"].set_index("bits")
    assert rtn.loc[8, "kl_mean"] < rtn.loc[2, "kl_mean"]
    assert rtn.loc[4, "effective_bits"] == pytest.approx(4 + 20 / 64)
    rec = json.loads(runs[0].read_text())
    for key in ("schema_version", "run_key", "config", "metrics", "timings", "peak_memory_mb", "versions",
                "device", "status", "compression"):
        assert key in rec, key
    assert rec["config"]["results_dir"] == str(results)
    assert "report written to" in proc.stdout


def test_report_files_reference_their_images(swept):
    results, _ = swept
    index = results / "default" / "report" / "index.html"
    html = index.read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert len(images) >= 2
    for src in images:
        png = index.parent / src
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src


def test_resume_after_interruption(tiny_model, tiny_data, swept, tmp_path):
    results, _ = swept
    runs = results / "default" / "runs"
    victim = next(runs.glob("*rtn-w3*.json"))
    victim.unlink()  # as if the sweep was killed before this run finished ...
    (runs / f".{victim.name}.x.tmp").write_text('{"half": ')  # ... mid-write of its temporary file
    before = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    proc = run_cli(*_args(tiny_model, tiny_data, results))
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    assert victim.name in after
    assert all(after[name] == mtime for name, mtime in before.items())  # finished runs were not redone
    assert len(load(results / "default")) == 9


def test_rerun_recomputes(tiny_model, tiny_data, swept):
    results, _ = swept
    runs = results / "default" / "runs"
    target = next(runs.glob("*rtn-w8*.json"))
    before = target.stat().st_mtime_ns
    proc = run_cli(*_args(tiny_model, tiny_data, results, "method=rtn", "bits=8", "rerun=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert target.stat().st_mtime_ns > before


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["bits=4,3,2,1"], "bits=1"),  # bad value late in the grid
        (["group_size=64,0"], "group_size=0"),
        (["group_size=-2"], "group_size=-2"),
        (["group_size=abc"], "group_size"),
        (["method=rtn,gptqq"], "method=gptqq"),
        (["task=nope"], "task=nope"),
        (["preset=huge"], "preset=huge"),
        (["model=nope"], "model=nope"),
    ],
)
def test_bad_grid_fails_before_any_work(tiny_model, tiny_data, tmp_path, extra, needle):
    proc = run_cli(*_args(tiny_model, tiny_data, tmp_path, *extra))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("quanteval: error:") and needle in lines[0], proc.stderr
    assert not (tmp_path / "default").exists()  # nothing ran, nothing written


def test_missing_data_dir_and_file(tiny_model, tiny_data, tmp_path):
    proc = run_cli(*_args(tiny_model, tmp_path / "nowhere", tmp_path))
    assert proc.returncode == 2 and "data_dir=" in proc.stderr and "nowhere" in proc.stderr
    empty = tmp_path / "empty_data"
    empty.mkdir()
    proc = run_cli(*_args(tiny_model, empty, tmp_path))
    assert proc.returncode == 2 and "wikitext2/test.txt" in proc.stderr


def test_corrupt_gguf_fails_fast(tmp_path, tiny_data):
    pkg = tmp_path / "fake_gguf_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model.gguf").write_bytes(b"GGUF" + b"\0" * 100)  # truncated
    proc = run_cli(f"data_dir={tiny_data}", f"results_dir={tmp_path}", "model.package=fake_gguf_pkg",
                   "model.gguf_file=model.gguf", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2 and "model.gguf" in proc.stderr and "not a valid GGUF" in proc.stderr
