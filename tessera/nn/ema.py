"""
An exponential moving average of a model's weights, kept as a frozen copy of the model.

Validation and export use the average: it reconstructs better than the live weights of a GAN,
whose generator oscillates against the discriminator (ViT-VQGAN, MaskGIT and Open-MAGVIT2 all
evaluate an EMA). The copy is a submodule, so it moves with `.to()`, sits in the state dict and
resumes exactly; its parameters need no gradient, so DDP leaves them alone.

Buffers (codebook EMA statistics, usage windows) are copied, not averaged: they are statistics
of training, not weights.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA(nn.Module):
    """`ema.module` holds decay * ema + (1 - decay) * weights after each `update(model)`."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> EMA:
        """The average is only ever evaluated: stays in eval mode whatever the parent does."""
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged = list(self.module.parameters())
        live = list(model.parameters())
        torch._foreach_lerp_(averaged, [p.detach().to(a.dtype) for a, p in zip(averaged, live)], 1.0 - self.decay)
        for averaged_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            averaged_buffer.copy_(buffer)
