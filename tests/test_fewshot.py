"""Few-shot linear evaluation: the solver against a numpy ridge reference and on separable classes, the
class-balanced subsets, the pre-logits features, and `python -m train.fewshot` on a .pt and an official .npz."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import reference_vit as ref
import torch
from cifar_fixtures import make_cifar10

import vitcore
from train import fewshot
from train.args import UsageError
from train.checkpointing import save_checkpoint
from train.fewshot import class_balanced_subset, extract_features, fewshot_accuracy, fit_least_squares


def _clusters(k: int, d: int, per_class: int, seed: int, spread: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = np.random.default_rng(seed)
    centres = g.normal(0, 3, size=(k, d))
    y = np.repeat(np.arange(k), per_class)
    x = centres[y] + g.normal(0, spread, size=(y.size, d))
    return torch.from_numpy(x).float(), torch.from_numpy(y)


def _numpy_ridge(x: np.ndarray, y: np.ndarray, k: int, l2: float) -> tuple[np.ndarray, ...]:
    # The formula written out in numpy, primal form only: standardise, append the bias constant 100,
    # w = (X^T X + l2 I)^-1 X^T (2 onehot - 1).
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    xs = np.concatenate([(x - mean) / std, np.full((x.shape[0], 1), 100.0)], axis=1)
    t = 2.0 * np.eye(k)[y] - 1.0
    w = np.linalg.inv(xs.T @ xs + l2 * np.eye(xs.shape[1])) @ xs.T @ t
    return mean, std, w


@pytest.mark.parametrize("n_per_class, d", [(20, 6), (2, 30)], ids=["primal", "dual"])
def test_least_squares_matches_the_numpy_formula(n_per_class, d):
    x, y = _clusters(4, d, n_per_class, seed=1)
    mean, std, w = fit_least_squares(x, y, 4, l2_reg=1024.0)
    rm, rs, rw = _numpy_ridge(x.double().numpy(), y.numpy(), 4, 1024.0)
    np.testing.assert_allclose(mean.numpy(), rm, rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), rs, rtol=1e-12)
    np.testing.assert_allclose(w.numpy(), rw, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("shots", [1, 5])
def test_solver_recovers_the_classes_of_separable_features(shots):
    x, y = _clusters(6, 32, 60, seed=2)
    idx = class_balanced_subset(y.numpy(), 6, shots, seed=0)
    test_x, test_y = _clusters(6, 32, 30, seed=2)  # the same centres, fresh noise
    assert fewshot_accuracy(x[idx], y[idx], test_x, test_y, 6) == 1.0
    # A constant (uninformative) representation gets chance, not more.
    assert fewshot_accuracy(torch.zeros(len(idx), 8), y[idx], torch.zeros(len(test_y), 8), test_y, 6) <= 1 / 6 + 1e-9


def test_class_balanced_subsets_are_nested_seeded_and_balanced():
    labels = np.random.default_rng(0).integers(0, 5, size=400)
    a = {n: class_balanced_subset(labels, 5, n, seed=0) for n in (1, 5, 10)}
    for n, idx in a.items():
        assert np.bincount(labels[idx], minlength=5).tolist() == [n] * 5
        assert len(set(idx.tolist())) == idx.size
    assert set(a[1]) <= set(a[5]) <= set(a[10])
    assert np.array_equal(class_balanced_subset(labels, 5, 5, seed=0), a[5])
    assert not np.array_equal(class_balanced_subset(labels, 5, 5, seed=1), a[5])
    with pytest.raises(UsageError, match="fewer than --shots 500"):
        class_balanced_subset(labels, 5, 500, seed=0)


def test_features_are_the_heads_input():
    cfg = vitcore.CONFIGS["testing"].replace(representation_size=7)
    torch.manual_seed(0)
    model = vitcore.VisionTransformer(cfg, img_size=32, num_classes=3, backend="torch")
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    feats = extract_features(model, images, 32, batch_size=2)
    with torch.no_grad():
        from train.data import eval_transform

        tokens = model.eval().forward_features(eval_transform(images, 32))  # (5, N, D)
        expected = torch.tanh(model.pre_logits(tokens[:, 0]))  # class token -> pre_logits
    assert feats.shape == (5, 7)
    torch.testing.assert_close(feats, expected)
    assert isinstance(model.head, torch.nn.Linear)  # put back


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot")
    make_cifar10(str(root / "data"), n_train=150, n_test=40)
    return root


def _read(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_fewshot_cli_on_a_training_checkpoint(data, capsys):
    cfg = vitcore.CONFIGS["testing"]
    torch.manual_seed(0)
    model = vitcore.VisionTransformer(cfg, img_size=32, num_classes=10, backend="torch")
    ck = str(data / "run.pt")
    save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(), "img_size": 32, "num_classes": 10,
                     "classes": [str(i) for i in range(10)]}, ck)
    out = data / "fs.csv"
    assert fewshot.main(["--checkpoint", ck, "--dataset", "cifar10", "--data_dir", str(data / "data"),
                         "--shots", "1", "3", "--seeds", "2", "--output", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    rows = _read(out)
    assert [r["shots"] for r in rows] == ["1", "3"] and set(rows[0]) == {"shots", "mean", "std", "seed_0", "seed_1"}
    for r in rows:
        accs = [float(r["seed_0"]), float(r["seed_1"])]
        assert all(0.0 <= a <= 1.0 for a in accs)
        assert float(r["mean"]) == pytest.approx(np.mean(accs), abs=1e-6)
        assert float(r["std"]) == pytest.approx(np.std(accs), abs=1e-6)
        assert f"{100 * float(r['mean']):6.2f} ± {100 * float(r['std']):.2f}" in printed
    # The colour classes are separable even through a random tiny ViT's pre-logits features.
    assert float(rows[1]["mean"]) > 0.3


def test_fewshot_cli_on_an_official_npz_keeps_its_pre_logits(data, capsys, monkeypatch):
    cfg = vitcore.CONFIGS["testing"]
    params = ref.random_params(cfg.replace(representation_size=6), 32, 21843, np.random.default_rng(0))
    path = str(data / "testing.npz")
    np.savez(path, **ref.to_pre_linen(params))
    seen = []
    real = fewshot.extract_features
    monkeypatch.setattr(fewshot, "extract_features", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    argv = ["--checkpoint", path, "--dataset", "cifar10", "--data_dir", str(data / "data"), "--shots", "2",
            "--seeds", "1", "--output", str(data / "npz.csv"), "--img_size", "32", "--device", "cpu"]
    assert fewshot.main(argv) == 0  # the arrays say the model: no --model_type needed
    assert seen and all(f.shape[1] == 6 for f in seen)  # pre_logits width, not the hidden size 10
    assert len(_read(data / "npz.csv")) == 1
    capsys.readouterr()
    assert fewshot.main(argv + ["--shots", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.fewshot: error: ") and "--shots" in err and "\n" not in err
