"""The datasets `--dataset` names, in their real on-disk layouts, as train / val / test splits.

- cifar10, cifar100: the official python batches, downloaded when missing, held in memory (train.data.ImageSet).
- imagefolder: DIR/train/<class>/<file>, DIR/test/<class>/<file>, and DIR/val/<class>/<file> when present (the
  layout vit_jax reads for a folder); files are found recursively under each class folder.
- imagenet2012: the standard extracted ILSVRC-2012, DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG; its val is the
  test split, as in vit_jax (pp.test = 'validation').
- oxford_iiit_pet: images.tar.gz + annotations.tar.gz from the dataset's site (md5-checked); train = trainval.txt,
  test = test.txt, label = class id - 1, as tfds defines them.
- oxford_flowers102: 102flowers.tgz + imagelabels.mat + setid.mat (md5-checked, read with scipy); train = trnid,
  val = valid, test = tstid, label = imagelabels - 1, as tfds defines them.

Everything but CIFAR is a train.streaming.StreamSet: an index of (path, label) built here, with a cheap check of each
file's first bytes, so empty and non-image files are found before the first step, not hours into the run.
`--val_split F` holds out a stratified fraction F of the training split (holdout_split).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .args import UsageError
from .data import IMAGE_EXTENSIONS, ImageSet, _generator, load_cifar
from .download import CIFAR, DownloadError, download, ensure_cifar, md5sum, safe_extract
from .streaming import BadImageError, FileIndex, StreamSet, _log_to_stderr

__all__ = [
    "DATASETS",
    "DOWNLOADS",
    "DataSplits",
    "Resource",
    "check_header",
    "ensure_dataset",
    "holdout_split",
    "index_folder",
    "open_dataset",
    "open_split",
    "prepare_data",
]

DATASETS = ("cifar10", "cifar100", "imagefolder", "imagenet2012", "oxford_iiit_pet", "oxford_flowers102")
Split = ImageSet | StreamSet


@dataclass(frozen=True)
class Resource:
    """One published file: where it lives, its md5, and whether it is a tar archive to extract."""

    url: str
    md5: str
    extract: bool


# dataset -> (folder under --data_dir, resources, paths the finished folder must hold). URLs and md5s as published
# on the datasets' pages (the same md5s torchvision checks).
DOWNLOADS: dict[str, tuple[str, tuple[Resource, ...], tuple[str, ...]]] = {
    "oxford_iiit_pet": ("oxford-iiit-pet", (
        Resource("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
                 "5c4f3ee8e5d25df40f4fd59a7f44e54c", True),
        Resource("https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz",
                 "95a8c909bbe2e81eed6a22bccdf3f68f", True),
    ), ("images", "annotations/trainval.txt", "annotations/test.txt")),
    "oxford_flowers102": ("flowers-102", (
        Resource("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
                 "52808999861908f626f3c1f4e79d11fa", True),
        Resource("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat",
                 "e0620be6f572b9609742df49c70aed4d", False),
        Resource("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/setid.mat",
                 "a5357ecc9cb78c4bef273ce3793fc85c", False),
    ), ("jpg", "imagelabels.mat", "setid.mat")),
}

# tfds' label names for Flowers-102 (the files carry only numbers 1..102).
FLOWERS102_CLASSES = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia?", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
]

# First bytes of the formats PIL decodes here; anything else is not an image, whatever its name says.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


@dataclass
class DataSplits:
    """The splits of one dataset; `val` is None when there is no validation split."""

    train: Split
    val: Split | None
    test: Split
    classes: list[str]


# ---------------------------------------------------------------- index building


def check_header(path: str) -> str | None:
    """Why `path` cannot be an image file (empty, unreadable, unknown signature), or None when it may be one."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not head:
        return "empty file (0 bytes)"
    if head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return "not an image (its first bytes match no image format)"


class _IndexBuilder:
    """Accumulates (relative path, label) as bytes and int64 arrays, checking each file's header on a thread pool
    (the checks are I/O: threads overlap them)."""

    def __init__(self, root: str, pool: ThreadPoolExecutor) -> None:
        self.root, self.pool = root, pool
        self.blob, self.ends, self.labels = bytearray(), array("q"), array("q")
        self.bad: list[tuple[str, str]] = []

    def add(self, rel_paths: Sequence[str], labels: Sequence[int]) -> None:
        full = [os.path.join(self.root, p) for p in rel_paths]
        for rel, path, label, reason in zip(rel_paths, full, labels, self.pool.map(check_header, full)):
            if reason is not None:
                self.bad.append((path, reason))
                continue
            self.blob += os.fsencode(rel)
            self.ends.append(len(self.blob))
            self.labels.append(label)

    def build(self, skip_bad: bool, log: Callable[[str], None]) -> FileIndex:
        if self.bad:
            if not skip_bad:
                shown = "; ".join(f"{p} ({r})" for p, r in self.bad[:3])
                more = f" and {len(self.bad) - 3} more" if len(self.bad) > 3 else ""
                raise BadImageError(f"{len(self.bad)} file(s) under {self.root} are not images: {shown}{more}; delete "
                                    f"or replace them, or pass --skip_bad_images to leave them out (each is logged)")
            for path, reason in self.bad:
                log(f"warning: leaving out {path}: {reason}")
        ends = np.frombuffer(self.ends, dtype=np.int64).copy() if self.ends else np.zeros(0, np.int64)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        blob = np.frombuffer(bytes(self.blob), dtype=np.uint8)
        labels = np.frombuffer(self.labels, dtype=np.int64).copy() if self.labels else np.zeros(0, np.int64)
        return FileIndex(self.root, blob, starts, ends, labels)


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1)))


def _visible(name: str) -> bool:
    return not name.startswith(".")  # .DS_Store, macOS "._x.jpg" resource forks, .ipynb_checkpoints


def _image_files(folder: str) -> list[str]:
    """Image files under `folder` (recursively, sorted, hidden ones skipped), relative to `folder`."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        rel = os.path.relpath(dirpath, folder)
        for f in sorted(filenames):
            if _visible(f) and f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(f if rel == "." else os.path.join(rel, f))
    return out


def index_folder_classes(base: str) -> list[str]:
    """The class folders of a split folder, sorted (hidden ones skipped)."""
    if not os.path.isdir(base):
        raise FileNotFoundError(f"image folder {base} does not exist (expected "
                                f"<data_dir>/{{train,test}}/<class>/*.jpg)")
    return sorted(e.name for e in os.scandir(base) if e.is_dir() and _visible(e.name))


def index_folder(root: str, split: str, classes: list[str] | None = None, skip_bad: bool = False,
                 log: Callable[[str], None] = _log_to_stderr) -> tuple[FileIndex, list[str]]:
    """The index of `root/<split>/<class>/...` and its classes (the folders, sorted, unless `classes` is given:
    then a folder of another class holding images is refused, since leaving it out would evaluate on part of
    the split)."""
    base = os.path.join(root, split)
    found = index_folder_classes(base)
    if classes is None:
        classes = found
    elif extra := [c for c in found if c not in classes and _image_files(os.path.join(base, c))]:
        raise UsageError(f"{base} has class folders the model was not trained on: {', '.join(extra[:5])}"
                         f"{' ...' if len(extra) > 5 else ''} (its classes: {', '.join(classes[:10])}"
                         f"{' ...' if len(classes) > 10 else ''})")
    with _pool() as pool:
        builder = _IndexBuilder(base, pool)
        for k, cls in enumerate(classes):  # one class folder at a time: only its names are ever held as strings
            folder = os.path.join(base, cls)
            if os.path.isdir(folder):
                files = _image_files(folder)
                builder.add([os.path.join(cls, f) for f in files], [k] * len(files))
    index = builder.build(skip_bad, log)
    if len(index) == 0:
        loose = [f for f in os.listdir(base) if f.lower().endswith(IMAGE_EXTENSIONS)]
        hint = (f" ({len(loose)} images lie directly in {base}: sort them into one folder per class)" if loose else "")
        raise FileNotFoundError(f"no images under {base}/<class>/{hint}")
    return index, classes


def _index_list(root: str, rel_paths: Sequence[str], labels: Sequence[int], skip_bad: bool,
                log: Callable[[str], None]) -> FileIndex:
    with _pool() as pool:
        builder = _IndexBuilder(root, pool)
        builder.add(rel_paths, labels)
    return builder.build(skip_bad, log)


def _pet_list(folder: str, name: str) -> tuple[list[str], list[int]]:
    """annotations/<name>: lines 'Abyssinian_100 1 1 1' (image, class id 1..37, species, breed id)."""
    paths, labels = [], []
    with open(os.path.join(folder, "annotations", name)) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            image, class_id = line.split()[:2]
            paths.append(os.path.join("images", image + ".jpg"))
            labels.append(int(class_id) - 1)
    return paths, labels


def _pet_classes(folder: str) -> list[str]:
    # From the image names ('american_bulldog_12' -> 'american_bulldog'), ordered by class id.
    paths, labels = _pet_list(folder, "trainval.txt")
    names = dict(sorted({lab: os.path.basename(p).rsplit("_", 1)[0] for p, lab in zip(paths, labels)}.items()))
    if list(names) != list(range(len(names))):
        raise UsageError(f"{folder}/annotations/trainval.txt: class ids are not 1..{len(names)}")
    return list(names.values())


def _flowers_split(folder: str, key: str) -> tuple[list[str], list[int]]:
    from scipy.io import loadmat

    labels = loadmat(os.path.join(folder, "imagelabels.mat"))["labels"].ravel().astype(np.int64)  # (8189,) 1..102
    ids = loadmat(os.path.join(folder, "setid.mat"))[key].ravel().astype(np.int64)  # image ids, from 1
    return [os.path.join("jpg", f"image_{i:05d}.jpg") for i in ids], (labels[ids - 1] - 1).tolist()


# ---------------------------------------------------------------- downloads


def _dataset_folder(dataset: str, data_dir: str) -> str:
    folder, _, expected = DOWNLOADS[dataset]
    # --data_dir may name the dataset's own folder as well as its parent.
    if all(os.path.exists(os.path.join(data_dir, p)) for p in expected):
        return data_dir
    return os.path.join(data_dir, folder)


def ensure_dataset(dataset: str, data_dir: str, progress: bool = True, urls: dict[str, str] | None = None,
                   md5s: dict[str, str] | None = None) -> str:
    """The extracted folder of `dataset` (oxford_iiit_pet, oxford_flowers102) under `data_dir`, downloaded (md5-
    checked) and extracted first when missing. `urls`/`md5s` override a resource's, keyed by its file name.

    The downloads are kept in `data_dir`; the dataset folder appears only when complete (built in a temporary
    folder beside it and renamed into place), so a failed download or extraction leaves no half dataset.
    """
    folder_name, resources, expected = DOWNLOADS[dataset]
    folder = _dataset_folder(dataset, data_dir)
    if os.path.isdir(folder):
        missing = [p for p in expected if not os.path.exists(os.path.join(folder, p))]
        if missing:
            raise UsageError(f"{folder} exists but lacks {', '.join(missing)}: complete it, or remove it to download "
                             f"{dataset} again")
        return folder  # used as is: works offline
    os.makedirs(data_dir, exist_ok=True)
    files = []
    for r in resources:
        name = os.path.basename(r.url)
        url, md5 = (urls or {}).get(name, r.url), (md5s or {}).get(name, r.md5)
        path = os.path.join(data_dir, name)
        if not (os.path.isfile(path) and md5sum(path) == md5):
            download(url, path, md5, progress=progress)
        files.append((path, r.extract))
    tmp = tempfile.mkdtemp(prefix=f".{folder_name}.", suffix=".part", dir=data_dir)
    try:
        for path, extract in files:
            if extract:
                safe_extract(path, tmp)
            else:
                shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
        missing = [p for p in expected if not os.path.exists(os.path.join(tmp, p))]
        if missing:
            raise DownloadError(f"the {dataset} downloads in {data_dir} do not hold {', '.join(missing)}; delete "
                                f"them to download again")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is private; the dataset is not
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another node's first process, sharing this filesystem, put its copy in place first: use that one.
            if not all(os.path.exists(os.path.join(folder, p)) for p in expected):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return folder


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def prepare_data(dataset: str, data_dir: str, progress: bool = True) -> None:
    """Download what `dataset` needs into `data_dir` when it is missing (CIFAR, Pets, Flowers); folders: nothing."""
    if dataset in CIFAR:
        ensure_cifar(dataset, data_dir, progress=progress)
    elif dataset in DOWNLOADS:
        ensure_dataset(dataset, data_dir, progress=progress)


# ---------------------------------------------------------------- splits


def holdout_split(labels: torch.Tensor | np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions: round(fraction x n_c) random examples of each class c held out (at least one left
    to train on), a pure function of (labels, fraction, seed). Both sorted."""
    labels = np.asarray(labels)
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"--val_split {fraction} must lie strictly between 0 and 1")
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = min(int(round(fraction * len(members))), len(members) - 1)
        perm = torch.randperm(len(members), generator=_generator(seed, 3, int(c))).numpy()
        val.append(members[perm[:take]])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    if len(val_idx) == 0:
        raise UsageError(f"--val_split {fraction} holds out no image of the {len(labels)} training images (per class "
                         f"it rounds to 0): pass a larger fraction")
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


# Where each split of a listed dataset comes from: a folder (imagefolder, imagenet2012), a list file (Pets) or a
# setid.mat key (Flowers). imagefolder's val/ counts only when it exists.
_SPLITS = {
    "imagefolder": {"train": "train", "val": "val", "test": "test"},
    "imagenet2012": {"train": "train", "test": "val"},
    "oxford_iiit_pet": {"train": "trainval.txt", "test": "test.txt"},
    "oxford_flowers102": {"train": "trnid", "val": "valid", "test": "tstid"},
}


def _open(dataset: str, data_dir: str, roles: Sequence[str], skip_bad: bool, log: Callable[[str], None],
          classes: list[str] | None = None) -> tuple[dict[str, ImageSet | FileIndex | None], list[str]]:
    """{role: ImageSet (CIFAR) or FileIndex, None where the dataset lacks that split}, and the class names."""
    if dataset in CIFAR:
        root = os.path.join(data_dir, CIFAR[dataset][2])
        sets = {r: (load_cifar(root, dataset, r == "train") if r != "val" else None) for r in roles}
        found = next(s for s in sets.values() if s is not None).classes if any(sets.values()) else []
        return sets, found
    if dataset not in _SPLITS:
        raise UsageError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    where = _SPLITS[dataset]
    out: dict[str, ImageSet | FileIndex | None] = {r: None for r in roles}
    if dataset in ("imagefolder", "imagenet2012"):
        if dataset == "imagenet2012":
            _check_imagenet(data_dir)
        if classes is None:  # the training folder's classes, whichever splits are wanted
            classes = index_folder_classes(os.path.join(data_dir, "train"))
        for r in roles:
            if r in where and (r != "val" or os.path.isdir(os.path.join(data_dir, where[r]))):
                out[r] = index_folder(data_dir, where[r], classes, skip_bad, log)[0]
        return out, classes
    folder = _dataset_folder(dataset, data_dir)
    if not all(os.path.exists(os.path.join(folder, p)) for p in DOWNLOADS[dataset][2]):
        raise FileNotFoundError(f"{dataset} is not in {folder} (it is downloaded there when missing, unless the "
                                f"download was turned off)")
    pets = dataset == "oxford_iiit_pet"
    found = _pet_classes(folder) if pets else list(FLOWERS102_CLASSES)
    for r in roles:
        if r in where:
            paths, labels = (_pet_list if pets else _flowers_split)(folder, where[r])
            out[r] = _index_list(folder, paths, labels, skip_bad, log)
    return out, found


def _check_imagenet(root: str) -> None:
    val = os.path.join(root, "val")
    if os.path.isdir(val) and not any(e.is_dir() for e in os.scandir(val)):
        raise UsageError(f"{val} holds its images directly: ImageNet's validation images must be sorted into "
                         f"val/<wnid>/ folders (as the usual valprep.sh script does)")


def open_dataset(dataset: str, data_dir: str, *, val_split: float = 0.0, seed: int = 0, num_workers: int = 0,
                 skip_bad_images: bool = False, log: Callable[[str], None] = _log_to_stderr) -> DataSplits:
    """Train / val / test of `dataset` under `data_dir` (already downloaded: see prepare_data).

    The validation split is the dataset's own (imagefolder's val/, Flowers' valid) or, with `val_split` > 0, a
    stratified fraction of the training split held out with `seed`; the two do not combine.
    """
    sets, classes = _open(dataset, data_dir, ("train", "val", "test"), skip_bad_images, log)
    splits = {r: _as_split(s, classes, num_workers, skip_bad_images, log) for r, s in sets.items()}
    train, val = splits["train"], splits["val"]
    if val_split:
        if val is not None:
            raise UsageError(f"--dataset {dataset} has its own validation split ({len(val)} images): drop "
                             f"--val_split {val_split}")
        train_idx, val_idx = holdout_split(train.labels, val_split, seed)
        train, val = train.subset(train_idx), train.subset(val_idx)
    return DataSplits(train, val, splits["test"], classes)


def _as_split(s: ImageSet | FileIndex | None, classes: list[str], num_workers: int, skip_bad: bool,
              log: Callable[[str], None]) -> Split | None:
    if s is None or isinstance(s, ImageSet):
        return s
    return StreamSet(s, classes, num_workers, skip_bad, log=log)


def open_split(dataset: str, data_dir: str, split: str, classes: list[str] | None = None, num_workers: int = 0,
               skip_bad_images: bool = False, log: Callable[[str], None] = _log_to_stderr) -> Split:
    """One split ('train', 'val' or 'test') of `dataset`, for evaluation or feature extraction, indexing only that
    split. `classes` (a checkpoint's) fix an image folder's label order and must match a listed dataset's."""
    sets, found = _open(dataset, data_dir, (split,), skip_bad_images, log, classes)
    if classes is not None and list(found) != list(classes):
        raise UsageError(f"{dataset} in {data_dir} has other classes ({len(found)}) than the checkpoint "
                         f"({len(classes)})")
    if sets[split] is None:
        raise UsageError(f"--dataset {dataset} has no {split} split")
    return _as_split(sets[split], found, num_workers, skip_bad_images, log)
