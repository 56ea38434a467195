"""kernels.linear_gelu (both backward variants) vs F.linear + F.gelu (cuBLAS, then a separate GELU kernel) and
torch.compile of that, at ViT MLP shapes; forward, backward and forward+backward.

    python -m benchmarks.bench_linear_gelu            # ViT-B/L/H MLP fc1 at 224 and 384 px, bf16 and fp16
    python -m benchmarks.bench_linear_gelu --quick    # ViT-B/16 (256 * 197, 768 -> 3072) and ViT-H/14 fc1, bf16

`triton-bwd=cublas` is the fused dGELU elementwise kernel followed by torch.mm for dX and dW;
`triton-bwd=triton` computes dGELU inside the prologue of Triton dX/dW GEMMs (dH never stored). The faster
backward should be the default (kernels.linear_gelu.DEFAULT_BACKWARD); this script is where that is decided.
Times are medians of triton.testing.do_bench. FLOPs: forward 2*M*N*K, backward 4*M*N*K (dX and dW),
forward+backward 6*M*N*K; the elementwise GELU work is not counted. Rows go to <results>/bench_linear_gelu.csv.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from benchmarks.common import measure_all, print_table, require_cuda, results_dir, tflops, write_csv

# (model, image size, batch, tokens per image, in features K, out features N)
SHAPES = [
    ("ViT-B/16@224", 256, 197, 768, 3072),
    ("ViT-B/16@384", 64, 577, 768, 3072),
    ("ViT-L/16@224", 256, 197, 1024, 4096),
    ("ViT-L/16@384", 64, 577, 1024, 4096),
    ("ViT-H/14@224", 128, 257, 1280, 5120),
    ("ViT-H/14@384", 64, 730, 1280, 5120),
]
QUICK = [SHAPES[0], SHAPES[4]]  # ViT-B/16@224 and ViT-H/14@224, the two the GPU pass reports
QUICK_DTYPES = [torch.bfloat16]
MODES = ("fwd", "bwd", "fwd+bwd")
DEVICE = "cuda"  # a module constant so a CPU smoke test of the script logic can swap it
FLOP_FACTOR = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}


def torch_linear_gelu(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ViT-B/16@224 and ViT-H/14@224 only, bf16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args()
    require_cuda("bench_linear_gelu")

    import kernels
    from kernels.linear_gelu import _TUNED

    shapes = QUICK if args.quick else SHAPES
    dtypes = QUICK_DTYPES if args.quick else [torch.bfloat16, torch.float16]
    out_csv = os.path.join(results_dir(), "bench_linear_gelu.csv")
    impls = {
        "triton-bwd=cublas": lambda x, w, b: kernels.linear_gelu(x, w, b, "tanh", backward="cublas"),
        "triton-bwd=triton": lambda x, w, b: kernels.linear_gelu(x, w, b, "tanh", backward="triton"),
        "torch": torch_linear_gelu,
    }
    if not args.no_compile:
        impls["compile"] = torch.compile(torch_linear_gelu)

    rows = []
    for name, batch, tokens, k, n in shapes:
        m = batch * tokens
        for dtype in dtypes:
            torch.manual_seed(0)
            x = torch.randn(m, k, device=DEVICE, dtype=dtype, requires_grad=True)
            w = (torch.randn(n, k, device=DEVICE, dtype=dtype) * k**-0.5).requires_grad_()
            b = (0.1 * torch.randn(n, device=DEVICE, dtype=dtype)).requires_grad_()
            dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
            tag = f"{name} ({m}, {k} -> {n}) {str(dtype).removeprefix('torch.')}"
            times = measure_all(impls, (x, w, b), dy, tag)
            for role, tuner in _TUNED.items():
                print(f"  autotune {role}: {getattr(tuner, 'best_config', None)}")
            for mode in MODES:
                for label, t in times.items():
                    rows.append({
                        "shape": name, "M": m, "K": k, "N": n, "dtype": str(dtype).removeprefix("torch."),
                        "mode": mode, "impl": label, "ms": t[mode],
                        "tflops": tflops(FLOP_FACTOR[mode] * m * n * k, t[mode]),
                        "speedup_vs_torch": times["torch"][mode] / t[mode],
                    })  # fmt: skip
            write_csv(out_csv, rows)  # after every shape, so a run cut short still leaves its rows
            del x, w, b, dy
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    print_table(rows, title="linear_gelu (speedup_vs_torch > 1 is faster than cuBLAS + separate GELU)")
    print(f"wrote {out_csv}")


if __name__ == "__main__":
    main()
