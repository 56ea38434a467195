"""Downloads: CIFAR tarballs and official checkpoints, md5-checked, never a partial file under the final name."""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import tempfile
import urllib.error
import urllib.request

from tqdm import tqdm

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

CHECKPOINT_BASE_URL = "https://storage.googleapis.com/vit_models/imagenet21k/"

# dataset -> (url, md5, folder inside the tarball); as published on https://www.cs.toronto.edu/~kriz/cifar.html
CIFAR = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
}


class DownloadError(RuntimeError):
    """A download that failed or did not match its md5; the message says where to put the file by hand."""


def md5sum(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, path: str, md5: str | None = None, progress: bool = True, timeout: float = 60.0) -> str:
    """Fetch `url` to `path` via a temp file in the same folder, check `md5`, then rename into place.

    A failure (network, md5) removes the temp file, so `path` exists only when complete and verified.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    # Same folder as the target: os.replace is then an atomic rename on one filesystem.
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise DownloadError(f"cannot download {url} ({reason}); download it by hand and put it at {path}") \
                    from None
            received = 0
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                          desc=os.path.basename(path)) as bar:
                    try:
                        while block := response.read(1 << 20):
                            out.write(block)
                            received += len(block)
                            bar.update(len(block))
                    except (OSError, http.client.HTTPException) as e:
                        raise DownloadError(f"download of {url} broke off after {received} bytes ({e!r}); nothing "
                                            f"was kept. Retry, or download it by hand and put it at {path}") from None
            # http.client ends a read quietly when the server closes early; checkpoints have no md5 to catch it.
            if total is not None and received != total:
                raise DownloadError(f"download of {url} ended after {received} of {total} bytes; nothing was kept. "
                                    f"Retry, or download it by hand and put it at {path}")
        if md5 is not None:
            got = md5sum(tmp)
            if got != md5.lower():
                raise DownloadError(f"md5 mismatch for {url}: expected {md5}, got {got}; nothing was kept. "
                                    f"Download it by hand and put it at {path}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


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
    """The official imagenet21k file of a zoo config; our `R50-ViT-B_16` is published as `R50+ViT-B_16`."""
    return CHECKPOINT_BASE_URL + model_type.replace("R50-ViT", "R50+ViT") + ".npz"


def ensure_checkpoint(model_type: str, path: str, progress: bool = True) -> str:
    """`path` if it exists, else the official checkpoint downloaded there."""
    if os.path.isfile(path):
        return path
    return download(checkpoint_url(model_type), path, md5=None, progress=progress)
