"""Test-set evaluation: the loop finetune calls, and `python -m train.evaluate --checkpoint RUN/best.pt`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vitcore import labels
from vitcore.precision import autocast_dtype

from .args import UsageError, _Parser, add_flag
from .cli import run_cli
from .data import ImageSet
from .datasets import DATASETS, open_split, prepare_data
from .distributed import all_reduce_sum
from .official import CHECKPOINT_HELP, restore
from .streaming import default_num_workers

__all__ = ["evaluate_model", "main"]

_CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, test: ImageSet, img_size: int, batch_size: int,
                   precision: str = "fp32", rank: int = 0, world_size: int = 1) -> tuple[float, float]:
    """(mean loss, top-1 accuracy) over the whole test set; each rank takes every world_size-th example and
    the sums are reduced, so every example counts exactly once, remainder included. `test` is an ImageSet or a
    streamed split (train.streaming.StreamSet): both yield resized, normalised batches on their device."""
    device = test.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    was_training = model.training
    model.eval()
    amp = torch.autocast(device.type, dtype=autocast_dtype(precision), enabled=precision != "fp32")
    for x, y in test.eval_batches(img_size, batch_size, rank, world_size):  # x: (b, 3, S, S)
        with amp:
            logits = model(x)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[1] += (logits.argmax(dim=1) == y).sum()
        sums[2] += y.numel()
    model.train(was_training)
    all_reduce_sum(sums)
    count = max(sums[2].item(), 1.0)
    return sums[0].item() / count, sums[1].item() / count


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m train.evaluate", description="Accuracy and loss of a checkpoint on a test set.")
    add_flag(p, "checkpoint", required=True, help=CHECKPOINT_HELP)
    add_flag(p, "dataset", choices=DATASETS, default=None,
             help="default: the run's dataset (cifar10 for an official checkpoint; an ImageNet-1k head reads an "
                  "imagefolder whose class folders are the wnids, e.g. <data_dir>/test/n01440764/)")
    add_flag(p, "data_dir", default=None, help="default: the run's data_dir")
    add_flag(p, "model_type", default=None, help="checked against an official checkpoint (its arrays say the model)")
    add_flag(p, "img_size", type=int, default=None, help="default: the checkpoint's own resolution")
    add_flag(p, "eval_batch_size", type=int, default=64)
    add_flag(p, "precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    add_flag(p, "backend", choices=["auto", "torch", "triton"], default="auto")
    add_flag(p, "device", default=None)
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    ck, model, img_size, _ = restore(args.checkpoint, args.device, backend=args.backend, model_type=args.model_type,
                                     img_size=args.img_size)
    device = next(model.parameters()).device
    run_args = ck.get("args", {})
    dataset = args.dataset or run_args.get("dataset", "cifar10")
    data_dir = args.data_dir or run_args.get("data_dir", "data")
    official = "source" in ck  # train.official.restore's info, not a run's checkpoint
    classes = ck.get("classes")
    if official and ck["num_classes"] == 1000:  # an ImageNet-1k head: its labels are the wnids in sorted order
        classes = labels.imagenet1k_wnids()

    def check_head(n: int) -> None:
        if n != ck["num_classes"]:
            raise UsageError(f"{args.checkpoint} has a {ck['num_classes']}-class head and {dataset} has {n} classes: "
                             f"fine-tune it first (python -m train.finetune --pretrained_dir {args.checkpoint} ...)")

    if dataset in _CIFAR_CLASSES:  # known before anything is downloaded
        check_head(_CIFAR_CLASSES[dataset])
    prepare_data(dataset, data_dir)  # CIFAR, Pets and Flowers are downloaded when missing
    # CIFAR in memory; any other test split streamed from its files through worker processes.
    test = open_split(dataset, data_dir, "test", classes, num_workers=default_num_workers()).to(device)
    check_head(len(test.classes))
    loss, acc = evaluate_model(model, test, img_size, args.eval_batch_size, args.precision)
    what = f"{ck['model_type']}, {img_size} px" if official else f"step {ck.get('step')}"
    print(f"{args.checkpoint} ({what}) on {dataset} test ({len(test)} images): "
          f"accuracy {100 * acc:.2f}%  loss {loss:.4f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("train.evaluate", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
