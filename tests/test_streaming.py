"""The streaming input pipeline (train.streaming) on real JPEG/PNG files written with PIL: crop boxes per file size,
reduced-resolution JPEG decoding, every image mode, bad files, determinism across workers, ranks and resumes, and
memory that does not grow with the number of files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from train.data import crop_boxes, crop_draws, crop_params
from train.datasets import open_dataset, open_split
from train.streaming import BadImageError, FileIndex, StreamSet, decode_box, decode_rgb, draft_scale, open_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo() -> np.ndarray:
    """A real photograph (matplotlib's sample Grace Hopper portrait, 512 x 600), (H, W, 3) uint8."""
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def _pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour ramps plus a little noise: compresses like a photo, and no two pixels' neighbourhoods match."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 100 * np.sin((x + 2 * y) / 7)], -1)
    return (img + rng.normal(0, 4, img.shape)).clip(0, 255).astype(np.uint8)


def _folder(root, sizes_per_class: dict[str, list[tuple[int, int]]], split: str = "train", fmt: str = "JPEG") -> str:
    for k, (cls, sizes) in enumerate(sizes_per_class.items()):
        os.makedirs(root / split / cls, exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            ext = {"JPEG": "jpg"}.get(fmt, fmt.lower())
            Image.fromarray(_pattern(h, w, seed=100 * k + i)).save(root / split / cls / f"{i:04d}.{ext}", fmt)
    return str(root)


def _index(paths: list[str], labels: list[int]) -> FileIndex:
    root = os.path.dirname(paths[0])
    return FileIndex.from_paths(root, [os.path.relpath(p, root) for p in paths], labels)


def _steps(split: StreamSet, first: int, last: int, batch: int = 8, rank: int = 0, world: int = 1, size: int = 32,
           flip: bool = True) -> list:
    return [(b.step, b.images.clone(), b.labels.clone())
            for b in split.train_batches(batch, rank, world, 7, size, flip, first, last)]


# ---------------------------------------------------------------- crop boxes per file


def test_per_file_crop_boxes_are_the_cifar_path_boxes_of_each_size():
    # One set of draws per (seed, step); each row's box depends only on its own image size, exactly as the
    # GPU-resident path computes it for a batch of that size.
    sizes = [(32, 32), (375, 500), (768, 1024), (100, 20), (20, 100), (7, 300)]
    draws = crop_draws(len(sizes), seed=3, step=11, flip=True)
    heights, widths = (torch.tensor(v) for v in zip(*sizes))
    boxes, flips = crop_boxes(draws, heights, widths)
    for i, (h, w) in enumerate(sizes):
        ref_boxes, ref_flips = crop_params(len(sizes), h, w, seed=3, step=11, flip=True)
        assert torch.equal(boxes[i], ref_boxes[i]) and flips[i] == ref_flips[i], (h, w)
        x0, y0, bw, bh = boxes[i].tolist()
        assert 0 <= x0 and 0 <= y0 and x0 + bw <= w and y0 + bh <= h and bw >= 1 and bh >= 1


# ---------------------------------------------------------------- reduced-resolution decoding


def test_draft_scale_keeps_at_least_the_output_resolution():
    assert draft_scale(448, 600, 224) == 2 and draft_scale(447, 600, 224) == 1
    assert draft_scale(1800, 1792, 224) == 8 and draft_scale(1791, 2000, 224) == 4
    assert draft_scale(100, 100, 224) == 1


def _full_decode_reference(path: str, box, size: int) -> np.ndarray:
    # The torchvision recipe with PIL: decode everything, crop, resize (bilinear, antialiased).
    x0, y0, w, h = box
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").crop((x0, y0, x0 + w, y0 + h)).resize((size, size), Image.BILINEAR))


@pytest.mark.parametrize("box, scale", [((0, 0, 1024, 768), 2), ((100, 50, 900, 700), 2), ((10, 20, 447, 500), 1),
                                        ((300, 200, 200, 150), 1)])
def test_jpeg_drafts_only_when_the_crop_keeps_the_output_size_and_matches_a_full_decode(tmp_path, monkeypatch, box,
                                                                                        scale):
    photo = _photo()  # (600, 512, 3)
    big = np.concatenate([np.concatenate([photo[:384], photo[216:]], 0)[:768]] * 2, 1)  # (768, 1024, 3) real pixels
    path = str(tmp_path / "photo.jpg")
    Image.fromarray(big).save(path, quality=90)
    scales = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: scales.append(self.size[0] // size[0]) or real(self, mode, size))
    im, w, h, orientation = open_image(path)
    with im:
        ours = decode_box(im, orientation, box, 224).astype(np.float64)
    assert (w, h, orientation) == (1024, 768, 1)
    assert scales == ([scale] if scale > 1 else [])
    ref = _full_decode_reference(path, box, 224).astype(np.float64)
    # Within resize error of the full decode: the DCT-domain downscale is a slightly different low-pass.
    assert np.abs(ours - ref).mean() < 1.5 and np.percentile(np.abs(ours - ref), 99) < 12


def test_eval_decode_resizes_the_whole_image(tmp_path):
    path = str(tmp_path / "x.png")
    img = _pattern(50, 80)
    Image.fromarray(img).save(path)
    im, w, h, o = open_image(path)
    with im:
        out = decode_box(im, o, (0, 0, w, h), 40, flip=True)
    ref = np.asarray(Image.fromarray(img).resize((40, 40), Image.BILINEAR))[:, ::-1]
    assert out.shape == (40, 40, 3) and np.array_equal(out, ref)


# ---------------------------------------------------------------- every image mode to the right RGB pixels


def _saved(tmp_path, name: str, image: Image.Image, **kw) -> str:
    path = str(tmp_path / name)
    image.save(path, **kw)
    return path


def _close(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    return a.shape == b.shape and np.abs(a.astype(np.int64) - b.astype(np.int64)).mean() <= tol


def test_grayscale_palette_rgba_1bit_decode_to_rgb(tmp_path):
    rgb = _pattern(24, 32)
    gray = rgb[..., 0]
    assert np.array_equal(decode_rgb(_saved(tmp_path, "g.png", Image.fromarray(gray, "L"))), np.stack([gray] * 3, -1))
    gray_jpeg = decode_rgb(_saved(tmp_path, "g.jpg", Image.fromarray(gray, "L"), quality=95))
    assert _close(gray_jpeg, np.stack([gray] * 3, -1), 3) and (gray_jpeg == gray_jpeg[..., :1]).all()
    palette = np.array([[255, 0, 0], [0, 128, 255], [10, 200, 30], [250, 250, 250]], dtype=np.uint8)
    idx = (np.arange(24 * 32).reshape(24, 32) % 4).astype(np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette.ravel().tolist())
    assert np.array_equal(decode_rgb(_saved(tmp_path, "p.png", p)), palette[idx])
    assert np.array_equal(decode_rgb(_saved(tmp_path, "pt.png", p, transparency=2)), palette[idx])  # colour kept
    assert np.array_equal(decode_rgb(_saved(tmp_path, "p.gif", p)), palette[idx])
    rgba = np.concatenate([rgb, np.full((24, 32, 1), 40, np.uint8)], -1)
    assert np.array_equal(decode_rgb(_saved(tmp_path, "a.png", Image.fromarray(rgba, "RGBA"))), rgb)  # alpha dropped
    la = Image.fromarray(np.stack([gray, gray // 2], -1), "LA")
    assert np.array_equal(decode_rgb(_saved(tmp_path, "la.png", la)), np.stack([gray] * 3, -1))
    bits = gray > 128
    assert np.array_equal(decode_rgb(_saved(tmp_path, "b.png", Image.fromarray(bits).convert("1"))),
                          np.stack([bits * 255] * 3, -1).astype(np.uint8))


def test_cmyk_jpeg_decodes_to_rgb_not_inverted(tmp_path):
    h, w = 32, 48
    cmyk = np.zeros((h, w, 4), np.uint8)
    cmyk[:, :16] = [0, 255, 255, 0]  # red
    cmyk[:, 16:32] = [255, 0, 255, 0]  # green
    cmyk[:, 32:] = [0, 0, 0, 128]  # mid grey
    path = _saved(tmp_path, "cmyk.jpg", Image.fromarray(cmyk, "CMYK"), quality=95)  # Adobe-style CMYK JPEG
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    c, m, y, k = (cmyk[..., i].astype(np.float64) for i in range(4))
    expected = np.stack([(255 - c) * (255 - k) / 255, (255 - m) * (255 - k) / 255, (255 - y) * (255 - k) / 255], -1)
    got = decode_rgb(path).astype(np.float64)
    assert np.abs(got[:, 2:14] - expected[:, 2:14]).max() < 8  # away from the JPEG's colour edges
    assert np.abs(got - expected).mean() < 6


def test_16bit_png_scales_to_8bit(tmp_path):
    v = np.linspace(0, 65535, 24 * 32).reshape(24, 32).astype(np.uint16)
    path = _saved(tmp_path, "d.png", Image.fromarray(v))  # mode I;16
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # 16-bit grayscale, which PIL's own convert("RGB") would clip
    expected = np.round(v / 257).astype(np.uint8)
    assert np.array_equal(decode_rgb(path), np.stack([expected] * 3, -1))
    im, w, h, o = open_image(path)
    with im:
        resized = decode_box(im, o, (0, 0, w, h), 16)
    assert resized.mean() == pytest.approx(expected.mean(), abs=2)


# EXIF orientation -> how the stored pixels are made from the upright image D (the inverse of the display fix).
_STORE = {3: lambda d: np.rot90(d, 2), 6: lambda d: np.rot90(d, 1), 8: lambda d: np.rot90(d, -1),
          2: lambda d: d[:, ::-1], 5: lambda d: np.transpose(d, (1, 0, 2))}


@pytest.mark.parametrize("orientation", sorted(_STORE))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_rotated_images_decode_upright(tmp_path, orientation, fmt):
    upright = _pattern(30, 44)  # (H, W, 3), no symmetry
    stored = np.ascontiguousarray(_STORE[orientation](upright))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _saved(tmp_path, f"o{orientation}.{fmt.lower()}", Image.fromarray(stored), format=fmt, exif=exif,
                  **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}))
    im, w, h, o = open_image(path)
    with im:
        assert (w, h, o) == (44, 30, orientation)  # sizes as displayed, before anything is decoded
        crop = decode_box(im, o, (4, 2, 16, 16), 16)  # a crop of the upright image, at native size
    # JPEG: its own rounding only (a wrong orientation is off by ~50 on average, or has the wrong shape).
    tol = 3.0 if fmt == "JPEG" else 0.0
    assert _close(decode_rgb(path), upright, tol)
    assert _close(crop, upright[2:18, 4:20], tol)


def test_unsupported_mode_is_a_bad_file(tmp_path):
    path = _saved(tmp_path, "f.tif", Image.fromarray(np.zeros((8, 8), np.float32), "F"))
    split = StreamSet(_index([path], [0]), ["a"])
    with pytest.raises(BadImageError, match="unsupported image mode F"):
        list(split.eval_batches(8, 4))


# ---------------------------------------------------------------- bad files found late (at decode)


def _with_bad_file(tmp_path, kind: str) -> tuple[str, str]:
    """A train folder of 3 classes x 4 JPEGs in which 1/0002.jpg is replaced by a bad file of `kind`."""
    root = _folder(tmp_path, {c: [(40, 30)] * 4 for c in ("a", "b", "c")})
    bad = os.path.join(root, "train", "b", "0002.jpg")
    data = open(bad, "rb").read()
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "corrupt":
        data = data[:200] + bytes(range(256)) * 4
    open(bad, "wb").write(data)
    return root, bad


@pytest.mark.parametrize("kind", ["truncated", "corrupt"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_that_fails_to_decode_stops_with_its_path_and_the_fix(tmp_path, kind, workers):
    root, bad = _with_bad_file(tmp_path, kind)
    os.makedirs(os.path.join(root, "test", "a"))
    Image.fromarray(_pattern(10, 10)).save(os.path.join(root, "test", "a", "x.png"))
    train = open_dataset("imagefolder", root, num_workers=workers).train  # the header is fine: indexed
    assert len(train) == 12
    with pytest.raises(BadImageError) as e:
        _steps(train, 1, 3, batch=12)
    msg = str(e.value)
    assert bad in msg and "--skip_bad_images" in msg and "\n" not in msg


def test_skip_bad_images_logs_once_and_substitutes_the_next_image(tmp_path):
    root, bad = _with_bad_file(tmp_path, "truncated")
    os.makedirs(os.path.join(root, "test", "b"))
    Image.fromarray(_pattern(10, 10)).save(os.path.join(root, "test", "b", "x.png"))
    logs: list[str] = []
    splits = open_dataset("imagefolder", root, num_workers=2, skip_bad_images=True, log=logs.append)
    train = splits.train
    bad_pos = [train.index.path(i) for i in range(len(train))].index(bad)
    # 12 images, batch 12: every step holds every image once; three steps = three epochs.
    runs = [_steps(train, 1, 3, batch=12) for _ in range(2)]
    assert [m for m in logs if bad in m] == [f"warning: skipping unreadable image {bad} "
                                             f"({logs[0].split('(', 1)[1]}"]  # once, though read in 2 x 3 epochs
    for (s1, x1, y1), (s2, x2, y2) in zip(*runs):
        assert s1 == s2 and torch.equal(x1, x2) and torch.equal(y1, y2)  # deterministic
    # The substitute is the next file of the split, cropped with the bad file's draws: its label, its pixels.
    from train.data import StepSampler

    for step, images, labels in runs[0]:
        row = StepSampler(12, 12, 7).indices(step).tolist().index(bad_pos)
        nxt = bad_pos + 1
        assert labels[row] == train.index.labels[nxt]
        draws = crop_draws(12, 7, step, flip=True)[row:row + 1]
        im, w, h, o = open_image(train.index.path(nxt))
        boxes, flips = crop_boxes(draws, h, w)
        with im:
            expected = decode_box(im, o, boxes[0].tolist(), 32, flip=bool(flips[0] < 0))
        assert np.array_equal(images[row].numpy(), expected)


def test_skip_bad_images_leaves_a_bad_test_file_out_of_evaluation(tmp_path):
    root, bad = _with_bad_file(tmp_path, "corrupt")
    logs: list[str] = []
    split = open_split("imagefolder", root, "train", num_workers=1, skip_bad_images=True, log=logs.append)
    seen = sum(len(y) for _, y in split.eval_batches(16, 5))
    assert seen == 11 and sum(bad in m for m in logs) == 1


# ---------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Photo-sized JPEGs and PNGs of several sizes in 3 classes."""
    root = tmp_path_factory.mktemp("mixed")
    sizes = [(120, 90), (64, 80), (200, 150), (50, 50), (90, 160)]
    _folder(root, {"a": sizes, "b": sizes[::-1]})
    _folder(root, {"c": sizes[:3]}, fmt="PNG")
    _folder(root, {"a": sizes[:2], "b": sizes[:2], "c": sizes[:1]}, split="test")
    return str(root)


def test_workers_ranks_and_resumes_see_the_same_batches(mixed_folder):
    train = open_dataset("imagefolder", mixed_folder).train
    assert len(train) == 13
    one = _steps(train, 1, 6)
    train.num_workers = 2
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(one, _steps(train, 1, 6)))
    # Two processes: rank r holds rows [4r, 4r + 4) of each global batch.
    r0, r1 = _steps(train, 1, 6, rank=0, world=2), _steps(train, 1, 6, rank=1, world=2)
    for (s, x, y), a, b in zip(one, r0, r1):
        assert a[0] == b[0] == s and torch.equal(torch.cat([a[1], b[1]]), x) and torch.equal(torch.cat([a[2], b[2]]), y)
    # A resumed run (from step 4) continues with the uninterrupted run's batches.
    for a, b in zip(one[3:], _steps(train, 4, 6)):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert [s for s, _, _ in one] == list(range(1, 7))


def test_micro_batches_are_normalised_nchw(mixed_folder):
    train = open_dataset("imagefolder", mixed_folder).train
    batch = next(iter(train.train_batches(6, 0, 1, 0, 24, False, 1, 1)))
    x, y = batch.micro(slice(2, 5))
    assert x.shape == (3, 3, 24, 24) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.allclose(x, batch.images[2:5].permute(0, 3, 1, 2).float() / 127.5 - 1, atol=1e-6)
    assert torch.equal(y, batch.labels[2:5])


def test_eval_batches_cover_the_split_once_across_ranks(mixed_folder):
    test = open_dataset("imagefolder", mixed_folder, num_workers=2).test
    seen = []
    for rank in range(3):
        for x, y in test.eval_batches(16, 2, rank, 3):
            assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32
            seen.extend(y.tolist())
    assert sorted(seen) == sorted(test.index.labels.tolist()) and len(seen) == len(test) == 5


def test_default_workers_share_the_cores_among_local_processes(monkeypatch):
    from train.streaming import default_num_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_num_workers() == 7  # 16 cores / 2 processes, less one each for the process itself
    assert default_num_workers(1) == 15 and default_num_workers(8) == 1 and default_num_workers(32) == 1


# ---------------------------------------------------------------- memory


_RSS_CHILD = """
import json, resource, sys
from train.datasets import open_dataset, open_split
splits = open_dataset("imagefolder", sys.argv[1], num_workers=2)
for batch in splits.train.train_batches(32, 0, 1, 0, 64, True, 1, 8):
    pass
n = sum(len(y) for _, y in splits.test.eval_batches(64, 32))
print(json.dumps({"files": len(splits.train), "eval": n,
                  "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "workers_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _many_files(root, n: int) -> str:
    jpeg = io.BytesIO()
    Image.fromarray(_pattern(48, 64)).save(jpeg, "JPEG", quality=85)
    for i in range(n):
        folder = root / "train" / f"c{i % 4}"
        os.makedirs(folder, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(jpeg.getvalue())
    os.makedirs(root / "test" / "c0")
    (root / "test" / "c0" / "x.jpg").write_bytes(jpeg.getvalue())
    return str(root)


def test_memory_does_not_grow_with_the_number_of_files(tmp_path):
    # At 64 px, holding 6,000 more decoded images (as the old in-memory folder did) would take 74 MB more.
    peaks = {}
    for n in (2000, 8000):
        root = _many_files(tmp_path / str(n), n)
        proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, root], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        peaks[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert peaks[n]["files"] == n and peaks[n]["eval"] == 1
    grow = {k: (peaks[8000][k] - peaks[2000][k]) / 1024 for k in ("self_kb", "workers_kb")}
    assert grow["self_kb"] < 12 and grow["workers_kb"] < 12, (grow, peaks)


# ---------------------------------------------------------------- end to end: train.finetune on a streamed folder


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """A JPEG/PNG folder of 3 colour classes at several sizes (learnable from any crop) and an output folder."""
    root = tmp_path_factory.mktemp("stream_e2e")
    palette = [(220, 30, 40), (30, 200, 60), (40, 60, 220)]
    for split, n in (("train", 10), ("test", 4)):
        for k, name in enumerate(("red", "green", "blue")):
            os.makedirs(root / "data" / split / name)
            for i in range(n):
                w, h = 36 + 7 * i, 60 - 3 * i
                img = np.clip(np.array(palette[k]) + _pattern(h, w, seed=i)[..., :1] / 8 - 16, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / "data" / split / name / f"{i}.{'png' if i % 3 == 0 else 'jpg'}")
    return root


def _finetune(root, name: str, *extra: str, launcher: tuple[str, ...] = (), wait: bool = True):
    cmd = [sys.executable, *launcher, "-m", "train.finetune", "--dataset", "imagefolder", "--data_dir",
           str(root / "data"), "--output_dir", str(root / "runs"), "--name", name, "--model_type", "testing",
           "--pretrained_dir", "none", "--img_size", "32", "--train_batch_size", "8", "--eval_batch_size", "16",
           "--learning_rate", "0.05", "--warmup_steps", "5", "--num_workers", "2", "--no_progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _metrics(run_dir) -> list[dict]:
    import csv

    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_streamed_run_killed_and_resumed_ends_with_the_same_weights(streamed):
    import signal
    import time

    from train.checkpointing import load_checkpoint

    common = ("--num_steps", "12", "--eval_every", "4", "--augment", "official")  # dropout stays on (0.1)
    ref = _finetune(streamed, "ref", *common)
    assert ref.returncode == 0, ref.stderr
    victim = _finetune(streamed, "killed", *common, wait=False)
    last = streamed / "runs" / "killed" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert load_checkpoint(str(last))["step"] < 12
    resumed = _finetune(streamed, "killed", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (load_checkpoint(str(streamed / "runs" / n / "last.pt")) for n in ("ref", "killed"))
    assert b["step"] == 12 and b["train_size"] == 30
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    losses = [{r["step"]: r["loss"] for r in _metrics(streamed / "runs" / n) if r["split"] == "train"}
              for n in ("ref", "killed")]
    assert losses[0] == losses[1] and len(losses[0]) == 12


@pytest.fixture(scope="module")
def one_process(streamed):
    """4 steps without dropout, evaluated at step 4."""
    proc = _finetune(streamed, "one", "--num_steps", "4", "--eval_every", "4", "--dropout", "0")
    assert proc.returncode == 0, proc.stderr
    return streamed / "runs" / "one"


def test_streamed_two_processes_see_the_one_process_batches(streamed, one_process):
    # Steps 1..4 are warmup (their lr does not depend on --num_steps); without dropout the losses must agree.
    two = _finetune(streamed, "two", "--num_steps", "4", "--eval_every", "4", "--dropout", "0",
                    launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert two.returncode == 0 and "2 process(es)" in two.stderr, two.stderr
    losses = [[float(r["loss"]) for r in _metrics(streamed / "runs" / n) if r["split"] == "train"]
              for n in ("one", "two")]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)


def test_val_split_selects_on_val_and_tests_once_at_the_end(streamed):
    from train.checkpointing import load_checkpoint

    proc = _finetune(streamed, "val", "--num_steps", "6", "--eval_every", "2", "--val_split", "0.2")
    assert proc.returncode == 0, proc.stderr
    assert "(24 train / 6 val / 12 test)" in proc.stderr
    rows = _metrics(streamed / "runs" / "val")
    evals = [(int(r["step"]), r["split"]) for r in rows if r["split"] != "train"]
    assert evals == [(2, "val"), (4, "val"), (6, "val"), (6, "test")]
    best = load_checkpoint(str(streamed / "runs" / "val" / "best.pt"))
    assert best["best_accuracy"] == pytest.approx(max(float(r["accuracy"]) for r in rows if r["split"] == "val"))
    test_acc = float(rows[-1]["accuracy"])
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("done: best val accuracy") and f"test accuracy {100 * test_acc:.2f}%" in summary
    again = _finetune(streamed, "val", "--num_steps", "6", "--resume", "--val_split", "0.3")
    assert again.returncode == 2 and "--val_split 0.2" in again.stderr


def test_evaluate_cli_streams_the_test_split(one_process, capsys):
    from train import evaluate

    assert evaluate.main(["--checkpoint", str(one_process / "last.pt"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "on imagefolder test (12 images)" in out
    logged = next(float(r["accuracy"]) for r in _metrics(one_process) if r["split"] == "test")
    assert float(out.split("accuracy ")[1].split("%")[0]) == pytest.approx(100 * logged, abs=0.01)
