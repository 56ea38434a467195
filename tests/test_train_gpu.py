"""GPU checks of the train package (skipped without CUDA): on-device augmentation equals the CPU result, and
short fine-tunes in bf16 (fused kernels) and fp16 (GradScaler) learn and report MFU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from cifar_fixtures import make_cifar10

from train.checkpointing import load_checkpoint
from train.data import augment_batch, crop_params

pytestmark = pytest.mark.gpu
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_augment_on_cuda_matches_cpu():
    imgs = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    boxes, flips = crop_params(64, 32, 32, seed=3, step=7, flip=True)
    cpu = augment_batch(imgs, boxes, flips, 224)
    gpu = augment_batch(imgs.cuda(), boxes, flips, 224).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-data")
    make_cifar10(str(root), n_train=500, n_test=205)
    return root


@pytest.mark.parametrize("precision, backend", [("bf16", "triton"), ("fp16", "torch")])
def test_short_cuda_finetune_learns(data_dir, tmp_path, precision, backend):
    cmd = [sys.executable, "-m", "train.finetune", "--data_dir", str(data_dir), "--output_dir", str(tmp_path),
           "--name", "run", "--model_type", "testing", "--pretrained_dir", "none", "--img_size", "32",
           "--train_batch_size", "32", "--num_steps", "60", "--eval_every", "30", "--warmup_steps", "5",
           "--learning_rate", "0.1", "--precision", precision, "--backend", backend, "--device", "cuda",
           "--no_progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "MFU" in summary, summary
    assert load_checkpoint(str(tmp_path / "run" / "best.pt"))["best_accuracy"] > 0.6
