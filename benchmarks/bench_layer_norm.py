"""kernels.layer_norm vs F.layer_norm and torch.compile(F.layer_norm) at ViT shapes; forward, backward and
forward+backward.

    python -m benchmarks.bench_layer_norm            # ViT-B/L/H at 224 and 384 px, batch 64 and 256, bf16 and fp16
    python -m benchmarks.bench_layer_norm --quick    # ViT-B/16 (256 * 197, 768) and ViT-H/14 (128 * 257, 1280), bf16

Times are medians of triton.testing.do_bench. Bandwidth counts the bytes an ideal kernel must move (the same
formula for every implementation, so GB/s ratios are time ratios):
    fwd:      read x, write y (M*N elements each), read weight and bias, write mean and rstd (fp32, M each)
    bwd:      read x and dy, write dx, read mean and rstd, read weight, write dweight and dbias
    fwd+bwd:  the sum of both
`copy_frac` is GB/s divided by a device-to-device copy's GB/s measured here (large tensor copy_, bytes read +
written): the fraction of the bandwidth this GPU actually delivers. Rows go to <results>/bench_layer_norm.csv.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from benchmarks.common import gbps, measure_all, print_table, require_cuda, results_dir, write_csv

# (model, image size, width, tokens per image incl. the class token)
MODELS = [
    ("ViT-B/16@224", 768, 197),
    ("ViT-B/16@384", 768, 577),
    ("ViT-L/16@224", 1024, 197),
    ("ViT-L/16@384", 1024, 577),
    ("ViT-H/14@224", 1280, 257),
    ("ViT-H/14@384", 1280, 730),
]
BATCHES = (64, 256)
QUICK = [("ViT-B/16@224", 768, 197, 256), ("ViT-H/14@224", 1280, 257, 128)]
QUICK_DTYPES = [torch.bfloat16]
MODES = ("fwd", "bwd", "fwd+bwd")
DEVICE = "cuda"  # a module constant so a CPU smoke test of the script logic can swap it
EPS = 1e-6


def bytes_moved(mode: str, m: int, n: int, elt: int, w_elt: int) -> int:
    fwd = 2 * m * n * elt + 2 * n * w_elt + 2 * m * 4
    bwd = 3 * m * n * elt + 2 * m * 4 + 3 * n * w_elt
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy_ (read + write counted), the practical HBM ceiling."""
    from triton.testing import do_bench

    src = torch.empty(2**29, dtype=torch.float16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return gbps(2 * src.numel() * src.element_size(), ms)  # the 2 GiB are freed on return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ViT-B/16@224 and ViT-H/14@224 only, bf16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args()
    require_cuda("bench_layer_norm")

    import kernels

    shapes = QUICK if args.quick else [(name, n, t, batch) for name, n, t in MODELS for batch in BATCHES]
    dtypes = QUICK_DTYPES if args.quick else [torch.bfloat16, torch.float16]
    out_csv = os.path.join(results_dir(), "bench_layer_norm.csv")
    copy_gbps = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")

    impls = {
        "triton": lambda x, w, b: kernels.layer_norm(x, w, b, EPS),
        "torch": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS),
    }
    if not args.no_compile:
        compiled = torch.compile(F.layer_norm)
        impls["compile"] = lambda x, w, b: compiled(x, (x.shape[-1],), w, b, EPS)

    rows = []
    for name, n, tokens, batch in shapes:
        m = batch * tokens
        for dtype in dtypes:
            torch.manual_seed(0)
            x = torch.randn(m, n, device=DEVICE, dtype=dtype, requires_grad=True)
            w = (1 + 0.1 * torch.randn(n, device=DEVICE, dtype=dtype)).requires_grad_()
            b = (0.1 * torch.randn(n, device=DEVICE, dtype=dtype)).requires_grad_()
            dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
            tag = f"{name} B={batch} ({m}, {n}) {str(dtype).removeprefix('torch.')}"
            times = measure_all(impls, (x, w, b), dy, tag)
            for mode in MODES:
                for label, t in times.items():
                    rate = gbps(bytes_moved(mode, m, n, x.element_size(), w.element_size()), t[mode])
                    rows.append({
                        "shape": name, "batch": batch, "M": m, "N": n, "dtype": str(dtype).removeprefix("torch."),
                        "mode": mode, "impl": label, "ms": t[mode], "GB/s": rate, "copy_frac": rate / copy_gbps,
                        "speedup_vs_torch": times["torch"][mode] / t[mode],
                    })  # fmt: skip
            write_csv(out_csv, rows)  # after every shape, so a run cut short still leaves its rows
            del x, w, b, dy
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    print_table(rows, title=f"layer_norm (copy bandwidth {copy_gbps:.0f} GB/s; speedup_vs_torch > 1 is faster)")
    print(f"wrote {out_csv}")


if __name__ == "__main__":
    main()
