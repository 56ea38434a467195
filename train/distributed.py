"""torchrun integration: ranks from the environment, NCCL on GPUs and gloo on CPU, sum-reductions."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "cleanup", "all_reduce_sum", "barrier", "broadcast_object"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and prints."""
        return self.rank == 0


def setup(device: str | None = None) -> DistInfo:
    """Read RANK/LOCAL_RANK/WORLD_SIZE (set by torchrun; absent = one process) and join the process group."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
        # One GPU per local process unless an explicit index was given.
        dev = torch.device("cuda", dev.index if dev.index is not None and world == 1 else local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        timeout = datetime.timedelta(minutes=30)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None:
            # torchrun's agent keeps one store across --max-restarts: without a prefix per attempt, a restarted group
            # reads the dead attempt's gloo/NCCL addresses and fails to connect.
            store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
            kwargs.update(store=dist.PrefixStore(f"vitcore/attempt_{restart}/", store), rank=rank, world_size=world)
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return DistInfo(rank, local_rank, world, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s (picklable) `obj` on every rank (itself in a single process): one decision for all ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
