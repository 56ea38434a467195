"""Downloads of the training data (CIFAR tarballs, md5-checked, extracted safely) and the default checkpoint.

The download itself (temp file renamed when complete, progress bar, one-line errors) is `vitcore.download`;
the names below stay importable from here for the dataset code and older callers.
"""

from __future__ import annotations

import os
import tarfile

from vitcore import sources
from vitcore.download import DownloadError, download, md5sum

__all__ = [
    "DownloadError",
    "CIFAR",
    "CHECKPOINT_BASE_URL",
    "checkpoint_url",
    "download",
    "md5sum",
    "safe_extract",
    "ensure_cifar",
    "ensure_checkpoint",
]

# The official bucket's imagenet21k folder ($VITCORE_MODELS_URL replaces the base; see vitcore.sources).
CHECKPOINT_BASE_URL = sources.DEFAULT_BASE_URL + "/imagenet21k/"

# dataset -> (url, md5, folder inside the tarball); as published on https://www.cs.toronto.edu/~kriz/cifar.html
CIFAR = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
}


def safe_extract(archive: str, dest: str) -> None:
    """Extract a tar archive into `dest`, refusing members that would land outside it or are links/devices."""
    dest = os.path.realpath(dest)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            target = os.path.realpath(os.path.join(dest, m.name))
            if os.path.commonpath([dest, target]) != dest:
                raise DownloadError(f"{archive}: member {m.name!r} would be written outside {dest}; refusing")
            if not (m.isfile() or m.isdir()):
                raise DownloadError(f"{archive}: member {m.name!r} is a link or special file; refusing")
        tar.extractall(dest, members=members, filter="data")


def ensure_cifar(dataset: str, data_dir: str, url: str | None = None, md5: str | None = None,
                 progress: bool = True) -> str:
    """The extracted CIFAR folder under `data_dir`; downloaded and extracted first when missing."""
    default_url, default_md5, folder = CIFAR[dataset]
    url, md5 = url or default_url, md5 or default_md5
    root = os.path.join(data_dir, folder)
    if os.path.isdir(root):
        return root  # an existing directory is used as is: works offline
    archive = os.path.join(data_dir, os.path.basename(url))
    if not (os.path.isfile(archive) and md5sum(archive) == md5):
        download(url, archive, md5, progress=progress)
    safe_extract(archive, data_dir)
    if not os.path.isdir(root):
        raise DownloadError(f"{archive} did not contain {folder}/")
    return root


def checkpoint_url(model_type: str) -> str:
    """The official imagenet21k file of a zoo name or alias (`R50-ViT-B_16` is published as `R50+ViT-B_16`)."""
    return sources.locate(sources.default_spec(model_type)).url


def ensure_checkpoint(model_type: str, path: str, progress: bool = True) -> str:
    """`path` if it is a file, else the model's imagenet21k checkpoint downloaded there (a non-regular file at
    `path` is refused, never replaced)."""
    where = sources.locate(sources.default_spec(model_type))
    return sources.fetch(sources.Pretrained(where.spec, path, where.url), progress)
