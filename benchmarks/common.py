"""Shared helpers for the benchmarks: device naming, CUDA guard, CSV rows and a printed table."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "device_name", "require_cuda", "write_csv", "print_table", "results_dir", "tflops", "gbps", "time_fwd_bwd",
    "measure", "measure_all",
]


def device_name() -> str:
    """The GPU's name (or 'cpu'), as reported by torch."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def require_cuda(script: str) -> None:
    """Exit 0 with a message when there is no CUDA device: GPU benchmarks mean nothing elsewhere."""
    if not torch.cuda.is_available():
        print(f"{script}: no CUDA device on this machine; nothing measured.")
        sys.exit(0)


def results_dir(default: str = "gpu-results") -> str:
    """Folder for CSVs: $BENCH_OUT if set, else `default`; created if missing."""
    path = os.environ.get("BENCH_OUT", default)
    os.makedirs(path, exist_ok=True)
    return path


def tflops(flop: float, ms: float) -> float:
    return flop / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def time_fwd_bwd(
    fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad_out: torch.Tensor,
    views: Callable[..., Sequence[torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Median ms (triton.testing.do_bench) of fn's forward (no grad), backward (graph kept) and forward+backward.

    Gradients are taken with respect to `inputs`; `views(*inputs)`, if given, makes fn's arguments from them on
    every call (e.g. q, k, v as views of one fused qkv tensor). One untimed forward+backward runs first, so
    compilation and autotuning stay out of the numbers.
    """
    import torch._functorch.config as functorch_config  # `import torch` alone does not load it
    from triton.testing import do_bench

    # The bwd timing replays one graph (retain_graph=True), which the donated buffers of a torch.compile'd fn
    # forbid: without this, every compile baseline fails its first backward and is left out of the table.
    functorch_config.donated_buffer = False
    leaves = list(inputs)

    def args() -> Sequence[torch.Tensor]:
        return leaves if views is None else views(*leaves)

    def fwd():
        with torch.no_grad():
            return fn(*args())

    out = fn(*args())

    def bwd():
        return torch.autograd.grad(out, leaves, grad_out, retain_graph=True)

    def fwd_bwd():
        return torch.autograd.grad(fn(*args()), leaves, grad_out)

    fwd_bwd()
    return {mode: do_bench(f, warmup=25, rep=100, return_mode="median")
            for mode, f in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd))}  # fmt: skip


def measure(
    label: str, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad_out: torch.Tensor, tag: str,
    views: Callable[..., Sequence[torch.Tensor]] | None = None,
) -> dict[str, float] | None:
    """time_fwd_bwd with a progress line; None (and a 'skipped' line) when `fn` cannot run this shape/dtype."""
    t0 = time.time()
    try:
        times = time_fwd_bwd(fn, inputs, grad_out, views=views)
    except Exception as e:  # e.g. an SDPA backend without support for this head_dim
        print(f"  {tag} {label}: skipped ({type(e).__name__}: {str(e)[:120]})", flush=True)
        return None
    pretty = ", ".join(f"{mode} {ms:.3f} ms" for mode, ms in times.items())
    print(f"  {tag} {label}: {pretty} ({time.time() - t0:.1f}s incl. compile/autotune)", flush=True)
    return times


def measure_all(
    impls: dict[str, Callable[..., torch.Tensor]], inputs: Sequence[torch.Tensor], grad_out: torch.Tensor, tag: str,
) -> dict[str, dict[str, float]]:
    """`measure` for every implementation: label -> times, leaving out the ones that could not run."""
    times = {}
    for label, fn in impls.items():
        t = measure(label, fn, inputs, grad_out, tag)
        if t is not None:
            times[label] = t
    return times


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """Write `rows` (dicts with the same keys) to `path`, adding device, versions and date columns."""
    if not rows:
        return
    stamp = {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "date": _dt.date.today().isoformat(),
    }
    full = [{**row, **stamp} for row in rows]
    from vitcore.fileio import atomic_write  # here, not at import: kernel_resources runs without vitcore

    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=list(full[0]))
        writer.writeheader()
        writer.writerows(full)


def print_table(rows: Sequence[dict[str, Any]], title: str = "") -> None:
    """Print `rows` as an aligned text table (floats to 3 significant digits)."""
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    if title:
        print(f"\n{title} ({device_name()})")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"
