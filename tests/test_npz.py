"""vitcore.load_npz (the C++ reader): round trips against numpy, errors, zero-copy, layouts;
npz_index (its header-only pass)."""

from __future__ import annotations

import gc
import io
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np
import pytest
import reference_vit as ref
import torch
from hypothesis import given
from hypothesis import strategies as st
from npz_util import (
    TORCH_DTYPES,
    assert_same_arrays,
    central_entry,
    make_npy,
    npy_bytes,
    npz_bytes,
    to_zip64,
)
from npz_util import array_dicts as array_dicts_strategy

import vitcore
from vitcore import NpzError, load_npz
from vitcore.checkpoint import _npz_index
from vitcore.npz import npz_index


def write(tmp_path, data: bytes, name: str = "f.npz") -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def numpy_load(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def zip_of(members: dict[str, bytes], compressed: bool = False) -> bytes:
    """An archive with hand-made member bytes (how damaged npy content is planted)."""
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
@given(arrays=array_dicts_strategy())
def test_round_trip_matches_numpy(tmp_path_factory, compressed, arrays):
    path = write(tmp_path_factory.mktemp("rt"), npz_bytes(arrays, compressed))
    want = numpy_load(path)
    assert_same_arrays(load_npz(path), want)
    assert_same_arrays(load_npz(path, verify=False), want)


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_edge_shapes_dtypes_and_layouts(tmp_path, compressed):
    # The cases hypothesis may or may not reach in 6 examples, spelled out.
    arrays = {
        "scalar": np.array(2.5, dtype=">f8"),
        "empty": np.zeros((0, 3), dtype="<i4"),
        "empty/fortran": np.asfortranarray(np.zeros((2, 0, 3), dtype=">i2")),
        "fortran": np.asfortranarray(np.arange(24, dtype="<f4").reshape(2, 3, 4)),
        "fortran/big": np.asfortranarray(np.arange(6, dtype=">i8").reshape(3, 2)),
        "half": np.array([1.5, -0.0, np.inf, np.nan], dtype="<f2"),
        "bool": np.array([[True, False]]),
        "u1": np.arange(250, 256, dtype=np.uint8),
        "i1": np.array([-128, 127], dtype=np.int8),
    }
    path = write(tmp_path, npz_bytes(arrays, compressed))
    got = load_npz(path)
    assert_same_arrays(got, numpy_load(path))
    assert got["fortran"].stride() == (1, 2, 6)  # numpy's column-major layout, not a copy
    assert got["bool"].dtype == torch.bool and got["half"].dtype == torch.float16 and got["u1"].dtype == torch.uint8


@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=6), pad=st.integers(0, 7))
def test_crc_of_many_lengths_and_offsets(tmp_path_factory, sizes, pad):
    # Odd lengths and shifting offsets exercise every path of the CRC (SIMD folds and tails):
    # a wrong CRC would make verify=True fail on these intact files.
    rng = np.random.default_rng(len(sizes) * 31 + pad)
    arrays = {"p" * (pad + 1) + str(i): rng.integers(0, 256, n, dtype=np.uint8) for i, n in enumerate(sizes)}
    for compressed in (False, True):
        path = write(tmp_path_factory.mktemp("crc"), npz_bytes(arrays, compressed))
        assert_same_arrays(load_npz(path, verify=True), numpy_load(path))


def test_large_members_cross_chunk_boundaries(tmp_path):
    # Stored members are read in 4 MiB tasks on several threads; one odd-sized member spanning
    # three tasks, misaligned (viewed) and big-endian (swapped), must still match exactly.
    rng = np.random.default_rng(1)
    arrays = {
        "a": rng.standard_normal(2_500_001).astype("<f4"),  # 10 MB
        "bb": rng.standard_normal(1_300_000).astype(">f8"),  # 10.4 MB, swapped
        "ccc": rng.integers(0, 255, 9_000_003, dtype=np.uint8),
    }
    for compressed in (False, True):
        path = write(tmp_path, npz_bytes(arrays, compressed), f"big{compressed}.npz")
        assert_same_arrays(load_npz(path), numpy_load(path))


def test_official_vit_layout_loads_every_key(tmp_path):
    # A small ViT in the original imagenet21k layout: pre-linen names, pre_logits, HWIO and (D, heads, head_dim).
    cfg = vitcore.ViTConfig(patch_size=4, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, representation_size=32)
    arrays = ref.to_pre_linen(ref.random_params(cfg, 16, 7, np.random.default_rng(0)))
    path = write(tmp_path, npz_bytes(arrays, compressed=False))
    got = load_npz(path)
    assert set(got) == set(arrays)
    assert got["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"].shape == (32, 2, 16)
    assert got["embedding/kernel"].shape == (4, 4, 3, 32)
    assert_same_arrays(got, numpy_load(path))


def test_keys_selects_members_in_requested_order(tmp_path):
    arrays = {"a/x": np.arange(3), "b": np.ones((2, 2), np.float32), "c": np.zeros(1, np.int8)}
    path = write(tmp_path, npz_bytes(arrays, compressed=False))
    got = load_npz(path, keys=["c", "a/x", "c"])
    assert list(got) == ["c", "a/x"]
    assert torch.equal(got["a/x"], torch.arange(3))


def test_zip64_records_and_extra_fields_and_trailing_comment(tmp_path):
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n/b": np.array([True, False])}
    for compressed in (False, True):
        data = to_zip64(npz_bytes(arrays, compressed), comment=b"a trailing comment")
        path = write(tmp_path, data, f"z{compressed}.npz")
        want = numpy_load(path)  # zipfile agrees that the hand-made file is valid
        assert_same_arrays(load_npz(path), want)
        # A comment holding the end record's signature fools zipfile, not this reader.
        tricky = to_zip64(npz_bytes(arrays, compressed), comment=b"PK\x05\x06 looks like an end record")
        assert_same_arrays(load_npz(write(tmp_path, tricky, f"t{compressed}.npz")), want)


def test_npy_versions_2_and_3_and_python2_longs(tmp_path):
    a = np.arange(6, dtype="<i2").reshape(2, 3)
    header = "{'descr': '<i2', 'fortran_order': False, 'shape': (2, 3), }"
    members = {f"v{major}.npy": make_npy(header, a.tobytes(), major) for major in (1, 2, 3)}
    # Files written by numpy under Python 2 carry shapes such as (2L, 3L).
    members["py2.npy"] = make_npy(header.replace("(2, 3)", "(2L, 3L)"), a.tobytes())
    members["dq.npy"] = make_npy(header.replace("'", '"'), a.tobytes())
    path = write(tmp_path, zip_of(members))
    got = load_npz(path)
    assert list(got) == ["v1", "v2", "v3", "py2", "dq"]
    for key, t in got.items():
        assert torch.equal(t, torch.from_numpy(a)), key


def test_non_npy_members_are_skipped(tmp_path):
    path = write(tmp_path, zip_of({"readme.txt": b"hello", "a.npy": npy_bytes(np.arange(2))}))
    assert list(load_npz(path)) == ["a"]


# ---------------------------------------------------------------- zero copy


def test_stored_members_view_one_mapping_of_the_file(tmp_path):
    # Stored native-order members are views, aligned or not (np.savez's offsets are arbitrary):
    # their pointers differ by exactly the distance between their data in the file.
    arrays = {"first": np.arange(100, dtype=np.float32), "second": np.arange(50, dtype=np.float64) / 3}
    path = write(tmp_path, npz_bytes(arrays, compressed=False))
    offsets = {}
    with zipfile.ZipFile(path) as z:
        raw = open(path, "rb").read()
        for info in z.infolist():
            n, e = struct.unpack_from("<HH", raw, info.header_offset + 26)
            start = info.header_offset + 30 + n + e
            offsets[info.filename[:-4]] = start + raw[start:].index(b"\n") + 1
    got = load_npz(path, verify=False)
    delta = got["second"].data_ptr() - got["first"].data_ptr()
    assert delta == offsets["second"] - offsets["first"]
    # At least one of them is misaligned for its element size, and its values are still numpy's.
    assert any(got[k].data_ptr() % got[k].element_size() for k in got)
    for k, a in arrays.items():
        assert torch.equal(got[k], torch.from_numpy(a))
        assert torch.equal(got[k] * 2 + 1, torch.from_numpy(a * 2 + 1))


def test_view_outlives_dict_and_deleted_file_and_writes_stay_private(tmp_path):
    arrays = {"w": np.arange(4096, dtype=np.uint8)}
    path = write(tmp_path, npz_bytes(arrays, compressed=False))
    t = load_npz(path)["w"]
    gc.collect()
    os.remove(path)  # the mapping keeps the inode alive
    assert torch.equal(t, torch.arange(4096).to(torch.uint8))
    t.add_(1)  # copy-on-write: no crash, and the file's bytes are untouched
    assert int(t[0]) == 1
    path2 = write(tmp_path, npz_bytes(arrays, compressed=False), "again.npz")
    u = load_npz(path2)["w"]
    u.zero_()
    assert int(load_npz(path2)["w"][5]) == 5


def _rss_of_mapping(address: int) -> int:
    """Resident bytes of the mapping that contains `address` (Linux /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("address not mapped")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
def test_verify_false_reads_nothing_until_used(tmp_path):
    n = 32 << 20
    path = write(tmp_path, npz_bytes({"big": np.ones(n, np.uint8)}, compressed=False))
    t = load_npz(path, verify=False)["big"]
    before = _rss_of_mapping(t.data_ptr())
    # Only the pages around the headers were touched (the kernel maps whole page-cache folios
    # of up to 2 MiB around each fault, hence the slack).
    assert before <= (8 << 20), before
    assert int(t.sum()) == n
    assert _rss_of_mapping(t.data_ptr()) >= n // 2


def test_verify_false_skips_the_crc(tmp_path):
    data = bytearray(npz_bytes({"a": np.zeros(64, np.uint8)}, compressed=False))
    data[data.index(bytes(64)) + 3] ^= 0xFF  # a data byte: the CRC no longer matches
    path = write(tmp_path, bytes(data))
    with pytest.raises(NpzError, match="CRC-32 mismatch"):
        load_npz(path)
    assert int(load_npz(path, verify=False)["a"].sum()) == 0xFF


# ---------------------------------------------------------------- errors


def assert_error(path: str, pattern: str, member: str | None = None, **kwargs) -> None:
    with pytest.raises(NpzError, match=pattern) as info:
        load_npz(path, **kwargs)
    msg = str(info.value)
    assert msg.startswith(path), msg
    if member is not None:
        assert f"member '{member}'" in msg, msg


def test_error_not_a_zip(tmp_path):
    assert_error(write(tmp_path, b"hello, this is not a zip file at all" * 3), "not a zip file")
    assert_error(write(tmp_path, b"", "empty.npz"), "empty")
    assert_error(write(tmp_path, b"PK\x05\x06", "short.npz"), "too short")


def test_error_truncated(tmp_path):
    data = npz_bytes({"a": np.arange(100)}, compressed=False)
    assert_error(write(tmp_path, data[: len(data) // 2]), "not a zip file \\(or truncated\\)")


def test_error_offset_outside_file(tmp_path):
    data = bytearray(npz_bytes({"a": np.arange(10)}, compressed=False))
    struct.pack_into("<I", data, central_entry(bytes(data), "a.npy") + 42, 0x7FFFFFF0)
    assert_error(write(tmp_path, bytes(data)), "local header offset 2147483632 is outside the file", "a.npy")


def test_error_data_past_end_of_file(tmp_path):
    data = bytearray(npz_bytes({"a": np.arange(10)}, compressed=False))
    entry = central_entry(bytes(data), "a.npy")
    struct.pack_into("<II", data, entry + 20, 1 << 30, 1 << 30)
    assert_error(write(tmp_path, bytes(data)), "runs past the end of the file", "a.npy")


def test_error_shape_needs_more_bytes_than_member_holds(tmp_path):
    data = np.arange(3, dtype="<f4").tobytes()
    bad = make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (9,), }", data)
    assert_error(write(tmp_path, zip_of({"a.npy": bad})), r"needs 36 bytes but the member holds 12", "a.npy")
    assert_error(write(tmp_path, zip_of({"c.npy": bad}, compressed=True), "c.npz"), "needs 36 bytes", "c.npy")
    # A shape whose byte count overflows must be caught before anything is allocated for it.
    huge = make_npy(f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({2**40}, {2**40}), }}", data)
    assert_error(write(tmp_path, zip_of({"h.npy": huge}), "h.npz"), "overflows", "h.npy")
    assert_error(write(tmp_path, zip_of({"h.npy": huge}, compressed=True), "hc.npz"), "overflows", "h.npy")


@pytest.mark.parametrize(
    "array, descr",
    [(np.zeros(2, np.complex64), "<c8"), (np.array(["ab", "c"]), "<U2"), (np.zeros(2, np.uint16), "<u2")],
)
def test_error_unsupported_dtype(tmp_path, array, descr):
    path = write(tmp_path, npz_bytes({"x": array}, compressed=False))
    assert_error(path, f"unsupported dtype '{descr}'", "x.npy")


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_error_object_arrays_are_refused_never_unpickled(tmp_path):
    marker = os.path.join(tmp_path, "pwned")
    obj = np.empty(1, dtype=object)
    obj[0] = _Tripwire(marker)
    buf = io.BytesIO()
    np.savez(buf, evil=obj)  # savez pickles object arrays
    assert pickle.dumps(obj[0])  # the pickle would really run open() if loaded
    path = write(tmp_path, buf.getvalue())
    assert_error(path, "object arrays are pickles", "evil.npy")
    assert_error(path, "object arrays are pickles", "evil.npy", verify=False)
    assert not os.path.exists(marker)


def test_error_crc_mismatch(tmp_path):
    arrays = {"a": np.arange(1000, dtype=np.float32)}
    for compressed in (False, True):
        data = bytearray(npz_bytes(arrays, compressed))
        struct.pack_into("<I", data, central_entry(bytes(data), "a.npy") + 16, 0x12345678)
        path = write(tmp_path, bytes(data), f"c{compressed}.npz")
        assert_error(path, "CRC-32 mismatch: the zip says 12345678", "a.npy")


def _deflated_member_with_size(payload: bytes, claimed: int) -> bytes:
    """A deflated member whose zip size field says `claimed` instead of len(payload)."""
    data = bytearray(zip_of({"a.npy": payload}, compressed=True))
    struct.pack_into("<I", data, central_entry(bytes(data), "a.npy") + 24, claimed)
    return bytes(data)


def test_error_inflated_size_differs_from_header(tmp_path):
    good = npy_bytes(np.arange(4, dtype="<f4"))
    short = good[:-4]  # the header promises 16 bytes of data, the stream holds 12
    assert_error(write(tmp_path, _deflated_member_with_size(short, len(good))), "inflated size", "a.npy")
    longer = good + b"\0" * 4  # 4 bytes more than the header's shape needs
    path = write(tmp_path, _deflated_member_with_size(longer, len(good)), "long.npz")
    assert_error(path, "inflates to more than", "a.npy")


def test_error_missing_key_lists_available(tmp_path):
    path = write(tmp_path, npz_bytes({"alpha": np.zeros(1), "beta/x": np.zeros(1)}, compressed=False))
    assert_error(path, r"no array named 'gamma'; available: 'alpha', 'beta/x'", keys=["gamma"])


def test_error_unsupported_compression_and_bad_header(tmp_path):
    data = bytearray(npz_bytes({"a": np.zeros(3)}, compressed=False))
    struct.pack_into("<H", data, central_entry(bytes(data), "a.npy") + 10, 12)  # bzip2
    assert_error(write(tmp_path, bytes(data)), "unsupported zip compression method 12", "a.npy")
    good = npy_bytes(np.zeros(3))
    assert_error(write(tmp_path, zip_of({"m.npy": b"\x93NUMPX" + good[6:]}), "m.npz"), "bad magic", "m.npy")
    assert_error(write(tmp_path, zip_of({"v.npy": good[:6] + b"\x04\x00" + good[8:]}), "v.npz"), "version 4.0")
    code = make_npy("{'descr': '<f8', 'fortran_order': __import__('os'), 'shape': (3,), }", good[-24:])
    assert_error(write(tmp_path, zip_of({"e.npy": code}), "e.npz"), "fortran_order is not True or False")
    not_tuple = make_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (3), }", good[-24:])
    assert_error(write(tmp_path, zip_of({"t.npy": not_tuple}), "t.npz"), r"shape \(3\) is not a tuple")
    listed = make_npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,), }", good[-12:])
    assert_error(write(tmp_path, zip_of({"s.npy": listed}), "s.npz"), "structured dtypes are not supported")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_npz(os.path.join(tmp_path, "nope.npz"))
    assert_error(str(tmp_path), "not a regular file")
    with pytest.raises(TypeError, match="collection of names"):
        load_npz(write(tmp_path, npz_bytes({"a": np.zeros(1)}, False)), keys="a")


def test_error_class_is_exported_value_error():
    assert vitcore.NpzError is NpzError and issubclass(NpzError, ValueError)


def test_zlib_reference_crc_is_what_the_zip_holds(tmp_path):
    # Guards the test helpers' assumption that zip CRCs are zlib.crc32 of the npy bytes.
    payload = npy_bytes(np.arange(7, dtype=np.int64))
    data = zip_of({"a.npy": payload})
    assert struct.unpack_from("<I", data, central_entry(data, "a.npy") + 16)[0] == zlib.crc32(payload)


# ---------------------------------------------------------------- npz_index (headers only)


def assert_index_error(path: str, pattern: str, member: str | None = None) -> None:
    with pytest.raises(NpzError, match=pattern) as info:
        npz_index(path)
    msg = str(info.value)
    assert msg.startswith(path), msg
    if member is not None:
        assert f"member '{member}'" in msg, msg


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
@given(arrays=array_dicts_strategy())
def test_index_matches_numpy(tmp_path_factory, compressed, arrays):
    path = write(tmp_path_factory.mktemp("ix"), npz_bytes(arrays, compressed))
    want = {k: (a.shape, TORCH_DTYPES[a.dtype.str[1:]]) for k, a in numpy_load(path).items()}
    got = npz_index(path)
    assert list(got) == list(want) and got == want
    assert _npz_index(path) == {k: shape for k, (shape, _) in want.items()}


def test_index_skips_non_npy_members_and_keeps_the_last_duplicate(tmp_path):
    a, b = npy_bytes(np.zeros((2, 3), "<f4")), npy_bytes(np.zeros(5, ">i2"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("notes.txt", b"not an array")
        z.writestr("a.npy", a)
        z.writestr("a.npy", b)
    path = write(tmp_path, buf.getvalue())
    assert npz_index(path) == {"a": ((5,), torch.int16)}
    assert {k: (tuple(t.shape), t.dtype) for k, t in load_npz(path).items()} == npz_index(path)


def test_index_reads_no_stored_data(tmp_path):
    data = bytearray(npz_bytes({"a": np.zeros((8, 8), np.uint8)}, compressed=False))
    data[data.index(bytes(64)) + 3] ^= 0xFF  # a data byte: the CRC no longer matches
    path = write(tmp_path, bytes(data))
    assert npz_index(path) == {"a": ((8, 8), torch.uint8)}
    with pytest.raises(NpzError, match="CRC-32 mismatch"):
        load_npz(path)


def test_index_inflates_only_the_header_of_a_huge_member(tmp_path):
    # A member that claims 1 GiB inflated: its npy header, then a stored block of 1000 bytes, then
    # an invalid block type. Only load_npz, which inflates the data, can reach the damage.
    n = 1 << 28
    header = make_npy(f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({n},), }}", b"")
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    stream = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    stream += b"\x00" + struct.pack("<HH", 1000, 0xFFFF ^ 1000) + bytes(1000)  # stored, not final
    stream += b"\x07" + bytes((4 * n) // 1000)  # final block of the reserved type 3: corrupt
    data = bytearray(zip_of({"big.npy": stream}))  # stored, then relabelled as deflated below
    entry = central_entry(bytes(data), "big.npy")
    local = struct.unpack_from("<I", data, entry + 42)[0]
    for method_at, size_at in ((entry + 10, entry + 24), (local + 8, local + 22)):
        struct.pack_into("<H", data, method_at, 8)
        struct.pack_into("<I", data, size_at, len(header) + 4 * n)
    path = write(tmp_path, bytes(data))
    assert npz_index(path) == {"big": ((n,), torch.float32)}
    with pytest.raises(NpzError, match="corrupt deflate stream"):
        load_npz(path)


def test_index_errors(tmp_path):
    good = npy_bytes(np.zeros(3))
    for compressed in (False, True):
        tag = "c" if compressed else "s"
        bad_magic = write(tmp_path, zip_of({"m.npy": b"\x93NUMPX" + good[6:]}, compressed), f"m{tag}.npz")
        assert_index_error(bad_magic, "bad magic", "m.npy")
        junk = make_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }x", good[-24:])
        assert_index_error(write(tmp_path, zip_of({"j.npy": junk}, compressed), f"j{tag}.npz"), "junk", "j.npy")
        short = make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (9,), }", bytes(12))
        path = write(tmp_path, zip_of({"a.npy": short}, compressed), f"a{tag}.npz")
        assert_index_error(path, "needs 36 bytes but the member holds 12", "a.npy")
        assert_index_error(
            write(tmp_path, npz_bytes({"x": np.zeros(2, np.complex64)}, compressed), f"x{tag}.npz"),
            "unsupported dtype '<c8'",
            "x.npy",
        )
        obj = np.empty(1, dtype=object)
        evil = write(tmp_path, npz_bytes({"evil": obj}, compressed), f"o{tag}.npz")
        assert_index_error(evil, "object arrays are pickles", "evil.npy")
        with pytest.raises(NpzError, match="object arrays are pickles"):
            _npz_index(evil)
    # A deflated member whose zip size disagrees with what its header implies.
    longer = write(tmp_path, _deflated_member_with_size(good, len(good) + 4), "long.npz")
    assert_index_error(longer, "needs 24 bytes but the member holds 28", "a.npy")
    data = bytearray(npz_bytes({"a": np.zeros(3)}, compressed=False))
    struct.pack_into("<H", data, central_entry(bytes(data), "a.npy") + 10, 12)  # bzip2
    assert_index_error(write(tmp_path, bytes(data), "bz.npz"), "unsupported zip compression method 12", "a.npy")
    data = npz_bytes({"a": np.arange(100)}, compressed=False)
    assert_index_error(write(tmp_path, data[: len(data) // 2], "t.npz"), "not a zip file")
    with pytest.raises(FileNotFoundError):
        npz_index(os.path.join(tmp_path, "nope.npz"))
