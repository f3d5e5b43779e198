"""Generative tasks on the tiny random Llama: engine, scoring, flips, collapse short-circuit, bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from quanteval.evaluate import generative as G
from quanteval.generate import generate
from quanteval.results import load

GEN_TASKS = ("ifeval", "mt_bench", "dialogsum", "gsm8k", "arith_chain", "humaneval")


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, tok


PROMPTS = ["the river city", "a king of the north and the south was", "one two", "early later first second year of"]


def test_batched_generation_equals_unbatched_and_hf_generate(tiny):
    model, tok = tiny
    torch.set_num_threads(1)
    batched = generate(model, tok, PROMPTS, 12, batch_size=4, add_special_tokens=True)
    single = generate(model, tok, PROMPTS, 12, batch_size=1, add_special_tokens=True)
    assert [g.text for g in batched] == [g.text for g in single]
    for prompt, g in zip(PROMPTS, single):
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        new = out[0, enc.input_ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        assert g.text == tok.decode(new, skip_special_tokens=True)
        assert g.n_tokens >= 1 and g.finish in ("eos", "length")


def test_stop_strings_cut_the_text_and_end_the_sequence(tiny):
    model, tok = tiny
    free = generate(model, tok, PROMPTS, 24, add_special_tokens=True)
    # pick a stop string that occurs in a free-running output: the sequence must end there
    target = next(g for g in free if len(g.text.strip()) > 6)
    i = free.index(target)
    stop = target.text[len(target.text) // 2 : len(target.text) // 2 + 2]
    cut = generate(model, tok, [PROMPTS[i]], 24, stop=[stop], add_special_tokens=True)[0]
    assert cut.finish == "stop" and stop not in cut.text
    assert target.text.startswith(cut.text) and cut.n_tokens <= target.n_tokens


def test_max_new_tokens_is_validated(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate(model, tok, PROMPTS, 0)


@pytest.mark.parametrize("lost,gained,p", [(0, 0, 1.0), (5, 0, 0.0625), (10, 2, 2 * (1 + 12 + 66) / 4096), (3, 3, 1.0)])
def test_mcnemar_exact(lost, gained, p):
    assert G.mcnemar_exact(lost, gained) == pytest.approx(p)


def _spec(name, data_dir, limit=6):
    return G.load_spec(name, Path(data_dir), limit, None, {})


def test_flips_and_agreement_with_baseline(tiny_data):
    spec = _spec("gsm8k", tiny_data, 4)
    answers = [d["answer"].split("#### ")[-1] for d in spec.docs]
    base_texts = [f"so #### {answers[0]}", "#### 0", f"#### {answers[2]}", "nothing"]
    var_texts = ["so #### 1", f"#### {answers[1]}", f"#### {answers[2]}", "nothing"]
    base = [{"output": t, **s} for t, s in zip(base_texts, G.score_items(spec, base_texts))]
    var = [{"output": t, **s} for t, s in zip(var_texts, G.score_items(spec, var_texts))]
    m = G.compare_with_baseline(spec, var, base)
    assert (m["flips_lost"], m["flips_gained"]) == (1, 1)
    assert [it["flip"] for it in var] == ["lost", "gained", None, None]
    assert m["flip_rate"] == 0.5 and m["mcnemar_p"] == 1.0
    assert m["same_output"] == 0.5 and 0 < m["rougeL_vs_base"] < 1


def test_non_utf8_generation_is_kept_and_scored(tiny_data, tmp_path):
    spec = _spec("gsm8k", tiny_data, 2)
    answer = spec.docs[0]["answer"].split("#### ")[-1]
    texts = [b"\xff\xfe half a character \xe2\x82 then #### ".decode("utf-8", "replace") + answer, "\ufffd"]
    scored = G.score_items(spec, texts)
    assert scored[0]["scores"]["exact_match,flexible-extract"] == 1.0
    assert scored[1]["scores"]["exact_match,flexible-extract"] == 0.0
    items = [{"id": d["id"], "output": t, **s} for d, t, s in zip(spec.docs, texts, scored)]
    G.write_items(tmp_path / "x.items.jsonl", items)
    assert G.read_items(tmp_path / "x.items.jsonl") == json.loads(json.dumps(items))


def test_limit_zero_and_empty_dataset(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="limit=0"):
        _spec("gsm8k", tiny_data, 0)
    empty = tmp_path / "data"
    (empty / "gsm8k").mkdir(parents=True)
    (empty / "gsm8k" / "test.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty dataset"):
        _spec("gsm8k", empty, 2)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    d = tmp_path / "data"
    (d / "dialogsum").mkdir(parents=True)
    (d / "dialogsum" / "test.jsonl").write_text('{"fname": "a", "dialogue": "x", "summary1": "y"}\n{"fname": \n')
    with pytest.raises(ValueError, match=r"dialogsum/test.jsonl:2: malformed JSON"):
        _spec("dialogsum", d, 2)


def test_unknown_metric_in_task_yaml(tmp_path):
    from lm_eval.tasks import TaskManager

    from quanteval_tasks import TASK_DIR

    d = tmp_path / "tasks"
    shutil.copytree(TASK_DIR, d, ignore=shutil.ignore_patterns("__pycache__"))
    y = d / "gsm8k.yaml"
    y.write_text(y.read_text().replace("metric: exact_match", "metric: exact_matchh"))
    with pytest.raises(Exception, match="exact_matchh"):  # lm-eval itself or our check, naming the metric
        task = next(iter(TaskManager(include_path=str(d), include_defaults=False)
                         .load(["quanteval_gsm8k"])["tasks"].values()))
        G.check_metrics(G.TaskSpec("gsm8k", task, None, [], [], 8, {}))


def test_chat_task_without_chat_template(tiny, tiny_data):
    model, tok = tiny
    spec = _spec("ifeval", tiny_data, 1)
    saved = tok.chat_template
    try:
        tok.chat_template = None
        with pytest.raises(ValueError, match="has no chat template.*model.prompt_format=plain"):
            G.prompt_for(spec, tok, spec.docs[0], "chat", "tiny")
        prompt, specials = G.prompt_for(spec, tok, spec.docs[0], "plain", "tiny")
        assert prompt == G.PLAIN_PROMPT.format(text=spec.docs[0]["prompt"]) and specials
        assert "\nQuestion:" in G.stop_strings(spec, "plain")
    finally:
        tok.chat_template = saved
    prompt, specials = G.prompt_for(spec, tok, spec.docs[0], "chat", "tiny")
    assert prompt.startswith("<s>user: ") and prompt.endswith("<s>assistant:") and not specials


def _args(tiny_model: Path, tiny_data: Path, results: Path, *extra: str) -> list[str]:
    return ["model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}", f"results_dir={results}",
            "preset=smoke", "preset.n_windows=2", "preset.seq_len=64", "preset.calib_samples=4",
            "preset.calib_seq_len=64", *extra]


@pytest.fixture(scope="module")
def gen_sweep(tiny_model, tiny_data, tmp_path_factory):
    results = tmp_path_factory.mktemp("gen_results")
    proc = run_cli(*_args(tiny_model, tiny_data, results, "method=none,rtn", "bits=8,2",
                          f"task=wikitext2,{','.join(GEN_TASKS)}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results, proc


def test_every_task_runs_and_writes_items(gen_sweep):
    results, _ = gen_sweep
    df = load(results / "default")
    assert set(df.status) == {"ok"}
    for task in GEN_TASKS:
        rows = df[df.task == task]
        assert len(rows) == 3, task  # baseline, rtn w8, rtn w2
        for _, row in rows.iterrows():
            assert row["n_items"] == (8 if task == "arith_chain" else 2)  # smoke: 2 items (arith_chain: 1 per k)
            assert row["primary_metric"] and 0.0 <= row["primary"] <= 1.0
    runs = results / "default" / "runs"
    for f in runs.glob("*.json"):
        rec = json.loads(f.read_text())
        if rec["task"] in GEN_TASKS:
            items = G.read_items(runs / rec["items_file"])
            assert len(items) == rec["metrics"]["n_items"]
            assert all({"id", "input", "output", "scores", "tf", "flip"} <= set(it) or rec["task"] in ("dialogsum", "mt_bench")
                       for it in items)
            has_text = any(it["output"] for it in items)
            if rec["task"] in ("gsm8k", "dialogsum", "arith_chain", "humaneval") or has_text:
                assert rec["metrics"]["tf_tokens"] > 0  # teacher-forced on references (or non-empty answers)
            if rec["variant"]["method"] == "none":
                assert rec["metrics"]["same_output"] == 1.0 and rec["metrics"].get("tf_kl_mean", 0.0) == 0.0
    humaneval = df[(df.task == "humaneval")]
    assert humaneval.unsafe.isna().all()  # bubblewrap sandbox, not the unsafe opt-out


def test_a_variants_tasks_share_one_generation_batch(gen_sweep):
    """The first generative job of a variant generates every generative task's answers in one batch; the
    other jobs use them (and say so in their run files)."""
    results, _ = gen_sweep
    runs = [json.loads(f.read_text()) for f in (results / "default" / "runs").glob("*.json")]
    w8 = [r for r in runs if r["task"] in GEN_TASKS and r["variant"]["method"] == "rtn" and r["variant"]["bits"] == 8]
    assert len(w8) == len(GEN_TASKS)
    shared = ("batched_with", "prompts", "generated_by", "batch_s", "batch_tokens")
    batches = {json.dumps({k: r["generation"][k] for k in shared}) for r in w8}
    assert len(batches) == 1, batches  # one batch for all of them
    batch = w8[0]["generation"]
    assert sorted(batch["batched_with"]) == sorted(GEN_TASKS)
    assert batch["prompts"] == sum(r["metrics"]["n_items"] for r in w8)
    assert batch["generated_by"] == batch["batched_with"][0]
    # each task books its own share of the batch's time, by the tokens it generated
    assert sum(r["generation"]["tokens"] for r in w8) == batch["batch_tokens"]
    assert sum(r["generation"]["share_s"] for r in w8) == pytest.approx(batch["batch_s"], abs=0.05)
    for r in w8:
        assert r["generation"]["tokens"] == sum(it["n_tokens"] for it in G.read_items(
            results / "default" / "runs" / r["items_file"]))
        assert r["timings"]["generate_share_s"] == r["generation"]["share_s"] <= r["timings"]["eval_s"] + 1e-6


def test_arith_chain_breakdown_by_steps(gen_sweep):
    results, _ = gen_sweep
    f = next((results / "default" / "runs").glob("arith_chain__hf__rtn-w8*.json"))
    rec = json.loads(f.read_text())
    by_k = rec["breakdown"]["k"]
    assert sorted(by_k, key=int) == [str(k) for k in range(1, 9)]
    assert all(v["n"] == 1 and "acc" in v and "tf_kl_mean" in v for v in by_k.values())


def test_resume_skips_finished_generative_runs(tiny_model, tiny_data, gen_sweep):
    results, _ = gen_sweep
    runs = results / "default" / "runs"
    before = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    victim = next(runs.glob("gsm8k__hf__rtn-w8*.json"))
    victim.unlink()
    proc = run_cli(*_args(tiny_model, tiny_data, results, "method=none,rtn", "bits=8,2",
                          f"task=wikitext2,{','.join(GEN_TASKS)}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    assert set(after) == set(before)
    assert all(after[n] == m for n, m in before.items() if n != victim.name)


def test_collapse_short_circuit_and_force_generate(tiny_model, tiny_data, tmp_path):
    args = _args(tiny_model, tiny_data, tmp_path, "method=rtn", "bits=2", "task=gsm8k", "collapse_kl=1e-9")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load(tmp_path / "default").set_index("task")
    assert df.loc["wikitext2", "status"] == "ok"  # the fidelity run was made first, to decide
    assert df.loc["gsm8k", "status"] == "collapsed"
    assert "collapse_kl=1e-09" in df.loc["gsm8k", "reason"] and "force_generate=true" in df.loc["gsm8k", "reason"]
    assert not list((tmp_path / "default" / "runs").glob("gsm8k*.items.jsonl"))  # nothing generated
    proc = run_cli(*args, "force_generate=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load(tmp_path / "default").set_index("task")
    assert df.loc["gsm8k", "status"] == "ok" and df.loc["gsm8k", "n_items"] == 2


def test_limit_zero_on_the_command_line_fails_in_one_line(tiny_model, tiny_data, tmp_path):
    proc = run_cli(*_args(tiny_model, tiny_data, tmp_path, "task=gsm8k", "task.limit=0"))
    assert proc.returncode == 2
    assert "task.limit=0: must be a positive number of items" in proc.stderr
    assert not (tmp_path / "default").exists()


LOCAL_TASK = """task: qe_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow  # a whole CLI sweep through lm-eval (about 70 s)
def test_lmeval_passthrough_with_local_data(tiny_model, tiny_data, tmp_path):
    data = tmp_path / "choice.jsonl"
    rows = [{"question": f"the {w} is", "choices": ["river", "city", "king"], "label": i % 3}
            for i, w in enumerate(["north", "south", "game", "team", "song", "album"])]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "lm_tasks"
    tasks.mkdir()
    (tasks / "qe_local_choice.yaml").write_text(LOCAL_TASK.format(data=data))
    proc = run_cli(*_args(tiny_model, tiny_data, tmp_path / "res", "task=lmeval", "task.name=qe_local_choice",
                          f"task.include_path={tasks}", "method=none,rtn", "bits=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load(tmp_path / "res" / "default")
    assert set(df.status) == {"ok"} and set(df.task) == {"qe_local_choice"}
    assert df["n_items"].tolist() == [4, 4]  # preset.limits.lmeval in the smoke preset
    assert df["acc"].between(0, 1).all()
    proc = run_cli(*_args(tiny_model, tiny_data, tmp_path / "bad", "task=lmeval", "task.name=no_such_task_xyz",
                          f"task.include_path={tasks}", "method=none"))
    assert proc.returncode == 1
    assert "1 run(s) failed: no_such_task_xyz baseline (ValueError: task.name=no_such_task_xyz: not an lm-eval task" in proc.stderr


def test_malformed_task_data_fails_before_any_work(tiny_model, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    lines = (data / "gsm8k" / "test.jsonl").read_text().splitlines(keepends=True)
    (data / "gsm8k" / "test.jsonl").write_text("".join(lines[:2]) + "{broken\n" + "".join(lines[2:]))
    proc = run_cli(*_args(tiny_model, data, tmp_path / "res", "task=wikitext2,gsm8k", "method=rtn", "bits=4"))
    assert proc.returncode == 2
    assert f"{data / 'gsm8k' / 'test.jsonl'}:3: malformed JSON" in proc.stderr
    assert not (tmp_path / "res").exists()


def test_lm_eval_task_manager_loads_every_task_yaml():
    """Every task YAML in tasks/ loads through lm-eval's own TaskManager, with its full test set."""
    from lm_eval.tasks import TaskManager

    from conftest import SHARED_DATA
    from quanteval_tasks import TASK_DIR

    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present: the full data sets are needed to count documents")
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"data_dir": str(SHARED_DATA)})
    expected = {"ifeval": 541, "mt_bench": 80, "dialogsum": 500, "gsm8k": 1319, "arith_chain": 160, "humaneval": 164}
    assert {f"quanteval_{n}" for n in expected} <= set(tm.all_tasks)
    loaded = tm.load([f"quanteval_{n}" for n in expected])["tasks"]
    counts = {name.removeprefix("quanteval_"): len(list(task.test_docs())) for name, task in loaded.items()}
    assert counts == expected


def test_drafts_from_the_baselines_answers_change_no_answer(tiny_model, tiny_data, tmp_path):
    """A variant's tasks scored on the baseline's answers (ifeval, mt_bench) start from the part of the
    baseline's answer its teacher-forced pass agrees with (preset.gen_draft, on by default): the answers and
    scores equal plain decoding's (preset.gen_draft=false), and the run files count the drafted tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import talking

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model_dir = tmp_path / "talking"  # a tiny model whose answers are words (the random one's are empty)
    talking(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    runs = {}
    for draft in ("true", "false"):
        out = tmp_path / f"draft-{draft}"
        proc = run_cli(*_args(model_dir, tiny_data, out, "method=none,rtn", "bits=8", "task=ifeval,mt_bench",
                              f"preset.gen_draft={draft}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[draft] = out / "default" / "runs"
    drafted = 0
    for task in ("ifeval", "mt_bench"):
        pattern = f"{task}__hf__rtn-w8*.json"
        with_draft = json.loads(next(runs["true"].glob(pattern)).read_text())
        without = json.loads(next(runs["false"].glob(pattern)).read_text())
        assert with_draft["run_key"] == without["run_key"]  # the setting is not part of the key
        a = G.read_items(runs["true"] / with_draft["items_file"])
        b = G.read_items(runs["false"] / without["items_file"])
        assert any(it["output"] for it in b), "the baseline answers nothing: nothing to draft from"
        ties = with_draft["generation"]["draft_ties"]
        assert [it["output"] for it in a] == [it["output"] for it in b] or ties, task
        assert with_draft["metrics"]["primary"] == without["metrics"]["primary"] or ties
        assert without["generation"]["drafted"] == without["generation"]["draft_offered"] == 0
        assert with_draft["generation"]["draft_offered"] >= with_draft["generation"]["drafted"]
        drafted += with_draft["generation"]["drafted"]
        # the drafted tokens are those the teacher-forced pass found to be the variant's own choices
        assert with_draft["generation"]["drafted"] <= sum(it["tf"]["own_prefix"] for it in a if it["tf"])
    assert drafted > 0
    # the report's runs table gives each variant's drafted share; plain decoding's rows leave it empty
    for draft, shown in (("true", True), ("false", False)):
        page = (runs[draft].parent / "report" / "index.html").read_text()
        row = next(r for r in re.findall(r"<tr><td>ifeval</td>.*?</tr>", page) if "rtn w8" in r)
        cells = re.findall(r"<td>(.*?)</td>", row)
        assert bool(re.fullmatch(r"\d+%( \(\d+ ties\))?", cells[7])) == shown, cells
