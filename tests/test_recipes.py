"""The fine-tuning recipes, each against a reference: parameter groups and AdamW/SGD against torch optimizers
built from explicit name lists, layer-decay learning rates against their formula, mixup/cutmix targets and
boxes, label smoothing against F.cross_entropy, EMA against its closed form, drop path's expectation and eval
identity, activation checkpointing's gradients and memory, the linear probe's frozen backbone, and the
flag checks."""

from __future__ import annotations

import argparse
import copy
import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cifar_fixtures import make_cifar10
from hypothesis import given
from hypothesis import strategies as st

import vitcore
from train.args import UsageError, build_parser
from train.checkpointing import load_checkpoint, model_from_checkpoint
from train.ema import ModelEMA
from train.mixup import MixDraw, Mixup, cutmix_box
from train.recipes import (
    apply_lr,
    build_optimizer,
    check_recipe_args,
    freeze_backbone,
    load_optimizer_state,
    param_groups,
    smooth_one_hot,
    soft_cross_entropy,
)

TINY = vitcore.CONFIGS["testing"].replace(num_layers=3, hidden_size=8, mlp_dim=16, num_heads=2)
HYBRID = vitcore.ViTConfig(patch_size=1, hidden_size=8, mlp_dim=8, num_heads=2, num_layers=2,
                           resnet_layers=(1,), resnet_width=0.5, representation_size=6)


def _model(cfg=TINY, img=16, classes=5, **kw) -> vitcore.VisionTransformer:
    torch.manual_seed(0)
    model = vitcore.VisionTransformer(cfg, img_size=img, num_classes=classes, backend="torch", **kw)
    with torch.no_grad():  # a non-zero head, so that every parameter gets a gradient
        model.head.weight.normal_(0, 0.1)
    return model


def _ns(**kw) -> argparse.Namespace:
    base = dict(optimizer="sgd", learning_rate=0.1, weight_decay=0.0, layer_decay=None, adam_betas=None,
                adam_eps=None)
    return argparse.Namespace(**{**base, **kw})


def _grad_step(model, optimizer, x, y, lr=None):
    if lr is not None:
        apply_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


# ---------------------------------------------------------------- parameter groups, optimizers

# Written out by hand from the architecture: what timm and nanoGPT decay (weight matrices, conv kernels).
def _decayed_names(cfg) -> set[str]:
    names = {"embedding.weight", "head.weight"}
    for i in range(cfg.num_layers):
        names |= {f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.out.weight", f"blocks.{i}.mlp.fc1.weight",
                  f"blocks.{i}.mlp.fc2.weight"}
    if cfg.representation_size:
        names.add("pre_logits.weight")
    if cfg.resnet_layers:
        names |= {"resnet.conv_root.weight", "resnet.stages.0.0.conv_proj.weight"}
        names |= {f"resnet.stages.0.0.conv{k}.weight" for k in (1, 2, 3)}
    return names


@pytest.mark.parametrize("cfg", [TINY, HYBRID], ids=["vit", "hybrid"])
def test_weight_decay_only_on_weight_matrices_and_convolutions(cfg):
    model = _model(cfg)
    groups = param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == _decayed_names(cfg)
    assert sum(len(g["params"]) for g in groups) == len(names)  # every parameter exactly once
    assert "pos_embedding" not in decayed and "cls_token" not in decayed


@pytest.mark.parametrize("cfg", [TINY, HYBRID], ids=["vit", "hybrid"])
def test_layer_decay_scales_each_depth_as_the_formula(cfg):
    f, depth = 0.7, cfg.num_layers
    model = _model(cfg, img=16)
    groups = param_groups(model, weight_decay=0.0, layer_decay=f)
    scale = {n: g["lr_scale"] for g in groups for p in g["params"]
             for n, q in model.named_parameters() if q is p}

    def expected(name: str) -> float:
        if name.startswith("blocks."):
            return f ** (depth - int(name.split(".")[1]))  # block i of L: F^(L-i)
        if name.startswith(("embedding.", "resnet.", "pos_embedding", "cls_token")):
            return f ** (depth + 1)
        return 1.0  # head, pre_logits, encoder_norm

    for name in scale:
        assert scale[name] == pytest.approx(expected(name), rel=1e-12), name
    assert scale["head.weight"] == 1.0 and scale["blocks.0.norm1.weight"] == pytest.approx(f**depth)

    # The optimizer applies them: one SGD step (momentum buffer = the gradient) moves each parameter by
    # -lr * scale * grad.
    opt = build_optimizer(model, _ns(layer_decay=f))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    _grad_step(model, opt, x, y, lr=0.5)
    assert {round(g["lr"] / 0.5, 12) for g in opt.param_groups} == {round(expected(n), 12) for n in scale}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.5 * expected(n) * p.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_optimizer_groups_match_torch_with_explicit_groups(kind):
    model = _model(HYBRID)
    ref = copy.deepcopy(model)
    wd, betas, eps = 0.05, (0.8, 0.95), 1e-6
    args = _ns(optimizer=kind, weight_decay=wd, adam_betas=list(betas) if kind == "adamw" else None,
               adam_eps=eps if kind == "adamw" else None)
    ours = build_optimizer(model, args)
    decayed = _decayed_names(HYBRID)
    explicit = [{"params": [p for n, p in ref.named_parameters() if n in decayed], "weight_decay": wd},
                {"params": [p for n, p in ref.named_parameters() if n not in decayed], "weight_decay": 0.0}]
    if kind == "adamw":
        theirs = torch.optim.AdamW(explicit, lr=0.01, betas=betas, eps=eps)
    else:
        theirs = torch.optim.SGD(explicit, lr=0.01, momentum=0.9)
    torch.manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
        _grad_step(model, ours, x, y, lr=0.01)
        _grad_step(ref, theirs, x, y)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=n)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), _model(HYBRID).parameters()))


def test_resumed_optimizer_keeps_moments_and_takes_this_runs_hyperparameters():
    model = _model()
    opt = build_optimizer(model, _ns(optimizer="adamw", weight_decay=0.1))
    _grad_step(model, opt, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), lr=0.01)
    saved = opt.state_dict()
    fresh = build_optimizer(model, _ns(optimizer="adamw", weight_decay=0.3))
    load_optimizer_state(fresh, saved)
    assert {g["weight_decay"] for g in fresh.param_groups} == {0.0, 0.3}
    first = next(iter(fresh.state.values()))
    assert first["step"] == 1 and first["exp_avg"].abs().sum() > 0
    with pytest.raises(ValueError, match="parameter groups"):
        load_optimizer_state(build_optimizer(model, _ns(layer_decay=0.5)), saved)


# ---------------------------------------------------------------- soft targets, mixup, cutmix


def test_label_smoothing_equals_torch_cross_entropy():
    logits, y = torch.randn(6, 7), torch.randint(0, 7, (6,))
    t = smooth_one_hot(y, 7, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(6))
    assert torch.allclose(soft_cross_entropy(logits, t), F.cross_entropy(logits, y, label_smoothing=0.1))


@given(st.floats(0.01, 0.99), st.integers(4, 40), st.integers(4, 40), st.integers(0, 1000))
def test_cutmix_box_area_matches_the_corrected_lambda(lam, h, w, seed):
    (y0, y1, x0, x1), corrected = cutmix_box(lam, h, w, np.random.default_rng(seed))
    assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
    area = (y1 - y0) * (x1 - x0)
    assert corrected == pytest.approx(1 - area / (h * w))
    assert area <= (1 - lam) * h * w + 1e-9  # clipping only shrinks the box of side sqrt(1 - lam)


def test_cutmix_pastes_the_partners_box_and_mixes_targets_by_area():
    mix = Mixup(num_classes=4, seed=0, cutmix_alpha=1.0, label_smoothing=0.1)
    draw = next(d for d in (mix.draw(s, 12, 10) for s in range(1, 50)) if d.box and d.box[0] < d.box[1]
                and d.box[2] < d.box[3])
    x = torch.randn(5, 3, 12, 10)
    y = torch.tensor([0, 1, 2, 3, 1])
    out, t = mix.apply(x.clone(), y, draw)
    y0, y1, x0, x1 = draw.box
    inside = torch.zeros(12, 10, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert torch.equal(out[..., inside], x.flip(0)[..., inside])
    assert torch.equal(out[..., ~inside], x[..., ~inside])
    assert draw.lam == pytest.approx(1 - inside.sum().item() / 120)
    assert torch.allclose(t.sum(1), torch.ones(5))
    ref = draw.lam * smooth_one_hot(y, 4, 0.1) + (1 - draw.lam) * smooth_one_hot(y.flip(0), 4, 0.1)
    assert torch.allclose(t, ref)


def test_mixup_blends_with_the_mirrored_batch():
    mix = Mixup(num_classes=3, seed=5, mixup_alpha=0.4)
    draw = mix.draw(7, 8, 8)
    assert draw.box is None and 0 < draw.lam < 1
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    out, t = mix.apply(x.clone(), y, draw)
    assert torch.allclose(out, draw.lam * x + (1 - draw.lam) * x.flip(0), atol=1e-6)
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert t[0, 0] == pytest.approx(draw.lam + (1 - draw.lam) * 1.0)  # sample 0 pairs with sample 3: both 0
    assert t[1, 1] == pytest.approx(draw.lam) and t[1, 2] == pytest.approx(1 - draw.lam)


def test_mixup_draws_are_a_pure_function_of_seed_and_step_with_timms_frequencies():
    a = Mixup(10, seed=3, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.25)
    b = Mixup(10, seed=3, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.25)
    draws = [a.draw(s, 32, 32) for s in range(1, 4001)]
    assert [b.draw(s, 32, 32) for s in (4000, 17, 1)] == [draws[3999], draws[16], draws[0]]  # no history
    assert Mixup(10, seed=4, mixup_alpha=0.8).draw(1, 32, 32) != Mixup(10, seed=3, mixup_alpha=0.8).draw(1, 32, 32)
    mixed = [d for d in draws if d.lam != 1.0]
    cut = [d for d in mixed if d.box is not None]
    assert abs(len(mixed) / len(draws) - 0.6) < 0.03
    assert abs(len(cut) / len(mixed) - 0.25) < 0.03
    assert Mixup(10, seed=0, label_smoothing=0.1).draw(1, 8, 8) == MixDraw()  # smoothing alone never mixes


# ---------------------------------------------------------------- EMA


def test_ema_matches_its_closed_form():
    d, n = 0.9, 7
    model = torch.nn.Linear(3, 2)
    model.register_buffer("count", torch.tensor(0))
    w0 = {k: v.detach().clone().double() for k, v in model.state_dict().items() if v.is_floating_point()}
    ema = ModelEMA(model, d)
    history = []
    torch.manual_seed(0)
    for _ in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        model.count += 1
        history.append({k: v.detach().clone().double() for k, v in model.state_dict().items() if k in w0})
        ema.update(model)
    for k in w0:
        closed = d**n * w0[k] + (1 - d) * sum(d ** (n - t) * history[t - 1][k] for t in range(1, n + 1))
        torch.testing.assert_close(ema.module.state_dict()[k].double(), closed, rtol=1e-6, atol=1e-6)
    assert ema.module.count.item() == n  # integer buffers copied, not averaged
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


# ---------------------------------------------------------------- drop path


def test_drop_path_rates_rise_linearly_over_depth():
    model = _model(TINY.replace(num_layers=5), drop_path=0.2)
    assert [b.drop_path.rate for b in model.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    with pytest.raises(ValueError, match="drop path"):
        _model(drop_path=1.0)


def test_drop_path_keeps_the_expectation_and_is_the_identity_in_eval():
    from vitcore.model import DropPath

    x = torch.rand(40000, 4) + 0.5
    torch.manual_seed(0)
    out = DropPath(0.3).train()(x)
    kept = out[:, 0] != 0  # each sample: all zeros, or x / 0.7
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    torch.testing.assert_close(out[kept], x[kept] / 0.7)
    assert (out / x).mean().item() == pytest.approx(1.0, abs=0.02)  # 4 sigma of a 40000-sample mean
    assert torch.equal(DropPath(0.3).eval()(x), x)

    cfg = TINY.replace(dropout=0.0)
    model, plain = _model(cfg, drop_path=0.5), _model(cfg)  # same seed: same weights
    block, ref = model.blocks[2].train(), plain.blocks[2]  # rate 0.5: each kept branch counts twice
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        torch.manual_seed(0)
        y = block(x.expand(4000, 5, 8))
        outcomes = []
        for keep_attn in (0.0, 2.0):
            h = x + keep_attn * ref.attn(ref.norm1(x))
            outcomes += [h + keep_mlp * ref.mlp(ref.norm2(h)) for keep_mlp in (0.0, 2.0)]
        which = torch.stack([(y - o).abs().amax(dim=(1, 2)) < 1e-5 for o in outcomes], 1)  # (4000, 4)
        assert (which.sum(1) == 1).all()  # every sample is one of the four (attn, mlp) keep patterns
        assert ((which.float().mean(0) - 0.25).abs() < 0.03).all()  # each pattern with chance 1/4
        model.eval()
        img = torch.randn(3, 3, 16, 16)
        assert torch.equal(model(img), plain.eval()(img))


# ---------------------------------------------------------------- activation checkpointing


def _peak_and_kept_bytes(fn) -> tuple[int, int]:
    """(peak, net) CPU bytes allocated while `fn` runs, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak, current


def test_grad_checkpointing_gives_the_same_gradients_with_less_memory():
    cfg = TINY.replace(num_layers=4, hidden_size=32, mlp_dim=128, num_heads=2, dropout=0.1)
    model = _model(cfg, img=64, drop_path=0.2).train()  # dropout and drop path on: their masks are replayed
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 5, (8,))
    results = {}
    held = {}

    def forward():
        torch.manual_seed(3)
        held["loss"] = F.cross_entropy(model(x), y)

    for ck in (False, True, False, True):  # twice each: the first call of each warms up
        model.set_grad_checkpointing(ck)
        model.zero_grad(set_to_none=True)
        peak_fwd, kept = _peak_and_kept_bytes(forward)
        peak_bwd, _ = _peak_and_kept_bytes(lambda: held.pop("loss").backward())  # from the end of forward
        peak = max(peak_fwd, kept + peak_bwd)  # of the whole step
        results[ck] = (kept, peak, {n: p.grad.clone() for n, p in model.named_parameters()})
    (kept0, peak0, g0), (kept1, peak1, g1) = results[False], results[True]
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n
    print(f"activations kept after forward: {kept0} B plain, {kept1} B checkpointed; "
          f"step peak {peak0} B vs {peak1} B")
    assert kept1 < 0.35 * kept0  # only each block's input is kept
    assert peak1 < 0.85 * peak0


# ---------------------------------------------------------------- linear probe


def test_linear_probe_leaves_every_backbone_tensor_bit_identical():
    model = _model(HYBRID)  # dropout-free config; pre_logits present: it trains with the head
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = freeze_backbone(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"pre_logits.weight", "pre_logits.bias", "head.weight", "head.bias"}
    graph_in_backbone = []
    model.encoder_norm.register_forward_hook(lambda m, i, o: graph_in_backbone.append(o.requires_grad))
    opt = build_optimizer(model, _ns(optimizer="adamw", weight_decay=0.1))
    assert sum(len(g["params"]) for g in opt.param_groups) == 4
    for _ in range(3):
        _grad_step(probe, opt, torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), lr=0.01)
    assert graph_in_backbone == [False] * 3  # the backbone ran without autograd
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith(("head.", "pre_logits.")):
            assert not torch.equal(v, after[k]), k
        else:
            assert torch.equal(v, after[k]), k
    assert model.training and all(m.training for m in model.modules())  # the probe restores train mode


def test_linear_probe_features_are_the_eval_mode_ones():
    model = _model(TINY)  # testing config: dropout 0.1
    probe = freeze_backbone(model).train()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(probe(x), probe(x))
    assert torch.equal(probe(x), model.eval()(x))


# ---------------------------------------------------------------- flags


def _parse(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(list(argv))
    check_recipe_args(args)
    return args


def test_recipe_flags_default_to_the_official_recipe():
    args = _parse()
    assert (args.optimizer, args.label_smoothing, args.mixup, args.cutmix, args.drop_path) == ("sgd", 0, 0, 0, 0)
    assert args.layer_decay is None and args.ema is None and args.freeze is None
    assert not args.grad_checkpointing and not args.compile
    timm_like = _parse("--optimizer", "adamw", "--adam-betas", "0.9", "0.98", "--label-smoothing", "0.1",
                       "--mixup", "0.8", "--cutmix", "1.0", "--mixup-switch-prob", "0.5", "--drop-path", "0.1",
                       "--layer-decay", "0.75", "--ema", "0.9998", "--grad-checkpointing", "--compile")
    assert timm_like.adam_betas == [0.9, 0.98] and timm_like.layer_decay == 0.75


@pytest.mark.parametrize("argv, fragment", [
    (["--adam_eps", "1e-6"], "--optimizer adamw only"),
    (["--mixup_prob", "0.5"], "without --mixup or --cutmix"),
    (["--mixup", "0.8", "--mixup_switch_prob", "0.5"], "give both --mixup and --cutmix"),
    (["--freeze", "backbone", "--drop_path", "0.1"], "--drop_path cannot combine with --freeze backbone"),
    (["--freeze", "backbone", "--grad_checkpointing", "--layer_decay", "0.7"], "--layer_decay, --grad_checkpoint"),
    (["--freeze", "backbone", "--dropout", "0.1"], "--dropout cannot combine"),
    (["--ema", "1.0"], "--ema 1.0 must lie in (0, 1)"),
    (["--label_smoothing", "1"], "--label_smoothing 1.0 must lie in [0, 1)"),
    (["--layer_decay", "0"], "(0, 1]"),
    (["--mixup", "-1"], ">= 0"),
])
def test_recipe_flags_that_cannot_combine_say_so_in_one_line(argv, fragment):
    with pytest.raises(UsageError) as e:
        _parse(*argv)
    assert fragment in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_model_matches_eager_on_either_backend(backend):
    model = _model(TINY.replace(dropout=0.0)).set_backend(backend)
    model.set_grad_checkpointing(True)
    compiled = torch.compile(model, fullgraph=True)  # no graph break: the custom ops and checkpoint trace whole
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    F.cross_entropy(compiled(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- end to end: python -m train.finetune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOBS = ("--optimizer", "adamw", "--weight_decay", "0.05", "--label_smoothing", "0.1", "--mixup", "0.8",
         "--cutmix", "1.0", "--drop_path", "0.1", "--layer_decay", "0.75", "--ema", "0.9",
         "--grad_checkpointing")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    make_cifar10(str(root / "data"), n_train=200, n_test=60)
    return root


def _argv(root, name: str, *extra: str) -> list[str]:
    return ["--data_dir", str(root / "data"), "--output_dir", str(root / "runs"), "--name", name,
            "--model_type", "testing", "--pretrained_dir", "none", "--img_size", "32", "--train_batch_size", "16",
            "--eval_batch_size", "64", "--warmup_steps", "3", "--learning_rate", "0.01", "--no_progress",
            "--seed", "3", *extra]


def _run(root, name: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "train.finetune", *_argv(root, name, *extra)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _rows(run_dir) -> list[dict[str, str]]:
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_sigkill_and_resume_with_every_knob_on_gives_the_same_run(cifar):
    common = ("--num_steps", "24", "--eval_every", "6", *KNOBS)
    ref = _run(cifar, "ref", *common)
    assert ref.returncode == 0, ref.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    victim = subprocess.Popen([sys.executable, "-m", "train.finetune", *_argv(cifar, "killed", *common)], cwd=REPO,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = cifar / "runs" / "killed" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert load_checkpoint(str(last))["step"] < 24
    resumed = _run(cifar, "killed", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(str(cifar / "runs" / "ref" / "last.pt")), load_checkpoint(str(last))
    assert b["step"] == 24
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    strip = [{k: v for k, v in r.items() if k not in ("img_per_s", "elapsed_s")} for r in _rows(cifar / "runs" / "ref")]
    assert strip == [{k: v for k, v in r.items() if k not in ("img_per_s", "elapsed_s")}
                     for r in _rows(cifar / "runs" / "killed")]
    splits = {r["split"] for r in strip}
    assert splits == {"train", "test", "test_ema"}
    # The EMA lags the weights: its evaluation differs from the raw one.
    raw = [r["loss"] for r in strip if r["split"] == "test"]
    ema = [r["loss"] for r in strip if r["split"] == "test_ema"]
    assert len(raw) == len(ema) == 4 and raw != ema
    # best.pt was chosen on the better of the two, and evaluate/predict load the one that scored there.
    best = load_checkpoint(str(cifar / "runs" / "ref" / "best.pt"))
    tests = {(r["split"], int(r["step"])): float(r["accuracy"]) for r in strip if r["split"] != "train"}
    assert best["best_accuracy"] == pytest.approx(max(tests.values()))
    step = best["best_step"]
    winner = "ema" if tests[("test_ema", step)] > tests[("test", step)] else "model"
    assert best["preferred_weights"] == winner
    model, _ = model_from_checkpoint(best)
    for k, v in model.state_dict().items():
        assert torch.equal(v, best[winner][k]), k
    ema_model, _ = model_from_checkpoint(best, weights="ema")
    assert all(torch.equal(v, best["ema"][k]) for k, v in ema_model.state_dict().items())


def test_linear_probe_run_trains_the_head_only(cifar):
    proc = _run(cifar, "probe", "--num_steps", "6", "--eval_every", "6", "--freeze", "backbone",
                "--optimizer", "adamw", "--weight_decay", "0.05", "--learning_rate", "0.05")
    assert proc.returncode == 0, proc.stderr
    torch.manual_seed(3)  # the run's --seed: its scratch initialisation, rebuilt here
    initial = vitcore.VisionTransformer(vitcore.CONFIGS["testing"], img_size=32, num_classes=10,
                                        backend="torch").state_dict()
    trained = load_checkpoint(str(cifar / "runs" / "probe" / "last.pt"))["model"]
    for k, v in initial.items():
        if k.startswith("head."):
            assert not torch.equal(v, trained[k]), k
        else:
            assert torch.equal(v, trained[k]), k


def test_resume_refuses_another_optimizer_or_a_missing_ema(cifar, capsys):
    from train import finetune

    assert finetune.main(_argv(cifar, "swap", "--num_steps", "2", "--eval_every", "2")) == 0
    capsys.readouterr()
    for extra, fragment in ((["--optimizer", "adamw"], "--optimizer sgd, not adamw"),
                            (["--ema", "0.99"], "holds no EMA"),
                            (["--layer_decay", "0.8"], "--layer_decay None, not 0.8")):
        assert finetune.main(_argv(cifar, "swap", "--num_steps", "3", "--resume", *extra)) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and fragment in err[0], err


def test_compiled_run_follows_the_eager_one(cifar):
    # Without dropout or drop path (inductor draws its own random numbers), the compiled training forward gives
    # the eager run's losses to float rounding.
    common = ("--num_steps", "3", "--eval_every", "3", "--dropout", "0", "--optimizer", "adamw", "--ema", "0.5")
    eager, compiled = _run(cifar, "eager", *common), _run(cifar, "compiled", *common, "--compile")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    a, b = _rows(cifar / "runs" / "eager"), _rows(cifar / "runs" / "compiled")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for r, s in zip(a, b):
        assert float(r["loss"]) == pytest.approx(float(s["loss"]), rel=1e-4, abs=1e-6), (r, s)
