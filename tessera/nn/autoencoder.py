"""
The convolutional encoder and decoder of the VQ-GAN image tokenizer (the quantizer lives apart).

References:
1) Taming Transformers for High-Resolution Image Synthesis (VQGAN), Esser, Rombach & Ommer 2021:
https://arxiv.org/abs/2012.09841
https://github.com/CompVis/taming-transformers/blob/master/taming/modules/diffusionmodules/model.py
2) Denoising Diffusion Probabilistic Models, Ho et al. 2020, whose U-Net blocks taming reuses:
https://github.com/hojonathanho/diffusion

The layout is taming's: conv_in, then one level per entry of `ch_mult` (res blocks, optional
attention, a stride-2 downsample between levels), a middle res-attn-res block at the lowest
resolution, then GroupNorm, SiLU and conv_out. The decoder mirrors it with one more res block per
level and nearest-neighbour upsampling. PyTorch default init, as taming.

`encoder: "patch"` swaps taming's encoder for `PatchEncoder`: each latent a function of its own
f x f pixels alone. Taming's receptive field, GroupNorm statistics and attention span the image,
so the id of a plain patch changes with whatever else the image holds, and a prior has to learn
that noise; on flat-coloured synthetic scenes every plain patch gets one and the same id instead.
The decoder is taming's either way: it reads each id in its neighbours' context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


ENCODERS = ("taming", "patch")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of `channels` below 32 for thin test nets."""
    num_groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(num_groups, channels, eps=1e-6)  # taming's eps


@dataclass
class AutoencoderConfig:
    """Architecture shared by the encoder and the decoder. Defaults: taming's f16 VQGAN at 256 px."""

    in_channels: int = 3
    """Image channels (the decoder outputs the same number)."""
    ch: int = 128
    """Base channel count; level i has `ch * ch_mult[i]` channels."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Channel multiplier per level; n levels downsample by 2 ** (n - 1): 4 levels f8, 5 f16, 6 f32."""
    num_res_blocks: int = 2
    """Res blocks per encoder level (the decoder has one more per level, as taming)."""
    attn_at_lowest: bool = True
    """Self-attention after every res block of the lowest-resolution level, whatever the image size
    (taming's f16 config puts it at 16 px of 256, i.e. the lowest level)."""
    attn_resolutions: tuple[int, ...] = ()
    """Further feature-map sizes (in pixels, for `image_size`) whose levels get attention too."""
    z_channels: int = 256
    """Channels of the latent grid handed to the quantizer."""
    dropout: float = 0.0
    """Dropout inside every res block."""
    image_size: int = 256
    """Training image size; must be divisible by the downsampling factor."""
    encoder: Literal["taming", "patch"] = "taming"
    """"taming": the encoder mirroring the decoder. "patch": `PatchEncoder`, whose every latent
    depends on its own f x f pixels only (width ch * ch_mult[-1], num_res_blocks + 2 blocks)."""

    def __post_init__(self) -> None:
        # YAML and the CLI hand over lists
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        if not self.ch_mult:
            raise ValueError("ch_mult needs at least one level")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {list(ENCODERS)}, got {self.encoder!r}")
        if self.image_size % self.downsample_factor != 0:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by the downsampling factor "
                f"{self.downsample_factor} (f{self.downsample_factor}: ch_mult has {len(self.ch_mult)} levels)"
            )

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent position along each side: 2 ** (levels - 1)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the latent grid for `image_size` images (16 for f16 at 256 px)."""
        return self.image_size // self.downsample_factor

    def has_attention(self, level: int) -> bool:
        """Whether the res blocks of `level` (0 = full resolution) are followed by attention."""
        lowest = level == len(self.ch_mult) - 1
        return (self.attn_at_lowest and lowest) or self.image_size // 2**level in self.attn_resolutions


class ResnetBlock(nn.Module):
    """norm-SiLU-conv3x3 twice, with a 1x1 conv on the shortcut when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)  # taming's q, k, v 1x1 convs, fused
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W)
        # (3, B, 1, HW, C) laid out contiguously: SDPA's fused kernels want 4-D (B, heads, T, C)
        # inputs with a unit-stride last dimension; a strided or 3-D one falls back to the math path
        qkv = qkv.permute(1, 0, 2, 4, 3).contiguous()
        q, k, v = qkv.unbind(dim=0)  # each (B, 1, HW, C): one head of width C, scaled by C ** -0.5
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 conv3x3 that halves H and W exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # taming pads right and bottom only, so the 3x3 windows start on even pixels
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3 (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


def _level(in_channels: int, out_channels: int, num_blocks: int, attention: bool, dropout: float) -> list[nn.Module]:
    """`num_blocks` res blocks, each followed by attention when asked."""
    layers: list[nn.Module] = []
    for _ in range(num_blocks):
        layers.append(ResnetBlock(in_channels, out_channels, dropout))
        if attention:
            layers.append(AttnBlock(out_channels))
        in_channels = out_channels
    return layers


def _mid_block(channels: int, dropout: float) -> nn.Sequential:
    """res-attn-res at the lowest resolution, where attention over all positions is cheap."""
    return nn.Sequential(
        ResnetBlock(channels, channels, dropout), AttnBlock(channels), ResnetBlock(channels, channels, dropout)
    )


def check_divisible(images: torch.Tensor, config: AutoencoderConfig) -> None:
    f, H, W = config.downsample_factor, *images.shape[-2:]
    if H % f or W % f:
        raise ValueError(
            f"image size {H}x{W} is not divisible by the encoder's downsampling factor {f} "
            f"(f{f}: ch_mult has {len(config.ch_mult)} levels); resize or crop to a multiple of {f}"
        )


class Encoder(nn.Module):
    """(B, in_channels, H, W) images in [-1, 1] -> (B, z_channels, H/f, W/f) latents."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        in_channels = config.ch
        for level, width in enumerate(widths):
            layers = _level(in_channels, width, config.num_res_blocks, config.has_attention(level), config.dropout)
            if level != len(widths) - 1:
                layers.append(Downsample(width))
            self.down.append(nn.Sequential(*layers))
            in_channels = width
        self.mid = _mid_block(in_channels, config.dropout)
        self.norm_out = group_norm(in_channels)
        self.conv_out = nn.Conv2d(in_channels, config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(x, self.config)
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, ch * ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, H/f, W/f)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each position of a (B, C, H, W) map: no statistics across positions."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, H, W)


class PointwiseBlock(nn.Module):
    """A residual MLP applied at every position on its own: norm, 1x1 conv to 2C, SiLU, 1x1 conv back."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = ChannelNorm(channels)
        self.fc = nn.Conv2d(channels, 2 * channels, kernel_size=1)
        self.proj = nn.Conv2d(2 * channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.silu(self.fc(self.norm(x))))


class PatchEncoder(nn.Module):
    """(B, in_channels, H, W) images -> (B, z_channels, H/f, W/f) latents, each from its f x f patch alone:
    a stride-f patch embedding, then pointwise blocks (ViT's patchify without attention)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        f = config.downsample_factor
        width = config.ch * config.ch_mult[-1]
        self.patchify = nn.Conv2d(config.in_channels, width, kernel_size=f, stride=f)
        self.blocks = nn.Sequential(*(PointwiseBlock(width) for _ in range(config.num_res_blocks + 2)))
        self.norm_out = ChannelNorm(width)
        self.conv_out = nn.Conv2d(width, config.z_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(x, self.config)
        h = self.blocks(self.patchify(x))  # (B, width, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, H/f, W/f)


def build_encoder(config: AutoencoderConfig) -> nn.Module:
    return PatchEncoder(config) if config.encoder == "patch" else Encoder(config)


class Decoder(nn.Module):
    """(B, z_channels, h, w) latents -> (B, in_channels, h*f, w*f) images (unbounded; ~[-1, 1])."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        widths = [config.ch * m for m in config.ch_mult]
        in_channels = widths[-1]
        self.conv_in = nn.Conv2d(config.z_channels, in_channels, kernel_size=3, padding=1)
        self.mid = _mid_block(in_channels, config.dropout)
        self.up = nn.ModuleList()
        # lowest resolution first; one more res block per level than the encoder, as taming
        for level in reversed(range(len(widths))):
            layers = _level(
                in_channels, widths[level], config.num_res_blocks + 1, config.has_attention(level), config.dropout
            )
            if level != 0:
                layers.append(Upsample(widths[level]))
            self.up.append(nn.Sequential(*layers))
            in_channels = widths[level]
        self.norm_out = group_norm(in_channels)
        self.conv_out = nn.Conv2d(in_channels, config.in_channels, kernel_size=3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the final conv: the adaptive GAN weight compares gradient norms on it."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, in_channels, h*f, w*f)
