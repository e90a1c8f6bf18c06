"""
Coarse-to-fine multi-scale tokens: a coarse id map that stage 2's prior models, and a fine id map
of twice the resolution per side that a light transformer (tessera/nn/fine_transformer.py) draws
conditioned on the coarse one; the decoder renders their sum.

    images (B, 3, H, W)
      -> Encoder + quant_conv   z (B, dim, 2h, 2w)            the encoder's own factor: f/2
      -> 2x2 average pool       z_c (B, dim, h, w)            the coarse latent: f
      -> coarse quantizer       coarse ids (B, h, w), q_c
      -> nearest x2 upsample    up(q_c) (B, dim, 2h, 2w)
      -> fine quantizer of      r = z - up(q_c)               what the coarse map misses
                                fine ids (B, 2h, 2w), q_f
      -> up(q_c) + q_f -> post_quant_conv -> Decoder -> (B, 3, H, W)

Design:
- One encoder, two levels, residual across scales (VAR's multi-scale residual quantization with
  two scales, RQ-VAE's residual across depth): the fine map spends its codes only on what the
  coarse map lost, so a fine id means "this correction", not a second description of the image,
  and decoding the coarse map alone (the fine residual zero) still gives the image at the coarse
  level of detail. VQ-VAE-2's top and bottom maps instead encode separate features, and its bottom
  map alone decodes nothing.
- Average pooling down and nearest upsampling back: each coarse id is the mean of its own 2x2
  fine latents and reaches back exactly those four, so with the patch encoder a coarse id still
  depends on its own 2f x 2f pixels alone, and the fine residual of a position has one parent.
  (VAR upsamples bicubically through a learned conv; that spreads each coarse code over its
  neighbours, which the decoder's convolutions already do.)
- `fine_dropout`: in training, that share of the images decodes the coarse map alone (their fine
  residual zeroed), as SoundStream's quantizer dropout trains every prefix of its residual levels,
  so coarse-only decoding is something the decoder has learned, not an accident.
- The straight-through gradient is one identity for the sum (z_q = sg(up(q_c) + q_f) + z - sg(z)),
  as VAR's: the encoder gets the decoder's gradient once, not once per level; each level's own
  auxiliary loss (a VQ's commitment and codebook terms) pulls on its own input.

References:
1) Visual Autoregressive Modeling (VAR), Tian et al. 2024: https://arxiv.org/abs/2404.02905
   (multi-scale residual quantization: area-downsampled residuals, upsampled codes summed)
2) Generating Diverse High-Fidelity Images with VQ-VAE-2, Razavi et al. 2019:
   https://arxiv.org/abs/1906.00446 (a bottom map at twice the top map's resolution, its prior
   conditioned on the top map)
3) SoundStream, Zeghidour et al. 2021: https://arxiv.org/abs/2107.03312 (quantizer dropout)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tessera.nn.quantizer_base import Quantizer, QuantizerOutput, build_quantizer
from tessera.nn.residual_quantizer import ResidualQuantizer
from tessera.nn.vq_tokenizer import VQTokenizer
from tessera.precision import fp32_math

SCALE = 2  # fine positions per coarse position along each side


class MultiScaleIds(NamedTuple):
    """The two id maps of one batch of images."""

    coarse: Tensor
    """(B, h, w) long ids of the coarse quantizer: what the prior models."""
    fine: Tensor
    """(B, 2h, 2w) long ids of the fine quantizer: what the fine stage draws given `coarse`."""


def upsample(codes: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C, 2h, 2w): each coarse code over its own 2x2 fine positions."""
    return codes.repeat_interleave(SCALE, dim=2).repeat_interleave(SCALE, dim=3)


class MultiScaleQuantizer(Quantizer):
    """z (B, dim, 2h, 2w) -> coarse ids (B, h, w) of its 2x2 means and fine ids (B, 2h, 2w) of what
    the upsampled coarse codes miss; `QuantizerOutput.ids` is a `MultiScaleIds`.

    Args:
        coarse: the quantizer of the coarse map (one id per position: a VectorQuantizer,
            LookupFreeQuantizer or FiniteScalarQuantizer); its codebook is stage 2's image vocabulary.
        fine: the quantizer of the fine residual, of the same kinds; it takes z of the same
            channels as `coarse`.
        fine_dropout: share of training images whose fine residual is dropped, so the decoder
            learns to render the coarse map alone too. 0 never drops it.
    """

    def __init__(self, coarse: Quantizer, fine: Quantizer, fine_dropout: float = 0.0):
        super().__init__()
        # a checkpoint's hyperparameters hold each level as its spec
        coarse = build_quantizer(coarse) if isinstance(coarse, dict) else coarse
        fine = build_quantizer(fine) if isinstance(fine, dict) else fine
        if coarse.dim != fine.dim:
            raise ValueError(
                f"the coarse quantizer takes {coarse.dim} channels and the fine one {fine.dim}: the fine level "
                "quantizes the residual of the same latent, so both need the same dim"
            )
        if any(isinstance(level, (MultiScaleQuantizer, ResidualQuantizer)) for level in (coarse, fine)):
            # the prior and the fine stage each model one id per position of their map
            raise ValueError(
                "each level of a MultiScaleQuantizer gives one id per position: use a VectorQuantizer, "
                "LookupFreeQuantizer or FiniteScalarQuantizer, not a residual or multi-scale one"
            )
        if not 0.0 <= fine_dropout < 1.0:
            raise ValueError(f"fine_dropout must lie in [0, 1), got {fine_dropout}")
        self.coarse = coarse
        self.fine = fine
        self.fine_dropout = fine_dropout
        self.dim = coarse.dim

    @property
    def codebook_size(self) -> int:
        """The coarse codebook: stage 2's image vocabulary."""
        return self.coarse.codebook_size

    @property
    def fine_codebook_size(self) -> int:
        """The fine codebook: the fine stage's vocabulary."""
        return self.fine.codebook_size

    def forward(self, z: Tensor) -> QuantizerOutput:
        B, _, H, W = z.shape
        if H % SCALE or W % SCALE:
            raise ValueError(f"the fine latent grid {H}x{W} must have even sides: the coarse grid is half of it")
        with fp32_math(z.device.type):
            z32 = z.float()  # both levels in fp32, so z_q equals ids_to_codes(ids) to the bit
            coarse = self.coarse(F.avg_pool2d(z32, SCALE))  # z_q (B, dim, h, w)
            base = upsample(coarse.z_q.detach())  # (B, dim, 2h, 2w)
            fine = self.fine(z32 - base)  # the residual: what the coarse codes miss
            residual = fine.z_q.detach()
            if self.training and self.fine_dropout > 0:
                kept = torch.rand(B, 1, 1, 1, device=z.device) >= self.fine_dropout  # (B, 1, 1, 1)
                residual = residual * kept
            # one straight-through identity for the sum: z - sg(z) is exactly 0
            z_q = (base + residual) + (z32 - z32.detach())  # (B, dim, 2h, 2w)
        losses = {f"coarse/{name}": value for name, value in coarse.losses.items()}
        losses |= {f"fine/{name}": value for name, value in fine.losses.items()}
        stats = {**coarse.stats, **{f"fine/{name}": value for name, value in fine.stats.items()}}
        ids = MultiScaleIds(coarse.ids, fine.ids)
        return QuantizerOutput(z_q.to(z.dtype), ids, coarse.loss + fine.loss, losses, stats)  # type: ignore[arg-type]

    def ids_to_codes(self, ids: MultiScaleIds | Tensor) -> Tensor:
        """`MultiScaleIds` -> fp32 z_q (B, dim, 2h, 2w), as forward makes it (without dropout); coarse
        ids (B, h, w) alone -> the upsampled coarse codes, the fine residual zero."""
        coarse_ids = ids.coarse if isinstance(ids, MultiScaleIds) else ids
        with fp32_math(coarse_ids.device.type):
            codes = upsample(self.coarse.ids_to_codes(coarse_ids))  # (B, dim, 2h, 2w)
            if isinstance(ids, MultiScaleIds):
                codes = codes + self.fine.ids_to_codes(ids.fine)
            return codes


class MultiScaleTokenizer(VQTokenizer):
    """The VQ-GAN tokenizer with a `MultiScaleQuantizer`: `encode` gives `MultiScaleIds`, `decode`
    takes them, or the coarse ids alone. Its `downsample_factor`, `latent_size` and `codebook_size`
    are the coarse map's, what the prior checks against; the fine map's are `fine_*`."""

    quantizer: MultiScaleQuantizer

    @property
    def downsample_factor(self) -> int:
        """Image pixels per coarse id along each side: twice the encoder's factor."""
        return SCALE * self.config.downsample_factor

    @property
    def fine_codebook_size(self) -> int:
        return self.quantizer.fine_codebook_size

    @torch.no_grad()
    def decode(self, ids: MultiScaleIds | Tensor) -> Tensor:
        """`MultiScaleIds` -> (B, 3, H, W) images in [-1, 1]; coarse ids (B, h, w) alone -> the images
        of the coarse map, without the fine detail."""
        coarse = ids.coarse if isinstance(ids, MultiScaleIds) else ids
        check_ids(coarse, self.codebook_size, "coarse")
        if isinstance(ids, MultiScaleIds):
            check_ids(ids.fine, self.fine_codebook_size, "fine")
            if ids.fine.shape[-2:] != (SCALE * coarse.size(-2), SCALE * coarse.size(-1)):
                raise ValueError(
                    f"fine ids {tuple(ids.fine.shape)} must have twice the sides of the coarse ids {tuple(coarse.shape)}"
                )
        codes = self.quantizer.ids_to_codes(ids).to(self.post_quant_conv.weight.dtype)  # (B, dim, 2h, 2w)
        return self.decoder(self.post_quant_conv(codes)).clamp(-1.0, 1.0)

    def describe(self) -> dict[str, Any]:
        """`VQTokenizer.describe`, the grid and codebook the coarse map's, plus the fine map's."""
        description = super().describe()
        description["latent_size"] = self.config.latent_size // SCALE
        description["fine_latent_size"] = self.config.latent_size
        description["fine_codebook_size"] = self.fine_codebook_size
        return description


def check_ids(ids: Tensor, codebook_size: int, level: str) -> None:
    if ids.min() < 0 or ids.max() >= codebook_size:
        raise ValueError(
            f"{level} ids must lie in [0, {codebook_size}) for this tokenizer's {level} codebook, "
            f"got [{int(ids.min())}, {int(ids.max())}]"
        )
