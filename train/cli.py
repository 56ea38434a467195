"""Shared CLI plumbing: every failure a user can cause is one line on stderr, never a traceback.

Exit codes: 2 bad input (flags, files), 1 a run that failed (NaN loss, out of memory, disk full, download), 130
interrupted (Ctrl-C). `--debug` or VITCORE_DEBUG=1 prints the traceback above the line.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence

import vitcore

from .args import UsageError
from .download import DownloadError
from .safe_pickle import DatasetFileError, UnsafePickleError

__all__ = ["Interrupted", "TrainingError", "is_out_of_memory", "one_line", "run_cli"]


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, out of memory): the message says what to try. Exit code 1."""


class Interrupted(TrainingError):
    """Ctrl-C: the message says where the run got to and how to continue it. Exit code 130 (128 + SIGINT)."""


# Input the user can fix: exit code 2.
_INPUT_ERRORS = (UsageError, vitcore.CheckpointError, vitcore.NpzError, UnsafePickleError, DatasetFileError,
                 FileNotFoundError,
                 IsADirectoryError, NotADirectoryError, PermissionError)

# Terminal control sequences (colours, cursor moves, titles) and other control characters: a file name or a
# flag value can carry them, and a message must not repaint the user's terminal.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves
                      r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window titles, hyperlinks
                      r"|\x1b.?|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def one_line(e: BaseException | str, limit: int = 600) -> str:
    """The message folded onto one line (a CheckpointError may list several names), control sequences removed."""
    text = "; ".join(s.strip() for s in str(e).splitlines() if s.strip())
    text = _ESCAPES.sub("", text) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's (a RuntimeError or MemoryError)."""
    import torch

    if isinstance(e, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text
                                            or "DefaultCPUAllocator" in text)


def _debug(argv: Sequence[str] | None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return os.environ.get("VITCORE_DEBUG", "") not in ("", "0") or "--debug" in argv


def run_cli(prog: str, fn: Callable[[], int], argv: Sequence[str] | None = None) -> int:
    """Call `fn`; map every failure to one stderr line and an exit code (see the module docstring). `argv` (default
    sys.argv[1:]) is only looked at for --debug."""
    try:
        return fn()
    except BaseException as e:
        if isinstance(e, SystemExit | GeneratorExit):
            raise
        code, message = _classify(e)
        if _debug(argv):
            traceback.print_exc()
        if not getattr(e, "echo", False):  # an echo: another rank of this job has printed the same line
            print(f"{prog}: error: {message}", file=sys.stderr)
        return code


def _classify(e: BaseException) -> tuple[int, str]:
    if isinstance(e, Interrupted):
        return 130, one_line(e)
    if isinstance(e, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(e, _INPUT_ERRORS):
        return 2, one_line(e)
    if isinstance(e, DownloadError | TrainingError):
        return 1, one_line(e)
    if is_out_of_memory(e):
        return 1, (f"out of memory ({one_line(e, limit=200)}): try a smaller --train_batch_size or "
                   "--eval_batch_size, --img_size or --model_type")
    if isinstance(e, RuntimeError) and re.search(r"Connection (closed|reset) by peer|NCCL communicator was aborted",
                                                 str(e)):
        return 1, (f"another process of this job stopped (its own error is above; torchrun --max-restarts N and "
                   f"--resume auto continue the run): {one_line(e, limit=200)}")
    if isinstance(e, OSError):  # the disk, the network: the message names the file
        return 1, one_line(e)
    # Anything else is a bug of ours, still one line: the traceback is one flag away.
    return 1, (f"unexpected {type(e).__name__}: {one_line(e, limit=300)} (rerun with --debug or VITCORE_DEBUG=1 "
               "for the traceback, and please report it)")
