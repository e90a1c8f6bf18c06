"""
Finite scalar quantization (FSQ): every channel of z is bounded and rounded to a few integer levels.

Channel k of z (B, K, H, W) is squashed by tanh into an interval just wider than levels[k] - 1 and
rounded, so it takes one of levels[k] integer values; the implicit codebook is their product grid,
prod(levels) codes, with nothing learned and no auxiliary loss: every code stays reachable, so the
codebook cannot collapse. z_q is the grid point scaled to [-1, 1] (an even level count, having no
middle level, gets one more level below 0 than above, e.g. {-4, ..., 3} / 4 for 8 levels).

An id is the grid point's digits (levels 0 .. levels[k] - 1) in mixed radix, channel 0 the least
significant digit, as the paper's code orders them.

References:
1) Finite Scalar Quantization: VQ-VAE Made Simple, Mentzer et al. 2023:
https://arxiv.org/abs/2309.15505 (the bound, its half-width offset for even level counts, and
levels (8, 8, 8, 5, 5, 5) for a 64,000-code codebook: our default)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tessera.nn.quantizer_base import CodebookUsage, Quantizer, QuantizerOutput
from tessera.precision import fp32_math


class FiniteScalarQuantizer(Quantizer):
    """z (B, len(levels), H, W) -> each channel rounded to one of `levels[k]` values in [-1, 1]."""

    def __init__(self, levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5), usage_window: int = 65536):
        """
        Args:
            levels: number of levels of each channel; z has len(levels) channels and the codebook
                prod(levels) codes.
            usage_window: ids in the usage and perplexity window (see `CodebookUsage`).
        """
        super().__init__()
        self.levels = tuple(levels)  # YAML and the CLI hand over lists
        if not self.levels or min(self.levels) < 2:
            raise ValueError(f"levels must be a non-empty sequence of counts >= 2, got {levels}")
        self.usage_window = usage_window
        # derived constants, moved with the module but left out of the state dict
        radix = torch.tensor(self.levels)
        self.register_buffer("radix", radix, persistent=False)  # (K,)
        self.register_buffer("half_width", radix // 2, persistent=False)  # (K,) largest |level|: 4 of 8, 2 of 5
        place_values = torch.cumprod(radix, 0) // radix  # (K,) 1, l0, l0 l1, ...
        self.register_buffer("place_values", place_values, persistent=False)
        self.codebook_usage = CodebookUsage(self.codebook_size, usage_window)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def bound(self, z: Tensor) -> Tensor:
        """fp32 z (B, K, H, W) -> channel k in an open interval of length (levels[k] - 1)(1 + eps) centred
        on 0, or on -1/2 for even levels[k]: rounding gives exactly levels[k] integers, and z = 0 gives 0."""
        eps = 1e-3  # the paper's; here it widens the interval, so atanh below stays finite for 2 levels
        half_length = (self.radix - 1) * (1 + eps) / 2  # (K,)
        offset = (self.radix % 2 == 0).float() / 2  # (K,) 0.5 for even level counts
        shift = torch.atanh(offset / half_length)  # (K,) bound(0) = 0 (the paper's code has tan, equal to 3rd order)
        view = (-1, 1, 1)
        return torch.tanh(z + shift.view(view)) * half_length.view(view) - offset.view(view)

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(
                f"FiniteScalarQuantizer(levels={self.levels}) takes z (B, {self.dim}, H, W), got {tuple(z.shape)}"
            )
        with fp32_math(z.device.type):
            bounded = self.bound(z.float())  # (B, K, H, W)
            # exactly the rounded levels, and the gradient goes straight through the rounding
            rounded = bounded.round() + (bounded - bounded.detach())  # (B, K, H, W) integers in value
            z_q = rounded / self.half_width.view(-1, 1, 1)  # (B, K, H, W) in [-1, 1]
            digits = rounded.detach().long() + self.half_width.view(-1, 1, 1)  # (B, K, H, W) in [0, levels[k])
            ids = (digits * self.place_values.view(-1, 1, 1)).sum(1)  # (B, H, W)
            loss = z.new_zeros((), dtype=torch.float32)
        return QuantizerOutput(z_q.to(z.dtype), ids, loss, {}, self.codebook_usage(ids))

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        digits = ids[:, None] // self.place_values.view(-1, 1, 1) % self.radix.view(-1, 1, 1)  # (B, K, H, W)
        return (digits - self.half_width.view(-1, 1, 1)).float() / self.half_width.view(-1, 1, 1)
