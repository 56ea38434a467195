"""`load_npz`: numpy `.npz` checkpoints as torch tensors, read by the C++ extension (csrc/);
`npz_index`: their names, shapes and dtypes, from the npy headers alone."""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Iterable

import torch

from .errors import NpzError

__all__ = ["load_npz", "npz_index", "check_regular_file", "is_npz"]

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_regular_file(path: str | os.PathLike) -> None:
    """Raise NpzError unless `path` is (or links to) a regular file; FileNotFoundError when it does not exist.

    Checked before anything opens the file: opening a FIFO blocks until a writer appears, and a device can
    stream forever.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = next((what for test, what in _KINDS if test(mode)), "not a file")
        raise NpzError(f"{os.fsdecode(path)}: not a regular file ({kind}); pass the path of the .npz file itself")


def load_npz(
    path: str | os.PathLike, *, keys: Iterable[str] | None = None, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Read the arrays of an `.npz` (numpy's savez / savez_compressed) as CPU tensors.

    Args:
        path: the `.npz` file.
        keys: load only these arrays (names without ".npy"); an unknown name raises NpzError.
        verify: check every member read against its CRC-32. With False, stored members are
            not read at all until their tensors are used.

    Returns:
        {name: tensor} in file order (or `keys` order). dtypes map as numpy's do (b1 -> bool,
        u1 -> uint8, f2 -> float16...); fortran-order arrays keep numpy's column-major strides.

    Stored members (np.savez, how the official checkpoints are written) in this machine's byte
    order are not copied: their tensors view a private copy-on-write memory map of the file,
    which stays mapped while any of them is alive. Writing to such a tensor changes only this
    process's copy, never the file. np.savez places most members at offsets that are not a
    multiple of their element size; torch's CPU kernels accept such unaligned tensors (as they do
    from torch.from_numpy), and `.clone()` gives aligned memory where a consumer needs it.
    Big-endian members are byte-swapped and deflated members (savez_compressed) inflated into
    fresh memory.

    Raises:
        vitcore.NpzError: the file is not a readable npz (the message names the file, the member
            and the problem); object arrays (pickles) are refused, never unpickled; a FIFO, device or
            directory is refused before it is opened.
        OSError: the file cannot be opened (FileNotFoundError when it does not exist).
    """
    # Imported here so that `import vitcore` works (e.g. for linting) before the build.
    from . import _C

    if isinstance(keys, (str, bytes)):
        raise TypeError(f"keys must be a collection of names, not a single {type(keys).__name__}: {keys!r}")
    check_regular_file(path)
    names = None if keys is None else [str(k) for k in keys]
    # Bytes, so that any file name the OS allows (even undecodable ones) reaches C++ unchanged.
    pairs = _C.load_npz(os.fsencode(path), names, bool(verify))
    return dict(pairs)


def npz_index(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the arrays of an `.npz`, from the npy headers alone.

    Reads no array data: a stored member's header comes straight from the file, a deflated
    member's by inflating just the header's bytes, however large the array. The same checks as
    `load_npz` apply to everything read (zip structure, npy header, supported dtypes, object
    arrays refused, the array's byte count against the member's size); CRCs are not checked.

    Returns:
        {name: (shape, dtype)} in file order; the keys and dtypes `load_npz` would give.

    Raises:
        vitcore.NpzError: the file is not a readable npz; OSError: it cannot be opened.
    """
    from . import _C

    check_regular_file(path)
    return {key: (tuple(shape), getattr(torch, dtype)) for key, shape, dtype in _C.npz_index(os.fsencode(path))}


def is_npz(path: str | os.PathLike) -> bool:
    """Whether `path` is a regular file holding an npz archive (a zip whose members are all `.npy` arrays).

    Decided by the contents, not the name: a `torch.save` file is a zip too, but of `data.pkl` and tensor blobs.
    Reads the zip directory only.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) or not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)
