"""Dataset layouts (train.datasets): image folders with and without val/, ImageNet's train/val, Oxford-IIIT Pets and
Flowers-102 from fixture archives in their real layouts served from 127.0.0.1, the stratified --val_split holdout,
and the empty or non-image files the index refuses before training starts."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import tarfile
import threading

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from train.args import UsageError
from train.data import ImageSet
from train.datasets import (
    DOWNLOADS,
    check_header,
    ensure_dataset,
    holdout_split,
    open_dataset,
    open_split,
    prepare_data,
)
from train.download import DownloadError
from train.streaming import BadImageError, StreamSet


def _jpeg(path, value: int = 128, size=(20, 16)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path, "JPEG")


def _tree(root, spec: dict[str, dict[str, int]], ext: str = ".jpg") -> str:
    """spec: {split: {class: n_images}} -> root/split/class/i<ext>."""
    for split, classes in spec.items():
        for k, (cls, n) in enumerate(classes.items()):
            for i in range(n):
                _jpeg(os.path.join(root, split, cls, f"{cls}_{i}{ext}"), 20 * k)
    return str(root)


# ---------------------------------------------------------------- image folders


def test_imagefolder_with_val_folder(tmp_path):
    root = _tree(tmp_path, {"train": {"cat": 5, "dog": 3}, "val": {"cat": 2, "dog": 1}, "test": {"dog": 2}})
    os.makedirs(tmp_path / "train" / "cat" / "nested")
    _jpeg(tmp_path / "train" / "cat" / "nested" / "deep.jpeg")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image, not an image name: ignored")
    (tmp_path / "train" / "dog" / "._dog_0.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden
    s = open_dataset("imagefolder", root, num_workers=0)
    assert s.classes == ["cat", "dog"]
    assert isinstance(s.train, StreamSet) and (len(s.train), len(s.val), len(s.test)) == (9, 3, 2)
    assert s.train.labels.tolist() == [0] * 6 + [1] * 3 and s.test.labels.tolist() == [1, 1]
    assert os.path.join("cat", "nested", "deep.jpeg") in s.train.index.path(5)
    with pytest.raises(UsageError, match="own validation split"):
        open_dataset("imagefolder", root, val_split=0.1)


def test_imagefolder_val_split_is_stratified_disjoint_and_seeded(tmp_path):
    root = _tree(tmp_path, {"train": {"a": 50, "b": 30, "c": 20}, "test": {"a": 1}})
    s = open_dataset("imagefolder", root, val_split=0.1, seed=3)
    val_labels = s.val.labels.tolist()
    assert [val_labels.count(c) for c in range(3)] == [5, 3, 2]  # 10% of each class
    train_paths = {s.train.index.path(i) for i in range(len(s.train))}
    val_paths = {s.val.index.path(i) for i in range(len(s.val))}
    assert not train_paths & val_paths and len(train_paths | val_paths) == 100
    again = open_dataset("imagefolder", root, val_split=0.1, seed=3)
    assert [again.val.index.path(i) for i in range(10)] == [s.val.index.path(i) for i in range(10)]
    other = open_dataset("imagefolder", root, val_split=0.1, seed=4)
    assert {other.val.index.path(i) for i in range(10)} != val_paths


@given(st.lists(st.integers(0, 4), min_size=2, max_size=200), st.floats(0.01, 0.9), st.integers(0, 5))
def test_holdout_split_partitions_each_class(labels, fraction, seed):
    labels = np.array(labels)
    try:
        train, val = holdout_split(labels, fraction, seed)
    except UsageError as e:
        assert "holds out no image" in str(e)
        return
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    for c in np.unique(labels):
        n = int((labels == c).sum())
        assert int((labels[val] == c).sum()) == min(round(fraction * n), n - 1)  # every class keeps a training image
    assert all(np.array_equal(a, b) for a, b in zip(holdout_split(labels, fraction, seed), (train, val)))


def test_cifar_val_split_holds_out_two_percent_in_memory(tmp_path):
    from cifar_fixtures import make_cifar10

    make_cifar10(str(tmp_path), n_train=500, n_test=20)
    s = open_dataset("cifar10", str(tmp_path), val_split=0.02, seed=0)
    assert isinstance(s.train, ImageSet) and isinstance(s.val, ImageSet)
    assert len(s.train) + len(s.val) == 500 and 8 <= len(s.val) <= 12
    full = open_dataset("cifar10", str(tmp_path)).train
    train_idx, val_idx = holdout_split(full.labels, 0.02, 0)
    assert torch.equal(s.val.images, full.images[torch.from_numpy(val_idx)])
    assert s.val is not None and open_dataset("cifar10", str(tmp_path)).val is None


def test_imagenet2012_layout_tests_on_val(tmp_path):
    wnids = {"n01440764": 3, "n01443537": 2}
    root = _tree(tmp_path, {"train": wnids, "val": {"n01443537": 2, "n01440764": 1}}, ext=".JPEG")
    s = open_dataset("imagenet2012", root)
    assert s.classes == sorted(wnids) and s.val is None
    assert (len(s.train), len(s.test)) == (5, 3) and s.test.labels.tolist() == [0, 1, 1]
    held = open_dataset("imagenet2012", root, val_split=0.34)  # one image of each class
    assert (len(held.train), len(held.val), held.val.labels.tolist()) == (3, 2, [0, 1])
    with pytest.raises(UsageError, match="holds out no image"):
        open_dataset("imagenet2012", root, val_split=0.01)
    flat = tmp_path / "flat"
    _tree(flat, {"train": wnids})
    _jpeg(flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(UsageError, match="sorted into val/<wnid>/"):
        open_dataset("imagenet2012", str(flat))


def test_test_split_alone_does_not_index_the_training_files(tmp_path):
    root = _tree(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"b": 2}})
    (tmp_path / "train" / "a" / "empty.jpg").write_bytes(b"")  # would stop open_dataset
    test = open_split("imagefolder", root, "test", classes=["a", "b"])
    assert len(test) == 2 and test.labels.tolist() == [1, 1]
    with pytest.raises(UsageError, match="not trained on: b"):
        open_split("imagefolder", root, "test", classes=["a"])


# ---------------------------------------------------------------- bad files found when indexing


def test_check_header(tmp_path):
    cases = {"ok.jpg": None, "empty.jpg": "empty file", "text.jpg": "not an image", "ok.png": None}
    _jpeg(tmp_path / "ok.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("<html>404 Not Found</html>")
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    for name, want in cases.items():
        got = check_header(str(tmp_path / name))
        assert (got is None) if want is None else (want in got), (name, got)
    assert "cannot be read" in check_header(str(tmp_path / "missing.jpg"))


def test_empty_and_non_image_files_stop_the_run_at_indexing_or_are_left_out(tmp_path):
    root = _tree(tmp_path, {"train": {"a": 3, "b": 3}, "test": {"a": 1}})
    (tmp_path / "train" / "a" / "zero.jpg").write_bytes(b"")
    (tmp_path / "train" / "b" / "page.png").write_text("<html>rate limited</html>")
    with pytest.raises(BadImageError) as e:
        open_dataset("imagefolder", root)
    msg = str(e.value)
    assert "2 file(s)" in msg and "zero.jpg (empty file (0 bytes))" in msg and "page.png (not an image" in msg
    assert "--skip_bad_images" in msg and "\n" not in msg
    logs: list[str] = []
    s = open_dataset("imagefolder", root, skip_bad_images=True, log=logs.append)
    assert len(s.train) == 6 and len(logs) == 2 and all(m.startswith("warning: leaving out ") for m in logs)


def test_no_images_names_the_loose_files(tmp_path):
    _jpeg(tmp_path / "train" / "x.jpg")
    os.makedirs(tmp_path / "train" / "empty_class")
    with pytest.raises(FileNotFoundError, match="1 images lie directly in"):
        open_dataset("imagefolder", str(tmp_path))


# ---------------------------------------------------------------- Pets and Flowers from a local server


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _tar(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 16, 3), value, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def _pets_fixture(www) -> tuple[dict[str, str], dict[str, str]]:
    """images.tar.gz (images/<Breed>_<n>.jpg, plus a .mat as in the real archive) and annotations.tar.gz
    (annotations/trainval.txt and test.txt: 'name class_id species breed_id')."""
    breeds = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("Bengal", 1, 3)]  # name, species, breed id
    trainval, test, images = [], [], {"images/Abyssinian_100.mat": b"MATLAB 5.0 not an image"}
    for cid, (name, species, breed) in enumerate(breeds, 1):
        for i in range(1, 6):
            images[f"images/{name}_{i}.jpg"] = _jpeg_bytes(40 * cid)
            (trainval if i <= 3 else test).append(f"{name}_{i} {cid} {species} {breed}")
    _tar(www / "images.tar.gz", images)
    _tar(www / "annotations.tar.gz", {"annotations/trainval.txt": "\n".join(trainval).encode() + b"\n",
                                      "annotations/test.txt": "\n".join(test).encode() + b"\n",
                                      "annotations/list.txt": b"#Image CLASS-ID SPECIES BREED ID\n"})
    names = ("images.tar.gz", "annotations.tar.gz")
    return ({n: f"/{n}" for n in names}, {n: _md5(www / n) for n in names})


def _flowers_fixture(www) -> tuple[dict[str, str], dict[str, str]]:
    """102flowers.tgz (jpg/image_%05d.jpg), imagelabels.mat (labels 1..102, shape (1, N)) and setid.mat (trnid,
    valid, tstid image ids from 1, shape (1, n)), written with scipy as the published ones are read."""
    from scipy.io import savemat

    n = 12
    labels = np.array([[1, 2, 3, 102, 1, 2, 3, 102, 1, 2, 3, 102]], dtype=np.uint8)
    _tar(www / "102flowers.tgz", {f"jpg/image_{i:05d}.jpg": _jpeg_bytes(10 * i) for i in range(1, n + 1)})
    savemat(www / "imagelabels.mat", {"labels": labels})
    savemat(www / "setid.mat", {"trnid": np.array([[1, 2, 3, 4]], np.uint16), "valid": np.array([[5, 6]], np.uint16),
                                "tstid": np.array([[7, 8, 9, 10, 11, 12]], np.uint16)})
    names = ("102flowers.tgz", "imagelabels.mat", "setid.mat")
    return ({n: f"/{n}" for n in names}, {n: _md5(www / n) for n in names})


def _absolute(urls: dict[str, str], base: str) -> dict[str, str]:
    return {k: base + v for k, v in urls.items()}


def test_pets_download_extract_and_tfds_splits(server, tmp_path):
    www, base = server
    urls, md5s = _pets_fixture(www)
    data = tmp_path / "data"
    folder = ensure_dataset("oxford_iiit_pet", str(data), progress=False, urls=_absolute(urls, base), md5s=md5s)
    assert folder == str(data / "oxford-iiit-pet")
    assert sorted(os.listdir(data)) == ["annotations.tar.gz", "images.tar.gz", "oxford-iiit-pet"]
    s = open_dataset("oxford_iiit_pet", str(data))
    assert s.classes == ["Abyssinian", "american_bulldog", "Bengal"] and s.val is None
    assert (len(s.train), len(s.test)) == (9, 6)
    assert s.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and s.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert s.train.index.path(3).endswith(os.path.join("images", "american_bulldog_1.jpg"))
    x, y = next(iter(s.test.eval_batches(16, 6)))
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 1, 1, 2, 2]
    # Present: used as is, offline (the URLs now point nowhere).
    assert ensure_dataset("oxford_iiit_pet", str(data), urls={k: "http://127.0.0.1:9/x" for k in urls}) == folder
    assert ensure_dataset("oxford_iiit_pet", folder) == folder  # --data_dir may be the dataset's own folder


def test_flowers_download_and_tfds_splits(server, tmp_path):
    www, base = server
    urls, md5s = _flowers_fixture(www)
    data = tmp_path / "data"
    ensure_dataset("oxford_flowers102", str(data), progress=False, urls=_absolute(urls, base), md5s=md5s)
    s = open_dataset("oxford_flowers102", str(data))
    assert len(s.classes) == 102 and s.classes[0] == "pink primrose" and s.classes[101] == "blackberry lily"
    assert (len(s.train), len(s.val), len(s.test)) == (4, 2, 6)
    assert s.train.labels.tolist() == [0, 1, 2, 101] and s.val.labels.tolist() == [0, 1]
    assert s.test.index.path(0).endswith(os.path.join("jpg", "image_00007.jpg"))
    with pytest.raises(UsageError, match="own validation split"):
        open_dataset("oxford_flowers102", str(data), val_split=0.1)


@pytest.mark.parametrize("which", [0, 1])
def test_wrong_checksum_is_rejected_and_leaves_nothing(server, tmp_path, which):
    www, base = server
    urls, md5s = _pets_fixture(www)
    bad = dict(md5s)
    name = list(md5s)[which]
    bad[name] = "0" * 32
    data = tmp_path / "data"
    with pytest.raises(DownloadError, match="md5 mismatch"):
        ensure_dataset("oxford_iiit_pet", str(data), progress=False, urls=_absolute(urls, base), md5s=bad)
    # No dataset folder, no temp file or folder; only a download that passed its own check may stay.
    left = sorted(os.listdir(data))
    assert left == ([] if which == 0 else ["images.tar.gz"]), left
    with pytest.raises(FileNotFoundError, match="is not in"):
        open_dataset("oxford_iiit_pet", str(data))


def test_archive_escaping_its_folder_is_refused_and_leaves_nothing(server, tmp_path):
    www, base = server
    urls, md5s = _pets_fixture(www)
    _tar(www / "annotations.tar.gz", {"annotations/trainval.txt": b"x 1 1 1\n", "../../escaped.txt": b"owned"})
    md5s["annotations.tar.gz"] = _md5(www / "annotations.tar.gz")
    data = tmp_path / "data"
    with pytest.raises(DownloadError, match="outside"):
        ensure_dataset("oxford_iiit_pet", str(data), progress=False, urls=_absolute(urls, base), md5s=md5s)
    assert sorted(os.listdir(data)) == ["annotations.tar.gz", "images.tar.gz"]
    assert not (tmp_path / "escaped.txt").exists() and not (data.parent / "escaped.txt").exists()


def test_incomplete_dataset_folder_is_not_overwritten(tmp_path):
    os.makedirs(tmp_path / "oxford-iiit-pet" / "images")
    with pytest.raises(UsageError, match="lacks annotations/trainval.txt"):
        prepare_data("oxford_iiit_pet", str(tmp_path))
    assert DOWNLOADS["oxford_iiit_pet"][0] == "oxford-iiit-pet"


def test_a_copy_put_in_place_meanwhile_is_used(server, tmp_path, monkeypatch):
    # Two nodes sharing a filesystem extract at once: the second rename meets the first one's finished folder.
    www, base = server
    urls, md5s = _pets_fixture(www)
    data = tmp_path / "data"
    first = ensure_dataset("oxford_iiit_pet", str(data), progress=False, urls=_absolute(urls, base), md5s=md5s)
    real_isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda p: False if p == first else real_isdir(p))  # "not there yet"
    assert ensure_dataset("oxford_iiit_pet", str(data), progress=False, urls=_absolute(urls, base),
                          md5s=md5s) == first
    monkeypatch.undo()
    assert sorted(os.listdir(data)) == ["annotations.tar.gz", "images.tar.gz", "oxford-iiit-pet"]  # no temp left
