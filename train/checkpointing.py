"""Training checkpoints: written atomically, read with torch.load(weights_only=True) so they cannot run code."""

from __future__ import annotations

import os
import re
import zipfile
from typing import Any

import torch

from vitcore.fileio import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "model_from_checkpoint", "restore_for_inference"]


def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """torch.save through vitcore.fileio.atomic_write: `path` is always a whole checkpoint.

    A failed write (a full disk) raises its OSError, not the RuntimeError torch.save turns it into.
    """
    with atomic_write(path, "wb") as f:
        out = _Writes(f)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is not None:
                raise OSError(out.error.errno, out.error.strerror, path) from None
            raise


class _Writes:
    """A file's write(), remembering the OSError it raised (torch.save's writer reports only 'unexpected pos')."""

    def __init__(self, f: Any) -> None:
        self._f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self._f.flush()


def load_checkpoint(path: str, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint with the weights-only unpickler (tensors, dicts, lists, numbers, strings).

    `mmap`: map the tensors instead of reading them (for a look at the small entries, such as "args").
    """
    import pickle

    from .args import UsageError
    from .safe_pickle import UnsafePickleError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if _is_npz(path):
        raise UsageError(f"{path} is an official .npz (pre-trained weights), not a train.finetune checkpoint: "
                         f"fine-tune from it with --pretrained_dir {path}, or give it to train.evaluate/predict")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused:  # the weights-only unpickler stopped before calling it: nothing ran
            raise UnsafePickleError(f"{path} tries to run code when loaded: its pickle calls {refused.group(1)}, "
                                    "which a checkpoint never needs; refused, nothing was run (use a checkpoint "
                                    "train.finetune wrote)") from None
        raise UsageError(f"{path} is not a loadable training checkpoint: {_without_advice(e)}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise UsageError(f"{path} is not a loadable training checkpoint (truncated or not a torch.save file?): "
                         f"{_without_advice(e)}") from None
    if not isinstance(ck, dict):
        raise UsageError(f"{path} holds a {type(ck).__name__}, not a train.finetune checkpoint (a dict with "
                         "'model', 'config', 'args'...)")
    return ck


def _is_npz(path: str) -> bool:
    # An official checkpoint: a zip of .npy members (a torch.save file is a zip too, holding <name>/data.pkl).
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def _without_advice(e: BaseException) -> str:
    """torch's error text minus its advice (it suggests weights_only=False: loading that can run code)."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(str(e).split()))
    kept = [s for s in sentences if not re.search(r"weights_only|trusted source|arbitrary code|https?://|"
                                                  r"file an issue|documentation", s, re.IGNORECASE)]
    return " ".join(kept) or type(e).__name__


def model_from_checkpoint(ck: dict[str, Any], backend: str = "auto", weights: str | None = None,
                          source: str = "checkpoint") -> tuple[torch.nn.Module, int]:
    """Rebuild the VisionTransformer a training checkpoint describes and load its weights: (model, img_size).

    `weights`: "model" (the trained weights) or "ema" (an --ema run's average); default: the checkpoint's
    `preferred_weights`, the one that evaluated better when it was saved ("model" for a run without --ema).
    """
    import vitcore

    from .args import UsageError

    for key in ("config", "model", "img_size", "num_classes"):
        if key not in ck:
            raise UsageError(f"{source}: not a train.finetune checkpoint: no {key!r} entry")
    # A tampered file may hold anything in these entries: any failure to build from them is that file's fault.
    try:
        cfg = vitcore.ViTConfig.from_dict(ck["config"])
        model = vitcore.VisionTransformer(cfg, img_size=ck["img_size"], num_classes=ck["num_classes"],
                                          backend=backend)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError, ZeroDivisionError) as e:
        raise UsageError(f"{source}: its config/img_size/num_classes do not describe a model ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]})") from None
    weights = weights or ck.get("preferred_weights", "model")
    if weights not in ("model", "ema") or weights not in ck:
        raise UsageError(f"checkpoint has no {weights!r} weights (it holds: "
                         f"{', '.join(k for k in ('model', 'ema') if k in ck)})")
    try:
        model.load_state_dict(ck[weights])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UsageError(f"{source}: its {weights!r} weights do not fit the model its config describes: "
                         f"{' '.join(str(e).split())[:300]}") from None
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
    model, img_size = model_from_checkpoint(ck, backend=backend, source=path)
    n = ck["num_classes"]
    classes = ck.get("classes") or (CIFAR10_CLASSES if n == 10 else [str(i) for i in range(n)])
    return ck, model.to(dev), img_size, list(classes)
