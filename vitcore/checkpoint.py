"""Official checkpoints: the one table that maps official names to parameters, loading and export.

Every official array is described once, in `_table`, by its name, the parameter it fills and a
layout that says how its axes map to PyTorch's:

    copy       same shape: biases, LayerNorm scale/bias, `cls`
    dense      Dense kernel (in, out)              <-> nn.Linear weight (out, in)
    conv       Conv kernel HWIO                     <-> nn.Conv2d weight OIHW
    gn         GroupNorm (C,), or (1, 1, 1, C) in files written before flax 0.3.6 (flax#1721)
    qkv_kernel query/key/value kernel (D, heads, head_dim) <-> one third of the fused qkv weight
    qkv_bias   query/key/value bias (heads, head_dim)      <-> one third of the fused qkv bias
    out_kernel attention out kernel (heads, head_dim, D)   <-> nn.Linear weight (D, heads * head_dim)
    posemb     (1, N, D), resized to the model's grid when N differs (official algorithm)

Loading copies into the existing parameters in place (`copy_` from the checkpoint's arrays, one
array at a time), so it never holds a second copy of the model; a model built under
`torch.device("meta")` is materialised on the CPU first.
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import ViTConfig
from .errors import CheckpointError, NpzError
from .fileio import atomic_write
from .npz import load_npz, npz_index
from .posembed import resize_pos_embedding

__all__ = ["LoadReport", "Architecture", "load_pretrained", "save_npz", "official_names", "read_architecture"]

# Names of an encoder block's sub-modules. linen (today's vit_jax/models_vit.py) numbers
# sub-modules per type; pre-linen flax.nn numbered them across types in creation order, which is
# what the original imagenet21k files carry (flax.training.checkpoints.convert_pre_linen maps one
# to the other; timm's _load_weights picks (0, 0, 1) vs (1, 3, 2) the same way). Dense_0/Dense_1
# inside MlpBlock are the same in both.
_BLOCK_NAMES = {
    "linen": {
        "ln1": "LayerNorm_0",
        "attn": "MultiHeadDotProductAttention_0",
        "ln2": "LayerNorm_1",
        "mlp": "MlpBlock_0",
    },
    "pre-linen": {
        "ln1": "LayerNorm_0",
        "attn": "MultiHeadDotProductAttention_1",
        "ln2": "LayerNorm_2",
        "mlp": "MlpBlock_3",
    },
}
_PRE_LINEN_MARKERS = ("/MultiHeadDotProductAttention_1/", "/LayerNorm_2/", "/MlpBlock_3/")
_HEAD_KEYS = ("head/kernel", "head/bias")
_PRE_LOGITS_KEYS = ("pre_logits/kernel", "pre_logits/bias")


@dataclass(frozen=True)
class _Entry:
    key: str  # official name, '/'-joined
    param: str  # name in model.named_parameters()
    layout: str  # see the module docstring
    shape: tuple[int, ...]  # official shape for this model
    part: int | None = None  # q/k/v: which third of the fused parameter


@dataclass
class LoadReport:
    """What `load_pretrained` did with each official array (official names)."""

    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # key -> why / from which shape to which

    def __str__(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} arrays, resized {len(self.resized)}, "
            f"re-initialised {len(self.reinitialized)}, skipped {len(self.skipped)}"
        ]
        sections = (("resized", self.resized), ("re-initialised", self.reinitialized), ("skipped", self.skipped))
        for title, keys in sections:
            lines += [f"  {title}: {k}" + (f" ({self.notes[k]})" if k in self.notes else "") for k in keys]
        return "\n".join(lines)


def _official_shape(layout: str, shape: tuple[int, ...], heads: int) -> tuple[int, ...]:
    if layout == "dense":
        return (shape[1], shape[0])
    if layout == "conv":
        o, i, h, w = shape
        return (h, w, i, o)
    if layout == "qkv_kernel":  # a (3D, D) fused weight -> one (D, heads, head_dim) kernel
        return (shape[1], heads, shape[0] // 3 // heads)
    if layout == "qkv_bias":
        return (heads, shape[0] // 3 // heads)
    if layout == "out_kernel":
        return (heads, shape[1] // heads, shape[0])
    return tuple(shape)  # copy, gn, posemb


def _table(model: torch.nn.Module, style: str = "linen") -> list[_Entry]:
    """The mapping: every official array of `model`, in the official order of the module tree."""
    params = dict(model.named_parameters())
    heads = model.config.num_heads
    names = _BLOCK_NAMES[style]
    rows: list[_Entry] = []

    def add(key: str, param: str, layout: str, part: int | None = None) -> None:
        rows.append(_Entry(key, param, layout, _official_shape(layout, tuple(params[param].shape), heads), part))

    def group_norm(key: str, param: str) -> None:
        add(f"{key}/scale", f"{param}.weight", "gn")
        add(f"{key}/bias", f"{param}.bias", "gn")

    if model.resnet is not None:  # no prefix: the ResNet root lives directly in the top-level module
        add("conv_root/kernel", "resnet.conv_root.weight", "conv")
        group_norm("gn_root", "resnet.gn_root")
        for i, stage in enumerate(model.resnet.stages):
            for j, unit in enumerate(stage):
                key, param = f"block{i + 1}/unit{j + 1}", f"resnet.stages.{i}.{j}"
                convs = ("conv1", "conv2", "conv3") + (("conv_proj",) if unit.needs_projection else ())
                for conv in convs:
                    add(f"{key}/{conv}/kernel", f"{param}.{conv}.weight", "conv")
                    group_norm(f"{key}/{conv.replace('conv', 'gn')}", f"{param}.{conv.replace('conv', 'gn')}")
    add("embedding/kernel", "embedding.weight", "conv")
    add("embedding/bias", "embedding.bias", "copy")
    if model.cls_token is not None:
        add("cls", "cls_token", "copy")
    add("Transformer/posembed_input/pos_embedding", "pos_embedding", "posemb")
    for i in range(len(model.blocks)):
        key, param = f"Transformer/encoderblock_{i}", f"blocks.{i}"
        for ln, mod in (("ln1", "norm1"), ("ln2", "norm2")):
            add(f"{key}/{names[ln]}/scale", f"{param}.{mod}.weight", "copy")
            add(f"{key}/{names[ln]}/bias", f"{param}.{mod}.bias", "copy")
        attn = f"{key}/{names['attn']}"
        for part, qkv in enumerate(("query", "key", "value")):
            add(f"{attn}/{qkv}/kernel", f"{param}.attn.qkv.weight", "qkv_kernel", part)
            add(f"{attn}/{qkv}/bias", f"{param}.attn.qkv.bias", "qkv_bias", part)
        add(f"{attn}/out/kernel", f"{param}.attn.out.weight", "out_kernel")
        add(f"{attn}/out/bias", f"{param}.attn.out.bias", "copy")
        for d, fc in ((0, "fc1"), (1, "fc2")):
            add(f"{key}/{names['mlp']}/Dense_{d}/kernel", f"{param}.mlp.{fc}.weight", "dense")
            add(f"{key}/{names['mlp']}/Dense_{d}/bias", f"{param}.mlp.{fc}.bias", "copy")
    add("Transformer/encoder_norm/scale", "encoder_norm.weight", "copy")
    add("Transformer/encoder_norm/bias", "encoder_norm.bias", "copy")
    if model.pre_logits is not None:
        add("pre_logits/kernel", "pre_logits.weight", "dense")
        add("pre_logits/bias", "pre_logits.bias", "copy")
    add("head/kernel", "head.weight", "dense")
    add("head/bias", "head.bias", "copy")
    covered = {row.param for row in rows}
    assert covered == set(params), f"mapping table misses parameters: {sorted(set(params) - covered)}"
    return rows


def official_names(model: torch.nn.Module) -> list[str]:
    """The official (linen) names of the arrays `save_npz` writes for `model`, in order."""
    return [row.key for row in _table(model)]


def _target(param: torch.Tensor, row: _Entry) -> torch.Tensor:
    """The part of `param` that `row` fills (a view)."""
    if row.part is None:
        return param
    n = param.shape[0] // 3
    return param[row.part * n : (row.part + 1) * n]


def _to_torch(array: torch.Tensor, row: _Entry) -> torch.Tensor:
    """A view of the official `array` in the layout of `_target(param, row)` (no copy)."""
    if row.layout == "dense":
        return array.T
    if row.layout == "conv":
        return array.permute(3, 2, 0, 1)  # HWIO -> OIHW
    if row.layout == "gn":
        return array.reshape(-1)
    if row.layout == "qkv_kernel":
        return array.reshape(array.shape[0], -1).T  # (D, heads, head_dim) -> (heads*head_dim, D)
    if row.layout == "qkv_bias":
        return array.reshape(-1)
    if row.layout == "out_kernel":
        return array.reshape(-1, array.shape[-1]).T  # (heads, head_dim, D) -> (D, heads*head_dim)
    return array


def _to_official(tensor: torch.Tensor, row: _Entry) -> torch.Tensor:
    """The inverse of `_to_torch`: `_target(param, row)` in the official layout and shape."""
    if row.layout in ("dense", "qkv_kernel", "out_kernel"):
        return tensor.T.reshape(row.shape)
    if row.layout == "conv":
        return tensor.permute(2, 3, 1, 0)  # OIHW -> HWIO
    return tensor.reshape(row.shape)


def _npz_index(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the arrays in an npz, from the .npy headers only (no data is read).

    The C++ reader's header pass, so it checks what `load_npz` checks and refuses object arrays
    (pickles) with NpzError.
    """
    return {name: shape for name, (shape, _) in npz_index(path).items()}


def _style(keys: list[str]) -> str:
    return "pre-linen" if any(m in k for k in keys for m in _PRE_LINEN_MARKERS) else "linen"


@dataclass(frozen=True)
class Architecture:
    """What an official checkpoint's arrays say about its model (`read_architecture`)."""

    config: ViTConfig  # dropout 0 (a file does not record it), gelu "tanh" and eps 1e-6 (every official model)
    img_size: int  # the resolution its position embeddings were trained at
    num_classes: int  # the head's outputs


def _without_optimizer_prefix(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(prefix, shapes by official name): some flax checkpoints store the parameters under the optimizer's target."""
    prefix = "opt/target/" if shapes and all(k.startswith("opt/target/") for k in shapes) else ""
    return prefix, {k[len(prefix) :]: v for k, v in shapes.items()}


def read_architecture(path_or_arrays: str | os.PathLike | Mapping[str, object]) -> Architecture:
    """The architecture, resolution and class count of an official checkpoint, from its array shapes alone.

    Reads only the npy headers of a file. The ViT part comes from the embedding, attention and MLP kernels and the
    number of encoder blocks; a ResNet root from `conv_root` (width) and its `block{i}/unit{j}` arrays (units per
    stage); the resolution from the position-embedding grid times the input stride. Raises CheckpointError when
    the arrays are not those of an official ViT.
    """
    if isinstance(path_or_arrays, Mapping):
        what, shapes = "the arrays", {k: tuple(np.shape(v)) for k, v in path_or_arrays.items()}
    else:
        what, shapes = os.fspath(path_or_arrays), _npz_index(path_or_arrays)
    _, shapes = _without_optimizer_prefix(shapes)
    names = _BLOCK_NAMES[_style(list(shapes))]
    block0 = "Transformer/encoderblock_0"
    needed = ("embedding/kernel", "Transformer/posembed_input/pos_embedding", "head/kernel",
              f"{block0}/{names['attn']}/query/kernel", f"{block0}/{names['mlp']}/Dense_0/kernel")
    if missing := [k for k in needed if k not in shapes]:
        raise CheckpointError(f"{what} is not an official ViT checkpoint: no {', '.join(missing)}")
    patch, _, _, dim = shapes["embedding/kernel"]
    _, heads, _ = shapes[needed[3]]
    layers = 0
    while f"Transformer/encoderblock_{layers}/{names['ln1']}/scale" in shapes:
        layers += 1
    resnet_layers, width = None, 1.0
    if "conv_root/kernel" in shapes:
        width = shapes["conv_root/kernel"][-1] / 64
        stages = []
        while f"block{len(stages) + 1}/unit1/conv1/kernel" in shapes:
            units = 1
            while f"block{len(stages) + 1}/unit{units + 1}/conv1/kernel" in shapes:
                units += 1
            stages.append(units)
        resnet_layers = tuple(stages)
    rep = shapes["pre_logits/kernel"][-1] if "pre_logits/kernel" in shapes else None
    try:
        config = ViTConfig(patch_size=patch, hidden_size=dim, mlp_dim=shapes[needed[4]][-1], num_heads=heads,
                           num_layers=layers, representation_size=rep, classifier="token" if "cls" in shapes else "gap",
                           resnet_layers=resnet_layers, resnet_width=width)
    except ValueError as e:
        raise CheckpointError(f"{what}: its arrays describe no valid ViT ({e})") from None
    posemb = shapes[needed[1]]
    grid = posemb[1] - (1 if config.classifier == "token" else 0) if len(posemb) == 3 else 0
    side = math.isqrt(max(grid, 0))
    if side == 0 or side * side != grid:
        raise CheckpointError(f"{what}: position embedding {_fmt(posemb)} holds no square grid of tokens")
    return Architecture(config, side * config.input_stride, shapes["head/kernel"][-1])


def _fmt(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def _plan(
    model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[list[_Entry], list[_Entry], LoadReport]:
    """Check every array against the table; return the rows to copy, the rows to zero and the report.

    Raises CheckpointError listing every problem.
    """
    rows = _table(model, _style(list(shapes)))
    report = LoadReport()
    problems: list[str] = []
    to_load: list[_Entry] = []
    known = {row.key for row in rows}
    for row in rows:
        if row.key not in shapes:
            problems.append(f"missing key {row.key}: the model expects shape {_fmt(row.shape)}")
            continue
        got = shapes[row.key]
        if got == row.shape or (row.layout == "gn" and got == (1, 1, 1) + row.shape):
            to_load.append(row)
        elif row.key in _HEAD_KEYS:
            continue  # decided below, for kernel and bias together
        elif row.layout == "posemb":
            prefix, dim = model.num_prefix_tokens, row.shape[-1]
            n = got[1] - prefix if len(got) == 3 and got[0] == 1 else 0
            if n <= 0 or math.isqrt(n) ** 2 != n or got[-1] != dim:
                problems.append(
                    f"cannot resize {row.key}: checkpoint {_fmt(got)} vs model {_fmt(row.shape)} "
                    f"(needs (1, {prefix} + g*g, {dim}): {prefix} class token(s) plus a square grid)"
                )
                continue
            to_load.append(row)
            report.resized.append(row.key)
            report.notes[row.key] = f"{_fmt(got)} -> {_fmt(row.shape)}"
        else:
            problems.append(f"shape mismatch for {row.key}: checkpoint {_fmt(got)} vs model {_fmt(row.shape)}")
    head_rows = [row for row in rows if row.key in _HEAD_KEYS]
    to_zero: list[_Entry] = []
    if all(row.key in shapes for row in head_rows) and any(shapes[row.key] != row.shape for row in head_rows):
        to_zero = head_rows
        for row in head_rows:  # a new task: the official fine-tuning code starts from a zero head
            report.reinitialized.append(row.key)
            report.notes[row.key] = f"checkpoint {_fmt(shapes[row.key])}, model {_fmt(row.shape)}: zero-initialised"
        to_load = [row for row in to_load if row.key not in _HEAD_KEYS]
    for key in shapes:
        if key in known:
            continue
        if key in _PRE_LOGITS_KEYS and model.pre_logits is None:
            report.skipped.append(key)  # the official "drop-head variant"
            report.notes[key] = "the model has no representation layer (representation_size=None)"
        else:
            problems.append(f"unexpected key {key} with shape {_fmt(shapes[key])}: the model has no such parameter")
    if problems:
        raise CheckpointError(
            f"checkpoint does not fit {type(model).__name__}({_describe(model)}); {len(problems)} problem(s):\n  "
            + "\n  ".join(problems)
            + "\nBuild the model with the checkpoint's architecture (e.g. vitcore.CONFIGS[name]); only the head, "
            "pre_logits and the position-embedding grid adapt to the model."
        )
    report.loaded = [row.key for row in to_load]
    return to_load, to_zero, report


def _describe(model: torch.nn.Module) -> str:
    c = model.config
    return (
        f"hidden_size={c.hidden_size}, num_layers={c.num_layers}, patch_size={c.patch_size}, "
        f"resnet_layers={c.resnet_layers}, representation_size={c.representation_size}, "
        f"classifier={c.classifier!r}, img_size={model.img_size}, num_classes={model.num_classes}"
    )


def _as_tensor(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    with warnings.catch_warnings():  # read-only (mmap) arrays are fine: we only read them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


@torch.no_grad()
def load_pretrained(
    model: torch.nn.Module, path_or_arrays: str | os.PathLike | Mapping[str, torch.Tensor]
) -> LoadReport:
    """Load an official ViT checkpoint (.npz path, or the dict `load_npz` returns) into `model`, in place.

    Handles linen and pre-linen names, 4-D GroupNorm parameters, HWIO / (D, heads, head_dim)
    layouts; resizes the position embeddings to the model's grid; drops `pre_logits` when the
    model has none; zero-initialises a head whose shape differs. Anything else that does not fit
    raises CheckpointError listing every offending name with both shapes, before any parameter
    is touched. A model built under `torch.device("meta")` is materialised on the CPU, which
    skips initialising weights that are about to be overwritten.
    """
    if isinstance(path_or_arrays, Mapping):
        arrays = {k: _as_tensor(v) for k, v in path_or_arrays.items()}
        shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        path = None
    else:
        path = path_or_arrays
        shapes = _npz_index(path)
    prefix, shapes = _without_optimizer_prefix(shapes)
    file_key = {k: prefix + k for k in shapes}

    rows, to_zero, report = _plan(model, shapes)
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu")  # every parameter is written below (loaded, or a zeroed head)
    params = dict(model.named_parameters())
    for row in to_zero:
        params[row.param].zero_()
    # From a path, one load_npz call per array, each dropped after its copy: a call maps the whole
    # file once and keeps that mapping (with every page read through it) alive while any of its
    # tensors is, so one call for all arrays would peak at ~2x the file in RSS, this at ~1.05x
    # (test_loading_does_not_double_memory). Re-reading the zip directory per call costs far less.
    for done, row in enumerate(rows):
        try:
            if path is None:
                array = arrays[file_key[row.key]]
            else:
                array = load_npz(path, keys=[file_key[row.key]])[file_key[row.key]]
        except NpzError as e:
            # Shapes were all checked up front, so only a damaged member gets here; say what state the model is in.
            raise NpzError(
                f"{e}\n(model left partially loaded: {done} of {len(rows)} arrays copied; rebuild the model "
                "before loading another checkpoint into it)"
            ) from e
        if row.layout == "posemb" and tuple(array.shape) != row.shape:
            array = resize_pos_embedding(array.to(torch.float64), model.num_prefix_tokens, model.grid_size)
        _target(params[row.param], row).copy_(_to_torch(array, row))
        del array
    return report


def save_npz(model: torch.nn.Module, path: str | os.PathLike, *, compressed: bool = False) -> str:
    """Write `model` as an official (linen-named) checkpoint that `np.load` and `load_pretrained` read.

    The file is written like `np.savez` (or `np.savez_compressed`) to a temporary file next to
    `path` and moved into place atomically. Returns the path.
    """
    path = os.fspath(path)
    params = dict(model.named_parameters())
    compression = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w", compression=compression, allowZip64=True) as zf:
        for row in _table(model):
            tensor = _to_official(_target(params[row.param].detach(), row), row)
            if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
                tensor = tensor.float()
            # One array at a time, C order like the official files.
            array = np.ascontiguousarray(tensor.cpu().numpy())
            with zf.open(row.key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return path
