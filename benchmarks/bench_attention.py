"""kernels.attention vs torch SDPA (best of its flash / efficient / cuDNN backends per shape) and
torch.compile of the plain math, at ViT shapes; forward, backward and forward+backward.

    python -m benchmarks.bench_attention            # every ViT shape, bf16 and fp16
    python -m benchmarks.bench_attention --quick    # ViT-B/16 (256, 12, 197, 64) and ViT-H/14 (128, 16, 257, 80), bf16

q, k, v are views of one fused (B, N, 3, H, D) projection, as in the model, for every implementation.
Times are medians of triton.testing.do_bench. FLOPs: forward 4*B*H*N*N*D (two matmuls, 2 FLOPs per
multiply-add), backward 2.5x forward (five matmuls, the flash-attention convention, not counting the
forward recomputation of P), forward+backward 3.5x forward. Rows go to <results>/bench_attention.csv.
"""

from __future__ import annotations

import argparse
import importlib
import os

import torch
import torch.nn.functional as F

from benchmarks.common import measure, print_table, require_cuda, results_dir, tflops, write_csv

# (model, image size) -> (B, H, N, D); batches sized so the math baseline's N x N scores fit an 80 GB card.
SHAPES = [
    ("ViT-B/16@224", 256, 12, 197, 64),
    ("ViT-B/16@384", 64, 12, 577, 64),
    ("ViT-L/16@224", 128, 16, 197, 64),
    ("ViT-L/16@384", 64, 16, 577, 64),
    ("ViT-H/14@224", 128, 16, 257, 80),
    ("ViT-H/14@384", 64, 16, 730, 80),
]
QUICK_SHAPES = [SHAPES[0], SHAPES[4]]  # head_dim 64 and 80, the two the GPU pass reports
QUICK_DTYPES = [torch.bfloat16]
MODES = ("fwd", "bwd", "fwd+bwd")
DEVICE = "cuda"  # a module constant so a CPU smoke test of the script logic can swap it


def fwd_flop(B, H, N, D):
    return 4.0 * B * H * N * N * D


def flop(mode, B, H, N, D):
    return fwd_flop(B, H, N, D) * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def math_attention(q, k, v):
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def sdpa_with(backend):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return fn


def shape_rows(name, B, H, N, D, dtype, times):
    """Table rows for one shape: every implementation, but only SDPA's best backend per mode."""
    sdpa = {k: t for k, t in times.items() if k.startswith("sdpa")}
    rows = []
    for mode in MODES:
        best_sdpa = min(sdpa, key=lambda k: sdpa[k][mode]) if sdpa else None
        for label, t in times.items():
            if label.startswith("sdpa") and label != best_sdpa:
                continue  # every backend's times are printed as they are measured
            rows.append({
                "shape": name, "B": B, "H": H, "N": N, "D": D, "dtype": str(dtype).removeprefix("torch."),
                "mode": mode, "impl": label, "ms": t[mode], "tflops": tflops(flop(mode, B, H, N, D), t[mode]),
                "speedup_vs_sdpa_best": (sdpa[best_sdpa][mode] / t[mode]) if best_sdpa else float("nan"),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ViT-B/16@224 and ViT-H/14@224 only, bf16")
    parser.add_argument("--no-autotune", action="store_true", help="skip the VITCORE_ATTN_AUTOTUNE=1 rows")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile math baseline")
    parser.add_argument("--only", nargs="*", default=None, help="shape names to run, e.g. ViT-H/14@224")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default=None, help="one dtype only")
    args = parser.parse_args()
    require_cuda("bench_attention")

    from torch.nn.attention import SDPBackend

    import kernels

    attn_mod = importlib.import_module("kernels.attention")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.only:
        shapes = [s for s in SHAPES if s[0] in args.only]
    dtypes = QUICK_DTYPES if args.quick else [torch.bfloat16, torch.float16]
    if args.dtype:
        dtypes = [getattr(torch, args.dtype)]
    out_csv = os.path.join(results_dir(), "bench_attention.csv")
    sdpa_backends = {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    rows: list[dict] = []
    for name, B, H, N, D in shapes:
        for dtype in dtypes:
            torch.manual_seed(0)
            base = torch.randn(B, N, 3, H, D, device=DEVICE, dtype=dtype, requires_grad=True)
            do = torch.randn(B, H, N, D, device=DEVICE, dtype=dtype)
            tag = f"{name} {str(dtype).removeprefix('torch.')}"
            # Headline comparisons first; the slow-to-build ones last, so a run cut short by a time cap
            # still has them (the CSV is rewritten after every measurement).
            plan = [("triton", kernels.attention, "0")]
            plan += [(label, sdpa_with(backend), "0") for label, backend in sdpa_backends.items()]
            if not args.no_compile:
                plan.append(("compile-math", torch.compile(math_attention), "0"))
            if not args.no_autotune:
                plan.append(("triton-autotuned", kernels.attention, "1"))
            times: dict[str, dict[str, float]] = {}
            for label, fn, autotune in plan:
                os.environ["VITCORE_ATTN_AUTOTUNE"] = autotune
                t = measure(label, fn, (base,), do, tag, views=lambda qkv: qkv.permute(2, 0, 3, 1, 4).unbind(0))
                if t is not None:
                    times[label] = t
                write_csv(out_csv, rows + shape_rows(name, B, H, N, D, dtype, times))
            os.environ["VITCORE_ATTN_AUTOTUNE"] = "0"
            for kind, tuner in attn_mod._AUTOTUNED.items():
                print(f"  autotune {kind}: {getattr(tuner, 'best_config', None)}")
            rows += shape_rows(name, B, H, N, D, dtype, times)
            del base, do
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    print_table(rows, title="attention (speedup_vs_sdpa_best > 1 means faster than SDPA's best backend)")
    print(f"wrote {out_csv}")


if __name__ == "__main__":
    main()
