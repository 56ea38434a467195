"""Fine-tuning recipes beyond the official one: parameter groups, AdamW, soft-target loss, the linear probe.

The official recipe (SGD momentum 0.9, no weight decay, hard-label cross-entropy, every weight trained) is
what every default gives. The knobs here follow timm's conventions, so a timm command line carries over:

- weight decay only on weight matrices and convolutions (ndim >= 2), never on biases, norms, the position
  embeddings or the class token (timm's `param_groups_weight_decay`, nanoGPT's `configure_optimizers`);
- layer-wise lr decay (BEiT / timm `param_groups_layer_decay`): the head (and `encoder_norm`, `pre_logits`)
  scale 1, block i of L (from 0) F^(L-i), the patch and position embeddings, the class token and the ResNet
  root F^(L+1). Each group carries its `lr_scale`; the training step multiplies the schedule's lr by it;
- a linear probe: the backbone frozen and run without autograd, only `pre_logits` and the head train.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NO_DECAY_PARAMS",
    "LinearProbe",
    "add_recipe_flags",
    "apply_lr",
    "build_optimizer",
    "check_recipe_args",
    "decays",
    "eval_mode",
    "freeze_backbone",
    "layer_ids",
    "load_optimizer_state",
    "param_groups",
    "smooth_one_hot",
    "soft_cross_entropy",
]

# Parameters of ndim >= 2 that are not weight matrices: decaying them pulls positions (or the class token)
# towards zero, which no recipe wants.
NO_DECAY_PARAMS = ("pos_embedding", "cls_token")

# Hyperparameters of a group that come from the command line, not from a resumed optimizer state.
_HYPER = ("weight_decay", "lr_scale", "betas", "eps", "momentum")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: weight matrices and conv kernels (ndim >= 2) except positions/class token."""
    return param.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_PARAMS


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Depth of each parameter for layer-wise decay: 0 embeddings/ResNet root, i + 1 block i, L + 1 the rest.

    Found by module identity (which block holds it), not by parsing names, so a wrapper swapped in for a layer
    (LoRA around `fc1`) keeps its block's depth.
    """
    depth = {}
    for i, block in enumerate(model.blocks):
        for p in block.parameters():
            depth[id(p)] = i + 1
    stem = [getattr(model, n, None) for n in ("embedding", "resnet")]
    for module in stem:
        if module is not None:
            for p in module.parameters():
                depth[id(p)] = 0
    for n in NO_DECAY_PARAMS:
        p = getattr(model, n, None)
        if p is not None:
            depth[id(p)] = 0
    top = len(model.blocks) + 1
    return {name: depth.get(id(p), top) for name, p in model.named_parameters()}


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters: (depth, decays) -> one group with its weight_decay and
    lr_scale (F^(L+1-depth), 1 without layer decay). Only parameters with requires_grad are included.

    The grouping depends only on the model and on whether layer decay is on, never on the decay values, so a
    resumed optimizer state always fits.
    """
    top = len(model.blocks) + 1
    depth = layer_ids(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        d = depth[name] if layer_decay is not None else top
        wd = decays(name, p)
        group = groups.get((d, wd))
        if group is None:
            scale = 1.0 if layer_decay is None else float(layer_decay) ** (top - d)
            group = groups[(d, wd)] = {"params": [], "weight_decay": weight_decay if wd else 0.0, "lr_scale": scale}
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD momentum 0.9 (official) or AdamW over `param_groups`; lr is the peak, the schedule sets it per step."""
    groups = param_groups(model, args.weight_decay, getattr(args, "layer_decay", None))
    if getattr(args, "optimizer", "sgd") == "adamw":
        betas = tuple(args.adam_betas) if args.adam_betas is not None else (0.9, 0.999)
        eps = args.adam_eps if args.adam_eps is not None else 1e-8
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=betas, eps=eps)
    return torch.optim.SGD(groups, lr=args.learning_rate, momentum=0.9)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set this step's lr: the schedule's value times each group's `lr_scale` (layer decay; 1 otherwise)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore moments and step counts from `state`, keeping this command line's hyperparameters.

    torch's load_state_dict would also restore the saved groups' weight decay and betas; the run's flags win
    here, as they do for the schedule (and a change is reported by the caller, never silent).
    """
    fresh = [{k: g[k] for k in _HYPER if k in g} for g in optimizer.param_groups]
    saved = state.get("param_groups", [])
    if len(saved) != len(fresh) or any(len(s["params"]) != len(g["params"])
                                       for s, g in zip(saved, optimizer.param_groups)):
        raise ValueError(f"the saved optimizer has {len(saved)} parameter groups of sizes "
                         f"{[len(s['params']) for s in saved]}, this run {len(fresh)} of sizes "
                         f"{[len(g['params']) for g in optimizer.param_groups]}")
    optimizer.load_state_dict(state)
    for group, hyper in zip(optimizer.param_groups, fresh):
        group.update(hyper)


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) int64 -> (B, K) float targets: 1 - e + e/K on the label, e/K elsewhere (timm / torch convention)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k t_k log softmax(logits)_k; targets (B, K) rows summing to 1."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` and its children in eval mode inside the block; each one's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _head_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in (getattr(model, "pre_logits", None), model.head) if m is not None]


def freeze_backbone(model: nn.Module) -> LinearProbe:
    """Freeze every parameter but `pre_logits` and the head; returns the module to train through."""
    trainable = {id(p) for m in _head_modules(model) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return LinearProbe(model)


class LinearProbe(nn.Module):
    """A linear probe: the backbone under no_grad in eval mode (frozen features: no dropout, no drop path, no
    autograd graph, no weight-gradient kernels), then `forward_head` (pool, pre_logits, head) with autograd.

    The model stays a plain submodule: checkpoints save `model.state_dict()` unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), eval_mode(self.model):
            feats = self.model.forward_features(x)  # (B, N, D), no graph
        return self.model.forward_head(feats)  # (B, num_classes)


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """The recipe flags of `train.finetune`, as a group; every default is the official recipe."""
    from .args import add_flag, finite_float  # args imports this module

    g = parser.add_argument_group("recipes (defaults: the official recipe)")
    add_flag(g, "optimizer", choices=["sgd", "adamw"], default="sgd",
             help="sgd: momentum 0.9 (official); adamw: torch.optim.AdamW (decoupled weight decay)")
    add_flag(g, "adam_betas", type=float, nargs=2, default=None, metavar=("B1", "B2"),
             help="AdamW betas (default 0.9 0.999)")
    add_flag(g, "adam_eps", type=finite_float(0, lo_open=True), default=None, help="AdamW epsilon (default 1e-8)")
    add_flag(g, "label_smoothing", type=float, default=0.0, help="target smoothing E: 1-E+E/K on the label")
    # finite_float: nan/inf refused at parse time (a comparison like `alpha < 0` lets nan through).
    add_flag(g, "mixup", type=finite_float(0), default=0.0, help="mixup alpha (timm --mixup); 0 disables")
    add_flag(g, "cutmix", type=finite_float(0), default=0.0, help="cutmix alpha (timm --cutmix); 0 disables")
    add_flag(g, "mixup_prob", type=float, default=None, help="chance a batch is mixed (default 1.0)")
    add_flag(g, "mixup_switch_prob", type=float, default=None,
             help="with both --mixup and --cutmix: chance of cutmix instead of mixup (default 0.5)")
    add_flag(g, "drop_path", type=float, default=0.0,
             help="stochastic depth rate R of the last block (block i of L: R*i/(L-1), as timm)")
    add_flag(g, "layer_decay", type=float, default=None,
             help="layer-wise lr decay F: head 1, block i of L F^(L-i), embeddings F^(L+1)")
    add_flag(g, "ema", type=float, default=None,
             help="decay D of an exponential moving average of the weights, evaluated beside them (e.g. 0.9998)")
    add_flag(g, "grad_checkpointing", action="store_true",
             help="recompute each encoder block in the backward pass: less memory, same gradients")
    add_flag(g, "compile", action="store_true", help="torch.compile the model (either --backend)")
    add_flag(g, "freeze", choices=["backbone"], default=None,
             help="backbone: a linear probe (only pre_logits and the head train; the backbone runs without autograd)")


def check_recipe_args(args: argparse.Namespace) -> None:
    """Ranges and combinations of the recipe flags; each failure is one line (UsageError) naming the fix."""
    from .args import UsageError

    if not 0.0 <= args.label_smoothing < 1.0:
        raise UsageError(f"--label_smoothing {args.label_smoothing} must lie in [0, 1)")
    for flag in ("mixup", "cutmix"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} {getattr(args, flag)} must be >= 0 (0 disables it)")
    for flag in ("mixup_prob", "mixup_switch_prob"):
        v = getattr(args, flag)
        if v is not None and not 0.0 <= v <= 1.0:
            raise UsageError(f"--{flag} {v} must lie in [0, 1]")
    if not 0.0 <= args.drop_path < 1.0:
        raise UsageError(f"--drop_path {args.drop_path} must lie in [0, 1)")
    if args.layer_decay is not None and not 0.0 < args.layer_decay <= 1.0:
        raise UsageError(f"--layer_decay {args.layer_decay} must lie in (0, 1] (e.g. 0.75)")
    if args.ema is not None and not 0.0 < args.ema < 1.0:
        raise UsageError(f"--ema {args.ema} must lie in (0, 1) (e.g. 0.9998)")
    if args.adam_eps is not None and args.adam_eps <= 0:
        raise UsageError(f"--adam_eps {args.adam_eps} must be > 0")
    if args.adam_betas is not None and not all(0.0 <= b < 1.0 for b in args.adam_betas):
        raise UsageError(f"--adam_betas {' '.join(map(str, args.adam_betas))} must each lie in [0, 1)")
    # Combinations that would silently do nothing.
    if args.optimizer != "adamw":
        given = [f for f in ("adam_betas", "adam_eps") if getattr(args, f) is not None]
        if given:
            raise UsageError(f"--{given[0]} applies to --optimizer adamw only (now {args.optimizer})")
    mixing = args.mixup > 0 or args.cutmix > 0
    if args.mixup_prob is not None and not mixing:
        raise UsageError("--mixup_prob has no effect without --mixup or --cutmix > 0")
    if args.mixup_switch_prob is not None and not (args.mixup > 0 and args.cutmix > 0):
        raise UsageError("--mixup_switch_prob chooses between mixup and cutmix: give both --mixup and --cutmix > 0")
    if args.freeze == "backbone":
        # The frozen backbone runs in eval mode without autograd: these would change nothing.
        clash = [("drop_path", args.drop_path > 0), ("layer_decay", args.layer_decay is not None),
                 ("grad_checkpointing", args.grad_checkpointing),
                 ("dropout", args.dropout is not None and args.dropout > 0)]
        named = [f"--{f}" for f, on in clash if on]
        if named:
            raise UsageError(f"{', '.join(named)} cannot combine with --freeze backbone: the frozen backbone runs in "
                             "eval mode without autograd and only the head trains; drop the flag(s) or the freeze")
