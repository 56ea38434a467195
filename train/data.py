"""Datasets as uint8 tensors, a resumable step-indexed sampler, and batched on-device augmentation.

CIFAR is small (150 MB as uint8), so the whole set lives on the training device and every transform runs on
whole batches there: the input pipeline never waits on CPU workers. Randomness is a pure function of
(seed, step), so a resumed or multi-process run sees exactly the batches of an uninterrupted single run.
Every other dataset streams from its files (train.streaming) with the same sampler and the same crop draws;
both kinds of split offer the same interface (len, labels, classes, subset, to, eval_batches, train_batches).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .safe_pickle import DatasetFileError, check_cifar_batch, read_dataset_pickle

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "ResidentStepBatch",
    "load_cifar",
    "load_imagefolder",
    "load_image",
    "StepSampler",
    "crop_draws",
    "crop_boxes",
    "crop_params",
    "augment_batch",
    "eval_transform",
    "normalize",
    "eval_shard",
    "load_split",
]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class ImageSet:
    """A split held in memory: images (N, 3, H, W) uint8, labels (N,) int64, class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes)

    def subset(self, idx: np.ndarray | torch.Tensor) -> ImageSet:
        """The examples at positions `idx` (a copy)."""
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.int64, device=self.images.device)
        return ImageSet(self.images[idx], self.labels[idx], self.classes)

    def eval_batches(self, img_size: int, batch_size: int, rank: int = 0, world: int = 1
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's evaluation batches: (b, 3, S, S) float32 resized and normalised, (b,) labels; every example
        exactly once across ranks."""
        idx = eval_shard(len(self), rank, world).to(self.images.device)
        for start in range(0, idx.numel(), batch_size):
            chunk = idx[start:start + batch_size]
            yield eval_transform(self.images[chunk], img_size), self.labels[chunk]

    def train_batches(self, global_batch: int, rank: int, world: int, seed: int, img_size: int, flip: bool,
                      first_step: int, last_step: int) -> Iterator[ResidentStepBatch]:
        """Steps first_step..last_step: this rank's share of each global batch, augmented on the device."""
        sampler = StepSampler(len(self), global_batch, seed)
        per_rank = global_batch // world
        mine = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's shard of the global batch
        height, width = self.images.shape[-2:]
        for step in range(first_step, last_step + 1):
            idx = sampler.indices(step)  # (global_batch,) the same on every rank
            boxes, flips = crop_params(global_batch, height, width, seed, step, flip=flip)
            yield ResidentStepBatch(step, self, idx[mine].to(self.images.device), boxes[mine], flips[mine], img_size)


class ResidentStepBatch:
    """One process's share of a step of an ImageSet: indices, crop boxes and flips; pixels made per micro-batch."""

    def __init__(self, step: int, data: ImageSet, idx: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                 img_size: int) -> None:
        self.step, self.data, self.idx, self.boxes, self.flips, self.img_size = step, data, idx, boxes, flips, img_size

    def micro(self, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Model input (m, 3, S, S) float32 and labels (m,) of the micro-batch `part`."""
        idx = self.idx[part]
        x = augment_batch(self.data.images[idx], self.boxes[part], self.flips[part], self.img_size)  # (m, 3, S, S)
        return x, self.data.labels[idx]


def _read_batch(path: str) -> dict:
    return read_dataset_pickle(path)  # a dict, or an error naming the file


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
        check_cifar_batch(os.path.join(root, name), d, label_key, 10 if dataset == "cifar10" else 100)
        datas.append(np.asarray(d[b"data"], dtype=np.uint8))
        labels.extend(int(v) for v in d[label_key])
    data = np.concatenate(datas).reshape(-1, 3, 32, 32)  # rows are channel-major 3x32x32
    meta_path = os.path.join(root, meta_file)
    if os.path.exists(meta_path):
        meta = _read_batch(meta_path)
        if not isinstance(meta.get(names_key), list):
            raise DatasetFileError(f"{meta_path}: no {names_key.decode()!r} list of class names")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    else:
        classes = CIFAR10_CLASSES if dataset == "cifar10" else [str(i) for i in range(100)]
    return ImageSet(torch.from_numpy(data.copy()), torch.tensor(labels, dtype=torch.int64), classes)


def load_image(path: str, size: int | None = None) -> torch.Tensor:
    """One image file as (3, H, W) uint8 RGB, upright (EXIF orientation applied); resized to (size, size) when
    given (bilinear, antialiased)."""
    from .streaming import decode_box, decode_rgb, open_image

    if size is None:
        arr = decode_rgb(path)
    else:
        im, width, height, orientation = open_image(path)
        with im:
            arr = decode_box(im, orientation, (0, 0, width, height), size)
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W); a writable copy


def load_imagefolder(root: str, split: str, size: int, classes: list[str] | None = None) -> ImageSet:
    """`root/<split>/<class>/*.jpg|png`, each image resized to size x size and kept in memory as uint8 (for small
    folders and feature extraction; training streams them instead: train.streaming)."""
    from .datasets import index_folder

    index, classes = index_folder(root, split, classes)
    return _materialize(index, classes, size)


def _materialize(index, classes: list[str], size: int) -> ImageSet:
    images = torch.stack([load_image(index.path(i), size) for i in range(len(index))])  # (N, 3, size, size)
    return ImageSet(images, torch.from_numpy(index.labels.copy()), classes)


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


CROP_ATTEMPTS = 10


def crop_draws(n: int, seed: int, step: int, scale: tuple[float, float] = (0.05, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = False, attempts: int = CROP_ATTEMPTS
               ) -> torch.Tensor:
    """The random numbers behind a batch's RandomResizedCrop boxes and flips, before any image size is known.

    Returns (n, 2 * attempts + 3) float32: per try the area fraction (in `scale`) and the log aspect (in `ratio`),
    then two offset uniforms and a flip uniform (1.0, i.e. no flip, when `flip` is off). A pure function of
    (seed, step): row i is the same whichever process or worker computes it, so a streamed batch can take its
    rows' boxes from each file's own size (crop_boxes) and a GPU-resident one from the common size.
    """
    g = _generator(seed, 2, step)
    frac = torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=g)  # (n, attempts)
    log_r = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    u = torch.rand(n, 2, generator=g)
    flip_u = torch.rand(n, 1, generator=g) if flip else torch.ones(n, 1)
    return torch.cat([frac, log_r, u, flip_u], dim=1)


def crop_boxes(draws: torch.Tensor, height: int | torch.Tensor, width: int | torch.Tensor,
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomResizedCrop boxes from `draws` (crop_draws rows) for images of `height` x `width` (ints, or (n,)
    tensors: one size per row), as torchvision samples them: the first valid try wins, else the central crop of
    clamped ratio.

    Returns boxes (n, 4) float as (x0, y0, w, h) in pixels and flips (n,) of +1/-1.
    """
    n, attempts = draws.shape[0], (draws.shape[1] - 3) // 2
    height = torch.as_tensor(height, dtype=torch.float64).expand(n)
    width = torch.as_tensor(width, dtype=torch.float64).expand(n)
    area = (height * width).to(torch.float32)[:, None]  # exact below 2^24 pixels
    target = area * draws[:, :attempts]  # (n, attempts)
    aspect = torch.exp(draws[:, attempts:2 * attempts])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    hf, wf = height.to(torch.float32)[:, None], width.to(torch.float32)[:, None]
    valid = (w > 0) & (w <= wf) & (h > 0) & (h <= hf)  # (n, attempts)
    first = torch.argmax(valid.to(torch.int8), dim=1)  # index of the first valid try (0 when none)
    any_valid = valid.any(dim=1)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    # Fallback: central crop with the aspect clamped into `ratio` (the whole image for a square one), in float64
    # as Python computes it for one image.
    in_ratio = width / height
    fw = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fh = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    w = torch.where(any_valid, w, fw.to(torch.float32))
    h = torch.where(any_valid, h, fh.to(torch.float32))
    u = draws[:, 2 * attempts:2 * attempts + 2]
    # Offsets uniform over the integers 0..W-w (and 0..H-h) as torch.randint(0, W - w + 1) would draw.
    x0 = torch.floor(u[:, 0] * (wf[:, 0] - w + 1))
    y0 = torch.floor(u[:, 1] * (hf[:, 0] - h + 1))
    x0 = torch.where(any_valid, x0, torch.floor((width - fw) / 2).to(torch.float32))
    y0 = torch.where(any_valid, y0, torch.floor((height - fh) / 2).to(torch.float32))
    flips = torch.where(draws[:, -1] < 0.5, -1.0, 1.0)
    return torch.stack([x0, y0, w, h], dim=1), flips


def crop_params(n: int, height: int, width: int, seed: int, step: int, scale: tuple[float, float] = (0.05, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = False, attempts: int = CROP_ATTEMPTS
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomResizedCrop boxes and flip signs for a batch of n images of one size: crop_boxes(crop_draws(...)).

    Returns boxes (n, 4) float as (x0, y0, w, h) in pixels and flips (n,) of +1/-1.
    """
    return crop_boxes(crop_draws(n, seed, step, scale, ratio, flip, attempts), height, width, ratio)


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
    """One split of `dataset` held in memory: CIFAR (downloaded into data_dir when missing) or any other
    dataset of train.datasets with each image resized to img_size (for modest sizes: feature extraction)."""
    from .datasets import DATASETS, open_split, prepare_data

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}")
    if download:
        prepare_data(dataset, data_dir, progress=progress)
    if dataset == "imagefolder":
        return load_imagefolder(data_dir, "train" if train else "test", img_size, classes)
    split = open_split(dataset, data_dir, "train" if train else "test", classes)
    return split if isinstance(split, ImageSet) else _materialize(split.index, split.classes, img_size)
