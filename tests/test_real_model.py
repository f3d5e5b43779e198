"""Slow end-to-end checks on the real embedded model (SmolLM2-135M-Instruct), smoke preset."""

from __future__ import annotations

import pytest

from conftest import run_cli
from quanteval.results import load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm_rtn(tmp_path_factory):
    results = tmp_path_factory.mktemp("real")
    proc = run_cli(f"results_dir={results}", "preset=smoke", "method=rtn", "bits=8,3,2", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load(results / "default")


def test_rtn_kl_orders_by_bits(smollm_rtn):
    kl = smollm_rtn.set_index("bits")["kl_mean"]
    assert kl[8] < kl[3] < kl[2]
    assert smollm_rtn.set_index("bits").loc[8, "same_top1"] > 0.9
