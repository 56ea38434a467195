"""`python -m train.predict --checkpoint RUN/best.pt img1.png ...`: the top-5 classes of each image.

`--checkpoint` may also be an official .npz or a named source: `--checkpoint i21k+i1k:ViT-B_16 photo.jpg` prints
ImageNet-1k class names (see train.official).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .args import UsageError, _Parser, add_flag
from .cli import run_cli
from .data import eval_transform, load_image
from .official import CHECKPOINT_HELP, restore

__all__ = ["predict", "main"]


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, img_size: int, k: int = 5) -> tuple[torch.Tensor, ...]:
    """Top-k (probabilities, class indices) for images (B, 3, H, W) uint8; each (B, k)."""
    x = eval_transform(images, img_size)  # (B, 3, S, S)
    probs = model(x).float().softmax(dim=-1)
    return probs.topk(min(k, probs.shape[-1]), dim=-1)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m train.predict", description="Top-k classes per image from a fine-tuned run or an "
                "official checkpoint.")
    add_flag(p, "checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", help="image files (any size; resized like the test set)")
    add_flag(p, "top_k", type=int, default=5, help="classes printed per image (default: %(default)s)")
    add_flag(p, "model_type", default=None, help="checked against an official checkpoint (its arrays say the model)")
    add_flag(p, "img_size", type=int, default=None, help="default: the checkpoint's own resolution")
    add_flag(p, "backend", choices=["auto", "torch", "triton"], default="auto")
    add_flag(p, "device", default=None)
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.top_k < 1:
        raise UsageError(f"--top_k {args.top_k}: must be >= 1 (the number of classes printed per image)")
    _, model, img_size, classes = restore(args.checkpoint, args.device, backend=args.backend,
                                          model_type=args.model_type, img_size=args.img_size)
    device = next(model.parameters()).device
    for path in args.images:
        # Each file on its own: sizes differ, and the test transform resizes anyway.
        img = load_image(path)[None].to(device)  # (1, 3, H, W)
        probs, idx = predict(model, img, img_size, args.top_k)
        ranked = ", ".join(f"{classes[i]} {100 * p:.1f}%" for p, i in zip(probs[0].tolist(), idx[0].tolist()))
        print(f"{path}: {ranked}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("train.predict", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
