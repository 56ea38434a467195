"""Helpers shared by the npz tests: array strategies, exact comparison, zip surgery."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = [
    "DTYPES",
    "TORCH_DTYPES",
    "array_dicts",
    "assert_same_arrays",
    "central_entry",
    "make_npy",
    "npy_bytes",
    "npz_bytes",
    "to_zip64",
]

# Every dtype the reader supports, in both byte orders where that means something.
DTYPES = ["f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "b1"]
TORCH_DTYPES = {
    "f2": torch.float16,
    "f4": torch.float32,
    "f8": torch.float64,
    "i1": torch.int8,
    "i2": torch.int16,
    "i4": torch.int32,
    "i8": torch.int64,
    "u1": torch.uint8,
    "b1": torch.bool,
}


@st.composite
def arrays(draw) -> np.ndarray:
    code = draw(st.sampled_from(DTYPES))
    order = draw(st.sampled_from("<>")) if code[1] != "1" else "|"
    dtype = np.dtype(order + code)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    a = draw(hnp.arrays(dtype, shape))
    return np.asfortranarray(a) if draw(st.booleans()) else a


_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789-.", min_size=1, max_size=8)
names = st.lists(_segment, min_size=1, max_size=3).map("/".join).filter(lambda n: n not in (".", ".."))


def array_dicts(max_size: int = 6):
    """Strategy: {name: array}, names with '/' in them, every dtype/order/layout above."""
    return st.dictionaries(names, arrays(), min_size=1, max_size=max_size)


def npz_bytes(arrays: dict[str, np.ndarray], compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


def make_npy(header: str, data: bytes, major: int = 1) -> bytes:
    """An npy file with an arbitrary header dict text (padded with spaces and a newline)."""
    text = header.encode()
    prefix = 10 if major == 1 else 12
    text += b" " * (-(prefix + len(text) + 1) % 64) + b"\n"
    size = struct.pack("<H", len(text)) if major == 1 else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes([major, 0]) + size + text + data


def assert_same_arrays(got: dict[str, torch.Tensor], want: dict[str, np.ndarray]) -> None:
    """Same keys, dtypes, shapes and bit-identical values (NaNs and -0.0 included)."""
    assert list(got) == list(want)
    for key, ref in want.items():
        t = got[key]
        assert t.dtype == TORCH_DTYPES[ref.dtype.str[1:]], key
        assert tuple(t.shape) == ref.shape, key
        native = ref.astype(ref.dtype.newbyteorder("="))
        assert np.ascontiguousarray(t.numpy()).tobytes() == np.ascontiguousarray(native).tobytes(), key


def central_entry(data: bytes, name: str) -> int:
    """Offset of `name`'s central directory entry (fields: flags +8, method +10, crc +16,
    compressed size +20, size +24, local header offset +42)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        start = z.start_dir
    pos = start
    while True:
        assert data[pos : pos + 4] == b"PK\x01\x02", "name not found"
        n, e, c = struct.unpack_from("<HHH", data, pos + 28)
        if data[pos + 46 : pos + 46 + n].decode() == name:
            return pos
        pos += 46 + n + e + c


def to_zip64(data: bytes, comment: bytes = b"") -> bytes:
    """Rewrites an archive's central directory with ZIP64 extra fields (sizes and offsets moved
    there, 0xFFFFFFFF in their place) and ZIP64 end records, as writers of >4 GiB files do."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos = z.infolist()
        start = z.start_dir
    body = bytearray(data[:start])
    central = bytearray()
    pos = start
    for info in infos:
        n, e, c = struct.unpack_from("<HHH", data, pos + 28)
        fixed = bytearray(data[pos : pos + 46])
        extra = struct.pack("<HHQQQ", 1, 24, info.file_size, info.compress_size, info.header_offset)
        struct.pack_into("<II", fixed, 20, 0xFFFFFFFF, 0xFFFFFFFF)
        struct.pack_into("<H", fixed, 30, len(extra))
        struct.pack_into("<I", fixed, 42, 0xFFFFFFFF)
        central += fixed + data[pos + 46 : pos + 46 + n] + extra
        pos += 46 + n + e + c
    cd_offset = len(body)
    body += central
    eocd64 = len(body)
    body += struct.pack(
        "<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(infos), len(infos), len(central), cd_offset
    )
    body += struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1)
    body += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, len(comment))
    return bytes(body + comment)
