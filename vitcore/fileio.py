"""The one way vitcore writes a file: to a temp file in the same folder, fsync, then rename.

A reader (or a run killed half-way, even with SIGKILL) therefore sees either the old file or the whole
new one, never a prefix. The result carries the permissions a plain `open(path, "w")` would give
(0666 minus the umask), not mkstemp's private 0600, so a colleague or a CI reader can open it.
Temp names are `<name>.<random>.tmp` beside the target, which is what `remove_stale_temps` cleans.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterator
from typing import IO

__all__ = ["TEMP_SUFFIX", "atomic_write", "remove_stale_temps", "umask_mode"]

TEMP_SUFFIX = ".tmp"


def umask_mode() -> int:
    """The mode a newly created regular file gets from the current umask (0666 & ~umask)."""
    # os.umask can only be read by setting it; set it straight back (the window is one syscall).
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO]:
    """Open a temp file beside `path` for writing; on a clean exit fsync it and rename it onto `path`.

    On any exception (including KeyboardInterrupt) the temp file is removed and `path` is untouched.
    `mode` is "wb" or "w"; text mode uses `encoding` (default utf-8).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=TEMP_SUFFIX, dir=folder)
    try:
        os.fchmod(fd, umask_mode())
        if mode == "w":
            f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline="")
        else:
            f = os.fdopen(fd, "wb")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # same folder, so one filesystem: an atomic rename
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def remove_stale_temps(path: str) -> list[str]:
    """Remove temp files a killed writer of `path` left behind (`<name>.*.tmp` beside it); returns them."""
    folder = os.path.dirname(os.path.abspath(path))
    pattern = os.path.join(glob.escape(folder), glob.escape(os.path.basename(path)) + ".*" + TEMP_SUFFIX)
    removed = []
    for stale in glob.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
            removed.append(stale)
    return removed
