"""Hostile input, run as a user would (a subprocess of the CLI): each case must end with its exit code (2 bad input,
1 a failed run, 130 Ctrl-C), one `train.finetune: error:` line naming the flag or file, no traceback, no terminal
control sequence, and the files of the run folder it touches byte-identical afterwards (or, where the run goes on,
moved aside rather than lost)."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import reference_vit as ref
import torch
from cifar_fixtures import make_cifar10

import vitcore
from train.checkpointing import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
ERROR = "train.finetune: error: "


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny CIFAR-10, an official-layout npz of the 'testing' model, and a finished 2-step run 'base'."""
    root = tmp_path_factory.mktemp("hostile")
    make_cifar10(str(root / "data"), n_train=80, n_test=40)
    cfg = vitcore.CONFIGS["testing"]
    params = ref.random_params(cfg.replace(representation_size=cfg.hidden_size), 224, 21843, np.random.default_rng(0))
    np.savez(root / "testing.npz", **ref.to_pre_linen(params))
    proc = _cli(root, "--name", "base", "--num_steps", "2", "--eval_every", "2")
    assert proc.returncode == 0, proc.stderr
    return root


def _base_args(root) -> list[str]:
    return ["--data_dir", str(root / "data"), "--output_dir", str(root / "runs"), "--model_type", "testing",
            "--pretrained_dir", str(root / "testing.npz"), "--img_size", "32", "--train_batch_size", "8",
            "--eval_batch_size", "64", "--warmup_steps", "1", "--no_progress"]


def _env(**extra: str | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _cli(root, *argv: str, base: bool = True, env: dict[str, str] | None = None, module: str = "train.finetune",
         **kwargs) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", module, *(_base_args(root) if base else []), *argv]
    return subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=300, **kwargs)


def _error(proc: subprocess.CompletedProcess, code: int, *fragments: str, prog: str = "train.finetune") -> str:
    """The single error line, after checking the exit code, the absence of a traceback and of escapes."""
    err = proc.stderr
    assert proc.returncode == code, err
    assert "Traceback" not in err and "\x1b" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _snapshot(folder) -> dict[str, str]:
    """sha256 of every file below `folder` (the lock file excepted)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(dirpath, f)
            if f != ".lock":
                with open(path, "rb") as fh:
                    out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _copy_run(world, name: str) -> str:
    dest = world / "runs" / name
    shutil.copytree(world / "runs" / "base", dest)
    return str(dest)


# ---------------------------------------------------------------- run folders


def test_a_folder_holding_a_run_is_not_overwritten(world):
    before = _snapshot(world / "runs" / "base")
    line = _error(_cli(world, "--name", "base", "--num_steps", "2"), 2, "already holds a run", "--resume",
                  "--name", "--overwrite")
    assert str(world / "runs" / "base") in line
    assert _snapshot(world / "runs" / "base") == before


def test_a_second_job_with_the_same_name_is_refused_naming_the_first(world):
    run = _copy_run(world, "busy")
    before = _snapshot(run)
    code = ("import sys, time; from train.run_folder import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([PY, "-c", code, run], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ((), ("--resume",), ("--overwrite",)):
            line = _error(_cli(world, "--name", "busy", "--num_steps", "3", *extra), 2, "in use by",
                          f"PID {holder.pid}", "--name")
            assert os.uname().nodename in line
        assert _snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_and_stale_temps_are_taken_over_and_resume_by_name_takes_the_stored_arguments(world):
    run = _copy_run(world, "stale")
    with open(os.path.join(run, ".lock"), "w") as f:
        f.write("PID 999999 on host gone\n")  # a killed job's file: nobody holds its flock
    with open(os.path.join(run, "last.pt.x1y2z3.tmp"), "wb") as f:
        f.write(b"half a checkpoint")
    # Only the name and what changes: everything else comes from last.pt.
    proc = _cli(world, "--output_dir", str(world / "runs"), "--name", "stale", "--resume", "--num_steps", "3",
                base=False)
    assert proc.returncode == 0, proc.stderr
    assert "--resume: --num_steps 2 -> 3 (from the command line)" in proc.stderr
    assert "PID 999999 on host gone, which is no longer running" in proc.stderr
    assert sorted(os.listdir(run)) == ["args.json", "best.pt", "curves.png", "last.pt", "metrics.csv", "tensorboard"]
    assert load_checkpoint(os.path.join(run, "last.pt"))["step"] == 3


def test_a_damaged_metrics_csv_does_not_block_resume(world):
    run = _copy_run(world, "metrics")
    with open(os.path.join(run, "metrics.csv"), "a") as f:
        f.write("garbage\x00,,\n1,train,abc\n7,tra")  # a hand edit, then the half line a full disk leaves
    proc = _cli(world, "--name", "metrics", "--resume", "--num_steps", "3")
    assert proc.returncode == 0, proc.stderr
    assert "left out 2 row(s) that do not parse" in proc.stderr
    with open(os.path.join(run, "metrics.csv")) as f:
        assert [line.split(",")[:2] for line in f.read().splitlines()[1:]] == [
            ["1", "train"], ["2", "train"], ["2", "test"], ["3", "train"], ["3", "test"]]


def test_overwrite_moves_the_old_run_aside(world):
    run = _copy_run(world, "again")
    before = _snapshot(run)
    proc = _cli(world, "--name", "again", "--num_steps", "1", "--eval_every", "1", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    aside = [n for n in os.listdir(world / "runs") if n.startswith("again.old-")]
    assert len(aside) == 1 and aside[0] in proc.stderr
    assert _snapshot(world / "runs" / aside[0]) == before
    assert load_checkpoint(os.path.join(run, "last.pt"))["step"] == 1


def test_resume_auto_starts_a_missing_run_and_resume_needs_a_name(world):
    proc = _cli(world, "--name", "auto-new", "--num_steps", "1", "--eval_every", "1", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(str(world / "runs" / "auto-new" / "last.pt"))["step"] == 1
    _error(_cli(world, "--resume"), 2, "--resume needs --name")
    _error(_cli(world, "--name", "never-ran", "--resume"), 2, "no checkpoint at", "never-ran")


def test_a_folder_with_only_best_pt_says_how_to_continue(world):
    run = _copy_run(world, "onlybest")
    os.remove(os.path.join(run, "last.pt"))  # what a kill during the first last.pt write left in older versions
    before = _snapshot(run)
    _error(_cli(world, "--name", "onlybest", "--resume"), 2, "no checkpoint at", "best.pt is a whole checkpoint",
           f"copy it to {os.path.join(run, 'last.pt')}")
    _error(_cli(world, "--name", "onlybest", "--resume", "auto"), 2, "already holds a run (best.pt")
    assert _snapshot(run) == before


def test_the_default_name_is_new_for_every_run(world, tmp_path):
    names = []
    for _ in range(2):
        proc = _cli(world, "--output_dir", str(tmp_path), "--num_steps", "1", "--eval_every", "1")
        assert proc.returncode == 0, proc.stderr
        names.append(proc.stdout.strip().splitlines()[-1].rsplit("run folder ", 1)[1])
    assert names[0] != names[1] and all(os.path.basename(n).startswith("testing-cifar10-20") for n in names)
    assert all(os.path.isfile(os.path.join(n, "last.pt")) for n in names)


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize("flag, value", [("--learning_rate", "nan"), ("--learning_rate", "inf"),
                                         ("--learning_rate", "0"), ("--weight_decay", "nan"),
                                         ("--max_grad_norm", "inf"), ("--max_grad_norm", "-1"),
                                         ("--dropout", "nan"), ("--dropout", "1.5"), ("--mixup", "nan"),
                                         ("--cutmix", "inf"), ("--adam_eps", "nan"), ("--label_smoothing", "nan"),
                                         ("--ema", "nan"), ("--drop_path", "inf"), ("--val_split", "nan")])
def test_non_finite_or_out_of_range_flags_are_refused_at_parse_time(world, flag, value):
    before = _snapshot(world / "runs" / "base")
    # Even with --resume (which would otherwise continue and checkpoint): nothing is read or written.
    _error(_cli(world, "--name", "base", "--resume", flag, value), 2, flag, value)
    assert _snapshot(world / "runs" / "base") == before


def test_help_shows_every_default(world):
    proc = _cli(world, "--help", base=False)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "--learning_rate LEARNING_RATE, --learning-rate LEARNING_RATE default: 0.03" in text
    assert "--eval_every EVAL_EVERY, --eval-every EVAL_EVERY default: 100" in text
    assert "--fp16 alias of --precision fp16 (default: off)" in text
    assert "global-norm clipping; 0 disables (default: 1.0)" in text


cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize("argv, env, fragments", [
    (["--device", "tpu"], {}, ["--device tpu", "cuda, cuda:N or cpu"]),
    pytest.param(["--device", "cuda"], {}, ["--device cuda", "--device cpu"], marks=cuda),
    (["--num_workers", "-1"], {}, ["--num_workers", ">= 0"]),
    pytest.param(["--backend", "triton"], {"TRITON_INTERPRET": None}, ["--backend triton", "--backend torch"],
                 marks=cuda),
    pytest.param(["--model_type", "ViT-B_16", "--pretrained_dir", "none"], {},
                 ["ViT-B_16 has 86M parameters", "--device cpu", "small CPU job"], marks=cuda),
    (["--model_type", "\x1b[31mViT-Evil\x1b[0m"], {}, ["ViT-Evil", "valid names"]),
])
def test_machine_and_model_flags_are_one_line(world, argv, env, fragments):
    _error(_cli(world, "--name", "flags", "--num_steps", "1", *argv, env=_env(**env)), 2, *fragments)
    assert not os.path.exists(world / "runs" / "flags" / "last.pt")


def test_debug_shows_the_traceback(world):
    for proc in (_cli(world, "--device", "tpu", "--debug"),
                 _cli(world, "--device", "tpu", env=_env(VITCORE_DEBUG="1"))):
        assert proc.returncode == 2 and "Traceback" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(ERROR)


# ---------------------------------------------------------------- files where a checkpoint is expected


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(world, name: str, write) -> str:
    run = world / "runs" / name
    os.makedirs(run, exist_ok=True)
    write(str(run / "last.pt"))
    return str(run / "last.pt")


def test_a_code_running_pickle_is_refused_naming_its_global(world, tmp_path):
    marker = tmp_path / "ran"
    path = _plant(world, "evil", lambda p: torch.save({"args": _RunsCode(str(marker))}, p))
    before = _snapshot(world / "runs" / "evil")
    line = _error(_cli(world, "--name", "evil", "--resume"), 2, path, "tries to run code", "posix.system")
    assert "weights_only" not in line and "False" not in line
    assert not marker.exists()
    assert _snapshot(world / "runs" / "evil") == before


@pytest.mark.parametrize("name, write, fragment", [
    ("tensor", lambda p: torch.save(torch.zeros(3), p), "holds a Tensor"),
    ("npz", lambda p: shutil.copy(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(p))), "testing.npz"),
                                  p), "--pretrained_dir"),
    ("truncated", lambda p: open(p, "wb").write(b"PK\x03\x04 not really"), "not a loadable training checkpoint"),
    ("noargs", lambda p: torch.save({"model": {}}, p), "stores no arguments"),
    ("badargs", lambda p: torch.save({"args": {"learning_rate": "fast"}}, p), "stores arguments that do not parse"),
])
def test_a_last_pt_that_is_not_a_run_is_one_line(world, name, write, fragment):
    path = _plant(world, name, write)
    before = _snapshot(world / "runs" / name)
    _error(_cli(world, "--name", name, "--resume"), 2, path, fragment)
    assert _snapshot(world / "runs" / name) == before


def test_a_tampered_config_is_one_line_in_evaluate(world, tmp_path):
    ck = load_checkpoint(str(world / "runs" / "base" / "best.pt"))
    ck["config"]["hidden_size"] = "wide"
    path = str(tmp_path / "tampered.pt")
    torch.save(ck, path)
    proc = _cli(world, "--checkpoint", path, "--data_dir", str(world / "data"), base=False, module="train.evaluate")
    _error(proc, 2, path, prog="train.evaluate")


# ---------------------------------------------------------------- CIFAR batches


def _damage(kind: str, path: str) -> None:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    if kind == "swapped":
        d[b"data"], d[b"labels"] = d[b"labels"], d[b"data"]
    elif kind == "list":
        d = list(d.values())
    elif kind == "width":
        d[b"data"] = d[b"data"][:, :3000]
    elif kind == "labels":
        d[b"labels"][0] = 10
    elif kind == "count":
        d[b"labels"] = d[b"labels"][:-1]
    if kind == "truncated":
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        return
    if kind == "code":
        d = _RunsCode(path + ".ran")
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


@pytest.mark.parametrize("kind, fragment", [
    ("swapped", "'data' is a list"), ("list", "got a list"), ("truncated", "truncated"),
    ("width", "3000 values wide"), ("labels", "label 10 is out of range"), ("count", "labels (truncated?)"),
    ("code", "posix.system"),
])
def test_a_broken_cifar_batch_names_the_file_before_training(world, tmp_path, kind, fragment):
    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    batch = str(data / "cifar-10-batches-py" / "data_batch_3")
    _damage(kind, batch)
    proc = _cli(world, "--name", f"cifar-{kind}", "--num_steps", "2", "--data_dir", str(data))
    _error(proc, 2, batch, fragment)
    assert "step 1" not in proc.stderr and not os.path.exists(batch + ".ran")


# ---------------------------------------------------------------- failures during a run


def test_a_diverging_run_saves_nothing_and_names_the_flags(world):
    run = _copy_run(world, "diverge")
    before = _snapshot(run)
    proc = _cli(world, "--name", "diverge", "--resume", "--num_steps", "8", "--eval_every", "1", "--learning_rate",
                "1e30", "--max_grad_norm", "0", "--fp16")
    _error(proc, 1, "loss is", "last.pt holds step 2", "--learning_rate (now 1e+30)",
           "--max_grad_norm 1 (clipping is off)", "--precision bf16 or fp32")
    after = _snapshot(run)
    assert after["last.pt"] == before["last.pt"] and after["best.pt"] == before["best.pt"]


def test_ctrl_c_says_where_the_run_got_to_and_how_to_continue(world):
    cmd = [PY, "-m", "train.finetune", *_base_args(world), "--name", "ctrlc", "--num_steps", "100000",
           "--eval_every", "5"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = world / "runs" / "ctrlc" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    line = _error(subprocess.CompletedProcess(cmd, proc.returncode, out, err), 130, "interrupted at step ",
                  "; continue with --resume --name ctrlc")
    step = int(line.split("interrupted at step ")[1].split(";")[0])
    assert load_checkpoint(str(last))["step"] <= step
    assert not os.path.exists(world / "runs" / "ctrlc" / ".lock")


def test_cpu_out_of_memory_says_what_would_fit(world):
    import resource

    limit = 2000 * 2**20  # address space: enough for torch and the tiny model, not for 4096 images at 224 px

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = _cli(world, "--name", "oom", "--num_steps", "1", "--img_size", "224", "--train_batch_size", "4096",
                "--device", "cpu", preexec_fn=cap)
    _error(proc, 1, "out of memory on the CPU at step 1", "--gradient_accumulation_steps 2", "--train_batch_size")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_a_full_disk_names_the_device_and_keeps_the_previous_checkpoint(world, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]).returncode:
        pytest.skip("mount -t tmpfs failed (no CAP_SYS_ADMIN in this container)")
    try:
        proc = _cli(world, "--output_dir", str(disk), "--name", "full", "--num_steps", "2", "--eval_every", "2")
        assert proc.returncode == 0, proc.stderr
        run = disk / "full"
        before = _snapshot(run)
        free = os.statvfs(disk)
        with open(disk / "ballast", "wb") as f:  # leave 30 kB: less than one checkpoint
            f.write(b"\0" * (free.f_bavail * free.f_frsize - 30_000))
        proc = _cli(world, "--output_dir", str(disk), "--name", "full", "--resume", "--num_steps", "4")
        _error(proc, 1, "no space left on device tmpfs", str(disk), "previous checkpoint", "(step 2) is intact",
               "--resume --name full")
        after = _snapshot(run)
        for name in ("last.pt", "best.pt"):
            assert after[name] == before[name], name
        assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)])
