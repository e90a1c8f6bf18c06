"""Learning-rate schedules as a multiplier of the peak rate at each training step.

A pure function of the step, so a resumed run (or one whose schedule was changed on resume)
computes the same rate from the step alone.
"""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int | None, min_lr_ratio: float) -> float:
    """Linear warm-up from 1/warmup_steps to 1 over `warmup_steps`, then 1 ("constant") or a
    cosine from 1 down to `min_lr_ratio` at `total_steps` ("cosine"), flat after it."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_end(schedule: str, decay_steps: int | None, max_steps: int) -> int | None:
    """The step a cosine schedule reaches its floor: `decay_steps` when set, else Trainer(max_steps).

    Set apart from max_steps (nanoGPT's lr_decay_iters), a schedule can be kept while training stops
    earlier or later: a shorter run then follows the longer run's rates step for step."""
    if schedule != "cosine":
        return None
    if decay_steps is not None:
        if decay_steps < 1:
            raise ValueError(f"optimizer.decay_steps must be at least 1, got {decay_steps}")
        return decay_steps
    if max_steps < 0:
        raise ValueError(
            "optimizer.schedule 'cosine' needs optimizer.decay_steps or Trainer(max_steps=...): the step it decays to"
        )
    return max_steps
