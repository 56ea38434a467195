"""Run a GPU benchmark's own main() on the CPU with tiny shapes, so a script that would break on the GPU breaks here.

    python -m benchmarks.dry_run benchmarks.bench_attention --quick --no-autotune

GPU time comes in short leases: a script that fails after its first measurement wastes one. This runs every line
of the script's logic (argument parsing, each implementation's forward and backward, torch.compile's tracing, the
table and the CSV) with CPU stand-ins for what only a GPU has: `triton.testing.do_bench` calls the function once
and reports 1 ms, `require_cuda` lets the run go on, the module's DEVICE is "cpu", its quick shapes are the tiny
ones below, and torch.compile traces through Dynamo and AOTAutograd (`aot_eager`) instead of generating code. The
Triton kernels run in the interpreter. The timings in its output mean nothing; the structure is what is checked.
tests/test_benchmarks.py uses the same stand-ins.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

__all__ = ["TINY", "stand_ins", "apply", "main"]

# module name -> attribute -> tiny replacement. Attention gets a head_dim-80 shape too (ViT-H's D takes its own
# path); the train step runs in fp32, as the interpreter has no bf16 dots.
TINY: dict[str, dict[str, Any]] = {
    "benchmarks.bench_attention": {"QUICK_SHAPES": [("tiny", 2, 2, 9, 16), ("tiny-d80", 1, 2, 5, 80)],
                                   "QUICK_DTYPES": [torch.float32]},
    "benchmarks.bench_layer_norm": {"QUICK": [("tiny", 48, 5, 3)], "QUICK_DTYPES": [torch.float32],
                                    "copy_bandwidth": lambda: 1.0},
    "benchmarks.bench_linear_gelu": {"QUICK": [("tiny", 2, 5, 16, 32)], "QUICK_DTYPES": [torch.float32]},
    "benchmarks.bench_train_compare": {"QUICK": {
        "runs": [{"model_type": "testing", "img_size": 32, "batch_size": 4, "variants": [
                     "auto", "timm", "timm+compile", "triton", "torch", "auto+compile", "triton+compile",
                     "torch+compile"]},
                 {"model_type": "testing", "img_size": 16, "batch_size": 2, "variants": ["auto", "timm"]}],
        "precision": "fp32", "warmup": 1, "iters": 2}},
    "benchmarks.bench_train_step": {"QUICK": {"model_type": "testing", "img_size": 32, "batch_size": 4,
                                              "precision": "fp32", "backend": ["torch", "triton", "auto", "compile"],
                                              "warmup": 1, "iters": 2}},
}


def _one_call_do_bench(fn: Callable[[], Any], warmup: int = 25, rep: int = 100, return_mode: str = "median",
                       **_: Any) -> float:
    fn()
    return 1.0


def stand_ins(module: ModuleType) -> dict[tuple[Any, str], Any]:
    """(object, attribute) -> CPU stand-in, for `module` and the libraries it times with."""
    import triton.testing

    import benchmarks.common as common

    out: dict[tuple[Any, str], Any] = {
        (triton.testing, "do_bench"): _one_call_do_bench,
        (torch, "compile"): functools.partial(torch.compile, backend="aot_eager"),
    }
    # Every benchmark module loaded so far: a script may run another's code (bench_train_step runs
    # bench_train_compare's), which then reads its own DEVICE.
    loaded = [m for name, m in sys.modules.items() if name.startswith("benchmarks.") and m is not None]
    for target in {id(m): m for m in [module, common, *loaded]}.values():
        if hasattr(target, "require_cuda"):
            out[(target, "require_cuda")] = lambda script: None
        if hasattr(target, "DEVICE"):
            out[(target, "DEVICE")] = "cpu"
    for attr, value in TINY.get(module.__name__, {}).items():
        if not hasattr(module, attr):
            raise AttributeError(f"{module.__name__} has no {attr}: update benchmarks/dry_run.py's TINY table")
        out[(module, attr)] = value
    return out


def apply(module: ModuleType, setattr_: Callable[[Any, str, Any], None] = setattr) -> None:
    """Install the stand-ins on `module`; tests pass monkeypatch.setattr so they are undone afterwards."""
    for (obj, attr), value in stand_ins(module).items():
        setattr_(obj, attr, value)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m benchmarks.dry_run benchmarks.bench_NAME [its arguments]")
    # The interpreter must be chosen before triton is first imported: on a CPU the kernels can run nowhere else.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    module = importlib.import_module(argv[0])
    apply(module)
    sys.argv = [argv[0], *argv[1:]]
    print(f"dry run of {argv[0]} on CPU (tiny shapes, 1-call timer: the numbers below mean nothing)", flush=True)
    module.main()


if __name__ == "__main__":
    main()
