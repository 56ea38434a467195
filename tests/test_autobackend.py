"""backend="auto" (vitcore.autobackend) on CPU: an injected timer and "is CUDA" decision stand in for the GPU, so
the choice per op and shape class, the on-disk cache (contents, key, reuse, VITCORE_CACHE, corrupt files) and the
reports are all exercised. The timed calls themselves run for real (the Triton ones in the interpreter)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vitcore import VisionTransformer, ViTConfig, autobackend, ops
from vitcore.autobackend import AutoBackend

ENV = {"gpu": "Fake GPU 80GB", "torch": "2.0", "triton": "3.0", "vitcore": "0.1", "kernels": "abc"}
# Milliseconds the fake timer reports: triton wins LayerNorm and attention, torch wins Linear+GELU.
TIMES = {"layer_norm/torch": 2.0, "layer_norm/triton": 1.0, "linear_gelu/torch": 3.0, "linear_gelu/triton": 4.0,
         "attention/torch": 5.0, "attention/triton": 2.5}


class FakeTimer:
    """Runs each timed call once (so the closures are exercised) and reports TIMES; records what it timed."""

    def __init__(self, times=None, fail=()):
        self.times, self.fail, self.calls = times or TIMES, fail, []

    def __call__(self, run, label):
        self.calls.append(label)
        if label in self.fail:
            raise RuntimeError(f"{label}: no kernel for this shape")
        run()
        return self.times[label]


def make_auto(tmp_path, timer=None, env=ENV, cache_dir=True):
    return AutoBackend(timer=timer or FakeTimer(), is_cuda=lambda t: True, environment=lambda device: dict(env),
                       cache_dir=str(tmp_path) if cache_dir else None)


def ln_inputs(rows=6, width=16, grad=True):
    x = torch.randn(rows, width, requires_grad=grad)
    return x, torch.ones(width, requires_grad=grad), torch.zeros(width, requires_grad=grad)


def lg_inputs(rows=5, k=16, n=24):
    return torch.randn(rows, k, requires_grad=True), torch.randn(n, k, requires_grad=True) * 0.2, torch.zeros(n)


def attn_inputs(b=1, h=2, n=8, d=16):
    return tuple(torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))


def cache_file(tmp_path):
    files = [f for f in os.listdir(tmp_path) if f.startswith("backends-") and f.endswith(".json")]
    assert len(files) == 1, files
    return os.path.join(tmp_path, files[0])


def test_auto_picks_the_faster_backend_per_op(tmp_path):
    auto = make_auto(tmp_path)
    assert auto.choose("layer_norm", *ln_inputs()) == "triton"
    assert auto.choose("linear_gelu", *lg_inputs()) == "torch"
    assert auto.choose("attention", *attn_inputs()) == "triton"
    assert auto.timer.calls == ["layer_norm/torch", "layer_norm/triton", "linear_gelu/torch", "linear_gelu/triton",
                                "attention/torch", "attention/triton"]


def test_a_shape_class_is_measured_once(tmp_path):
    auto = make_auto(tmp_path)
    auto.choose("linear_gelu", *lg_inputs(rows=5))
    auto.choose("linear_gelu", *lg_inputs(rows=7))  # same M bucket (8): no new measurement
    auto.choose("attention", *attn_inputs(b=3, h=1))
    auto.choose("attention", *attn_inputs(b=1, h=4))  # B*H 3 and 4 share the bucket 4
    assert len(auto.timer.calls) == 4
    for inputs in (lg_inputs(rows=9), lg_inputs(k=32), lg_inputs(n=40)):  # new M bucket, new K, new N
        auto.choose("linear_gelu", *inputs)
    auto.choose("attention", *attn_inputs(n=9))
    auto.choose("attention", *attn_inputs(d=32))
    auto.choose("layer_norm", *ln_inputs(width=16))
    auto.choose("layer_norm", *ln_inputs(width=16, grad=False))  # no gradients wanted: its own class
    auto.choose("layer_norm", *(t.half() for t in ln_inputs(width=16)))  # another dtype
    assert len(auto.timer.calls) == 4 + 2 * 8


def test_timed_calls_run_forward_and_backward_only_where_gradients_are_wanted(tmp_path, monkeypatch):
    seen = []
    real = ops.layer_norm

    def spy(x, w, b, eps, backend):
        y = real(x, w, b, eps, backend)
        seen.append((backend, "forward", tuple(t.requires_grad for t in (x, w, b))))
        if y.requires_grad:
            y.register_hook(lambda g: seen.append((backend, "backward")))
        return y

    monkeypatch.setattr(ops, "layer_norm", spy)
    auto = make_auto(tmp_path)
    x, w, b = ln_inputs()
    w.requires_grad_(False)  # frozen: timed without a weight gradient
    b.requires_grad_(False)
    before = torch.get_rng_state()
    auto.choose("layer_norm", x, w, b)
    assert torch.equal(torch.get_rng_state(), before)  # measuring draws no random numbers (exact resume)
    assert seen == [("torch", "forward", (True, False, False)), ("torch", "backward"),
                    ("triton", "forward", (True, False, False)), ("triton", "backward")]
    assert x.grad is None  # the caller's tensors are untouched
    seen.clear()
    with torch.no_grad():
        auto.choose("layer_norm", x, w, b)
    assert seen == [("torch", "forward", (False, False, False)), ("triton", "forward", (False, False, False))]


def test_cache_file_contents_and_key(tmp_path):
    auto = make_auto(tmp_path)
    auto.choose("layer_norm", *ln_inputs())
    auto.choose("linear_gelu", *lg_inputs())
    with open(cache_file(tmp_path)) as f:
        data = json.load(f)
    assert data["format"] == 1 and data["environment"] == ENV
    assert data["choices"] == {
        "layer_norm width=16 dtype=float32 grads=x,weight,bias": {"backend": "triton", "torch_ms": 2.0,
                                                                  "triton_ms": 1.0},
        "linear_gelu m<=8 k=16 n=24 dtype=float32 grads=x,weight": {"backend": "torch", "torch_ms": 3.0,
                                                                    "triton_ms": 4.0},
    }
    # Another GPU (or torch, triton, vitcore version, or kernel sources): another file, measured again.
    other = make_auto(tmp_path, env={**ENV, "gpu": "Other GPU"})
    other.choose("layer_norm", *ln_inputs())
    assert other.timer.calls == ["layer_norm/torch", "layer_norm/triton"]
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".json")]) == 2


def test_a_new_process_reuses_the_cache_without_measuring(tmp_path):
    make_auto(tmp_path).choose("attention", *attn_inputs())
    fresh = make_auto(tmp_path, timer=FakeTimer(times={}))  # any measurement would raise KeyError
    assert fresh.choose("attention", *attn_inputs()) == "triton"
    assert fresh.timer.calls == []
    (row,) = fresh.rows()
    assert row["source"] == "cache" and row["torch_ms"] == 5.0 and row["triton_ms"] == 2.5


def test_vitcore_cache_moves_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(autobackend.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert autobackend.cache_folder() == str(tmp_path / "elsewhere")
    make_auto(tmp_path, cache_dir=False).choose("layer_norm", *ln_inputs())
    assert cache_file(tmp_path / "elsewhere")
    monkeypatch.delenv(autobackend.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autobackend.cache_folder() == str(tmp_path / "xdg" / "vitcore")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autobackend.cache_folder() == str(tmp_path / "home" / ".cache" / "vitcore")


CORRUPT = {  # what a damaged cache file may hold, made from the good one
    "not_json": lambda good: b"{not json",
    "not_utf8": lambda good: b"\xff\xfe\x00",
    "a_list": lambda good: b"[1, 2]",
    "no_choices": lambda good: json.dumps({"format": 1, "environment": ENV}).encode(),
    "a_bad_entry": lambda good: json.dumps({**good, "choices": {"x": {"backend": "cuda"}}}).encode(),
    "a_bad_timing": lambda good: json.dumps({**good, "choices": {"x": {"backend": "torch", "torch_ms": "1"}}}).encode(),
    "truncated": lambda good: json.dumps(good).encode()[:40],
}


@pytest.mark.parametrize("damage", list(CORRUPT))
def test_a_corrupt_cache_file_is_ignored_with_a_warning(tmp_path, damage):
    make_auto(tmp_path).choose("layer_norm", *ln_inputs())
    path = cache_file(tmp_path)
    with open(path, "rb") as f:
        good = json.load(f)
    with open(path, "wb") as f:
        f.write(CORRUPT[damage](good))
    auto = make_auto(tmp_path)
    with pytest.warns(UserWarning, match="ignoring the backend cache"):
        assert auto.choose("layer_norm", *ln_inputs()) == "triton"
    assert auto.timer.calls == ["layer_norm/torch", "layer_norm/triton"]  # measured again
    with open(path) as f:
        assert json.load(f) == good  # and rewritten whole


def test_an_unwritable_cache_folder_warns_and_keeps_the_choice(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    auto = AutoBackend(timer=FakeTimer(), is_cuda=lambda t: True, environment=lambda d: ENV,
                       cache_dir=str(blocker / "cache"))
    with pytest.warns(UserWarning, match="cannot write the backend cache"):
        assert auto.choose("layer_norm", *ln_inputs()) == "triton"
    assert auto.choose("layer_norm", *ln_inputs()) == "triton" and len(auto.timer.calls) == 2


def test_a_failing_triton_kernel_means_torch_and_is_not_persisted(tmp_path):
    auto = make_auto(tmp_path, timer=FakeTimer(fail=("attention/triton",)))
    assert auto.choose("attention", *attn_inputs()) == "torch"
    (row,) = auto.rows()
    assert row["source"].startswith("triton failed: RuntimeError") and row["triton_ms"] is None
    assert not os.listdir(tmp_path)


def test_a_tie_goes_to_torch(tmp_path):
    auto = make_auto(tmp_path, timer=FakeTimer(times={**TIMES, "layer_norm/triton": 2.0}))
    assert auto.choose("layer_norm", *ln_inputs()) == "torch"


def test_auto_is_torch_off_cuda_and_forced_backends_stay_forced(tmp_path):
    timer = FakeTimer(times={})
    auto = AutoBackend(timer=timer, environment=lambda d: ENV, cache_dir=str(tmp_path))  # the real is_cuda
    with autobackend.using(auto):
        assert ops.pick_backend("auto", "layer_norm", *ln_inputs()) == "torch"
        assert ops.pick_backend("triton", "layer_norm", *ln_inputs()) == "triton"
        assert ops.pick_backend("torch", "attention", *attn_inputs()) == "torch"
    assert timer.calls == [] and auto.rows() == []


def test_pick_backend_asks_the_default_auto_backend(tmp_path):
    with autobackend.using(make_auto(tmp_path)) as auto:
        assert ops.pick_backend("auto", "linear_gelu", *lg_inputs()) == "torch"
        assert ops.pick_backend("auto", "attention", *attn_inputs()) == "triton"
        assert ops.pick_backend("torch", "attention", *attn_inputs()) == "torch"
    assert autobackend.default() is not auto  # the previous one is back


def test_model_backend_report_and_summary_line(tmp_path):
    cfg = ViTConfig(patch_size=4, hidden_size=16, mlp_dim=24, num_heads=2, num_layers=2)
    model = VisionTransformer(cfg, img_size=8, num_classes=3, backend="auto")
    auto = make_auto(tmp_path)
    assert "measured nothing" in autobackend.backend_report(model, auto)
    assert autobackend.summary_line(model, auto).count("auto (nothing measured yet; torch off CUDA)") == 3
    with autobackend.using(auto):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        report = model.backend_report()
    assert len(auto.timer.calls) == 6  # one shape class per op (the five LayerNorms share one)
    lines = report.splitlines()
    assert lines[:3] == ["attention: 2 layers (2 auto)", "layer_norm: 5 layers (5 auto)",
                         "linear_gelu: 2 layers (2 auto)"]
    rows = {line.split()[0]: line.split() for line in lines[4:7]}
    assert rows["layer_norm"][-5:] == ["triton", "2.0000", "1.0000", "2.00x", "measured"]
    assert rows["linear_gelu"][-5:] == ["torch", "3.0000", "4.0000", "0.75x", "measured"]
    assert rows["attention"][-5:] == ["triton", "5.0000", "2.5000", "2.00x", "measured"]
    assert "width=16 dtype=float32 grads=x,weight,bias" in report
    assert lines[-1] == f"cache: {cache_file(tmp_path)}"
    line = autobackend.summary_line(model, auto)
    assert "\n" not in line and line.startswith("backends: ")
    assert "attention [bh<=4 n=5 d=8 grads=q,k,v] triton (2.00x)" in line  # B*H = 2 images x 2 heads
    assert "linear_gelu [m<=16 k=16 n=24 grads=x,weight,bias] torch (0.75x)" in line  # 2 x 5 tokens
    assert "layer_norm [width=16 grads=x,weight,bias] triton (2.00x)" in line

    model.set_backend("torch")
    assert autobackend.summary_line(model, auto) == ("backends: attention torch (forced); layer_norm torch "
                                                     "(forced); linear_gelu torch (forced)")
    assert "5 layers (5 torch)" in autobackend.backend_report(model, auto)


def test_auto_inside_torch_compile_is_torch_and_measures_nothing(tmp_path):
    # The measurements are of eager calls; inside a trace, inductor fuses the torch ops itself.
    auto = make_auto(tmp_path)
    with autobackend.using(auto):
        fn = torch.compile(lambda x, w, b: ops.layer_norm(x, w, b, 1e-6, ops.pick_backend("auto", "layer_norm", x, w,
                                                                                          b)),
                           backend="aot_eager", fullgraph=True)
        x, w, b = ln_inputs()
        torch.testing.assert_close(fn(x, w, b), torch.nn.functional.layer_norm(x, (16,), w, b, 1e-6))
    assert auto.timer.calls == [] and auto.rows() == []


def test_measuring_inside_activation_checkpointing(tmp_path):
    # The first forward measures inside a checkpointed block; the recompute in backward must still match it.
    from kernel_checks import check_close

    cfg = ViTConfig(patch_size=4, hidden_size=16, mlp_dim=24, num_heads=2, num_layers=2)
    model = VisionTransformer(cfg, img_size=8, num_classes=3, backend="auto").set_grad_checkpointing(True)
    ref = VisionTransformer(cfg, img_size=8, num_classes=3, backend="torch")
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    auto = make_auto(tmp_path)
    with autobackend.using(auto):
        model(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert len(auto.timer.calls) == 6
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        check_close(name, p.grad, q.grad, tol=1e-4)
