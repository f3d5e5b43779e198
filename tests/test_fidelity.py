"""The baseline's own fidelity run: computed from the statistics its one pass recorded, equal to a second pass."""

import pytest
import torch

from quanteval.evaluate import fidelity


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.mark.parametrize("shape", [(3, 65), (2, 1101)])  # short windows, and long ones (by-position buckets)
def test_the_baseline_compared_with_itself_equals_a_second_pass(model, shape):
    windows = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(2))
    base = fidelity.baseline_stats(model, windows, top_k=8)
    second_pass = fidelity.compare(model, windows, base)
    assert second_pass["kl_max"] == 0 and second_pass["same_top1"] == 1  # what the shortcut takes as given
    assert fidelity.compare_baseline(base) == second_pass  # every metric and per-window value, exactly
    assert ("by_position" in second_pass) == (shape[1] > 512)


def test_the_baseline_teacher_forced_on_its_own_texts_equals_a_second_pass(model):
    """Texts the model continues greedily (so ``own_prefix`` counts many tokens) and random ones."""
    g = torch.Generator().manual_seed(3)
    seqs = []
    for n, greedy in ((40, True), (25, False), (60, True)):
        ids = torch.randint(3, model.config.vocab_size, (12,), generator=g).tolist()
        start = len(ids)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()) if greedy
                           else int(torch.randint(3, model.config.vocab_size, (1,), generator=g)))
        seqs.append((ids, start))
    stats = fidelity.sequence_baseline(model, seqs, top_k=64)
    second_pass = fidelity.sequence_compare(model, seqs, stats)
    assert [r["own_prefix"] for r in second_pass][::2] == [40, 60]  # the greedy texts are its own throughout
    assert fidelity.sequence_compare_baseline(seqs, stats) == second_pass


PATCHED_CLI = """
import sys
from quanteval.evaluate import fidelity
calls = []
for name in ("compare", "sequence_compare"):
    real = getattr(fidelity, name)
    setattr(fidelity, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
sys.argv[0] = "quanteval"
from quanteval.cli import main
code = main()
print("COMPARING PASSES:", calls)
sys.exit(code)
"""


def test_a_baseline_run_makes_no_second_pass(tiny_model, tiny_data, tmp_path):
    """In a sweep, the baseline's WikiText-2 and teacher-forced runs never call the comparing passes, and
    record KL 0 and the same top token; a quantised variant's runs call each once (so the wrapping works)."""
    import json
    import os
    import subprocess
    import sys

    res = tmp_path / "res"
    args = ["model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}", f"results_dir={res}",
            "preset=smoke", "preset.n_windows=2", "preset.seq_len=64", "method=none,rtn", "bits=8",
            "task=wikitext2,gsm8k"]
    proc = subprocess.run([sys.executable, "-c", PATCHED_CLI, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "COMPARING PASSES: ['compare', 'sequence_compare']" in proc.stdout, proc.stdout[-2000:]  # RTN w8's
    baseline_runs = (res / "default" / "runs").glob("*baseline*.json")
    runs = {p.name.split("__")[0]: json.loads(p.read_text()) for p in baseline_runs}
    assert runs["wikitext2"]["metrics"]["kl_mean"] == 0 and runs["wikitext2"]["metrics"]["same_top1"] == 1
    assert runs["gsm8k"]["metrics"]["tf_kl_mean"] == 0 and runs["gsm8k"]["metrics"]["tf_tokens"] > 0
