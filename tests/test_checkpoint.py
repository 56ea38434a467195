"""Official checkpoint loading and export: resize, head handling, errors, round-trip, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import reference_vit as ref
import scipy.ndimage
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import vitcore
from vitcore import CheckpointError, NpzError, VisionTransformer, ViTConfig
from vitcore.checkpoint import official_names
from vitcore.posembed import resize_grid

SMALL = ViTConfig(patch_size=16, hidden_size=16, mlp_dim=8, num_heads=2, num_layers=1)
HYBRID = ViTConfig(
    patch_size=1, hidden_size=16, mlp_dim=8, num_heads=2, num_layers=1, resnet_layers=(1, 1), resnet_width=0.5
)
ROOT_ONLY = HYBRID.replace(patch_size=2, resnet_layers=())  # R+ViT-Ti_16's layout: the ResNet root, no stages
R26_LIKE = HYBRID.replace(resnet_layers=(2, 2, 2, 2))


def write(path, params, compressed=False):
    (np.savez_compressed if compressed else np.savez)(path, **params)
    return str(path)


# ----------------------------------------------------------------------------- position embeddings


@given(old=st.integers(1, 24), new=st.integers(2, 30), channels=st.integers(1, 4), seed=st.integers(0, 2**16))
@example(old=14, new=24, channels=3, seed=0)  # 224 -> 384 at patch 16
@example(old=24, new=14, channels=3, seed=1)
@example(old=7, new=12, channels=2, seed=2)  # 224 -> 384 at patch 32
@example(old=16, new=27, channels=2, seed=3)  # ViT-H_14 224 -> 378
def test_resize_grid_equals_scipy_zoom_order1(old, new, channels, seed):
    grid = np.random.default_rng(seed).standard_normal((old, old, channels))
    want = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
    assert want.shape == (new, new, channels)
    got = resize_grid(torch.from_numpy(grid), new).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_224_checkpoint_loads_at_384_like_the_official_fine_tuning(tmp_path):
    """An i21k-style file (pre_logits, 21843 classes, 224 px) into a 384 px, 10-class model without pre_logits."""
    rng = np.random.default_rng(0)
    pre = SMALL.replace(representation_size=16)
    params = ref.random_params(pre, 224, 21843, rng)
    path = write(tmp_path / "i21k.npz", ref.to_pre_linen(params))
    model = VisionTransformer(SMALL, img_size=384, num_classes=10, backend="torch").eval()
    report = vitcore.load_pretrained(model, path)

    posemb = "Transformer/posembed_input/pos_embedding"
    assert report.resized == [posemb]
    assert report.reinitialized == ["head/kernel", "head/bias"]
    assert report.skipped == ["pre_logits/kernel", "pre_logits/bias"]
    assert "(1, 197, 16) -> (1, 577, 16)" in str(report) and "pre_logits/kernel" in str(report)
    assert model.head.weight.abs().sum() == 0 and model.head.bias.abs().sum() == 0

    # The official algorithm, written out with scipy: class token kept, 14x14 grid zoomed to 24x24.
    old = params[posemb]
    grid = scipy.ndimage.zoom(old[0, 1:].reshape(14, 14, -1).astype(np.float64), (24 / 14, 24 / 14, 1), order=1)
    want_posemb = np.concatenate([old[:, :1], grid.reshape(1, 576, -1)], axis=1)
    np.testing.assert_allclose(model.pos_embedding.detach().numpy(), want_posemb, rtol=1e-6, atol=1e-6)

    # And the encoder equals the reference run on the resized parameters.
    resized = {k: v for k, v in params.items() if not k.startswith(("pre_logits", "head"))}
    resized[posemb] = want_posemb
    resized["head/kernel"], resized["head/bias"] = np.zeros((16, 10)), np.zeros(10)
    images = rng.standard_normal((1, 3, 384, 384)).astype(np.float32)
    _, want_tokens, _ = ref.forward(resized, SMALL, images)
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(images)).double().numpy()
    assert np.linalg.norm(tokens - want_tokens) / np.linalg.norm(want_tokens) < 1e-5


def test_gap_model_resizes_a_grid_without_class_token(tmp_path):
    cfg = SMALL.replace(classifier="gap")
    params = ref.random_params(cfg, 32, 3, np.random.default_rng(1))  # 2x2 grid
    model = VisionTransformer(cfg, img_size=48, num_classes=3)
    report = vitcore.load_pretrained(model, write(tmp_path / "gap.npz", params))
    assert report.resized == ["Transformer/posembed_input/pos_embedding"] and not report.reinitialized
    old = params["Transformer/posembed_input/pos_embedding"][0].reshape(2, 2, -1)
    want = scipy.ndimage.zoom(old.astype(np.float64), (1.5, 1.5, 1), order=1).reshape(1, 9, -1)
    np.testing.assert_allclose(model.pos_embedding.detach().numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_classes", [1000, 21843])
def test_matching_head_is_kept(tmp_path, num_classes):
    params = ref.random_params(SMALL, 32, num_classes, np.random.default_rng(2))
    model = VisionTransformer(SMALL, img_size=32, num_classes=num_classes)
    report = vitcore.load_pretrained(model, write(tmp_path / "c.npz", params))
    assert not report.reinitialized and "head/kernel" in report.loaded
    np.testing.assert_array_equal(model.head.weight.detach().numpy(), params["head/kernel"].T)


# ----------------------------------------------------------------------------- errors


def test_every_mismatch_is_listed_in_one_error(tmp_path):
    params = ref.random_params(SMALL, 32, 5, np.random.default_rng(3))
    del params["Transformer/encoder_norm/scale"]
    params["Transformer/extra/kernel"] = np.zeros((3, 4), np.float32)
    params["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"] = np.zeros((16, 9), np.float32)
    params["Transformer/posembed_input/pos_embedding"] = np.zeros((1, 1 + 6, 16), np.float32)  # 6 not square
    model = VisionTransformer(SMALL, img_size=32, num_classes=5)
    with pytest.raises(CheckpointError) as info:
        vitcore.load_pretrained(model, write(tmp_path / "bad.npz", params))
    msg = str(info.value)
    assert "4 problem(s)" in msg
    assert "missing key Transformer/encoder_norm/scale: the model expects shape (16,)" in msg
    assert "unexpected key Transformer/extra/kernel with shape (3, 4)" in msg
    dense = "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"
    assert f"shape mismatch for {dense}: checkpoint (16, 9) vs model (16, 8)" in msg
    assert "cannot resize Transformer/posembed_input/pos_embedding: checkpoint (1, 7, 16) vs model (1, 5, 16)" in msg
    assert "square grid" in msg


def test_model_with_pre_logits_needs_them_in_the_checkpoint(tmp_path):
    params = ref.random_params(SMALL, 32, 5, np.random.default_rng(4))
    model = VisionTransformer(SMALL.replace(representation_size=16), img_size=32, num_classes=5)
    with pytest.raises(CheckpointError, match=r"missing key pre_logits/kernel: the model expects shape \(16, 16\)"):
        vitcore.load_pretrained(model, write(tmp_path / "c.npz", params))


def test_token_checkpoint_into_gap_model_is_an_error(tmp_path):
    params = ref.random_params(SMALL, 32, 5, np.random.default_rng(5))
    model = VisionTransformer(SMALL.replace(classifier="gap"), img_size=32, num_classes=5)
    with pytest.raises(CheckpointError, match=r"unexpected key cls with shape \(1, 1, 16\)"):
        vitcore.load_pretrained(model, params)


def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path):
    """Opening a FIFO blocks until a writer comes; load_npz, npz_index and load_pretrained must not open it."""
    import threading

    from vitcore.npz import npz_index

    fifo = tmp_path / "ViT-B_16.npz"
    os.mkfifo(fifo)
    calls = [vitcore.load_npz, npz_index, lambda p: vitcore.load_pretrained(VisionTransformer(SMALL, img_size=32), p)]
    errors: list[BaseException] = []

    def run():
        for call in calls:
            try:
                call(str(fifo))
            except NpzError as e:
                errors.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():  # blocked in open(): release it with a writer, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    assert len(errors) == 3
    assert all(str(e) == f"{fifo}: not a regular file (a FIFO (named pipe)); pass the path of the .npz file itself"
               for e in errors)
    with pytest.raises(NpzError, match="not a regular file \\(a character device\\)"):
        vitcore.load_npz(os.devnull)


def test_read_architecture_of_every_layout(tmp_path):
    from vitcore.checkpoint import read_architecture

    for cfg, img in ((SMALL.replace(representation_size=5), 48), (ROOT_ONLY, 16), (R26_LIKE, 64),
                     (SMALL.replace(classifier="gap", num_layers=3), 32)):
        params = ref.random_params(cfg, img, 6, np.random.default_rng(0), gn_4d=True)
        arch = read_architecture(write(tmp_path / "a.npz", ref.to_pre_linen(params)))
        assert arch == vitcore.checkpoint.Architecture(cfg, img, 6)
    with pytest.raises(CheckpointError, match="is not an official ViT checkpoint: no embedding/kernel"):
        read_architecture(write(tmp_path / "b.npz", {"x": np.zeros(3)}))


def test_not_an_npz_is_an_npz_error(tmp_path):
    path = tmp_path / "x.npz"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(NpzError, match="x.npz"):
        vitcore.load_pretrained(VisionTransformer(SMALL, img_size=32), str(path))


def test_failed_load_leaves_the_model_untouched(tmp_path):
    params = ref.random_params(SMALL, 32, 5, np.random.default_rng(6))
    params["Transformer/encoder_norm/bias"] = np.zeros(3, np.float32)
    model = VisionTransformer(SMALL, img_size=32, num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        vitcore.load_pretrained(model, write(tmp_path / "c.npz", params))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("cfg", [SMALL, SMALL.replace(representation_size=7, classifier="gap"), HYBRID, ROOT_ONLY,
                                 R26_LIKE])
@pytest.mark.parametrize("compressed", [False, True])
def test_save_npz_round_trips_exactly_with_official_names(tmp_path, cfg, compressed):
    torch.manual_seed(0)
    img = 2 * cfg.input_stride
    model = VisionTransformer(cfg, img_size=img, num_classes=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # no zero head / zero gn3: every value must survive
    path = vitcore.save_npz(model, tmp_path / "m.npz", compressed=compressed)
    assert os.listdir(tmp_path) == ["m.npz"]  # the temporary file was moved into place

    # numpy reads it; names and shapes are the official ones (drawn independently by the reference).
    with np.load(path, allow_pickle=False) as f:
        saved = {k: f[k] for k in f.files}
    official = ref.random_params(cfg, img, 4, np.random.default_rng(0))
    assert list(saved) == official_names(model)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in official.items()}
    assert all(v.dtype == np.float32 for v in saved.values())

    # The saved arrays run through the reference give the model's outputs.
    images = np.random.default_rng(1).standard_normal((2, 3, img, img)).astype(np.float32)
    want, _, _ = ref.forward(saved, cfg, images)
    with torch.no_grad():
        got = model(torch.from_numpy(images)).double().numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5

    clone = VisionTransformer(cfg, img_size=img, num_classes=4).eval()
    report = vitcore.load_pretrained(clone, path)
    assert sorted(report.loaded) == sorted(saved)
    for (name, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), name


def _fine_tuned(cfg, img, tmp_path):
    """A model fine-tuned as train.finetune does it: an i21k-style file (pre_logits, 21843 classes) loaded into a
    10-class model (zero head, pre_logits dropped), then SGD steps that move every parameter."""
    params = ref.random_params(cfg.replace(representation_size=cfg.hidden_size), img, 21843,
                               np.random.default_rng(11), gn_4d=cfg.is_hybrid)
    model = VisionTransformer(cfg, img_size=img, num_classes=10, backend="torch")
    vitcore.load_pretrained(model, write(tmp_path / "i21k.npz", params))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(0)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, img, img)), torch.randint(0, 10, (4,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("cfg, img", [(SMALL, 32), (ROOT_ONLY, 16), (R26_LIKE, 64)])
def test_save_npz_of_a_fine_tuned_model_round_trips_exactly(tmp_path, cfg, img):
    model = _fine_tuned(cfg, img, tmp_path)
    assert model.head.weight.abs().sum() > 0  # training moved the zero-initialised head
    path = vitcore.save_npz(model, tmp_path / "fine_tuned.npz")
    clone = VisionTransformer(cfg, img_size=img, num_classes=10, backend="torch").eval()
    report = vitcore.load_pretrained(clone, path)
    assert not report.resized and not report.reinitialized and not report.skipped
    for (name, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("cfg, img", [(SMALL, 32), (ROOT_ONLY, 16), (R26_LIKE, 64)])
def test_save_npz_of_a_fine_tuned_model_runs_in_flax(tmp_path, cfg, img):
    """Into the official architecture built from flax.linen's own layers, where flax is installed (not in CI)."""
    pytest.importorskip("flax")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    model = _fine_tuned(cfg, img, tmp_path)
    path = vitcore.save_npz(model, tmp_path / "fine_tuned.npz")
    from flax.traverse_util import unflatten_dict

    with np.load(path, allow_pickle=False) as f:
        tree = unflatten_dict({tuple(k.split("/")): f[k] for k in f.files})
    x = np.random.default_rng(2).standard_normal((2, img, img, 3)).astype(np.float32)  # NHWC, as JAX
    want = np.asarray(ref.flax_vit(cfg, num_classes=10).apply({"params": tree}, x), dtype=np.float64)
    with torch.no_grad():
        got = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).double().numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_save_npz_is_atomic(tmp_path, monkeypatch):
    model = VisionTransformer(SMALL, img_size=32, num_classes=4)
    target = tmp_path / "m.npz"
    target.write_bytes(b"previous")
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_write(*args, **kwargs)

    real_write = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    with pytest.raises(OSError, match="disk full"):
        vitcore.save_npz(model, target)
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.npz"]


def test_load_from_dict_and_meta_device(tmp_path):
    params = ref.random_params(HYBRID, 16, 3, np.random.default_rng(7), gn_4d=True)
    path = write(tmp_path / "h.npz", params)
    eager = VisionTransformer(HYBRID, img_size=16, num_classes=3).eval()
    vitcore.load_pretrained(eager, vitcore.load_npz(path))
    with torch.device("meta"):
        lazy = VisionTransformer(HYBRID, img_size=16, num_classes=3)
    vitcore.load_pretrained(lazy, path)
    lazy.eval()
    assert all(p.device.type == "cpu" for p in lazy.parameters())
    for (name, a), b in zip(eager.state_dict().items(), lazy.state_dict().values()):
        assert torch.equal(a, b), name


def test_meta_model_with_new_head_gets_a_zero_head(tmp_path):
    params = ref.random_params(SMALL, 32, 1000, np.random.default_rng(8))
    with torch.device("meta"):
        model = VisionTransformer(SMALL, img_size=32, num_classes=10)
    report = vitcore.load_pretrained(model, write(tmp_path / "c.npz", params))
    assert report.reinitialized == ["head/kernel", "head/bias"]
    assert model.head.weight.device.type == "cpu" and model.head.weight.abs().sum() == 0


# ----------------------------------------------------------------------------- memory

_RSS_CHILD = textwrap.dedent(
    """
    import json, os, sys, tempfile
    import torch, vitcore

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def build(cfg, img_size, meta):
        with torch.device("meta" if meta else "cpu"):
            return vitcore.VisionTransformer(cfg, img_size=img_size, num_classes=1000, backend="torch")

    torch.set_num_threads(1)
    path, cfg, meta = sys.argv[1], vitcore.ViTConfig(**json.loads(sys.argv[2])), sys.argv[3] == "meta"
    # Warm up on a tiny model first: the first use of a code path maps library pages and imports
    # modules (the meta device alone imports ~100 MB of torch), which is not the checkpoint's cost.
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build(cfg.replace(hidden_size=16, mlp_dim=8, num_heads=2, num_layers=1), 224, meta)
        vitcore.load_pretrained(tiny, vitcore.save_npz(build(tiny.config, 224, False), os.path.join(tmp, "t.npz")))
        del tiny
    base = status("VmRSS")
    report = vitcore.load_pretrained(build(cfg, 224, meta), path)
    print(json.dumps({"base": base, "peak": status("VmHWM"), "loaded": len(report.loaded)}))
    """
)


@pytest.mark.parametrize("construction", ["eager", "meta"])
def test_loading_does_not_double_memory(tmp_path, construction):
    """Peak RSS of building + loading, above the warmed-up interpreter, stays <= 1.25x the file."""
    cfg = vitcore.CONFIGS["ViT-B_16"].replace(num_layers=6)  # a 168 MiB file
    rng = np.random.default_rng(0)
    with torch.device("meta"):
        names = official_names(VisionTransformer(cfg, img_size=224, num_classes=1000))
    shapes = {k: v.shape for k, v in ref.random_params(cfg, 16, 1000, rng).items()}
    shapes["Transformer/posembed_input/pos_embedding"] = (1, 197, 768)
    path = tmp_path / "b16.npz"
    np.savez(path, **{k: rng.standard_normal(shapes[k], dtype=np.float32) for k in names})
    size = path.stat().st_size
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(path), json.dumps(cfg.to_dict()), construction],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == len(names)
    growth = result["peak"] - result["base"]
    assert growth <= 1.25 * size, f"peak RSS grew by {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"


def test_damaged_member_says_the_model_is_partially_loaded(tmp_path):
    # Every header is intact (shapes check out up front), but the largest member's data fails its CRC-32
    # past what the header check reads, so the failure comes mid-load and must say so.
    import zipfile

    cfg = ViTConfig(patch_size=16, hidden_size=64, mlp_dim=128, num_heads=2, num_layers=1)
    src = VisionTransformer(cfg, img_size=32, num_classes=3, backend="torch")
    path = vitcore.save_npz(src, tmp_path / "m.npz")
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.compress_size)
    assert info.compress_size > 100_000
    raw = bytearray(open(path, "rb").read())
    name_len, extra_len = np.frombuffer(raw[info.header_offset + 26 : info.header_offset + 30], "<u2")
    data_end = info.header_offset + 30 + int(name_len) + int(extra_len) + info.compress_size
    raw[data_end - 1] ^= 0x40
    open(path, "wb").write(bytes(raw))
    dst = VisionTransformer(cfg, img_size=32, num_classes=3, backend="torch")
    with pytest.raises(NpzError, match=r"CRC.*\n\(model left partially loaded: \d+ of \d+ arrays copied"):
        vitcore.load_pretrained(dst, path)
