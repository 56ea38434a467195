"""Unpickling with an allow-list: CIFAR's batches are pickles, and a swapped file must not run code."""

from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

__all__ = ["DatasetFileError", "UnsafePickleError", "check_cifar_batch", "read_dataset_pickle", "safe_load",
           "safe_loads"]


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


class DatasetFileError(ValueError):
    """A dataset file that does not have its format's structure: the message names the file and what is wrong."""


def read_dataset_pickle(path: str) -> dict:
    """A dataset pickle (a CIFAR batch or meta file) as a dict, through the allow-list; every failure names `path`."""
    try:
        with open(path, "rb") as f:
            d = safe_load(f, encoding="bytes")
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DatasetFileError(f"{path} is not a readable pickle (truncated or damaged: {type(e).__name__}: {e}); "
                               "delete it and the dataset is downloaded again") from None
    if not isinstance(d, dict):
        raise DatasetFileError(f"{path}: expected a dict in a CIFAR batch, got a {type(d).__name__}")
    return d


def check_cifar_batch(path: str, d: dict, label_key: bytes, num_classes: int) -> None:
    """Raise DatasetFileError unless `d` is a CIFAR batch: `data` (n, 3072) uint8 and n labels in [0, num_classes)."""
    import numpy as np

    missing = [k.decode() for k in (b"data", label_key) if k not in d]
    if missing:
        held = ", ".join(repr(k) for k in list(d)[:8])
        raise DatasetFileError(f"{path}: not a CIFAR batch: no {' or '.join(missing)} entry (it holds {held})")
    data, labels = d[b"data"], d[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        what = (f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else f"a {type(data).__name__}")
        raise DatasetFileError(f"{path}: not a CIFAR batch: 'data' is {what}, not an (n, 3072) uint8 array "
                               "(swapped entries?)")
    if data.shape[1] != 3 * 32 * 32:
        raise DatasetFileError(f"{path}: not a CIFAR batch: its image rows are {data.shape[1]} values wide, CIFAR's "
                               "are 3072 (3 x 32 x 32)")
    try:
        values = np.asarray(labels)
    except (ValueError, TypeError):
        values = None
    if values is None or values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
        raise DatasetFileError(f"{path}: not a CIFAR batch: {label_key.decode()!r} is not a list of integer labels")
    if len(values) != len(data):
        raise DatasetFileError(f"{path}: not a CIFAR batch: {len(data)} images but {len(values)} labels "
                               "(truncated?)")
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        bad = int(values[(values < 0) | (values >= num_classes)][0])
        raise DatasetFileError(f"{path}: label {bad} is out of range: this dataset has classes 0..{num_classes - 1}")
