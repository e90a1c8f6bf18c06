"""
The VQ-GAN image tokenizer as one network: images -> codebook ids -> images.

    images (B, 3, H, W) in [-1, 1]
      -> Encoder           (B, z_channels, h, w)     h = H / f
      -> quant_conv  1x1   (B, quantizer.dim, h, w)  LlamaGen's low-dimensional lookup: dim 8
      -> quantizer         ids (B, h, w) [or (B, h, w, D)], z_q (B, quantizer.dim, h, w)
      -> post_quant_conv   (B, z_channels, h, w)
      -> Decoder           (B, 3, H, W)

Stage 2 sees only `encode` (images -> ids) and `decode` (ids -> images). `save_pretrained` and
`from_pretrained` keep a tokenizer as `model.safetensors` plus `config.json` (architecture,
quantizer, codebook size, downsampling factor), all a frozen stage-2 tokenizer needs.

References:
1) Taming Transformers (VQGAN), Esser et al. 2021: https://arxiv.org/abs/2012.09841
2) LlamaGen, Sun et al. 2024: https://arxiv.org/abs/2406.06525
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from tessera.nn.autoencoder import AutoencoderConfig, Decoder, build_encoder
from tessera.nn.quantizer_base import Quantizer, QuantizerOutput, build_quantizer, quantizer_spec
from tessera.nn.residual_quantizer import ResidualQuantizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class VQTokenizer(nn.Module):
    """Encoder, quantizer and decoder of the VQ-GAN; the discriminator and losses live elsewhere."""

    def __init__(self, config: AutoencoderConfig, quantizer: Quantizer):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, quantizer.dim, kernel_size=1)
        self.quantizer = quantizer
        self.post_quant_conv = nn.Conv2d(quantizer.dim, config.z_channels, kernel_size=1)
        self.decoder = Decoder(config)

    @property
    def codebook_size(self) -> int:
        """Stage 2's image vocabulary."""
        return self.quantizer.codebook_size

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstructions (B, 3, H, W) and the quantizer's output (ids, z_q, auxiliary losses, stats)."""
        quantized = self.quantizer(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(quantized.z_q)), quantized

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, h, w) long ids ((B, h, w, D) for a residual quantizer)."""
        return self.quantizer(self.quant_conv(self.encoder(images))).ids

    @torch.no_grad()
    def soft_codes(
        self, images: torch.Tensor, temperature: float, stochastic: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images -> ids (B, h, w, D) and soft targets (B, h, w, D, K) of a residual
        quantizer (`ResidualQuantizer.soft_codes`), for an RQ-Transformer's soft labels."""
        if not isinstance(self.quantizer, ResidualQuantizer):
            raise ValueError(f"soft codes need a ResidualQuantizer; this tokenizer's is a {type(self.quantizer).__name__}")
        return self.quantizer.soft_codes(self.quant_conv(self.encoder(images)), temperature, stochastic, generator)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids as `encode` returns them -> (B, 3, H, W) images, clamped to [-1, 1]."""
        if ids.min() < 0 or ids.max() >= self.codebook_size:
            raise ValueError(
                f"ids must lie in [0, {self.codebook_size}) for this tokenizer's codebook, "
                f"got [{int(ids.min())}, {int(ids.max())}]"
            )
        codes = self.quantizer.ids_to_codes(ids).to(self.post_quant_conv.weight.dtype)  # (B, dim, h, w)
        return self.decoder(self.post_quant_conv(codes)).clamp(-1.0, 1.0)

    # -------------------------------------------------------------------------
    # a frozen tokenizer on disk: model.safetensors + config.json

    def describe(self) -> dict[str, Any]:
        """Everything needed to rebuild this tokenizer, plus what stage 2 checks against."""
        return {
            "autoencoder": asdict(self.config),
            "quantizer": quantizer_spec(self.quantizer),
            "codebook_size": self.codebook_size,
            "downsample_factor": self.downsample_factor,
            "latent_size": self.config.latent_size,
        }

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> VQTokenizer:
        """A tokenizer with fresh weights, of the architecture `describe` wrote."""
        return build_tokenizer(AutoencoderConfig(**description["autoencoder"]), build_quantizer(description["quantizer"]))

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # contiguous clones: safetensors refuses views and shared storage
        state = {name: tensor.detach().contiguous().clone() for name, tensor in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.describe(), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VQTokenizer:
        """A frozen tokenizer in eval mode from what `save_pretrained` wrote."""
        directory = Path(directory)
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory} is not an exported tokenizer: it lacks {', '.join(missing)} "
                f"(write one with `tessera export --checkpoint RUN.ckpt --out {directory}`)"
            )
        tokenizer = cls.from_description(json.loads((directory / CONFIG_FILE).read_text()))
        tokenizer.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return tokenizer.requires_grad_(False).eval()


def build_tokenizer(config: AutoencoderConfig, quantizer: Quantizer) -> VQTokenizer:
    """The tokenizer a quantizer needs: `MultiScaleTokenizer` for a `MultiScaleQuantizer` (two id
    maps), `VQTokenizer` for every other."""
    # imported here: multiscale_tokenizer.py subclasses VQTokenizer
    from tessera.nn.multiscale_tokenizer import MultiScaleQuantizer, MultiScaleTokenizer

    cls = MultiScaleTokenizer if isinstance(quantizer, MultiScaleQuantizer) else VQTokenizer
    return cls(config, quantizer)
