"""A generated ImageNet-like JPEG folder (class subfolders of photo-sized JPEGs) for the input-pipeline benchmark.

    python -m benchmarks.jpeg_folder DIR [--images 4096] [--size 500 375] [--classes 10] [--workers 16]

The streaming pipeline's cost is JPEG decoding, resizing and worker hand-off, so the images are the size of an
average ImageNet photo (500 x 375) and compress like one (smooth colour fields with texture, quality 90, about
60 KB each), not like noise. Each image is a pure function of (seed, index). Written with several processes: 4096
images take a few seconds on the GPU machine's 16 cores. Every file goes through vitcore.fileio.atomic_write.
"""

from __future__ import annotations

import argparse
import io
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from vitcore.fileio import atomic_write

__all__ = ["make_jpeg_folder"]


def _one(args: tuple[str, int, int, int, int, int]) -> None:
    from PIL import Image

    root, index, width, height, classes, seed = args
    rng = np.random.default_rng([seed, index])
    label = index % classes
    # A smooth field (bilinear upsampling of a coarse random grid) plus fine texture: JPEG-compressible like a photo.
    coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.float32)
    ys, xs = np.linspace(0, 5, height), np.linspace(0, 7, width)
    y0, x0 = np.floor(ys).astype(int).clip(0, 4), np.floor(xs).astype(int).clip(0, 6)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = ((1 - fy) * (1 - fx) * coarse[y0][:, x0] + (1 - fy) * fx * coarse[y0][:, x0 + 1]
           + fy * (1 - fx) * coarse[y0 + 1][:, x0] + fy * fx * coarse[y0 + 1][:, x0 + 1])  # (H, W, 3)
    img += rng.normal(0, 12, size=img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    with atomic_write(os.path.join(root, f"class_{label:03d}", f"img_{index:06d}.jpg"), "wb") as f:
        f.write(buf.getvalue())


def make_jpeg_folder(root: str, images: int = 4096, size: tuple[int, int] = (500, 375), classes: int = 10,
                     seed: int = 0, workers: int | None = None) -> str:
    """Write `images` JPEGs of `size` (width, height) into `root/class_XXX/`; returns `root`."""
    if images < 1 or classes < 1 or min(size) < 8:
        raise ValueError(f"images={images}, classes={classes}, size={size}: need >= 1 image and class, sides >= 8")
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class_{c:03d}"), exist_ok=True)
    jobs = [(root, i, size[0], size[1], classes, seed) for i in range(images)]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        list(pool.map(_one, jobs, chunksize=max(1, images // (4 * (workers or os.cpu_count() or 1)))))
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("WIDTH", "HEIGHT"))
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args()
    make_jpeg_folder(args.root, args.images, tuple(args.size), args.classes, args.seed, args.workers)
    total = sum(e.stat().st_size for d in os.scandir(args.root) if d.is_dir() for e in os.scandir(d.path))
    print(f"{args.images} JPEGs of {args.size[0]}x{args.size[1]} in {args.classes} classes under {args.root}: "
          f"{total / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
