"""
The fine stage of multi-scale tokens: a light Transformer that draws the fine id map (2h, 2w) of a
`MultiScaleTokenizer` from its coarse map (h, w), every fine position in one parallel pass.

    coarse ids (B, h, w)
      -> each fine position (2h x 2w) takes its parent's coarse embedding + its own row and column
      -> n_layer pre-norm Blocks (tessera/nn/transformer.py), attention local: a fine position
         attends to the fine positions within `window` of it (Chebyshev distance)
      -> norm, head -> logits (B, 2h, 2w, fine_vocab_size) -> argmax or a seeded draw per position

Receptive field: one layer moves information `window` fine positions, so the logits at fine
position p depend on exactly the coarse tokens whose 2x2 children lie within n_layer * window of
p (`reach`); changing any other coarse token leaves them as they were (tests pin this).

Choices:
- Parallel, not autoregressive: the fine residual is detail the coarse map already places (the
  prior has drawn the composition), so its ids are far less uncertain than the coarse ones, and
  one pass costs one forward over 4hw positions instead of 4hw KV-cached steps (on the shapes
  set 6.6% of an image's sampling time, BENCHMARKS.md). The positions are drawn independently
  given the coarse map, so a draw adds uncorrelated noise; `FineTransformer.generate` therefore
  takes the most likely id by default (0.5 dB better than top-8 draws there).
- Local attention: the fine residual corrects the neighbourhood of its parent, and a bounded reach
  keeps the cost linear in the image's area at any resolution; the mask is a dense (T, T) boolean
  one, which at 32x32 fine positions is 1M entries, small next to the activations.
- Caption-free: the coarse map already carries what the caption asked for; the fine stage learns
  how coarse codes look in detail, which is the tokenizer's business, not the prompt's.

References:
1) Generating Diverse High-Fidelity Images with VQ-VAE-2, Razavi et al. 2019:
   https://arxiv.org/abs/1906.00446 (a bottom-level prior conditioned on the top-level map)
2) Image Transformer, Parmar et al. 2018: https://arxiv.org/abs/1802.05751 (local 2D attention)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from tessera.nn.multiscale_tokenizer import SCALE
from tessera.nn.transformer import Block, TransformerConfig, _cross_entropy, _round_up, norm_layer
from tessera.sampling import SamplingConfig, filter_logits


@dataclass
class FineStageConfig:
    """Shape of the fine stage. Defaults: a 16x16 coarse map of 16,384 codes to a 32x32 fine map."""

    coarse_vocab_size: int = 16384
    """The tokenizer's coarse codebook size."""
    fine_vocab_size: int = 16384
    """The tokenizer's fine codebook size."""
    coarse_grid: int = 16
    """Side of the coarse map; the fine map's is twice it."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 8
    """Attention heads; must divide n_embd."""
    n_embd: int = 512
    """Width of the residual stream."""
    window: int = 2
    """Fine positions each layer's attention reaches along each axis (a (2 window + 1)^2 square)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    bias: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("coarse_vocab_size", "fine_vocab_size", "coarse_grid", "n_layer", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.block_config()  # checks the blocks' shape (heads dividing the width, norm, mlp, dropout)

    @property
    def fine_grid(self) -> int:
        return SCALE * self.coarse_grid

    @property
    def reach(self) -> int:
        """Fine positions, along each axis, that information travels through all the layers."""
        return self.n_layer * self.window

    def block_config(self) -> TransformerConfig:
        """The prior's block settings at this width (its vocabularies and grid are unused by a Block)."""
        return TransformerConfig(
            n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, norm=self.norm, mlp=self.mlp,
            bias=self.bias, dropout=self.dropout,
        )


def local_attention_mask(grid: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """(grid^2, grid^2) bool, True where row-major position i may attend to j: both within `window`
    of each other along rows and along columns."""
    index = torch.arange(grid * grid, device=device)
    rows, cols = index // grid, index % grid
    near_rows = (rows[:, None] - rows[None, :]).abs() <= window
    near_cols = (cols[:, None] - cols[None, :]).abs() <= window
    return near_rows & near_cols


class FineTransformer(nn.Module):
    """Coarse ids (B, h, w) -> fine logits (B, 2h, 2w, padded fine vocabulary), one parallel pass."""

    def __init__(self, config: FineStageConfig):
        super().__init__()
        self.config = config
        d = config.n_embd
        self.coarse_embed = nn.Embedding(config.coarse_vocab_size, d)
        self.fine_row = nn.Embedding(config.fine_grid, d)
        self.fine_col = nn.Embedding(config.fine_grid, d)
        self.drop = nn.Dropout(config.dropout)
        block_config = config.block_config()
        self.blocks = nn.ModuleList([Block(block_config) for _ in range(config.n_layer)])
        self.ln_f = norm_layer(block_config)
        self.head = nn.Linear(d, _round_up(config.fine_vocab_size, 64), bias=False)  # padded for efficient matmuls
        # a buffer, not a per-call computation: the same mask serves every layer and every batch
        self.register_buffer("attn_mask", local_attention_mask(config.fine_grid, config.window), persistent=False)

        # GPT-2's init, as the prior's: N(0, 0.02), the residual projections scaled by 1 / sqrt(2 n_layer)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _check_coarse(self, coarse_ids: torch.Tensor) -> None:
        grid = self.config.coarse_grid
        if coarse_ids.dim() != 3 or coarse_ids.shape[1:] != (grid, grid):
            raise ValueError(f"coarse_ids must be (B, {grid}, {grid}), got {tuple(coarse_ids.shape)}")

    def forward(self, coarse_ids: torch.Tensor) -> torch.Tensor:
        """coarse_ids (B, h, w) -> logits (B, 2h, 2w, padded fine vocab), every fine position at once."""
        self._check_coarse(coarse_ids)
        B, F = coarse_ids.size(0), self.config.fine_grid
        parents = coarse_ids.repeat_interleave(SCALE, dim=1).repeat_interleave(SCALE, dim=2)  # (B, 2h, 2w)
        positions = torch.arange(F, device=coarse_ids.device)
        x = self.coarse_embed(parents) + self.fine_row(positions)[:, None] + self.fine_col(positions)[None, :]  # (B, F, F, C)
        x = self.drop(x.view(B, F * F, -1))  # (B, F*F, C) row-major
        for block in self.blocks:
            x = block(x, attn_mask=self.attn_mask)
        return self.head(self.ln_f(x)).view(B, F, F, -1)  # (B, F, F, V)

    def loss(self, coarse_ids: torch.Tensor, fine_ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (fp32) of the fine ids (B, 2h, 2w) given their coarse map."""
        F = self.config.fine_grid
        if fine_ids.shape != (coarse_ids.size(0), F, F):
            raise ValueError(f"fine_ids must be ({coarse_ids.size(0)}, {F}, {F}), got {tuple(fine_ids.shape)}")
        return _cross_entropy(self(coarse_ids), fine_ids, self.config.fine_vocab_size)

    @torch.inference_mode()
    def generate(
        self, coarse_ids: torch.Tensor, sampling: SamplingConfig | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Fine ids (B, 2h, 2w) for coarse_ids (B, h, w): the most likely id at every position, or
        with `sampling` (temperature, top-k, top-p; no guidance) one seeded draw per position."""
        if sampling is not None and sampling.cfg_scale != 1.0:
            raise ValueError("the fine stage has no caption to guide with: its sampling needs cfg_scale 1")
        was_training = self.training
        self.eval()
        try:
            logits = self(coarse_ids)[..., : self.config.fine_vocab_size].float()  # (B, F, F, V)
        finally:
            self.train(was_training)
        if sampling is None:
            return logits.argmax(-1)
        probs = filter_logits(logits.flatten(0, 2), sampling).softmax(-1)  # (B*F*F, V)
        return torch.multinomial(probs, num_samples=1, generator=generator).view(logits.shape[:-1])
