"""`python -m train.finetune`: fine-tune an official ViT checkpoint on CIFAR-10/100 (or an image folder).

The official recipe: SGD momentum 0.9, linear warmup then cosine/linear decay (steps from 1), global-norm
clipping, gradient accumulation, cross-entropy, native AMP. One process or many through torchrun (DDP).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

import vitcore

from . import distributed
from .args import UsageError, parse_args
from .checkpointing import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .cli import TrainingError, autocast_dtype, one_line, run_cli
from .data import ImageSet, StepSampler, augment_batch, crop_params, load_split
from .download import CIFAR, ensure_checkpoint, ensure_cifar
from .evaluate import evaluate_model
from .flops import mfu
from .metrics import MetricsLogger, plot_curves, write_args_json
from .schedule import WarmupDecaySchedule

__all__ = ["main", "train"]


def _oom_advice(step: int, micro: int, accum: int, per_rank: int, global_batch: int) -> str:
    """What to do after running out of memory: the next accumulation count that divides the per-process batch
    (doubling may not: 12 images per process with 4 micro-batches cannot take 8)."""
    head = f"out of memory at step {step} with {micro} images per micro-batch per process; "
    more = next((a for a in range(accum + 1, per_rank + 1) if per_rank % a == 0), None)
    if more is None:
        return head + "already one image per micro-batch: try a smaller --img_size or --model_type, or more GPUs"
    return head + f"try --gradient_accumulation_steps {more} (the effective batch stays {global_batch})"


def _resolve_precision(args: argparse.Namespace, device: torch.device) -> str:
    if args.precision is not None:
        return args.precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"  # CPU default: exact and deterministic


def _step_seed(seed: int, rank: int, step: int) -> int:
    # Dropout randomness as a function of (seed, rank, step): resuming needs no generator history.
    return (seed * 1_000_003 + rank * 999_983 + step * 7_919 + 17) % (2**63 - 1)


_SCHEDULE_FLAGS = ("learning_rate", "num_steps", "warmup_steps", "decay_type", "weight_decay", "max_grad_norm")


def _changed_schedule_flags(saved: dict[str, Any], args: argparse.Namespace) -> str:
    """'--flag old -> new' for each optimisation flag that differs from the checkpoint's run ('' if none)."""
    return ", ".join(f"--{k} {saved[k]} -> {getattr(args, k)}" for k in _SCHEDULE_FLAGS
                     if k in saved and saved[k] != getattr(args, k))


def _pretrained_path(args: argparse.Namespace) -> str | None:
    if args.pretrained_dir is not None and args.pretrained_dir.lower() == "none":
        return None
    path = args.pretrained_dir or os.path.join("checkpoint", f"{args.model_type}.npz")
    # The flag's name says "dir" (and vit_jax's --pretrained_dir is a folder): a folder holds <model_type>.npz.
    if os.path.isdir(path):
        path = os.path.join(path, f"{args.model_type}.npz")
    return path


def _load_data(args: argparse.Namespace, dist: distributed.DistInfo) -> tuple[ImageSet, ImageSet]:
    # The first process of each node downloads (nodes need not share a filesystem; where they do, the temp file +
    # rename keeps concurrent downloads whole); the others wait, then everyone reads the files (each split once).
    if dist.local_rank == 0 and args.dataset in CIFAR:
        ensure_cifar(args.dataset, args.data_dir, progress=dist.is_main and not args.no_progress)
    distributed.barrier()
    train_set = load_split(args.dataset, args.data_dir, True, args.img_size, download=False)
    test_set = load_split(args.dataset, args.data_dir, False, args.img_size, classes=train_set.classes,
                          download=False)
    return train_set.to(dist.device), test_set.to(dist.device)


def _build_model(args: argparse.Namespace, cfg: vitcore.ViTConfig, num_classes: int,
                 dist: distributed.DistInfo, load: bool = True) -> tuple[torch.nn.Module, str | None]:
    torch.manual_seed(args.seed)  # the same initial head (and scratch weights) on every rank
    model = vitcore.VisionTransformer(cfg, img_size=args.img_size, num_classes=num_classes, backend=args.backend)
    path = _pretrained_path(args)
    if path is not None and load:
        if dist.local_rank == 0:  # one download per node, as for the data
            ensure_checkpoint(args.model_type, path, progress=dist.is_main and not args.no_progress)
        distributed.barrier()
        try:
            report = vitcore.load_pretrained(model, path)
        except vitcore.CheckpointError as e:
            raise UsageError(f"{path} does not fit --model_type {args.model_type} (a checkpoint of another model "
                             f"type?): {one_line(e, limit=300)}") from None
        if dist.is_main:
            print(f"loaded {path}: {report}", file=sys.stderr)
    return model.to(dist.device), path


def _checkpoint_state(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      schedule: WarmupDecaySchedule, scaler: torch.amp.GradScaler, cfg: vitcore.ViTConfig,
                      args: argparse.Namespace, train_set: ImageSet, best: tuple[float, int]) -> dict[str, Any]:
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": scaler.state_dict(),
        # The sampler is a pure function of (seed, batch size, step): its position is all it needs.
        "sampler": {"seed": args.seed, "batch_size": args.train_batch_size, "position": step * args.train_batch_size},
        "rng": rng_state(),
        "config": cfg.to_dict(),
        "model_type": args.model_type,
        "img_size": args.img_size,
        "num_classes": len(train_set.classes),
        "classes": list(train_set.classes),
        "args": dict(vars(args)),
        "best_accuracy": best[0],
        "best_step": best[1],
    }


def train(args: argparse.Namespace) -> int:
    """Run one fine-tuning job from parsed, validated args; returns the exit code."""
    dist = distributed.setup(args.device)
    try:
        return _train(args, dist)
    finally:
        distributed.cleanup()


def _train(args: argparse.Namespace, dist: distributed.DistInfo) -> int:
    device, world, rank = dist.device, dist.world_size, dist.rank
    if args.num_workers and device.type == "cpu":
        torch.set_num_threads(args.num_workers)
    cfg = vitcore.CONFIGS[args.model_type]
    if args.dropout is not None:
        cfg = cfg.replace(dropout=args.dropout)
    precision = _resolve_precision(args, device)
    accum = args.gradient_accumulation_steps
    global_batch = args.train_batch_size
    if global_batch % (world * accum):
        raise UsageError(f"--train_batch_size {global_batch} must be divisible by world size x accumulation "
                         f"= {world} x {accum}")
    per_rank = global_batch // world
    micro = per_rank // accum
    run_dir = os.path.join(args.output_dir, args.name)
    last_path, best_path = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "best.pt")
    resume_ck = None
    if args.resume:
        if not os.path.isfile(last_path):
            raise UsageError(f"--resume: no checkpoint at {last_path}")
        resume_ck = load_checkpoint(last_path)
        if resume_ck.get("model_type") != args.model_type:
            raise UsageError(f"--resume: {last_path} is a {resume_ck.get('model_type')} run, not {args.model_type}")
        # The data order is a function of (seed, global batch): changing either would not continue the same run.
        sampler_state = resume_ck["sampler"]
        if (sampler_state["seed"], sampler_state["batch_size"]) != (args.seed, args.train_batch_size):
            raise UsageError(f"--resume: {last_path} was trained with --seed {sampler_state['seed']} "
                             f"--train_batch_size {sampler_state['batch_size']}; pass the same values")
        if resume_ck.get("img_size") != args.img_size:
            raise UsageError(f"--resume: {last_path} was trained at --img_size {resume_ck.get('img_size')}, "
                             f"not {args.img_size}; pass the same value")
        # The schedule is rebuilt from this command line (as the official code does): allowed, but never silent.
        changed = _changed_schedule_flags(resume_ck.get("args", {}), args)
        if changed and dist.is_main:
            print(f"note: --resume with a different schedule than {last_path} was trained with: {changed}",
                  file=sys.stderr)

    train_set, test_set = _load_data(args, dist)
    # A resumed run takes its weights from last.pt: no need to read (or download) the pretrained file.
    model, pretrained = _build_model(args, cfg, len(train_set.classes), dist, load=resume_ck is None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=0.9,
                                weight_decay=args.weight_decay)
    schedule = WarmupDecaySchedule(args.learning_rate, args.num_steps, args.warmup_steps, args.decay_type)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start_step, best = 0, (-1.0, 0)
    if resume_ck is not None:
        if list(resume_ck.get("classes", [])) != list(train_set.classes):
            raise UsageError(f"--resume: {last_path} was trained on other classes ({resume_ck.get('num_classes')}) "
                             f"than --dataset {args.dataset} has in {args.data_dir} ({len(train_set.classes)})")
        model.load_state_dict(resume_ck["model"])
        optimizer.load_state_dict(resume_ck["optimizer"])
        # A disabled scaler (fp32/bf16) saves {}: resuming such a run with fp16 starts a fresh scaler.
        if resume_ck["scaler"]:
            scaler.load_state_dict(resume_ck["scaler"])
        set_rng_state(resume_ck["rng"])
        start_step, best = resume_ck["step"], (resume_ck["best_accuracy"], resume_ck["best_step"])
        del resume_ck
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    logger = MetricsLogger(run_dir, enabled=dist.is_main, resume_step=start_step if args.resume else None)
    if dist.is_main:
        resolved = {**vars(args), "precision": precision, "pretrained_path": pretrained, "world_size": world,
                    "micro_batch_per_rank": micro, "device": str(device), "num_classes": len(train_set.classes)}
        write_args_json(resolved, os.path.join(run_dir, "args.json"))
        print(f"{args.model_type} {args.img_size}px on {args.dataset} ({len(train_set)} train / {len(test_set)} "
              f"test), {world} process(es) on {device}, batch {global_batch} = {world} x {accum} x {micro}, "
              f"{precision}, steps {start_step + 1}..{args.num_steps}", file=sys.stderr)

    sampler = StepSampler(len(train_set), global_batch, args.seed)
    amp_dtype = autocast_dtype(precision)
    flip = args.augment == "official"
    height, width = train_set.images.shape[-2:]
    bar = tqdm(total=args.num_steps, initial=start_step, disable=not dist.is_main or args.no_progress,
               dynamic_ncols=True, file=sys.stderr)
    t_start, train_time, images_seen = time.time(), 0.0, 0
    last_eval = (math.nan, math.nan)

    def do_eval(step: int) -> None:
        nonlocal best, last_eval
        try:
            loss, acc = evaluate_model(model, test_set, args.img_size, args.eval_batch_size, precision, rank, world)
        except torch.OutOfMemoryError:
            raise TrainingError(f"out of memory evaluating at step {step} with --eval_batch_size "
                                f"{args.eval_batch_size}; try --eval_batch_size {max(1, args.eval_batch_size // 2)}"
                                ) from None
        last_eval = (loss, acc)
        if not dist.is_main:
            return
        logger.log(step, "test", loss=loss, accuracy=acc, elapsed_s=time.time() - t_start)
        logger.flush()  # metrics.csv holds every row up to `step` before a checkpoint says the run got there
        improved = acc > best[0]
        if improved:
            best = (acc, step)
        state = _checkpoint_state(step, model, optimizer, schedule, scaler, cfg, args, train_set, best)
        if improved:
            save_checkpoint(state, best_path)
        save_checkpoint(state, last_path)
        plot_curves(logger.csv_path, os.path.join(run_dir, "curves.png"))
        bar.write(f"step {step}: test accuracy {100 * acc:.2f}%  loss {loss:.4f}  (best {100 * best[0]:.2f}% "
                  f"at step {best[1]})")

    model.train()
    for step in range(start_step + 1, args.num_steps + 1):
        t0 = time.perf_counter()
        idx = sampler.indices(step)  # (global_batch,) the same on every rank
        boxes, flips = crop_params(global_batch, height, width, args.seed, step, flip=flip)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's shard of the global batch
        idx, boxes, flips = idx[mine].to(device), boxes[mine], flips[mine]
        torch.manual_seed(_step_seed(args.seed, rank, step))
        loss_sum = torch.zeros((), device=device)
        try:
            for k in range(accum):
                part = slice(k * micro, (k + 1) * micro)
                x = augment_batch(train_set.images[idx[part]], boxes[part], flips[part], args.img_size)  # (m,3,S,S)
                y = train_set.labels[idx[part]]
                # Gradients are all-reduced only on the last micro-batch.
                sync = ddp.no_sync() if world > 1 and k < accum - 1 else contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=precision != "fp32"):
                        logits = ddp(x)
                    loss = F.cross_entropy(logits.float(), y)
                    scaler.scale(loss / accum).backward()
                loss_sum += loss.detach()
        except torch.OutOfMemoryError:
            raise TrainingError(_oom_advice(step, micro, accum, per_rank, global_batch)) from None
        step_loss = distributed.all_reduce_sum(loss_sum / accum) / world
        loss_value = step_loss.item()
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"loss is {loss_value} at step {step}; try a lower --learning_rate (now {args.learning_rate}), "
                f"--precision fp32 or bf16 instead of fp16, or a smaller --max_grad_norm")
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.unscale_(optimizer)
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        train_time += dt
        images_seen += global_batch
        if dist.is_main:
            logger.log(step, "train", loss=loss_value, lr=lr, img_per_s=global_batch / dt,
                       elapsed_s=time.time() - t_start)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{images_seen / train_time:.0f}",
                            refresh=False)
            bar.update(1)
        if step % args.eval_every == 0 or step == args.num_steps:
            do_eval(step)
    if start_step >= args.num_steps:  # resumed a finished run: evaluate once so the summary has numbers
        do_eval(start_step)  # the weights are those of step start_step, even when --num_steps is now lower
    bar.close()
    if dist.is_main:
        logger.close()  # curves.png is current: the last step (or a finished run's resume) always evaluates
        img_s = images_seen / train_time if train_time else float("nan")
        util = None
        if device.type == "cuda":
            util = mfu(img_s, cfg, args.img_size, len(train_set.classes), torch.cuda.get_device_name(device),
                       precision)
        wall = time.time() - t_start
        print(f"done: best accuracy {100 * best[0]:.2f}% at step {best[1]}; final accuracy "
              f"{100 * last_eval[1]:.2f}%; wall time {wall // 3600:.0f}:{wall % 3600 // 60:02.0f}:{wall % 60:02.0f}"
              f"; {img_s:.1f} img/s" + (f"; MFU {100 * util:.1f}%" if util is not None else "")
              + f"; run folder {run_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m train.finetune`; returns the exit code."""
    return run_cli("train.finetune", lambda: train(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
