"""Skipping training steps whose loss is not finite, and stopping a run that keeps producing them.

A NaN or inf loss (a bad batch, an overflow) would write NaN into every weight at the next
optimizer step. Instead the step is skipped: its gradients are dropped (set to None, which
torch optimizers treat as "no update for this parameter": no moment or weight-decay change),
the optimizer step and the schedules still count it, so step numbers, schedules and checkpoints
stay in lockstep with the batches. All ranks decide together (one scalar all-reduce per step),
because one rank skipping while another steps would desynchronise DDP replicas.

`max_consecutive` skips in a row mean the run is broken, not unlucky: it stops with an error,
and since no non-finite update was ever applied, the newest checkpoint is good.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteLossGuard:
    """Collects losses of one optimizer step (`observe`, any number of micro-batches), then decides (`step_is_finite`)."""

    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0  # steps skipped in this run (restored from checkpoints)
        self._finite: torch.Tensor | None = None  # () bool: every loss observed since the last decision

    def observe(self, *losses: torch.Tensor) -> None:
        """Note the losses of a micro-batch; no host sync."""
        for loss in losses:
            finite = torch.isfinite(loss.detach()).all()
            self._finite = finite if self._finite is None else self._finite & finite

    def step_is_finite(self, step: int) -> bool:
        """Whether every loss observed on every rank since the last call was finite.

        Raises NonFiniteLossError after `max_consecutive` non-finite steps in a row."""
        if self._finite is None:
            raise RuntimeError("step_is_finite() before any observe(): no loss to judge")
        bad = (~self._finite).to(torch.int32)
        self._finite = None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        log.warning("step %d: non-finite loss on some rank; step skipped (%d in a row, %d in all)", step, self.consecutive, self.skipped)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} training steps in a row had a non-finite loss (the last at step {step}); "
                "stopping. No non-finite update was applied, so the newest checkpoint is usable: look for "
                "bad data, a too-high learning rate or an overflow (fp16) before resuming from it."
            )
        return False

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive, self.skipped = state["consecutive"], state["skipped"]


def drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Make the coming `optimizer.step()` a no-op for every parameter."""
    optimizer.zero_grad(set_to_none=True)
