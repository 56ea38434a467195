"""Training checkpoints: written atomically, read with torch.load(weights_only=True) so they cannot run code."""

from __future__ import annotations

import os
from typing import Any

import torch

from vitcore.fileio import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "model_from_checkpoint", "restore_for_inference"]


def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """torch.save through vitcore.fileio.atomic_write: `path` is always a whole checkpoint."""
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with the weights-only unpickler (tensors, dicts, lists, numbers, strings)."""
    import pickle

    from .args import UsageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        # Includes a pickle asking for a global outside the weights-only allow-list: refused, not run.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path} is not a loadable training checkpoint: {first}") from None


def model_from_checkpoint(ck: dict[str, Any], backend: str = "auto", weights: str | None = None
                          ) -> tuple[torch.nn.Module, int]:
    """Rebuild the VisionTransformer a training checkpoint describes and load its weights: (model, img_size).

    `weights`: "model" (the trained weights) or "ema" (an --ema run's average); default: the checkpoint's
    `preferred_weights`, the one that evaluated better when it was saved ("model" for a run without --ema).
    """
    import vitcore

    for key in ("config", "model", "img_size", "num_classes"):
        if key not in ck:
            from .args import UsageError

            raise UsageError(f"not a train.finetune checkpoint: no {key!r} entry")
    cfg = vitcore.ViTConfig.from_dict(ck["config"])
    model = vitcore.VisionTransformer(cfg, img_size=ck["img_size"], num_classes=ck["num_classes"], backend=backend)
    weights = weights or ck.get("preferred_weights", "model")
    if weights not in ("model", "ema") or weights not in ck:
        from .args import UsageError

        raise UsageError(f"checkpoint has no {weights!r} weights (it holds: "
                         f"{', '.join(k for k in ('model', 'ema') if k in ck)})")
    model.load_state_dict(ck[weights])
    return model.eval(), ck["img_size"]


def restore_for_inference(
    path: str, device: str | None, backend: str = "auto"
) -> tuple[dict[str, Any], torch.nn.Module, int, list[str]]:
    """What the evaluate/predict/attention_map CLIs share: (checkpoint, model on `device`, img_size, class names).

    `device` None means CUDA when available, else the CPU.
    """
    from .data import CIFAR10_CLASSES

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ck = load_checkpoint(path)
    model, img_size = model_from_checkpoint(ck, backend=backend)
    n = ck["num_classes"]
    classes = ck.get("classes") or (CIFAR10_CLASSES if n == 10 else [str(i) for i in range(n)])
    return ck, model.to(dev), img_size, list(classes)
