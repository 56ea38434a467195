"""One fine-tuning step (forward, cross-entropy, backward, global-norm clip, SGD momentum) of a zoo ViT on
synthetic images: img/s and MFU per vitcore backend, at any model, size, batch and precision.

    python -m benchmarks.bench_train_step --model_type ViT-L_16 --batch_size 128 --precision fp16
    python -m benchmarks.bench_train_step --quick    # ViT-B_16, 224 px, batch 256, bf16; torch, triton, auto, compile

Backends: `torch` (plain PyTorch ops), `triton` (vitcore's fused kernels), `auto` (per op and shape the faster of
the two, measured on first use), `compile` (torch.compile of the torch backend); `triton+compile` and
`auto+compile` compile those. The step, its timing (median of CUDA-event-timed steps after the warm-up) and the
MFU are bench_train_compare's, which also sets them against timm's same model. A batch that does not fit is
halved until it does. Exits 0 with a message where there is no CUDA device. Rows go to
<results>/bench_train_step.csv, with each backend's speed relative to `torch` at the same batch.
"""

from __future__ import annotations

import argparse
import os

import torch

import vitcore
from benchmarks.bench_train_compare import VARIANTS, make_batch, run_variant
from benchmarks.common import print_table, require_cuda, results_dir, write_csv
from vitcore.precision import PRECISIONS

# Backend name -> bench_train_compare variant (`compile` is the torch backend compiled, as it always was here).
BACKENDS = {**{v: v for v, (library, _, _) in VARIANTS.items() if library == "vitcore"}, "compile": "torch+compile"}
QUICK = {"model_type": "ViT-B_16", "img_size": 224, "batch_size": 256, "precision": "bf16",
         "backend": ["torch", "triton", "auto", "compile"], "warmup": 3, "iters": 10}
COLUMNS = ("model", "img_size", "batch", "precision", "backend", "status", "ms_per_step", "img_per_s", "tflops",
           "mfu", "vs_torch", "spread", "warmup_s", "peak_mem_gib")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_type", "--model-type", default="ViT-B_16", choices=list(vitcore.CONFIGS))
    p.add_argument("--img_size", "--img-size", type=int, default=224)
    p.add_argument("--batch_size", "--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=list(PRECISIONS), default="bf16")
    p.add_argument("--backend", nargs="+", choices=list(BACKENDS), default=["torch", "triton", "auto", "compile"])
    p.add_argument("--num_classes", "--num-classes", type=int, default=10)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="the encoder's dropout (default 0: ViT-B has none; L/H fine-tune with 0.1)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="ViT-B_16, 224 px, batch 256, bf16; torch, triton, auto, compile; 3 + 10 steps")
    args = p.parse_args()
    require_cuda("bench_train_step")
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores, as the peak table assumes
    torch.backends.cudnn.allow_tf32 = True
    out = os.path.join(results_dir(), "bench_train_step.csv")
    requested, rows = args.batch_size, []
    for backend in args.backend:
        args.batch_size = requested
        while True:
            x, y = make_batch(args)
            row = run_variant(BACKENDS[backend], args, x, y, [])
            del x, y
            if not row["status"].startswith("out of memory") or args.batch_size <= 8:
                break
            print(f"{backend}: batch {args.batch_size} does not fit; trying {args.batch_size // 2}")
            args.batch_size //= 2
        row["backend"] = backend
        base = next((r for r in [*rows, row] if r["backend"] == "torch" and r["batch"] == row["batch"]
                     and r["status"] == "ok"), None)
        ok = row["status"] == "ok" and base is not None
        row["vs_torch"] = row["img_per_s"] / base["img_per_s"] if ok else ""
        rows.append({c: row.get(c, "") for c in COLUMNS})
        print_table(rows[-1:], title=f"train step, {backend}")
        write_csv(out, rows)  # after every backend: a slow compile that times out keeps the earlier rows
    print_table(rows, title=f"train step {args.model_type} {args.img_size}px {args.precision}")


if __name__ == "__main__":
    main()
