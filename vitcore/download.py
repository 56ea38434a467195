"""Downloads that never leave a partial file under the final name, with a progress bar.

The bytes stream into `vitcore.fileio.atomic_write`'s temp file beside the target and are renamed onto it only
when complete (and md5-checked where a checksum is known), so a failure, a kill or a concurrent download never
leaves a truncated checkpoint that a later run would load. Only a missing path or a regular file is ever
replaced: a FIFO, a device, a folder or a symlink at the target is refused.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import stat
import urllib.error
import urllib.request

from .fileio import atomic_write

__all__ = ["DownloadError", "download", "md5sum", "check_replaceable"]

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that failed or did not match its md5; the message names the URL and where to put the file."""


def md5sum(path: str, chunk: int = _CHUNK) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_replaceable(path: str) -> None:
    """Raise DownloadError unless `path` is absent or a regular file (what a download may replace)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise DownloadError(f"{path} exists and is not a regular file (a link, folder, FIFO or device); "
                            "refusing to download over it: remove it or choose another path")


def download(url: str, path: str, md5: str | None = None, progress: bool = True, timeout: float = 60.0) -> str:
    """Fetch `url` (http(s) or file://) to `path` through a temp file in the same folder, renamed when complete.

    A failure (network, short read, md5) removes the temp file and leaves `path` as it was. Returns `path`.
    """
    from tqdm import tqdm  # on use: `import vitcore` itself needs no tqdm

    path = os.path.abspath(path)
    check_replaceable(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)  # so that the message's "put it at" folder exists
    by_hand = f"download it by hand and put it at {path}"
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: not a URL at all
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"cannot download {url} ({reason}); {by_hand}") from None
    received = 0
    digest = hashlib.md5()
    with response, atomic_write(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                  desc=os.path.basename(path)) as bar:
            try:
                while block := response.read(_CHUNK):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"download of {url} broke off after {received} bytes ({e!r}); nothing was "
                                    f"kept. Retry, or {by_hand}") from None
        # http.client ends a read quietly when the server closes early; checkpoints have no md5 to catch it.
        if total is not None and received != total:
            raise DownloadError(f"download of {url} ended after {received} of {total} bytes; nothing was kept. "
                                f"Retry, or {by_hand}")
        if md5 is not None and digest.hexdigest() != md5.lower():
            raise DownloadError(f"md5 mismatch for {url}: expected {md5}, got {digest.hexdigest()}; nothing was "
                                f"kept. {by_hand[0].upper()}{by_hand[1:]}")
    return path
