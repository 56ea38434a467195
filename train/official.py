"""Official checkpoints in the CLIs: `--checkpoint` of predict / evaluate / attention_map accepts a run's .pt, an
official .npz or a named source (vitcore.sources), and the model is built from what the file holds; a fine-tuning
run's `--pretrained_dir` is a named source, a file, a folder or "none", and names the model when --model_type
is left out."""

from __future__ import annotations

import os
from typing import Any

import torch

import vitcore
from vitcore import labels, sources
from vitcore.checkpoint import read_architecture
from vitcore.config import canonical_name, find_name
from vitcore.npz import is_npz

from .args import UsageError
from .checkpointing import restore_for_inference

__all__ = ["CHECKPOINT_HELP", "DEFAULT_MODEL", "from_scratch", "is_official", "restore", "run_model_type",
           "run_pretrained_path"]

DEFAULT_MODEL = "ViT-B_16"
CHECKPOINT_HELP = ("a run's best.pt or last.pt, an official .npz, or a named source (i21k:ViT-B_16, "
                   "i21k+i1k:ViT-B_16, sam:ViT-B_16, augreg:B_16, augreg:<file name>)")


def is_official(checkpoint: str) -> bool:
    """A named source, a file holding an npz archive (by its contents, whatever its name), or a folder of them."""
    return sources.is_named_source(checkpoint) or is_npz(checkpoint) or os.path.isdir(checkpoint)


def _canonical(model_type: str) -> str:
    try:
        return canonical_name(model_type)
    except KeyError as e:
        raise UsageError(f"--model_type: {e.args[0]}") from None


def _locate(spec: str, model_type: str | None, folder: str, progress: bool) -> tuple[sources.Pretrained, str]:
    try:
        where = sources.locate(spec, folder, model_type=model_type, progress=progress)
    except sources.SourceError as e:
        raise UsageError(str(e)) from None
    return where, sources.fetch(where, progress)


def restore(checkpoint: str, device: str | None, backend: str = "auto", model_type: str | None = None,
            img_size: int | None = None, progress: bool = True, folder: str = "checkpoint"
            ) -> tuple[dict[str, Any], torch.nn.Module, int, list[str]]:
    """(checkpoint info, model in eval mode on `device`, image size, class names) for any `--checkpoint`.

    A run's .pt: its model, resolution and class names (`model_type` and `img_size`, when given, must match it).
    An official file or source (downloaded into `folder` when missing): the architecture and head come from the
    arrays (`model_type` is checked against them, never needed), the resolution from the position embeddings
    unless `img_size` asks for another (the grid is then resized as for fine-tuning), 1000-class heads get the
    ImageNet-1k names and other heads their indices.
    """
    if not is_official(checkpoint):
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist; pass {CHECKPOINT_HELP}")
        ck, model, size, classes = restore_for_inference(checkpoint, device, backend=backend)
        run_model = ck.get("model_type")
        if model_type is not None and run_model is not None and _canonical(model_type) != _canonical(run_model):
            raise UsageError(f"--model_type {model_type}: {checkpoint} is a run of {run_model}")
        if img_size is not None and img_size != size:
            raise UsageError(f"--img_size {img_size}: {checkpoint} is a run at {size} px and is evaluated at that "
                             "resolution (its position embeddings were trained there)")
        return ck, model, size, classes

    where, path = _locate(checkpoint, model_type, folder, progress)
    arch = read_architecture(path)
    named = where.model_type
    if model_type is not None:
        if named is not None and _canonical(model_type) != named:
            raise UsageError(f"--model_type {model_type} contradicts --checkpoint {checkpoint}, a {named} checkpoint")
        named = _canonical(model_type)
    found = find_name(arch.config)
    if named is not None and found != named:
        raise UsageError(f"{path} is not a {named} checkpoint: its arrays are those of "
                         f"{found or 'a ViT outside the zoo'} ({arch.config.hidden_size} wide, "
                         f"depth {arch.config.num_layers}, patch {arch.config.patch_size})")
    size = img_size or arch.img_size
    stride = arch.config.input_stride
    if size < 1 or size % stride:
        raise UsageError(f"--img_size {size} is not a positive multiple of the model's input stride {stride}")
    with torch.device("meta"):  # load_pretrained materialises it: no time spent initialising weights
        model = vitcore.VisionTransformer(arch.config, img_size=size, num_classes=arch.num_classes, backend=backend)
    vitcore.load_pretrained(model, path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = {"model_type": named or found, "img_size": size, "num_classes": arch.num_classes, "path": path,
            "source": checkpoint, "trained_img_size": arch.img_size}
    return info, model.eval().to(dev), size, labels.class_names(arch.num_classes)


def from_scratch(pretrained_dir: str | None) -> bool:
    """`--pretrained_dir none`: no pretrained weights."""
    return pretrained_dir is not None and pretrained_dir.lower() == "none"


def run_model_type(pretrained_dir: str | None, model_type: str | None) -> str:
    """The model a fine-tuning run trains, decided at parse time without any download: `model_type` when given
    (it must agree with a named source), else the model the source names, else the zoo entry whose architecture
    an official file's arrays hold (a file that does not exist is then an error already), else ViT-B_16."""
    if pretrained_dir is None or from_scratch(pretrained_dir):
        return model_type or DEFAULT_MODEL
    if sources.is_named_source(pretrained_dir):
        try:
            named = sources.spec_model_type(pretrained_dir)
        except sources.SourceError as e:
            raise UsageError(f"--pretrained_dir {e}") from None
        if model_type is not None and _canonical(model_type) != named:
            raise UsageError(f"--model_type {model_type} contradicts --pretrained_dir {pretrained_dir}, a {named} "
                             "checkpoint: leave --model_type out, or name a checkpoint of that model")
        return model_type or named
    if model_type is not None:
        return model_type  # the run checks that the file exists (run_pretrained_path) and fits (load_pretrained)
    try:
        where = sources.locate(pretrained_dir, model_type=DEFAULT_MODEL)  # FileNotFoundError if absent
    except sources.SourceError as e:
        raise UsageError(f"--pretrained_dir {e}") from None
    found = find_name(read_architecture(where.path).config)
    if found is None:
        raise UsageError(f"--pretrained_dir {where.path} holds no model of the zoo: pass --model_type")
    return found


def run_pretrained_path(pretrained_dir: str | None, model_type: str, progress: bool = True,
                        fetch: bool = True) -> str | None:
    """The checkpoint a run starts from (None: from scratch). With `fetch`, a named source or the default location
    is downloaded when missing and a file or folder must exist; without it, where the file is or will be, unchecked
    (for the ranks that wait for the first one's download, and a resumed run's report)."""
    if from_scratch(pretrained_dir):
        return None
    spec = pretrained_dir or sources.default_spec(model_type)
    try:
        where = sources.locate(spec, model_type=model_type, progress=progress, strict=fetch)
    except sources.SourceError as e:
        raise UsageError(f"--pretrained_dir {e}") from None
    return sources.fetch(where, progress) if fetch else where.path
