"""`python -m train.finetune`: fine-tune an official ViT checkpoint on CIFAR-10/100 (or an image folder).

The official recipe: SGD momentum 0.9, linear warmup then cosine/linear decay (steps from 1), global-norm
clipping, gradient accumulation, cross-entropy, native AMP. One process or many through torchrun (DDP).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

import vitcore
from vitcore.fileio import atomic_write
from vitcore.flops import mfu
from vitcore.precision import autocast_dtype

from . import distributed
from .args import UsageError, check_cpu_model, parse_args
from .checkpointing import load_checkpoint, save_checkpoint
from .cli import Interrupted, TrainingError, is_out_of_memory, one_line, run_cli
from .data import ImageSet
from .datasets import DOWNLOADS, Split, ensure_dataset, open_dataset
from .download import CIFAR, ensure_cifar
from .ema import ModelEMA
from .evaluate import evaluate_model
from .metrics import MetricsLogger, plot_curves, write_args_json
from .mixup import Mixup, mixup_from_args
from .official import from_scratch, run_pretrained_path
from .recipes import apply_lr, build_optimizer, freeze_backbone, load_optimizer_state, soft_cross_entropy
from .run_folder import (
    RunLock,
    default_name,
    describe_device,
    existing_run_files,
    move_aside,
    remove_run_temps,
    will_resume,
)
from .schedule import WarmupDecaySchedule
from .streaming import default_num_workers

__all__ = ["main", "train"]


def _oom_advice(step: int, micro: int, accum: int, per_rank: int, global_batch: int, where: str = "") -> str:
    """What to do after running out of memory: the next accumulation count that divides the per-process batch
    (doubling may not: 12 images per process with 4 micro-batches cannot take 8)."""
    head = f"out of memory{where} at step {step} with {micro} images per micro-batch per process; "
    more = next((a for a in range(accum + 1, per_rank + 1) if per_rank % a == 0), None)
    if more is None:
        return head + "already one image per micro-batch: try a smaller --img_size or --model_type, or more GPUs"
    return head + (f"try --gradient_accumulation_steps {more} (the effective batch stays {global_batch}), a smaller "
                   "--train_batch_size, --img_size or --model_type")


def _resolve_precision(args: argparse.Namespace, device: torch.device) -> str:
    if args.precision is not None:
        return args.precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"  # CPU default: exact and deterministic


def _step_seed(seed: int, rank: int, step: int) -> int:
    # Dropout randomness as a function of (seed, rank, step): resuming needs no generator history.
    return (seed * 1_000_003 + rank * 999_983 + step * 7_919 + 17) % (2**63 - 1)



def _pretrained_path(args: argparse.Namespace, fetch: bool = False, progress: bool = False) -> str | None:
    # None for --pretrained_dir none; a named source or the default (i21k:<model_type>, checkpoint/<model_type>.npz)
    # is downloaded when fetched; a file or a folder holding <model_type>.npz is used as it is (train.official).
    return run_pretrained_path(args.pretrained_dir, args.model_type, progress, fetch)


def _load_data(args: argparse.Namespace, dist: distributed.DistInfo) -> tuple[Split, Split, Split | None]:
    """(train, the split every evaluation runs on, the test split evaluated once at the end when those evaluations
    run on a validation split, else None). CIFAR is held on the device; every other dataset streams from its
    files through --num_workers worker processes (train.streaming)."""
    # The first process of each node downloads (nodes need not share a filesystem; where they do, the temp file +
    # rename keeps concurrent downloads whole); the others wait, then everyone reads the files (each split once).
    if dist.local_rank == 0:
        progress = dist.is_main and not args.no_progress
        if args.dataset in CIFAR:
            ensure_cifar(args.dataset, args.data_dir, progress=progress)
        elif args.dataset in DOWNLOADS:
            ensure_dataset(args.dataset, args.data_dir, progress=progress)
    distributed.barrier()
    workers = default_num_workers() if args.num_workers is None else args.num_workers

    def note(message: str) -> None:  # files left out when indexing: every rank finds the same ones
        if dist.is_main:
            print(message, file=sys.stderr)

    splits = open_dataset(args.dataset, args.data_dir, val_split=args.val_split, seed=args.seed, num_workers=workers,
                          skip_bad_images=args.skip_bad_images, log=note)
    found = [s for s in (splits.train, splits.val, splits.test) if s is not None]
    for s in found:
        if not isinstance(s, ImageSet):  # a file skipped while decoding: each rank reads its own shard
            s.log = lambda m: print(f"[rank {dist.rank}] {m}" if dist.world_size > 1 else m, file=sys.stderr)
    train_set, val_set, test_set = (s.to(dist.device) if s is not None else None
                                    for s in (splits.train, splits.val, splits.test))
    return (train_set, val_set, test_set) if val_set is not None else (train_set, test_set, None)


def _build_model(args: argparse.Namespace, cfg: vitcore.ViTConfig, num_classes: int,
                 dist: distributed.DistInfo, load: bool = True) -> tuple[torch.nn.Module, str | None]:
    torch.manual_seed(args.seed)  # the same initial head (and scratch weights) on every rank
    if load and not from_scratch(args.pretrained_dir):
        if dist.local_rank == 0:  # one download per node, as for the data
            _pretrained_path(args, fetch=True, progress=dist.is_main and not args.no_progress)
        distributed.barrier()
    path = _pretrained_path(args)
    # load_pretrained writes every parameter (loaded, resized, or a zeroed head): build on the meta device rather
    # than initialise ViT-H on the CPU only to overwrite it; it materialises the model before copying.
    build_on = torch.device("meta") if path is not None and load else None
    with build_on or contextlib.nullcontext():
        model = vitcore.VisionTransformer(cfg, img_size=args.img_size, num_classes=num_classes, backend=args.backend,
                                          drop_path=args.drop_path)
    if path is not None and load:
        try:
            report = vitcore.load_pretrained(model, path)
        except vitcore.CheckpointError as e:
            raise UsageError(f"{path} does not fit --model_type {args.model_type} (a checkpoint of another model "
                             f"type?): {one_line(e, limit=300)}") from None
        if dist.is_main:
            print(f"loaded {path}: {report}", file=sys.stderr)
    return model.to(dist.device), path


# ---------------------------------------------------------------- the run's state


@dataclass
class RunPlan:
    """What the command line asks for, checked, before anything is built or read."""

    args: argparse.Namespace
    dist: distributed.DistInfo
    cfg: vitcore.ViTConfig
    precision: str
    accum: int  # micro-batches per optimizer step
    per_rank: int  # images per process per optimizer step
    micro: int  # images per process per micro-batch
    run_dir: str
    resume: dict[str, Any] | None  # last.pt's contents when resuming
    lock: RunLock | None = None  # rank 0's lock on run_dir, held until the run ends

    @property
    def last_path(self) -> str:
        return os.path.join(self.run_dir, "last.pt")

    @property
    def best_path(self) -> str:
        return os.path.join(self.run_dir, "best.pt")


@dataclass
class Run:
    """Everything the steps share; `step` is the last completed optimizer step."""

    plan: RunPlan
    train_set: ImageSet
    eval_set: ImageSet
    model: torch.nn.Module
    ddp: torch.nn.Module  # the model, wrapped for DDP when there are several processes
    optimizer: torch.optim.Optimizer
    schedule: WarmupDecaySchedule
    scaler: torch.amp.GradScaler
    pretrained: str | None
    ema: ModelEMA | None = None  # --ema: the average, evaluated beside the weights
    mixup: Mixup | None = None  # soft targets: mixup / cutmix / label smoothing
    preferred_weights: str = "model"  # "ema" when the average evaluated better at the last evaluation
    step: int = 0
    saved_step: int | None = None  # the step last.pt holds (None: no checkpoint yet)
    best: tuple[float, int] = (-1.0, 0)  # (accuracy, step)
    last_eval: tuple[float, float] = (math.nan, math.nan)  # (loss, accuracy)
    logger: MetricsLogger | None = None
    bar: Any = None
    t_start: float = field(default_factory=time.time)
    train_time: float = 0.0
    images_seen: int = 0
    final_test: Any = None  # the test split when evaluations run on a validation split: evaluated once, at the end
    test_eval: tuple[float, float] | None = None  # (loss, accuracy) of that final test
    batches: Any = None  # the training batches of the remaining steps, one per step (train_batches)

    @property
    def eval_split(self) -> str:
        """The split every evaluation runs on, as metrics.csv names it."""
        return "val" if self.final_test is not None else "test"

    @property
    def args(self) -> argparse.Namespace:
        return self.plan.args


# ---------------------------------------------------------------- the steps, in the order they run


def prepare(args: argparse.Namespace, dist: distributed.DistInfo) -> RunPlan:
    """Check what needs the world size or the run folder, and read last.pt when resuming."""
    cfg = vitcore.CONFIGS[args.model_type]
    check_cpu_model(args, cfg, dist.device)  # before any download: `make finetune` on a laptop fails at once
    if args.dropout is not None:
        cfg = cfg.replace(dropout=args.dropout)
    accum, world = args.gradient_accumulation_steps, dist.world_size
    if args.train_batch_size % (world * accum):
        raise UsageError(f"--train_batch_size {args.train_batch_size} must be divisible by world size x "
                         f"accumulation = {world} x {accum}")
    per_rank = args.train_batch_size // world
    if args.name is None:  # rank 0's clock names the run for every rank
        args.name = distributed.broadcast_object(
            default_name(args.model_type, args.dataset, args.output_dir) if dist.is_main else None)
        if dist.is_main:
            print(f"run folder {os.path.join(args.output_dir, args.name)} (continue it with --resume --name "
                  f"{args.name})", file=sys.stderr)
    plan = RunPlan(args, dist, cfg, _resolve_precision(args, dist.device), accum, per_rank, per_rank // accum,
                   os.path.join(args.output_dir, args.name), None)
    plan.lock, resuming = _own_run_folder(plan)
    if resuming:
        plan.resume = _read_resume_checkpoint(plan)
    return plan


def _own_run_folder(plan: RunPlan) -> tuple[RunLock | None, bool]:
    """Rank 0 locks the run folder for the run's lifetime and decides under the lock whether the run continues the
    folder's last.pt; every rank gets that decision (or the same one-line refusal)."""
    lock, outcome = None, None
    if plan.dist.is_main:
        lock = RunLock(plan.run_dir)
        try:
            outcome = (True, _claim_run_folder(plan, lock))
        except Exception as e:  # every rank must hear of it: the others wait in the broadcast below
            lock.release()
            outcome = (False, one_line(e) if isinstance(e, UsageError) else f"run folder {plan.run_dir}: {e}")
    ok, value = distributed.broadcast_object(outcome)
    if not ok:
        refusal = UsageError(value)
        refusal.echo = not plan.dist.is_main  # type: ignore[attr-defined]  # rank 0 prints it; the others stay quiet
        raise refusal
    return lock, value


def _claim_run_folder(plan: RunPlan, lock: RunLock) -> bool:
    """Take the lock; refuse to start over an earlier run unless --overwrite moves it aside; clear stale temps.
    Returns whether the run resumes."""
    args, run_dir = plan.args, plan.run_dir
    stale = lock.acquire()
    if stale:
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        print(f"note: {stale}" + (f" (torchrun restart {restart} of this job)" if restart else ""), file=sys.stderr)
    resuming = will_resume(args.resume, run_dir)
    if not resuming:
        present = existing_run_files(run_dir)
        if args.resume == "auto":  # metrics of a run killed before its first checkpoint: it starts again
            present = [f for f in present if f != "metrics.csv"]
        if present and not args.overwrite:
            raise UsageError(f"{run_dir} already holds a run ({', '.join(present)}): continue it with --resume, "
                             f"start a new one with another --name, or pass --overwrite to move it to "
                             f"{run_dir}.old-<time>")
        if args.overwrite and any(e != ".lock" for e in os.listdir(run_dir)):
            print(f"note: --overwrite: moved the earlier run to {move_aside(run_dir)}", file=sys.stderr)
    removed = remove_run_temps(run_dir)  # only now: a temp file of a live job is never touched
    if removed:
        print(f"note: removed {len(removed)} temp file(s) a killed writer left in {run_dir}", file=sys.stderr)
    return resuming


def _read_resume_checkpoint(plan: RunPlan) -> dict[str, Any]:
    args, path = plan.args, plan.last_path
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path}")
    ck = load_checkpoint(path)
    saved = ck.get("args", {})
    if ck.get("model_type") != args.model_type:
        raise UsageError(f"--resume: {path} is a {ck.get('model_type')} run, not {args.model_type}")
    # The data order is a function of (seed, global batch): changing either would not continue the same run.
    if (saved.get("seed"), saved.get("train_batch_size")) != (args.seed, args.train_batch_size):
        raise UsageError(f"--resume: {path} was trained with --seed {saved.get('seed')} --train_batch_size "
                         f"{saved.get('train_batch_size')}; pass the same values")
    if saved.get("val_split", 0.0) != args.val_split:  # it decides which images train
        raise UsageError(f"--resume: {path} was trained with --val_split {saved.get('val_split', 0.0)}, not "
                         f"{args.val_split}; pass the same value")
    if ck.get("img_size") != args.img_size:
        raise UsageError(f"--resume: {path} was trained at --img_size {ck.get('img_size')}, not {args.img_size}; "
                         "pass the same value")
    # The optimizer's state fits only an optimizer of the same kind over the same parameter groups (layer decay on
    # or off decides the grouping; its value may change).
    was = {"optimizer": saved.get("optimizer", "sgd"), "freeze": saved.get("freeze"),
           "layer_decay": saved.get("layer_decay")}
    for flag, before in was.items():
        now = getattr(args, flag)
        if (before is None) != (now is None) or (flag != "layer_decay" and before != now):
            raise UsageError(f"--resume: {path} was trained with --{flag} {before}, not {now}; pass the same value")
    if args.ema is not None and "ema" not in ck:
        raise UsageError(f"--resume: {path} holds no EMA (its run had no --ema): resume without --ema, or start "
                         "a new run")
    # The schedule is rebuilt from these arguments (as the official code does): last.pt's, each flag given on this
    # command line printed as an override when parsing (train.args).
    return ck


def build(plan: RunPlan) -> Run:
    """Data, model (pretrained weights unless resuming), optimizer, schedule and loss scaler."""
    args, dist = plan.args, plan.dist
    train_set, eval_set, final_test = _load_data(args, dist)
    # A resumed run takes its weights from last.pt: no need to read (or download) the pretrained file.
    model, pretrained = _build_model(args, plan.cfg, len(train_set.classes), dist, load=plan.resume is None)
    model.set_grad_checkpointing(args.grad_checkpointing)
    # A linear probe trains through a wrapper that runs the frozen backbone without autograd.
    net = freeze_backbone(model) if args.freeze == "backbone" else model
    optimizer = build_optimizer(model, args)  # SGD (official) or AdamW over the trainable parameters' groups
    ema = ModelEMA(model, args.ema) if args.ema is not None else None
    schedule = WarmupDecaySchedule(args.learning_rate, args.num_steps, args.warmup_steps, args.decay_type)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=plan.precision == "fp16")
    ddp = net
    if dist.world_size > 1:
        device_ids = [dist.device] if dist.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
    if args.compile:
        ddp = torch.compile(ddp)  # the training forward; evaluation runs the plain model
    return Run(plan, train_set, eval_set, model, ddp, optimizer, schedule, scaler, pretrained, ema,
               mixup_from_args(args, len(train_set.classes)), final_test=final_test)


def restore(run: Run) -> None:
    """Continue from last.pt (weights, optimizer, scaler, step, best) and open the run's logs."""
    plan, ck = run.plan, run.plan.resume
    if ck is not None:
        if list(ck.get("classes", [])) != list(run.train_set.classes):
            raise UsageError(f"--resume: {plan.last_path} was trained on other classes ({ck.get('num_classes')}) "
                             f"than --dataset {run.args.dataset} has in {run.args.data_dir} "
                             f"({len(run.train_set.classes)})")
        try:
            run.model.load_state_dict(ck["model"])
        except (RuntimeError, TypeError, KeyError) as e:
            raise UsageError(f"--resume: {plan.last_path}'s weights do not fit a {run.args.model_type} at "
                             f"--img_size {run.args.img_size}: {one_line(e, limit=300)}") from None
        try:
            load_optimizer_state(run.optimizer, ck["optimizer"])  # this command line's weight decay and betas
        except ValueError as e:
            raise UsageError(f"--resume: {plan.last_path}'s optimizer state does not fit this run ({e})") from None
        if run.ema is not None:
            run.ema.load_state_dict(ck["ema"])
        # A disabled scaler (fp32/bf16) saves {}: resuming such a run with fp16 starts a fresh scaler.
        if ck["scaler"]:
            run.scaler.load_state_dict(ck["scaler"])
        run.step, run.best = ck["step"], (ck["best_accuracy"], ck["best_step"])
        run.saved_step = run.step
        if ck.get("train_size", len(run.train_set)) != len(run.train_set) and plan.dist.is_main:
            print(f"note: --resume: the training split now has {len(run.train_set)} images, {plan.last_path}'s run "
                  f"had {ck['train_size']}: the remaining steps do not see the batches the original run would have",
                  file=sys.stderr)
        plan.resume = None  # the weights now live in the model; free the copy
    dist, args = plan.dist, run.args
    run.logger = MetricsLogger(plan.run_dir, enabled=dist.is_main, resume_step=run.step if args.resume else None)
    if dist.is_main:
        resolved = {**vars(args), "precision": plan.precision, "pretrained_path": run.pretrained,
                    "world_size": dist.world_size, "micro_batch_per_rank": plan.micro, "device": str(dist.device),
                    "num_classes": len(run.train_set.classes)}
        write_args_json(resolved, os.path.join(plan.run_dir, "args.json"))
        final = f" / {len(run.final_test)} test" if run.final_test is not None else ""
        print(f"{args.model_type} {args.img_size}px on {args.dataset} ({len(run.train_set)} train / "
              f"{len(run.eval_set)} {run.eval_split}{final}), {dist.world_size} process(es) on {dist.device}, batch "
              f"{args.train_batch_size} = {dist.world_size} x {plan.accum} x {plan.micro}, {plan.precision}, "
              f"steps {run.step + 1}..{args.num_steps}", file=sys.stderr)
    run.bar = tqdm(total=args.num_steps, initial=run.step, disable=not dist.is_main or args.no_progress,
                   dynamic_ncols=True, file=sys.stderr)


def _micro_batches(run: Run, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's micro-batches of global batch `step`: (images (m, 3, S, S), labels (m,)), each a pure
    function of (seed, step), so a resumed run and any number of processes see the same global batches."""
    plan, args = run.plan, run.args
    if run.batches is None:  # one stream for the remaining steps (a streamed split's workers read ahead)
        run.batches = iter(run.train_set.train_batches(args.train_batch_size, plan.dist.rank, plan.dist.world_size,
                                                       args.seed, args.img_size, args.augment == "official", step,
                                                       args.num_steps))
    batch = next(run.batches)  # this rank's shard of global batch `step`
    assert batch.step == step, (batch.step, step)
    for k in range(plan.accum):
        yield batch.micro(slice(k * plan.micro, (k + 1) * plan.micro))  # (m, 3, S, S), (m,)


def train_step(run: Run, step: int) -> float:
    """One optimizer step: forward/backward over the micro-batches, clip, SGD; returns the mean loss."""
    plan, args, dist = run.plan, run.args, run.plan.dist
    t0 = time.perf_counter()
    torch.manual_seed(_step_seed(args.seed, dist.rank, step))  # dropout masks: a function of (seed, rank, step)
    loss_sum = torch.zeros((), device=dist.device)
    # One mixing draw per step, a function of (seed, step): the same for every micro-batch and rank.
    draw = run.mixup.draw(step, args.img_size, args.img_size) if run.mixup is not None else None
    try:
        for k, (x, y) in enumerate(_micro_batches(run, step)):
            if run.mixup is not None:
                x, y = run.mixup.apply(x, y, draw)  # y: (m, K) soft targets
            # Gradients are all-reduced only on the last micro-batch.
            last = k == plan.accum - 1
            sync = run.ddp.no_sync() if dist.world_size > 1 and not last else contextlib.nullcontext()
            with sync:
                with torch.autocast(dist.device.type, dtype=autocast_dtype(plan.precision),
                                    enabled=plan.precision != "fp32"):
                    logits = run.ddp(x)
                loss = soft_cross_entropy(logits, y) if run.mixup is not None else F.cross_entropy(logits.float(), y)
                run.scaler.scale(loss / plan.accum).backward()
            loss_sum += loss.detach()
    except (RuntimeError, MemoryError) as e:  # CUDA's OutOfMemoryError, or the CPU allocator's failure
        if not is_out_of_memory(e):
            raise
        where = "" if dist.device.type == "cuda" else " on the CPU"
        raise TrainingError(_oom_advice(step, plan.micro, plan.accum, plan.per_rank, args.train_batch_size, where)
                            ) from None
    loss_value = (distributed.all_reduce_sum(loss_sum / plan.accum) / dist.world_size).item()
    if not math.isfinite(loss_value):  # raised before this step's update: nothing diverged is ever saved
        raise TrainingError(f"loss is {loss_value} at step {step}: {_divergence_advice(run)}")
    lr = run.schedule(step)
    apply_lr(run.optimizer, lr)  # times each group's layer-decay scale
    run.scaler.unscale_(run.optimizer)
    if args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.model)
    dt = time.perf_counter() - t0
    run.step, run.train_time, run.images_seen = step, run.train_time + dt, run.images_seen + args.train_batch_size
    if dist.is_main:
        run.logger.log(step, "train", loss=loss_value, lr=lr, img_per_s=args.train_batch_size / dt,
                       elapsed_s=time.time() - run.t_start)
        run.bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                            img_s=f"{run.images_seen / run.train_time:.0f}", refresh=False)
        run.bar.update(1)
    return loss_value


def _divergence_advice(run: Run) -> str:
    """After a non-finite loss: what was kept, and the flags that could have caused it, with their values."""
    args = run.args
    kept = (f"nothing was saved for it (last.pt holds step {run.saved_step})" if run.saved_step is not None
            else "nothing was saved")
    clip = (f"a smaller --max_grad_norm (now {args.max_grad_norm})" if args.max_grad_norm > 0
            else "--max_grad_norm 1 (clipping is off)")
    fix = [f"a lower --learning_rate (now {args.learning_rate})", clip]
    if run.plan.precision == "fp16":
        fix.append("--precision bf16 or fp32 instead of fp16 (fp16 overflows)")
    return f"{kept}; try {', '.join(fix[:-1])} or {fix[-1]}"


def _checkpoint_state(run: Run) -> dict[str, Any]:
    """What --resume (and evaluate/predict) read back, and nothing else: the data order, crops and dropout are
    functions of (seed, step), and the schedule is rebuilt from the command line."""
    return {
        "step": run.step,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "config": run.plan.cfg.to_dict(),
        "model_type": run.args.model_type,
        "img_size": run.args.img_size,
        "num_classes": len(run.train_set.classes),
        "classes": list(run.train_set.classes),
        "train_size": len(run.train_set),  # the data order is a function of (seed, step) over these images
        "args": dict(vars(run.args)),
        "best_accuracy": run.best[0],
        "best_step": run.best[1],
        # --ema: the average, and which of the two evaluated better here (what evaluate/predict load).
        **({"ema": run.ema.state_dict(), "preferred_weights": run.preferred_weights} if run.ema is not None else {}),
    }


def evaluate_and_save(run: Run) -> None:
    """Evaluate the weights of step `run.step`; log; write last.pt (and best.pt when it improved); plot."""
    plan, args, dist, step = run.plan, run.args, run.plan.dist, run.step
    loss, acc = _evaluate(run, run.model, run.eval_set)
    if not math.isfinite(loss):  # never checkpoint weights that evaluate to NaN/inf
        raise TrainingError(f"evaluation loss is {loss} at step {step}: the weights diverged; "
                            f"{_divergence_advice(run)}")
    ema_eval = None
    if run.ema is not None:
        ema_eval = evaluate_model(run.ema.module, run.eval_set, args.img_size, args.eval_batch_size, plan.precision,
                                  dist.rank, dist.world_size)
    run.last_eval = (loss, acc)
    if not dist.is_main:
        return
    split = run.eval_split  # "val" when there is a validation split: best.pt is chosen on it
    run.logger.log(step, split, loss=loss, accuracy=acc, elapsed_s=time.time() - run.t_start)
    chosen = acc
    if ema_eval is not None:
        run.logger.log(step, f"{split}_ema", loss=ema_eval[0], accuracy=ema_eval[1],
                       elapsed_s=time.time() - run.t_start)
        run.preferred_weights = "ema" if ema_eval[1] > acc else "model"
        chosen = max(acc, ema_eval[1])  # best.pt is chosen on the better of the two
    run.logger.flush()  # metrics.csv holds every row up to `step` before a checkpoint says the run got there
    improved = chosen > run.best[0]
    if improved:
        run.best = (chosen, step)
    state = _checkpoint_state(run)
    save_checkpoint(state, plan.last_path)  # last.pt first: a kill between the two never leaves only best.pt
    run.saved_step = step
    if improved:
        save_checkpoint(state, plan.best_path)
    plot_curves(run.logger.csv_path, os.path.join(plan.run_dir, "curves.png"))
    ema_note = f"  EMA {100 * ema_eval[1]:.2f}%  loss {ema_eval[0]:.4f}" if ema_eval is not None else ""
    run.bar.write(f"step {step}: {split} accuracy {100 * acc:.2f}%  loss {loss:.4f}{ema_note}  (best "
                  f"{100 * run.best[0]:.2f}% at step {run.best[1]})")


def _evaluate(run: Run, module: torch.nn.Module, data: Split) -> tuple[float, float]:
    """(loss, accuracy) of `module` on `data`, every rank its shard; out of memory becomes advice."""
    args, plan = run.args, run.plan
    try:
        return evaluate_model(module, data, args.img_size, args.eval_batch_size, plan.precision, plan.dist.rank,
                              plan.dist.world_size)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise TrainingError(f"out of memory evaluating at step {run.step} with --eval_batch_size "
                            f"{args.eval_batch_size}; try --eval_batch_size {max(1, args.eval_batch_size // 2)}"
                            ) from None


def evaluate_test(run: Run) -> None:
    """When evaluations ran on a validation split: the test split, once, with the final weights (and the EMA's)."""
    if run.final_test is None:
        return
    run.test_eval = _evaluate(run, run.model, run.final_test)
    ema_eval = _evaluate(run, run.ema.module, run.final_test) if run.ema is not None else None
    if not run.plan.dist.is_main:
        return
    elapsed = time.time() - run.t_start
    run.logger.log(run.step, "test", loss=run.test_eval[0], accuracy=run.test_eval[1], elapsed_s=elapsed)
    if ema_eval is not None:
        run.logger.log(run.step, "test_ema", loss=ema_eval[0], accuracy=ema_eval[1], elapsed_s=elapsed)
    run.logger.flush()
    run.bar.write(f"step {run.step}: test accuracy {100 * run.test_eval[1]:.2f}%  loss {run.test_eval[0]:.4f} "
                  f"(the test split, once, with the final weights)")


def summarise(run: Run) -> None:
    """Close the logs and print the one-line summary (best and final accuracy, wall time, img/s, MFU on CUDA)."""
    run.bar.close()
    plan, dist = run.plan, run.plan.dist
    if not dist.is_main:
        return
    run.logger.close()  # curves.png is current: the last step (or a finished run's resume) always evaluates
    img_s = run.images_seen / run.train_time if run.train_time else float("nan")
    util = None
    if dist.device.type == "cuda":
        util = mfu(img_s, plan.cfg, run.args.img_size, len(run.train_set.classes),
                   torch.cuda.get_device_name(dist.device), plan.precision)
    wall = time.time() - run.t_start
    on = "val " if run.final_test is not None else ""
    test = f"; test accuracy {100 * run.test_eval[1]:.2f}%" if run.test_eval is not None else ""
    print(f"done: best {on}accuracy {100 * run.best[0]:.2f}% at step {run.best[1]}; final {on}accuracy "
          f"{100 * run.last_eval[1]:.2f}%{test}; wall time {wall // 3600:.0f}:{wall % 3600 // 60:02.0f}:"
          f"{wall % 60:02.0f}; {img_s:.1f} img/s" + (f"; MFU {100 * util:.1f}%" if util is not None else "")
          + f"; run folder {plan.run_dir}")


def train(args: argparse.Namespace) -> int:
    """Run one fine-tuning job from parsed, validated args; returns the exit code."""
    dist = distributed.setup(args.device)
    try:
        code = _train(args, dist)
        # Leave together: a rank that tears its process group down while rank 0 still writes the last checkpoint
        # can abort in gloo ("terminate called without an active exception").
        distributed.barrier()
        return code
    finally:
        distributed.cleanup()


def _train(args: argparse.Namespace, dist: distributed.DistInfo) -> int:
    plan = prepare(args, dist)
    run: Run | None = None
    try:
        run = build(plan)
        restore(run)
        run.model.train()
        for step in range(run.step + 1, args.num_steps + 1):
            train_step(run, step)
            if step % args.eval_every == 0 or step == args.num_steps:
                evaluate_and_save(run)
            _test_sigkill_hook(dist.rank, step)
        if math.isnan(run.last_eval[1]):  # resumed a finished run: evaluate once so the summary has numbers
            evaluate_and_save(run)  # the weights are those of its last step, even when --num_steps is now lower
        evaluate_test(run)
        summarise(run)
        return 0
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(plan, run)) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise TrainingError(_disk_full(plan, run, e)) from None
    finally:
        if plan.lock is not None:
            plan.lock.release()


def _saved_step(plan: RunPlan, run: Run | None) -> int | None:
    if run is not None:
        return run.saved_step
    return plan.resume["step"] if plan.resume is not None else None


def _interrupted(plan: RunPlan, run: Run | None) -> str:
    """Ctrl-C: where the run got to and how to continue it."""
    name, saved = plan.args.name, _saved_step(plan, run)
    if run is None or run.step == 0 and saved is None:
        return f"interrupted before the first step; start the run again (--resume auto --name {name})"
    if saved is None:
        return (f"interrupted at step {run.step}, before the first checkpoint (--eval_every {plan.args.eval_every}); "
                f"start it again with --resume auto --name {name}")
    return f"interrupted at step {run.step}; continue with --resume --name {name} (from last.pt's step {saved})"


def _disk_full(plan: RunPlan, run: Run | None, e: OSError) -> str:
    """ENOSPC while writing: which filesystem, and that the previous checkpoint is whole (writes are atomic)."""
    saved = _saved_step(plan, run)
    kept = (f"the previous checkpoint {plan.last_path} (step {saved}) is intact" if saved is not None
            else "no checkpoint was written yet")
    return (f"no space left on device {describe_device(e.filename or plan.run_dir)} writing "
            f"{e.filename or 'into ' + plan.run_dir}; {kept}: free space there (or use another --output_dir) and "
            f"continue with --resume --name {plan.args.name}")


def _test_sigkill_hook(rank: int, step: int) -> None:
    # For the elastic-restart test: VITCORE_TEST_SIGKILL="RANK:STEP:MARKER" makes that rank SIGKILL itself after
    # STEP, once (the marker file records that it did, so the restarted job runs through).
    spec = os.environ.get("VITCORE_TEST_SIGKILL")
    if not spec:
        return
    who, at, marker = spec.split(":", 2)
    if int(who) == rank and int(at) == step and not os.path.exists(marker):
        with atomic_write(marker, "w") as f:
            f.write(f"rank {rank} killed itself after step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m train.finetune`; returns the exit code."""
    return run_cli("train.finetune", lambda: train(parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
