"""Triton dequant-matmul for W{2,3,4,8}A16: ``y = x @ W_hat.T`` reading packed weights (``pack.py`` layout).

Decode (M = 1..16) is memory bound: the weights do not fit in L2 and are
read once per call, so the kernel is built to stream them at bandwidth:

- each packed word is loaded once, as a ``(BLOCK_K * BITS / 32, BLOCK_N)``
  tile (at 3 bits: three ``(BLOCK_K / 32, BLOCK_N)`` tiles, one per word of
  a 32-code block), and shifted apart into codes in registers (a straddling
  3-bit code joins two words); nothing unpacked is written back. Loading one
  word per code instead would stage 4 bytes per weight in shared memory
  (``num_stages`` copies of a ``(BLOCK_K, BLOCK_N)`` int32 tile);
- the packed words, scales and zeros are stored output-major (see
  ``PackedLinearWeights``), so a tile's consecutive output channels are
  consecutive addresses;
- one program computes a ``BLOCK_M x BLOCK_N`` output tile and walks K in
  ``BLOCK_K`` steps, accumulating in float32; M = 1..16 runs as one
  16-row tile (the tensor-core minimum; the rows beyond M are masked);
- split-K (``SPLIT_K`` programs per output tile, summed with float32
  atomics) keeps every SM busy when ``N / BLOCK_N`` alone is too few tiles;
- when a K tile lies inside one group (``group_size % BLOCK_K == 0``, no
  ``g_idx``) the group's scale and zero are applied once per tile after the
  dot: ``sum_k x (c - z) s = s (x . (c - z))``, so each weight costs a
  shift, a mask, a subtract and a convert (``c - z`` is an integer in
  [-255, 255], exact in fp16 and bf16). Otherwise
  (``g_idx``, or groups not a multiple of a tile) scale and zero are read
  per weight and ``(c - z) * s`` is formed before the dot.

Prefill (M = 64..512) uses 64/128-row tiles; programs sharing an N tile run
next to each other (M fastest) so the weight tile is read from DRAM once.

Triton's interpreter runs the same kernel on CPU tensors, float32 included:
that is how the tests check it without a GPU. ``triton.jit`` reads
``TRITON_INTERPRET`` once, when it decorates, so a kernel decorated at import
would be fixed to one mode by whatever the environment said then. Here the
kernel is decorated twice on first use, compiled and interpreted (forcing
``triton.knobs.runtime.interpret`` in a ``scope``), and each call picks one
by ``TRITON_INTERPRET`` *at call time*: CUDA tensors run compiled unless it is
set; CPU tensors need it set. The kernel body calls no ``@triton.jit``
helper of ``triton.language`` (``tl.cdiv``, ``tl.zeros``, ``tl.sum`` are
ones): those were decorated when triton was imported, and the interpreter
cannot call a compiled-mode helper. The tests also compile the kernel to
sm_90 machine code without a GPU (``triton.compile`` with a ``GPUTarget``),
which type-checks what the interpreter does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from quanteval_kernels.pack import check_bits, n_words

__all__ = ["KernelConfig", "dequant_matmul", "interpreting", "min_block_k", "pick_config"]


def _dequant_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, y_ptr,
    M, N, K, group_size, k_per_split,
    stride_xm, stride_xk, stride_wn, stride_ww, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym, stride_yn,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_PER_TILE: tl.constexpr, HAS_GIDX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    pid_m = pid % num_pid_m  # M fastest: programs on one weight tile run together
    pid_n = pid // num_pid_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    n_words = (K * BITS + 31) // 32
    code_mask = (1 << BITS) - 1
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        k_mask = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
        wk_mask = k_mask[:, None] & n_mask[None, :]
        # codes (BK, BN) from whole words: each word is loaded once, then shifted apart in registers
        if BITS == 3:  # a 32-code block is 3 words; codes 10 and 21 straddle two
            offs_j = k0 // 32 + tl.arange(0, BLOCK_K // 32)  # (BJ,) blocks
            w_rows = w_ptr + offs_n[None, :] * stride_wn + (offs_j * 3)[:, None] * stride_ww  # (BJ, BN)
            w0 = tl.load(w_rows, mask=(offs_j * 3 < n_words)[:, None] & n_mask[None, :], other=0)
            w1 = tl.load(w_rows + stride_ww, mask=(offs_j * 3 + 1 < n_words)[:, None] & n_mask[None, :], other=0)
            w2 = tl.load(w_rows + 2 * stride_ww, mask=(offs_j * 3 + 2 < n_words)[:, None] & n_mask[None, :], other=0)
            w0 = w0.to(tl.uint32, bitcast=True)[:, None, :]  # (BJ, 1, BN)
            w1 = w1.to(tl.uint32, bitcast=True)[:, None, :]
            w2 = w2.to(tl.uint32, bitcast=True)[:, None, :]
            bit = tl.arange(0, 32) * 3  # (32,) stream bit of each code in its block
            t = (bit // 32)[None, :, None]  # (1, 32, 1) its word in the block
            off = (bit % 32).to(tl.uint32)[None, :, None]  # (1, 32, 1)
            lo = tl.where(t == 0, w0, tl.where(t == 1, w1, w2))  # (BJ, 32, BN)
            hi = tl.where(t == 0, w1, w2)  # the next word: only its low bits of a straddling code survive the mask
            v = (lo >> off) | ((hi << 1) << (31 - off))  # hi << (32 - off) without a 32-bit shift
        else:  # 32 // BITS codes per word, none straddles
            offs_w = k0 // (32 // BITS) + tl.arange(0, BLOCK_K * BITS // 32)  # (BKW,) words
            words = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_w[:, None] * stride_ww,
                            mask=(offs_w < n_words)[:, None] & n_mask[None, :], other=0)  # (BKW, BN)
            shift = (tl.arange(0, 32 // BITS) * BITS).to(tl.uint32)  # (PER,)
            v = words.to(tl.uint32, bitcast=True)[:, None, :] >> shift[None, :, None]  # (BKW, PER, BN)
        codes = tl.reshape(v & code_mask, (BLOCK_K, BLOCK_N)).to(tl.int32)  # (BK, BN), k = word * PER + j
        if GROUP_PER_TILE:
            grp = k0 // group_size
            s = tl.load(s_ptr + offs_n * stride_sn + grp * stride_sg, mask=n_mask, other=0.0).to(tl.float32)  # (BN,)
            z = tl.load(z_ptr + offs_n * stride_zn + grp * stride_zg, mask=n_mask, other=0).to(tl.int32)  # (BN,)
            w = (codes - z[None, :]).to(x.dtype)  # (BK, BN) integers in [-255, 255]: exact in fp16/bf16
            acc += tl.dot(x, w, input_precision=DOT_PRECISION) * s[None, :]
        else:
            if HAS_GIDX:
                grp = tl.load(g_ptr + offs_k, mask=k_mask, other=0)  # (BK,)
            else:
                grp = offs_k // group_size
            s = tl.load(s_ptr + offs_n[None, :] * stride_sn + grp[:, None] * stride_sg,
                        mask=wk_mask, other=0.0).to(tl.float32)  # (BK, BN)
            z = tl.load(z_ptr + offs_n[None, :] * stride_zn + grp[:, None] * stride_zg,
                        mask=wk_mask, other=0).to(tl.float32)  # (BK, BN)
            w = ((codes.to(tl.float32) - z) * s).to(x.dtype)  # (BK, BN)
            acc += tl.dot(x, w, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now (calls then run in Triton's interpreter)."""
    return bool(triton.knobs.runtime.interpret)


@cache
def _kernel(interpret: bool):
    """The kernel decorated for the interpreter or for compilation (see the module docstring)."""
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        return triton.jit(_dequant_matmul_kernel)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters (powers of two; block sizes >= 16 for ``tl.dot``)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for k in ("block_m", "block_n", "block_k"):
            v = getattr(self, k)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig.{k}={v}: must be a power of two >= 16")
        if self.split_k < 1:
            raise ValueError(f"KernelConfig.split_k={self.split_k}: must be >= 1")


def _pow2_factor(n: int) -> int:
    return n & -n


def min_block_k(bits: int) -> int:
    """The smallest K tile: 16 for ``tl.dot``; 32 at 3 bits (whole 3-word blocks of 32 codes)."""
    return 32 if bits == 3 else 16


def pick_config(M: int, N: int, K: int, bits: int, group_size: int, has_g_idx: bool,
                device: torch.device) -> KernelConfig:
    """Heuristic tiles by M (decode / small batch / prefill), not autotuned: see benchmarks/gpu_kernels.py.

    ``block_k`` is shrunk to divide the group size when that keeps it >= ``min_block_k(bits)``,
    so each K tile has one scale per output channel.
    """
    if device.type != "cuda":  # the interpreter: few, large programs
        cfg = dict(block_m=16, block_n=64, block_k=64)
    elif M <= 16:
        cfg = dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    elif M <= 64:
        cfg = dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4)
    else:
        cfg = dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    if group_size != -1 and not has_g_idx and group_size < K:
        f = _pow2_factor(group_size)
        if min_block_k(bits) <= f < cfg["block_k"]:
            cfg["block_k"] = f
    if device.type == "cuda" and M <= 16:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        tiles = -(-N // cfg["block_n"])
        k_tiles = -(-K // cfg["block_k"])
        cfg["split_k"] = max(1, min(-(-2 * sms // tiles), k_tiles // 4))
    return KernelConfig(**cfg)


def dequant_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int, g_idx: torch.Tensor | None = None,
                   config: KernelConfig | None = None) -> torch.Tensor:
    """``x @ W_hat.T`` with the Triton kernel: x (..., in) fp16/bf16 (fp32 too) -> (..., out) in ``x.dtype``.

    Same arguments as ``quanteval_kernels.reference.dequant_matmul``; tensors may
    have any strides. ``config`` overrides ``pick_config`` (benchmarks, tests).
    """
    check_bits(bits)
    interpret = interpreting()
    if x.device.type != "cuda" and not interpret:
        raise RuntimeError(f"x is on {x.device.type}: the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 "
                           f"for Triton's CPU interpreter")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x: float16, bfloat16 or float32 activations required, got {x.dtype}")
    K = x.shape[-1]
    N = packed.shape[0]
    n_groups = 1 if group_size == -1 else -(-K // group_size)
    if packed.shape != (N, n_words(K, bits)) or packed.dtype != torch.int32:
        raise ValueError(f"packed: ({N}, {n_words(K, bits)}) int32 required for in={K} at bits={bits}, "
                         f"got {tuple(packed.shape)} {packed.dtype}")
    if scales.shape != (N, n_groups) or zeros.shape != (N, n_groups):
        raise ValueError(f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)}: expected ({N}, {n_groups})")
    if g_idx is not None and g_idx.shape != (K,):
        raise ValueError(f"g_idx: shape ({K},) required, got {tuple(g_idx.shape)}")
    x2 = x.reshape(-1, K)  # (M, K)
    M = x2.shape[0]
    gs = K if group_size == -1 else group_size
    cfg = config or pick_config(M, N, K, bits, group_size, g_idx is not None, x.device)
    if cfg.block_k < min_block_k(bits):
        raise ValueError(f"KernelConfig.block_k={cfg.block_k}: must be >= {min_block_k(bits)} at bits={bits}")
    per_tile = g_idx is None and (n_groups == 1 or gs % cfg.block_k == 0)
    k_per_split = -(-K // (cfg.split_k * cfg.block_k)) * cfg.block_k  # a whole number of K tiles
    if cfg.split_k == 1:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    g = g_idx.to(torch.int32) if g_idx is not None else packed  # unused pointer when HAS_GIDX is False
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), cfg.split_k)
    _kernel(interpret)[grid](
        x2, packed, scales, zeros, g, y,
        M, N, K, gs, k_per_split,
        x2.stride(0), x2.stride(1), packed.stride(0), packed.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1), y.stride(0), y.stride(1),
        BITS=bits, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        GROUP_PER_TILE=per_tile, HAS_GIDX=g_idx is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], N)
