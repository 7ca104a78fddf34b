"""A progress bar per epoch: phase, sparsity, running loss, then validation top-1."""

from __future__ import annotations

import sys

from tqdm import tqdm

from dg2pf_client import interrupt
from dg2pf_core.algorithm.state import EpochRecord


class EpochBars:
    """tqdm bars on a terminal; one plain line per epoch when stderr is a log file or pipe."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.bar: tqdm | None = None
        self.loss_sum = 0.0
        self.batches = 0
        self.epochs_ended = 0  # training epochs finished (the baseline evaluation is not one)

    def start_epoch(self, phase: str, epoch: int, sparsity: float, batches: int) -> None:
        interrupt.check()  # a Ctrl-C that a library swallowed stops the run here, its state kept
        self.loss_sum, self.batches = 0.0, 0
        if self.enabled and self.tty:
            self.bar = tqdm(
                total=batches,
                desc=f"epoch {epoch:>3} {phase:<15} sparsity {sparsity:6.2%}",
                file=sys.stderr,
                leave=True,
                dynamic_ncols=True,
            )

    def batch(self, loss: float) -> None:
        self.loss_sum += loss
        self.batches += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {self.loss_sum / self.batches:.4f}", refresh=False)

    def end_epoch(self, record: EpochRecord) -> None:
        if record.phase == "baseline":
            if self.enabled:
                print(f"baseline (dense) val top-1 {record.val_top1:.2f}%", file=sys.stderr)
            return
        self.epochs_ended += 1
        star = " *best" if record.is_best else ""
        back = f", {record.recovered} weights recovered" if record.recovered else ""
        summary = f"loss {record.train_loss:.4f} val top-1 {record.val_top1:.2f}%{star}{back}"
        if self.bar is not None:
            self.bar.set_postfix_str(summary)
            self.bar.close()
            self.bar = None
        elif self.enabled:
            print(
                f"epoch {record.epoch:>3} {record.phase:<15} sparsity {record.sparsity:6.2%}  "
                f"{summary}  ({record.seconds:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
