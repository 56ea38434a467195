"""LayerNorm over the last dimension: a Triton forward and a fused Triton backward.

forward:  y = (x - mean) * rstd * weight + bias, mean and rstd = 1/sqrt(var + eps) kept in fp32 per row.
backward: one kernel computes dX for its rows and sums dW/dB over those rows in fp32 registers, writing one
          (N,) partial per program; a small column-sum kernel over the (programs, N) partials is the second
          reduction (_common.column_sums). No atomics, so the result does not depend on scheduling.
torch.library ops vitcore::layer_norm_fwd / layer_norm_bwd (with fake implementations, made by _common.KernelOp) are
what torch.compile sees; eager calls skip their wrappers and call the same launchers directly. Frozen weight and
bias (ctx.needs_input_grad) skip the dW/dB reduction.

Dtypes: x in fp32/fp16/bf16; weight and bias share one dtype, which may differ from x's (fp32 master weights
with half activations). All arithmetic is fp32; y and dx come back in x's dtype, dweight and dbias in the
weight's dtype. Under torch.autocast nothing is cast: autocast would run F.layer_norm in fp32 and return fp32,
while this keeps half activations half (the statistics are fp32 either way). Widths up to 8192 (one row fits in
one block).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    KernelOp,
    cdiv,
    check_float,
    check_launchable,
    column_sums,
    new_output,
    next_pow2,
    skipped_grad,
    sm_count,
)

__all__ = ["layer_norm", "MAX_WIDTH"]

MAX_WIDTH = 8192


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) input, row stride stride_x, unit column stride
    Y,  # (M, N) output, contiguous, x's dtype
    W,  # (N,) scale
    B,  # (N,) shift
    MEAN,  # (M,) fp32, saved for the backward
    RSTD,  # (M,) fp32, saved for the backward
    stride_x,  # elements between consecutive rows of X
    M,  # number of rows
    N,  # width (normalised dimension)
    eps,  # added to the variance
    BLOCK_N: tl.constexpr,  # next power of two >= N: a whole row in one block
    ROWS: tl.constexpr,  # rows per program; > 1 for narrow rows so a program moves enough bytes
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    # 64-bit row offsets: M * N passes 2**31 for large ViT-H batches.
    rows64 = rows.to(tl.int64)

    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    # Two-pass variance on registers: the row is already loaded, and it avoids E[x^2] - E[x]^2 cancellation.
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)

    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) upstream gradient, row stride stride_dy, unit column stride
    X,  # (M, N) forward input, row stride stride_x, unit column stride
    W,  # (N,) scale
    MEAN,  # (M,) fp32 from the forward
    RSTD,  # (M,) fp32 from the forward
    DX,  # (M, N) output, contiguous, x's dtype
    DW_PARTIAL,  # (G, N) fp32: row g = sum over program g's rows of dy * xhat
    DB_PARTIAL,  # (G, N) fp32: row g = sum over program g's rows of dy
    stride_dy,  # elements between rows of DY
    stride_x,  # elements between rows of X
    M,  # number of rows
    N,  # width
    rows_per_prog,  # rows each program owns; a multiple of ROWS so programs never overlap
    BLOCK_N: tl.constexpr,  # next power of two >= N
    ROWS: tl.constexpr,  # rows handled per loop iteration
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    # The dW/dB partial sums stay in fp32 registers for all of this program's rows: the only write is one row
    # of each partial buffer at the end.
    dw_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)

    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)

        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        # dx = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat)), the means over the row.
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

        dw_acc += dy * xhat
        db_acc += dy

    tl.store(DW_PARTIAL + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    tl.store(DB_PARTIAL + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------------------------------------- host


def _block_shape(n: int, tile_elems: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps): whole rows per block, several rows when narrow so each program has
    ~tile_elems elements in flight; about 8-16 elements per thread per tensor."""
    block_n = next_pow2(n)
    rows = max(1, min(16, tile_elems // block_n))
    num_warps = min(16, max(4, rows * block_n // 512))
    return block_n, rows, num_warps


def _rows_view(t: torch.Tensor, n: int) -> torch.Tensor:
    """(M, N) view with unit column stride; copies only when no such view exists."""
    t2 = t.reshape(-1, n)
    if t2.stride(1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < n):
        t2 = t2.contiguous()
    return t2


def _layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = _rows_view(x, n)
    weight, bias = weight.contiguous(), bias.contiguous()  # (N,): loaded with unit stride
    m = x2.shape[0]
    y = new_output((m, n), x.dtype, x.device)
    mean = new_output((m,), torch.float32, x.device)
    rstd = new_output((m,), torch.float32, x.device)
    if m == 0:
        return y.view(x.shape), mean, rstd
    block_n, rows, num_warps = _block_shape(n, 4096)
    grid = (cdiv(m, rows),)
    _layer_norm_fwd_kernel[grid](
        x2, y, weight, bias, mean, rstd, x2.stride(0), m, n, eps,
        BLOCK_N=block_n, ROWS=rows, num_warps=num_warps,
    )  # fmt: skip
    return y.view(x.shape), mean, rstd


def _layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); needs_grad says which of the three to compute (see KernelOp). dx and the dW/dB
    partials come from one fused kernel; frozen weight and bias skip the second reduction (column_sums)."""
    need_dx, need_dw, need_db = needs_grad
    n = x.shape[-1]
    x2 = _rows_view(x, n)
    dy2 = _rows_view(dy, n)
    weight = weight.contiguous()
    m = x2.shape[0]
    dx = new_output((m, n), x.dtype, x.device)
    if m == 0:
        zeros = lambda need: torch.zeros(n, dtype=weight.dtype, device=weight.device) if need else skipped_grad(weight)
        return (dx.view(x.shape) if need_dx else skipped_grad(x)), zeros(need_dw), zeros(need_db)
    block_n, rows, num_warps = _block_shape(n, 2048)
    # A few programs per SM, each looping over a contiguous run of rows: enough parallelism to saturate memory
    # while keeping the (G, N) partial buffers (and the second reduction) small next to x itself.
    programs = min(cdiv(m, rows), 4 * sm_count(x.device))
    rows_per_prog = cdiv(cdiv(m, programs), rows) * rows
    programs = cdiv(m, rows_per_prog)
    partial = new_output((2, programs, n), torch.float32, x.device)  # [0]: dweight, [1]: dbias
    _layer_norm_bwd_kernel[(programs,)](
        dy2, x2, weight, mean, rstd, dx, partial[0], partial[1],
        dy2.stride(0), x2.stride(0), m, n, rows_per_prog,
        BLOCK_N=block_n, ROWS=rows, num_warps=num_warps,
    )  # fmt: skip
    # The second reduction only for the buffers whose gradient is wanted (none when weight and bias are frozen).
    lo, hi = (0 if need_dw else 1), (2 if need_db else 1)
    sums = column_sums(partial[lo:hi], weight.dtype) if lo < hi else []
    dw = sums.pop(0) if need_dw else skipped_grad(weight)
    db = sums.pop(0) if need_db else skipped_grad(weight)
    return (dx.view(x.shape) if need_dx else skipped_grad(x)), dw, db


# ------------------------------------------------------------------------------------ differentiable custom op


def _layer_norm_fwd_fake(x, weight, bias, eps):
    m = math.prod(x.shape[:-1])
    stats = x.new_empty((m,), dtype=torch.float32)
    return x.new_empty(x.shape), stats, stats.clone()


def _layer_norm_bwd_fake(dy, x, weight, mean, rstd, needs_grad):
    need_dx, need_dw, need_db = needs_grad
    grad = lambda need, t: t.new_empty(t.shape) if need else skipped_grad(t)
    return grad(need_dx, x), grad(need_dw, weight), grad(need_db, weight)


# vitcore::layer_norm_fwd (x, weight, bias, eps) -> (y, mean, rstd): y of x's shape and dtype, mean/rstd fp32 of
# shape (rows,); vitcore::layer_norm_bwd (dy, x, weight, mean, rstd, needs_grad) -> (dx, dweight, dbias).
_LAYER_NORM = KernelOp(
    "layer_norm",
    forward=_layer_norm_fwd, forward_fake=_layer_norm_fwd_fake,
    backward=_layer_norm_bwd, backward_fake=_layer_norm_bwd_fake,
    save=lambda args, outs: ((args[0], args[1], outs[1], outs[2]), ()),  # x, weight, mean, rstd
    num_grads=3,
)  # fmt: skip


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm of x over its last dimension, any leading shape; differentiable in x, weight and bias."""
    op = "kernels.layer_norm"
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, bias)):
        raise TypeError(f"{op}: x, weight and bias must be tensors")
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    if bias.dtype != weight.dtype:
        raise TypeError(f"{op}: weight and bias must share a dtype, got {weight.dtype} and {bias.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension")
    n = x.shape[-1]
    if weight.shape != (n,) or bias.shape != (n,):
        raise ValueError(
            f"{op}: weight and bias must have shape ({n},) to match x's last dimension, "
            f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if not 1 <= n <= MAX_WIDTH:
        raise ValueError(
            f"{op}: width {n} not supported; the kernel keeps one row in a block, 1 <= width <= {MAX_WIDTH}"
        )
    check_launchable(op, x, weight, bias)
    return _LAYER_NORM(x, weight, bias, float(eps))
