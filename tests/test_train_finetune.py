"""End-to-end tests of `python -m train.finetune` on generated CIFAR-10-format data and a generated official npz:
learning and artifacts, resume after SIGKILL, 2-process torchrun, the evaluate/predict/attention_map CLIs, and
one-line errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import reference_vit as ref
import torch
from cifar_fixtures import PALETTE, make_cifar10
from PIL import Image

import vitcore
from train import attention_map, evaluate, finetune, predict
from train.checkpointing import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    make_cifar10(str(root / "data"), n_train=500, n_test=205)
    # Laid out as a published imagenet21k file: pre-linen names, a 21843-class head and pre_logits (which the
    # testing config lacks: loading drops it).
    cfg = vitcore.CONFIGS["testing"]
    params = ref.random_params(cfg.replace(representation_size=cfg.hidden_size), 224, 21843, np.random.default_rng(0))
    np.savez(root / "testing.npz", **ref.to_pre_linen(params))
    return root


def _args(work, name: str, *extra: str) -> list[str]:
    return ["--data_dir", str(work / "data"), "--output_dir", str(work / "runs"), "--name", name,
            "--model_type", "testing", "--pretrained_dir", str(work / "testing.npz"), "--img_size", "32",
            "--train_batch_size", "16", "--eval_batch_size", "64", "--warmup_steps", "5", "--learning_rate", "0.1",
            "--no_progress", *extra]


def _env() -> dict[str, str]:
    # One thread per process: runs are then reproducible and do not fight over the machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


def _finetune(work, name: str, *extra: str, launcher: list[str] | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [PY, *(launcher or []), "-m", "train.finetune", *_args(work, name, *extra)]
    return subprocess.run(cmd, cwd=REPO, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=300)


def _train_losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["split"] == "train"}


@pytest.fixture(scope="module")
def base_run(work):
    """40 steps without dropout: the run the CLI tests read and the 1-process reference of the torchrun test."""
    proc = _finetune(work, "base", "--num_steps", "40", "--eval_every", "20", "--dropout", "0")
    assert proc.returncode == 0, proc.stderr
    return work / "runs" / "base", proc


def test_finetune_learns_and_writes_every_artifact(base_run):
    run, proc = base_run
    assert sorted(os.listdir(run)) == ["args.json", "best.pt", "curves.png", "last.pt", "metrics.csv", "tensorboard"]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("done: best accuracy") and "img/s" in summary and "wall time" in summary
    best = load_checkpoint(str(run / "best.pt"))
    assert best["best_accuracy"] > 0.6  # chance is 0.1
    last = load_checkpoint(str(run / "last.pt"))
    assert last["step"] == 40
    for key in ("model", "optimizer", "scaler", "config", "args", "classes", "best_accuracy", "best_step"):
        assert key in last
    # Only what resume reads: data order, crops and dropout are functions of (seed, step); the schedule is rebuilt.
    assert not {"scheduler", "sampler", "rng"} & set(last)
    # Files come out with the permissions the umask gives (a colleague can read them), not mkstemp's 0600.
    mask = os.umask(0)
    os.umask(mask)
    for name in ("best.pt", "last.pt", "metrics.csv", "args.json", "curves.png"):
        assert stat.S_IMODE(os.stat(run / name).st_mode) == 0o666 & ~mask, name
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["split"] == "train"] == list(range(1, 41))
    tests = [r for r in rows if r["split"] == "test"]
    assert [int(r["step"]) for r in tests] == [20, 40]
    assert max(float(r["accuracy"]) for r in tests) == pytest.approx(best["best_accuracy"])
    assert json.loads((run / "args.json").read_text())["model_type"] == "testing"
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run / "tensorboard"))


def test_resume_after_sigkill_gives_the_same_weights(work):
    # Dropout stays on (the testing config's 0.1): its randomness must be reproduced too.
    common = ("--num_steps", "40", "--eval_every", "10")
    ref = _finetune(work, "ref", *common)
    assert ref.returncode == 0, ref.stderr
    cmd = [PY, "-m", "train.finetune", *_args(work, "killed", *common)]
    victim = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = work / "runs" / "killed" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = load_checkpoint(str(last))["step"]
    assert killed_at < 40
    resumed = _finetune(work, "killed", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(str(work / "runs" / "ref" / "last.pt"))
    b = load_checkpoint(str(last))
    assert b["step"] == 40
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert _train_losses(work / "runs" / "killed") == _train_losses(work / "runs" / "ref")


def test_torchrun_two_processes_agree_with_one(work, base_run):
    # Steps 1..5 are warmup, whose lr does not depend on --num_steps: the short run must match the base run.
    proc = _finetune(work, "ddp", "--num_steps", "5", "--eval_every", "5", "--dropout", "0",
                     launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert proc.returncode == 0, proc.stderr
    assert "2 process(es)" in proc.stderr
    two, one = _train_losses(work / "runs" / "ddp"), _train_losses(base_run[0])
    assert sorted(two) == [1, 2, 3, 4, 5]
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step
    # Rank 0 decides about the run folder for every rank, and only it prints the refusal.
    again = _finetune(work, "ddp", "--num_steps", "5", launcher=["-m", "torch.distributed.run", "--standalone",
                                                                 "--nproc_per_node=2"])
    assert again.returncode != 0
    assert [line for line in again.stderr.splitlines() if "error:" in line] == [
        f"train.finetune: error: {work / 'runs' / 'ddp'} already holds a run (last.pt, best.pt, metrics.csv): "
        "continue it with --resume, start a new one with another --name, or pass --overwrite to move it to "
        f"{work / 'runs' / 'ddp'}.old-<time>"]


_ELASTIC = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1"]
_ELASTIC_ARGS = ("--num_steps", "10", "--eval_every", "4", "--resume", "auto")


@pytest.fixture(scope="module")
def elastic_ref(work):
    """An uninterrupted 2-rank run under the same launcher and flags as the killed ones."""
    ref = _finetune(work, "elastic-ref", *_ELASTIC_ARGS, launcher=_ELASTIC)
    assert ref.returncode == 0, ref.stderr
    return load_checkpoint(str(work / "runs" / "elastic-ref" / "last.pt"))


@pytest.mark.parametrize("rank", [1, 0])
def test_torchrun_restart_after_sigkill_resumes_to_the_same_weights(work, tmp_path, elastic_ref, rank):
    # `--resume auto` under torchrun --max-restarts: one rank SIGKILLs itself after step 6 (the first checkpoint is
    # step 4); torchrun restarts both ranks, which continue from last.pt. Dropout stays on (step-seeded). Rank 0 holds
    # the run folder's lock: killed, it leaves its lock file to the restarted rank 0.
    marker, name = tmp_path / "killed", f"elastic-{rank}"
    proc = _finetune(work, name, *_ELASTIC_ARGS, launcher=_ELASTIC, env={"VITCORE_TEST_SIGKILL": f"{rank}:6:{marker}"})
    assert proc.returncode == 0, proc.stderr
    assert marker.exists(), "the rank was never killed"
    assert "steps 1..10" in proc.stderr and "steps 5..10" in proc.stderr  # the restart resumed from step 4
    if rank == 0:
        assert "which is no longer running (torchrun restart 1 of this job)" in proc.stderr
    b = load_checkpoint(str(work / "runs" / name / "last.pt"))
    assert b["step"] == 10
    for k, v in elastic_ref["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert _train_losses(work / "runs" / name) == _train_losses(work / "runs" / "elastic-ref")
    assert not os.path.exists(work / "runs" / name / ".lock")  # released at the end of the run


def _colour_png(path, cls: int, size=(40, 48)) -> str:
    Image.fromarray(np.broadcast_to(PALETTE[cls].astype(np.uint8), (*size, 3)).copy()).save(path)
    return str(path)


def test_evaluate_predict_attention_map_clis(base_run, work, tmp_path, capsys):
    run, _ = base_run
    ck = str(run / "best.pt")
    assert evaluate.main(["--checkpoint", ck, "--data-dir", str(work / "data")]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("accuracy ")[1].split("%")[0])
    assert acc == pytest.approx(100 * load_checkpoint(ck)["best_accuracy"], abs=0.01)
    cat, ship = _colour_png(tmp_path / "cat.png", 3), _colour_png(tmp_path / "ship.png", 8, (30, 30))
    assert predict.main(["--checkpoint", ck, cat, ship]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.count("%") == 5 for line in lines)
    assert lines[0].split(": ")[1].startswith("cat ") and lines[1].split(": ")[1].startswith("ship ")
    out_png = tmp_path / "map.png"
    assert attention_map.main(["--checkpoint", ck, "--image", cat, "--out", str(out_png)]) == 0
    with Image.open(out_png) as im:
        assert im.format == "PNG" and im.size[0] > 100


def _one_error_line(capsys) -> str:
    # Progress notes (the header, the checkpoint load report) may precede it; the error itself is one line.
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("train.finetune: error: "), err
    return lines[0]


@pytest.mark.parametrize("extra, fragment", [
    (["--model_type", "ViT-Nope"], "valid names"),
    (["--img_size", "40"], "input stride 16"),
    (["--model_type", "ViT-Ti_16"], "does not fit --model_type ViT-Ti_16"),
    (["--resume", "--name", "never-ran"], "no checkpoint"),
])
def test_finetune_bad_input_is_one_line_exit_2(work, capsys, extra, fragment):
    assert finetune.main(_args(work, "err", "--num_steps", "2", *extra)) == 2
    assert fragment in _one_error_line(capsys)


def test_nan_loss_stops_with_step_and_advice(work, capsys):
    code = finetune.main(_args(work, "nan", "--num_steps", "6", "--learning_rate", "1e30", "--max_grad_norm", "0",
                               "--warmup_steps", "0", "--eval_every", "100"))
    line = _one_error_line(capsys)
    assert code == 1 and "at step" in line and "--learning_rate" in line


def test_cli_error_has_no_traceback_in_a_real_process(work):
    proc = subprocess.run([PY, "-m", "train.finetune", "--model_type", "nope"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """`{train,test}/<class>/*.png` with 3 colour classes, images of mixed sizes."""
    root = tmp_path_factory.mktemp("folder")
    for split, n in (("train", 12), ("test", 5)):
        for cls, name in enumerate(["bird", "cat", "deer"]):
            os.makedirs(root / split / name)
            for i in range(n):
                _colour_png(root / split / name / f"{i}.png", cls + 2, size=(30 + i, 40))
    return root


def test_gradient_accumulation_matches_the_full_batch(image_folder, tmp_path):
    # Without dropout or clipping (which would hide a wrongly scaled gradient), 2 micro-batches of 6 must give
    # the weights of one batch of 12, to float rounding.
    weights = []
    for accum in ("1", "2"):
        argv = ["--dataset", "imagefolder", "--data_dir", str(image_folder), "--output_dir", str(tmp_path),
                "--name", f"acc{accum}", "--model_type", "testing", "--pretrained_dir", "none", "--img_size", "32",
                "--train_batch_size", "12", "--gradient_accumulation_steps", accum, "--num_steps", "4",
                "--eval_every", "4", "--warmup_steps", "2", "--dropout", "0", "--max_grad_norm", "0", "--no_progress"]
        assert finetune.main(argv) == 0
        ck = load_checkpoint(str(tmp_path / f"acc{accum}" / "last.pt"))
        assert ck["classes"] == ["bird", "cat", "deer"] and ck["num_classes"] == 3
        weights.append(ck["model"])
    for k, v in weights[0].items():
        assert torch.allclose(v, weights[1][k], rtol=1e-4, atol=1e-6), k


def test_resume_with_other_precision_or_inputs(work, capsys):
    # An fp32 run's last.pt holds the state of a disabled GradScaler ({}): resuming it with --fp16 must start a
    # fresh scaler, not fail in GradScaler.load_state_dict.
    common = ("--eval_every", "2", "--dropout", "0", "--precision", "fp32")
    assert finetune.main(_args(work, "prec", "--num_steps", "2", *common)) == 0
    assert finetune.main(_args(work, "prec", "--num_steps", "3", *common[:-2], "--fp16", "--resume")) == 0
    ck = load_checkpoint(str(work / "runs" / "prec" / "last.pt"))
    assert ck["step"] == 3 and ck["scaler"] and ck["args"]["precision"] == "fp16"
    capsys.readouterr()
    # Another image size would not fit the position embeddings: one line, exit 2, no traceback.
    assert finetune.main(_args(work, "prec", "--num_steps", "4", *common, "--resume", "--img_size", "48")) == 2
    assert "--img_size 32" in _one_error_line(capsys)


def test_resume_of_a_longer_finished_run_keeps_its_step(work):
    # Resuming a 3-step run with --num_steps 2 trains nothing; last.pt must not be relabelled as step 2.
    common = ("--eval_every", "3", "--dropout", "0")
    assert finetune.main(_args(work, "done", "--num_steps", "3", *common)) == 0
    before = load_checkpoint(str(work / "runs" / "done" / "last.pt"))
    assert finetune.main(_args(work, "done", "--num_steps", "2", *common, "--resume")) == 0
    after = load_checkpoint(str(work / "runs" / "done" / "last.pt"))
    assert after["step"] == 3 and after["best_step"] == 3
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k]), k
    with open(work / "runs" / "done" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r["split"] == "test"] == [3, 3]


def test_pretrained_model_is_built_on_the_meta_device(work, monkeypatch):
    # No full CPU initialisation before the checkpoint overwrites every parameter (ViT-H: 2.5 GB of work).
    from train.distributed import DistInfo
    from train.finetune import _build_model

    seen = []
    real = vitcore.load_pretrained
    def recording(model, path):
        seen.append({p.device.type for p in model.parameters()})
        return real(model, path)

    monkeypatch.setattr(vitcore, "load_pretrained", recording)
    args = finetune.parse_args(_args(work, "meta"))
    model, path = _build_model(args, vitcore.CONFIGS["testing"], 10, DistInfo(0, 0, 1, torch.device("cpu")))
    assert seen == [{"meta"}] and path == str(work / "testing.npz")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.count_nonzero(model.head.weight) == 0  # a new 10-class head starts at zero, as the official code
    loaded = vitcore.load_npz(path)["Transformer/encoder_norm/scale"]
    assert torch.equal(model.encoder_norm.weight.detach(), loaded.to(torch.float32))
