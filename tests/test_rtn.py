"""RTN primitives: round-trip bounds, a hand-computed example, every width and group layout."""

import pytest
import torch

from quanteval.accounting import compression
from quanteval.methods.rtn import rtn_fake_quant, rtn_layer
from quanteval.primitives import group_index, group_layout, group_width, minmax_params, quantize_codes, round_scale_fp16


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


def test_group_width():
    assert group_width(576, 128) == 128
    assert group_width(576, -1) == 576  # per-channel: one group spans the row
    assert group_width(64, 128) == 128  # a group wider than the row is one short group
    for bad in (0, -2):
        with pytest.raises(ValueError, match="must be -1 or a positive integer"):
            group_width(576, bad)
        with pytest.raises(ValueError):
            rtn_layer(torch.zeros(2, 8), 4, bad, False)


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


# --------------------------------------------------------------------------- vectorised vs group-by-group


def reference_rtn(w, bits, group_size, sym):
    """The straightforward loop over groups: codes (out, in), scales and zeros (out, n_groups), float32."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    starts = range(0, in_f, g)
    codes, scales, zeros = torch.empty(out_f, in_f), torch.empty(out_f, len(starts)), torch.empty(out_f, len(starts))
    for j, c in enumerate(starts):
        cols = slice(c, min(c + g, in_f))
        s, z = minmax_params(w[:, cols], bits, sym)  # (out,), (out,)
        scales[:, j], zeros[:, j] = s, z
        codes[:, cols] = quantize_codes(w[:, cols], s[:, None], z[:, None], bits)
    return codes, scales, zeros


SHAPES = [(1, 1), (3, 5), (7, 80), (5, 64), (24, 576), (6, 100)]
GROUP_SIZES = [-1, 1, 3, 16, 32, 48, 64, 128]
CASES = [(o, i, gs) for o, i in SHAPES for gs in GROUP_SIZES if i <= 100 or gs >= 16]  # the loop is slow


@pytest.mark.parametrize("out_f, in_f, group_size", CASES)
@pytest.mark.parametrize("sym", [False, True])
def test_vectorised_matches_group_loop_bit_for_bit(out_f, in_f, group_size, sym):
    g = torch.Generator().manual_seed(out_f * 1000 + in_f + group_size)
    w = torch.randn(out_f, in_f, generator=g) * torch.rand(out_f, 1, generator=g) * 3
    w[0] = 0.0  # an all-zero row: every group of it is dead
    if out_f > 2:
        w[1, : min(in_f, 16)] = 0.0  # an all-zero first group (g <= 16) next to live ones
        w[2] = w[2].abs()  # one-signed rows: min/max clamped to include 0
    for bits in range(1, 9):
        q = rtn_layer(w, bits, group_size, sym)
        codes, scales, zeros = reference_rtn(w, bits, group_size, sym)
        assert torch.equal(q.codes, codes.to(torch.uint8)), bits
        assert torch.equal(q.scales, scales.to(torch.float16)), bits
        assert torch.equal(q.zeros, zeros.to(torch.uint8)), bits
        assert torch.equal(q.g_idx, group_index(in_f, group_size))
        assert torch.equal(rtn_fake_quant(w, bits, group_size, sym), q.dequantize()), bits


def test_dead_groups_get_unit_range():
    # an all-zero group: min/max forced to -1/+1, i.e. scale 2 / maxq, zero round(1 / scale); codes = zero
    w = torch.zeros(3, 10)
    w[1, 4:8] = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for sym in (False, True):
        q = rtn_layer(w, 3, 4, sym)  # groups 4, 4, then a short group of 2
        codes, scales, zeros = reference_rtn(w, 3, 4, sym)
        assert q.scales.shape == (3, 3)
        assert q.scales[0, 0] == q.scales[2, 2] == round_scale_fp16(torch.tensor(2 / 7)).half()
        assert torch.equal(q.scales.float(), scales) and torch.equal(q.zeros.float(), zeros)
        assert torch.equal(q.codes.float(), codes)
        assert (q.dequantize()[[0, 2]] == 0).all() and (q.dequantize()[1, :4] == 0).all()


def test_group_larger_than_the_row_is_one_group():
    w = torch.randn(4, 10)
    a, b = rtn_layer(w, 4, 64, False), rtn_layer(w, 4, -1, False)
    assert a.scales.shape == (4, 1) and torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def test_outputs_stay_on_the_weights_device():
    w = torch.empty(4, 10, device="meta")  # shapes and devices only: no data is computed
    q = rtn_layer(w, 3, 4, False)
    assert {t.device.type for t in (q.codes, q.scales, q.zeros, q.g_idx)} == {"meta"}
    assert rtn_fake_quant(w, 3, 4, True).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    w = torch.randn(64, 200)
    cpu, gpu = rtn_layer(w, 3, 64, False), rtn_layer(w.cuda(), 3, 64, False)
    assert gpu.codes.is_cuda and gpu.scales.is_cuda
    assert torch.equal(gpu.codes.cpu(), cpu.codes) and torch.equal(gpu.scales.cpu(), cpu.scales)
