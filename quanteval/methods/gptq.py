"""GPTQ: post-training quantisation with second-order error compensation.

Follows Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (arXiv:2210.17323), and its reference
implementation IST-DASLab/gptq (``gptq.py``, ``GPTQ.fasterquant``).

For one linear layer with weight ``W: (out, in)`` and calibration inputs
``X: (in, n)``, GPTQ quantises the columns of ``W`` one at a time and spreads
each column's rounding error over the columns not yet quantised, using the
inverse of ``H = 2 X X^T / n`` (through its upper Cholesky factor). Columns
are processed in blocks of ``block_size`` with lazy updates of the rest.

What matches the reference, deliberately:

- dead columns (``H[i, i] == 0``) get ``H[i, i] = 1`` and ``W[:, i] = 0``;
- dampening adds ``damp * mean(diag H)`` to the diagonal;
- with groups, a group's scale and zero come from ``minmax_params`` on the
  block-level-updated weights ``W[:, c : c + group_size]`` when column ``c``
  starts the group (updates from earlier columns of the same lazy block are
  not yet in ``W``: the reference behaves the same way);
- ``act_order`` permutes columns by descending ``diag H``; groups are then
  formed in permuted order, unless ``static_groups``, which fixes every
  group's parameters up front from the original-order columns.

What differs: the Hessian is a running average over *tokens*, not sequences
(a constant factor, which no result depends on); a failed Cholesky raises the
dampening tenfold (logged) up to ``max_damp`` instead of crashing; per-channel
(``group_size=-1``) parameters are computed after dead columns are zeroed.

Scales, zeros and codes use the shared primitives, so conventions (fp16
scales rounded up, integer zeros, short last group) match RTN exactly.

>>> g = GPTQ(8, name="demo")
>>> g.add_batch(torch.randn(64, 8))
>>> lq, stats = g.quantize(torch.randn(4, 8), bits=4, group_size=4, sym=False)
>>> lq.codes.shape, lq.scales.shape, stats["damp"]
(torch.Size([4, 8]), torch.Size([4, 2]), 0.01)
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from quanteval.calibration import BlockInputs, block_forward
from quanteval.config import GPTQConfig
from quanteval.methods import QuantResult, QuantSpec, apply_result, rtn_outside_blocks
from quanteval.primitives import LayerQuant, group_width, minmax_params

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- one layer (tensors only)


def damped_inverse_cholesky(
    h: torch.Tensor, damp: float, max_damp: float, name: str
) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + d * mean(diag H) * I)^-1``, the fraction ``d`` used, and the rises.

    Starts at ``d = damp`` and multiplies it by 10 (capped at ``max_damp``)
    while either factorisation fails; raises ``ValueError`` naming ``name``
    when it still fails at ``max_damp``.
    """
    mean_diag = h.diagonal().mean()
    frac, rises = damp, 0
    while True:
        hd = h.clone()  # (in, in)
        hd.diagonal().add_(frac * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv_u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and bool(torch.isfinite(hinv_u).all()):
                return hinv_u, frac, rises
        if frac >= max_damp:
            raise ValueError(
                f"{name or 'layer'}: Hessian is not positive definite even with damping {frac:g} "
                f"(method.max_damp={max_damp:g}); check the calibration data or raise max_damp"
            )
        new = min(frac * 10, max_damp)
        log.warning("%s: Cholesky failed at damp=%g; raising damping to %g", name or "layer", frac, new)
        frac, rises = new, rises + 1


@contextmanager
def _serial_on_cpu(device: torch.device):
    """One intra-op thread on CPU for the per-column loop.

    Its ops are small (one column, one lazy block), so forking threads per op
    costs more than it saves, and stalls for milliseconds per op when another
    process holds a core (seen here: 0.2 s single-threaded vs 12 s with 2
    threads for a 1536 x 576 layer). The thread count is restored on exit.
    """
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _solve_columns(
    W: torch.Tensor, hinv: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor, col_group: list[int],
    g: int, bits: int, sym: bool, dynamic: bool, block_size: int,
) -> tuple[torch.Tensor, float]:
    """The reference's column loop: codes ``(in, out)`` in working order, and its loss.

    ``W: (out, in)`` (working order) gets the lazy block updates in place; with
    ``dynamic`` groups, ``scales_t``/``zeros_t: (n_groups, out)`` are filled as
    each group starts. Each lazy block is held transposed, ``(b, out)``, so a
    column, its error and the rows still to update are contiguous memory; the
    update is ``W1 -= hinv_row x err`` as the reference writes it (the product
    rounded, then subtracted), which keeps every weight bit-identical to the
    reference transcription (``tests/test_gptq.py``) at about half the time of
    an ``addr_`` on strided columns.
    """
    out_f, cols = W.shape
    maxq = 2**bits - 1
    codes_t = torch.empty(cols, out_f, device=W.device)  # (in, out), working order
    tmp = torch.empty(out_f, device=W.device)  # (out,)
    loss = 0.0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].T.contiguous()  # (b, out): the block's column i is row i
        err1 = torch.empty_like(W1)  # (b, out)
        hinv1 = hinv[i1:i2, i1:i2]  # (b, b)
        with _serial_on_cpu(W.device):
            for i in range(i2 - i1):
                c = i1 + i
                if dynamic and c % g == 0:
                    # reference: the group's params from W, updated up to the last lazy block
                    j = c // g
                    scales_t[j], zeros_t[j] = minmax_params(W[:, c : c + g], bits, sym)
                s, z = scales_t[col_group[c]], zeros_t[col_group[c]]  # (out,) each
                col, code, err = W1[i], codes_t[c], err1[i]  # (out,) views
                torch.div(col, s, out=code)  # quantize_codes, in place
                code.round_().add_(z).clamp_(0, maxq)
                torch.sub(code, z, out=tmp)
                tmp.mul_(s)  # the dequantised column
                torch.sub(col, tmp, out=err)
                err.div_(hinv1[i, i])
                if i + 1 < i2 - i1:
                    W1[i + 1 :].sub_(hinv1[i, i + 1 :, None] * err)  # (b - i - 1, out): spread the error
        loss += float((err1**2).sum()) / 2  # the reference's sum((w - q)^2 / Hinv_cc^2) / 2
        W[:, i2:] -= err1.T @ hinv[i1:i2, i2:]  # (out, in - i2)
    return codes_t, loss


HESSIAN_BANDS = 3  # column bands of H's upper-triangle update (2/3 of X^T X's work; more bands: smaller GEMMs)


class GPTQ:
    """Hessian accumulator and solver for one linear layer (the reference's per-layer object).

    >>> g = GPTQ(3)
    >>> g.add_batch(torch.ones(2, 5, 3))  # any (..., in) input
    >>> g.H  # 2 * mean over tokens of x x^T
    tensor([[2., 2., 2.],
            [2., 2., 2.],
            [2., 2., 2.]])
    """

    def __init__(self, in_features: int, name: str = "") -> None:
        self.in_features = in_features
        self.name = name  # full module path, used in errors and logs
        self._h: torch.Tensor | None = None  # (in, in) float32, allocated on the first batch's device
        self._lower_stale = False  # add_batch updates the blocks on and above the diagonal only
        bands = max(1, min(HESSIAN_BANDS, in_features // 128))
        self._edges = [in_features * k // bands for k in range(bands + 1)]  # the column bands of H
        self.n_tokens = 0

    @property
    def H(self) -> torch.Tensor | None:
        """``2 X X^T / n``, ``(in, in)``; symmetric (its lower triangle mirrored from the upper on first read)."""
        if self._h is not None and self._lower_stale:
            self._h.copy_(torch.triu(self._h) + torch.triu(self._h, diagonal=1).T)
            self._lower_stale = False
        return self._h

    @H.setter
    def H(self, h: torch.Tensor | None) -> None:
        self._h, self._lower_stale = h, False

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Fold inputs ``x: (..., in)`` into ``H = 2 X X^T / n`` (running average over tokens).

        ``X^T X`` is symmetric, so only the blocks of ``HESSIAN_BANDS`` column
        bands on or above the diagonal are computed (about 2/3 of the
        multiply-adds with three bands; each element is still one dot product
        over the tokens); ``H`` mirrors the rest when it is read.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: input width {x.shape[-1]} != in_features {self.in_features}")
        x = x.reshape(-1, self.in_features).float()  # (tokens, in)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{self.name or 'layer'}: calibration activations contain NaN or inf")
        if self._h is None:
            self._h = torch.zeros(self.in_features, self.in_features, device=x.device)
        n_new = x.shape[0]
        total = self.n_tokens + n_new
        self._h.mul_(self.n_tokens / total)
        x = x * (2 / total) ** 0.5
        for a, b in zip(self._edges, self._edges[1:]):
            self._h[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])  # (b - a, in - a): the band's upper blocks
        self._lower_stale = len(self._edges) > 2
        self.n_tokens = total

    @torch.no_grad()
    def quantize(
        self,
        w: torch.Tensor,
        bits: int,
        group_size: int,
        sym: bool,
        block_size: int = 128,
        damp: float = 0.01,
        act_order: bool = False,
        static_groups: bool = False,
        max_damp: float = 1.0,
        name: str = "",
    ) -> tuple[LayerQuant, dict]:
        """Quantise ``w: (out, in)``; returns the LayerQuant (original column order) and stats.

        Stats: ``damp`` (the dampening fraction finally used), ``damp_rises``
        (how many times it was raised) and ``loss`` (the reference's error,
        ``sum((w - q)^2 / Hinv_cc^2) / 2``). Leaves ``self.H`` untouched, so
        linears sharing an input can share one object.
        """
        name = name or self.name
        if self.H is None:
            raise ValueError(f"{name or 'layer'}: no calibration batches were added")
        out_f, cols = w.shape
        if cols != self.in_features:
            raise ValueError(f"{name}: weight has {cols} input columns, Hessian has {self.in_features}")
        g = group_width(cols, group_size)
        n_groups = -(-cols // g)
        W = w.detach().float().clone()  # (out, in)
        H = self.H.clone()  # (in, in)
        dead = H.diagonal() == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        # group parameters row-major, (n_groups, out), so a column's scale and zero are contiguous rows
        scales_t = torch.zeros(n_groups, out_f, device=W.device)  # (n_groups, out)
        zeros_t = torch.zeros(n_groups, out_f, device=W.device)  # (n_groups, out)
        dynamic = group_size != -1 and not static_groups  # params found as each group starts
        if not dynamic:
            for j in range(n_groups):  # original-order groups (one group when per-channel)
                scales_t[j], zeros_t[j] = minmax_params(W[:, j * g : (j + 1) * g], bits, sym)

        perm = torch.arange(cols, device=W.device)
        if act_order:
            perm = torch.argsort(H.diagonal(), descending=True, stable=True)
            W = W[:, perm]
            H = H[perm][:, perm]
        # group of each column in working (permuted) order
        col_group = perm // g if not dynamic else torch.arange(cols, device=W.device) // g  # (in,)
        col_group_list = col_group.tolist()

        hinv, frac, rises = damped_inverse_cholesky(H, damp, max_damp, name)  # (in, in) upper
        del H
        codes_t, loss = _solve_columns(W, hinv, scales_t, zeros_t, col_group_list, g, bits, sym, dynamic, block_size)

        g_idx = torch.empty(cols, dtype=torch.int32, device=W.device)
        g_idx[perm] = col_group.to(torch.int32)  # original column -> group
        codes_orig = torch.empty_like(W)  # (out, in)
        codes_orig[:, perm] = codes_t.T
        lq = LayerQuant(
            bits=bits,
            group_size=group_size,
            sym=sym,
            codes=codes_orig.to(torch.uint8),
            scales=scales_t.T.contiguous().to(torch.float16),  # (out, n_groups), already fp16 values
            zeros=zeros_t.T.contiguous().to(torch.uint8),
            g_idx=g_idx,
        )
        return lq, {"damp": frac, "damp_rises": rises, "loss": loss}


# --------------------------------------------------------------------------- the model, block by block


class _StopBlock(Exception):
    """Ends the Hessian pass of a block once the last linear's inputs are recorded."""


def _stop_block(module, args):
    raise _StopBlock


@torch.no_grad()
def gptq_model(model, adapter, spec: QuantSpec, method_cfg: GPTQConfig, calib: BlockInputs) -> QuantResult:
    """GPTQ on every decoder linear of ``model``, sequentially, block by block.

    For block ``i``: one pass over the calibration chunks accumulates a
    Hessian per group of linears that share an input (``adapter.linears``);
    each linear is solved and its dequantised weight written into the module;
    a second pass gives block ``i + 1`` its inputs, so later blocks see the
    quantised outputs. ``calib`` is not modified (the sweep reuses it). With
    ``spec.quantize_embeddings``, lm_head / embeddings get RTN.

    >>> # result = gptq_model(model, adapter_for(model), QuantSpec(4, 64, False), GPTQConfig(), calib)
    >>> # apply_result(model, result)   # idempotent: the blocks already hold these weights
    """
    blocks = model.get_submodule(adapter.blocks)
    timings = {"hessian_s": 0.0, "solve_s": 0.0, "forward_s": 0.0}
    layers: dict[str, LayerQuant] = {}
    losses: dict[str, float] = {}
    rises: list[dict] = []
    hidden = calib.hidden
    t_start = time.perf_counter()
    for i, block in enumerate(tqdm(blocks, desc="gptq", unit="block")):
        prefix = f"{adapter.blocks}.{i}"
        hessians: dict[str, GPTQ] = {}
        handles = []
        for group in adapter.linears:
            first = block.get_submodule(group[0])
            hessians[group[0]] = GPTQ(first.in_features, name=f"{prefix}.{group[0]}")
            handles.append(first.register_forward_pre_hook(lambda m, args, h=hessians[group[0]]: h.add_batch(args[0])))
        # The last group's output is not needed in this pass: stop the block once its inputs are in.
        handles.append(block.get_submodule(adapter.linears[-1][0]).register_forward_pre_hook(_stop_block))
        t0 = time.perf_counter()
        try:
            for h in hidden:
                try:
                    block(h, **calib.kwargs[i])
                except _StopBlock:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        timings["hessian_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        for group in adapter.linears:
            # Linears that share an input share H, and GPTQ treats rows independently given H,
            # so one solve over their stacked rows gives each layer exactly its own result.
            modules = [block.get_submodule(lin) for lin in group]
            w = torch.cat([m.weight for m in modules])  # (sum of outs, in)
            lq, stats = hessians[group[0]].quantize(
                w, spec.bits_for(f"{prefix}.{group[0]}"), spec.group_size, spec.sym,
                block_size=method_cfg.block_size, damp=method_cfg.damp, act_order=method_cfg.act_order,
                static_groups=method_cfg.static_groups, max_damp=method_cfg.max_damp,
                name=f"{prefix}.{'+'.join(group)}",
            )
            row = 0
            for lin, module in zip(group, modules):
                rows = slice(row, row + module.out_features)
                row += module.out_features
                part = LayerQuant(lq.bits, lq.group_size, lq.sym, lq.codes[rows], lq.scales[rows],
                                  lq.zeros[rows], lq.g_idx)
                module.weight.data.copy_(part.dequantize(torch.float32).to(module.weight.dtype))
                layers[f"{prefix}.{lin}"] = part.cpu()
            losses[f"{prefix}.{'+'.join(group)}"] = stats["loss"]
            if stats["damp_rises"]:
                rises.append({"layers": f"{prefix}.{'+'.join(group)}", "damp": stats["damp"]})
        del hessians
        timings["solve_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        if i + 1 < len(blocks):  # the last block's outputs feed nothing
            hidden = block_forward(block, hidden, calib.kwargs[i])
        timings["forward_s"] += time.perf_counter() - t0

    outside = rtn_outside_blocks(model, adapter, spec)  # lm_head / embeddings: RTN (their inputs are not captured)
    apply_result(model, QuantResult(layers=outside))  # like the blocks, the model holds the quantised weights
    layers.update(outside)
    timings = {k: round(v, 3) for k, v in timings.items()}
    info = {**timings, "total_s": round(time.perf_counter() - t_start, 3), "n_tokens": calib.n_tokens,
            "damp_rises": rises, "layer_loss": losses}
    return QuantResult(layers=layers, info=info)
