"""Slow end-to-end checks on the real embedded model (SmolLM2-135M-Instruct), smoke preset."""

from __future__ import annotations

import pytest

from conftest import run_cli
from quanteval.results import load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    results = tmp_path_factory.mktemp("real")
    for grid in (["method=rtn", "bits=8,3,2"], ["method=gptq,awq", "bits=3"]):
        proc = run_cli(f"results_dir={results}", "preset=smoke", *grid, timeout=1500)
        assert proc.returncode == 0, proc.stderr[-3000:]
    df = load(results / "default")
    assert set(df.status) == {"ok"}
    return df


def test_rtn_kl_orders_by_bits(smollm):
    rtn = smollm[smollm.method == "rtn"].set_index("bits")
    assert rtn.loc[8, "kl_mean"] < rtn.loc[3, "kl_mean"] < rtn.loc[2, "kl_mean"]
    assert rtn.loc[8, "same_top1"] > 0.9


def test_gptq_and_awq_beat_rtn_at_3_bits(smollm):
    kl = smollm[smollm.bits == 3].set_index("method")["kl_mean"]
    assert kl["gptq"] < kl["rtn"]
    assert kl["awq"] < kl["rtn"]
