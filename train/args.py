"""Command-line flags of `python -m train.finetune`: jeonsworld/ViT-pytorch's names, `-` or `_` both accepted."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import vitcore
from vitcore.config import OFFICIAL_NAMES
from vitcore.ops import BACKENDS
from vitcore.precision import PRECISIONS

from .recipes import add_recipe_flags, check_recipe_args

__all__ = ["build_parser", "parse_args", "add_flag", "UsageError"]


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block on error; the contract is one line and exit code 2.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add `--name` plus its other spelling (`_` <-> `-`), both writing the same dest."""
    spellings = [f"--{name}"]
    alt = name.replace("_", "-") if "_" in name else name.replace("-", "_")
    if alt != name:
        spellings.append(f"--{alt}")
    parser.add_argument(*spellings, dest=name.replace("-", "_"), **kwargs)


def build_parser(prog: str = "python -m train.finetune") -> argparse.ArgumentParser:
    """The fine-tuning parser; defaults follow the official CIFAR recipe."""
    p = _Parser(prog=prog, description="Fine-tune a Vision Transformer on CIFAR-10/100 or an image folder.")
    add_flag(p, "name", default="output", help="run folder under --output_dir")
    add_flag(p, "output_dir", default="output", help="parent of run folders")
    add_flag(p, "dataset", choices=["cifar10", "cifar100", "imagefolder"], default="cifar10")
    add_flag(p, "data_dir", default="data", help="dataset root (CIFAR is downloaded here when missing)")
    # Plain strings: the check happens in validate() so an unknown name gives one clear line with the valid ones.
    add_flag(p, "model_type", default=None,
             help="one of: " + ", ".join(OFFICIAL_NAMES) + " (or an alias: AugReg's B_16, R_Ti_16..., R50-ViT-B_16); "
                  "default: the model --pretrained_dir names or holds, else ViT-B_16")
    add_flag(p, "pretrained_dir", default=None,
             help="a named source (i21k:NAME, i21k+i1k:NAME[-224], sam:NAME, augreg:NAME, augreg:FILENAME; "
                  "downloaded into checkpoint/ when missing), an official .npz, a folder holding <model_type>.npz, "
                  "or 'none' (scratch); default: i21k:<model_type>, i.e. checkpoint/<model_type>.npz. A file or "
                  "folder must exist: it is never downloaded")
    add_flag(p, "img_size", type=int, default=224)
    add_flag(p, "train_batch_size", type=int, default=512, help="effective (global) batch per optimizer step")
    add_flag(p, "eval_batch_size", type=int, default=64)
    add_flag(p, "eval_every", type=int, default=100)
    add_flag(p, "learning_rate", type=float, default=3e-2)
    add_flag(p, "weight_decay", type=float, default=0.0)
    add_flag(p, "num_steps", type=int, default=10000)
    add_flag(p, "decay_type", choices=["cosine", "linear"], default="cosine")
    add_flag(p, "warmup_steps", type=int, default=500)
    add_flag(p, "max_grad_norm", type=float, default=1.0, help="global-norm clipping; 0 disables")
    add_flag(p, "gradient_accumulation_steps", type=int, default=1)
    add_flag(p, "seed", type=int, default=42)
    add_flag(p, "precision", choices=PRECISIONS, default=None,
             help="default: bf16 on CUDA with bf16 support, else fp32")
    p.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="alias of --precision fp16")
    add_flag(p, "backend", choices=BACKENDS, default="auto")
    add_flag(p, "augment", choices=["inception", "official"], default="inception",
             help="inception: RandomResizedCrop(0.05-1); official: the same plus a 50%% horizontal flip")
    add_flag(p, "dropout", type=float, default=None, help="override the config's dropout (default: the config's)")
    add_flag(p, "resume", action="store_true", help="continue from <run>/last.pt")
    add_flag(p, "device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    add_flag(p, "num_workers", type=int, default=None, help="CPU threads for torch on CPU (default: torch's)")
    add_flag(p, "no_progress", action="store_true", help="no tqdm bar (logs only)")
    add_recipe_flags(p)  # optimizer, soft targets, drop path, layer decay, EMA, memory/speed, linear probe
    # Accepted so that jeonsworld/ViT-pytorch command lines run unchanged; they select nothing here.
    compat = p.add_argument_group("accepted for compatibility, no effect")
    add_flag(compat, "fp16_opt_level", default=None,
             help="apex's level (O1/O2): native AMP is used instead (--precision fp16 = apex O1)")
    add_flag(compat, "loss_scale", type=float, default=None, help="apex's loss scale: the GradScaler is dynamic")
    add_flag(compat, "local_rank", type=int, default=None,
             help="set by torch.distributed.launch: the rank is read from LOCAL_RANK/RANK/WORLD_SIZE")
    return p


def validate(args: argparse.Namespace) -> argparse.Namespace:
    """Checks that need more than argparse; each failure is one line (UsageError)."""
    from .official import run_model_type  # (train.official imports this module)

    args.model_type = run_model_type(args.pretrained_dir, args.model_type)
    try:
        cfg = vitcore.CONFIGS[args.model_type]
    except KeyError as e:
        raise UsageError(str(e.args[0] if e.args else e)) from None
    stride = cfg.input_stride
    if args.img_size < 1 or args.img_size % stride:
        raise UsageError(f"--img_size {args.img_size} is not a multiple of {args.model_type}'s input stride {stride}"
                         f" (patch size{' x ResNet downsampling' if cfg.is_hybrid else ''})")
    for flag in ("train_batch_size", "eval_batch_size", "eval_every", "num_steps", "gradient_accumulation_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.warmup_steps < 0 or args.learning_rate <= 0 or args.max_grad_norm < 0 or args.weight_decay < 0:
        raise UsageError("--warmup_steps, --max_grad_norm and --weight_decay must be >= 0 and --learning_rate > 0")
    if args.train_batch_size % args.gradient_accumulation_steps:
        raise UsageError(f"--train_batch_size {args.train_batch_size} is not divisible by "
                         f"--gradient_accumulation_steps {args.gradient_accumulation_steps}")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout {args.dropout} must lie in [0, 1)")
    check_recipe_args(args)
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate; raises UsageError with a one-line message on bad input."""
    return validate(build_parser().parse_args(argv))
