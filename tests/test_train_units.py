"""Fast in-process tests of the train package's parts: schedule, sampler, augmentation, args, safe unpickling,
checkpoint I/O, FLOP counting, download (against a local HTTP server) and metrics artifacts."""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import math
import os
import pickle
import tarfile
import threading
import time

import numpy as np
import pytest
import torch
from cifar_fixtures import make_cifar10, make_cifar10_tarball
from hypothesis import given
from hypothesis import strategies as st

import vitcore
from train.args import UsageError, parse_args
from train.checkpointing import load_checkpoint, save_checkpoint
from train.data import StepSampler, augment_batch, crop_params, eval_shard, eval_transform, load_cifar, normalize
from train.download import DownloadError, checkpoint_url, download, ensure_cifar, md5sum, safe_extract
from train.metrics import MetricsLogger, plot_curves, read_metrics
from train.safe_pickle import UnsafePickleError, safe_loads
from train.schedule import WarmupDecaySchedule
from vitcore.flops import forward_flops, mfu, peak_flops, train_flops

# ---------------------------------------------------------------- schedule


def test_schedule_matches_official_formula_at_known_points():
    s = WarmupDecaySchedule(0.03, total_steps=100, warmup_steps=10, decay_type="cosine")
    assert s(1) == pytest.approx(0.003)  # steps count from 1: the first step already has lr > 0
    assert s(10) == pytest.approx(0.03)
    assert s(55) == pytest.approx(0.015)  # halfway through the decay: cos(pi/2) = 0
    assert s(100) == pytest.approx(0.0, abs=1e-12)
    lin = WarmupDecaySchedule(0.03, total_steps=100, warmup_steps=0, decay_type="linear", linear_end=1e-5)
    assert lin(0) == pytest.approx(0.03)
    assert lin(100) == pytest.approx(1e-5)
    assert lin(50) == pytest.approx(1e-5 + (0.03 - 1e-5) * 0.5)


@given(st.integers(1, 50), st.integers(0, 60), st.sampled_from(["cosine", "linear"]))
def test_schedule_warms_up_monotonically_then_decays(total, warmup, decay):
    s = WarmupDecaySchedule(1.0, total, warmup, decay)
    lrs = [s(t) for t in range(1, total + 1)]
    assert all(0.0 <= v <= 1.0 + 1e-12 for v in lrs)
    peak = min(warmup, total) if warmup else 1
    assert all(a <= b + 1e-12 for a, b in zip(lrs[: peak - 1], lrs[1:peak]))
    assert all(a >= b - 1e-12 for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def test_schedule_state_roundtrip():
    s = WarmupDecaySchedule(0.1, 20, 3, "linear")
    t = WarmupDecaySchedule(1.0, 5, 0)
    t.load_state_dict(s.state_dict())
    assert [t(i) for i in range(1, 21)] == [s(i) for i in range(1, 21)]


# ---------------------------------------------------------------- sampler, shards, augmentation


@given(st.integers(1, 97), st.integers(1, 40), st.integers(0, 3))
def test_sampler_covers_each_epoch_once_and_is_stateless(n, batch, seed):
    s = StepSampler(n, batch, seed)
    steps = -(-3 * n // batch)
    stream = torch.cat([s.indices(t) for t in range(1, steps + 1)])
    for e in range(3):  # every epoch is a permutation
        assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n))
    # A fresh sampler (a resumed run) gives the same batch for a late step without replaying history.
    assert torch.equal(StepSampler(n, batch, seed).indices(steps), s.indices(steps))


@given(st.integers(0, 50), st.integers(1, 5))
def test_eval_shards_partition_the_test_set(n, world):
    shards = [eval_shard(n, r, world).tolist() for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(n))  # no duplicates, remainder included


@given(st.integers(8, 64), st.integers(8, 64), st.integers(0, 10))
def test_crop_params_lie_inside_the_image_with_area_in_scale(h, w, step):
    boxes, flips = crop_params(64, h, w, seed=1, step=step, flip=True)
    x0, y0, bw, bh = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x0 + bw <= w).all() and (y0 + bh <= h).all()
    assert (bw >= 1).all() and (bh >= 1).all()
    assert ((flips == 1) | (flips == -1)).all()
    assert torch.equal(crop_params(64, h, w, seed=1, step=step, flip=True)[0], boxes)  # pure function of the step


def test_augment_full_box_is_identity_and_flip_mirrors():
    img = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8)
    full = torch.tensor([[0.0, 0.0, 24.0, 20.0]]).repeat(3, 1)
    out = augment_batch(img, full, torch.tensor([1.0, -1.0, 1.0]), size=40)
    # The whole image as the box is a plain resize: it must equal the F.interpolate-based eval transform.
    ref = eval_transform(img, 40)
    assert torch.allclose(out[0], ref[0], atol=1e-4)
    assert torch.allclose(out[1], ref[1].flip(-1), atol=1e-4)
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_augment_crop_equals_slice_at_native_size():
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    boxes = torch.tensor([[5.0, 7.0, 16.0, 16.0], [0.0, 10.0, 16.0, 16.0]])
    out = augment_batch(img, boxes, torch.ones(2), size=16)
    assert torch.allclose(out[0], normalize(img[0, :, 7:23, 5:21].float()), atol=1e-4)
    assert torch.allclose(out[1], normalize(img[1, :, 10:26, 0:16].float()), atol=1e-4)


# ---------------------------------------------------------------- args


def test_args_accept_a_jeonsworld_command_line_unchanged():
    # Its README: python3 train.py --name cifar10-100_500 --dataset cifar10 --model_type ViT-B_16
    #   --pretrained_dir checkpoint/ViT-B_16.npz --fp16 --fp16_opt_level O2 (plus --local_rank from the launcher)
    a = parse_args(["--name", "cifar10-100_500", "--dataset", "cifar10", "--model_type", "ViT-B_16",
                    "--pretrained_dir", "checkpoint/ViT-B_16.npz", "--fp16", "--fp16_opt_level", "O2",
                    "--loss_scale", "0", "--local_rank", "3"])
    assert (a.precision, a.model_type, a.dataset, a.name) == ("fp16", "ViT-B_16", "cifar10", "cifar10-100_500")
    with pytest.raises(UsageError, match="invalid int value"):
        parse_args(["--local_rank", "x"])


def test_args_accept_both_spellings_and_fp16_alias():
    a = parse_args(["--train-batch-size", "64", "--eval_batch_size", "8", "--model-type", "testing",
                    "--img_size", "32", "--fp16", "--gradient-accumulation-steps", "2"])
    assert (a.train_batch_size, a.eval_batch_size, a.model_type, a.precision) == (64, 8, "testing", "fp16")
    assert a.gradient_accumulation_steps == 2
    d = parse_args([])
    assert (d.model_type, d.img_size, d.learning_rate, d.num_steps, d.warmup_steps) == ("ViT-B_16", 224, 3e-2,
                                                                                        10000, 500)


@pytest.mark.parametrize("argv, fragment", [
    (["--model_type", "ViT-Q_99"], "valid names"),
    (["--model_type", "testing", "--img_size", "30"], "input stride 16"),
    (["--model_type", "R50-ViT-B_16", "--img_size", "200"], "input stride 16"),
    (["--train_batch_size", "10", "--gradient_accumulation_steps", "3"], "divisible"),
    (["--no_such_flag"], "unrecognized"),
])
def test_args_errors_are_one_line(argv, fragment):
    with pytest.raises(UsageError) as e:
        parse_args(argv)
    assert fragment in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- safe unpickling


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_safe_pickle_loads_cifar_like_dicts_at_every_protocol():
    d = {b"data": np.arange(24, dtype=np.uint8).reshape(2, 12), b"labels": [3, 4], b"batch_label": b"x",
         b"names": ["a", "b"], b"n": 7}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        got = safe_loads(pickle.dumps(d, protocol=protocol))
        assert np.array_equal(got[b"data"], d[b"data"]) and got[b"labels"] == [3, 4] and got[b"n"] == 7


@pytest.mark.parametrize("payload", [_Evil(), {b"data": _Evil()}, [1, functools.partial(print, "hi")]])
def test_safe_pickle_refuses_function_calls(payload):
    with pytest.raises(UnsafePickleError, match="refusing"):
        safe_loads(pickle.dumps(payload, protocol=2))


def test_safe_pickle_refuses_object_arrays():
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps({b"data": np.array([1, "x"], dtype=object)}))


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip_is_atomic_and_weights_only(tmp_path):
    path = str(tmp_path / "last.pt")
    state = {"step": 3, "model": {"w": torch.randn(4, 4)}, "rng": {"torch": torch.get_rng_state()},
             "args": {"name": "x", "lr": 0.1, "flag": None}, "config": vitcore.CONFIGS["testing"].to_dict()}
    save_checkpoint(state, path)
    got = load_checkpoint(path)
    assert got["step"] == 3 and torch.equal(got["model"]["w"], state["model"]["w"])
    assert vitcore.ViTConfig.from_dict(got["config"]) == vitcore.CONFIGS["testing"]
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left


def test_checkpoint_with_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"model": _Evil()}, path)  # a full pickle, as an attacker would ship it
    with pytest.raises(UnsafePickleError) as e:
        load_checkpoint(path)
    # It names the refused global and never passes on torch's advice to load with weights_only=False.
    msg = str(e.value)
    assert "tries to run code" in msg and "posix.system" in msg and path in msg
    assert "weights_only" not in msg and "False" not in msg


# ---------------------------------------------------------------- flops


@pytest.mark.parametrize("name, gmacs", [("ViT-B_16", 17.56), ("ViT-L_16", 61.6), ("ViT-B_32", 4.41)])
def test_flops_counted_on_the_model_match_the_published_figures(name, gmacs):
    # Published multiply-adds at 224 px with a 1000-class head (timm's model cards: 17.6 / 61.6 / 4.4 GMACs).
    f = forward_flops(vitcore.CONFIGS[name], 224, 1000)
    assert f == pytest.approx(2e9 * gmacs, rel=5e-3)
    # The backward costs about twice the forward (no gradient for the input images' patch-embedding conv).
    assert 2.9 < train_flops(vitcore.CONFIGS[name], 224, 1000) / f <= 3.0


def test_flops_follow_the_architecture():
    base = vitcore.ViTConfig(patch_size=8, hidden_size=32, mlp_dim=48, num_heads=4, num_layers=2)
    deeper, wider_mlp = base.replace(num_layers=4), base.replace(mlp_dim=96)
    per_block = forward_flops(deeper, 32, 7) - forward_flops(base, 32, 7)
    n, d = 1 + (32 // 8) ** 2, 32
    # Two blocks: qkv + out projections, q k^T and attn v, the MLP's two Linears (2 FLOPs per multiply-add).
    assert per_block == pytest.approx(2 * 2 * (n * d * 4 * d + 2 * n * n * d + 2 * n * d * 48))
    assert forward_flops(wider_mlp, 32, 7) - forward_flops(base, 32, 7) == pytest.approx(2 * 2 * 2 * n * d * 48)
    hybrid = base.replace(patch_size=1, resnet_layers=(1,), resnet_width=0.5)
    assert forward_flops(hybrid, 32, 7) > forward_flops(base, 32, 7)  # the ResNet's convolutions count


def test_vit_b16_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("cpu", "bf16") is None
    u = mfu(1000.0, vitcore.CONFIGS["ViT-B_16"], 224, 10, "NVIDIA H100 80GB HBM3", "bf16")
    assert u == pytest.approx(1000 * train_flops(vitcore.CONFIGS["ViT-B_16"], 224, 10) / 989e12)
    assert mfu(1000.0, vitcore.CONFIGS["ViT-B_16"], 224, 10, "cpu", "bf16") is None


# ---------------------------------------------------------------- download


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_and_extract_cifar_from_local_server(http_server, tmp_path):
    root, base = http_server
    tarball = make_cifar10_tarball(str(root / "cifar-10-python.tar.gz"), n_train=50, n_test=20)
    data_dir = tmp_path / "data"
    folder = ensure_cifar("cifar10", str(data_dir), url=base + "/cifar-10-python.tar.gz", md5=md5sum(tarball),
                          progress=False)
    assert sorted(os.listdir(data_dir)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    test = load_cifar(folder, "cifar10", train=False)
    assert test.images.shape == (20, 3, 32, 32) and test.images.dtype == torch.uint8
    assert test.classes[3] == "cat"
    # Second call: the extracted folder is used as is, no network needed.
    assert ensure_cifar("cifar10", str(data_dir), url="http://127.0.0.1:9/none.tar.gz", md5="0" * 32) == folder


def test_download_wrong_md5_leaves_nothing(http_server, tmp_path):
    root, base = http_server
    make_cifar10_tarball(str(root / "cifar-10-python.tar.gz"), n_train=10, n_test=5)
    target = tmp_path / "dl" / "cifar-10-python.tar.gz"
    with pytest.raises(DownloadError, match="md5 mismatch"):
        download(base + "/cifar-10-python.tar.gz", str(target), md5="0" * 32, progress=False)
    assert os.listdir(target.parent) == []


def test_offline_message_names_url_and_path(http_server, tmp_path):
    _, base = http_server
    target = tmp_path / "checkpoint" / "ViT-B_16.npz"
    with pytest.raises(DownloadError) as e:
        download(base + "/missing.npz", str(target), progress=False)  # 404
    assert base + "/missing.npz" in str(e.value) and str(target) in str(e.value)
    assert os.listdir(target.parent) == []


def test_checkpoint_url_maps_hybrid_name():
    assert checkpoint_url("ViT-B_16") == "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz"
    assert checkpoint_url("R50-ViT-B_16").endswith("/imagenet21k/R50+ViT-B_16.npz")


def test_safe_extract_refuses_path_traversal(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DownloadError, match="outside"):
        safe_extract(str(archive), str(dest))
    assert not (tmp_path / "escaped.txt").exists()


# ---------------------------------------------------------------- metrics


def test_metrics_resume_drops_rows_after_checkpoint_and_plots(tmp_path):
    run = str(tmp_path / "run")
    log = MetricsLogger(run)
    for step in range(1, 7):
        log.log(step, "train", loss=1.0 / step, lr=0.1, img_per_s=10.0)
    log.log(5, "test", loss=0.5, accuracy=0.9)
    log.close()
    resumed = MetricsLogger(run, resume_step=4)  # the killed run got to 6, its checkpoint is at 4
    resumed.log(5, "train", loss=0.2, lr=0.1)
    resumed.close()
    rows = read_metrics(os.path.join(run, "metrics.csv"))
    assert [(r["step"], r["split"]) for r in rows] == [(float(s), "train") for s in range(1, 6)]
    assert rows[-1]["loss"] == pytest.approx(0.2)
    out = os.path.join(run, "curves.png")
    plot_curves(os.path.join(run, "metrics.csv"), out)
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(run, "tensorboard")))
    assert math.isfinite(rows[0]["loss"])


# ---------------------------------------------------------------- finetune wiring (no training)


def _png(path, value: int, size=(8, 8)) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, dtype=np.uint8)).save(path)


def test_pretrained_dir_may_be_a_folder_holding_the_model_file(tmp_path):
    from train.finetune import _pretrained_path

    args = parse_args(["--model_type", "ViT-B_32", "--pretrained_dir", str(tmp_path)])
    assert _pretrained_path(args) == os.path.join(str(tmp_path), "ViT-B_32.npz")
    args = parse_args(["--model_type", "ViT-B_32", "--pretrained-dir", str(tmp_path / "mine.npz")])
    assert _pretrained_path(args) == str(tmp_path / "mine.npz")
    assert _pretrained_path(parse_args(["--pretrained_dir", "None"])) is None
    assert _pretrained_path(parse_args(["--model_type", "ViT-L_16"])) == os.path.join("checkpoint", "ViT-L_16.npz")


def test_load_data_reads_each_split_once(tmp_path, monkeypatch):
    # Indexing an image folder is the slow part of start-up: the training split must not be listed twice, and
    # nothing is decoded up front (the split streams from its files).
    import train.datasets as datasets_mod
    from train.distributed import DistInfo
    from train.finetune import _load_data
    from train.streaming import StreamSet

    for split in ("train", "test"):
        for k, cls in enumerate(["a", "b"]):
            _png(str(tmp_path / split / cls / "0.png"), 60 * k)
    calls = []
    real = datasets_mod.index_folder
    monkeypatch.setattr(datasets_mod, "index_folder", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw))
    args = parse_args(["--dataset", "imagefolder", "--data_dir", str(tmp_path), "--img_size", "16",
                       "--model_type", "testing", "--no_progress"])
    train_set, test_set, final_test = _load_data(args, DistInfo(0, 0, 1, torch.device("cpu")))
    assert sorted(calls) == ["test", "train"] and final_test is None
    assert len(train_set) == len(test_set) == 2 and isinstance(train_set, StreamSet)


def test_imagefolder_test_split_with_an_unknown_class_is_refused(tmp_path):
    from train.data import load_imagefolder

    for cls in ("a", "b", "c"):
        _png(str(tmp_path / "test" / cls / "0.png"), 10)
    os.makedirs(tmp_path / "test" / "empty")
    # Dropping class c's images would report accuracy on part of the test set.
    with pytest.raises(UsageError, match="not trained on: c"):
        load_imagefolder(str(tmp_path), "test", 8, classes=["a", "b"])
    assert len(load_imagefolder(str(tmp_path), "test", 8, classes=["a", "b", "c"])) == 3


def test_metrics_resume_keeps_the_checkpoint_steps_tensorboard_events(tmp_path):
    # The killed run evaluated at step 4 (its last.pt) and logged up to 6; the resumed run starts at step 5, so
    # TensorBoard must drop steps 5 and 6 only, not the step-4 test accuracy nobody will log again.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = str(tmp_path / "run")
    log = MetricsLogger(run)
    for step in range(1, 7):
        log.log(step, "train", loss=1.0 / step, lr=0.1)
    log.log(4, "test", loss=0.5, accuracy=0.9)
    log.close()
    # TensorBoard reads event files in name order: <unix seconds>.<host>.<pid>.<per-process counter>. A real resume
    # is a later process; here, a later second keeps the counter's lexicographic order ("10" < "9") out of it.
    time.sleep(1.1)
    resumed = MetricsLogger(run, resume_step=4)
    resumed.log(5, "train", loss=0.2, lr=0.1)
    resumed.close()
    events = EventAccumulator(os.path.join(run, "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert events.Scalars("train/loss")[-1].value == pytest.approx(0.2)
    assert [(e.step, e.value) for e in events.Scalars("test/accuracy")] == [(4, pytest.approx(0.9))]


def test_download_cut_short_by_the_server_leaves_nothing(tmp_path):
    # A connection closed before Content-Length bytes reads as a quiet end of stream in http.client; a checkpoint
    # has no md5, so without a length check the truncated file would be kept under its final name.
    class Truncating(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 300)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Truncating)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        target = tmp_path / "checkpoint" / "ViT-B_16.npz"
        with pytest.raises(DownloadError, match="300 of 1000 bytes") as e:
            download(f"http://127.0.0.1:{server.server_address[1]}/ViT-B_16.npz", str(target), progress=False)
        assert str(target) in str(e.value)
        assert os.listdir(target.parent) == []
    finally:
        server.shutdown()
        server.server_close()


def test_each_node_downloads_its_own_data(tmp_path, monkeypatch):
    # Nodes of a multi-node job need not share a filesystem: the first process of every node (LOCAL_RANK 0)
    # fetches CIFAR, not only global rank 0; the other local ranks wait at the barrier.
    import train.finetune as ft
    from train.distributed import DistInfo

    make_cifar10(str(tmp_path), n_train=20, n_test=10)
    calls = []
    record = lambda dataset, data_dir, **kw: calls.append((dataset, data_dir))  # noqa: E731
    monkeypatch.setattr("train.download.ensure_cifar", record)
    monkeypatch.setattr(ft, "ensure_cifar", record, raising=False)
    args = parse_args(["--data_dir", str(tmp_path), "--img_size", "32", "--model_type", "testing", "--no_progress"])
    cpu = torch.device("cpu")
    ft._load_data(args, DistInfo(rank=4, local_rank=0, world_size=8, device=cpu))  # node 1's first process
    assert calls == [("cifar10", str(tmp_path))]
    train_set, test_set, _ = ft._load_data(args, DistInfo(rank=5, local_rank=1, world_size=8, device=cpu))
    assert len(calls) == 1 and len(train_set) == 20 and len(test_set) == 10


def test_oom_advice_suggests_an_accumulation_that_passes_validation():
    from train.finetune import _oom_advice

    # 12 images per process in 4 micro-batches: doubling to 8 would be refused (12 % 8), 6 is the next that fits.
    msg = _oom_advice(step=3, micro=3, accum=4, per_rank=12, global_batch=24)
    assert "--gradient_accumulation_steps 6 " in msg and "at step 3" in msg
    parse_args(["--train_batch_size", "24", "--gradient_accumulation_steps", "6"])  # accepted
    assert "--gradient_accumulation_steps 2 " in _oom_advice(1, 512, 1, 512, 512)
    assert "one image per micro-batch" in _oom_advice(1, 1, 8, 8, 16)


def test_explicit_flags_are_only_those_the_command_line_gives():
    from train.args import build_parser, explicit_flags

    given = explicit_flags(build_parser(), ["--num-steps", "80", "--fp16", "--resume", "--name", "r"])
    assert given == {"num_steps": 80, "precision": "fp16", "resume": "yes", "name": "r"}
    assert explicit_flags(build_parser(), []) == {}
    # The normal parser keeps its defaults (the second parse works on its own parser).
    assert parse_args(["--resume", "auto", "--name", "x"]).resume == "auto"
    assert parse_args([]).resume is None and parse_args([]).name is None


def test_help_states_every_flags_default():
    from train.args import _DefaultsFormatter, build_parser

    parser = build_parser()
    fmt = _DefaultsFormatter(parser.prog)
    for action in parser._actions:
        if action.option_strings and action.default is not argparse.SUPPRESS:
            shown = fmt._format_action(action)
            assert "default" in shown, action.option_strings


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "-0.5", "1", "x"])
def test_finite_float_refuses_non_finite_and_out_of_range(text):
    from train.args import finite_float

    with pytest.raises(argparse.ArgumentTypeError):
        finite_float(0, 1, hi_open=True)(text)
    assert finite_float(0, 1, hi_open=True)("0.25") == 0.25 and finite_float()("-3") == -3.0


def test_run_lock_is_exclusive_and_a_dead_holders_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    from train.run_folder import RunLock

    run = str(tmp_path / "run")
    first = RunLock(run)
    assert first.acquire() is None
    with pytest.raises(UsageError, match=f"in use by PID {os.getpid()} on host"):
        RunLock(run).acquire()  # another open file description: flock refuses it even in this process
    first.release()
    assert not os.path.exists(os.path.join(run, ".lock"))
    # A holder killed with SIGKILL: the kernel drops its flock, its file stays and names it.
    code = "import os, sys; from train.run_folder import RunLock; l = RunLock(sys.argv[1]); l.acquire(); os._exit(9)"
    subprocess.run([sys.executable, "-c", code, run], check=False)
    again = RunLock(run)
    note = again.acquire()
    assert note is not None and "no longer running" in note
    again.release()


def test_move_aside_keeps_every_file_and_the_lock(tmp_path):
    from train.run_folder import move_aside

    run = tmp_path / "r"
    (run / "tensorboard").mkdir(parents=True)
    (run / "last.pt").write_bytes(b"x")
    (run / ".lock").write_text("PID 1")
    dest = move_aside(str(run))
    assert sorted(os.listdir(dest)) == ["last.pt", "tensorboard"] and os.listdir(run) == [".lock"]
    assert os.path.basename(dest).startswith("r.old-")


def test_one_line_strips_terminal_control_sequences():
    from train.cli import one_line

    assert one_line("bad \x1b[31mred\x1b[0m name\n\x1b]0;title\x07second line\x07") == "bad red name; second line"
