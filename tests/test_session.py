"""The session restores the baseline weights from the model's own safetensors files, not a second copy."""

from __future__ import annotations

import torch

from quanteval.config import ModelConfig
from quanteval.models import load_model
from quanteval.session import BaseWeights


def test_baseline_weights_restore_from_the_files_with_no_copy_in_memory(tiny_model):
    loaded = load_model(ModelConfig(name="tiny", source="hf", name_or_path=str(tiny_model)), torch.device("cpu"),
                        torch.float32)
    model = loaded.model
    assert loaded.weight_files, "the tiny model is a local safetensors directory"
    want = {k: v.clone() for k, v in model.state_dict().items()}
    base = BaseWeights(model, loaded.weight_files)
    assert base.in_memory_bytes == 0  # every tensor is in the file (the tied lm_head with the embedding)
    assert "lm_head.weight" in base.tied
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # fake-quant weights in place
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))  # untied by a method
    base.restore(model)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_tensors_the_files_lack_are_kept_in_memory(tiny_model):
    loaded = load_model(ModelConfig(name="tiny", source="hf", name_or_path=str(tiny_model)), torch.device("cpu"),
                        torch.float32)
    base = BaseWeights(loaded.model, ())  # no files (a hub model): a copy of everything
    state = loaded.model.state_dict()
    assert base.in_memory_bytes == sum(v.numel() * v.element_size() for k, v in state.items() if k not in base.tied)
    want = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.mul_(0)
    base.restore(loaded.model)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in want.items())


def _sweep_in_process(tiny_model, tiny_data, results, monkeypatch, keep: bool, *extra):
    """The CLI's jobs run the way its launcher runs them (one process, one Session with the grid), counting
    the results applied; ``keep=False``: every job restores the baseline and applies its variant's result."""
    from conftest import torch_threads

    from quanteval import cli, sweep, threads
    from quanteval.session import Session

    applied = []
    real_apply = sweep.apply_result
    monkeypatch.setattr(sweep, "apply_result", lambda model, result: (applied.append(1), real_apply(model, result)))
    monkeypatch.setattr(threads, "configure", lambda: 1)  # the test process's threads stay as they are
    if not keep:
        monkeypatch.setattr(sweep, "kept_weights", lambda run, task, session: None)
    _, cfgs, _, _ = cli.expand_grid(["model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}",
                                     f"results_dir={results}", "preset=smoke", "preset.n_windows=2",
                                     "preset.seq_len=64", *extra])
    session = Session(grid=cfgs)
    with torch_threads(1):
        records = [sweep.run_job(cfg, session) for cfg in cfgs]
    return records, len(applied)


def _scores(records) -> dict:
    out = {}
    for r in records:
        if r.get("status") == "ok":
            out[(r["task"], r["variant"]["label"])] = (r["metrics"], r.get("per_window"), r.get("compression"))
    return out


def test_a_variants_later_jobs_score_the_weights_its_first_job_applied(tiny_model, tiny_data, tmp_path, monkeypatch):
    """Each variant's result is applied once, not once per task, and every score equals the one from
    restoring the baseline and applying the result again before each job."""
    grid = ("method=none,rtn", "bits=8,4", "task=wikitext2,gsm8k,arith_chain")
    kept, n_kept = _sweep_in_process(tiny_model, tiny_data, tmp_path / "kept", monkeypatch, True, *grid)
    monkeypatch.undo()
    again, n_again = _sweep_in_process(tiny_model, tiny_data, tmp_path / "again", monkeypatch, False, *grid)
    assert n_again == 2 * 3  # rtn w8 and w4, three tasks each
    assert n_kept == 2  # once per variant: its WikiText-2 job; the other two kept the weights
    assert _scores(kept) == _scores(again) and len(_scores(kept)) == 9
    by_run = {(r["task"], r["variant"]["label"]): r for r in kept}
    for label in ("rtn w8 g64", "rtn w4 g64"):
        assert by_run[("wikitext2", label)]["quantization"].get("weights") is None
        for task in ("gsm8k", "arith_chain"):
            q = by_run[(task, label)]["quantization"]
            assert q["weights"] == "kept from the previous job" and q["from_cache"] is True


def test_a_job_whose_baseline_is_missing_restores_the_baseline_first(tiny_model, tiny_data, tmp_path, monkeypatch):
    """With no baseline in the grid, each task's baseline cache is computed in the variant's own job, on the
    baseline weights: a job that needs one restores them (and applies the result again) rather than keep."""
    grid = ("method=rtn", "bits=4", "task=wikitext2,gsm8k")
    kept, n_kept = _sweep_in_process(tiny_model, tiny_data, tmp_path / "kept", monkeypatch, True, *grid)
    monkeypatch.undo()
    again, n_again = _sweep_in_process(tiny_model, tiny_data, tmp_path / "again", monkeypatch, False, *grid)
    assert n_kept == n_again == 2  # gsm8k's baseline answers were missing: restored, computed, applied again
    assert _scores(kept) == _scores(again) and len(_scores(kept)) == 2
    assert all((r.get("quantization") or {}).get("weights") is None for r in kept)
    # a rerun of the same grid needs no baseline now: the second job keeps the weights
    for f in (tmp_path / "kept" / "default" / "runs").glob("*.json"):
        f.unlink()
    monkeypatch.undo()
    rerun, n_rerun = _sweep_in_process(tiny_model, tiny_data, tmp_path / "kept", monkeypatch, True, *grid)
    assert n_rerun == 1 and _scores(rerun) == _scores(kept)
