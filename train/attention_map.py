"""`python -m train.attention_map --checkpoint RUN/best.pt --image img.png --out map.png`:
the attention-rollout heat map (Abnar & Zuidema 2020) drawn over the image. `--checkpoint` may also be an official
.npz or a named source (see train.official)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import vitcore
from vitcore.fileio import atomic_write

from .args import UsageError, _Parser, add_flag
from .cli import run_cli
from .data import eval_transform, load_image
from .official import CHECKPOINT_HELP, restore

__all__ = ["rollout_map", "save_overlay", "main"]


@torch.no_grad()
def rollout_map(model: torch.nn.Module, image: torch.Tensor, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(heat map (H, W) in [0, 1] at the image's resolution, logits (num_classes,)) for one (3, H, W) uint8 image."""
    x = eval_transform(image[None], img_size)  # (1, 3, S, S)
    logits, attentions = model(x, return_attention=True)
    heat = vitcore.attention_rollout(attentions).float()  # (1, gh, gw)
    heat = F.interpolate(heat[:, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]  # (H, W)
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    return heat, logits[0]


def image_format(out: str) -> str:
    """The file format `out`'s extension asks matplotlib for; UsageError naming the supported ones otherwise."""
    from matplotlib.backend_bases import FigureCanvasBase

    supported = FigureCanvasBase.get_supported_filetypes()
    ext = os.path.splitext(out)[1].lstrip(".").lower()
    if ext not in supported:
        raise UsageError(f"--out {out}: {'.' + ext if ext else 'no extension'} is not an image format matplotlib "
                         f"writes; use one of {', '.join('.' + e for e in sorted(supported))} (e.g. map.png)")
    return ext


def save_overlay(image: torch.Tensor, heat: torch.Tensor, out: str, title: str = "") -> None:
    """The image, and the image with the heat map blended over it (matplotlib Agg), in the format `out`'s
    extension names (PNG, PDF, SVG...), written atomically."""
    fmt = image_format(out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = image.permute(1, 2, 0).cpu().numpy()  # (H, W, 3) uint8
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    axes[0].imshow(img)
    axes[0].set_title("image")
    axes[1].imshow(img)
    axes[1].imshow(heat.cpu().numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    axes[1].set_title(title or "attention rollout")
    for a in axes:
        a.axis("off")
    fig.tight_layout()
    try:
        with atomic_write(out, "wb") as f:
            fig.savefig(f, format=fmt, dpi=100)
    finally:
        plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m train.attention_map", description="Attention-rollout heat map over an image.")
    add_flag(p, "checkpoint", required=True, help=CHECKPOINT_HELP)
    add_flag(p, "image", required=True)
    add_flag(p, "out", default="attention_map.png", help="the figure; its extension picks the format "
             "(default: %(default)s)")
    add_flag(p, "model_type", default=None, help="checked against an official checkpoint (its arrays say the model)")
    add_flag(p, "img_size", type=int, default=None, help="default: the checkpoint's own resolution")
    add_flag(p, "device", default=None)
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    image_format(args.out)  # a bad --out fails now, not after loading the model
    # The torch backend: rollout needs the attention probabilities, which the fused kernel never materialises.
    _, model, img_size, classes = restore(args.checkpoint, args.device, backend="torch", model_type=args.model_type,
                                          img_size=args.img_size)
    device = next(model.parameters()).device
    image = load_image(args.image)  # (3, H, W)
    heat, logits = rollout_map(model, image.to(device), img_size)
    k = int(logits.argmax())
    title = f"rollout; predicted {classes[k]} ({100 * logits.softmax(-1)[k].item():.1f}%)"
    save_overlay(image, heat, args.out, title)
    print(f"wrote {args.out} ({title})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("train.attention_map", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
