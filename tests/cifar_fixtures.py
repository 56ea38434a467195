"""Generated CIFAR-10-format data: real pickle batch files and a real tarball, with a learnable pattern."""

from __future__ import annotations

import os
import pickle
import tarfile

import numpy as np

__all__ = ["PALETTE", "make_cifar10", "make_cifar10_tarball"]

# One colour per class: a RandomResizedCrop keeps the colour, so even a tiny model can learn it.
PALETTE = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128],
], dtype=np.float32)


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = labels.shape[0]
    base = PALETTE[labels][:, :, None, None]  # (n, 3, 1, 1)
    # Noise and a random darker stripe so images are not constant.
    img = base + rng.normal(0, 25, size=(n, 3, 32, 32))
    rows = rng.integers(0, 28, size=n)
    for i, r in enumerate(rows):
        img[i, :, r:r + 4, :] *= 0.6
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072)  # rows channel-major, as CIFAR


def make_cifar10(data_dir: str, n_train: int = 500, n_test: int = 205, seed: int = 0) -> str:
    """Write `data_dir/cifar-10-batches-py/` (5 train batches, test_batch, batches.meta); returns the folder."""
    rng = np.random.default_rng(seed)
    root = os.path.join(data_dir, "cifar-10-batches-py")
    os.makedirs(root, exist_ok=True)
    train_labels = rng.integers(0, 10, size=n_train)
    train_data = _images(train_labels, rng)
    for b, (data, labels) in enumerate(zip(np.array_split(train_data, 5), np.array_split(train_labels, 5)), 1):
        _dump(os.path.join(root, f"data_batch_{b}"), data, labels, f"training batch {b} of 5")
    test_labels = rng.integers(0, 10, size=n_test)
    _dump(os.path.join(root, "test_batch"), _images(test_labels, rng), test_labels, "testing batch 1 of 1")
    meta = {b"num_cases_per_batch": n_train // 5, b"label_names": [n.encode() for n in _NAMES], b"num_vis": 3072}
    with open(os.path.join(root, "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


def _dump(path: str, data: np.ndarray, labels: np.ndarray, label: str) -> None:
    d = {b"batch_label": label.encode(), b"labels": [int(v) for v in labels], b"data": data,
         b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)  # the protocol of the published files


def make_cifar10_tarball(path: str, **kwargs) -> str:
    """A cifar-10-python.tar.gz laid out as the published one; returns its path."""
    src = os.path.join(os.path.dirname(path), "_src")
    root = make_cifar10(src, **kwargs)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root, arcname="cifar-10-batches-py")
    return path


_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
