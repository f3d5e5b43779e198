"""quanteval_kernels: packing round trips and layout, torch reference vs LayerQuant, Triton vs the reference.

Shapes are random (seeded) and cover every packed width, group sizes that
divide the row, do not divide it, equal it or exceed it, widths that are not
a multiple of the pack factor, and act_order ``g_idx``.

Triton runs in its CPU interpreter here (``TRITON_INTERPRET=1`` set per test:
the kernel module reads it at call time, see ``triton_dequant``), and
compiled on CUDA when a GPU is present.

Tolerance of a kernel output against the float32 reference, per element:
``eps * (|x| @ |W_hat|.T) + eps * |y|``, the rounding bound of a dot product
whose terms are rounded once and summed in float32, then rounded to the
output dtype; ``eps`` = 1e-6 for float32 (interpreter), 2**-10 for fp16 and
2**-7 for bf16 (twice their unit roundoff).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from quanteval.methods.gptq import GPTQ
from quanteval.methods.rtn import rtn_layer
from quanteval.primitives import LayerQuant
from quanteval_kernels import (
    PACKED_BITS,
    dequant_matmul,
    dequantize_packed,
    pack_codes,
    pack_layer,
    packed_linear,
    resolve_backend,
    unpack_codes,
)
from quanteval_kernels.pack import n_words

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'quanteval[kernels]')")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the compiled kernel is not run")
EPS = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors: one thread (conftest)


def random_shapes(seed: int, n: int, max_in: int = 300) -> list[tuple[int, int, int]]:
    """(out, in, group_size) triples: group sizes -1, dividing ``in``, not dividing it, equal to it, larger."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i in range(n):
        out_f = int(torch.randint(1, 40, (1,), generator=g))
        in_f = int(torch.randint(1, max_in, (1,), generator=g))
        choice = i % 5
        gs = [-1, 32, int(torch.randint(1, 70, (1,), generator=g)), in_f, in_f + 7][choice]
        cases.append((out_f, in_f, gs))
    return cases


def bitstream_words(row: list[int], bits: int) -> list[int]:
    """The documented layout, written independently: one Python integer per row, cut into 32-bit words."""
    stream = sum(c << (j * bits) for j, c in enumerate(row))
    words = [(stream >> (32 * t)) & 0xFFFFFFFF for t in range(n_words(len(row), bits))]
    return [w - 2**32 if w >= 2**31 else w for w in words]  # int32 bit pattern


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", PACKED_BITS)
def test_pack_roundtrip_and_layout(bits):
    g = torch.Generator().manual_seed(bits)
    for out_f, in_f, _ in random_shapes(bits, 12) + [(3, 1, -1), (2, 31, -1), (2, 32, -1), (2, 33, -1), (1, 576, -1)]:
        codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.int32 and packed.shape == (out_f, -(-in_f * bits // 32))
        assert torch.equal(unpack_codes(packed, bits, in_f), codes)
        assert packed[0].tolist() == bitstream_words(codes[0].tolist(), bits)


def test_three_bits_straddle_word_boundaries():
    codes = torch.full((1, 32), 7, dtype=torch.uint8)  # all ones: 96 bits in exactly 3 words
    assert pack_codes(codes, 3).tolist() == [[-1, -1, -1]]
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b101  # bits 30-32: bit 30 and bit 32 set (word 0 bit 30, word 1 bit 0)
    assert pack_codes(codes, 3).tolist() == [[1 << 30, 1, 0]]


def test_pack_matches_compressed_tensors_pack_to_int32():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(0)
    for bits in PACKED_BITS:
        codes = torch.randint(0, 2**bits, (5, 77), generator=g, dtype=torch.uint8)
        signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(pack_codes(codes, bits), helpers.pack_to_int32(signed, bits)), bits


@pytest.mark.parametrize("bits", PACKED_BITS)
def test_out_of_range_codes_raise(bits):
    codes = torch.zeros(2, 40, dtype=torch.int32)
    codes[1, 7] = 2**bits
    with pytest.raises(ValueError, match=rf"code {2**bits} is out of range for bits={bits}"):
        pack_codes(codes, bits)
    codes[1, 7] = -1
    with pytest.raises(ValueError, match=rf"code -1 is out of range for bits={bits}"):
        pack_codes(codes, bits)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_codes(torch.zeros(2, 4), bits)


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_five_to_seven_bits_stay_fake_quant(bits):
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    for call in (lambda: pack_codes(codes, bits), lambda: unpack_codes(torch.zeros(2, 2, dtype=torch.int32), bits, 8),
                 lambda: pack_layer(codes, torch.ones(2, 1), torch.zeros(2, 1), None, bits, -1),
                 lambda: dequant_matmul(torch.ones(1, 8), torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, 1),
                                        torch.zeros(2, 1), bits, -1, backend="torch")):
        with pytest.raises(ValueError, match="5-7 bit widths stay fake-quant only"):
            call()


def test_unpack_checks_width():
    with pytest.raises(ValueError, match="needs 2"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.int32), 4, 16)


# --------------------------------------------------------------------------- reference vs LayerQuant


def act_order_layer(out_f: int, in_f: int, bits: int, group_size: int, seed: int) -> LayerQuant:
    """A GPTQ act_order result: g_idx is a permutation of contiguous groups."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, in_f, generator=g) * torch.rand(in_f, generator=g).add(0.1)  # uneven diag(H)
    solver = GPTQ(in_f)
    solver.add_batch(x)
    lq, _ = solver.quantize(torch.randn(out_f, in_f, generator=g), bits, group_size, sym=False, act_order=True)
    return lq


def layer_cases(bits: int) -> list[LayerQuant]:
    g = torch.Generator().manual_seed(100 + bits)
    cases = [rtn_layer(torch.randn(o, i, generator=g), bits, gs, sym=bool(k % 2))
             for k, (o, i, gs) in enumerate(random_shapes(200 + bits, 8))]
    cases.append(act_order_layer(24, 100, bits, 32, seed=bits))  # partial last group, permuted
    lq = rtn_layer(torch.randn(16, 70, generator=g), bits, 16, sym=False)  # an arbitrary (non-permutation) g_idx
    lq.g_idx = torch.randint(0, lq.scales.shape[1], (70,), generator=g, dtype=torch.int32)
    cases.append(lq)
    return cases


@pytest.mark.parametrize("bits", PACKED_BITS)
def test_reference_dequant_equals_layerquant(bits):
    for lq in layer_cases(bits):
        out_f, in_f = lq.shape
        w = pack_layer(lq.codes, lq.scales, lq.zeros, lq.g_idx, bits, lq.group_size)
        # the functional API on the layer's own column order: exactly LayerQuant.dequantize
        plain = dequantize_packed(pack_codes(lq.codes, bits), lq.scales, lq.zeros, bits, lq.group_size, in_f,
                                  lq.g_idx)
        assert torch.equal(plain, lq.dequantize()), (bits, lq.shape, lq.group_size)
        # the packed layer (columns reordered when act_order): same weights, same matmul
        w_hat = dequantize_packed(w.packed, w.scales, w.zeros, bits, w.group_size, in_f, w.g_idx)
        if w.perm is not None:
            restored = torch.empty_like(w_hat)
            restored[:, w.perm] = w_hat
            w_hat = restored
        assert torch.equal(w_hat, lq.dequantize())
        x = torch.randn(3, 5, in_f)
        torch.testing.assert_close(packed_linear(x, w, backend="torch"), F.linear(x, lq.dequantize()),
                                   rtol=1e-5, atol=1e-5)


def test_act_order_is_reordered_into_contiguous_groups():
    lq = act_order_layer(8, 100, 4, 32, seed=0)
    assert not torch.equal(lq.g_idx, torch.arange(100, dtype=torch.int32) // 32)
    w = pack_layer(lq.codes, lq.scales, lq.zeros, lq.g_idx, 4, 32)
    assert w.g_idx is None and w.perm is not None
    assert torch.equal(lq.g_idx[w.perm], torch.arange(100, dtype=torch.int32) // 32)


def test_packed_weights_are_output_major():
    lq = rtn_layer(torch.randn(48, 96), 4, 32, sym=False)
    w = pack_layer(lq.codes, lq.scales, lq.zeros, lq.g_idx, 4, 32)
    for t in (w.packed, w.scales, w.zeros):
        assert t.stride() == (1, 48)


# --------------------------------------------------------------------------- dispatch


def test_backend_choice_and_errors(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="choose one of auto, triton, torch"):
        resolve_backend("cuda", torch.device("cpu"))
    if HAS_TRITON:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run: .*use backend='torch'"):
        resolve_backend("triton", torch.device("cpu"))


# --------------------------------------------------------------------------- Triton vs reference


def kernel_cases(bits: int, device: str) -> list[tuple]:
    """(M, K, N, group_size, g_idx kind, config): decode, small batch, prefill-shaped M; both scale paths."""
    from quanteval_kernels.triton_dequant import KernelConfig

    small = KernelConfig(16, 16, 32 if bits == 3 else 16, split_k=3)  # many tiles, split-K with float32 atomics
    return [
        (1, 96, 40, 32, None, None),  # decode; K tiles inside groups: one scale per tile
        (5, 100, 33, -1, None, None),  # per channel; K not a multiple of a tile or the pack factor
        (3, 130, 50, 64, None, small),  # partial last group (130 = 2 x 64 + 2), split-K
        (17, 64, 20, 16, None, None),  # two M tiles
        (2, 70, 30, 20, None, None),  # group size not a multiple of 16: scale per weight
        (4, 100, 24, 32, "act_order", None),  # reordered into contiguous groups (perm)
        (3, 72, 18, 16, "random", small),  # arbitrary g_idx, read per column
        (64 if device == "cpu" else 256, 128, 48, 32, None, None),  # prefill-sized M
    ]


def check_kernel(bits: int, device: str, dtype: torch.dtype) -> None:
    from quanteval_kernels import triton_dequant

    g = torch.Generator().manual_seed(bits)
    for M, K, N, gs, kind, cfg in kernel_cases(bits, device):
        if kind == "act_order":
            lq = act_order_layer(N, K, bits, gs, seed=bits)
        else:
            lq = rtn_layer(torch.randn(N, K, generator=g), bits, gs, sym=False)
            if kind == "random":
                lq.g_idx = torch.randint(0, lq.scales.shape[1], (K,), generator=g, dtype=torch.int32)
        w = pack_layer(*(t.to(device) for t in (lq.codes, lq.scales, lq.zeros, lq.g_idx)), bits, gs)
        x = torch.randn(M, K, generator=g).to(device, dtype)
        xp = x if w.perm is None else x.index_select(-1, w.perm)
        y = triton_dequant.dequant_matmul(xp, w.packed, w.scales, w.zeros, bits, gs, w.g_idx, config=cfg)
        w_ref = dequantize_packed(w.packed, w.scales, w.zeros, bits, gs, K, w.g_idx)  # (N, K) float32
        y_ref = xp.float() @ w_ref.T
        bound = EPS[dtype] * (xp.float().abs() @ w_ref.abs().T + y_ref.abs()) + 1e-6
        err = (y.float() - y_ref).abs()
        assert y.dtype == dtype and y.shape == (M, N)
        worst = float((err / bound).max())
        assert worst <= 1, f"bits={bits} M={M} K={K} N={N} g={gs} {kind}: error {worst:.2f}x the bound"
    x3 = torch.randn(2, 3, K, generator=g).to(device, dtype).transpose(0, 1)  # a 3-D, non-contiguous input
    y3 = packed_linear(x3, w, backend="triton")
    assert y3.shape == (3, 2, N)
    torch.testing.assert_close(y3.float(), packed_linear(x3.float(), w, backend="torch"),
                               rtol=EPS[dtype] * 8, atol=EPS[dtype] * 8 * float(y3.float().abs().max()))


@needs_triton
@pytest.mark.parametrize("bits", PACKED_BITS)
def test_triton_interpreted_matches_reference(bits, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_kernel(bits, "cpu", torch.float32)


@needs_triton
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", PACKED_BITS)
def test_triton_cuda_matches_reference(bits, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check_kernel(bits, "cuda", dtype)


def compile_for_hopper(bits: int, x_dtype: str, per_tile: bool, g_idx: bool, split_k: int):
    """Compile the kernel to a cubin for sm_90 without a GPU (triton's frontend, LLVM and the bundled ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from quanteval_kernels.triton_dequant import _kernel

    kernel = _kernel(False)
    sig = {"x_ptr": f"*{x_dtype}", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "g_ptr": "*i32",
           "y_ptr": "*fp32" if split_k > 1 else f"*{x_dtype}"}
    consts = dict(BITS=bits, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=split_k, GROUP_PER_TILE=per_tile,
                  HAS_GIDX=g_idx, DOT_PRECISION="tf32")
    sig.update({name: "constexpr" if name in consts else "i32" for name in kernel.arg_names[6:]})
    src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(c),): v for c, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 4})


@needs_triton
@pytest.mark.parametrize("bits", PACKED_BITS)
def test_triton_kernel_compiles_for_hopper(bits):
    """The interpreter does not type-check like the compiler: compile both scale paths to sm_90 machine code."""
    pytest.importorskip("triton.backends.nvidia")
    for args in (("fp16", True, False, 1), ("bf16", False, True, 2)):
        out = compile_for_hopper(bits, *args)
        assert "cubin" in out.asm and out.metadata.shared < 64 * 1024  # words staged, not one int32 per code
