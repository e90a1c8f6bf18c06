"""Pixel conventions shared by every stage: images are uint8 [0, 255] on disk and in loaders,
floats in [-1, 1] inside the networks."""

from __future__ import annotations

import torch


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] (clamped) -> uint8 [0, 255], rounded, on the same device."""
    return images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """(B,) peak signal-to-noise ratio in dB of images in [-1, 1], measured in [0, 1]."""
    mse = ((reconstructions.float().clamp(-1, 1) - images.float()) / 2).pow(2).mean(dim=(1, 2, 3))
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def to_subpixels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float [-1, 1] -> (B, H, W, 3) long in [0, 255]: what a pixel model reads and
    predicts, channels last so that raster order over (row, col, channel) is the memory order.
    Inverts `to_unit_range` exactly, so a loader's uint8 pixels come back unchanged."""
    return to_uint8(images).permute(0, 2, 3, 1).long()


def from_subpixels(subpixels: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) integers in [0, 255] -> (B, 3, H, W) float32 [-1, 1], as the networks take images."""
    return to_unit_range(subpixels.permute(0, 3, 1, 2))
