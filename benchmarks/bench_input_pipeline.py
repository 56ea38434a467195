"""The training input pipeline alone: index a batch from a uint8 CIFAR-size set held on the device, then
RandomResizedCrop + flip + normalise the whole batch there (train.data.augment_batch), in img/s.

    python -m benchmarks.bench_input_pipeline            # 224 and 384 px, batch 512, fp32 and bf16 output
    python -m benchmarks.bench_input_pipeline --quick    # 224 px, batch 512, bf16 output

Runs on CUDA (the target) or on CPU (for a number on a laptop). The target is >= 5x the model's training
img/s (bench_train_step) at the same image size. Rows go to <results>/bench_input_pipeline.csv.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import print_table, results_dir, write_csv
from train.data import StepSampler, augment_batch, crop_params

DATASET_SIZE = 50_000  # CIFAR-10's training set


def measure(device: torch.device, img_size: int, batch: int, dtype: torch.dtype, iters: int, warmup: int) -> float:
    """img/s of sampler + crop parameters + gather + augment at (batch, 3, img_size, img_size)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (DATASET_SIZE, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
    sampler = StepSampler(DATASET_SIZE, batch, seed=0)

    def one(step: int) -> torch.Tensor:
        idx = sampler.indices(step).to(device, non_blocking=True)
        boxes, flips = crop_params(batch, 32, 32, seed=0, step=step, flip=True)
        return augment_batch(images[idx], boxes, flips, img_size, dtype)  # (batch, 3, S, S)

    for s in range(1, warmup + 1):
        one(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(warmup + 1, warmup + iters + 1):
        one(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return iters * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="224 px, batch 512, bf16 only")
    p.add_argument("--batch_size", "--batch-size", type=int, default=512)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = (224,) if args.quick else (224, 384)
    dtypes = (torch.bfloat16,) if args.quick else (torch.float32, torch.bfloat16)
    iters = args.iters or (20 if device.type == "cuda" else 3)
    rows = []
    for size in sizes:
        for dtype in dtypes:
            ips = measure(device, size, args.batch_size, dtype, iters, warmup=2 if device.type == "cuda" else 1)
            rows.append({"img_size": size, "batch": args.batch_size, "out_dtype": str(dtype).replace("torch.", ""),
                         "img_per_s": ips, "ms_per_batch": 1000 * args.batch_size / ips,
                         "cpu_threads": torch.get_num_threads() if device.type == "cpu" else ""})
    # print_table appends the GPU's name; say so when the run was on the CPU of a GPU machine.
    print_table(rows, title="input pipeline" + (" on cpu" if device.type == "cpu" else ""))
    write_csv(os.path.join(results_dir(), "bench_input_pipeline.csv"), rows)


if __name__ == "__main__":
    main()
