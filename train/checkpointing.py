"""Training checkpoints: written atomically, read with torch.load(weights_only=True) so they cannot run code."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "model_from_checkpoint"]


def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: `path` is always a whole checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


def rng_state() -> dict[str, Any]:
    """The RNG states as tensors (weights_only-loadable): torch CPU and every CUDA device."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def model_from_checkpoint(ck: dict[str, Any], backend: str = "auto") -> tuple[torch.nn.Module, int]:
    """Rebuild the VisionTransformer a training checkpoint describes and load its weights: (model, img_size)."""
    import vitcore

    for key in ("config", "model", "img_size", "num_classes"):
        if key not in ck:
            from .args import UsageError

            raise UsageError(f"not a train.finetune checkpoint: no {key!r} entry")
    cfg = vitcore.ViTConfig.from_dict(ck["config"])
    model = vitcore.VisionTransformer(cfg, img_size=ck["img_size"], num_classes=ck["num_classes"], backend=backend)
    model.load_state_dict(ck["model"])
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
