"""Image datasets streamed from disk: an index of (path, label), files decoded in worker processes, uint8 batches
pinned, moved to the device and normalised there.

Every dataset that is not CIFAR takes this path (CIFAR lives on the GPU whole: train.data). A training step's
global batch (StepSampler), its crop boxes and flips (crop_draws, the draws of the CIFAR path) are pure functions of
(seed, step); a worker turns its chunk of the batch into pixels from the files alone. So a resumed run, or one
with another number of processes or workers, sees exactly the same batches.

Per file: the header gives the size (and EXIF orientation); the RandomResizedCrop box is taken on the full-resolution
image; a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling through PIL's `draft`) only when the box
still holds at least the output resolution at that scale, so the result matches a full decode within resize error;
then one PIL resize maps the box to size x size. Memory holds the index (one bytes buffer of relative paths and the
labels: no Python object per file, so forked workers share it without copy-on-write growth) and the batches in
flight, nothing per file.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .args import UsageError
from .data import StepSampler, crop_boxes, crop_draws, eval_shard, normalize

__all__ = [
    "BadImageError",
    "FileIndex",
    "StreamSet",
    "StepBatch",
    "StreamTrainBatches",
    "default_num_workers",
    "open_image",
    "draft_scale",
    "decode_box",
    "decode_rgb",
]

# A run of unreadable files this long (with --skip_bad_images) means a broken dataset, not a few bad files.
MAX_SUBSTITUTES = 64
# Images per worker task: small enough that all workers share one step, large enough to amortise the hand-off.
MIN_CHUNK, MAX_CHUNK = 8, 64

# EXIF orientation -> the PIL transpose that shows the image upright (as PIL.ImageOps.exif_transpose does).
_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}  # values are PIL.Image.Transpose members
_SWAPS_SIDES = (5, 6, 7, 8)


class BadImageError(UsageError):
    """An image file that cannot be decoded: the message names it and what to do. Exit code 2."""


def bad_image_message(path: str, reason: str) -> str:
    return (f"cannot decode {path}: {reason}; replace or delete the file, or pass --skip_bad_images (each bad file "
            f"is then logged once, replaced by the next image of its split in training and left out of evaluation)")


def default_num_workers(local_world_size: int | None = None) -> int:
    """Data-loading workers per process: the cores this process may use, shared among the processes of this node,
    less one for the process itself (at least 1)."""
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size) - 1)


# ---------------------------------------------------------------- the index


class FileIndex:
    """Relative paths (one bytes buffer, offsets into it) and int64 labels: about len(path) + 24 bytes per file."""

    def __init__(self, root: str, blob: np.ndarray, starts: np.ndarray, ends: np.ndarray, labels: np.ndarray) -> None:
        self.root, self.blob = root, blob
        self.starts, self.ends, self.labels = starts, ends, labels

    @classmethod
    def from_paths(cls, root: str, rel_paths: Sequence[str], labels: Sequence[int]) -> FileIndex:
        encoded = [os.fsencode(p) for p in rel_paths]
        ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        starts = ends - np.array([len(b) for b in encoded], dtype=np.int64)
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        return cls(root, blob, starts, ends, np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return self.labels.shape[0]

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.blob[self.starts[i]:self.ends[i]].tobytes()))

    def subset(self, idx: np.ndarray) -> FileIndex:
        """The files at positions `idx` (the paths buffer is shared, not copied)."""
        idx = np.asarray(idx, dtype=np.int64)
        return FileIndex(self.root, self.blob, self.starts[idx], self.ends[idx], self.labels[idx])


# ---------------------------------------------------------------- decoding one file


def _orientation(im) -> int:
    # JPEG and WebP carry EXIF in the header (info["exif"]); TIFF in its tags. A PNG's eXIf chunk placed after the
    # pixel data is not seen before decoding, and reading it would decode the whole file here: such files are rare.
    if "exif" not in im.info and im.format != "TIFF":
        return 1
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block must not make the pixels unreadable
        return 1
    return value if value in _TRANSPOSE else 1


def open_image(path: str):
    """(PIL image with only its header read, width, height, EXIF orientation); sizes as displayed (upright)."""
    from PIL import Image

    im = Image.open(path)
    orientation = _orientation(im)
    width, height = im.size
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    return im, width, height, orientation


def draft_scale(box_w: float, box_h: float, size: int) -> int:
    """The DCT scale (8, 4, 2 or 1) at which a box of box_w x box_h source pixels still covers size x size."""
    for k in (8, 4, 2):
        if min(box_w, box_h) >= k * size:
            return k
    return 1


def _rgb_or_l(im):
    """`im` decoded as RGB or L (L is resized first and expanded afterwards: cheaper, and the same pixels)."""
    from PIL import Image

    if im.mode in ("RGB", "L"):
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit: scale [0, 65535] onto [0, 255] (PIL's own convert would clip at 255 instead).
        a = np.asarray(im).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    if im.mode == "F":
        raise ValueError("unsupported image mode F (floating point)")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # the palette's colours; alpha is dropped below, as torchvision and tfds do
    return im.convert("RGB")  # palette, 1-bit, CMYK (Adobe inversion handled by PIL), YCbCr, LA, RGBA, ...


def decode_box(im, orientation: int, box: Sequence[float], size: int, flip: bool = False) -> np.ndarray:
    """The box (x0, y0, w, h) of the upright image resized to (size, size, 3) uint8 RGB (bilinear, antialiased),
    mirrored when `flip`. A JPEG is decoded at the largest DCT scale that keeps the box at least size x size."""
    from PIL import Image, JpegImagePlugin

    x0, y0, w, h = (float(v) for v in box)
    k = 1.0
    if isinstance(im, JpegImagePlugin.JpegImageFile):  # MPO (camera JPEGs) included
        want = draft_scale(w, h, size)
        if want > 1:
            sw, sh = im.size
            drafted = im.draft(im.mode, (sw // want, sh // want))
            if drafted is not None:
                k = sw / drafted[1][2]  # the scale PIL chose: pixel j covers source pixels [jk, (j+1)k)
    if orientation != 1:
        im = im.transpose(_TRANSPOSE[orientation])
    im = _rgb_or_l(im)
    out = im.resize((size, size), Image.Resampling.BILINEAR, box=(x0 / k, y0 / k, (x0 + w) / k, (y0 + h) / k))
    if flip:  # in PIL: a third of the cost of copying a mirrored numpy view
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if out.mode != "RGB":
        out = out.convert("RGB")
    return np.asarray(out)  # (size, size, 3)


def decode_rgb(path: str) -> np.ndarray:
    """A whole image file as (H, W, 3) uint8 RGB, upright (EXIF orientation applied), at full resolution."""
    im, _, _, orientation = open_image(path)
    with im:
        if orientation != 1:
            im = im.transpose(_TRANSPOSE[orientation])
        im = _rgb_or_l(im)
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.array(im)


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "no message"
    return f"{type(e).__name__}: {text}"


# ---------------------------------------------------------------- worker side


@dataclass(frozen=True)
class _Chunk:
    """One worker task: positions `start`.. of a step's (or an evaluation's) rows, their dataset indices and, for
    training, their crop_draws rows."""

    step: int
    start: int
    indices: np.ndarray  # (c,) int64 positions in the split
    draws: np.ndarray | None  # (c, 2 * attempts + 3) float32, None for evaluation


def _identity(x):
    return x


Decode = Callable[..., np.ndarray]  # decode_box's signature: (image, orientation, box, size, flip) -> (S, S, 3)


class _Decoder(torch.utils.data.Dataset):
    """Turns a _Chunk into pixels. Runs in the DataLoader's workers (or in the main process with 0 workers)."""

    def __init__(self, index: FileIndex, size: int, skip_bad: bool, decode: Decode = decode_box) -> None:
        self.index, self.size, self.skip_bad, self.decode = index, size, skip_bad, decode

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):  # the DataLoader calls __getitems__; this exists for the Dataset protocol
        return self.__getitems__(_Chunk(0, 0, np.array([i]), None))

    def _open(self, j: int):
        try:
            return open_image(self.index.path(j)), None
        except MemoryError:
            raise
        except Exception as e:
            return None, _reason(e)

    def _decode_into(self, out: np.ndarray, opened: tuple, box: list[float] | None, flip: bool) -> str | None:
        """Decode an `_open`ed image, cropped to `box` (None: the whole image), into `out` (S, S, 3) and close it;
        returns None, or why the file could not be decoded."""
        im, width, height, orientation = opened
        try:
            out[...] = self.decode(im, orientation, box if box is not None else (0, 0, width, height), self.size,
                                   flip=flip)
            return None
        except MemoryError:
            raise
        except Exception as e:
            return _reason(e)
        finally:
            im.close()

    def __getitems__(self, chunk: _Chunk) -> dict:
        c, s = len(chunk.indices), self.size
        images = torch.empty(c, s, s, 3, dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            images.share_memory_()  # written in place, so handing it to the main process copies nothing
        pixels = images.numpy()
        labels = torch.empty(c, dtype=torch.int64)
        valid = torch.ones(c, dtype=torch.bool)
        result = {"step": chunk.step, "start": chunk.start, "images": images, "labels": labels, "valid": valid,
                  "bad": [], "fatal": None}
        opened = [self._open(int(j)) for j in chunk.indices]
        try:
            boxes = flips = None
            if chunk.draws is not None:
                hw = [(o[2], o[1]) if o is not None else (1, 1) for o, _ in opened]  # (height, width)
                heights, widths = torch.tensor(hw, dtype=torch.float64).unbind(1)
                boxes, flips = crop_boxes(torch.from_numpy(chunk.draws), heights, widths)
            for i, ((o, err), j) in enumerate(zip(opened, chunk.indices.tolist())):
                if o is not None:
                    box = boxes[i].tolist() if boxes is not None else None
                    err = self._decode_into(pixels[i], o, box, flips is not None and bool(flips[i] < 0))
                    if err is None:
                        labels[i] = int(self.index.labels[j])
                        continue
                result["bad"].append((self.index.path(j), err))
                if not self.skip_bad:
                    result["fatal"] = result["bad"][-1]
                    return result
                if chunk.draws is None:
                    valid[i] = False  # evaluation leaves a bad file out
                else:
                    labels[i] = self._substitute(j, chunk.draws[i:i + 1], pixels[i], result["bad"])
        finally:
            for o, _ in opened:
                if o is not None:
                    o[0].close()
        return result

    def _substitute(self, j: int, draws: np.ndarray, out: np.ndarray, bad: list) -> int:
        """Fill `out` from the next readable file after position j (cyclically); returns its label."""
        n = len(self.index)
        for step in range(1, min(n, MAX_SUBSTITUTES + 1)):
            k = (j + step) % n
            o, err = self._open(k)
            if o is not None:
                boxes, flips = crop_boxes(torch.from_numpy(draws), o[2], o[1])  # (height, width) of file k
                err = self._decode_into(out, o, boxes[0].tolist(), bool(flips[0] < 0))
                if err is None:
                    return int(self.index.labels[k])
            bad.append((self.index.path(k), err))
        raise BadImageError(f"{len(bad)} unreadable files in a row from {self.index.path(j)} on: the dataset under "
                            f"{self.index.root} looks broken (last: {bad[-1][1]})")


class _StepChunks:
    """The batch sampler of training: for each step, this rank's rows of the global batch in chunks."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, flip: bool, first_step: int,
                 last_step: int, chunk: int) -> None:
        self.sampler = StepSampler(n, global_batch, seed)
        self.global_batch, self.seed, self.flip, self.chunk = global_batch, seed, flip, chunk
        self.per_rank = global_batch // world
        self.mine = slice(rank * self.per_rank, (rank + 1) * self.per_rank)
        self.first_step, self.last_step = first_step, last_step

    def chunks_per_step(self) -> int:
        return -(-self.per_rank // self.chunk)

    def __len__(self) -> int:
        return max(0, self.last_step - self.first_step + 1) * self.chunks_per_step()

    def __iter__(self) -> Iterator[_Chunk]:
        for step in range(self.first_step, self.last_step + 1):
            idx = self.sampler.indices(step)[self.mine].numpy()  # (per_rank,)
            draws = crop_draws(self.global_batch, self.seed, step, flip=self.flip)[self.mine].numpy()
            for start in range(0, self.per_rank, self.chunk):
                end = start + self.chunk
                yield _Chunk(step, start, idx[start:end], draws[start:end])


class _EvalChunks:
    def __init__(self, n: int, rank: int, world: int, batch_size: int) -> None:
        self.idx = eval_shard(n, rank, world).numpy()
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.idx) // self.batch_size)

    def __iter__(self) -> Iterator[_Chunk]:
        for start in range(0, len(self.idx), self.batch_size):
            yield _Chunk(0, start, self.idx[start:start + self.batch_size], None)


# ---------------------------------------------------------------- main-process side


def _die_with_parent(parent: int, worker_id: int) -> None:
    """worker_init_fn: a worker gets SIGKILL when the training process dies. Forked workers share what it held
    open, the run folder's lock among it; left to the DataLoader's own watchdog they outlive a SIGKILLed trainer
    by seconds, and a resume (or torchrun's restart) started at once would find the run still locked."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(0)


def _loader(decoder: _Decoder, batch_sampler, num_workers: int, device: torch.device,
            persistent: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        decoder, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=_identity,
        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None,
        persistent_workers=persistent and num_workers > 0,
        worker_init_fn=functools.partial(_die_with_parent, os.getpid()) if num_workers else None,
        generator=torch.Generator(),  # the seed it draws for its workers must not consume the global RNG
    )


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class StreamSet:
    """A split streamed from files: the same role as train.data.ImageSet (len, labels, classes, subset, to,
    eval_batches) plus training batches (train_batches)."""

    def __init__(self, index: FileIndex, classes: list[str], num_workers: int = 0, skip_bad: bool = False,
                 device: torch.device | str = "cpu", log: Callable[[str], None] = _log_to_stderr) -> None:
        self.index, self.classes = index, classes
        self.num_workers, self.skip_bad = num_workers, skip_bad
        self.device = torch.device(device)
        self.log = log
        self._logged: set[str] = set()
        self._eval_loader: tuple[tuple, torch.utils.data.DataLoader] | None = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> torch.Tensor:
        """(N,) int64 on the CPU."""
        return torch.from_numpy(self.index.labels)

    def _with(self, index: FileIndex, device: torch.device | str) -> StreamSet:
        return StreamSet(index, self.classes, self.num_workers, self.skip_bad, device, self.log)

    def subset(self, idx: np.ndarray | torch.Tensor) -> StreamSet:
        return self._with(self.index.subset(np.asarray(idx)), self.device)

    def to(self, device: torch.device | str) -> StreamSet:
        """Where batches go; the files stay where they are."""
        return self._with(self.index, device)

    def check(self, result: dict) -> None:
        """Raise on a file that stopped a chunk; log each skipped file once."""
        if result["fatal"] is not None:
            raise BadImageError(bad_image_message(*result["fatal"]))
        for path, reason in result["bad"]:
            if path not in self._logged:
                self._logged.add(path)
                self.log(f"warning: skipping unreadable image {path} ({reason})")

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True)

    def eval_batches(self, img_size: int, batch_size: int, rank: int = 0, world: int = 1
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's evaluation batches: whole images resized to img_size (bilinear, antialiased) and
        normalised, (b, 3, S, S) float32 and (b,) labels on the device; every example once across ranks."""
        key = (img_size, batch_size, rank, world)
        if self._eval_loader is None or self._eval_loader[0] != key:
            # Persistent workers: the same order every evaluation, so one loader serves them all.
            decoder = _Decoder(self.index, img_size, self.skip_bad)
            self._eval_loader = (key, _loader(decoder, _EvalChunks(len(self), rank, world, batch_size),
                                              self.num_workers, self.device, persistent=True))
        for result in _worker_errors(self._eval_loader[1]):
            self.check(result)
            keep = result["valid"]
            images = self._to_device(result["images"][keep])  # (b, S, S, 3) uint8
            yield to_model_input(images), result["labels"][keep].to(self.device, non_blocking=True)

    def train_batches(self, global_batch: int, rank: int, world: int, seed: int, img_size: int, flip: bool,
                      first_step: int, last_step: int, decode: Decode = decode_box) -> StreamTrainBatches:
        """Steps first_step..last_step of training, in order (`decode` maps one file's crop to pixels: the
        benchmark swaps in the full-decode recipe it compares against)."""
        return StreamTrainBatches(self, global_batch, rank, world, seed, img_size, flip, first_step, last_step,
                                  decode)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """(b, S, S, 3) uint8 -> (b, 3, S, S) float32 in [-1, 1], on the images' device."""
    return normalize(images.permute(0, 3, 1, 2).to(torch.float32)).contiguous()


def _worker_errors(loader: torch.utils.data.DataLoader) -> Iterator[dict]:
    # A worker killed by the kernel (out of memory, usually) surfaces as a RuntimeError with several lines.
    try:
        yield from loader
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        from .cli import TrainingError

        first = str(e).strip().splitlines()[0]
        raise TrainingError(f"a data-loading worker failed ({first}); try a smaller --num_workers (now "
                            f"{loader.num_workers}) or --train_batch_size") from None


class StepBatch:
    """One process's share of a step's batch: (per_rank, S, S, 3) uint8 and (per_rank,) labels on the device."""

    def __init__(self, step: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.step, self.images, self.labels = step, images, labels

    def micro(self, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Model input (m, 3, S, S) float32 and labels (m,) of the micro-batch `part`."""
        return to_model_input(self.images[part]), self.labels[part]


class StreamTrainBatches:
    """Steps first_step..last_step of a streamed training split, in order: iterate for StepBatch objects."""

    def __init__(self, split: StreamSet, global_batch: int, rank: int, world: int, seed: int, img_size: int,
                 flip: bool, first_step: int, last_step: int, decode: Decode = decode_box) -> None:
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        self.split = split
        per_rank = global_batch // world
        workers = max(1, split.num_workers)
        chunk = min(per_rank, max(MIN_CHUNK, min(MAX_CHUNK, -(-per_rank // workers))))
        self.sampler = _StepChunks(len(split), global_batch, rank, world, seed, flip, first_step, last_step, chunk)
        self.loader = _loader(_Decoder(split.index, img_size, split.skip_bad, decode), self.sampler,
                              split.num_workers, split.device)

    def __iter__(self) -> Iterator[StepBatch]:
        per_step = self.sampler.chunks_per_step()
        parts: list[dict] = []
        for result in _worker_errors(self.loader):
            self.split.check(result)
            parts.append(result)
            if len(parts) < per_step:
                continue
            step = parts[0]["step"]
            assert all(p["step"] == step for p in parts), "chunks of one step arrived out of order"
            images = torch.cat([self.split._to_device(p["images"]) for p in parts])  # (per_rank, S, S, 3)
            labels = torch.cat([p["labels"] for p in parts]).to(self.split.device, non_blocking=True)
            parts = []
            yield StepBatch(step, images, labels)
