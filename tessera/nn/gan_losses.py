"""
GAN losses for the VQ-GAN tokenizer, on the logits maps of tessera.nn.discriminator.PatchDiscriminator.

References:
1) taming-transformers' hinge_d_loss and vanilla_d_loss (both x0.5) and generator term -mean(D(x_hat)):
https://github.com/CompVis/taming-transformers/blob/master/taming/modules/losses/vqperceptual.py
2) Geometric GAN (hinge loss), Lim & Ye 2017: https://arxiv.org/abs/1705.02894
3) Generative Adversarial Nets (non-saturating loss), Goodfellow et al. 2014: https://arxiv.org/abs/1406.2661;
MAGVIT-v2 and Open-MAGVIT2 pair a non-saturating generator with a hinge discriminator:
https://github.com/TencentARC/Open-MAGVIT2/blob/main/taming/modules/losses/vqperceptual.py
4) Regularizing Generative Adversarial Networks under Limited Data (LeCAM), Tseng et al. 2021:
https://arxiv.org/abs/2104.03310
https://github.com/google/lecam

Discriminator losses: lower when real logits are high and fake logits low. Generator losses:
lower when fake logits are high. Any generator loss goes with any discriminator loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.nn.quantizer_base import all_reduce_sum_, world_size


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))): zero once real >= 1 and fake <= -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(softplus(-real)) + mean(softplus(fake))): binary cross-entropy on the logits."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean(fake), taming's generator term (it uses it with either discriminator loss)."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """mean(softplus(-fake)) = -log sigmoid(fake): strong gradients while D still wins."""
    return F.softplus(-logits_fake).mean()


class LeCAMRegularizer(nn.Module):
    """LeCAM penalty for the discriminator loss: keeps real and fake logits near the other side's EMA.

    penalty = mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2), to be added to the
    discriminator loss times a weight (Open-MAGVIT2 uses 0.05). The EMAs of the logits' means are
    buffers, so they travel in state_dict and a resumed run continues them exactly (Open-MAGVIT2
    keeps them outside the state and restarts them from zero on resume). They move only in
    training mode, by the mean logits of every rank's batch (all-reduced), so every rank holds the
    same anchors, DDP need not broadcast them, and a checkpoint from rank 0 holds the run's.
    """

    ema_real: torch.Tensor
    ema_fake: torch.Tensor

    def __init__(self, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        # fp32 scalars, starting at 0 as the reference does
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                # update first, then penalise against the updated anchors, as google/lecam does
                means = torch.stack([logits_real.float().mean(), logits_fake.float().mean()])
                means = all_reduce_sum_(means) / world_size()  # the global batch's means, on every rank
                for anchor, mean in zip((self.ema_real, self.ema_fake), means):
                    # a non-finite batch (a step about to be skipped) must not poison the anchor for good
                    anchor.copy_(torch.where(torch.isfinite(mean), anchor.lerp(mean, 1.0 - self.decay), anchor))
        return (
            F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
            + F.relu(self.ema_real - logits_fake.float()).pow(2).mean()
        )
