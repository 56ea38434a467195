"""`python -m train.predict --checkpoint RUN/best.pt img1.png ...`: the top-5 classes of each image."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .args import _Parser, add_flag
from .checkpointing import restore_for_inference
from .cli import run_cli
from .data import eval_transform, load_image

__all__ = ["predict", "main"]


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, img_size: int, k: int = 5) -> tuple[torch.Tensor, ...]:
    """Top-k (probabilities, class indices) for images (B, 3, H, W) uint8; each (B, k)."""
    x = eval_transform(images, img_size)  # (B, 3, S, S)
    probs = model(x).float().softmax(dim=-1)
    return probs.topk(min(k, probs.shape[-1]), dim=-1)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m train.predict", description="Top-5 classes per image from a fine-tuned checkpoint.")
    add_flag(p, "checkpoint", required=True)
    p.add_argument("images", nargs="+", help="image files (any size; resized like the test set)")
    add_flag(p, "top_k", type=int, default=5)
    add_flag(p, "backend", choices=["auto", "torch", "triton"], default="auto")
    add_flag(p, "device", default=None)
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    _, model, img_size, classes = restore_for_inference(args.checkpoint, args.device, backend=args.backend)
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
