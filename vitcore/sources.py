"""Official checkpoints by name: `vitcore.pretrained("i21k+i1k:ViT-B_16")` -> a local path, downloaded when missing.

Specs (the model part is a zoo name or alias, vitcore.CONFIGS):

    i21k:ViT-B_16                  imagenet21k/ViT-B_16.npz (ImageNet-21k pre-training, 224 px, pre_logits)
    i21k+i1k:ViT-B_16              imagenet21k+imagenet2012/ViT-B_16.npz (fine-tuned on ImageNet-1k, 384 px)
    i21k+i1k:ViT-L_16-224          the same at 224 px (the published "-224" files)
    sam:ViT-B_16                   sam/ViT-B_16.npz (ImageNet-1k with sharpness-aware minimisation)
    augreg:Ti_16                   the AugReg i21k pre-training of Ti_16 with the best final upstream validation
                                   accuracy in augreg/index.csv (the rule of vit_jax/train.py)
    augreg:<filename>              augreg/<filename>.npz, pre-training or fine-tuned ("...--imagenet2012-steps_20k-
                                   lr_0.01-res_384": fine-tuned at 384 px)
    PATH                           a local .npz file, or a folder holding <model_type>.npz: never downloaded

Downloads go below `folder` (default `checkpoint/`): `i21k:` files at `<folder>/<name>.npz` (the layout the
jeonsworld/ViT-pytorch instructions use, and vitcore's default location), the others at
`<folder>/<bucket folder>/<file>`, e.g. `checkpoint/augreg/index.csv` (cached: delete it to fetch it again).
The base URL https://storage.googleapis.com/vit_models is replaced by the environment variable
VITCORE_MODELS_URL (a mirror, or file:///path for an air-gapped copy of the bucket).
"""

from __future__ import annotations

import csv
import math
import os
import re
import stat
from dataclasses import dataclass

from .config import ALIASES, CONFIGS, augreg_name, canonical_name
from .download import DownloadError, check_replaceable, download

__all__ = [
    "DEFAULT_BASE_URL",
    "ENV_VAR",
    "SOURCES",
    "Pretrained",
    "SourceError",
    "augreg_best",
    "base_url",
    "default_spec",
    "fetch",
    "is_named_source",
    "locate",
    "pretrained",
    "read_augreg_index",
    "spec_model_type",
]

DEFAULT_BASE_URL = "https://storage.googleapis.com/vit_models"
ENV_VAR = "VITCORE_MODELS_URL"
# spec prefix -> folder of the official bucket
SOURCES = {
    "i21k": "imagenet21k",
    "i21k+i1k": "imagenet21k+imagenet2012",
    "sam": "sam",
    "augreg": "augreg",
}
_INDEX_COLUMNS = ("filename", "ds", "final_val")  # what the selection rule reads (index.csv has 21 columns)
# AugReg's own names are plain file names (vit_jax keeps them free of characters URIs would escape): checking
# that keeps a spec from reaching outside the checkpoint folder (`augreg:../../x`).
_FILENAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9_.+-]*")
# The zoo entries AugReg published (the official AUGREG_CONFIGS): every alias without a '-' in it.
_AUGREG_MODELS = {alias: name for alias, name in ALIASES.items() if "-" not in alias}
_SPECS_HELP = "named sources: i21k:NAME, i21k+i1k:NAME[-224], sam:NAME, augreg:NAME or augreg:FILENAME"


class SourceError(ValueError):
    """A spec that names no checkpoint (unknown source, model or file name); the message says what would."""


@dataclass(frozen=True)
class Pretrained:
    """Where a spec's checkpoint lives: `path` on this machine and, for the named sources, the `url` it comes from."""

    spec: str
    path: str
    url: str | None = None  # None: a file the user named, never downloaded
    model_type: str | None = None  # the official zoo name, where the spec names the model
    img_size: int | None = None  # the resolution the weights were trained at, where the spec says it


def base_url() -> str:
    """The bucket's base URL: $VITCORE_MODELS_URL when set, else the official one."""
    return (os.environ.get(ENV_VAR) or DEFAULT_BASE_URL).rstrip("/")


def is_named_source(spec: str) -> bool:
    """Whether `spec` is `<source>:<name>` for one of SOURCES (anything else is a path)."""
    return spec.partition(":")[0] in SOURCES and ":" in spec


def default_spec(model_type: str) -> str:
    """The weights a run takes when it names none: the model's ImageNet-21k pre-training (`i21k:<name>`)."""
    return f"i21k:{model_type}"


def _zoo_name(spec: str, name: str) -> str:
    try:
        return canonical_name(name)
    except KeyError as e:
        raise SourceError(f"{spec}: {e.args[0]}") from None


def read_augreg_index(folder: str = "checkpoint", progress: bool = True) -> list[dict[str, str]]:
    """The rows of augreg/index.csv (the standard csv module), fetched into `<folder>/augreg/` on first use."""
    path = os.path.join(folder, "augreg", "index.csv")
    if not os.path.isfile(path):
        download(f"{base_url()}/augreg/index.csv", path, progress=progress)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _INDEX_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise SourceError(f"{path} is not AugReg's index.csv (no column {', '.join(missing)}); delete it so "
                              "that it is fetched again")
        return list(reader)


def augreg_best(rows: list[dict[str, str]], model: str) -> dict[str, str]:
    """vit_jax/train.py's pick for an AugReg model name: among the rows whose filename's first '-'-part is `model`
    and whose `ds` is "i21k", the one with the highest `final_val` (rows without a number there are skipped)."""

    def final_val(row: dict[str, str]) -> float:
        try:
            value = float(row["final_val"])
        except (TypeError, ValueError):
            return math.nan
        return value

    candidates = [r for r in rows if (r["filename"] or "").split("-")[0] == model and r["ds"] == "i21k"
                  and math.isfinite(final_val(r))]
    if not candidates:
        known = sorted({(r["filename"] or "").split("-")[0] for r in rows if r["ds"] == "i21k"} - {""})
        raise SourceError(f"augreg:{model}: index.csv lists no i21k pre-training of {model}; it has: "
                          f"{', '.join(known)}")
    return max(candidates, key=final_val)  # the first of equal maxima, in file order


def _augreg_file(spec: str, name: str) -> tuple[str, int | None]:
    """(official model, resolution) of an AugReg file name: its first '-'-part is the model; a fine-tuned file
    ('<pre-training>--<dataset>-...-res_NNN') was trained at NNN px, a pre-training file at 224."""
    model = name.split("-")[0]
    if model not in _AUGREG_MODELS:
        raise SourceError(f"{spec}: an AugReg file name starts with its model ({', '.join(_AUGREG_MODELS)}), "
                          f"not {model!r}")
    res = re.search(r"-res_(\d+)$", name)
    return _AUGREG_MODELS[model], int(res.group(1)) if res else (None if "--" in name else 224)


def _parse(spec: str) -> tuple[str, str, str | None, int | None]:
    """(source, official model, file in the bucket folder, resolution) of a named source, without any I/O.

    The file is None for `augreg:<model>`, which index.csv decides.
    """
    source, _, name = spec.partition(":")
    if source == "augreg":
        name = name.removesuffix(".npz")
        if not _FILENAME.fullmatch(name):
            raise SourceError(f"{spec}: {name!r} is not an AugReg model or file name (letters, digits, _ . + -)")
        if "-" in name:  # vit_jax's test: a '-' makes it a file name, else it names a model
            model, img_size = _augreg_file(spec, name)
            return source, model, name + ".npz", img_size
        if name not in _AUGREG_MODELS:
            raise SourceError(f"{spec}: AugReg has no model {name!r}; its models: {', '.join(_AUGREG_MODELS)} "
                              "(AugReg names drop 'ViT-' and write '+' as '_')")
        return source, _AUGREG_MODELS[name], None, 224
    if source == "i21k+i1k":
        sized = re.fullmatch(r"(.+)-(\d+)", name)  # ViT-L_16-224: the model, fine-tuned at 224 px
        if name not in CONFIGS and sized and sized.group(1) in CONFIGS:
            model = _zoo_name(spec, sized.group(1))
            return source, model, f"{model}-{sized.group(2)}.npz", int(sized.group(2))
        model = _zoo_name(spec, name)
        return source, model, f"{model}.npz", None  # 384 px for most: the file's position embeddings say
    model = _zoo_name(spec, name)
    return source, model, f"{model}.npz", 224


def spec_model_type(spec: str) -> str | None:
    """The official model a named source is a checkpoint of (no I/O); None for a path."""
    return _parse(spec)[1] if is_named_source(spec) else None


def _local(spec: str, model_type: str | None, strict: bool) -> Pretrained:
    if not os.path.exists(spec):
        if not strict:
            return Pretrained(spec, spec)
        raise FileNotFoundError(f"{spec} does not exist (neither a checkpoint file nor a folder); {_SPECS_HELP}")
    if os.path.isdir(spec):  # vit_jax's --pretrained_dir: a folder holding <model>.npz
        if model_type is None:
            raise SourceError(f"{spec} is a folder: name the file, or pass the model type it holds")
        names = dict.fromkeys([model_type, _zoo_name(spec, model_type)])  # as given, then the official name
        candidates = [os.path.join(spec, f"{n}.npz") for n in names]
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:
            if not strict:
                return Pretrained(spec, candidates[0])
            raise FileNotFoundError(f"{' or '.join(candidates)} does not exist; put the checkpoint there, or name a "
                                    f"source to download it (e.g. {default_spec(model_type)})")
        spec = found
    if strict and not stat.S_ISREG(os.stat(spec).st_mode):
        raise SourceError(f"{spec} is not a regular file (a FIFO or device?); name the .npz checkpoint file itself")
    return Pretrained(spec, spec)


def locate(spec: str, folder: str = "checkpoint", *, model_type: str | None = None, progress: bool = True,
           strict: bool = True) -> Pretrained:
    """Resolve `spec` to its Pretrained (local path, URL, model, resolution) without fetching the checkpoint.

    `augreg:<model>` reads augreg/index.csv (fetched into `folder` the first time). `model_type` names the file
    in a folder spec. Raises SourceError for a spec that names nothing, FileNotFoundError for a missing path
    (with `strict=False` a path is returned as where the file would be, unchecked).
    """
    if not is_named_source(spec):
        return _local(spec, model_type, strict)
    source, model, file, img_size = _parse(spec)
    if file is None:  # augreg:<model>
        file = augreg_best(read_augreg_index(folder, progress), augreg_name(model))["filename"] + ".npz"
    bucket = SOURCES[source]
    local = os.path.join(folder, file) if source == "i21k" else os.path.join(folder, bucket, file)
    return Pretrained(spec, local, f"{base_url()}/{bucket}/{file}", model, img_size)


def fetch(where: Pretrained, progress: bool = True) -> str:
    """The checkpoint's local path, downloaded first when it comes from a named source and is not there yet."""
    if where.url is None or os.path.isfile(where.path):  # there already (a link to a file is used, not replaced)
        return where.path
    check_replaceable(where.path)  # a FIFO, device or link at the target is refused, never replaced
    try:
        return download(where.url, where.path, progress=progress)
    except DownloadError as e:
        raise DownloadError(f"{where.spec}: {e}") from None


def pretrained(spec: str, folder: str = "checkpoint", progress: bool = True, *,
               model_type: str | None = None) -> str:
    """The local path of the checkpoint `spec` names (see the module docstring), downloaded into `folder` with a
    progress bar when missing. A local path is returned as it is (after checking it exists and is a file)."""
    return fetch(locate(spec, folder, model_type=model_type, progress=progress), progress)
