"""Run artifacts: metrics.csv, TensorBoard events, args.json and curves.png (loss, accuracy, lr)."""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any

from vitcore.fileio import atomic_write

__all__ = ["MetricsLogger", "write_args_json", "plot_curves", "read_metrics"]

FIELDS = ["step", "split", "loss", "accuracy", "lr", "img_per_s", "elapsed_s"]


def write_args_json(args: dict[str, Any], path: str) -> None:
    with atomic_write(path, "w") as f:
        json.dump(args, f, indent=2, sort_keys=True)


def read_metrics(path: str, damaged: list[int] | None = None) -> list[dict[str, Any]]:
    """Rows of metrics.csv with numbers parsed (empty cells -> None). A row that does not parse (the half-written
    last line of a full disk, a hand edit) is left out; its line number is appended to `damaged` when given."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, newline="", errors="replace") as f:
        for row in csv.DictReader(f):
            try:
                parsed = {k: (row[k] if k == "split" else (float(row[k]) if row[k] not in ("", None) else None))
                          for k in FIELDS}
                if parsed["step"] is None or parsed["split"] in ("", None):
                    raise ValueError("no step or split")
            except (ValueError, TypeError, KeyError):
                if damaged is not None:
                    damaged.append(len(rows) + len(damaged) + 2)  # its line: 1-based, after the header
                continue
            rows.append(parsed)
    return rows


class MetricsLogger:
    """Appends rows to metrics.csv and scalars to TensorBoard; a no-op when `enabled` is False (ranks > 0)."""

    def __init__(self, run_dir: str, enabled: bool = True, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        self.writer = None
        self._file = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        damaged: list[int] = []
        rows = read_metrics(self.csv_path, damaged) if resume_step is not None else []
        if damaged:
            print(f"note: {self.csv_path}: left out {len(damaged)} row(s) that do not parse (line(s) "
                  f"{', '.join(map(str, damaged[:5]))})", file=sys.stderr)
        # A resumed run replays the steps after its checkpoint: drop the rows the killed run logged past it.
        rows = [r for r in rows if r["step"] <= (resume_step or 0)]
        # The kept rows are written whole (a kill now leaves the old file or the new one, never a prefix), then the
        # file stays open for appending: one write per step, no reopen. flush() (at each evaluation, before the
        # checkpoint is saved) puts the rows on disk, so a checkpoint never gets ahead of metrics.csv.
        with atomic_write(self.csv_path, "w") as f:
            head = csv.DictWriter(f, fieldnames=FIELDS)
            head.writeheader()
            for r in rows:
                head.writerow({k: ("" if r[k] is None else (int(r[k]) if k == "step" else r[k])) for k in FIELDS})
        self._file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=FIELDS)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events at steps >= it; the checkpoint's own step (its test accuracy) stays.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge)

    def log(self, step: int, split: str, **values: float | None) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, **{k: values.get(k) for k in FIELDS[2:]}}
        self._csv.writerow({k: "" if v is None else v for k, v in row.items()})
        for k, v in values.items():
            if v is not None and self.writer is not None:
                self.writer.add_scalar(f"{split}/{k}", v, step)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def plot_curves(csv_path: str, out_path: str) -> None:
    """curves.png: train/test loss, test accuracy and lr against step (matplotlib Agg, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(csv_path)
    train = [r for r in rows if r["split"] == "train"]
    # The evaluated split: validation when the run has one (--val_split; test is then evaluated once, at the end).
    name = "val" if any(r["split"] == "val" for r in rows) else "test"
    test = [r for r in rows if r["split"] == name]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=0.8)
    ax.plot([r["step"] for r in test], [r["loss"] for r in test], "o-", label=name)
    ax.set(title="loss", xlabel="step")
    ax.legend()
    axes[1].plot([r["step"] for r in test], [100 * r["accuracy"] for r in test], "o-")
    axes[1].set(title=f"{name} accuracy (%)", xlabel="step")
    axes[2].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[2].set(title="learning rate", xlabel="step")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(out_path, "wb") as f:
        fig.savefig(f, dpi=90, format="png")
    plt.close(fig)
