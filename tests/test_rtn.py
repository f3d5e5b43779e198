"""RTN primitives: round-trip bounds, a hand-computed example, every width and group layout."""

import pytest
import torch

from quanteval.accounting import compression
from quanteval.methods.rtn import rtn_layer
from quanteval.primitives import group_index, group_layout


def test_hand_computed_asymmetric_example():
    # one group of 4 values in [-1, 2]: scale = 3 / 3 = 1, zero = round(1 / 1) = 1
    q = rtn_layer(torch.tensor([[-1.0, 0.0, 0.4, 2.0]]), bits=2, group_size=-1, sym=False)
    assert q.codes.tolist() == [[0, 1, 1, 3]]
    assert q.scales.float().tolist() == [[1.0]]
    assert q.zeros.tolist() == [[1]]
    assert q.dequantize().tolist() == [[-1.0, 0.0, 0.0, 2.0]]


def test_hand_computed_symmetric_example():
    # 3 bits sym: maxq = 7, max|w| = 3.5 -> scale = 7 / 7 = 1, zero = 4
    q = rtn_layer(torch.tensor([[-3.5, -1.2, 0.0, 2.6]]), bits=3, group_size=-1, sym=True)
    assert q.scales.float().tolist() == [[1.0]]
    assert q.zeros.tolist() == [[4]]
    assert q.codes.tolist() == [[0, 3, 4, 7]]  # -3.5 -> round(-3.5)+4 = 0 (ties to even), 2.6 -> 3+4
    assert q.dequantize().tolist() == [[-4.0, -1.0, 0.0, 3.0]]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [-1, 16, 32, 48])
@pytest.mark.parametrize("sym", [False, True])
def test_round_trip_error_at_most_half_scale(bits, group_size, sym):
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(24, 80) * torch.rand(24, 1) * 3  # 80 = 48 + 32: g48 has a short last group
    q = rtn_layer(w, bits, group_size, sym)
    err = (q.dequantize() - w).abs()
    bound = q.scales.float()[:, q.g_idx.long()] / 2
    if sym:
        # symmetric codes span [-(maxq+1)/2, (maxq-1)/2] * scale: the positive edge is half a step short
        assert (err <= bound + 1e-6).all()
    else:
        assert (err <= bound * (1 + 1e-6) + 1e-7).all()
    assert int(q.codes.max()) <= 2**bits - 1
    assert q.scales.dtype == torch.float16 and (q.scales.float() > 0).all()


def test_short_last_group_layout():
    # SmolLM2 at g128: 576 = 4 x 128 + 64
    g = group_index(576, 128)
    assert g.tolist().count(4) == 64 and int(g.max()) == 4
    assert group_layout(576, 128) == {"in_features": 576, "group_size": 128, "n_groups": 5, "last_group": 64}
    q = rtn_layer(torch.randn(8, 576), 4, 128, False)
    assert q.scales.shape == (8, 5)
    # the short group gets its own scale, from its own 64 columns
    w = torch.zeros(8, 576)
    w[:, 512:] = 10.0
    w[:, :512] = 0.1
    q = rtn_layer(w, 4, 128, False)
    assert (q.scales.float()[:, 4] > 50 * q.scales.float()[:, 3]).all()
    assert torch.allclose(q.dequantize()[:, 512:], w[:, 512:], atol=float(q.scales[0, 4]) / 2)


def test_all_zero_group_is_exact():
    q = rtn_layer(torch.zeros(2, 8), 3, 4, False)
    assert (q.dequantize() == 0).all()


def test_effective_bits_counts_short_groups_exactly():
    layers = {"a": rtn_layer(torch.randn(4, 576), 4, 128, False)}
    c = compression(param_count=4 * 576 + 1000, layers=layers)
    # per row: 576 x 4 bits + 5 groups x (16-bit scale + 4-bit zero)
    assert c["effective_bits"] == pytest.approx((576 * 4 + 5 * 20) / 576)
    assert c["model_bytes"] == int(4 * (576 * 4 + 5 * 20) / 8 + 1000 * 2)
    sym = compression(4 * 576, {"a": rtn_layer(torch.randn(4, 576), 4, 64, True)})
    assert sym["effective_bits"] == pytest.approx(4 + 16 / 64)  # no zeros stored when symmetric
