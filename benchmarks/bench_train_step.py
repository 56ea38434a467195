"""One fine-tuning step (forward, cross-entropy, backward, global-norm clip, SGD momentum) of a zoo ViT on
synthetic images: img/s and MFU per backend, on the GPU named in the output.

    python -m benchmarks.bench_train_step --model_type ViT-B_16 --batch_size 256 --precision bf16
    python -m benchmarks.bench_train_step --quick    # ViT-B_16, 224 px, batch 256, bf16; torch, triton, compile

Backends: `torch` (plain PyTorch ops), `triton` (vitcore's fused kernels), `compile` (torch.compile of the
torch backend). MFU counts the FLOPs of the model's forward and backward (vitcore.flops, counted on the model)
against the GPU's dense peak at that precision. Target on H100 bf16, ViT-B_16 at 224: triton >= 1.25x torch and
>= 50% MFU.
Exits 0 with a message where there is no CUDA device. Rows go to <results>/bench_train_step.csv.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import vitcore
from benchmarks.common import device_name, print_table, require_cuda, results_dir, write_csv
from vitcore.flops import mfu, train_flops
from vitcore.precision import autocast_dtype


def build_step(cfg: vitcore.ViTConfig, img_size: int, num_classes: int, backend: str, precision: str):
    """A closure running one optimizer step on (x, y); the model is built on CUDA."""
    model = vitcore.VisionTransformer(cfg, img_size=img_size, num_classes=num_classes,
                                      backend="torch" if backend == "compile" else backend).cuda().train()
    forward = torch.compile(model) if backend == "compile" else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    dtype = autocast_dtype(precision)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=precision != "fp32"):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step, x: torch.Tensor, y: torch.Tensor, warmup: int, iters: int) -> float:
    """Mean ms per step over `iters` steps after `warmup` (compilation, autotuning) steps."""
    for _ in range(warmup):
        step(x, y)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step(x, y)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def run_one(args: argparse.Namespace, backend: str, batch: int) -> dict:
    cfg = vitcore.CONFIGS[args.model_type]
    if args.dropout is not None:
        cfg = cfg.replace(dropout=args.dropout)
    x = torch.randn(batch, 3, args.img_size, args.img_size, device="cuda")
    y = torch.randint(0, args.num_classes, (batch,), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    step = build_step(cfg, args.img_size, args.num_classes, backend, args.precision)
    ms = time_steps(step, x, y, args.warmup, args.iters)
    ips = batch * 1000.0 / ms
    util = mfu(ips, cfg, args.img_size, args.num_classes, device_name(), args.precision)
    return {"model": args.model_type, "img_size": args.img_size, "batch": batch, "precision": args.precision,
            "backend": backend, "ms_per_step": ms, "img_per_s": ips,
            "tflops": ips * train_flops(cfg, args.img_size, args.num_classes) / 1e12,
            "mfu": util if util is not None else "", "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_type", "--model-type", default="ViT-B_16", choices=list(vitcore.CONFIGS))
    p.add_argument("--img_size", "--img-size", type=int, default=224)
    p.add_argument("--batch_size", "--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--backend", nargs="+", choices=["torch", "triton", "compile"],
                   default=["torch", "triton", "compile"])
    p.add_argument("--num_classes", "--num-classes", type=int, default=10)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="override the config's dropout (default 0: ViT-B has none; L/H fine-tune with 0.1)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="ViT-B_16, 224 px, batch 256, bf16, 3 backends, 10 steps")
    args = p.parse_args()
    require_cuda("bench_train_step")
    if args.quick:
        args.model_type, args.img_size, args.batch_size, args.precision = "ViT-B_16", 224, 256, "bf16"
        args.backend, args.warmup, args.iters = ["torch", "triton", "compile"], 3, 10
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores, as the peak table assumes
    torch.backends.cudnn.allow_tf32 = True
    rows: list[dict] = []
    out = os.path.join(results_dir(), "bench_train_step.csv")
    for backend in args.backend:
        batch = args.batch_size
        while True:
            try:
                rows.append(run_one(args, backend, batch))
                break
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                if batch <= 8:
                    raise
                print(f"{backend}: batch {batch} does not fit; trying {batch // 2}")
                batch //= 2
        base = next((r for r in rows if r["backend"] == "torch" and r["batch"] == batch), None)
        rows[-1]["vs_torch"] = rows[-1]["img_per_s"] / base["img_per_s"] if base else ""
        print_table(rows[-1:], title=f"train step, {backend}")
        write_csv(out, rows)  # after every backend: a slow compile that times out keeps the earlier rows
    print_table(rows, title=f"train step {args.model_type} {args.img_size}px {args.precision}")


if __name__ == "__main__":
    main()
