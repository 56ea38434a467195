"""`backend="auto"`: per op and shape class, whichever of the torch path and the Triton kernel is faster, measured.

On CUDA the first call of an op in a new shape class times both backends on that call's own tensors (forward, and
backward where gradients are wanted: CUDA events, one warm-up and REPEATS timed runs, the median) and keeps the
faster one; ties go to torch, so "auto" is never slower than PyTorch by more than the noise of one measurement.
Elsewhere, and inside torch.compile (which fuses the torch ops itself), "auto" is torch without measuring.
Shape classes:
  attention    B*H (next power of two), N (and N_kv when it differs), head_dim
  layer_norm   width
  linear_gelu  M = rows (next power of two), K (in features), N (out features)
each also by dtype, the autocast dtype (if on) and which inputs want gradients (a frozen weight has no dW work).

Choices are cached in memory and on disk, one JSON file per environment (GPU name, torch, triton and vitcore
versions, and a digest of the kernel sources, so edited kernels are measured again) in $VITCORE_CACHE (default
$XDG_CACHE_HOME/vitcore or ~/.cache/vitcore), written with vitcore.fileio.atomic_write. A corrupt or unreadable
file is ignored with a warning and rewritten. Triton's autotuner keeps its own results in Triton's cache folder
(kernels._common.autotune).

Measuring draws no random numbers (the upstream gradient is the output itself), so runs stay exactly resumable.
`backend_report(model)` is the table behind `VisionTransformer.backend_report()`; `summary_line(model)` is the
one line a training log prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import statistics
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata

import torch
from torch import nn

from . import ops
from .fileio import atomic_write

__all__ = [
    "CACHE_ENV",
    "REPEATS",
    "AutoBackend",
    "Choice",
    "backend_report",
    "cache_folder",
    "choose",
    "cuda_timer",
    "default",
    "set_default",
    "summary_line",
    "using",
]

CACHE_ENV = "VITCORE_CACHE"
REPEATS = 5
FORMAT = 1
OPS = ("attention", "layer_norm", "linear_gelu")
_INPUT_NAMES = {"attention": ("q", "k", "v"), "layer_norm": ("x", "weight", "bias"),
                "linear_gelu": ("x", "weight", "bias")}
# Timed calls use each op's default attributes: eps and the GELU variant do not change which backend is faster, and
# attention dropout in training falls back to torch on either backend.
_CALLS = {
    "attention": lambda backend: lambda q, k, v: ops.attention(q, k, v, 0.0, False, backend),
    "layer_norm": lambda backend: lambda x, w, b: ops.layer_norm(x, w, b, 1e-6, backend),
    "linear_gelu": lambda backend: lambda x, w, b: ops.linear_gelu(x, w, b, "tanh", backend),
}

Timer = Callable[[Callable[[], object], str], float]  # (run once, "op/backend") -> milliseconds per run


@dataclass(frozen=True)
class Choice:
    """The backend picked for one shape class, with what it was picked from."""

    backend: str  # "torch" or "triton"
    torch_ms: float | None = None  # forward (+ backward) per call, median of REPEATS
    triton_ms: float | None = None
    source: str = "measured"  # "measured", "cache" (read from disk) or why nothing was measured

    def to_json(self) -> dict:
        return {"backend": self.backend, "torch_ms": self.torch_ms, "triton_ms": self.triton_ms}

    @staticmethod
    def from_json(entry: object) -> Choice:
        if not isinstance(entry, dict) or entry.get("backend") not in ("torch", "triton"):
            raise ValueError(f"bad entry {entry!r}")
        ms = [entry.get("torch_ms"), entry.get("triton_ms")]
        if not all(t is None or (isinstance(t, (int, float)) and math.isfinite(t)) for t in ms):
            raise ValueError(f"bad timings in {entry!r}")
        return Choice(entry["backend"], *ms, source="cache")


def cuda_timer(run: Callable[[], object], label: str, repeats: int = REPEATS) -> float:
    """Milliseconds per call of `run` on the current CUDA stream: one warm-up (compiles and autotunes Triton
    kernels), then the median of `repeats` runs, each between its own pair of CUDA events."""
    run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def cache_folder() -> str:
    """Where the choices are kept: $VITCORE_CACHE, else $XDG_CACHE_HOME/vitcore, else ~/.cache/vitcore."""
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vitcore")


def _version(dist: str, module: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
    try:
        return str(__import__(module).__version__)
    except (ImportError, AttributeError):
        return "none"


def _sources_digest() -> str:
    """Digest of the files whose edits change the timings (the kernels and the dispatch)."""
    import kernels

    folder = os.path.dirname(kernels.__file__)
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py"))
    paths.append(ops.__file__)
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def cuda_environment(device: torch.device) -> dict[str, str]:
    """What the cached choices are valid for: the GPU model and the software that runs on it."""
    return {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "triton": _version("triton", "triton"), "vitcore": _version("vitcore", "vitcore"),
            "kernels": _sources_digest()}


def _bucket(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _shape_class(op: str, inputs: Sequence[torch.Tensor]) -> tuple:
    """(op, (name, value) pairs...) for one call: the key choices are measured and kept under."""
    x = inputs[0]
    if op == "attention":
        q, k = inputs[0], inputs[1]
        dims = [("bh", _bucket(math.prod(q.shape[:-2]))), ("n", q.shape[-2])]
        if k.shape[-2] != q.shape[-2]:
            dims.append(("n_kv", k.shape[-2]))
        dims.append(("d", q.shape[-1]))
    elif op == "layer_norm":
        dims = [("width", x.shape[-1])]
    elif op == "linear_gelu":
        n, k = inputs[1].shape
        dims = [("m", _bucket(x.numel() // max(k, 1))), ("k", k), ("n", n)]
    else:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    dims.append(("dtype", str(x.dtype).removeprefix("torch.")))
    if torch.is_autocast_enabled(x.device.type):
        dims.append(("autocast", str(torch.get_autocast_dtype(x.device.type)).removeprefix("torch.")))
    wanted = [name for name, t in zip(_INPUT_NAMES[op], inputs) if t.requires_grad] if torch.is_grad_enabled() else []
    dims.append(("grads", ",".join(wanted) or "none"))
    return (op, *dims)


def _field(name: str, value: object) -> str:
    return f"{name}<={value}" if name in ("bh", "m") else f"{name}={value}"  # bh and m are power-of-two buckets


def _label(key: tuple) -> str:
    """A shape class as the text the cache file and the report use: 'layer_norm width=768 dtype=bfloat16 ...'."""
    op, *dims = key
    return " ".join([op, *(_field(name, value) for name, value in dims)])


def _runner(op: str, backend: str, inputs: Sequence[torch.Tensor]) -> Callable[[], None]:
    """One call of `op` on `backend` at these inputs, with its backward when gradients are wanted. The inputs are
    detached views of the caller's tensors (nothing is copied, and no .grad is touched)."""
    leaves = [t.detach().requires_grad_(t.requires_grad and torch.is_grad_enabled()) for t in inputs]
    wanted = [t for t in leaves if t.requires_grad]
    call = _CALLS[op](backend)

    def run() -> None:
        out = call(*leaves)
        if wanted:
            torch.autograd.grad(out, wanted, out.detach())  # the output as upstream gradient: no random numbers

    return run


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class AutoBackend:
    """The measured choices of one process. `timer`, `is_cuda` and `environment` are injectable (tests run the whole
    logic on CPU with a fake timer); `cache_dir` overrides $VITCORE_CACHE."""

    def __init__(
        self,
        *,
        timer: Timer | None = None,
        is_cuda: Callable[[torch.Tensor], bool] | None = None,
        environment: Callable[[torch.device], dict[str, str]] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        self.timer = timer or cuda_timer
        self.is_cuda = is_cuda or (lambda t: t.is_cuda)
        self.environment = environment or cuda_environment
        self.cache_dir = cache_dir
        self.choices: dict[tuple, Choice] = {}  # shape class (plus device) -> choice
        self._disk: dict[str, dict[str, Choice]] = {}  # cache file -> its entries, read once
        self._paths: dict[torch.device, tuple[str, dict[str, str]]] = {}
        self._warned: set[str] = set()

    # ---------------------------------------------------------------------------------------------- choosing

    def choose(self, op: str, *inputs: torch.Tensor) -> str:
        """"torch" or "triton" for this call of `op`; measures on the first call of a new shape class on CUDA.
        Inside torch.compile it is torch: the measurements are of eager calls, and inductor fuses the torch ops."""
        if torch.compiler.is_compiling() or not self.is_cuda(inputs[0]):
            return "torch"
        key = (inputs[0].device, *_shape_class(op, inputs))
        choice = self.choices.get(key)
        if choice is None:
            choice = self._resolve(key, op, inputs)
        return choice.backend

    def _resolve(self, key: tuple, op: str, inputs: Sequence[torch.Tensor]) -> Choice:
        device, label = key[0], _label(key[1:])
        if inputs[0].is_cuda and torch.cuda.is_current_stream_capturing():
            # No timing inside a CUDA-graph capture; torch, the reference, until measured outside one.
            return Choice("torch", source="not measured (inside a CUDA-graph capture)")
        path, env = self._path(device)
        cached = self._entries(path, env).get(label)
        if cached is not None:
            self.choices[key] = cached
            return cached
        choice = self._measure(op, inputs)
        self.choices[key] = choice
        if choice.source == "measured":
            self._save(path, env, label, choice)
        return choice

    def _measure(self, op: str, inputs: Sequence[torch.Tensor]) -> Choice:
        timings: dict[str, float] = {}
        for backend in ("torch", "triton"):
            try:
                # Plain saved tensors for the timed calls: the caller may be inside activation checkpointing,
                # whose hooks would otherwise count these calls' tensors as the block's and fail its recompute.
                with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
                    timings[backend] = float(self.timer(_runner(op, backend, inputs), f"{op}/{backend}"))
            except Exception as error:  # noqa: BLE001 - an unsupported shape or an OOM while measuring: torch
                if backend == "torch":
                    raise
                reason = f"triton failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
                return Choice("torch", timings["torch"], None, source=reason)
        faster = "triton" if timings["triton"] < timings["torch"] else "torch"
        return Choice(faster, timings["torch"], timings["triton"])

    # ------------------------------------------------------------------------------------------------ disk

    def _path(self, device: torch.device) -> tuple[str, dict[str, str]]:
        if device not in self._paths:
            env = {k: str(v) for k, v in self.environment(device).items()}
            digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
            self._paths[device] = (f"backends-{digest}.json", env)
        name, env = self._paths[device]
        return os.path.join(self.cache_dir or cache_folder(), name), env

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=4)

    def _read(self, path: str, env: dict[str, str]) -> dict[str, Choice]:
        """The entries of one cache file; {} when it is missing, and (with a warning) when it is corrupt."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            self._warn_once(f"vitcore: ignoring the backend cache {path} ({type(error).__name__}: {error}); "
                            "the choices will be measured again and the file rewritten")
            return {}
        try:
            if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("choices"), dict):
                raise ValueError("not a vitcore backend cache of format 1")
            if data.get("environment") != env:
                raise ValueError("written for another GPU or software version")
            return {str(label): Choice.from_json(entry) for label, entry in data["choices"].items()}
        except ValueError as error:
            self._warn_once(f"vitcore: ignoring the backend cache {path} ({error}); "
                            "the choices will be measured again and the file rewritten")
            return {}

    def _entries(self, path: str, env: dict[str, str]) -> dict[str, Choice]:
        if path not in self._disk:
            self._disk[path] = self._read(path, env)
        return self._disk[path]

    def _save(self, path: str, env: dict[str, str], label: str, choice: Choice) -> None:
        # Merge with what is on disk now: another process (a DDP rank, a second run) may have added classes.
        entries = {**self._read(path, env), **self._entries(path, env), label: choice}
        self._disk[path] = entries
        data = {"format": FORMAT, "environment": env,
                "choices": {k: v.to_json() for k, v in sorted(entries.items())}}
        try:
            with atomic_write(path, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
        except OSError as error:
            self._warn_once(f"vitcore: cannot write the backend cache {path} ({error}); the choices are kept for "
                            f"this process only (set ${CACHE_ENV} to a writable folder)")

    # --------------------------------------------------------------------------------------------- reporting

    def rows(self) -> list[dict]:
        """Every choice made so far: op, shape class fields, backend, timings, source, cache file."""
        out = []
        for (device, op, *dims), choice in self.choices.items():
            path = self._path(device)[0] if device in self._paths else None
            out.append({"op": op, "device": str(device), "shape": dict(dims), "label": _label((op, *dims)),
                        "backend": choice.backend, "torch_ms": choice.torch_ms, "triton_ms": choice.triton_ms,
                        "source": choice.source, "cache": path})
        return out


_DEFAULT = AutoBackend()


def default() -> AutoBackend:
    """The process-wide AutoBackend that `ops.pick_backend` asks."""
    return _DEFAULT


def set_default(auto: AutoBackend) -> AutoBackend:
    """Make `auto` the process-wide AutoBackend; returns the previous one."""
    global _DEFAULT
    previous, _DEFAULT = _DEFAULT, auto
    return previous


@contextlib.contextmanager
def using(auto: AutoBackend) -> Iterator[AutoBackend]:
    """`auto` as the process-wide AutoBackend inside the block (a separate cache folder, a test's fake timer)."""
    previous = set_default(auto)
    try:
        yield auto
    finally:
        set_default(previous)


def choose(op: str, *inputs: torch.Tensor) -> str:
    """The backend "auto" resolves to for this call of `op` (see the module docstring)."""
    return _DEFAULT.choose(op, *inputs)


# ------------------------------------------------------------------------------------------------ model reports


def _model_layers(model: nn.Module) -> dict[str, list[tuple[str, dict]]]:
    """Per op, each layer of `model` that runs it: (its backend setting, the shape fields that identify it)."""
    from .layers import LayerNorm, MlpBlock, MultiHeadAttention

    layers: dict[str, list[tuple[str, dict]]] = {op: [] for op in OPS}
    for m in model.modules():
        if isinstance(m, LayerNorm):
            layers["layer_norm"].append((m.backend, {"width": m.normalized_shape[-1]}))
        elif isinstance(m, MlpBlock) and m._fusable():
            layers["linear_gelu"].append((m.backend, {"k": m.fc1.in_features, "n": m.fc1.out_features}))
        elif isinstance(m, MultiHeadAttention):
            layers["attention"].append((m.core.backend, {"d": m.head_dim}))
    return layers


def _model_rows(model: nn.Module, auto: AutoBackend) -> tuple[dict[str, list[tuple[str, dict]]], list[dict]]:
    layers = _model_layers(model)
    rows = [row for row in auto.rows()
            if any(backend == "auto" and all(row["shape"].get(k) == v for k, v in fields.items())
                   for backend, fields in layers[row["op"]])]
    return layers, rows


def _speedup(row: dict) -> float | None:
    if row["torch_ms"] is None or not row["triton_ms"]:
        return None
    return row["torch_ms"] / row["triton_ms"]


def backend_report(model: nn.Module, auto: AutoBackend | None = None) -> str:
    """A table of what `model`'s hot layers run on: forced backends, and for "auto" each shape class measured so
    far with its choice, both timings (ms per forward+backward, or forward only) and triton's speed-up."""
    auto = auto or _DEFAULT
    layers, rows = _model_rows(model, auto)
    lines = []
    for op in OPS:
        settings = [backend for backend, _ in layers[op]]
        if not settings:
            continue
        counts = ", ".join(f"{settings.count(b)} {b}" for b in ops.BACKENDS if b in settings)
        lines.append(f"{op}: {len(settings)} layers ({counts})")
    if not lines:
        return "no attention, LayerNorm or fused Linear+GELU layers"
    if rows:
        table = [("op", "shape class", "choice", "torch ms", "triton ms", "speed-up", "source")]
        fmt = lambda t: "-" if t is None else f"{t:.4f}"
        for row in rows:
            s = _speedup(row)
            table.append((row["op"], row["label"].split(" ", 1)[1], row["backend"], fmt(row["torch_ms"]),
                          fmt(row["triton_ms"]), "-" if s is None else f"{s:.2f}x", row["source"]))
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
        caches = sorted({row["cache"] for row in rows if row["cache"]})
        lines += [f"cache: {path}" for path in caches]
    elif any(backend == "auto" for op in OPS for backend, _ in layers[op]):
        lines.append('"auto" has measured nothing for this model yet: on CUDA it measures on the first forward '
                     "(elsewhere it is torch)")
    return "\n".join(lines)


def summary_line(model: nn.Module, auto: AutoBackend | None = None) -> str:
    """One line for a training log: per op the backend in use ("auto" with what it chose and triton's speed-up)."""
    auto = auto or _DEFAULT
    layers, rows = _model_rows(model, auto)
    parts = []
    for op in OPS:
        forced = sorted({backend for backend, _ in layers[op] if backend != "auto"})
        parts += [f"{op} {backend} (forced)" for backend in forced]
        if any(backend == "auto" for backend, _ in layers[op]):
            measured = [r for r in rows if r["op"] == op]
            if not measured:
                parts.append(f"{op} auto (nothing measured yet; torch off CUDA)")
            for r in measured:
                s = _speedup(r)
                shape = " ".join(_field(k, v) for k, v in r["shape"].items() if k not in ("dtype", "autocast"))
                parts.append(f"{op} [{shape}] {r['backend']}" + ("" if s is None else f" ({s:.2f}x)"))
    return "backends: " + ("; ".join(parts) if parts else "none")
