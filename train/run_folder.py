"""A run folder belongs to one job: an exclusive lock for the run's lifetime, no silent overwrite of an earlier run
(it is moved aside, never deleted), a unique default name, and no stale temp files from a killed writer.

The lock is `fcntl.flock` on `<run>/.lock`: the kernel drops it when its process dies (even by SIGKILL), so a
lock that can be taken is never held by a live job, whatever PID the file still names. The PID and host of the
holder are written into the file so that a refused job can say which one is running.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time

from vitcore.fileio import remove_stale_temps

from .args import UsageError

__all__ = ["RUN_FILES", "RunLock", "default_name", "describe_device", "existing_run_files", "move_aside",
           "remove_run_temps", "will_resume"]

# What makes a folder hold a run: starting a new run into it would overwrite one of these.
RUN_FILES = ("last.pt", "best.pt", "metrics.csv")
# Every file a run writes through atomic_write (whose `<name>.*.tmp` a kill may leave behind).
_WRITTEN = ("last.pt", "best.pt", "metrics.csv", "args.json", "curves.png")
LOCK_NAME = ".lock"


def default_name(model_type: str, dataset: str, output_dir: str, now: float | None = None) -> str:
    """`<model>-<dataset>-<YYYYmmdd-HHMMSS>`, with `-2`, `-3`... when a folder of that name exists already."""
    base = f"{model_type}-{dataset}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
    name, n = base, 1
    while os.path.exists(os.path.join(output_dir, name)):
        n += 1
        name = f"{base}-{n}"
    return name


def existing_run_files(run_dir: str) -> list[str]:
    """The files of RUN_FILES that `run_dir` holds."""
    return [f for f in RUN_FILES if os.path.exists(os.path.join(run_dir, f))]


def will_resume(resume: str | None, run_dir: str) -> bool:
    """`--resume` (= "yes") always continues; `--resume auto` continues when the folder holds a last.pt."""
    return resume == "yes" or (resume == "auto" and os.path.isfile(os.path.join(run_dir, "last.pt")))


def move_aside(run_dir: str) -> str:
    """Move everything in `run_dir` but the lock into `<run_dir>.old-<timestamp>`; returns that folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = f"{run_dir}.old-{stamp}", 1
    while os.path.exists(dest):
        n += 1
        dest = f"{run_dir}.old-{stamp}-{n}"
    os.makedirs(dest)
    for entry in sorted(os.listdir(run_dir)):
        if entry != LOCK_NAME:
            os.rename(os.path.join(run_dir, entry), os.path.join(dest, entry))  # same filesystem: nothing copied
    return dest


def remove_run_temps(run_dir: str) -> list[str]:
    """Remove the temp files a killed writer of this run left (`last.pt.*.tmp`...); call it holding the lock."""
    return [p for name in _WRITTEN for p in remove_stale_temps(os.path.join(run_dir, name))]


class RunLock:
    """An exclusive, non-blocking lock on a run folder, held until `release()` or the process's death."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise UsageError naming the job that holds it; returns a note when the lock file was
        left by a job that is no longer running (its lock is then taken over), else None."""
        os.makedirs(self.run_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise UsageError(f"run folder {self.run_dir} is in use by {holder or 'another job'}: wait for it "
                                 "to finish, or pick another --name") from None
            # A releasing job unlinks the file while it still holds it: if ours is no longer the file at that path,
            # the lock we got is on an orphan inode; try again on the current one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        if stale:
            return f"took over the lock of {self.run_dir} left by {stale}, which is no longer running"
        return None

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order: see acquire)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    return ""


def describe_device(path: str) -> str:
    """'<device> (mounted at <mount point>)' of the filesystem that holds `path` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    mount = path
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    source = None
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == mount:
                source = fields[0]  # the last match is the mount on top
    return f"{source} (mounted at {mount})" if source else f"the filesystem mounted at {mount}"
