"""The process's global random streams, captured and restored, so a resumed run draws what the
uninterrupted one drew: dropout masks, dead-code restarts, anything sampled with torch, numpy or
Python's `random` without a generator of its own.

Lightning checkpoints none of them. The states are plain tensors, ints and lists, so a checkpoint
that holds them still loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_states() -> dict:
    """This process's torch (CPU and, once CUDA is in use, the current device), numpy and Python RNG states."""
    version, keys, gauss = random.getstate()
    kind, mt_keys, position, has_gauss, cached_gauss = np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "torch": torch.get_rng_state(),
        # the current device only: asking for every device would start a CUDA context on each
        "cuda": torch.cuda.get_rng_state() if cuda else None,
        "numpy": {"kind": kind, "keys": torch.from_numpy(mt_keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached_gauss": cached_gauss},
        "python": {"version": version, "keys": list(keys), "gauss": gauss},
    }


def set_rng_states(states: dict) -> None:
    """Restore what `rng_states` captured (the CUDA state only where this process uses CUDA too)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gauss"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["keys"]), python["gauss"]))
