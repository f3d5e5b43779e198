"""House order: the structure stays as drawn (no reaching into privates, no globals in the sweep), a task
is one YAML plus one module, and bad input is one line before any work."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli

PKG = REPO / "quanteval"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, function-level imports included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def test_config_never_imports_the_report_and_nobody_imports_sweep_privates():
    for module, _ in _imports(PKG / "config.py"):
        assert not module.startswith("quanteval.report"), f"config.py imports {module}"
    files = sorted(PKG.rglob("*.py")) + sorted((REPO / "tests").glob("*.py")) + sorted((REPO / "benchmarks").glob("*.py"))
    for f in files:
        for module, names in _imports(f):
            private = [n for n in names if n.startswith("_")]
            assert not (module == "quanteval.sweep" and private), f"{f.relative_to(REPO)} imports {private} from sweep"


def test_the_sweep_keeps_no_state_in_module_globals():
    """Per-process state lives in a Session passed to each job; the sweep module holds only constants."""
    tree = ast.parse((PKG / "sweep.py").read_text(encoding="utf-8"))
    assigned = [t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)]
    assert assigned == ["log"], assigned


def test_the_report_has_no_cli_of_its_own():
    """One home for console entry points: quanteval/cli.py (the report package stays importable without Hydra)."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert all(target.startswith("quanteval.cli:") for target in scripts.values()), scripts
    for f in (PKG / "report").glob("*.py"):
        assert "argparse" not in f.read_text(encoding="utf-8"), f"{f.name} parses arguments"


# --------------------------------------------------------------------------- a task is one YAML + one module

ECHO_YAML = """\
task: quanteval_echo
custom_dataset: !function echo.dataset
output_type: generate_until
test_split: test
doc_to_text: !function echo.doc_to_text
doc_to_target: !function echo.doc_to_target
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 8
process_results: !function echo.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  quanteval:
    chat: false
    primary: acc
    binary: true
    teacher_forced: reference
    tags: [length]
    sweep:
      kind: other
      licence: "Made up by this test."
      presets:
        smoke: {limit: 3, max_new_tokens: 6}
      charts:
        - {by_tag: length}
"""

ECHO_PY = '''\
"""echo: repeat a word (a throwaway task made by tests/test_house.py)."""
from quanteval_tasks.common import to_dataset

WORDS = ["river", "city", "king", "song", "north"]


def docs(**_):
    return [{"id": f"e{i}", "word": w, "length": len(w)} for i, w in enumerate(WORDS)]


def dataset(**kwargs):
    return to_dataset(docs(**kwargs))


def doc_to_text(doc):
    return f"Repeat the word {doc['word']}:"


def doc_to_target(doc):
    return " " + doc["word"]


def process_results(doc, results):
    return {"acc": float(doc["word"] in results[0])}
'''


def test_a_new_task_is_one_yaml_and_one_module(tiny_model, tiny_data, tmp_path):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "echo.yaml").write_text(ECHO_YAML)
    (tasks / "echo.py").write_text(ECHO_PY)
    out = tmp_path / "results"
    proc = run_cli("model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}", f"results_dir={out}",
                   "preset=smoke", "preset.n_windows=2", "preset.seq_len=64", "method=none,rtn", "bits=4",
                   "task=wikitext2,echo", env={"QUANTEVAL_TASK_PATH": str(tasks)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    from quanteval.results import load, read_run

    df = load(out / "default")
    echo = df[df.task == "echo"].set_index("label")
    assert set(echo.status) == {"ok"} and set(echo.n_items) == {3}  # the YAML's smoke size
    assert echo.loc["baseline", "tf_kl_mean"] == pytest.approx(0.0, abs=1e-6)
    rec = read_run(next((out / "default" / "runs").glob("echo__*rtn*.json")))
    assert rec["task_meta"]["kind"] == "other" and rec["primary_metric"] == "acc"
    assert set(rec["breakdown"]["length"]) == {"5", "4"}  # by tag, from the YAML's tags
    index = (out / "default" / "report" / "index.html").read_text()
    assert "echo: acc" in index  # its row in the verdict matrix


def test_a_broken_task_yaml_is_one_line(tmp_path):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "echo.yaml").write_text(ECHO_YAML.replace("    primary: acc\n", ""))
    (tasks / "echo.py").write_text(ECHO_PY)
    proc = run_cli("plan=true", "task=echo", env={"QUANTEVAL_TASK_PATH": str(tasks)})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "echo.yaml" in lines[0] and "metadata.quanteval.primary is missing" in lines[0]


# --------------------------------------------------------------------------- bad input: one line, before any work


def _main(monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
    from quanteval import cli

    monkeypatch.setattr(sys, "argv", ["quanteval", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.mark.parametrize("override, needle", [
    ("report.survives=2", "report.survives=2"),
    ("report.collapses=0.99", "report.collapses=0.99"),
    ("report.kl_survives=1.5", "report.kl_survives=1.5"),
    ("report.kl_survives=0", "report.kl_survives=0"),
    ("report.top1_survives=1.2", "report.top1_survives=1.2"),
    ("report.top1_collapses=0.95", "report.top1_collapses=0.95"),
    ("report.floor=1", "report.floor=1"),
    ("report.floor=-0.1", "report.floor=-0.1"),
    ("report.chance.gsm8k=1.5", "report.chance.gsm8k=1.5"),
])
def test_bad_thresholds_fail_before_any_work(tiny_model, tiny_data, tmp_path, monkeypatch, capsys, override, needle):
    out = tmp_path / "results"
    code, lines = _main(monkeypatch, capsys, "model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}",
                        f"results_dir={out}", "preset=smoke", "method=rtn", "bits=4", "task=wikitext2", override)
    assert code == 2 and len(lines) == 1, lines
    assert needle in lines[0], lines[0]
    assert not out.exists()  # nothing was written


def test_bad_paths_fail_before_any_work(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    bad_tasks = tmp_path / "lm_tasks"
    bad_tasks.mkdir()
    (bad_tasks / "mine.yaml").write_text("task: mine\ndataset_path: json\n  doc_to_text: [unclosed\n")
    base = ["model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}", "preset=smoke", "method=rtn",
            "bits=4", "task=wikitext2"]
    cases = [
        ([f"results_dir={a_file}/sub"], f"results_dir={a_file}/sub: cannot be created: {a_file} is a file"),
        ([f"results_dir={a_file}"], f"results_dir={a_file}: is a file, not a folder"),
        ([f"data_dir={a_file}"], f"data_dir={a_file}: is a file, not a folder"),
        ([f"data_dir={tmp_path}/nowhere"], f"data_dir={tmp_path}/nowhere"),
        (["method=gptq", f"calibration.path={tmp_path}"], f"calibration.path={tmp_path}: is a folder"),
        ([f"model.name_or_path={a_file}"], f"model.name_or_path={a_file}: is a file"),
        (["task=lmeval", "task.name=mine", f"task.include_path={bad_tasks}"], f"{bad_tasks / 'mine.yaml'}: not a valid lm-eval task YAML"),
        (["task=lmeval", "task.name=mine", f"task.include_path={a_file}"], f"task.include_path={a_file}: not a folder"),
    ]
    for extra, needle in cases:
        code, lines = _main(monkeypatch, capsys, *base, f"results_dir={tmp_path / 'r'}", *extra)
        assert code == 2 and len(lines) == 1, (extra, lines)
        assert needle in lines[0], (extra, lines[0])
    assert not (tmp_path / "r").exists()


def test_no_root_folder_shadows_an_installed_package():
    """A root folder with an ``__init__.py`` is importable by its own name wherever the repo root is on
    ``sys.path`` (``python -m pytest``, the README's test command), and hides an installed package of that
    name: ``kernels/`` hid the hub's ``kernels`` once transformers 5.25 came to require it."""
    from importlib.metadata import packages_distributions

    installed = packages_distributions()
    ours = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    clash = sorted(n for n in ours if n in installed and n != "quanteval")
    assert not clash, f"root folders {clash} shadow the installed packages of {[installed[n] for n in clash]}"
