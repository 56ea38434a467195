"""`pip install --no-build-isolation .` (not editable) gives a working package outside the source tree."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECLARED = {"torch", "triton", "numpy", "scipy", "tqdm", "tensorboard", "matplotlib", "pillow"}


def _git_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or importlib.util.find_spec("setuptools") is None,
                    reason="needs git and setuptools")
def test_non_editable_install_into_a_fresh_venv_runs_the_cli(tmp_path):
    # A copy of the tracked sources, so the build never touches the working tree's build/ or .so files.
    src = tmp_path / "src"
    for rel in _git_files():
        dst = src / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), dst)
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    # "A fresh venv that already has torch": the test environment's packages (torch, pip, setuptools), visible
    # through a .pth file (copying torch would cost minutes); vitcore itself is not on that path (installed
    # editable elsewhere, through a finder the fresh venv does not load).
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "deps-from-test-env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    install = subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-index", "--no-build-isolation", str(src)],
                             capture_output=True, text=True, env=env, timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([py, "-c", "import vitcore, kernels, train; print(vitcore.__file__)"], cwd=work,
                           capture_output=True, text=True, env=env, check=True).stdout
    assert where.startswith(purelib), where  # the installed copy, not the source tree
    help_text = subprocess.run([py, "-m", "train.finetune", "--help"], cwd=work, capture_output=True, text=True,
                               env=env, timeout=300)
    assert help_text.returncode == 0, help_text.stderr
    assert "--model_type" in help_text.stdout and "--pretrained_dir" in help_text.stdout

    np.savez(work / "a.npz", w=np.arange(6, dtype=np.float32).reshape(2, 3))
    check = subprocess.run([py, "-c", "import vitcore; t = vitcore.load_npz('a.npz')['w']; print(t.sum().item())"],
                           cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert check.returncode == 0 and check.stdout.strip() == "15.0", check.stderr

    # The dependencies a user needs are declared, so a plain install into an empty venv brings them.
    requires = subprocess.run(
        [py, "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('vitcore')))"],
        capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    names = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requires}
    assert DECLARED <= names, DECLARED - names
