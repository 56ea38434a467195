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
one block), as up to three power-of-two column parts (768 = 512 + 256, 1280 = 1024 + 256), so ViT widths leave no
lane idle.
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


# A row of width N is handled as up to three column parts of power-of-two widths N0 >= N1 >= N2 (0 when absent;
# see _width_parts): 768 = 512 + 256, 1024, 1280 = 1024 + 256, so no lane idles on padding (only a width with more
# than three binary digits pads, in its last part). Each part is its own register tile; the helpers below do one
# part's share of a step, and the kernels call them for each part that exists.


@triton.jit
def _part_cols(COL0: tl.constexpr, WIDTH: tl.constexpr, N: tl.constexpr):
    """Columns COL0 .. COL0 + WIDTH and whether each is inside the row (only a last part may overhang N)."""
    cols = COL0 + tl.arange(0, WIDTH)
    return cols, cols < N


@triton.jit
def _fwd_load(X, rows64, row_ok, stride_x, COL0: tl.constexpr, WIDTH: tl.constexpr, N: tl.constexpr):
    """One part of the rows in fp32 (0 outside the tensor) and its row sums."""
    cols, col_ok = _part_cols(COL0, WIDTH, N)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    x = x.to(tl.float32)
    return x, tl.sum(x, axis=1)


@triton.jit
def _fwd_center(x, mean, COL0: tl.constexpr, WIDTH: tl.constexpr, N: tl.constexpr):
    """x - mean (0 in the padding columns of an overhanging part) and its row sums of squares."""
    xc = x - mean[:, None]
    if COL0 + WIDTH > N:
        _, col_ok = _part_cols(COL0, WIDTH, N)
        xc = tl.where(col_ok[None, :], xc, 0.0)
    return xc, tl.sum(xc * xc, axis=1)


@triton.jit
def _fwd_store(Y, W, B, rows64, row_ok, xc, rstd, COL0: tl.constexpr, WIDTH: tl.constexpr, N: tl.constexpr):
    """y = xc * rstd * weight + bias for one part, stored in Y's dtype."""
    cols, col_ok = _part_cols(COL0, WIDTH, N)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


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
    N: tl.constexpr,  # width (normalised dimension)
    eps,  # added to the variance
    N0: tl.constexpr,  # column parts: powers of two, N0 >= N1 >= N2, 0 when absent (_width_parts)
    N1: tl.constexpr,
    N2: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program; > 1 for narrow rows so a program moves enough bytes
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    # 64-bit row offsets: M * N passes 2**31 for large ViT-H batches.
    rows64 = rows.to(tl.int64)

    x0, total = _fwd_load(X, rows64, row_ok, stride_x, 0, N0, N)
    if N1 > 0:
        x1, s = _fwd_load(X, rows64, row_ok, stride_x, N0, N1, N)
        total += s
    if N2 > 0:
        x2, s = _fwd_load(X, rows64, row_ok, stride_x, N0 + N1, N2, N)
        total += s
    mean = total / N
    # Two-pass variance on registers: the row is already loaded, and it avoids E[x^2] - E[x]^2 cancellation.
    xc0, squares = _fwd_center(x0, mean, 0, N0, N)
    if N1 > 0:
        xc1, s = _fwd_center(x1, mean, N0, N1, N)
        squares += s
    if N2 > 0:
        xc2, s = _fwd_center(x2, mean, N0 + N1, N2, N)
        squares += s
    rstd = 1.0 / tl.sqrt(squares / N + eps)

    _fwd_store(Y, W, B, rows64, row_ok, xc0, rstd, 0, N0, N)
    if N1 > 0:
        _fwd_store(Y, W, B, rows64, row_ok, xc1, rstd, N0, N1, N)
    if N2 > 0:
        _fwd_store(Y, W, B, rows64, row_ok, xc2, rstd, N0 + N1, N2, N)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _bwd_weight(W, COL0: tl.constexpr, WIDTH: tl.constexpr, N: tl.constexpr):
    cols, col_ok = _part_cols(COL0, WIDTH, N)
    return tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def _bwd_load(X, DY, rows64, row_ok, stride_x, stride_dy, w, mean, rstd, COL0: tl.constexpr, WIDTH: tl.constexpr,
              N: tl.constexpr):
    """One part's xhat, w * dy and dy in fp32 (0 outside the tensor), and its row sums of xhat * w * dy and
    w * dy."""
    cols, col_ok = _part_cols(COL0, WIDTH, N)
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    wdy = w[None, :] * dy
    return xhat, wdy, dy, tl.sum(xhat * wdy, axis=1), tl.sum(wdy, axis=1)


@triton.jit
def _bwd_store(DX, rows64, row_ok, xhat, wdy, dy, c1, c2, rstd, dw_acc, db_acc, COL0: tl.constexpr,
               WIDTH: tl.constexpr, N: tl.constexpr):
    """dx = rstd * (wdy - xhat * c1 - c2) for one part, stored in DX's dtype; the part's dW/dB sums updated."""
    cols, col_ok = _part_cols(COL0, WIDTH, N)
    dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    return dw_acc + dy * xhat, db_acc + dy


@triton.jit
def _bwd_partials(DW_PARTIAL, DB_PARTIAL, pid, dw_acc, db_acc, COL0: tl.constexpr, WIDTH: tl.constexpr,
                  N: tl.constexpr):
    """This program's column sums of one part's dW/dB accumulators: one row of each partial buffer."""
    cols, col_ok = _part_cols(COL0, WIDTH, N)
    tl.store(DW_PARTIAL + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    tl.store(DB_PARTIAL + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


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
    N: tl.constexpr,  # width
    rows_per_prog,  # rows each program owns; a multiple of ROWS so programs never overlap
    N0: tl.constexpr,  # column parts, as in the forward
    N1: tl.constexpr,
    N2: tl.constexpr,
    ROWS: tl.constexpr,  # rows handled per loop iteration
):
    pid = tl.program_id(0)
    # The dW/dB partial sums stay in fp32 registers for all of this program's rows: the only write is one row
    # of each partial buffer at the end.
    w0 = _bwd_weight(W, 0, N0, N)
    dw0 = tl.zeros((ROWS, N0), dtype=tl.float32)
    db0 = tl.zeros((ROWS, N0), dtype=tl.float32)
    if N1 > 0:
        w1 = _bwd_weight(W, N0, N1, N)
        dw1 = tl.zeros((ROWS, N1), dtype=tl.float32)
        db1 = tl.zeros((ROWS, N1), dtype=tl.float32)
    if N2 > 0:
        w2 = _bwd_weight(W, N0 + N1, N2, N)
        dw2 = tl.zeros((ROWS, N2), dtype=tl.float32)
        db2 = tl.zeros((ROWS, N2), dtype=tl.float32)

    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        # dx = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat)), the means over the row.
        xhat0, wdy0, dy0, c1, c2 = _bwd_load(X, DY, rows64, row_ok, stride_x, stride_dy, w0, mean, rstd, 0, N0, N)
        if N1 > 0:
            xhat1, wdy1, dy1, s1, s2 = _bwd_load(X, DY, rows64, row_ok, stride_x, stride_dy, w1, mean, rstd,
                                                 N0, N1, N)
            c1 += s1
            c2 += s2
        if N2 > 0:
            xhat2, wdy2, dy2, s1, s2 = _bwd_load(X, DY, rows64, row_ok, stride_x, stride_dy, w2, mean, rstd,
                                                 N0 + N1, N2, N)
            c1 += s1
            c2 += s2
        c1 = c1 / N
        c2 = c2 / N
        dw0, db0 = _bwd_store(DX, rows64, row_ok, xhat0, wdy0, dy0, c1, c2, rstd, dw0, db0, 0, N0, N)
        if N1 > 0:
            dw1, db1 = _bwd_store(DX, rows64, row_ok, xhat1, wdy1, dy1, c1, c2, rstd, dw1, db1, N0, N1, N)
        if N2 > 0:
            dw2, db2 = _bwd_store(DX, rows64, row_ok, xhat2, wdy2, dy2, c1, c2, rstd, dw2, db2, N0 + N1, N2, N)

    _bwd_partials(DW_PARTIAL, DB_PARTIAL, pid, dw0, db0, 0, N0, N)
    if N1 > 0:
        _bwd_partials(DW_PARTIAL, DB_PARTIAL, pid, dw1, db1, N0, N1, N)
    if N2 > 0:
        _bwd_partials(DW_PARTIAL, DB_PARTIAL, pid, dw2, db2, N0 + N1, N2, N)


# ----------------------------------------------------------------------------------------------------------- host


def _width_parts(n: int) -> tuple[int, int, int]:
    """A row width as up to three power-of-two column parts (N0, N1, N2), largest first, 0 for an absent part: its
    two leading binary digits, then the rest rounded up to a power of two (padding only there, and only for widths
    with more than three binary digits). 768 -> (512, 256, 0), 1024 -> (1024, 0, 0), 1280 -> (1024, 256, 0),
    384 -> (256, 128, 0), 1000 -> (512, 256, 256)."""
    parts = []
    rest = n
    while rest and len(parts) < 2:
        parts.append(1 << (rest.bit_length() - 1))
        rest -= parts[-1]
    if rest:
        parts.append(next_pow2(rest))
    return (*parts, 0, 0)[:3]


def _block_shape(n: int, tile_elems: int) -> tuple[tuple[int, int, int], int, int]:
    """(column parts, ROWS, num_warps): whole rows per block, several rows when narrow so each program has about
    tile_elems elements in flight, about 8-16 elements per thread per tensor, and no more threads than the smallest
    part has elements (no replicated lanes; only widths so narrow that one warp is too many break this)."""
    parts = _width_parts(n)
    width = sum(parts)
    rows = _pow2_floor(max(1, min(16, tile_elems // width)))
    smallest = min(p for p in parts if p) * rows
    num_warps = max(1, min(16, next_pow2(max(4, cdiv(rows * width, 512))), smallest // 32))
    return parts, rows, num_warps


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


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
    (n0, n1, n2), rows, num_warps = _block_shape(n, 4096)
    grid = (cdiv(m, rows),)
    _layer_norm_fwd_kernel[grid](
        x2, y, weight, bias, mean, rstd, x2.stride(0), m, n, eps,
        N0=n0, N1=n1, N2=n2, ROWS=rows, num_warps=num_warps,
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
    (n0, n1, n2), rows, num_warps = _block_shape(n, 2048)
    # A few programs per SM, each looping over a contiguous run of rows: enough parallelism to saturate memory
    # while keeping the (G, N) partial buffers (and the second reduction) small next to x itself.
    programs = min(cdiv(m, rows), 4 * sm_count(x.device))
    rows_per_prog = cdiv(cdiv(m, programs), rows) * rows
    programs = cdiv(m, rows_per_prog)
    partial = new_output((2, programs, n), torch.float32, x.device)  # [0]: dweight, [1]: dbias
    _layer_norm_bwd_kernel[(programs,)](
        dy2, x2, weight, mean, rstd, dx, partial[0], partial[1],
        dy2.stride(0), x2.stride(0), m, n, rows_per_prog,
        N0=n0, N1=n1, N2=n2, ROWS=rows, num_warps=num_warps,
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
