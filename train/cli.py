"""Shared CLI plumbing: bad input becomes one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

import vitcore

from .args import UsageError
from .download import DownloadError
from .safe_pickle import UnsafePickleError

__all__ = ["TrainingError", "one_line", "run_cli"]


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, out of memory): the message says what to try. Exit code 1."""


# Input the user can fix: exit code 2.
_INPUT_ERRORS = (UsageError, vitcore.CheckpointError, vitcore.NpzError, UnsafePickleError, FileNotFoundError)


def one_line(e: BaseException, limit: int = 600) -> str:
    """The exception's message folded onto one line (a CheckpointError may list several names)."""
    text = "; ".join(s.strip() for s in str(e).splitlines() if s.strip()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_cli(prog: str, fn: Callable[[], int]) -> int:
    """Call `fn`; map known failures to one stderr line: 2 for bad input, 1 for download/training failures."""
    try:
        return fn()
    except _INPUT_ERRORS as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (DownloadError, TrainingError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 1

