"""Unpickling with an allow-list: CIFAR's batches are pickles, and a swapped file must not run code."""

from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

__all__ = ["UnsafePickleError", "safe_load", "safe_loads"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list."""


# Globals a numpy array (any protocol, python 2 or 3 writer) needs to reconstruct; nothing else is importable.
# dict, list, tuple, bytes, str, int and float are pickle opcodes and never reach find_class.
_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),  # protocol 5 arrays
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Python 3 writes bytes at protocol <= 2 as _codecs.encode(str, "latin1"): a pure conversion.
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Files written by numpy < 2 (CIFAR's own) name numpy.core; numpy 2 moved it to numpy._core.
        canonical = "numpy._core" + module[len("numpy.core"):] if module.startswith("numpy.core") else module
        if (canonical, name) not in _ALLOWED:
            raise UnsafePickleError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays, dicts, lists, bytes, str "
                "and numbers are allowed (is this file really a dataset batch?)"
            )
        return super().find_class(canonical, name)


def safe_load(f: BinaryIO, encoding: str = "bytes") -> Any:
    """Unpickle from a binary file; `encoding='bytes'` keeps python 2 strings as bytes, as CIFAR expects."""
    obj = _RestrictedUnpickler(f, encoding=encoding).load()
    _reject_object_arrays(obj)
    return obj


def safe_loads(data: bytes, encoding: str = "bytes") -> Any:
    """Unpickle from bytes with the allow-list."""
    return safe_load(io.BytesIO(data), encoding=encoding)


def _reject_object_arrays(obj: Any) -> None:
    # An object-dtype array is a container of pickled objects; a dataset batch never has one.
    import numpy as np

    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise UnsafePickleError("refusing an object-dtype numpy array in a dataset pickle")
    if isinstance(obj, dict):
        for v in obj.values():
            _reject_object_arrays(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _reject_object_arrays(v)
