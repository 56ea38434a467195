"""Linear + bias + GELU (the MLP's first layer): y = gelu(x @ weight.T + bias), forward and backward in Triton.

forward:  one tiled GEMM (grouped program order for L2 reuse, fp32 accumulation) with bias and GELU in the
          epilogue. It also writes the pre-activation h = x @ weight.T + bias (input dtype) for the backward:
          storing it costs one extra (M, N) write, recomputing it would cost a whole GEMM, and the torch path
          (F.linear then F.gelu) keeps the same tensor alive anyway.
backward: dH = dY * gelu'(h), then dX = dH @ W, dW = dH^T @ X, db = sum_rows dH. Two variants, chosen per call
          (`backward=`) or by the environment variable VITCORE_LINEAR_GELU_BWD:
            "cublas" (default): one fused elementwise Triton kernel writes dH and per-tile partial sums of db,
                     then torch.mm (cuBLAS) runs both GEMMs (in fp32 they follow torch's TF32 setting).
            "triton": no dH tensor at all: dGELU is computed in the prologue of two Triton GEMMs (dX and dW),
                     from tiles of dY and h, and the dW GEMM also reduces db.
          benchmarks/bench_linear_gelu.py times both; keep whichever wins on the target GPU as the default.

torch.library ops vitcore::linear_gelu_fwd / linear_gelu_bwd (with fake implementations, made by _common.KernelOp) are
what torch.compile sees; eager calls skip their wrappers and call the same launchers directly. Frozen weights
(ctx.needs_input_grad) run no dW GEMM, a frozen bias no db reduction.

GELU: approximate="tanh" (default; the official ViT's flax gelu) or "erf" (exact; "none" is torch's spelling).
Dtypes: x, weight and bias share one of fp32/fp16/bf16; under torch.autocast all three are cast to the autocast
dtype first, as F.linear would be. fp32 dots use input_precision="ieee" (no TF32), halves
use the tensor cores in their dtype; accumulation is always fp32.
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
    column_sums,
    interpreting,
    new_output,
    next_pow2,
    skipped_grad,
    sm_count,
)

__all__ = ["linear_gelu", "BACKWARD_ENV", "BACKWARD_VARIANTS", "DEFAULT_BACKWARD"]

BACKWARD_ENV = "VITCORE_LINEAR_GELU_BWD"
BACKWARD_VARIANTS = ("cublas", "triton")
DEFAULT_BACKWARD = "cublas"
_APPROXIMATE = {"tanh": "tanh", "erf": "erf", "none": "erf"}
# Offsets inside the kernels are 32-bit: refuse tensors whose element count would overflow them.
_MAX_NUMEL = 2**31 - 1


@triton.jit
def _gelu(h, APPROX_TANH: tl.constexpr):
    """GELU of an fp32 tile."""
    if APPROX_TANH:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh intrinsic needed and no cancellation around u = 0.
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)  # sqrt(2/pi) * (h + 0.044715 h^3)
        return h * tl.sigmoid(2.0 * u)
    else:
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))  # erf(h / sqrt(2))


@triton.jit
def _gelu_grad(h, APPROX_TANH: tl.constexpr):
    """d gelu(h) / dh of an fp32 tile."""
    if APPROX_TANH:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        s = tl.sigmoid(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 0.134145 * h * h)  # 0.134145 = 3 * 0.044715
        return s + h * (2.0 * s * (1.0 - s)) * du
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * h * h)  # 1 / sqrt(2 pi)
        return cdf + h * pdf


@triton.jit
def _gemm_kernel(
    A,  # (M, K) left operand (any strides); in DGELU mode the upstream gradient dY seen as (M, K)
    AUX,  # (M, K) DGELU mode: the saved pre-activation h, seen like A; unused otherwise
    B,  # (K, N) right operand (any strides)
    BIAS,  # (N,) GELU mode: added before the activation; unused otherwise
    C,  # (SPLIT_K, M, N) output, contiguous: y in GELU mode, dX or dW in DGELU mode; fp32 partials if SPLIT_K > 1
    H,  # (M, N) GELU mode with STORE_H: pre-activation output, contiguous; unused otherwise
    DB,  # (SPLIT_K, M) fp32, WRITE_DB: row sums of dH over this split's K (the bias gradient); unused otherwise
    M,  # output rows
    N,  # output columns
    K,  # reduction length
    stride_am,  # A: elements between rows
    stride_ak,  # A: elements between columns
    stride_auxm,  # AUX: elements between rows
    stride_auxk,  # AUX: elements between columns
    stride_bk,  # B: elements between rows
    stride_bn,  # B: elements between columns
    EPILOGUE_GELU: tl.constexpr,  # forward: C = gelu(A @ B + BIAS), H = A @ B + BIAS
    STORE_H: tl.constexpr,  # forward: write H (only needed when a backward will follow)
    PROLOGUE_DGELU: tl.constexpr,  # backward: C = (A * gelu'(AUX)) @ B
    WRITE_DB: tl.constexpr,  # backward, dW GEMM: also DB = rowsum(A * gelu'(AUX))
    APPROX_TANH: tl.constexpr,  # tanh GELU (else erf)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands so fp32 stays fp32; "tf32" (ignored) for halves
    BLOCK_M: tl.constexpr,  # output tile rows
    BLOCK_N: tl.constexpr,  # output tile columns
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # output row tiles per group: programs of a group share B tiles in L2
    SPLIT_K: tl.constexpr,  # programs sharing one output tile along K (grid axis 1), each writing a partial
):
    # Grouped ordering (Triton tutorial 03): consecutive programs walk down GROUP_M row tiles before moving to
    # the next column tile, so the B columns they load are still in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SPLIT_K == 1:
        # Plain K (not a min() of it) keeps the compiler's knowledge that K is a multiple of 16, so the K masks
        # stay uniform over vectors and the loads stay vectorised.
        k_start = 0
        k_len = K
    else:
        # Split-K: this program reduces K range [k_start, k_start + k_len), whole BLOCK_Ks except at K's end.
        k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_start = pid_k * k_per_split
        k_len = tl.minimum(K - k_start, k_per_split)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    # Rows of A / columns of B past the edge wrap around instead of being masked: they load valid memory, the
    # results land in rows/columns the final store masks off, and the loads stay unmasked along M and N.
    # The reduction dimension K is masked (with zeros), since wrapped values there would be summed.
    # No max_contiguous hint here: at the wrap point the offsets are not contiguous, and when M or N is the
    # unit-stride dimension (the dW/dX roles) such a hint lets a vector load read past the tensor's end.
    offs_am = offs_m % M
    offs_bn = offs_n % N
    a_ptrs = A + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    aux_ptrs = AUX + offs_am[:, None] * stride_auxm + offs_k[None, :] * stride_auxk
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    offs_kb = tl.arange(0, BLOCK_K)
    for kb in range(0, tl.cdiv(k_len, BLOCK_K)):
        k_left = k_len - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_kb[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_kb[:, None] < k_left, other=0.0)
        if PROLOGUE_DGELU:
            # dH = dY * gelu'(h) in fp32, rounded to the operand dtype for the tensor cores: dH never touches
            # memory. Masked K entries have dY = 0, so they add nothing to either product or db.
            h = tl.load(aux_ptrs, mask=offs_kb[None, :] < k_left, other=0.0).to(tl.float32)
            dh = a.to(tl.float32) * _gelu_grad(h, APPROX_TANH)
            if WRITE_DB:
                db_acc += tl.sum(dh, axis=1)
            a = dh.to(B.dtype.element_ty)
            aux_ptrs += BLOCK_K * stride_auxk
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if EPILOGUE_GELU:
        bias = tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        h_out = acc + bias[None, :]
        if STORE_H:
            tl.store(H + out_offs, h_out.to(H.dtype.element_ty), mask=out_mask)
        tl.store(C + out_offs, _gelu(h_out, APPROX_TANH).to(C.dtype.element_ty), mask=out_mask)
    else:
        # Split-K partials go to slice pid_k of an fp32 buffer the host sums (deterministic, unlike atomics).
        tl.store(C + pid_k.to(tl.int64) * M * N + out_offs, acc.to(C.dtype.element_ty), mask=out_mask)
    if WRITE_DB:
        # Every column tile computes the same row sums; the first one writes them (no atomics, deterministic).
        if pid_n == 0:
            tl.store(DB + pid_k * M + offs_m, db_acc, mask=offs_m < M)


@triton.jit
def _dgelu_kernel(
    DY,  # (M, N) upstream gradient, strides stride_dym, stride_dyn
    H,  # (M, N) saved pre-activation, contiguous
    DH,  # (M, N) output dY * gelu'(h), contiguous, input dtype
    DB_PARTIAL,  # (cdiv(M, BLOCK_M), N) fp32: column sums of dH over each program row's BLOCK_M rows
    M,  # rows
    N,  # columns
    stride_dym,  # DY: elements between rows
    stride_dyn,  # DY: elements between columns
    APPROX_TANH: tl.constexpr,  # tanh GELU (else erf)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows64 = offs_m[:, None].to(tl.int64)
    dy = tl.load(DY + rows64 * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + rows64 * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    dh = dy * _gelu_grad(h, APPROX_TANH)
    tl.store(DH + rows64 * N + offs_n[None, :], dh.to(DH.dtype.element_ty), mask=mask)
    # The bias gradient rides along: reading dH again for dH.sum(0) would cost as much as writing it.
    tl.store(DB_PARTIAL + pid_m * N + offs_n, tl.sum(dh, axis=0), mask=offs_n < N)


# ----------------------------------------------------------------------------------------------------------- host


def _gpu_configs() -> list[triton.Config]:
    """H100-sensible GEMM tiles; the autotuner drops the ones that do not fit (e.g. big fp32 tiles)."""
    def cfg(bm, bn, bk, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                             num_stages=stages)

    # Few on purpose: each costs a compile (about a second) and a benchmark per GEMM role the first time a shape is
    # seen. Left out because they cannot win (benchmarks/kernel_resources.py, sm_90, Triton 3.6 and 3.9, at ViT-B/L/H
    # shapes): 128x256x64 on 8 warps (spills 20-68 B in the forward, whose GELU epilogue needs registers, sits at
    # 243-255 registers in the dX/dW roles, and its 144-164 KiB of shared memory leave one block per SM) and
    # 128x128x64 on 4 warps (255 registers, spills 4-120 B in every role; the same tile on 8 warps below needs
    # 134-172 registers, does the same MMA work per tile and does not spill).
    return [
        cfg(128, 128, 64, 8, 4),
        cfg(64, 128, 64, 4, 4),
        cfg(128, 64, 64, 4, 4),
        # fp32 only (see _prune_configs)
        cfg(64, 128, 32, 4, 3),
        cfg(64, 64, 32, 4, 3),
    ]


def _prune_configs(configs, named_args, **kwargs):
    # fp32 dots run on FMA units ("ieee"): big tensor-core tiles would spill registers and compile slowly there,
    # while halves want the BLOCK_K = 64 tiles of wgmma.
    want_bk = 32 if named_args["B"].dtype == torch.float32 else 64
    return [c for c in configs if c.kwargs["BLOCK_K"] == want_bk]


# Autotuners are made on first use, one per GEMM role (forward, dX, dW) so their caches never mix roles whose
# (M, N, K) happen to coincide. Nothing is built or compiled at import.
_TUNED: dict[str, triton.runtime.Autotuner] = {}
# Below this many multiply-adds a fixed tile is used: autotuning costs seconds per new shape, which small
# shapes (tests, odd layers) never pay back.
_AUTOTUNE_MIN_MACS = 2**27


def _split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Split the reduction when the output has too few tiles to fill the GPU: dW's (N, K) output is small next to
    its reduction over all M rows (ViT-B: 144 tiles of 128x128 on 132 SMs, one full wave and one nearly empty)."""
    if interpreting():
        return 2 if k >= 32 and m * n <= 4096 else 1  # exercise the split path in the (small) CPU tests
    if k < 4096:
        return 1
    tiles = cdiv(m, 128) * cdiv(n, 128)
    return max(1, min(8, round(4 * sm_count(device) / tiles), k // 2048))


def _launch_gemm(role: str, a, aux, b, bias, c, h, db, m, n, k, a_strides, aux_strides, b_strides, split_k=1,
                 **flags):  # fmt: skip
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), split_k)
    flags["SPLIT_K"] = split_k
    flags.setdefault("STORE_H", False)
    args = (a, aux, b, bias, c, h, db, m, n, k, *a_strides, *aux_strides, *b_strides)
    precision = "ieee" if b.dtype == torch.float32 else "tf32"
    if interpreting():
        # The interpreter runs programs one after another in numpy: few, biggish tiles are fastest there.
        tile = lambda d: min(128, max(16, next_pow2(d)))
        _gemm_kernel[grid](*args, **flags, DOT_PRECISION=precision, BLOCK_M=tile(m), BLOCK_N=tile(n),
                           BLOCK_K=tile(k), GROUP_M=8)
    elif m * n * k < _AUTOTUNE_MIN_MACS:
        _gemm_kernel[grid](*args, **flags, DOT_PRECISION=precision, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8,
                           num_warps=4, num_stages=3)
    else:
        if role not in _TUNED:
            _TUNED[role] = autotune(
                configs=_gpu_configs(), key=["M", "N", "K"], prune_configs_by={"early_config_prune": _prune_configs}
            )(_gemm_kernel)
        _TUNED[role][grid](*args, **flags, DOT_PRECISION=precision)


def _linear_gelu_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str, save_h: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    x2 = x.reshape(-1, k)  # any strides: the kernel takes both
    bias = bias.contiguous()  # (N,): loaded with unit stride; weight may have any strides
    m = x2.shape[0]
    y = new_output((m, n), x.dtype, x.device)
    # Without a backward to come (inference, frozen layers) h is not written: one (M, N) store saved.
    h = new_output((m if save_h else 0, n), x.dtype, x.device)
    if m > 0:
        # C = X @ W^T: B is W read through swapped strides, no transpose copy.
        _launch_gemm(
            "fwd", x2, x2, weight, bias, y, h, bias, m, n, k,
            x2.stride(), x2.stride(), (weight.stride(1), weight.stride(0)),
            EPILOGUE_GELU=True, STORE_H=save_h, PROLOGUE_DGELU=False, WRITE_DB=False,
            APPROX_TANH=approximate == "tanh",
        )  # fmt: skip
    return y.view(*x.shape[:-1], n), h


def _linear_gelu_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, approximate: str, backward: str,
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); needs_grad says which of the three to compute (see KernelOp): a frozen weight runs no
    dW GEMM, a frozen bias no db reduction, an x that needs no gradient no dX GEMM."""
    need_dx, need_dw, need_db = needs_grad
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    dy2 = dy.reshape(-1, n)
    m = x2.shape[0]
    tanh = approximate == "tanh"
    if m == 0:
        zeros = lambda need, t, shape: torch.zeros(shape, dtype=t.dtype, device=t.device) if need else skipped_grad(t)
        return zeros(need_dx, x, x.shape), zeros(need_dw, weight, weight.shape), zeros(need_db, weight, (n,))
    dx = dw = db = None
    # The fused "triton" backward gets db from the dW GEMM; with the weight frozen but the bias trained, dH
    # written once by the elementwise kernel (which sums db on the way) is cheaper than a whole GEMM.
    if backward == "cublas" or (need_db and not need_dw):
        dh = new_output((m, n), x.dtype, x.device)
        bm, bn = (64, 64) if interpreting() else (64, 128)
        db_partial = new_output((cdiv(m, bm), n), torch.float32, x.device)
        grid = (cdiv(m, bm), cdiv(n, bn))
        _dgelu_kernel[grid](dy2, h, dh, db_partial, m, n, dy2.stride(0), dy2.stride(1), APPROX_TANH=tanh,
                            BLOCK_M=bm, BLOCK_N=bn, num_warps=8)
        if need_dx:
            dx = torch.mm(dh, weight)  # (M, N) @ (N, K)
        if need_dw:
            dw = torch.mm(dh.t(), x2)  # (N, M) @ (M, K)
        if need_db:
            (db,) = column_sums(db_partial[None], weight.dtype)
    else:
        split = _split_k(n, k, m, x.device)
        db_out = new_output((split, n), torch.float32, x.device)  # written by the dW GEMM (the dX one ignores it)
        if need_dx:
            # dX (M, K) = dH (M, N) @ W (N, K), dH made in the prologue from dY and h tiles.
            dx = new_output((m, k), x.dtype, x.device)
            _launch_gemm(
                "dx", dy2, h, weight, dy2, dx, dx, db_out, m, k, n,
                dy2.stride(), h.stride(), weight.stride(),
                EPILOGUE_GELU=False, PROLOGUE_DGELU=True, WRITE_DB=False, APPROX_TANH=tanh,
            )  # fmt: skip
        if need_dw:
            # With a split reduction the dW GEMM writes fp32 partials (split, N, K) and (split, N), summed below.
            if split > 1:
                dw_out = new_output((split, n, k), torch.float32, x.device)
            else:
                dw_out = new_output((n, k), weight.dtype, x.device)
            # dW (N, K) = dH^T (N, M) @ X (M, K): dY and h read through swapped strides; db = row sums of dH^T.
            _launch_gemm(
                "dw", dy2, h, x2, dy2, dw_out, dw_out, db_out, n, k, m,
                (dy2.stride(1), dy2.stride(0)), (h.stride(1), h.stride(0)), x2.stride(), split_k=split,
                EPILOGUE_GELU=False, PROLOGUE_DGELU=True, WRITE_DB=True, APPROX_TANH=tanh,
            )  # fmt: skip
            dw = column_sums(dw_out.view(1, split, n * k), weight.dtype)[0].view(n, k) if split > 1 else dw_out
            if need_db:
                (db,) = column_sums(db_out[None], weight.dtype)
    return (
        dx.view(x.shape) if need_dx else skipped_grad(x),
        dw if need_dw else skipped_grad(weight),
        db if need_db else skipped_grad(weight),
    )


# ------------------------------------------------------------------------------------ differentiable custom op


def _linear_gelu_fwd_fake(x, weight, bias, approximate, save_h):
    n = weight.shape[0]
    m = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], n)), x.new_empty((m if save_h else 0, n))


def _linear_gelu_bwd_fake(dy, x, weight, h, approximate, backward, needs_grad):
    need_dx, need_dw, need_db = needs_grad
    grad = lambda need, t, shape: t.new_empty(shape) if need else skipped_grad(t)
    return grad(need_dx, x, x.shape), grad(need_dw, weight, weight.shape), grad(need_db, weight, weight.shape[:1])


# vitcore::linear_gelu_fwd (x, weight, bias, approximate, save_h) -> (y, h): y of shape (..., N); h the (rows, N)
# pre-activation kept for the backward, (0, N) if not save_h. vitcore::linear_gelu_bwd (dy, x, weight, h,
# approximate, backward, needs_grad) -> (dx, dweight, dbias). The call's sixth argument, `backward`, reaches only
# the backward.
_LINEAR_GELU = KernelOp(
    "linear_gelu",
    forward=_linear_gelu_fwd, forward_fake=_linear_gelu_fwd_fake,
    backward=_linear_gelu_bwd, backward_fake=_linear_gelu_bwd_fake,
    save=lambda args, outs: ((args[0], args[1], outs[1]), (args[3], args[5])),  # x, weight, h; approximate, backward
    num_grads=3,
)  # fmt: skip


def linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    approximate: str = "tanh",
    backward: str | None = None,
) -> torch.Tensor:
    """gelu(x @ weight.T + bias) over x's last dimension (weight (out, in) as in nn.Linear); differentiable.

    `backward` picks the backward GEMMs ("cublas" or "triton"); None reads VITCORE_LINEAR_GELU_BWD, default
    "cublas".
    """
    op = "kernels.linear_gelu"
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, bias)):
        raise TypeError(f"{op}: x, weight and bias must be tensors (bias is required)")
    if approximate not in _APPROXIMATE:
        raise ValueError(f"{op}: approximate must be 'tanh', 'erf' or 'none' (= erf), got {approximate!r}")
    if backward is None:
        backward = os.environ.get(BACKWARD_ENV, DEFAULT_BACKWARD)
    if backward not in BACKWARD_VARIANTS:
        raise ValueError(f"{op}: backward must be one of {BACKWARD_VARIANTS} (or ${BACKWARD_ENV}), got {backward!r}")
    if torch.is_autocast_enabled(x.device.type):
        # As F.linear under autocast: run in the autocast dtype; the casts are differentiable, so fp32 master
        # weights still receive fp32 gradients.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    check_float(op, "x", x)
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        raise TypeError(
            f"{op}: x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}, {bias.dtype} "
            "(cast them, or run under torch.autocast before calling)"
        )
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"{op}: need x (..., in) and weight (out, in), got {tuple(x.shape)} and {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k or bias.shape != (n,):
        raise ValueError(
            f"{op}: shapes do not match: x {tuple(x.shape)} (last dim = in), weight {tuple(weight.shape)} "
            f"(out, in), bias {tuple(bias.shape)} (out,)"
        )
    if k == 0 or n == 0:
        raise ValueError(f"{op}: in and out features must be positive, got weight {tuple(weight.shape)}")
    m = x.numel() // k
    if max(m * k, m * n, n * k) > _MAX_NUMEL:
        raise ValueError(f"{op}: tensors over 2**31 elements are not supported (32-bit offsets); split the batch")
    check_launchable(op, x, weight, bias, dots=True)
    save_h = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    return _LINEAR_GELU(x, weight, bias, _APPROXIMATE[approximate], save_h, backward)
