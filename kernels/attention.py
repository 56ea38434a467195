"""Fused multi-head attention, softmax(q k^T * scale) v, forward and backward in Triton.

FlashAttention-2 scheme: the forward streams key/value blocks past a resident query block with an
online softmax in fp32 and saves the log-sum-exp per query row; the backward recomputes the
probabilities from that log-sum-exp, so no N x N matrix ever reaches memory. Three backward
launches: delta = rowsum(dO * O), then dK/dV (one program per key block, looping over query
blocks) and dQ (one program per query block, looping over key blocks); no atomics, so the
gradients are deterministic.

q, k, v may be any strided views (typically slices of one fused qkv projection); every stride is
passed to the kernels instead of copying. Sequence lengths need not be block multiples (ViT's 50,
197, 257, 577): the last key block is masked with -inf, the last query block's rows are masked on
load and store. head_dim <= 128 is not padded to a power of two: it is split into up to three
power-of-two column parts (_head_dim_parts: 80 = 64 + 16, 96 = 64 + 32, 112 = 64 + 32 + 16), and each
dot over the head dimension is a sum of one tl.dot per part, so the tensor cores do no work on padding
(only a head_dim that is not a multiple of 16 pads, to the next multiple, with masks).

Layout of the file: kernels, block-size choice, host functions that launch, the torch.library
custom ops `vitcore::attention_fwd` / `vitcore::attention_bwd` with fake impls (what torch.compile
sees), an autograd.Function that calls the ops under torch.compile and the host functions directly
in eager mode, and the public `attention`, which validates.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._common import (
    KernelOp,
    autotune,
    cdiv,
    check_float,
    check_launchable,
    interpreting,
    new_output,
    next_pow2,
    skipped_grad,
)

__all__ = ["attention"]

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the cheap hardware instruction
_MAX_HEAD_DIM = 128


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _program_head_block(N, BLOCK: tl.constexpr, H):
    """This program's (pid_bh, block index, b, h). One flat grid axis (no 65535 limit on B*H); the blocks of
    a head are adjacent so they share that head's other operands in L2. b and h are int64: batch offsets
    of large fused qkv tensors pass 2**31."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(N, BLOCK)
    pid_bh = pid // num_blocks
    return pid_bh, pid % num_blocks, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def _head(BASE, b, h, stride_b, stride_h):
    """Pointer to head (b, h) of a (B, H, N, HEAD_DIM) strided tensor."""
    return BASE + b * stride_b + h * stride_h


# A head's rows are handled as up to three column parts of power-of-two widths D0 >= D1 >= D2 (D1, D2 = 0 when
# absent; see _head_dim_parts): a (rows, HEAD_DIM) tile is the tuple (t0, t1, t2), and an absent part's slot holds
# t0 again, a placeholder that is never read (constexpr branches skip it, so it costs nothing).


@triton.jit
def _part_offsets(rows, row_ok, stride_r, stride_d, COL0: tl.constexpr, WIDTH: tl.constexpr,
                  HEAD_DIM: tl.constexpr):
    """(len(rows), WIDTH) element offsets of columns COL0 .. COL0 + WIDTH of rows `rows`, and their mask: row_ok
    ((rows, 1): loads and stores broadcast it), and the columns past HEAD_DIM only in a last part that overhangs it
    (a head_dim that is not a multiple of 16); elsewhere the columns need no mask at all."""
    cols = COL0 + tl.arange(0, WIDTH)
    mask = row_ok[:, None]
    if COL0 + WIDTH > HEAD_DIM:
        mask = mask & (cols < HEAD_DIM)[None, :]
    return rows[:, None] * stride_r + cols[None, :] * stride_d, mask


@triton.jit
def _load_parts(HEAD, rows, row_ok, stride_r, stride_d, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                D1: tl.constexpr, D2: tl.constexpr):
    """The head-dim parts (t0, t1, t2) of rows `rows` of one head, in its dtype; masked elements read 0."""
    offs, mask = _part_offsets(rows, row_ok, stride_r, stride_d, 0, D0, HEAD_DIM)
    t0 = tl.load(HEAD + offs, mask=mask, other=0.0)
    t1 = t0
    t2 = t0
    if D1 > 0:
        offs, mask = _part_offsets(rows, row_ok, stride_r, stride_d, D0, D1, HEAD_DIM)
        t1 = tl.load(HEAD + offs, mask=mask, other=0.0)
    if D2 > 0:
        offs, mask = _part_offsets(rows, row_ok, stride_r, stride_d, D0 + D1, D2, HEAD_DIM)
        t2 = tl.load(HEAD + offs, mask=mask, other=0.0)
    return t0, t1, t2


@triton.jit
def _store_parts(HEAD, rows, row_ok, stride_r, stride_d, t0, t1, t2, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                 D1: tl.constexpr, D2: tl.constexpr):
    """Store the parts of rows `rows` of one head, cast to its dtype."""
    offs, mask = _part_offsets(rows, row_ok, stride_r, stride_d, 0, D0, HEAD_DIM)
    tl.store(HEAD + offs, t0.to(HEAD.dtype.element_ty), mask=mask)
    if D1 > 0:
        offs, mask = _part_offsets(rows, row_ok, stride_r, stride_d, D0, D1, HEAD_DIM)
        tl.store(HEAD + offs, t1.to(HEAD.dtype.element_ty), mask=mask)
    if D2 > 0:
        offs, mask = _part_offsets(rows, row_ok, stride_r, stride_d, D0 + D1, D2, HEAD_DIM)
        tl.store(HEAD + offs, t2.to(HEAD.dtype.element_ty), mask=mask)


@triton.jit
def _zero_parts(ROWS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """fp32 accumulators (ROWS, D0), (ROWS, D1), (ROWS, D2)."""
    z0 = tl.zeros([ROWS, D0], dtype=tl.float32)
    z1 = z0
    z2 = z0
    if D1 > 0:
        z1 = tl.zeros([ROWS, D1], dtype=tl.float32)
    if D2 > 0:
        z2 = tl.zeros([ROWS, D2], dtype=tl.float32)
    return z0, z1, z2


@triton.jit
def _scale_parts(t0, t1, t2, s, D1: tl.constexpr, D2: tl.constexpr):
    """Each part times s (a scalar, or a (rows, 1) column)."""
    t0 = t0 * s
    if D1 > 0:
        t1 = t1 * s
    if D2 > 0:
        t2 = t2 * s
    return t0, t1, t2


@triton.jit
def _dot_nt(a0, a1, a2, b0, b1, b2, D1: tl.constexpr, D2: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b^T in fp32 for a (rows_a, head_dim) and b (rows_b, head_dim): the sum of one dot per part."""
    acc = tl.dot(a0, tl.trans(b0), input_precision=DOT_PRECISION)
    if D1 > 0:
        acc = tl.dot(a1, tl.trans(b1), acc, input_precision=DOT_PRECISION)
    if D2 > 0:
        acc = tl.dot(a2, tl.trans(b2), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _dot_parts(p, b0, b1, b2, acc0, acc1, acc2, D1: tl.constexpr, D2: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + p @ b, part by part, for p (rows, K) and b (K, head_dim)."""
    acc0 = tl.dot(p, b0, acc0, input_precision=DOT_PRECISION)
    if D1 > 0:
        acc1 = tl.dot(p, b1, acc1, input_precision=DOT_PRECISION)
    if D2 > 0:
        acc2 = tl.dot(p, b2, acc2, input_precision=DOT_PRECISION)
    return acc0, acc1, acc2


@triton.jit
def _fwd_inner(
    acc0, acc1, acc2,  # (BLOCK_M, D0 | D1 | D2) fp32 running numerator, by head-dim part
    l_i,  # (BLOCK_M,) fp32 running denominator
    m_i,  # (BLOCK_M,) fp32 running row max, log2 units
    q0, q1, q2,  # (BLOCK_M, D0 | D1 | D2) query block, input dtype
    K_HEAD,  # this head of K
    V_HEAD,  # this head of V
    stride_kn, stride_kd,
    stride_vn, stride_vd,
    start,  # first key row of this loop
    end,  # one past the last key row of this loop
    N_KV,
    offs_n,  # (BLOCK_N,) arange
    qk_scale,  # scale * log2(e)
    HEAD_DIM: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KV: tl.constexpr,  # only the last, partial key block pays for the -inf masking
    DOT_PRECISION: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        kv_rows = start_n + offs_n
        kv_ok = kv_rows < N_KV
        k0, k1, k2 = _load_parts(K_HEAD, kv_rows, kv_ok, stride_kn, stride_kd, HEAD_DIM, D0, D1, D2)
        qk = _dot_nt(q0, q1, q2, k0, k1, k2, D1, D2, DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASK_KV:
            # Every block this loop visits holds at least one real key, so the row max stays
            # finite and exp2(-inf - m) is a clean 0 (never -inf - -inf = NaN).
            qk = tl.where(kv_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # 0 on the first block, where m_i = -inf
        l_i = l_i * alpha + tl.sum(p, 1)
        v0, v1, v2 = _load_parts(V_HEAD, kv_rows, kv_ok, stride_vn, stride_vd, HEAD_DIM, D0, D1, D2)
        acc0, acc1, acc2 = _scale_parts(acc0, acc1, acc2, alpha[:, None], D1, D2)
        acc0, acc1, acc2 = _dot_parts(p.to(v0.dtype), v0, v1, v2, acc0, acc1, acc2, D1, D2, DOT_PRECISION)
        m_i = m_new
    return acc0, acc1, acc2, l_i, m_i


@triton.jit(do_not_specialize=["N_Q", "N_KV", "LEN_BUCKET"])
def _attn_fwd_kernel(
    Q,  # (B, H, N_Q, HEAD_DIM) any strides
    K,  # (B, H, N_KV, HEAD_DIM) any strides
    V,  # (B, H, N_KV, HEAD_DIM) any strides
    OUT,  # (B, H, N_Q, HEAD_DIM) output, input dtype
    LSE,  # (B, H, N_Q) fp32 output, contiguous: natural-log log-sum-exp of each score row
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_Q, N_KV,
    HEAD_DIM: tl.constexpr,
    qk_scale,  # scale * log2(e), folded so the softmax runs on exp2
    LEN_BUCKET,  # unused in the body: the autotuner's cache key (power-of-two length class)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D0: tl.constexpr,  # head-dim parts: powers of two >= 16, D0 >= D1 >= D2, 0 when absent (_head_dim_parts)
    D1: tl.constexpr,
    D2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (exact fp32 products), else "tf32" (unused)
):
    pid_bh, pid_m, b, h = _program_head_block(N_Q, BLOCK_M, H)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < N_Q

    q_head = _head(Q, b, h, stride_qb, stride_qh)
    q0, q1, q2 = _load_parts(q_head, offs_m, m_ok, stride_qm, stride_qd, HEAD_DIM, D0, D1, D2)  # padded rows: 0
    k_head = _head(K, b, h, stride_kb, stride_kh)
    v_head = _head(V, b, h, stride_vb, stride_vh)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0, acc1, acc2 = _zero_parts(BLOCK_M, D0, D1, D2)

    n_full = (N_KV // BLOCK_N) * BLOCK_N
    acc0, acc1, acc2, l_i, m_i = _fwd_inner(
        acc0, acc1, acc2, l_i, m_i, q0, q1, q2, k_head, v_head, stride_kn, stride_kd, stride_vn, stride_vd,
        0, n_full, N_KV, offs_n, qk_scale, HEAD_DIM, D0, D1, D2, BLOCK_N, False, DOT_PRECISION)
    acc0, acc1, acc2, l_i, m_i = _fwd_inner(
        acc0, acc1, acc2, l_i, m_i, q0, q1, q2, k_head, v_head, stride_kn, stride_kd, stride_vn, stride_vd,
        n_full, N_KV, N_KV, offs_n, qk_scale, HEAD_DIM, D0, D1, D2, BLOCK_N, True, DOT_PRECISION)

    acc0, acc1, acc2 = _scale_parts(acc0, acc1, acc2, 1.0 / l_i[:, None], D1, D2)
    _store_parts(_head(OUT, b, h, stride_ob, stride_oh), offs_m, m_ok, stride_om, stride_od, acc0, acc1, acc2,
                 HEAD_DIM, D0, D1, D2)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log for the saved tensor
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=m_ok)


@triton.jit(do_not_specialize=["N_Q"])
def _attn_bwd_delta_kernel(
    OUT,  # (B, H, N_Q, HEAD_DIM) forward output
    DO,  # (B, H, N_Q, HEAD_DIM) upstream gradient, any strides
    DELTA,  # (B, H, N_Q) fp32 output, contiguous: rowsum(dO * O)
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, N_Q,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    D0: tl.constexpr,  # head-dim parts, as in the forward
    D1: tl.constexpr,
    D2: tl.constexpr,
):
    pid_bh, pid_m, b, h = _program_head_block(N_Q, BLOCK_M, H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N_Q
    o0, o1, o2 = _load_parts(_head(OUT, b, h, stride_ob, stride_oh), offs_m, m_ok, stride_om, stride_od,
                             HEAD_DIM, D0, D1, D2)
    do0, do1, do2 = _load_parts(_head(DO, b, h, stride_dob, stride_doh), offs_m, m_ok, stride_dom, stride_dod,
                                HEAD_DIM, D0, D1, D2)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
    if D1 > 0:
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
    if D2 > 0:
        delta += tl.sum(o2.to(tl.float32) * do2.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_Q + offs_m, delta, mask=m_ok)


@triton.jit
def _bwd_dkdv_inner(
    dk0, dk1, dk2,  # (BLOCK_N, D0 | D1 | D2) fp32 accumulators, by head-dim part
    dv0, dv1, dv2,  # (BLOCK_N, D0 | D1 | D2) fp32 accumulators
    k0, k1, k2,  # (BLOCK_N, D0 | D1 | D2) resident key block
    v0, v1, v2,  # (BLOCK_N, D0 | D1 | D2) resident value block
    Q_HEAD,  # this head of Q
    DO_HEAD,  # this head of dO
    lse_ptrs,  # (BLOCK_M,) pointers into LSE
    delta_ptrs,  # (BLOCK_M,) pointers into DELTA
    stride_qm, stride_qd,
    stride_dom, stride_dod,
    start,
    end,
    N_Q,
    offs_m,  # (BLOCK_M,) arange
    qk_scale,  # scale * log2(e)
    HEAD_DIM: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASK_Q: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        r_ok = rows < N_Q
        q0, q1, q2 = _load_parts(Q_HEAD, rows, r_ok, stride_qm, stride_qd, HEAD_DIM, D0, D1, D2)
        lse = tl.load(lse_ptrs + start_m, mask=r_ok, other=0.0) * 1.4426950408889634  # log2 units
        # Scores transposed, (BLOCK_N, BLOCK_M): keeps k resident as the left operand and lets the
        # probabilities feed dV = P^T dO without a register transpose.
        qk_t = _dot_nt(k0, k1, k2, q0, q1, q2, D1, D2, DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(qk_t - lse[None, :])
        if MASK_Q:
            p_t = tl.where(r_ok[None, :], p_t, 0.0)
        do0, do1, do2 = _load_parts(DO_HEAD, rows, r_ok, stride_dom, stride_dod, HEAD_DIM, D0, D1, D2)
        dv0, dv1, dv2 = _dot_parts(p_t.to(do0.dtype), do0, do1, do2, dv0, dv1, dv2, D1, D2, DOT_PRECISION)
        delta = tl.load(delta_ptrs + start_m, mask=r_ok, other=0.0)
        dp_t = _dot_nt(v0, v1, v2, do0, do1, do2, D1, D2, DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk0, dk1, dk2 = _dot_parts(ds_t.to(q0.dtype), q0, q1, q2, dk0, dk1, dk2, D1, D2, DOT_PRECISION)
    return dk0, dk1, dk2, dv0, dv1, dv2


@triton.jit(do_not_specialize=["N_Q", "N_KV", "LEN_BUCKET"])
def _attn_bwd_dkdv_kernel(
    Q,  # (B, H, N_Q, HEAD_DIM) any strides
    K,  # (B, H, N_KV, HEAD_DIM) any strides
    V,  # (B, H, N_KV, HEAD_DIM) any strides
    DO,  # (B, H, N_Q, HEAD_DIM) any strides
    LSE,  # (B, H, N_Q) fp32 contiguous, natural log
    DELTA,  # (B, H, N_Q) fp32 contiguous
    DK,  # (B, H, N_KV, HEAD_DIM) output
    DV,  # (B, H, N_KV, HEAD_DIM) output
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N_Q, N_KV,
    HEAD_DIM: tl.constexpr,
    scale,  # softmax scale (natural units), applied once to dK at the end
    qk_scale,  # scale * log2(e)
    LEN_BUCKET,  # unused in the body: the autotuner's cache key
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # key rows owned by this program
    D0: tl.constexpr,  # head-dim parts, as in the forward
    D1: tl.constexpr,
    D2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh, pid_n, b, h = _program_head_block(N_KV, BLOCK_N, H)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < N_KV

    # Padded key rows load as 0 and score exp2(-lse), which may even overflow the 16-bit cast: each
    # only feeds its own dK/dV row, and those rows are never stored.
    k0, k1, k2 = _load_parts(_head(K, b, h, stride_kb, stride_kh), offs_n, n_ok, stride_kn, stride_kd,
                             HEAD_DIM, D0, D1, D2)
    v0, v1, v2 = _load_parts(_head(V, b, h, stride_vb, stride_vh), offs_n, n_ok, stride_vn, stride_vd,
                             HEAD_DIM, D0, D1, D2)
    q_head = _head(Q, b, h, stride_qb, stride_qh)
    do_head = _head(DO, b, h, stride_dob, stride_doh)
    lse_ptrs = LSE + pid_bh.to(tl.int64) * N_Q + offs_m
    delta_ptrs = DELTA + pid_bh.to(tl.int64) * N_Q + offs_m

    dk0, dk1, dk2 = _zero_parts(BLOCK_N, D0, D1, D2)
    dv0, dv1, dv2 = _zero_parts(BLOCK_N, D0, D1, D2)
    m_full = (N_Q // BLOCK_M) * BLOCK_M
    dk0, dk1, dk2, dv0, dv1, dv2 = _bwd_dkdv_inner(
        dk0, dk1, dk2, dv0, dv1, dv2, k0, k1, k2, v0, v1, v2, q_head, do_head, lse_ptrs, delta_ptrs,
        stride_qm, stride_qd, stride_dom, stride_dod, 0, m_full, N_Q, offs_m, qk_scale,
        HEAD_DIM, D0, D1, D2, BLOCK_M, False, DOT_PRECISION)
    dk0, dk1, dk2, dv0, dv1, dv2 = _bwd_dkdv_inner(
        dk0, dk1, dk2, dv0, dv1, dv2, k0, k1, k2, v0, v1, v2, q_head, do_head, lse_ptrs, delta_ptrs,
        stride_qm, stride_qd, stride_dom, stride_dod, m_full, N_Q, N_Q, offs_m, qk_scale,
        HEAD_DIM, D0, D1, D2, BLOCK_M, True, DOT_PRECISION)
    # dS = P * (dP - delta) is w.r.t. the scaled scores; the chain rule adds `scale`
    dk0, dk1, dk2 = _scale_parts(dk0, dk1, dk2, scale, D1, D2)

    _store_parts(_head(DK, b, h, stride_dkb, stride_dkh), offs_n, n_ok, stride_dkn, stride_dkd, dk0, dk1, dk2,
                 HEAD_DIM, D0, D1, D2)
    _store_parts(_head(DV, b, h, stride_dvb, stride_dvh), offs_n, n_ok, stride_dvn, stride_dvd, dv0, dv1, dv2,
                 HEAD_DIM, D0, D1, D2)


@triton.jit
def _bwd_dq_inner(
    dq0, dq1, dq2,  # (BLOCK_M, D0 | D1 | D2) fp32 accumulator, by head-dim part
    q0, q1, q2,  # (BLOCK_M, D0 | D1 | D2) resident query block
    do0, do1, do2,  # (BLOCK_M, D0 | D1 | D2) resident upstream-gradient block
    lse,  # (BLOCK_M,) fp32, log2 units
    delta,  # (BLOCK_M,) fp32
    K_HEAD,  # this head of K
    V_HEAD,  # this head of V
    stride_kn, stride_kd,
    stride_vn, stride_vd,
    start,
    end,
    N_KV,
    offs_n,  # (BLOCK_N,) arange
    qk_scale,
    HEAD_DIM: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = cols < N_KV
        k0, k1, k2 = _load_parts(K_HEAD, cols, kv_ok, stride_kn, stride_kd, HEAD_DIM, D0, D1, D2)
        v0, v1, v2 = _load_parts(V_HEAD, cols, kv_ok, stride_vn, stride_vd, HEAD_DIM, D0, D1, D2)
        qk = _dot_nt(q0, q1, q2, k0, k1, k2, D1, D2, DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk - lse[:, None])
        if MASK_KV:
            # A padded key loads as 0 and would score exp2(-lse) > 0: zero it explicitly.
            p = tl.where(kv_ok[None, :], p, 0.0)
        dp = _dot_nt(do0, do1, do2, v0, v1, v2, D1, D2, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq0, dq1, dq2 = _dot_parts(ds.to(k0.dtype), k0, k1, k2, dq0, dq1, dq2, D1, D2, DOT_PRECISION)
    return dq0, dq1, dq2


@triton.jit(do_not_specialize=["N_Q", "N_KV", "LEN_BUCKET"])
def _attn_bwd_dq_kernel(
    Q,  # (B, H, N_Q, HEAD_DIM) any strides
    K,  # (B, H, N_KV, HEAD_DIM) any strides
    V,  # (B, H, N_KV, HEAD_DIM) any strides
    DO,  # (B, H, N_Q, HEAD_DIM) any strides
    LSE,  # (B, H, N_Q) fp32 contiguous, natural log
    DELTA,  # (B, H, N_Q) fp32 contiguous
    DQ,  # (B, H, N_Q, HEAD_DIM) output
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, N_Q, N_KV,
    HEAD_DIM: tl.constexpr,
    scale,  # softmax scale (natural units), applied once to dQ at the end
    qk_scale,  # scale * log2(e)
    LEN_BUCKET,  # unused in the body: the autotuner's cache key
    BLOCK_M: tl.constexpr,  # query rows owned by this program
    BLOCK_N: tl.constexpr,  # key rows per inner step
    D0: tl.constexpr,  # head-dim parts, as in the forward
    D1: tl.constexpr,
    D2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh, pid_m, b, h = _program_head_block(N_Q, BLOCK_M, H)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < N_Q

    q0, q1, q2 = _load_parts(_head(Q, b, h, stride_qb, stride_qh), offs_m, m_ok, stride_qm, stride_qd,
                             HEAD_DIM, D0, D1, D2)
    do0, do1, do2 = _load_parts(_head(DO, b, h, stride_dob, stride_doh), offs_m, m_ok, stride_dom, stride_dod,
                                HEAD_DIM, D0, D1, D2)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N_Q + offs_m, mask=m_ok, other=0.0)
    k_head = _head(K, b, h, stride_kb, stride_kh)
    v_head = _head(V, b, h, stride_vb, stride_vh)

    dq0, dq1, dq2 = _zero_parts(BLOCK_M, D0, D1, D2)
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    dq0, dq1, dq2 = _bwd_dq_inner(
        dq0, dq1, dq2, q0, q1, q2, do0, do1, do2, lse, delta, k_head, v_head, stride_kn, stride_kd,
        stride_vn, stride_vd, 0, n_full, N_KV, offs_n, qk_scale, HEAD_DIM, D0, D1, D2, BLOCK_N, False,
        DOT_PRECISION)
    dq0, dq1, dq2 = _bwd_dq_inner(
        dq0, dq1, dq2, q0, q1, q2, do0, do1, do2, lse, delta, k_head, v_head, stride_kn, stride_kd,
        stride_vn, stride_vd, n_full, N_KV, N_KV, offs_n, qk_scale, HEAD_DIM, D0, D1, D2, BLOCK_N, True,
        DOT_PRECISION)
    dq0, dq1, dq2 = _scale_parts(dq0, dq1, dq2, scale, D1, D2)
    _store_parts(_head(DQ, b, h, stride_dqb, stride_dqh), offs_m, m_ok, stride_dqm, stride_dqd, dq0, dq1, dq2,
                 HEAD_DIM, D0, D1, D2)


# ----------------------------------------------------------------------------------------------
# Block sizes
# ----------------------------------------------------------------------------------------------

# On the GPU: one heuristic config per (kernel, fp32 or 16-bit, head-dim width <= 64), chosen for H100 at ViT
# lengths (N 50..730); the 16-bit D <= 64 ones are what the autotuner picked at (256, 12, 197, 64) bf16
# on an H100 (fwd 128x32, dK/dV 32x128, dQ 64x32, 4 warps, 3 stages), except that dK/dV runs its 32x128
# tile on 8 warps: at 4 it sits at the 255-register cap and spills under Triton 3.6 (48 B), at 8 each warp
# group owns 64 key rows and needs 127-183 registers. The wider ones are what it picked at (128, 16, 257, 80)
# with head_dim 80 then padded to 128 (fwd 64x64, dK/dV 32x64, dQ 64x32). Set VITCORE_ATTN_AUTOTUNE=1 to
# let triton.autotune pick among a few more (keyed on a power-of-two length bucket, so a new N of the
# same size class does not re-tune); none of them spills at ViT-B/L/H shapes under Triton 3.6 or 3.9
# (benchmarks/kernel_resources.py; 32x128 on 4 warps left the dK/dV list for its spills).
# fp32 (exact "ieee" dots, no tensor cores) keeps 32x32 blocks:
# larger ones compile for 20 s and more (unrolled FMA code) for little gain.
# Under the interpreter (CPU) one small fixed config: its cost is per op, not per FLOP.
_GPU_HEURISTIC = {
    # (kernel, is_fp32, sum of the head-dim parts <= 64): (BLOCK_M, BLOCK_N, num_warps, num_stages)
    ("fwd", False, True): (128, 32, 4, 3),
    ("fwd", False, False): (64, 64, 4, 3),
    ("fwd", True, True): (32, 32, 4, 2),
    ("fwd", True, False): (32, 32, 4, 2),
    ("dkdv", False, True): (32, 128, 8, 3),
    ("dkdv", False, False): (32, 64, 4, 3),
    ("dkdv", True, True): (32, 32, 4, 2),
    ("dkdv", True, False): (32, 32, 4, 2),
    ("dq", False, True): (64, 32, 4, 3),
    ("dq", False, False): (64, 32, 4, 3),
    ("dq", True, True): (32, 32, 4, 2),
    ("dq", True, False): (32, 32, 4, 2),
}
_AUTOTUNE_CHOICES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4), (128, 128, 8, 3)],
    "dkdv": [(32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3)],
    "dq": [(128, 32, 4, 3), (128, 32, 4, 5), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
}
_INTERPRETER_CONFIG = {"fwd": (32, 64, 1, 1), "dkdv": (32, 64, 1, 1), "dq": (64, 32, 1, 1)}
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
_AUTOTUNED: dict[str, object] = {}  # wrapped on first use, not at import


def _use_autotune() -> bool:
    return os.environ.get("VITCORE_ATTN_AUTOTUNE", "0") == "1" and not interpreting()


def _config(kind: str, dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one of the three main kernels."""
    if interpreting():
        return _INTERPRETER_CONFIG[kind]
    return _GPU_HEURISTIC[(kind, dtype == torch.float32, sum(_head_dim_parts(head_dim)) <= 64)]


def _autotuned(kind: str):
    if kind not in _AUTOTUNED:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in _AUTOTUNE_CHOICES[kind]
        ]
        # Every config rewrites all of its outputs (nothing accumulates across launches), so the
        # autotuner's repeated launches are harmless. The autotuner adds the tensors' dtypes to the key.
        _AUTOTUNED[kind] = autotune(configs=configs, key=["LEN_BUCKET", "HEAD_DIM", "DOT_PRECISION"])(
            _KERNELS[kind]
        )
    return _AUTOTUNED[kind]


def _launch(kind: str, rows: int, bh: int, dtype: torch.dtype, head_dim: int, len_bucket: int, args: tuple,
            config: tuple[int, int, int, int] | None) -> None:
    """Launch kernel `kind` over `rows` rows of each of `bh` heads (rows = N_Q for fwd/dq, N_KV for dkdv),
    with an explicit config, the heuristic one, or the autotuner's choice."""
    precision = "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands
    tile = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"  # the block each program owns
    parts = _parts_kwargs(head_dim)

    def grid(meta):
        return (cdiv(rows, meta[tile]) * bh,)

    if config is None and _use_autotune():
        _autotuned(kind)[grid](*args, len_bucket, **parts, DOT_PRECISION=precision)
        return
    bm, bn, warps, stages = config if config is not None else _config(kind, dtype, head_dim)
    _KERNELS[kind][grid](*args, len_bucket, BLOCK_M=bm, BLOCK_N=bn, **parts, DOT_PRECISION=precision,
                         num_warps=warps, num_stages=stages)


def _head_dim_parts(head_dim: int) -> tuple[int, int, int]:
    """head_dim as up to three power-of-two column parts (D0, D1, D2), largest first, 0 for an absent part: the
    binary digits of head_dim rounded up to a multiple of 16 (the smallest tl.dot operand). Every dot over the head
    dimension becomes a sum of one dot per part, so no tensor-core work goes to padding columns: 64 -> (64, 0, 0),
    80 -> (64, 16, 0), 96 -> (64, 32, 0), 112 -> (64, 32, 16), 128 -> (128, 0, 0); 40 -> (32, 16, 0),
    8 -> (16, 0, 0)."""
    width = max(16, cdiv(head_dim, 16) * 16)
    parts = [1 << bit for bit in range(7, 3, -1) if width & (1 << bit)]  # width <= 128: at most 3 parts
    return (*parts, 0, 0)[:3]


def _parts_kwargs(head_dim: int) -> dict[str, int]:
    """The kernels' D0, D1, D2 constexprs for a head_dim."""
    return dict(zip(("D0", "D1", "D2"), _head_dim_parts(head_dim)))


def _pow2_at_least_16(n: int) -> int:
    """The autotuner's length bucket: the next power of two, at least 16."""
    return max(16, next_pow2(n))


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # Any stride works in the kernels, but a unit stride along head_dim is what makes the loads
    # vectorise: a rare transposed input is cheaper copied once than read element by element.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       config: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, H, N_Q, D) contiguous in q's dtype, lse (B, H, N_Q) fp32. Inputs already validated, 4-D."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    B, H, n_q, d = q.shape
    n_kv = k.shape[2]
    o = new_output((B, H, n_q, d), q.dtype, q.device)
    lse = new_output((B, H, n_q), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse
    args = (q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, n_q, n_kv, d, scale * _LOG2E)
    _launch("fwd", n_q, B * H, q.dtype, d, _pow2_at_least_16(max(n_q, n_kv)), args, config)
    return o, lse


def _attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor, scale: float, needs_grad: list[bool] = (True, True, True),
                        configs: dict[str, tuple[int, int, int, int]] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, each contiguous in q's dtype. `needs_grad` says which to compute (see KernelOp): the dq kernel
    runs only for dq, the dK/dV kernel only for dk or dv. `configs` optionally maps "dkdv"/"dq" to block sizes."""
    need_dq, need_dk, need_dv = needs_grad
    configs = configs or {}
    do = _unit_last_stride(do.to(q.dtype))
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    B, H, n_q, d = q.shape
    n_kv = k.shape[2]
    # dk and dv come from one kernel: both are allocated when either is wanted.
    dq = new_output(q.shape if need_dq else (0,), q.dtype, q.device)
    dk = new_output(k.shape if need_dk or need_dv else (0,), k.dtype, k.device)
    dv = new_output(v.shape if need_dk or need_dv else (0,), v.dtype, v.device)
    if B * H == 0 or d == 0:
        return _needed((dq, dk, dv), needs_grad)
    if n_q == 0:  # no query reads any key: the key/value gradients are exactly zero
        return _needed((dq, dk.zero_(), dv.zero_()), needs_grad)
    bucket = _pow2_at_least_16(max(n_q, n_kv))
    delta = new_output((B, H, n_q), torch.float32, q.device)
    delta_block = 32 if interpreting() else 64
    _attn_bwd_delta_kernel[(cdiv(n_q, delta_block) * B * H,)](
        o, do, delta, *o.stride(), *do.stride(), H, n_q, d, BLOCK_M=delta_block, **_parts_kwargs(d),
    )
    common = (H, n_q, n_kv, d, scale, scale * _LOG2E)
    if need_dk or need_dv:
        dkdv_args = (q, k, v, do, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                     *dk.stride(), *dv.stride(), *common)
        _launch("dkdv", n_kv, B * H, q.dtype, d, bucket, dkdv_args, configs.get("dkdv"))
    if need_dq:
        dq_args = (q, k, v, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                   *common)
        _launch("dq", n_q, B * H, q.dtype, d, bucket, dq_args, configs.get("dq"))
    return _needed((dq, dk, dv), needs_grad)


def _needed(grads: tuple[torch.Tensor, ...], needs_grad: list[bool]) -> tuple[torch.Tensor, ...]:
    """Each gradient, or the empty placeholder where it was not asked for."""
    return tuple(g if need else skipped_grad(g) for g, need in zip(grads, needs_grad))


# ----------------------------------------------------------------------------------------------
# The differentiable custom op (vitcore::attention_fwd / attention_bwd, see _common.KernelOp)
# ----------------------------------------------------------------------------------------------


def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's forward: (o, lse) at the heuristic (or autotuned) blocks."""
    return _attention_forward(q, k, v, scale)


def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, scale: float, needs_grad: list[bool]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's backward: (dq, dk, dv), the ones needs_grad leaves out empty."""
    return _attention_backward(do, q, k, v, o, lse, scale, needs_grad)


def _attention_fwd_fake(q, k, v, scale):
    B, H, n_q, d = q.shape
    return q.new_empty((B, H, n_q, d)), q.new_empty((B, H, n_q), dtype=torch.float32)


def _attention_bwd_fake(do, q, k, v, o, lse, scale, needs_grad):
    return tuple(t.new_empty(t.shape) if need else skipped_grad(t) for t, need in zip((q, k, v), needs_grad))


_ATTENTION = KernelOp(
    "attention",
    forward=_attention_fwd, forward_fake=_attention_fwd_fake,
    backward=_attention_bwd, backward_fake=_attention_bwd_fake,
    save=lambda args, outs: ((*args[:3], *outs), (args[3],)),  # q, k, v, o, lse; scale
    num_grads=3,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"attention: {name} must have shape (..., N, head_dim), got {tuple(t.shape)}")
        check_float("attention", name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.dim() == k.dim() == v.dim()) or not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError("attention: q, k, v must have the same leading (batch, heads) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    d = q.shape[-1]
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim must be in 1..{_MAX_HEAD_DIM}, got {d}")
    if k.shape[-2] == 0 and q.shape[-2] > 0:
        raise ValueError("attention: no keys (k has N = 0): the softmax over an empty row is undefined")
    check_launchable("attention", q, k, v, dots=True)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    # (N, D) -> (1, 1, N, D); (X, N, D) -> (1, X, N, D); (A, ..., H, N, D) -> (A*..., H, N, D), a view
    # whenever the leading strides allow it (flatten copies only when they do not).
    if t.dim() < 4:
        return t[(None,) * (4 - t.dim())]
    return t.flatten(0, t.dim() - 4)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v over the last two dims, differentiable in q, k and v.

    q: (..., N_Q, D); k, v: (..., N_KV, D) with the same leading shape (typically (B, H, N, D));
    any strides (views of a fused qkv projection are read in place); float32, float16 or bfloat16;
    D <= 128. scale defaults to D ** -0.5. Returns (..., N_Q, D), contiguous, in the input dtype.
    """
    _check_inputs(q, k, v)
    lead, n_q, d = q.shape[:-2], q.shape[-2], q.shape[-1]
    if scale is None:
        scale = d ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite, got {scale}")
    o = _ATTENTION(_as_4d(q), _as_4d(k), _as_4d(v), scale)
    return o.reshape(*lead, n_q, d)
