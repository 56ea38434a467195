"""The GPU pass (benchmarks/gpu_check.sh) and its scripts, run on the CPU before any lease.

GPU time is short: a script that breaks after its first measurement, a baseline that is silently left out, or a
summary that cannot be built wastes a lease. `DRY_RUN=1 gpu_check.sh` runs every part with the scripts' own code
on tiny shapes (benchmarks/dry_run.py: a one-call timer, kernels in the Triton interpreter, torch.compile traced
with aot_eager); these tests check what it leaves behind. The timings mean nothing here.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
import tarfile
import types

import pytest
import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VITCORE_VARIANTS = {"auto", "triton", "torch", "auto+compile", "triton+compile", "torch+compile"}


@pytest.fixture(scope="module")
def dry_pass(tmp_path_factory):
    """One DRY_RUN=1 pass: (the process, OUT, {name in tables.tar.gz: its text})."""
    out = tmp_path_factory.mktemp("gpu-out")
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "TMPDIR": str(tmp_path_factory.mktemp("tmp"))}
    env.pop("BENCH_OUT", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    tables = {}
    if (out / "tables.tar.gz").exists():
        with tarfile.open(out / "tables.tar.gz") as tar:
            for m in tar.getmembers():
                if m.isfile():
                    tables[os.path.normpath(m.name)] = tar.extractfile(m).read().decode()
    return proc, out, tables


def _rows(tables: dict[str, str], name: str) -> list[dict]:
    assert name in tables, f"{name} missing from tables.tar.gz: {sorted(tables)}"
    return list(csv.DictReader(io.StringIO(tables[name])))


def test_dry_pass_exits_0_with_at_most_8_files(dry_pass):
    proc, out, _ = dry_pass
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.log", "env.txt", "finetune.log", "summary.md", "tables.tar.gz", "tests.log"], files


def test_every_part_ran_inside_its_cap(dry_pass):
    _, _, tables = dry_pass
    parts = {r["part"]: r for r in _rows(tables, "parts.csv")}
    assert set(parts) == {"tests-gpu", "tests-rest", "finetune", "finetune-curves", "jpeg-folder", "train-warm",
                          "train", "attention", "layer_norm", "linear_gelu", "input", "input-jpeg"}, parts
    # input-jpeg is "missing" until bench_input_pipeline has --imagefolder (the data engineer's streaming path).
    assert all(r["rc"] == "0" for name, r in parts.items() if name != "input-jpeg"), parts
    assert parts["input-jpeg"]["rc"] in ("0", "missing"), parts


def test_env_header_names_the_versions_and_says_dry_run(dry_pass):
    _, out, _ = dry_pass
    env = (out / "env.txt").read_text()
    for key in ("date:", "gpu:", "device:", "torch:", "triton:", "timm:", "code sha256:", "dry run: yes"):
        assert key in env, env


def test_gpu_test_selection_collects(dry_pass):
    _, out, _ = dry_pass
    log = (out / "tests.log").read_text()
    finals = re.findall(r"^(\d+)/\d+ tests collected \(\d+ deselected\) in .*$", log, flags=re.M)
    assert len(finals) == 2 and "error" not in log.split("collected")[-1] and "ERROR collecting" not in log, log
    assert all(int(n) > 0 for n in finals), finals  # both selections, GPU-marked and the rest, hold tests
    for f in ("test_attention.py", "test_layer_norm.py", "test_linear_gelu.py", "test_model_triton.py",
              "test_autobackend.py"):
        assert f"{f}::" in log, f
    assert "test_train_gpu.py::test_triton_loss_curve_matches_torch_over_200_steps" in \
        (out / "finetune.log").read_text()


def test_microbenchmarks_keep_every_baseline(dry_pass):
    """Each kernel against every baseline the issue names, in every mode: a baseline that fails (as the
    torch.compile ones did when the backward replay met donated buffers) would be dropped from the table."""
    _, _, tables = dry_pass
    modes = {"fwd", "bwd", "fwd+bwd"}
    attn = _rows(tables, "bench_attention.csv")
    for shape in ("tiny", "tiny-d80"):
        got = {(r["impl"], r["mode"]) for r in attn if r["shape"] == shape}
        assert {("triton", m) for m in modes} | {("compile-math", m) for m in modes} <= got, got
        assert {m for i, m in got if i.startswith("sdpa-")} == modes, got
    ln = {(r["impl"], r["mode"]) for r in _rows(tables, "bench_layer_norm.csv")}
    assert ln == {(i, m) for i in ("triton", "torch", "compile") for m in modes}, ln
    assert all(float(r["copy_frac"]) > 0 for r in _rows(tables, "bench_layer_norm.csv"))
    lg = {(r["impl"], r["mode"]) for r in _rows(tables, "bench_linear_gelu.csv")}
    assert lg == {(i, m) for i in ("triton-bwd=cublas", "triton-bwd=triton", "torch", "compile") for m in modes}


def test_train_step_rows_for_every_variant(dry_pass):
    proc, out, tables = dry_pass
    rows = _rows(tables, "bench_train_compare.csv")
    first = [r for r in rows if r["img_size"] == "32"]
    assert {r["variant"] for r in first} == VITCORE_VARIANTS | {"timm", "timm+compile"}
    for r in first:
        if r["library"] == "vitcore":
            assert r["status"] == "ok" and float(r["img_per_s"]) > 0, r
        else:  # timm is on the GPU machine, not in this venv
            assert r["status"] == "ok" or r["status"].startswith("timm not installed"), r
    assert {r["variant"] for r in rows if r["img_size"] == "16"} == {"auto", "timm"}  # the second (ViT-L) run
    assert "# testing auto" in tables["backend_report.txt"]
    log = (out / "bench.log").read_text()
    assert "testing 32 px fp32 training: " in log
    # The cache warm-up compiled exactly the compiled variants without vitcore Triton kernels.
    warmed = re.findall(r"^  warmed testing (\S+): (\S+)", log, flags=re.M)
    assert {v for v, _ in warmed} == {"timm+compile", "auto+compile", "torch+compile"}, warmed
    assert all(status == "ok" for v, status in warmed if v != "timm+compile"), warmed


def test_loss_curve_tables(dry_pass):
    _, _, tables = dry_pass
    blocks = _rows(tables, "loss_curves.csv")
    assert [r["steps"] for r in blocks] == ["1-5", "6-10"]
    assert all(float(r["torch_mean_loss"]) > 0 and float(r["triton_mean_loss"]) > 0 for r in blocks)
    assert len(_rows(tables, "loss_curves_steps.csv")) == 10


def test_input_pipeline_rows(dry_pass):
    _, out, tables = dry_pass
    rows = _rows(tables, "input_cifar.csv")
    assert rows and all(float(r["img_per_s"]) > 0 for r in rows)
    assert "32 JPEGs of 64x48 in 10 classes" in (out / "bench.log").read_text()
    if "input_jpeg.csv" in tables:
        assert all(float(r["img_per_s"]) > 0 for r in _rows(tables, "input_jpeg.csv"))


def test_summary_has_every_part(dry_pass):
    proc, out, _ = dry_pass
    summary = (out / "summary.md").read_text()
    assert "could not be summarised" not in summary, summary
    assert "DRY RUN on CPU" in summary
    for title in ("1. GPU tests", "2a. Attention", "2b. LayerNorm", "2c. Linear+GELU", "3. Training step",
                  "4. 200-step fine-tune", "5. Input pipeline", "Time per part"):
        assert f"### {title}" in summary, title
    assert "**testing 32 px fp32 training: " in summary
    assert "Device-to-device copy bandwidth" in summary
    assert "| tiny-d80 (1, 2, 5, 80) |" in summary
    assert summary in proc.stdout  # the tool's reply shows the end of stdout: the summary is printed last


# -- bench_train_compare's own logic --------------------------------------------------------------------------

def test_headline_format():
    from benchmarks.bench_train_compare import headline

    base = {"model": "ViT-B_16", "img_size": "224", "batch": "256", "precision": "bf16", "status": "ok"}
    rows = [{**base, "variant": "auto", "img_per_s": "2500", "mfu": "0.412"},
            {**base, "variant": "timm", "img_per_s": "2000", "mfu": "0.33"},
            {**base, "variant": "timm+compile", "img_per_s": "2400", "mfu": "0.39"},
            {**base, "model": "ViT-L_16", "batch": "128", "variant": "auto", "img_per_s": "900", "mfu": "0.5"}]
    assert headline(rows) == ("ViT-B_16 224 px bf16 training: 2500 img/s (41.2% MFU), 1.25× timm eager, "
                              "1.04× timm compiled")
    rows[2]["status"] = "out of memory at batch 256"
    assert headline(rows).endswith("1.25× timm eager, not measured timm compiled")
    assert headline(rows[1:3]) == "ViT-B_16 224 px bf16 training: auto not measured"


class _FakeTimmAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fused_attn = False  # as with TIMM_FUSED_ATTN=0: the benchmark must switch SDPA on
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # (B, 1, N, D) each
        assert self.fused_attn
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1)


class _FakeTimmViT(nn.Module):
    def __init__(self, num_classes, img_size):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, stride=8)
        self.attn = _FakeTimmAttention(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, 16)
        return self.head(self.attn(t).mean(1))


def test_timm_rows_with_a_stand_in_timm(monkeypatch, tmp_path):
    """The timm path (create_model's arguments, SDPA switched on, eager and compiled rows, the ratios) with a
    module standing in for timm, which only the GPU machine has."""
    from benchmarks import bench_train_compare as btc
    from benchmarks import dry_run

    made = []

    def create_model(name, pretrained, num_classes, img_size):
        assert pretrained is False
        made.append(name)
        return _FakeTimmViT(num_classes, img_size)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model, __version__="0"))
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    dry_run.apply(btc, monkeypatch.setattr)
    monkeypatch.setitem(btc.TIMM_NAMES, "testing", "vit_testing")
    monkeypatch.setattr(sys, "argv", ["bench_train_compare", "--model_type", "testing", "--img_size", "16",
                                      "--batch_size", "2", "--precision", "fp32", "--warmup", "1", "--iters", "2",
                                      "--variants", "torch", "timm", "timm+compile"])
    btc.main()
    with open(tmp_path / "bench_train_compare.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert made == ["vit_testing", "vit_testing"]
    assert all(r["status"] == "ok" for r in rows.values()), rows
    ratio = float(rows["torch"]["img_per_s"]) / float(rows["timm"]["img_per_s"])
    assert float(rows["torch"]["vs_timm"]) == pytest.approx(ratio)  # filled in once timm had run
    assert rows["timm"]["vs_timm"] == "1.0"


def test_deadline_skips_what_would_not_fit(monkeypatch, tmp_path):
    from benchmarks import bench_train_compare as btc
    from benchmarks import dry_run

    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    dry_run.apply(btc, monkeypatch.setattr)
    monkeypatch.setattr(sys, "argv", ["bench_train_compare", "--model_type", "testing", "--img_size", "16",
                                      "--batch_size", "2", "--precision", "fp32", "--variants", "torch", "auto",
                                      "--deadline_s", "0"])
    btc.main()
    with open(tmp_path / "bench_train_compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["torch", "auto"]
    assert all(r["status"].startswith("skipped: about 30s needed") and r["img_per_s"] == "" for r in rows), rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed where there is no CUDA")
@pytest.mark.parametrize("name", ["bench_attention", "bench_layer_norm", "bench_linear_gelu", "bench_train_compare"])
def test_gpu_benchmarks_exit_0_with_a_message_without_cuda(name, monkeypatch, capsys):
    import importlib

    mod = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(sys, "argv", [name, "--quick"])
    with pytest.raises(SystemExit) as exit_:
        mod.main()
    assert exit_.value.code == 0
    assert f"{name}: no CUDA device on this machine; nothing measured." in capsys.readouterr().out


# -- gpu_summary on GPU-shaped tables ---------------------------------------------------------------------------

def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_summary_ratios_and_verdicts_from_gpu_shaped_tables(tmp_path):
    """The paths a dry run cannot reach (an MFU, a best SDPA backend that differs per mode, targets met and missed,
    a part stopped at its cap), on hand-made tables in the scripts' formats; the numbers are made up."""
    from benchmarks.gpu_summary import summarize

    out, tables = tmp_path / "out", tmp_path / "tables"
    out.mkdir()
    tables.mkdir()
    (out / "env.txt").write_text("date: 2026-12-02 10:00 UTC\ngpu: NVIDIA H200, 143771 MiB, 580.159.03\n"
                                 "device: NVIDIA H200\ntorch: 2.11.0+cu130 | CUDA 13.0 | cuDNN 91300\n"
                                 "triton: 3.6.0\ntimm: 1.0.20\ndry run: no\n")
    (out / "tests.log").write_text("-- tests-gpu (cap 45s, at 2s): python -m pytest -v -m gpu tests/test_a.py\n"
                                   "===== 23 passed in 30.0s =====\n"
                                   "-- tests-rest (cap 60s, at 33s): python -m pytest -v tests/test_a.py\n"
                                   "tests/test_a.py::t PASSED [ 50%]\n-- tests-rest: stopped at its 60s cap\n")
    s = {"shape": "ViT-B/16@224", "B": 256, "H": 12, "N": 197, "D": 64, "dtype": "bfloat16", "tflops": 1}
    _write_csv(tables / "bench_attention.csv", [
        {**s, "mode": m, "impl": i, "ms": ms}
        for m, i, ms in [("fwd", "triton", 0.2), ("fwd", "sdpa-flash", 0.16), ("fwd", "compile-math", 0.5),
                         ("bwd", "triton", 0.8), ("bwd", "sdpa-cudnn", 1.1), ("bwd", "compile-math", 1.5),
                         ("fwd+bwd", "triton", 1.0), ("fwd+bwd", "sdpa-cudnn", 1.2), ("fwd+bwd", "compile-math", 2.0)]])
    ln = {"shape": "ViT-B/16@224", "batch": 256, "M": 50432, "N": 768, "dtype": "bfloat16"}
    _write_csv(tables / "bench_layer_norm.csv", [
        {**ln, "mode": m, "impl": i, "ms": ms, "GB/s": gb, "copy_frac": gb / 4000}
        for m, i, ms, gb in [("fwd", "triton", 0.05, 3000), ("fwd", "torch", 0.06, 2500), ("bwd", "triton", 0.1, 2800),
                             ("bwd", "torch", 0.13, 2100), ("fwd+bwd", "triton", 0.15, 2900),
                             ("fwd+bwd", "torch", 0.19, 2300), ("fwd+bwd", "compile", 0.16, 2700)]])
    lg = {"shape": "ViT-B/16@224", "M": 50432, "K": 768, "N": 3072, "dtype": "bfloat16", "tflops": 600}
    _write_csv(tables / "bench_linear_gelu.csv", [
        {**lg, "mode": "fwd+bwd", "impl": i, "ms": ms}
        for i, ms in [("triton-bwd=cublas", 2.0), ("triton-bwd=triton", 1.9), ("torch", 2.2), ("compile", 2.1)]])
    t = {"model": "ViT-B_16", "img_size": 224, "batch": 256, "precision": "bf16", "library": "vitcore",
         "backend": "auto", "compiled": False, "ms_per_step": 100, "spread": 0.01, "warmup_s": 20, "peak_mem_gib": 30}
    _write_csv(tables / "bench_train_compare.csv", [
        {**t, "variant": "auto", "status": "ok", "img_per_s": 2600, "mfu": 0.139, "vs_timm": 1.3,
         "vs_timm+compile": 0.96},
        {**t, "variant": "timm", "status": "ok", "img_per_s": 2000, "mfu": 0.107, "vs_timm": 1.0,
         "vs_timm+compile": 0.74},
        {**t, "variant": "timm+compile", "status": "ok", "img_per_s": 2700, "mfu": 0.144, "vs_timm": 1.35,
         "vs_timm+compile": 1.0},
        {**t, "variant": "torch+compile", "status": "skipped: about 50s needed, the time cap leaves 20s",
         "img_per_s": "", "mfu": "", "vs_timm": "", "vs_timm+compile": "", "ms_per_step": "", "spread": "",
         "warmup_s": "", "peak_mem_gib": ""}])
    _write_csv(tables / "parts.csv", [{"part": "tests-gpu", "budget_s": 45, "wall_s": 31, "rc": 0},
                                      {"part": "tests-rest", "budget_s": 60, "wall_s": 60, "rc": 124},
                                      {"part": "input-jpeg", "budget_s": 0, "wall_s": 0, "rc": "missing"}])
    md = summarize(str(out), str(tables))
    assert "could not be summarised" not in md, md
    assert "_NVIDIA H200 · driver 580.159.03 · torch 2.11.0+cu130 · triton 3.6.0 · 2026-12-02 10:00 UTC_" in md
    assert ("**ViT-B_16 224 px bf16 training: 2600 img/s (13.9% MFU), 1.30× timm eager, 0.96× timm compiled**"
            in md)
    assert "| ViT-B/16@224 (256, 12, 197, 64) | 0.2 / 0.8 / 1 | 0.16 / 1.1 / 1.2 (sdpa-flash, sdpa-cudnn) |" in md
    assert "| 1.20× | 2.00× | met (≥ 1.1×) |" in md  # attention
    assert "| 1.27× | 1.20× / 1.30× | 1.07× | **missed** (< 1.5×) |" in md  # LayerNorm
    assert "1.16× (triton-bwd=triton) | 1.11× | met (≥ 1.1×) |" in md  # Linear+GELU: the faster variant counts
    assert "Device-to-device copy bandwidth measured in the run: 4000 GB/s" in md
    assert ("vs timm eager 1.30×: met (≥ 1.25×); vs timm compiled 0.96×: **missed** (< 1×); MFU 13.9%: **missed**"
            in md)
    assert "- GPU-marked (bf16 kernels vs float64, bf16 model triton vs torch): 23 passed in 30.0s" in md
    assert "stopped at its time cap: 1 passed (see the log)" in md
    assert "tests-rest: stopped at its 60 s cap" in md and "input-jpeg: not available yet" in md
    assert "| torch+compile | — | — | — | — | — | — | — | — | skipped: about 50s needed" in md


def test_bench_train_step_runs_each_backend_on_bench_train_compares_step(monkeypatch, tmp_path):
    from benchmarks import bench_train_step, dry_run

    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    dry_run.apply(bench_train_step, monkeypatch.setattr)
    monkeypatch.setattr(sys, "argv", ["bench_train_step", "--quick"])
    bench_train_step.main()
    with open(tmp_path / "bench_train_step.csv") as f:
        rows = {r["backend"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"torch", "triton", "auto", "compile"}
    assert all(r["status"] == "ok" and r["model"] == "testing" for r in rows.values()), rows
    assert rows["torch"]["vs_torch"] == "1.0"
    ratio = float(rows["triton"]["img_per_s"]) / float(rows["torch"]["img_per_s"])
    assert float(rows["triton"]["vs_torch"]) == pytest.approx(ratio)
