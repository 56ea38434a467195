"""The training input pipeline alone, in img/s: the CIFAR path, or with --imagefolder the streaming path.

    python -m benchmarks.bench_input_pipeline            # CIFAR path: 224 and 384 px, batch 512, fp32 and bf16 output
    python -m benchmarks.bench_input_pipeline --quick    # CIFAR path: 224 px, batch 512, bf16 output
    python -m benchmarks.bench_input_pipeline --imagefolder DIR [--num_workers N] [--quick]

CIFAR path: index a batch from a uint8 CIFAR-size set held on the device, then RandomResizedCrop + flip + normalise
the whole batch there (train.data.augment_batch). The target is >= 5x the model's training img/s (bench_train_step).

Streaming path: decode + crop + resize in worker processes, then pin, move and normalise on the device, for
  - vitcore (train.streaming): the crop box from the header's size, a JPEG decoded at reduced resolution (PIL's
    draft) when the crop still holds the output size, one resize of the box into the shared batch (HWC);
  - the torchvision recipe written with PIL (TorchvisionRecipe): per image, full decode (convert RGB),
    RandomResizedCrop on the PIL image (get_params, crop, bilinear resize), flip, PILToTensor; default collate;
  - the same recipe with our crop boxes handed over (the conservative comparison: only decode + crop + resize +
    to-tensor left to its workers, on the very pixels ours decodes);
with the same workers, batch, prefetch and pinning, on JPEGs of 1024x768 and 500x375 that this script makes from a
real photograph (matplotlib's sample portrait, cut into tiles at its native resolution, quality 90), and on DIR's
own files (DIR/train/<class>/* or DIR/<class>/*). Columns: img_per_s by the clock (and per worker),
img_per_cpu_s = images per CPU-second of the decoding processes (what one worker delivers on a core of its own,
robust on a busy machine), vitcore_speedup = vitcore's img_per_cpu_s over that row's. It prints how many cores
keep a ViT-B_16 at 3,000 img/s fed.
Rows go to <results>/bench_input_pipeline.csv.
"""

from __future__ import annotations

import argparse
import datetime
import io
import math
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import print_table, results_dir, write_csv
from train.data import StepSampler, augment_batch, crop_params
from vitcore.fileio import atomic_write

DATASET_SIZE = 50_000  # CIFAR-10's training set
FEED_TARGET = 3000  # img/s: a ViT-B_16 training step on one H100/H200 in bf16 takes about this many
PHOTO_SIZES = ((1024, 768), (500, 375))


def measure(device: torch.device, img_size: int, batch: int, dtype: torch.dtype, iters: int, warmup: int) -> float:
    """img/s of sampler + crop parameters + gather + augment at (batch, 3, img_size, img_size)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (DATASET_SIZE, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
    sampler = StepSampler(DATASET_SIZE, batch, seed=0)

    def one(step: int) -> torch.Tensor:
        idx = sampler.indices(step).to(device, non_blocking=True)
        boxes, flips = crop_params(batch, 32, 32, seed=0, step=step, flip=True)
        return augment_batch(images[idx], boxes, flips, img_size, dtype)  # (batch, 3, S, S)

    for s in range(1, warmup + 1):
        one(s)
    _sync(device)
    t0 = time.perf_counter()
    for s in range(warmup + 1, warmup + iters + 1):
        one(s)
    _sync(device)
    return iters * batch / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- streaming path


def torchvision_get_params(width: int, height: int, scale: tuple[float, float] = (0.05, 1.0),
                           ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[float, float, float, float]:
    """RandomResizedCrop's per-image box as torchvision draws it (torch scalar draws, 10 tries, central fallback);
    (x0, y0, w, h). Part of the reference recipe's cost; our pipeline draws a whole batch at once (crop_draws)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            y0 = torch.randint(0, height - h + 1, size=(1,)).item()
            x0 = torch.randint(0, width - w + 1, size=(1,)).item()
            return x0, y0, w, h
    in_ratio = width / height
    w, h = ((width, round(width / ratio[0])) if in_ratio < ratio[0] else
            (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height))
    return (width - w) // 2, (height - h) // 2, w, h


class TorchvisionRecipe(torch.utils.data.Dataset):
    """The reference: torchvision's ImageFolder + RandomResizedCrop + RandomHorizontalFlip + PILToTensor, written
    with PIL, one image per __getitem__ and the DataLoader's default collate, as such a training script runs.

    A key is an index (the crop drawn here, as torchvision does) or (index, box, flip): our boxes, computed in the
    main process, so that only decode + crop + resize + to-tensor is left to the workers (the conservative
    comparison: the same pixels of the same files as ours).
    """

    def __init__(self, split, size: int) -> None:
        self.index, self.size = split.index, size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        from PIL import Image

        j, box, flip = key if isinstance(key, tuple) else (key, None, None)
        with open(self.index.path(j), "rb") as f:  # torchvision's pil_loader: the whole file decoded, as RGB
            img = Image.open(f).convert("RGB")
        x0, y0, w, h = box if box is not None else torchvision_get_params(img.width, img.height)
        img = img.crop((x0, y0, x0 + w, y0 + h)).resize((self.size, self.size), Image.Resampling.BILINEAR)
        if (torch.rand(1).item() < 0.5) if flip is None else flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # RandomHorizontalFlip
        pixels = torch.as_tensor(np.array(img, copy=True)).view(img.height, img.width, 3)
        return pixels.permute(2, 0, 1), int(self.index.labels[j])  # PILToTensor: (3, S, S) uint8


class _RecipeSteps:
    """Batches of keys for the rows StreamTrainBatches reads, in its order; with `boxes`, our boxes and flips."""

    def __init__(self, split, batch: int, steps: int, boxes: bool) -> None:
        from train.streaming import open_image

        self.sampler, self.batch, self.steps, self.sizes = StepSampler(len(split), batch, seed=0), batch, steps, None
        if boxes:
            sizes = []
            for i in range(len(split)):
                im, width, height, _ = open_image(split.index.path(i))
                im.close()
                sizes.append((height, width))
            self.sizes = torch.tensor(sizes, dtype=torch.float64)  # (N, 2)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        from train.data import crop_boxes, crop_draws

        for step in range(1, self.steps + 1):
            idx = self.sampler.indices(step)
            if self.sizes is None:
                yield idx.tolist()
                continue
            heights, widths = self.sizes[idx].unbind(1)
            boxes, flips = crop_boxes(crop_draws(self.batch, 0, step, flip=True), heights, widths)
            yield [(j, tuple(box), bool(f < 0)) for j, box, f in zip(idx.tolist(), boxes.tolist(), flips.tolist())]


def _recipe_batches(split, device: torch.device, img_size: int, batch: int, steps: int, boxes: bool):
    from train.data import normalize

    loader = torch.utils.data.DataLoader(
        TorchvisionRecipe(split, img_size), batch_sampler=_RecipeSteps(split, batch, steps, boxes),
        num_workers=split.num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if split.num_workers else None)
    for x, _ in loader:  # x: (batch, 3, S, S) uint8
        yield normalize(x.to(device, non_blocking=True).to(torch.float32))  # (batch, 3, S, S)


def _photo() -> np.ndarray:
    import matplotlib
    from PIL import Image

    with Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")) as im:
        return np.asarray(im.convert("RGB"))  # (600, 512, 3): a real photograph


def make_photo_jpegs(root: str, size: tuple[int, int], count: int, classes: int = 4, quality: int = 90,
                     seed: int = 0) -> str:
    """`count` JPEGs of `size` (width, height) in root/<class>/, each a grid of tiles cut at native resolution from
    a real photograph (random offsets and mirrors per tile, so no two files are alike); returns root."""
    from PIL import Image

    photo = _photo()
    ph, pw = photo.shape[:2]
    width, height = size
    gx, gy = math.ceil(width / pw), math.ceil(height / ph)
    rng = np.random.default_rng(seed)
    for i in range(count):
        rows = []
        for ty in range(gy):
            th = (ty + 1) * height // gy - ty * height // gy
            tiles = []
            for tx in range(gx):
                tw = (tx + 1) * width // gx - tx * width // gx
                y, x = rng.integers(0, ph - th + 1), rng.integers(0, pw - tw + 1)
                tile = photo[y:y + th, x:x + tw]
                tiles.append(tile[:, ::-1] if rng.random() < 0.5 else tile)
            rows.append(np.concatenate(tiles, axis=1))
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(np.concatenate(rows, axis=0))).save(buf, "JPEG", quality=quality)
        with atomic_write(os.path.join(root, f"class_{i % classes}", f"photo_{i:05d}.jpg"), "wb") as f:
            f.write(buf.getvalue())
    return root


def _split(folder: str, workers: int):
    from train.datasets import index_folder
    from train.streaming import StreamSet

    folder = os.path.abspath(folder)
    root, split = (folder, "train") if os.path.isdir(os.path.join(folder, "train")) else os.path.split(folder)
    index, classes = index_folder(root, split)
    return StreamSet(index, classes, num_workers=workers)


def _time_batches(batches, warm: int, workers: int) -> tuple[float, float]:
    """(img/s by the clock, img per CPU-second of the decoding processes) over what `batches` yields after its
    first `warm` batches (start-up and the prefetch burst). The CPU figure is what one worker on a core of its own
    delivers, whatever else the machine runs: the workers' CPU time over every image they made (read when they exit
    at the end), or with 0 workers this process's CPU time over the timed batches."""
    import resource

    who = resource.RUSAGE_CHILDREN if workers else resource.RUSAGE_SELF

    def cpu() -> float:
        r = resource.getrusage(who)
        return r.ru_utime + r.ru_stime

    start_cpu, made = cpu(), 0
    for _ in range(warm):
        made += next(batches).shape[0]
    t0, c0, n, x = time.perf_counter(), cpu(), 0, None
    for x in batches:
        n += x.shape[0]
    if x is not None and x.device.type == "cuda":
        torch.cuda.synchronize()
    wall = n / (time.perf_counter() - t0)
    used = cpu() - (start_cpu if workers else c0)
    return wall, (n + made if workers else n) / used


def stream_rows(folder: str, device: torch.device, workers: int, img_size: int, batch: int, steps: int,
                label: str) -> list[dict]:
    split = _split(folder, workers).to(device)
    # When the first batch arrives, every worker is almost done with one (a whole batch each for the recipe's
    # loader): skip that burst, then the workers set the pace.
    warm = workers + 2
    runs = {"vitcore": (b.micro(slice(None))[0]
                        for b in split.train_batches(batch, 0, 1, 0, img_size, True, 1, warm + steps)),
            "torchvision recipe (PIL)": _recipe_batches(split, device, img_size, batch, warm + steps, False),
            "torchvision recipe, our boxes given": _recipe_batches(split, device, img_size, batch, warm + steps,
                                                                   True)}
    measured = {name: _time_batches(batches, warm, workers) for name, batches in runs.items()}
    ours_cpu = measured["vitcore"][1]
    common = {"images": label, "files": len(split), "img_size": img_size, "batch": batch, "workers": workers}
    return [{**common, "pipeline": name, "img_per_s": wall, "img_per_s_per_worker": wall / max(1, workers),
             "img_per_cpu_s": cpu, "vitcore_speedup": ours_cpu / cpu} for name, (wall, cpu) in measured.items()]


def _cores_line(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["pipeline"] == "vitcore":
            speedups = [f"{o['vitcore_speedup']:.2f}x {o['pipeline']}" for o in rows
                        if o["images"] == r["images"] and o["pipeline"] != "vitcore"]
            workers = math.ceil(FEED_TARGET / r["img_per_cpu_s"])
            lines.append(f"{r['images']}: {r['img_per_cpu_s']:.0f} img/s per worker on a core of its own "
                         f"({', '.join(speedups)}); {workers} such workers + 1 core for the training process keep "
                         f"a ViT-B_16 at {FEED_TARGET} img/s fed")
    return lines


def main() -> None:
    from train.streaming import default_num_workers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CIFAR: 224 px bf16 only; streaming: fewer files and steps")
    p.add_argument("--batch_size", "--batch-size", type=int, default=None,
                   help="default 512 (CIFAR), 256 (streaming; 128 with --quick)")
    p.add_argument("--iters", type=int, default=None, help="timed steps")
    p.add_argument("--device", default=None)
    p.add_argument("--imagefolder", default=None, help="benchmark the streaming path on these files (and on photos)")
    p.add_argument("--num_workers", "--num-workers", type=int, default=None,
                   help="data-loading workers (default: as train.finetune picks them)")
    p.add_argument("--img_size", "--img-size", type=int, default=224, help="streaming output size")
    p.add_argument("--photos", type=int, default=None, help="photo JPEGs made per size (default 64, quick 32)")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.imagefolder is None:
        sizes = (224,) if args.quick else (224, 384)
        dtypes = (torch.bfloat16,) if args.quick else (torch.float32, torch.bfloat16)
        iters = args.iters or (20 if device.type == "cuda" else 3)
        batch = args.batch_size or 512
        rows = []
        for size in sizes:
            for dtype in dtypes:
                ips = measure(device, size, batch, dtype, iters, warmup=2 if device.type == "cuda" else 1)
                rows.append({"img_size": size, "batch": batch, "out_dtype": str(dtype).replace("torch.", ""),
                             "img_per_s": ips, "ms_per_batch": 1000 * batch / ips,
                             "cpu_threads": torch.get_num_threads() if device.type == "cpu" else ""})
        # print_table appends the GPU's name; say so when the run was on the CPU of a GPU machine.
        print_table(rows, title="input pipeline" + (" on cpu" if device.type == "cpu" else ""))
        write_csv(os.path.join(results_dir(), "bench_input_pipeline.csv"), rows)
        return
    workers = default_num_workers() if args.num_workers is None else args.num_workers
    batch = args.batch_size or (128 if args.quick else 256)  # --quick fits the GPU pass's 45 s cap with 16 workers
    steps = args.iters or (8 if args.quick else 24)
    count = args.photos or (32 if args.quick else 64)
    rows = []
    work = tempfile.mkdtemp(prefix="bench_input_photos.")
    try:
        for w, h in PHOTO_SIZES:
            folder = make_photo_jpegs(os.path.join(work, f"{w}x{h}"), (w, h), count)
            rows += stream_rows(folder, device, workers, args.img_size, batch, steps, f"photo JPEGs {w}x{h}")
    finally:
        shutil.rmtree(work)
    rows += stream_rows(args.imagefolder, device, workers, args.img_size, batch, steps, args.imagefolder)
    cpu = f"{os.cpu_count()} cores" + (f", {len(os.sched_getaffinity(0))} usable" if hasattr(os, "sched_getaffinity")
                                        else "")
    print_table(rows, title=f"streaming input pipeline, {workers} workers ({cpu}), "
                            f"{datetime.date.today().isoformat()}")
    for line in _cores_line(rows):
        print(line)
    write_csv(os.path.join(results_dir(), "bench_input_pipeline.csv"), rows)


if __name__ == "__main__":
    main()
