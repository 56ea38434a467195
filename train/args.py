"""Command-line flags of `python -m train.finetune`: jeonsworld/ViT-pytorch's names, `-` or `_` both accepted."""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

import vitcore
from vitcore.config import OFFICIAL_NAMES
from vitcore.ops import BACKENDS
from vitcore.precision import PRECISIONS

from .recipes import add_recipe_flags, check_recipe_args

__all__ = ["build_parser", "parse_args", "add_flag", "finite_float", "explicit_flags", "check_cpu_model",
           "UsageError"]

# Fine-tuning a model this large on a CPU takes days per epoch: refused unless --device cpu says it is meant.
CPU_PARAM_LIMIT = 30_000_000


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block on error; the contract is one line and exit code 2.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)  # run_cli prefixes the program's name


class _DefaultsFormatter(argparse.HelpFormatter):
    # --help shows every flag's default: appended unless the help text already states it.
    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)  # argparse prints no help line at all for a flag without help text
            action.help = f"default: {self._default(action)}"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        return f"{text} (default: {self._default(action)})"

    @staticmethod
    def _default(action: argparse.Action) -> str:
        if action.default is False or action.default is None and action.nargs == 0:  # store_true / store_const
            return "off"
        return "none" if action.default is None else "%(default)s"


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False) -> Callable[[str], float]:
    """An argparse `type`: a finite float in [lo, hi] (an open end with `lo_open`/`hi_open`; None: unbounded).

    nan and inf are refused at parse time, so the message names the flag: `argument --learning_rate: ...`.
    """
    ge, le = (">" if lo_open else ">="), ("<" if hi_open else "<=")
    want = " and ".join(s for s in ((f"{ge} {lo:g}" if lo is not None else ""),
                                    (f"{le} {hi:g}" if hi is not None else "")) if s)

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
        bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
        if not math.isfinite(v) or bad_lo or bad_hi:
            raise argparse.ArgumentTypeError(f"must be a finite number{' ' + want if want else ''}, got {text}")
        return v

    parse.__name__ = "finite number"  # what argparse calls the type in its own messages
    return parse


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add `--name` plus its other spelling (`_` <-> `-`), both writing the same dest."""
    spellings = [f"--{name}"]
    alt = name.replace("_", "-") if "_" in name else name.replace("-", "_")
    if alt != name:
        spellings.append(f"--{alt}")
    parser.add_argument(*spellings, dest=name.replace("-", "_"), **kwargs)


def build_parser(prog: str = "python -m train.finetune") -> argparse.ArgumentParser:
    """The fine-tuning parser; defaults follow the official CIFAR recipe."""
    p = _Parser(prog=prog, description="Fine-tune a Vision Transformer on CIFAR-10/100 or an image folder.",
                formatter_class=_DefaultsFormatter)
    add_flag(p, "name", default=None,
             help="run folder under --output_dir, owned by one job at a time (default: a new "
                  "<model_type>-<dataset>-<YYYYmmdd-HHMMSS>)")
    add_flag(p, "output_dir", default="output", help="parent of run folders")
    from .datasets import DATASETS  # (train.datasets imports this module)

    add_flag(p, "dataset", choices=DATASETS, default="cifar10",
             help="imagefolder: <data_dir>/{train,test[,val]}/<class>/*; imagenet2012: <data_dir>/{train,val}/<wnid>/* "
                  "(val is the test split); every dataset but CIFAR streams from its files")
    add_flag(p, "data_dir", default="data",
             help="dataset root (CIFAR, oxford_iiit_pet and oxford_flowers102 are downloaded here when missing)")
    add_flag(p, "val_split", type=finite_float(0, 1, hi_open=True), default=0.0,
             help="hold out this fraction of the training split (stratified, from --seed) for validation: every "
                  "evaluation then runs on it, best.pt is chosen on it, and the test split is evaluated once at "
                  "the end (datasets with their own validation split use that one)")
    add_flag(p, "skip_bad_images", action="store_true",
             help="leave out empty or non-image files, and replace a file that fails to decode by the next image "
                  "of its split (each logged once) instead of stopping")
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
    add_flag(p, "learning_rate", type=finite_float(0, lo_open=True), default=3e-2)
    add_flag(p, "weight_decay", type=finite_float(0), default=0.0)
    add_flag(p, "num_steps", type=int, default=10000)
    add_flag(p, "decay_type", choices=["cosine", "linear"], default="cosine")
    add_flag(p, "warmup_steps", type=int, default=500)
    add_flag(p, "max_grad_norm", type=finite_float(0), default=1.0, help="global-norm clipping; 0 disables")
    add_flag(p, "gradient_accumulation_steps", type=int, default=1)
    add_flag(p, "seed", type=int, default=42)
    add_flag(p, "precision", choices=PRECISIONS, default=None,
             help="default: bf16 on CUDA with bf16 support, else fp32")
    p.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="alias of --precision fp16")
    add_flag(p, "backend", choices=BACKENDS, default="auto")
    add_flag(p, "augment", choices=["inception", "official"], default="inception",
             help="inception: RandomResizedCrop(0.05-1); official: the same plus a 50%% horizontal flip")
    add_flag(p, "dropout", type=finite_float(0, 1, hi_open=True), default=None,
             help="override the config's dropout (default: the config's)")
    add_flag(p, "resume", nargs="?", const="yes", choices=["yes", "auto"], default=None,
             help="continue --name's run from its last.pt with the arguments stored there (flags given here "
                  "override them); 'auto': continue when the run folder holds a last.pt, else start the run (for "
                  "preemptible jobs and torchrun --max-restarts)")
    add_flag(p, "overwrite", action="store_true",
             help="start a new run in a folder that holds one: the old run is moved to <name>.old-<timestamp>")
    add_flag(p, "debug", action="store_true", help="show the traceback of an error (also VITCORE_DEBUG=1)")
    add_flag(p, "device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    add_flag(p, "num_workers", type=int, default=None,
             help="data-loading worker processes per training process for streamed datasets (0: load in the "
                  "training process; CIFAR needs none); default: the usable cores / processes on this node - 1")
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
    if args.warmup_steps < 0:
        raise UsageError(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    # Parsing refuses nan/inf already; these come back from a last.pt on --resume too.
    for flag, positive in (("learning_rate", True), ("max_grad_norm", False), ("weight_decay", False)):
        v = getattr(args, flag)
        if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
            raise UsageError(f"--{flag} must be a finite number {'>' if positive else '>='} 0, got {v}")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must lie in [0, 2**32), got {args.seed}")
    if args.name is not None:
        parts = args.name.replace(os.sep, "/").split("/")
        if not args.name.strip() or os.path.isabs(args.name) or any(p in ("", ".", "..") for p in parts):
            raise UsageError(f"--name {args.name!r} must be a folder name under --output_dir (a/b is fine; no "
                             "empty, '.', '..' or absolute part)")
    if args.num_workers is not None and args.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in the folder and --overwrite moves it aside: give one of them")
    if args.resume and args.name is None:
        raise UsageError("--resume needs --name: the run folder under --output_dir to continue (a run started "
                         "without --name got a new <model>-<dataset>-<time> name, printed at its start)")
    _check_device(args, cfg)
    if args.train_batch_size % args.gradient_accumulation_steps:
        raise UsageError(f"--train_batch_size {args.train_batch_size} is not divisible by "
                         f"--gradient_accumulation_steps {args.gradient_accumulation_steps}")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout {args.dropout} must lie in [0, 1)")
    check_recipe_args(args)
    return args


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is a CPU-only build"
    return "torch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES?)"


def _check_device(args: argparse.Namespace, cfg: vitcore.ViTConfig) -> None:
    """--device names a device this machine has; no Triton kernels and no large model on a CPU by accident."""
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            raise UsageError(f"--device {args.device} is not supported: use cuda, cuda:N or cpu")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: {_no_cuda_reason()}; use --device cpu for a small CPU run")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
        on_cpu = dev.type == "cpu"
    else:
        on_cpu = not torch.cuda.is_available()
    if on_cpu and args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("--backend triton runs its kernels on CUDA GPUs (on a CPU only in Triton's slow interpreter, "
                         "TRITON_INTERPRET=1): use --backend torch or auto on the CPU")


def check_cpu_model(args: argparse.Namespace, cfg: vitcore.ViTConfig, device: torch.device) -> None:
    """Refuse a large model on a CPU the run fell back to (no CUDA) unless --device cpu asked for the CPU: it would
    take days, or run out of memory in its first step. Called when the run starts, before any download."""
    if device.type != "cpu" or args.device is not None:
        return
    with torch.device("meta"):  # shapes only: no memory, no time
        n = sum(p.numel() for p in vitcore.VisionTransformer(cfg, img_size=args.img_size).parameters())
    if n > CPU_PARAM_LIMIT:
        raise UsageError(f"--model_type {args.model_type} has {n / 1e6:.0f}M parameters, too many to fine-tune on "
                         f"the CPU ({_no_cuda_reason()}): run it on a GPU, pass --device cpu to run it on the CPU "
                         "anyway, or run a small CPU job, e.g. --model_type ViT-Ti_16 --pretrained_dir augreg:Ti_16 "
                         "--img_size 64 --train_batch_size 32 --num_steps 200")


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    """The dests the command line sets itself (not left at their defaults), with their parsed values.

    It clears `parser`'s defaults: pass a parser of its own (build_parser()).
    """
    # A second parse where nothing has a default: only what argv names ends up in the namespace.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    parser._defaults.clear()
    return vars(parser.parse_args(argv))


# Flags that belong to this invocation, never taken from the run's last.pt.
_INVOCATION = ("name", "output_dir", "resume", "overwrite", "debug", "local_rank")


def _resumed(args: argparse.Namespace, given: dict[str, Any]) -> argparse.Namespace:
    """The arguments stored in the run's last.pt, overridden by the flags given on the command line (each
    override printed); `args` unchanged when `--resume auto` finds no last.pt (a new run)."""
    from .checkpointing import load_checkpoint  # (it imports this module)
    from .run_folder import will_resume

    run_dir = os.path.join(args.output_dir, args.name)
    path = os.path.join(run_dir, "last.pt")
    if not will_resume(args.resume, run_dir):
        return args
    if not os.path.isfile(path):
        where = "no run folder" if not os.path.isdir(run_dir) else "the folder holds no last.pt"
        # best.pt without last.pt: an older version killed during its first last.pt write
        if os.path.isfile(os.path.join(run_dir, "best.pt")):
            where += f"; its best.pt is a whole checkpoint too: copy it to {path} to continue from its step"
        raise UsageError(f"--resume: no checkpoint at {path} ({where}); start the run without --resume, or use "
                         "--resume auto to start it when there is nothing to continue")
    saved = load_checkpoint(path, mmap=True).get("args")  # mmap: the weights are not read here
    if not isinstance(saved, dict):
        raise UsageError(f"--resume: {path} stores no arguments (not a train.finetune last.pt?)")
    merged = vars(args).copy()
    main = int(os.environ.get("RANK", "0")) == 0
    for key in list(merged):
        if key in _INVOCATION or key not in saved:
            continue
        if key in given:
            if main and given[key] != saved[key]:
                print(f"--resume: --{key} {saved[key]} -> {given[key]} (from the command line)", file=sys.stderr)
        else:
            merged[key] = saved[key]
    return argparse.Namespace(**merged)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate; raises UsageError with a one-line message on bad input.

    With --resume the run's last.pt supplies every flag the command line does not give.
    """
    args = build_parser().parse_args(argv)
    if args.resume and args.name is not None:
        args = _resumed(args, explicit_flags(build_parser(), argv))
        try:
            return validate(args)
        except (TypeError, AttributeError) as e:  # a last.pt whose "args" were edited by hand
            raise UsageError(f"--resume: {os.path.join(args.output_dir, args.name, 'last.pt')} stores arguments "
                             f"that do not parse ({type(e).__name__}: {e})") from None
    return validate(args)
