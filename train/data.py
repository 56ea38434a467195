"""Datasets as uint8 tensors, a resumable step-indexed sampler, and batched on-device augmentation.

CIFAR is small (150 MB as uint8), so the whole set lives on the training device and every transform runs on
whole batches there: the input pipeline never waits on CPU workers. Randomness is a pure function of
(seed, step), so a resumed or multi-process run sees exactly the batches of an uninterrupted single run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .safe_pickle import safe_load

__all__ = [
    "CIFAR10_CLASSES",
    "ImageSet",
    "load_cifar",
    "load_imagefolder",
    "load_image",
    "StepSampler",
    "crop_params",
    "augment_batch",
    "eval_transform",
    "normalize",
    "eval_shard",
    "load_split",
]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ImageSet:
    """A split held in memory: images (N, 3, H, W) uint8, labels (N,) int64, class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes)


def _read_batch(path: str) -> dict:
    with open(path, "rb") as f:
        d = safe_load(f, encoding="bytes")
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict in a CIFAR batch, got {type(d).__name__}")
    return d


def load_cifar(root: str, dataset: str, train: bool) -> ImageSet:
    """Read the official python batches in `root` (the extracted cifar-10-batches-py / cifar-100-python)."""
    if dataset == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        label_key = b"labels"
        meta_file, names_key = "batches.meta", b"label_names"
    elif dataset == "cifar100":
        files = ["train"] if train else ["test"]
        label_key = b"fine_labels"
        meta_file, names_key = "meta", b"fine_label_names"
    else:
        raise ValueError(f"unknown CIFAR dataset {dataset!r}")
    datas, labels = [], []
    for name in files:
        d = _read_batch(os.path.join(root, name))
        datas.append(np.asarray(d[b"data"], dtype=np.uint8))
        labels.extend(int(v) for v in d[label_key])
    data = np.concatenate(datas).reshape(-1, 3, 32, 32)  # rows are channel-major 3x32x32
    meta_path = os.path.join(root, meta_file)
    if os.path.exists(meta_path):
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in _read_batch(meta_path)[names_key]]
    else:
        classes = CIFAR10_CLASSES if dataset == "cifar10" else [str(i) for i in range(100)]
    return ImageSet(torch.from_numpy(data.copy()), torch.tensor(labels, dtype=torch.int64), classes)


def load_image(path: str, size: int | None = None) -> torch.Tensor:
    """One image file as (3, H, W) uint8 RGB; resized to (size, size) when given."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def _has_images(folder: str) -> bool:
    return any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(folder))


def load_imagefolder(root: str, split: str, size: int, classes: list[str] | None = None) -> ImageSet:
    """`root/<split>/<class>/*.jpg|png`, each image resized to size x size (kept in memory as uint8)."""
    base = os.path.join(root, split)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"image folder {base} does not exist (expected {root}/{{train,test}}/<class>/*.jpg)")
    found = sorted(e.name for e in os.scandir(base) if e.is_dir())
    if classes is None:
        classes = found
    elif extra := [c for c in found if c not in classes and _has_images(os.path.join(base, c))]:
        # Skipping them would silently evaluate on part of the test set.
        from .args import UsageError

        raise UsageError(f"{base} has class folders the model was not trained on: {', '.join(extra[:5])}"
                         f"{' ...' if len(extra) > 5 else ''} (its classes: {', '.join(classes[:10])}"
                         f"{' ...' if len(classes) > 10 else ''})")
    images, labels = [], []
    for k, cls in enumerate(classes):
        folder = os.path.join(base, cls)
        if not os.path.isdir(folder):
            continue
        for fname in sorted(os.listdir(folder)):
            if fname.lower().endswith(IMAGE_EXTENSIONS):
                images.append(load_image(os.path.join(folder, fname), size))
                labels.append(k)
    if not images:
        raise FileNotFoundError(f"no images under {base}/<class>/")
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), classes)


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    # One independent CPU generator per (seed, stream, index): the value never depends on history.
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + stream * 7_919 + index * 104_729) % (2**63 - 1))
    return g


class StepSampler:
    """Global batch indices for an optimizer step: step t (from 1) takes positions [(t-1)B, tB) of the stream
    formed by concatenating one random permutation of the dataset per epoch (epoch e seeded by (seed, e)).

    Stateless: resuming at step t needs only t, and every rank computes the same global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = torch.randperm(self.n, generator=_generator(self.seed, 1, epoch))
        return self._cache[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """(batch_size,) int64 dataset indices of step `step` (>= 1)."""
        start = (step - 1) * self.batch_size
        pos = torch.arange(start, start + self.batch_size)
        epochs = pos // self.n
        out = torch.empty(self.batch_size, dtype=torch.int64)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[pos[sel] % self.n]
        return out


def crop_params(n: int, height: int, width: int, seed: int, step: int, scale: tuple[float, float] = (0.05, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = False, attempts: int = 10
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomResizedCrop boxes for a whole batch, as torchvision samples them (`attempts` tries, first valid
    one wins, else the central crop of clamped ratio), plus flip signs.

    Returns boxes (n, 4) float as (x0, y0, w, h) in pixels and flips (n,) of +1/-1.
    """
    g = _generator(seed, 2, step)
    area = float(height * width)
    target = area * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=g)  # (n, attempts)
    log_r = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, attempts)
    first = torch.argmax(valid.to(torch.int8), dim=1)  # index of the first valid try (0 when none)
    any_valid = valid.any(dim=1)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    # Fallback: central crop with the aspect clamped into `ratio` (the whole image for a square one).
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    w = torch.where(any_valid, w, torch.full_like(w, fw))
    h = torch.where(any_valid, h, torch.full_like(h, fh))
    u = torch.rand(n, 2, generator=g)
    # Offsets uniform over the integers 0..W-w (and 0..H-h) as torch.randint(0, W - w + 1) would draw.
    x0 = torch.floor(u[:, 0] * (width - w + 1))
    y0 = torch.floor(u[:, 1] * (height - h + 1))
    x0 = torch.where(any_valid, x0, torch.full_like(x0, (width - fw) // 2))
    y0 = torch.where(any_valid, y0, torch.full_like(y0, (height - fh) // 2))
    flips = torch.ones(n)
    if flip:
        flips = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return torch.stack([x0, y0, w, h], dim=1), flips


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 255] -> [-1, 1] (mean 0.5, std 0.5 per channel, as the official input pipeline)."""
    return x * (2.0 / 255.0) - 1.0


def augment_batch(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Crop each image to its box, resize to size x size (bilinear), flip, normalise: one grid_sample.

    images (B, 3, H, W) uint8 on any device; boxes (B, 4) (x0, y0, w, h) pixels; flips (B,) +-1.
    Returns (B, 3, size, size) in [-1, 1].
    """
    b, _, height, width = images.shape
    boxes = boxes.to(images.device, torch.float32)
    flips = flips.to(images.device, torch.float32)
    x0, y0, w, h = boxes.unbind(1)
    # Normalised coordinates (align_corners=False: -1/+1 are the outer pixel edges). The output grid spans
    # the crop box exactly, which is a resize of the crop with half-pixel centres, as F.interpolate does;
    # the one difference: output pixels within half a source pixel of the box edge blend with the real
    # neighbour outside the box rather than repeating the edge pixel.
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0] = w / width * flips
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)  # (B, size, size, 2)
    x = normalize(images.to(torch.float32))  # (B, 3, H, W); normalising first commutes with interpolation
    # "border" clamps at the image edge as a resize of the crop would, instead of blending in zeros.
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(dtype)  # (B, 3, size, size)


def eval_transform(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (bilinear; antialiased when shrinking) and normalise: (B, 3, H, W) uint8 -> (B, 3, size, size)."""
    x = images.to(torch.float32)
    if x.shape[-2:] != (size, size):
        shrink = size < x.shape[-1] or size < x.shape[-2]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return normalize(x)


def eval_shard(n: int, rank: int, world: int) -> torch.Tensor:
    """Indices of the test set rank `rank` evaluates: every example exactly once across ranks, remainder kept."""
    return torch.arange(rank, n, world)


def load_split(dataset: str, data_dir: str, train: bool, img_size: int, classes: list[str] | None = None,
               download: bool = True, progress: bool = True) -> ImageSet:
    """One split of `dataset`: CIFAR (downloaded into data_dir when missing) or an image folder."""
    if dataset in ("cifar10", "cifar100"):
        from .download import CIFAR, ensure_cifar

        root = os.path.join(data_dir, CIFAR[dataset][2])
        if download:
            root = ensure_cifar(dataset, data_dir, progress=progress)
        return load_cifar(root, dataset, train)
    if dataset == "imagefolder":
        return load_imagefolder(data_dir, "train" if train else "test", img_size, classes)
    raise ValueError(f"unknown dataset {dataset!r}")
