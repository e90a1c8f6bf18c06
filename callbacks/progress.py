"""A line every N training steps: the step of the run's max_steps, the rate and the time to go."""

from __future__ import annotations

import datetime
import time

import lightning as L
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities.rank_zero import rank_zero_info


def seconds_to_go(steps_done: int, steps_left: int | None, elapsed: float, time_left: float | None) -> float | None:
    """Seconds until training ends: the steps left at the rate so far, or the time limit if that
    comes sooner; None with neither a step count nor a time limit."""
    ends = [steps_left * elapsed / steps_done if steps_left is not None else None, time_left]
    return min((end for end in ends if end is not None), default=None)


def clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))  # h:mm:ss


class StepProgress(L.Callback):
    """Every `every_n_steps` training steps, on global rank 0, a line such as

        step 300/1,425 (21%) in 0:00:54, 5.6 steps/s, 0:03:21 to go; train/loss 0.0042

    the time to go being to Trainer(max_steps) at the rate since training started, or to
    Trainer(max_time) if that comes first, then the progress-bar metrics.

    Lightning's progress bar counts the batches of one epoch: a run sized in steps over many
    epochs of a small set shows no end, and a log file gets nothing until an epoch ends.
    """

    def __init__(self, every_n_steps: int = 100):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.last_step = -1
        self.started = 0.0
        self.first_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()
        self.first_step = trainer.global_step  # a resumed run's rate counts its own steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        # under accumulation several batches end on the same step: one line for it
        if step % self.every_n_steps or step == self.last_step or step == self.first_step or not trainer.is_global_zero:
            return
        self.last_step = step
        elapsed = time.perf_counter() - self.started
        done = step - self.first_step
        total = f"/{trainer.max_steps:,} ({step / trainer.max_steps:.0%})" if trainer.max_steps > 0 else ""
        line = f"step {step:,}{total} in {clock(elapsed)}, {done / elapsed:.1f} steps/s"
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)  # there with max_time
        to_go = seconds_to_go(done, trainer.max_steps - step if trainer.max_steps > 0 else None, elapsed,
                              timer.time_remaining() if timer is not None else None)
        if to_go is not None:
            line += f", {clock(to_go)} to go"
        metrics = "  ".join(f"{name} {value:.4g}" for name, value in trainer.progress_bar_metrics.items())
        rank_zero_info(f"{line}; {metrics}" if metrics else line)
