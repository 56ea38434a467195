"""`load_npz`: numpy `.npz` checkpoints as torch tensors, read by the C++ extension (csrc/);
`npz_index`: their names, shapes and dtypes, from the npy headers alone."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

__all__ = ["load_npz", "npz_index"]


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
            and the problem); object arrays (pickles) are refused, never unpickled.
        OSError: the file cannot be opened.
    """
    # Imported here so that `import vitcore` works (e.g. for linting) before the build.
    from . import _C

    if isinstance(keys, (str, bytes)):
        raise TypeError(f"keys must be a collection of names, not a single {type(keys).__name__}: {keys!r}")
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

    return {key: (tuple(shape), getattr(torch, dtype)) for key, shape, dtype in _C.npz_index(os.fsencode(path))}
