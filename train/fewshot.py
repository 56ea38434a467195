"""`python -m train.fewshot --checkpoint CK --dataset D --shots 1 5 10 25 --seeds 3`: few-shot linear accuracy.

The ViT paper's cheap transfer metric (Dosovitskiy et al. 2021, section 4.1), computed as big_vision's
`evaluators/fewshot_lsr.py` does: per seed, a random class-balanced subset of the training split (`shots`
images of each class; for a seed the subsets of the shot counts are nested), its frozen pre-logits features
(the head's input: `pre_logits` output when the model has one, else the pooled token) standardised per
feature with the subset's mean and std (+1e-5), a constant 100 appended as an (almost unregularised) bias,
and the closed-form L2-regularised least-squares map onto {-1, 1}^K targets with big_vision's fixed
l2 = 2^10; accuracy is the argmax of that map on the whole test split. Prints shots x mean +- std (population
std over seeds) and writes the same table as CSV.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from vitcore.fileio import atomic_write
from vitcore.precision import autocast_dtype

from .args import UsageError, _Parser, add_flag
from .cli import run_cli
from .data import ImageSet, eval_transform, load_split
from .official import CHECKPOINT_HELP, restore

__all__ = ["BIAS_CONSTANT", "L2_REG", "class_balanced_subset", "fit_least_squares", "fewshot_accuracy",
           "extract_features", "main"]

L2_REG = 2.0**10  # big_vision configs/common_fewshot.py
BIAS_CONSTANT = 100.0  # big_vision: large, so the bias is barely regularised


def class_balanced_subset(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` examples of each class: the first `shots` of a per-class permutation drawn from
    np.random.default_rng(seed) (big_vision's rule, so the subsets of one seed are nested in the shot count)."""
    rng = np.random.default_rng(seed)
    picks = []
    for k in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == k))
        if members.size < shots:
            raise UsageError(f"class {k} has {members.size} training examples, fewer than --shots {shots}")
        picks.append(members[:shots])
    return np.concatenate(picks)


def _standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = (x - mean) / std
    return torch.cat([x, torch.full((x.shape[0], 1), BIAS_CONSTANT, dtype=x.dtype)], dim=1)  # (N, D + 1)


def fit_least_squares(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2_reg: float = L2_REG
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ridge regression of features x (N, D) onto 2 * one_hot(y) - 1; returns (mean, std, W (D + 1, K)).

    Solved in float64 in whichever form is smaller: (X^T X + l2 I)^-1 X^T Y when N >= D + 1, else the
    identical X^T (X X^T + l2 I)^-1 Y.
    """
    x = x.double().cpu()
    mean = x.mean(dim=0, keepdim=True)
    std = x.std(dim=0, correction=0, keepdim=True) + 1e-5
    xs = _standardise(x, mean, std)  # (N, D + 1)
    targets = 2.0 * torch.nn.functional.one_hot(y.cpu(), num_classes).double() - 1.0  # (N, K)
    n, d = xs.shape
    if n >= d:
        w = torch.linalg.solve(xs.T @ xs + l2_reg * torch.eye(d, dtype=xs.dtype), xs.T @ targets)
    else:
        w = xs.T @ torch.linalg.solve(xs @ xs.T + l2_reg * torch.eye(n, dtype=xs.dtype), targets)
    return mean, std, w


def fewshot_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     num_classes: int, l2_reg: float = L2_REG) -> float:
    """Test accuracy of the least-squares map fitted on (train_x, train_y)."""
    mean, std, w = fit_least_squares(train_x, train_y, num_classes, l2_reg)
    preds = (_standardise(test_x.double().cpu(), mean, std) @ w).argmax(dim=1)  # (M,)
    return (preds == test_y.cpu()).double().mean().item()


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, img_size: int, batch_size: int,
                     precision: str = "fp32") -> torch.Tensor:
    """Pre-logits features (N, R) float32 on the CPU of uint8 images (N, 3, H, W), resized as the test set."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    head, model.head = model.head, nn.Identity()  # the head's input is the representation
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = eval_transform(images[start:start + batch_size].to(device), img_size)  # (b, 3, S, S)
            with torch.autocast(device.type, dtype=autocast_dtype(precision), enabled=precision != "fp32"):
                out.append(model(x).float().cpu())  # (b, R)
    finally:
        model.head = head
        model.train(was_training)
    return torch.cat(out)


def evaluate_fewshot(model: nn.Module, img_size: int, train: ImageSet, test: ImageSet, shots: Sequence[int],
                     seeds: int, l2_reg: float = L2_REG, batch_size: int = 64, precision: str = "fp32"
                     ) -> dict[int, list[float]]:
    """{shots: [accuracy of seed 0, 1, ...]}. Only the images some subset uses are passed through the model."""
    k = len(train.classes)
    labels = train.labels.cpu().numpy()
    subsets = {(s, n): class_balanced_subset(labels, k, n, s) for s in range(seeds) for n in shots}
    used = np.unique(np.concatenate(list(subsets.values())))
    row = {int(i): r for r, i in enumerate(used)}  # dataset index -> row of the feature matrix
    feats = extract_features(model, train.images[torch.from_numpy(used)], img_size, batch_size, precision)
    test_feats = extract_features(model, test.images, img_size, batch_size, precision)
    results: dict[int, list[float]] = {n: [] for n in shots}
    for (_seed, n), idx in sorted(subsets.items()):  # seed-major: each list in seed order
        rows = torch.tensor([row[int(i)] for i in idx])
        acc = fewshot_accuracy(feats[rows], train.labels.cpu()[torch.from_numpy(idx)], test_feats,
                               test.labels.cpu(), k, l2_reg)
        results[n].append(acc)
    return results


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m train.fewshot",
                description="Few-shot linear accuracy of frozen pre-logits features (ViT paper / big_vision).")
    add_flag(p, "checkpoint", required=True, help=CHECKPOINT_HELP)
    add_flag(p, "dataset", required=True, help="cifar10, cifar100 or imagefolder")
    add_flag(p, "data_dir", default="data")
    add_flag(p, "shots", type=int, nargs="+", default=[1, 5, 10, 25])
    add_flag(p, "seeds", type=int, default=3, help="subsets drawn per shot count (seeds 0..N-1)")
    add_flag(p, "l2_reg", type=float, default=L2_REG, help="ridge strength (big_vision: 2^10)")
    add_flag(p, "model_type", default=None, help="checked against an official checkpoint (its arrays say the model)")
    add_flag(p, "img_size", type=int, default=None, help="default: the checkpoint's own resolution")
    add_flag(p, "batch_size", type=int, default=64)
    add_flag(p, "precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    add_flag(p, "backend", choices=["auto", "torch", "triton"], default="auto")
    add_flag(p, "device", default=None)
    add_flag(p, "output", default=None, help="CSV path (default fewshot_<dataset>.csv)")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if min(args.shots) < 1 or args.seeds < 1 or args.batch_size < 1 or args.l2_reg < 0:
        raise UsageError("--shots, --seeds and --batch_size must be >= 1 and --l2_reg >= 0")
    shots = sorted(set(args.shots))
    # An official file keeps its pre_logits (the paper's few-shot features of an i21k model are those).
    _, model, img_size, _ = restore(args.checkpoint, args.device, backend=args.backend, model_type=args.model_type,
                                    img_size=args.img_size)
    try:
        train = load_split(args.dataset, args.data_dir, True, img_size)
        test = load_split(args.dataset, args.data_dir, False, img_size, classes=train.classes)
    except ValueError as e:
        raise UsageError(f"--dataset {args.dataset}: {e}") from None
    results = evaluate_fewshot(model, img_size, train, test, shots, args.seeds, args.l2_reg, args.batch_size,
                               args.precision)
    out = args.output or f"fewshot_{args.dataset}.csv"
    with atomic_write(out, "w") as f:
        w = csv.writer(f)
        w.writerow(["shots", "mean", "std", *[f"seed_{s}" for s in range(args.seeds)]])
        for n in shots:
            accs = np.asarray(results[n])
            w.writerow([n, f"{accs.mean():.6f}", f"{accs.std():.6f}", *[f"{a:.6f}" for a in accs]])
    print(f"{args.checkpoint} on {args.dataset}: few-shot linear accuracy over {args.seeds} seed(s), "
          f"l2 {args.l2_reg:g}, {len(train.classes)} classes, {len(test)} test images")
    print(f"{'shots':>5}  accuracy (%)")
    for n in shots:
        accs = 100 * np.asarray(results[n])
        print(f"{n:>5}  {accs.mean():6.2f} ± {accs.std():.2f}")
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("train.fewshot", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
