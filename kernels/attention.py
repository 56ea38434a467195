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
load and store. head_dim <= 128 is padded to a power of two (>= 16, the smallest tl.dot operand)
with masks, e.g. 80 -> 128.

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
def _tile_ptrs(BASE, b, h, rows, offs_d, stride_b, stride_h, stride_r, stride_d):
    """(len(rows), BLOCK_D) pointers to rows `rows` of head (b, h) of a (B, H, N, HEAD_DIM) strided tensor."""
    return BASE + b * stride_b + h * stride_h + rows[:, None] * stride_r + offs_d[None, :] * stride_d


@triton.jit
def _fwd_inner(
    acc,  # (BLOCK_M, BLOCK_D) fp32 running numerator
    l_i,  # (BLOCK_M,) fp32 running denominator
    m_i,  # (BLOCK_M,) fp32 running row max, log2 units
    q,  # (BLOCK_M, BLOCK_D) query block, input dtype
    k_ptrs,  # (BLOCK_N, BLOCK_D) pointers to the first key block
    v_ptrs,  # (BLOCK_N, BLOCK_D) pointers to the first value block
    stride_kn,
    stride_vn,
    start,  # first key row of this loop
    end,  # one past the last key row of this loop
    N_KV,
    offs_n,  # (BLOCK_N,) arange
    d_mask,  # (BLOCK_D,) head_dim padding mask
    qk_scale,  # scale * log2(e)
    BLOCK_N: tl.constexpr,
    MASK_KV: tl.constexpr,  # only the last, partial key block pays for the -inf masking
    DOT_PRECISION: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        kv_rows = start_n + offs_n
        kv_mask = (kv_rows < N_KV)[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASK_KV:
            # Every block this loop visits holds at least one real key, so the row max stays
            # finite and exp2(-inf - m) is a clean 0 (never -inf - -inf = NaN).
            qk = tl.where((kv_rows < N_KV)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # 0 on the first block, where m_i = -inf
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


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
    H, N_Q, N_KV, HEAD_DIM,
    qk_scale,  # scale * log2(e), folded so the softmax runs on exp2
    LEN_BUCKET,  # unused in the body: the autotuner's cache key (power-of-two length class)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM, >= 16
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (exact fp32 products), else "tf32" (unused)
):
    pid_bh, pid_m, b, h = _program_head_block(N_Q, BLOCK_M, H)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N_Q
    d_mask = offs_d < HEAD_DIM

    q_ptrs = _tile_ptrs(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qm, stride_qd)
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # padded rows score 0, finite
    k_ptrs = _tile_ptrs(K, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd)
    v_ptrs = _tile_ptrs(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full = (N_KV // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, 0, n_full, N_KV,
                               offs_n, d_mask, qk_scale, BLOCK_N, False, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, n_full, N_KV, N_KV,
                               offs_n, d_mask, qk_scale, BLOCK_N, True, DOT_PRECISION)

    o = acc / l_i[:, None]
    o_ptrs = _tile_ptrs(OUT, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_om, stride_od)
    tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log for the saved tensor
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=m_mask)


@triton.jit(do_not_specialize=["N_Q"])
def _attn_bwd_delta_kernel(
    OUT,  # (B, H, N_Q, HEAD_DIM) forward output
    DO,  # (B, H, N_Q, HEAD_DIM) upstream gradient, any strides
    DELTA,  # (B, H, N_Q) fp32 output, contiguous: rowsum(dO * O)
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, N_Q, HEAD_DIM,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m, b, h = _program_head_block(N_Q, BLOCK_M, H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N_Q
    mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(_tile_ptrs(OUT, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_om, stride_od),
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(_tile_ptrs(DO, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_dom, stride_dod),
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=m_mask)


@triton.jit
def _bwd_dkdv_inner(
    dk,  # (BLOCK_N, BLOCK_D) fp32 accumulator
    dv,  # (BLOCK_N, BLOCK_D) fp32 accumulator
    k,  # (BLOCK_N, BLOCK_D) resident key block
    v,  # (BLOCK_N, BLOCK_D) resident value block
    q_ptrs,  # (BLOCK_M, BLOCK_D) pointers to the first query block
    do_ptrs,  # (BLOCK_M, BLOCK_D) pointers to the first upstream-gradient block
    lse_ptrs,  # (BLOCK_M,) pointers into LSE
    delta_ptrs,  # (BLOCK_M,) pointers into DELTA
    stride_qm,
    stride_dom,
    start,
    end,
    N_Q,
    offs_m,  # (BLOCK_M,) arange
    d_mask,  # (BLOCK_D,)
    qk_scale,  # scale * log2(e)
    BLOCK_M: tl.constexpr,
    MASK_Q: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        r_mask = rows < N_Q
        q = tl.load(q_ptrs + start_m * stride_qm, mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        lse = tl.load(lse_ptrs + start_m, mask=r_mask, other=0.0) * 1.4426950408889634  # log2 units
        # Scores transposed, (BLOCK_N, BLOCK_M): keeps k resident as the left operand and lets the
        # probabilities feed dV = P^T dO without a register transpose.
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(qk_t - lse[None, :])
        if MASK_Q:
            p_t = tl.where(r_mask[None, :], p_t, 0.0)
        do = tl.load(do_ptrs + start_m * stride_dom, mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(delta_ptrs + start_m, mask=r_mask, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


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
    H, N_Q, N_KV, HEAD_DIM,
    scale,  # softmax scale (natural units), applied once to dK at the end
    qk_scale,  # scale * log2(e)
    LEN_BUCKET,  # unused in the body: the autotuner's cache key
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # key rows owned by this program
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh, pid_n, b, h = _program_head_block(N_KV, BLOCK_N, H)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N_KV
    d_mask = offs_d < HEAD_DIM
    kv_mask = n_mask[:, None] & d_mask[None, :]

    # Padded key rows load as 0 and score exp2(-lse), which may even overflow the 16-bit cast: each
    # only feeds its own dK/dV row, and those rows are never stored.
    k = tl.load(_tile_ptrs(K, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd),
                mask=kv_mask, other=0.0)
    v = tl.load(_tile_ptrs(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd),
                mask=kv_mask, other=0.0)
    q_ptrs = _tile_ptrs(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qm, stride_qd)
    do_ptrs = _tile_ptrs(DO, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_dom, stride_dod)
    lse_ptrs = LSE + pid_bh.to(tl.int64) * N_Q + offs_m
    delta_ptrs = DELTA + pid_bh.to(tl.int64) * N_Q + offs_m

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_full = (N_Q // BLOCK_M) * BLOCK_M
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qm, stride_dom,
                             0, m_full, N_Q, offs_m, d_mask, qk_scale, BLOCK_M, False, DOT_PRECISION)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qm, stride_dom,
                             m_full, N_Q, N_Q, offs_m, d_mask, qk_scale, BLOCK_M, True, DOT_PRECISION)
    dk = dk * scale  # dS = P * (dP - delta) is w.r.t. the scaled scores; the chain rule adds `scale`

    tl.store(_tile_ptrs(DK, b, h, offs_n, offs_d, stride_dkb, stride_dkh, stride_dkn, stride_dkd),
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_tile_ptrs(DV, b, h, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvn, stride_dvd),
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq,  # (BLOCK_M, BLOCK_D) fp32 accumulator
    q,  # (BLOCK_M, BLOCK_D) resident query block
    do,  # (BLOCK_M, BLOCK_D) resident upstream-gradient block
    lse,  # (BLOCK_M,) fp32, log2 units
    delta,  # (BLOCK_M,) fp32
    k_ptrs,  # (BLOCK_N, BLOCK_D) pointers to the first key block
    v_ptrs,  # (BLOCK_N, BLOCK_D) pointers to the first value block
    stride_kn,
    stride_vn,
    start,
    end,
    N_KV,
    offs_n,  # (BLOCK_N,) arange
    d_mask,  # (BLOCK_D,)
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASK_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < N_KV)[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk - lse[:, None])
        if MASK_KV:
            # A padded key loads as 0 and would score exp2(-lse) > 0: zero it explicitly.
            p = tl.where((cols < N_KV)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


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
    H, N_Q, N_KV, HEAD_DIM,
    scale,  # softmax scale (natural units), applied once to dQ at the end
    qk_scale,  # scale * log2(e)
    LEN_BUCKET,  # unused in the body: the autotuner's cache key
    BLOCK_M: tl.constexpr,  # query rows owned by this program
    BLOCK_N: tl.constexpr,  # key rows per inner step
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh, pid_m, b, h = _program_head_block(N_Q, BLOCK_M, H)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N_Q
    d_mask = offs_d < HEAD_DIM
    qm_mask = m_mask[:, None] & d_mask[None, :]

    q = tl.load(_tile_ptrs(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qm, stride_qd),
                mask=qm_mask, other=0.0)
    do = tl.load(_tile_ptrs(DO, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_dom, stride_dod),
                 mask=qm_mask, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N_Q + offs_m, mask=m_mask, other=0.0)
    k_ptrs = _tile_ptrs(K, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd)
    v_ptrs = _tile_ptrs(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, 0, n_full, N_KV,
                       offs_n, d_mask, qk_scale, BLOCK_N, False, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, n_full, N_KV, N_KV,
                       offs_n, d_mask, qk_scale, BLOCK_N, True, DOT_PRECISION)
    dq = dq * scale
    tl.store(_tile_ptrs(DQ, b, h, offs_m, offs_d, stride_dqb, stride_dqh, stride_dqm, stride_dqd),
             dq.to(DQ.dtype.element_ty), mask=qm_mask)


# ----------------------------------------------------------------------------------------------
# Block sizes
# ----------------------------------------------------------------------------------------------

# On the GPU: one heuristic config per (kernel, fp32 or 16-bit, BLOCK_D), chosen for H100 at ViT
# lengths (N 50..730); the 16-bit D <= 64 ones are what the autotuner picked at (256, 12, 197, 64) bf16
# on an H100 (fwd 128x32, dK/dV 32x128, dQ 64x32, 4 warps, 3 stages), the D = 128 ones what it picked
# at (128, 16, 257, 80) (fwd 64x64, dK/dV 32x64, dQ 64x32). Set VITCORE_ATTN_AUTOTUNE=1 to
# let triton.autotune pick among a few more (keyed on a power-of-two length bucket, so a new N of the
# same size class does not re-tune). fp32 (exact "ieee" dots, no tensor cores) keeps 32x32 blocks:
# larger ones compile for 20 s and more (unrolled FMA code) for little gain.
# Under the interpreter (CPU) one small fixed config: its cost is per op, not per FLOP.
_GPU_HEURISTIC = {
    # (kernel, is_fp32, BLOCK_D <= 64): (BLOCK_M, BLOCK_N, num_warps, num_stages)
    ("fwd", False, True): (128, 32, 4, 3),
    ("fwd", False, False): (64, 64, 4, 3),
    ("fwd", True, True): (32, 32, 4, 2),
    ("fwd", True, False): (32, 32, 4, 2),
    ("dkdv", False, True): (32, 128, 4, 3),
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
    "dkdv": [(32, 128, 4, 3), (32, 128, 4, 5), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3)],
    "dq": [(128, 32, 4, 3), (128, 32, 4, 5), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
}
_INTERPRETER_CONFIG = {"fwd": (32, 64, 1, 1), "dkdv": (32, 64, 1, 1), "dq": (64, 32, 1, 1)}
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
_AUTOTUNED: dict[str, object] = {}  # wrapped on first use, not at import


def _use_autotune() -> bool:
    return os.environ.get("VITCORE_ATTN_AUTOTUNE", "0") == "1" and not interpreting()


def _config(kind: str, dtype: torch.dtype, block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one of the three main kernels."""
    if interpreting():
        return _INTERPRETER_CONFIG[kind]
    return _GPU_HEURISTIC[(kind, dtype == torch.float32, block_d <= 64)]


def _autotuned(kind: str):
    if kind not in _AUTOTUNED:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in _AUTOTUNE_CHOICES[kind]
        ]
        # Every config rewrites all of its outputs (nothing accumulates across launches), so the
        # autotuner's repeated launches are harmless. The autotuner adds the tensors' dtypes to the key.
        _AUTOTUNED[kind] = autotune(configs=configs, key=["LEN_BUCKET", "BLOCK_D", "DOT_PRECISION"])(
            _KERNELS[kind]
        )
    return _AUTOTUNED[kind]


def _launch(kind: str, rows: int, bh: int, dtype: torch.dtype, block_d: int, len_bucket: int, args: tuple,
            config: tuple[int, int, int, int] | None) -> None:
    """Launch kernel `kind` over `rows` rows of each of `bh` heads (rows = N_Q for fwd/dq, N_KV for dkdv),
    with an explicit config, the heuristic one, or the autotuner's choice."""
    precision = "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands
    tile = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"  # the block each program owns

    def grid(meta):
        return (cdiv(rows, meta[tile]) * bh,)

    if config is None and _use_autotune():
        _autotuned(kind)[grid](*args, len_bucket, BLOCK_D=block_d, DOT_PRECISION=precision)
        return
    bm, bn, warps, stages = config if config is not None else _config(kind, dtype, block_d)
    _KERNELS[kind][grid](*args, len_bucket, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, DOT_PRECISION=precision,
                         num_warps=warps, num_stages=stages)


def _pow2_at_least_16(n: int) -> int:
    """BLOCK_D for a head_dim (16 is the smallest tl.dot operand), and the autotuner's length bucket."""
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
    block_d = _pow2_at_least_16(d)
    args = (q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, n_q, n_kv, d, scale * _LOG2E)
    _launch("fwd", n_q, B * H, q.dtype, block_d, _pow2_at_least_16(max(n_q, n_kv)), args, config)
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
    block_d = _pow2_at_least_16(d)
    bucket = _pow2_at_least_16(max(n_q, n_kv))
    delta = new_output((B, H, n_q), torch.float32, q.device)
    delta_block = 32 if interpreting() else 64
    _attn_bwd_delta_kernel[(cdiv(n_q, delta_block) * B * H,)](
        o, do, delta, *o.stride(), *do.stride(), H, n_q, d, BLOCK_M=delta_block, BLOCK_D=block_d,
    )
    common = (H, n_q, n_kv, d, scale, scale * _LOG2E)
    if need_dk or need_dv:
        dkdv_args = (q, k, v, do, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                     *dk.stride(), *dv.stride(), *common)
        _launch("dkdv", n_kv, B * H, q.dtype, block_d, bucket, dkdv_args, configs.get("dkdv"))
    if need_dq:
        dq_args = (q, k, v, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                   *common)
        _launch("dq", n_q, B * H, q.dtype, block_d, bucket, dq_args, configs.get("dq"))
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
