"""
The PatchGAN discriminator of the VQ-GAN tokenizer: a map of real/fake logits, one per patch.

References:
1) Image-to-Image Translation with Conditional Adversarial Networks (pix2pix), Isola et al. 2017:
https://arxiv.org/abs/1611.07004
https://github.com/junyanz/pytorch-CycleGAN-and-pix2pix/blob/master/models/networks.py
2) taming-transformers' copy of it, NLayerDiscriminator, with its N(0, 0.02) init:
https://github.com/CompVis/taming-transformers/blob/master/taming/modules/discriminator/model.py

The GAN losses and the LeCAM regulariser are in tessera/nn/gan_losses.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch
import torch.nn as nn

from tessera.nn.autoencoder import group_norm

Norm = Literal["group", "batch", "none"]


def _norm_layer(norm: Norm, channels: int) -> nn.Module:
    if norm == "group":
        return group_norm(channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'group', 'batch' or 'none', got {norm!r}")


class PatchDiscriminator(nn.Module):
    """(B, in_channels, H, W) images -> (B, 1, H / 2**n_layers - 2, W / 2**n_layers - 2) logits.

    n_layers stride-2 convs (kernel 4) with channels ndf, 2ndf, 4ndf, ... capped at 8ndf, then a
    stride-1 conv and a 1-channel stride-1 conv: with n_layers=3 each logit sees a 70x70 patch.

    norm: "group" (the default) normalises each image alone: the same on one GPU as on many, and
    no running statistics. "batch" is taming's (and LlamaGen's and Open-MAGVIT2's) BatchNorm: in
    training mode each call is normalised with its own batch's statistics, and taming calls D on
    all-real and all-fake batches apart; the running statistics serve eval mode only. Under
    several processes convert it to SyncBatchNorm (VQGAN does), or each rank normalises its own
    few images. `running_stats_frozen` lets the generator's step call D as D trains without moving
    its running statistics.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: Norm = "group"):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        use_bias = norm == "none"  # a norm layer right after the conv makes its bias redundant
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),  # no norm on the image layer
            nn.LeakyReLU(0.2),
        ]
        channels = ndf
        for n in range(1, n_layers + 1):
            out_channels = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last of these keeps the resolution
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=4, stride=stride, padding=1, bias=use_bias),
                _norm_layer(norm, out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, H', W')

    @contextmanager
    def running_stats_frozen(self) -> Iterator[None]:
        """Inside, BatchNorm layers in training mode still normalise with the batch's statistics but
        leave their running statistics (and batch count) as they are; other norms are unaffected."""
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        for norm in norms:
            norm.track_running_stats = False  # in training mode: batch statistics, no running update
        try:
            yield
        finally:
            for norm in norms:
                norm.track_running_stats = True


def _init_weights(module: nn.Module) -> None:
    """taming's weights_init: conv weights N(0, 0.02), norm scales N(1, 0.02) and shifts 0; conv
    biases keep PyTorch's default."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
