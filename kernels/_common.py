"""Shared by the attention, LayerNorm and Linear+GELU ops: input checks, allocation, launch sizing, the small kernel
that finishes a two-stage reduction (column sums of fp32 partials), and `KernelOp`, which turns an op's forward and
backward launchers into one differentiable, torch.compile-visible function.

Importing this module only defines functions; nothing is compiled or launched.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = [
    "SUPPORTED_DTYPES",
    "POISON_ENV",
    "interpreting",
    "check_launchable",
    "check_float",
    "new_output",
    "cdiv",
    "next_pow2",
    "sm_count",
    "column_sums",
    "KernelOp",
    "skipped_grad",
    "autotune",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests set this to "1" so every output starts as NaN: an element a kernel forgets to write then fails the
# comparison instead of silently holding whatever the allocator returned. Off by default (it costs a fill).
POISON_ENV = "VITCORE_POISON_OUTPUTS"


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1): small fixed launch configs then."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_launchable(op: str, *tensors: torch.Tensor, dots: bool = False) -> None:
    """All tensors on one device, and that device can run a Triton kernel (CUDA, or CPU under the interpreter).
    `dots`: the kernels use tl.dot, which the interpreter computes wrongly, and silently, on bfloat16."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        names = ", ".join(str(d) for d in sorted(devices, key=str))
        raise ValueError(f"{op}: all inputs must be on the same device, got {names}")
    (device,) = devices
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        if dots and any(t.dtype == torch.bfloat16 for t in tensors):
            raise TypeError(f"{op}: bfloat16 is not supported by the Triton interpreter on CPU (its tl.dot returns "
                            "garbage); use float32 or float16 there (bfloat16 runs on CUDA)")
        return
    raise ValueError(
        f"{op}: Triton kernels need CUDA tensors, got device {device} "
        "(on CPU set TRITON_INTERPRET=1 before importing triton, or use the torch backend)"
    )


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def new_output(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor when the poison switch is on (see POISON_ENV)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get(POISON_ENV) == "1":
        out.fill_(float("nan"))
    return out


# Plain integer helpers for the host side: triton.cdiv / next_power_of_2 go through Triton's constexpr-function
# wrapper, which costs ~2 us per call on paths that run every step.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in under the interpreter (programs run serially)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _column_sum_kernel(
    PARTIAL,  # (NUM_OUT, G, N) fp32, contiguous: per-program partial sums
    OUT0,  # (N,) column sums of PARTIAL[0], in the output dtype
    OUT1,  # (N,) column sums of PARTIAL[1] when NUM_OUT == 2; unused otherwise
    G,  # partial rows to sum
    N,  # columns
    NUM_OUT: tl.constexpr,  # 1 or 2 buffers summed by one launch (grid axis 1)
    BLOCK_G: tl.constexpr,  # partial rows per loop step
    BLOCK_N: tl.constexpr,  # columns per program
):
    pid_n = tl.program_id(0)
    which = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    base = PARTIAL + which.to(tl.int64) * G * N
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G)
        mask = (rows[:, None] < G) & col_mask[None, :]
        acc += tl.load(base + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    if NUM_OUT == 1:
        tl.store(OUT0 + cols, total.to(OUT0.dtype.element_ty), mask=col_mask)
    else:
        if which == 0:
            tl.store(OUT0 + cols, total.to(OUT0.dtype.element_ty), mask=col_mask)
        else:
            tl.store(OUT1 + cols, total.to(OUT1.dtype.element_ty), mask=col_mask)


def column_sums(partial: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Second stage of a deterministic reduction: (B, G, N) fp32 partials -> B tensors (N,) of `dtype`, B in {1, 2}.

    One launch instead of torch's sum + cast per buffer: at ViT sizes the backward kernels take ~100 us, and
    each extra small launch costs several."""
    num_out, g, n = partial.shape
    assert num_out in (1, 2) and partial.dtype == torch.float32 and partial.is_contiguous()
    outs = [new_output((n,), dtype, partial.device) for _ in range(num_out)]
    block_n = 128 if n <= 2**16 else 1024  # split-K dW partials have N*K columns: wider blocks, fewer programs
    block_g = max(1, min(next_pow2(g), 4096 // block_n))
    grid = (cdiv(n, block_n), num_out)
    _column_sum_kernel[grid](partial, outs[0], outs[-1], g, n, NUM_OUT=num_out, BLOCK_G=block_g, BLOCK_N=block_n,
                             num_warps=4)
    return outs


# ------------------------------------------------------------------------------------------------- autotuning


def autotune(configs: list[triton.Config], key: list[str], **kwargs: Any) -> Callable:
    """triton.autotune whose choices persist on disk where the installed Triton can do that (cache_results,
    Triton >= 3.4: the timings go to Triton's cache folder beside the compiled kernels, keyed by Triton's version,
    the GPU target, the kernel's source and the tuning key), so a new process does not re-benchmark every config.
    Older Triton tunes once per process, as before."""
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs.setdefault("cache_results", True)
    return triton.autotune(configs=configs, key=key, **kwargs)


# ---------------------------------------------------------------------------------------- differentiable ops


def skipped_grad(like: torch.Tensor) -> torch.Tensor:
    """What a backward launcher returns for a gradient it was told to skip: an empty tensor (a custom op cannot
    return None); KernelOp hands autograd None in its place."""
    return like.new_empty((0,))


class KernelOp:
    """One differentiable Triton op built from its launchers: the torch.library ops vitcore::<name>_fwd and
    vitcore::<name>_bwd (with fake implementations, so torch.compile traces around them) and an autograd formula.

    forward(*args) -> tuple of tensors; the first is the op's result, the rest are kept for the backward.
    backward(grad, *saved_tensors, *saved_values, needs_grad) -> one gradient per differentiable argument (the
        first `num_grads` of args). needs_grad (list of bool) is ctx.needs_input_grad for those arguments: where it
        is False the launcher skips that gradient's kernels (frozen weights: no dW/dB work) and returns
        `skipped_grad(...)`, which autograd receives as None.
    save(args, outputs) -> (saved_tensors, saved_values): what backward needs besides grad. `args` are all the
        arguments of the call; forward receives the leading ones its schema names, so trailing arguments reach
        only the backward (e.g. which backward variant to run).
    The fakes take the launchers' arguments and return empty tensors of the outputs' shapes and dtypes.

    Eager calls skip the op wrappers and run the launchers directly: the wrapper costs ~20 us of Python per call,
    as long as a whole LayerNorm forward at ViT-B sizes. Under torch.compile the ops are used, so the graph stays
    whole (no graph breaks).
    """

    def __init__(
        self,
        name: str,
        *,
        forward: Callable[..., tuple[torch.Tensor, ...]],
        forward_fake: Callable[..., tuple[torch.Tensor, ...]],
        backward: Callable[..., tuple[torch.Tensor, ...]],
        backward_fake: Callable[..., tuple[torch.Tensor, ...]],
        save: Callable[[tuple, tuple], tuple[Sequence[torch.Tensor], Sequence[Any]]],
        num_grads: int,
    ) -> None:
        self.name = name
        self.forward, self.backward, self.save, self.num_grads = forward, backward, save, num_grads
        self.forward_op = torch.library.custom_op(f"vitcore::{name}_fwd", forward, mutates_args=())
        self.forward_op.register_fake(forward_fake)
        self.backward_op = torch.library.custom_op(f"vitcore::{name}_bwd", backward, mutates_args=())
        self.backward_op.register_fake(backward_fake)
        self.forward_arity = len(inspect.signature(forward).parameters)  # the op schema's arguments
        self.function = _autograd_function(self)

    def __call__(self, *args: Any) -> torch.Tensor:
        return self.function.apply(*args)


def _autograd_function(op: KernelOp) -> type[torch.autograd.Function]:
    """The autograd.Function of one KernelOp (a class per op: autograd and torch.compile key on the class)."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            compiling = torch.compiler.is_compiling()
            outputs = (op.forward_op if compiling else op.forward)(*args[: op.forward_arity])
            tensors, values = op.save(args, outputs)
            ctx.save_for_backward(*tensors)
            ctx.saved_values = tuple(values)
            return outputs[0]

        @staticmethod
        def backward(ctx, grad):
            needs = list(ctx.needs_input_grad[: op.num_grads])
            compiling = torch.compiler.is_compiling()
            grads = (op.backward_op if compiling else op.backward)(grad, *ctx.saved_tensors, *ctx.saved_values, needs)
            tail = (None,) * (len(ctx.needs_input_grad) - op.num_grads)  # non-tensor arguments
            return (*(g if need else None for g, need in zip(grads, needs)), *tail)

    Function.__name__ = Function.__qualname__ = f"{op.name}_function"
    return Function
