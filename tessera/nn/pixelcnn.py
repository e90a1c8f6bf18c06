"""
A gated PixelCNN over raw subpixels, optionally conditioned on a caption: the likelihood of an
image as the product of each subpixel's distribution given the ones before it in raster order over
(row, col, channel) (tessera/nn/subpixels.py).

    vertical stack    (k//2 + 1) x k convolutions: the output at row r sees rows r - k//2 .. r, any column
                      nearby; shifted down one row before it feeds the horizontal stack, so that
                      stack only ever hears of rows above its own
    horizontal stack  1 x (k//2 + 1) convolutions: columns c - k//2 .. c of its own row; at the
                      current pixel (the kernel's last tap) channel groups are masked: R's features
                      see none of the pixel (mask A, first layer) or R's (mask B, after), G's also R's,
                      B's also G's; a residual connection from layer 2 on
    every layer       tanh(W_f * x + V_f h) * sigmoid(W_g * x + V_g h), h the caption's vector
    head              ReLU, masked 1x1, ReLU, masked 1x1 -> 3 x 256 logits per pixel (channel c's
                      from groups <= c), or the 10 K parameters of a discretised logistic mixture

Two stacks instead of one masked k x k convolution: the masked convolution's receptive field has a
blind spot, a growing wedge of pixels up and right that no stack of it ever sees; the vertical
stack sees them. With a logistic mixture output the network is causal by pixel (one channel group)
and the mixture's linear coefficients carry the dependence between a pixel's channels, as PixelCNN++.

Sampling and coding step through the subpixels with one forward per subpixel (there is no cache),
on the rows that can reach the current one only: `rows_above` rows above it, so a step's cost does
not grow with the row it is in.

References:
1) Conditional Image Generation with PixelCNN Decoders (gated PixelCNN), van den Oord et al. 2016:
   https://arxiv.org/abs/1606.05328 (the two stacks, the gate, the conditioning bias)
2) Pixel Recurrent Neural Networks, van den Oord et al. 2016: https://arxiv.org/abs/1601.06759
   (masks A and B over the R, G, B channel groups)
3) PixelCNN++, Salimans et al. 2017: https://arxiv.org/abs/1701.05517 (the mixture output,
   tessera/nn/logistic_mixture.py; the constant channel of ones that tells padding from black)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.flops import matmul_flops
from tessera.nn.logistic_mixture import mixture_log_likelihood, mixture_params, mixture_subpixel_log_probs
from tessera.nn.subpixels import SUBPIXEL_VALUES, SubpixelSteps, check_subpixels

ALWAYS_VISIBLE = -1  # the channel group of the constant ones channel: no information, seen by every group


@dataclass
class PixelCNNConfig:
    """Shape of a gated PixelCNN. Defaults: a small model for 32 px images and 24 CLIP BPE tokens."""

    text_vocab_size: int = 49408
    """Caption vocabulary: CLIP's BPE."""
    text_length: int = 24
    """Caption tokens, start and end of text and padding included."""
    image_grid: int = 32
    """Side of the image in pixels."""
    n_layer: int = 6
    """Gated layers (each a vertical and a horizontal convolution)."""
    n_embd: int = 60
    """Feature maps of each stack (its width, as a transformer's n_embd); with the softmax output a
    multiple of 3 (R, G and B groups)."""
    kernel_size: int = 3
    """Odd width k of the vertical stack's (k//2 + 1) x k kernels; the horizontal's are 1 x (k//2 + 1)."""
    output: Literal["softmax", "logistic_mixture"] = "softmax"
    """Per subpixel a 256-way softmax, or a discretised logistic mixture per pixel (PixelCNN++)."""
    n_mixtures: int = 5
    """Components of the logistic mixture (PixelCNN++: 10)."""
    conditional: bool = True
    """Condition on the caption: a per-layer bias from a caption vector; False models images alone."""
    text_embd: int = 32
    """Width of each caption token's embedding, before the caption is flattened to one vector."""
    cond_dim: int = 128
    """Width of the caption vector."""

    def __post_init__(self) -> None:
        for name in ("text_vocab_size", "text_length", "image_grid", "n_layer", "n_embd", "n_mixtures", "text_embd", "cond_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {self.kernel_size}")
        if self.output not in ("softmax", "logistic_mixture"):
            raise ValueError(f"output must be 'softmax' or 'logistic_mixture', got {self.output!r}")
        if self.output == "softmax" and self.n_embd % 3 != 0:
            raise ValueError(f"n_embd must be a multiple of 3 for the softmax output (R, G, B groups), got {self.n_embd}")

    @property
    def image_vocab_size(self) -> int:
        """Values of a subpixel (what the sampler draws from)."""
        return SUBPIXEL_VALUES

    @property
    def image_length(self) -> int:
        """Subpixels per image."""
        return 3 * self.image_grid**2

    @property
    def sequence_length(self) -> int:
        """What tokens/s counts per sample: its subpixels."""
        return self.image_length

    @property
    def channel_groups(self) -> int:
        """Causal groups within a pixel: R, G, B for the softmax; one for the mixture (causal by pixel)."""
        return 3 if self.output == "softmax" else 1


def groups_of(n_channels: int, groups: int) -> torch.Tensor:
    """(n_channels,) the group of each channel, split evenly in order: R's first, then G's, then B's."""
    return torch.arange(n_channels) * groups // n_channels


class MaskedConv2d(nn.Conv2d):
    """A 1 x width convolution along a row, the output at column c seeing columns c - width + 1 .. c
    (left padding only). At column c itself, the current pixel, input group gi reaches output group
    go only if gi < go (mask A) or gi <= go (mask B); every earlier column is seen whole."""

    def __init__(self, in_groups: torch.Tensor, out_groups: torch.Tensor, width: int, mask: Literal["A", "B"]):
        super().__init__(len(in_groups), len(out_groups), (1, width))
        allowed = in_groups[None, :] < out_groups[:, None] if mask == "A" else in_groups[None, :] <= out_groups[:, None]
        weight_mask = torch.ones_like(self.weight)  # (out, in, 1, width)
        weight_mask[:, :, 0, -1] = allowed.float()
        self.register_buffer("mask", weight_mask, persistent=False)  # derived from the config: not in files

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.kernel_size[1] - 1, 0, 0, 0))
        return F.conv2d(x, self.weight * self.mask, self.bias)


def gate(x: torch.Tensor) -> torch.Tensor:
    """(B, 2C, H, W) -> tanh(first C) * sigmoid(last C): channel j of each half is in the same group."""
    f, g = x.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Moves feature maps down one row (zeros on top): row r then holds what row r - 1 saw."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


class GatedLayer(nn.Module):
    """One vertical and one horizontal gated convolution; the vertical feeds the horizontal, shifted."""

    def __init__(self, config: PixelCNNConfig, in_channels: int, in_groups: torch.Tensor, first: bool):
        super().__init__()
        C, k = config.n_embd, config.kernel_size
        groups = groups_of(C, config.channel_groups)
        both = torch.cat([groups, groups])  # the gate's two halves
        self.k = k
        self.vertical = nn.Conv2d(in_channels, 2 * C, (k // 2 + 1, k))
        self.vertical_to_horizontal = nn.Conv2d(2 * C, 2 * C, 1)  # rows above only: any channel to any
        self.horizontal = MaskedConv2d(in_groups, both, k // 2 + 1, "A" if first else "B")
        self.horizontal_out = MaskedConv2d(groups, groups, 1, "B")
        self.condition = nn.Linear(config.cond_dim, 4 * C) if config.conditional else None  # both stacks' biases
        self.residual = not first

    def forward(self, v: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """v, h (B, C_in, H, W), cond (B, cond_dim) or None -> the next v, h (B, C, H, W)."""
        pad = self.k // 2
        v_pre = self.vertical(F.pad(v, (pad, pad, pad, 0)))  # (B, 2C, H, W): rows r - k//2 .. r
        h_pre = self.horizontal(h) + self.vertical_to_horizontal(down_shift(v_pre))  # (B, 2C, H, W)
        if self.condition is not None:
            v_bias, h_bias = self.condition(cond)[:, :, None, None].chunk(2, dim=1)  # (B, 2C, 1, 1) each
            v_pre, h_pre = v_pre + v_bias, h_pre + h_bias
        h_out = self.horizontal_out(gate(h_pre))
        return gate(v_pre), h + h_out if self.residual else h_out


class PixelCNN(nn.Module):
    """Caption ids (B, text_length) and images as subpixels (B, H, W, 3) -> per-subpixel logits
    (B, H, W, 3, 256) (softmax) or per-pixel mixture parameters (B, H, W, 10 K)."""

    def __init__(self, config: PixelCNNConfig):
        super().__init__()
        self.config = config
        C, groups = config.n_embd, config.channel_groups
        if config.conditional:
            self.text_embed = nn.Embedding(config.text_vocab_size, config.text_embd)
            self.text_pos = nn.Embedding(config.text_length, config.text_embd)
            # flattened, not pooled: "a red circle above a blue square" is not its bag of words
            self.text_proj = nn.Linear(config.text_length * config.text_embd, config.cond_dim)
        # the input: R, G, B in groups 0, 1, 2 (all 0 for the mixture) and a channel of ones
        image_groups = torch.cat([groups_of(3, groups), torch.tensor([ALWAYS_VISIBLE])])
        hidden = groups_of(C, groups)
        self.blocks = nn.ModuleList(
            [GatedLayer(config, 4, image_groups, first=True)]
            + [GatedLayer(config, C, hidden, first=False) for _ in range(config.n_layer - 1)]
        )
        if config.output == "softmax":
            out_groups = torch.arange(3).repeat_interleave(SUBPIXEL_VALUES)  # channel c's 256 logits in group c
        else:
            out_groups = torch.zeros(mixture_params(config.n_mixtures), dtype=torch.long)
        self.head = nn.Sequential(
            nn.ReLU(), MaskedConv2d(hidden, hidden, 1, "B"), nn.ReLU(), MaskedConv2d(hidden, out_groups, 1, "B")
        )

    # --- sizes -------------------------------------------------------------------------------

    @property
    def rows_above(self) -> int:
        """Rows above a pixel that reach its distribution: k//2 per vertical layer, plus the shift."""
        return self.config.n_layer * (self.config.kernel_size // 2) + 1

    def flops_per_sequence(self) -> int:
        """Training FLOPs of one image (tessera/flops.py): every convolution's weights at every pixel,
        the caption's projection once."""
        convs = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Conv2d))
        flops = matmul_flops(convs, self.config.image_grid**2)
        if self.config.conditional:
            linears = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
            flops += matmul_flops(linears, 1)
        return flops

    def flops_per_token(self) -> float:
        """Per subpixel, what tokens/s counts."""
        return self.flops_per_sequence() / self.config.sequence_length

    # --- the network ---------------------------------------------------------------------------

    def caption(self, text_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, text_length) -> the caption vector (B, cond_dim), None for an unconditional model."""
        if not self.config.conditional:
            return None
        if text_ids.dim() != 2 or text_ids.size(1) != self.config.text_length:
            raise ValueError(f"text_ids must be (B, text_length={self.config.text_length}), got {tuple(text_ids.shape)}")
        positions = torch.arange(text_ids.size(1), device=text_ids.device)
        x = self.text_embed(text_ids) + self.text_pos(positions)  # (B, T, E)
        return F.gelu(self.text_proj(x.flatten(1)))  # (B, cond_dim)

    def features(self, subpixels: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Subpixels (B, h, W, 3) long (any number of rows h) -> the horizontal stack's last features
        (B, C, h, W); those of pixel (r, c) depend on the subpixels before it only."""
        x = subpixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, h, W) in [-1, 1]
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (B, 4, h, W): ones tell padding from black
        v = h = x
        for block in self.blocks:
            v, h = block(v, h, cond)
        return h

    def outputs(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, C, h, W) -> logits (B, h, W, 3, 256) or mixture parameters (B, h, W, 10 K)."""
        out = self.head(features).permute(0, 2, 3, 1)  # (B, h, W, out)
        return out.unflatten(-1, (3, SUBPIXEL_VALUES)) if self.config.output == "softmax" else out

    def forward(self, text_ids: torch.Tensor, subpixels: torch.Tensor) -> torch.Tensor:
        """`outputs` for whole images (B, H, W, 3), teacher forced."""
        subpixels = check_subpixels(subpixels, self.config.image_grid)
        return self.outputs(self.features(subpixels, self.caption(text_ids)))

    # --- likelihood ---------------------------------------------------------------------------

    def loss(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        image_ids: torch.Tensor,
        text_loss_weight: float = 0.0,
        image_loss_weight: float = 1.0,
        image_targets: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """TextImageTransformer.loss's contract: {"loss", "image_loss"}, the mean negative
        log-likelihood per subpixel in nats. The caption is a condition, never a target: its weight
        must be 0; text_mask is checked only (the caption is its ids, padding included)."""
        if text_loss_weight != 0:
            raise ValueError(f"a PixelCNN conditions on the caption and does not model it: text_loss_weight must be 0, got {text_loss_weight}")
        if image_targets is not None:
            raise ValueError("a PixelCNN's targets are the subpixels themselves: no image_targets")
        if text_mask.shape != text_ids.shape:
            raise ValueError(f"text_mask {tuple(text_mask.shape)} must match text_ids {tuple(text_ids.shape)}")
        subpixels = check_subpixels(image_ids, self.config.image_grid)
        return self.head_losses(self.features(subpixels, self.caption(text_ids)), subpixels)

    def head_losses(self, features: torch.Tensor, subpixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The head and its fp32 negative log-likelihood: one graph for torch.compile, as the prior's."""
        out = self.outputs(features)
        if self.config.output == "softmax":
            nll = F.cross_entropy(out.float().reshape(-1, SUBPIXEL_VALUES), subpixels.reshape(-1))
        else:
            nll = -mixture_log_likelihood(out, subpixels, self.config.n_mixtures).mean() / 3
        return {"loss": nll, "image_loss": nll}

    def pixel_log_probs(self, outputs: torch.Tensor, subpixels: torch.Tensor) -> torch.Tensor:
        """`outputs` (..., 3, 256) or (..., 10 K) and the pixels' values (..., 3) -> (..., 3, 256)
        log-probabilities of each channel given the channels and pixels before it."""
        if self.config.output == "softmax":
            return outputs.float().log_softmax(dim=-1)
        return mixture_subpixel_log_probs(outputs, subpixels, self.config.n_mixtures)

    @torch.no_grad()
    def subpixel_log_probs(self, images: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """Teacher forced, one pass: images (B, H, W, 3) in [0, 255] -> (B, H, W, 3, 256) fp32
        log-probabilities of every subpixel given those before it (tessera/nn/subpixels.py)."""
        subpixels = check_subpixels(images, self.config.image_grid)
        return self.pixel_log_probs(self(text_ids, subpixels), subpixels)

    def subpixel_steps(self, text_ids: torch.Tensor) -> PixelCNNSteps:
        """Step by step (tessera/nn/subpixels.py): one forward per subpixel, no cache."""
        return PixelCNNSteps(self, text_ids)


class PixelCNNSteps(SubpixelSteps):
    """Subpixel i's distribution from a forward over the rows that reach it (`rows_above` up to its
    own row, whole width), the head at its pixel only."""

    def __init__(self, network: PixelCNN, text_ids: torch.Tensor):
        device = next(network.parameters()).device
        super().__init__(text_ids.size(0), network.config.image_grid, device)
        self.network = network
        with torch.no_grad():
            self.cond = network.caption(text_ids.to(device))

    def _log_probs(self) -> torch.Tensor:
        pixel, channel = divmod(self.index, 3)
        row, col = divmod(pixel, self.network.config.image_grid)
        top = max(0, row - self.network.rows_above)
        image = self.image()
        features = self.network.features(image[:, top : row + 1], self.cond)  # (B, C, rows, W)
        outputs = self.network.outputs(features[:, :, -1:, col : col + 1])[:, 0, 0]  # (B, 3, 256) or (B, 10 K)
        return self.network.pixel_log_probs(outputs, image[:, row, col])[:, channel]  # (B, 256)
