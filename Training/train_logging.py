"""What a run reports (main process only): ``log.csv``, TensorBoard logs when tensorboard is installed, and a
progress bar when tqdm is."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Dict, Optional

from Training.cli_common import progress_bar
from Training.train_config import LOG_FILE

log = logging.getLogger("robustmedsam.train")

LOG_FIELDS = ["phase", "epoch", "step", "lr", "total", "focal", "dice", "token", "feature", "mask", "iou",
              "grad_norm", "seconds"]


class CsvLog:
    """``log.csv``: one row per step (train) and per epoch (val); on resume rows after the state are dropped."""

    def __init__(self, path: Path, keep_until_step: Optional[int]) -> None:
        self.path = path
        rows = []
        if keep_until_step is not None and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
        self.writer.writeheader()
        for r in rows:
            self.writer.writerow(r)
        self.file.flush()

    def write(self, row: Dict[str, object]) -> None:
        self.writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()
                              if k in LOG_FIELDS})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def tensorboard(out: Path):
    """A SummaryWriter on ``out/tensorboard``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: no TensorBoard logs (the CSV log is written)")
        return None
    return SummaryWriter(str(out / "tensorboard"))


class RunLog:
    """The CSV log, TensorBoard and progress bar of a run; does nothing when not ``enabled`` (other ranks).

    ``resumed_at``: the global step of the resumed state (later rows of ``log.csv`` are dropped), or None.
    """

    def __init__(self, out: Path, total_steps: int, resumed_at: Optional[int], progress: bool,
                 enabled: bool) -> None:
        initial = resumed_at or 0
        self.csv = CsvLog(out / LOG_FILE, resumed_at) if enabled else None
        self.tb = tensorboard(out) if enabled else None
        self.bar = progress_bar(total_steps, "step", initial, progress and enabled)

    def _scalars(self, phase: str, values: Dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{phase}/{k}", v, step)

    def train_step(self, values: Dict[str, float], epoch: int, step: int, lr: float, grad_norm: float,
                   seconds: float) -> None:
        if self.csv is None:
            return
        self.csv.write(dict(values, phase="train", epoch=epoch, step=step, lr=lr, grad_norm=grad_norm,
                            seconds=seconds))
        self._scalars("train", values, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{values['total']:.4f}", epoch=epoch)

    def validation(self, values: Dict[str, float], epoch: int, step: int) -> None:
        if self.csv is None:
            return
        self.csv.write(dict(values, phase="val", epoch=epoch, step=step))
        self._scalars("val", values, step)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def close(self) -> None:
        self.close_bar()
        if self.csv is not None:
            self.csv.close()
        if self.tb is not None:
            self.tb.close()
