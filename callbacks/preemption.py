"""Requeue: checkpoint and requeue a SLURM job on its warning signal, at a training-step boundary.

`#SBATCH --signal=USR1@90` makes SLURM send SIGUSR1 to every task 90 s before the time limit
(and a preempting scheduler can do the same). Lightning's own handler saves the checkpoint inside
the signal handler, i.e. anywhere in a step (between a backward and its optimizer step, or on
one DDP rank while another is in a collective). Here the handler only raises a flag; at the
end of the next optimizer step all ranks agree (one all-reduce), write
`<checkpoints>/requeue.ckpt` together, stop training cleanly, and rank 0 runs
`scontrol requeue $SLURM_JOB_ID`. The requeued job runs the same command, which resumes from
the newest checkpoint in the run directory (see tessera/commands/fit.py).

Outside SLURM the signal still checkpoints and stops (rank 0 logs that nothing was requeued),
so `kill -USR1` works as a "save and stop" on any machine.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info

log = logging.getLogger(__name__)

REQUEUE_CHECKPOINT = "requeue.ckpt"


class Requeue(L.Callback):
    """On `signal_name`, checkpoint at the next step boundary, stop, and requeue the SLURM job."""

    def __init__(self, dirpath: str | Path | None = None, signal_name: str = "SIGUSR1"):
        """
        Args:
            dirpath: where requeue.ckpt goes; `<default_root_dir>/checkpoints` when None.
            signal_name: the signal SLURM is told to send (`--signal=USR1@90`).
        """
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.signum = signal.Signals[signal_name]
        self.requested = False  # set by the signal handler
        self.signal_time: float | None = None
        self.checkpoint: Path | None = None  # written on request
        self._previous_handler = None
        self._last_step: int | None = None

    def _on_signal(self, signum, frame) -> None:
        # only flags: a handler runs between two bytecodes of whatever the process was doing
        self.requested = True
        self.signal_time = time.monotonic()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self._previous_handler = signal.signal(self.signum, self._on_signal)
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "checkpoints"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        if trainer.ckpt_path is not None:
            age = process_age_s()
            if age is not None:
                rank_zero_info(f"[requeue] resumed from {trainer.ckpt_path}: training starts {age:.1f} s after the process")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self._last_step:
            return  # inside an accumulation window: its gradients are in no checkpoint, wait for the step
        self._last_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.checkpoint = self.dirpath / REQUEUE_CHECKPOINT
        started = time.monotonic()
        trainer.save_checkpoint(self.checkpoint)
        done = time.monotonic()
        since_signal = f", {done - self.signal_time:.1f} s after the signal" if self.signal_time is not None else ""
        rank_zero_info(f"[requeue] step {trainer.global_step}: {self.checkpoint} written in {done - started:.1f} s{since_signal}")
        trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._previous_handler is not None:
            signal.signal(self.signum, self._previous_handler)
            self._previous_handler = None
        if self.checkpoint is None or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:  # flushed before SLURM's requeue signals this process
            logger.finalize("finished")
        # ModelCheckpoint(save_last=True) wrote last.ckpt after requeue.ckpt, at the end of the stopped
        # epoch and as if that epoch were complete: requeue.ckpt must stay the newest, the one resumed
        os.utime(self.checkpoint)
        requeue_slurm_job()


def requeue_slurm_job() -> bool:
    """`scontrol requeue` this job (array task included); False, logged, outside SLURM or on failure."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if job is None:
        log.info("[requeue] not a SLURM job: checkpointed and stopped; run the same command again to resume")
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("[requeue] scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
        return False
    log.info("[requeue] job %s requeued", job)
    return True


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return None
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
