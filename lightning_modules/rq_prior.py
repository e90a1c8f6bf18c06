"""
The RQ-Transformer prior's LightningModule: cross-entropy of every code of the (h, w, D) ids of a
residual tokenizer (tessera/nn/residual_quantizer.py), through the spatial and depth transformers
of tessera/nn/rq_transformer.py, plus the caption's as the flat prior weighs it.

Everything but the network and the ids it models is TextImagePrior's: batches of
images (encoded by the frozen residual tokenizer) or token shards of (h, w, D) ids from
`tessera tokenize`, caption dropout for guidance, AdamW and its schedule, clipping, the
non-finite guard, logs and MFU, DDP and FSDP2 (the spatial and depth blocks are the shard units),
checkpoints and exports, which `load_prior` rebuilds as this class from the class they name.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from datamodules.text import CLIP_BPE
from lightning_modules.prior import PriorOptimizerConfig, TextImagePrior, check_codebook_and_grid
from tessera.nn.residual_quantizer import ResidualQuantizer
from tessera.nn.rq_transformer import RQTransformer, RQTransformerConfig
from tessera.nn.vq_tokenizer import VQTokenizer
from tessera.sampling import SamplingConfig


class RQTransformerPrior(TextImagePrior):
    """Trains an RQ-Transformer on caption-then-residual-code sequences; samples images with `generate`."""

    config_class = RQTransformerConfig
    entry_points = ("loss", "prefill", "decode_step", "depth_step")

    def __init__(
        self,
        transformer: RQTransformerConfig | None = None,
        tokenizer: str | None = None,
        text_tokenizer: str = CLIP_BPE,
        caption_dropout: float = 0.1,
        text_loss_weight: float = 0.1,
        image_loss_weight: float = 0.9,
        optimizer: PriorOptimizerConfig | None = None,
        compile: bool = False,
        peak_flops: float | None = None,
        sampling: SamplingConfig | None = None,
        soft_label_temperature: float | None = None,
        stochastic_codes: bool = False,
    ):
        """
        Args:
            transformer: the spatial and depth transformers; `code_depth` must be the tokenizer's depth.
            tokenizer: the stage-1 residual tokenizer (ResidualQuantizer), a VQGAN checkpoint or a
                `tessera export` directory. Needed to train on images and to sample.
            text_tokenizer: as TextImagePrior's.
            caption_dropout: share of training captions replaced by the empty caption (for guidance).
            text_loss_weight: weight of the caption tokens' cross-entropy (the paper: 0.1); 0 builds
                no text head.
            image_loss_weight: weight of the mean cross-entropy over all codes of all positions (0.9).
            optimizer: AdamW and its schedule.
            compile: torch.compile each spatial and depth block in place.
            peak_flops: as TextImagePrior's, for the logged MFU.
            sampling: how this prior's images are drawn unless told otherwise, kept in its checkpoints
                and exports. None: SamplingConfig's defaults.
            soft_label_temperature: train each code against softmax(-||r - e_k||^2 / temperature) over
                the codes e_k for the residual r it quantized (the paper: 0.5), not its id alone: codes
                near the residual count as nearly right. Made by the frozen tokenizer from the images,
                so it needs images, not token shards. None: the ids (hard labels).
            stochastic_codes: draw each training code from that distribution instead of taking the
                nearest (the paper's stochastic sampling of codes, with soft labels): the prior sees
                the codes of nearby quantizations too. Needs soft_label_temperature.
        """
        if stochastic_codes and soft_label_temperature is None:
            raise ValueError("stochastic_codes draws codes from the soft labels' distribution: set soft_label_temperature too")
        if soft_label_temperature is not None and soft_label_temperature <= 0:
            raise ValueError(f"soft_label_temperature must be > 0 or None, got {soft_label_temperature}")
        super().__init__(transformer, tokenizer, text_tokenizer, caption_dropout, text_loss_weight, image_loss_weight,
                         optimizer, compile, peak_flops, sampling)
        self.hparams.update(soft_label_temperature=soft_label_temperature, stochastic_codes=stochastic_codes)

    @staticmethod
    def build_network(config: RQTransformerConfig, text_loss_weight: float) -> RQTransformer:
        return RQTransformer(config, text_head=text_loss_weight > 0)

    def check_tokenizer(self, tokenizer: VQTokenizer, path: str) -> None:
        check_residual_tokenizer_fits(tokenizer, self.config, path)

    @property
    def id_shape(self) -> tuple[int, ...]:
        return (self.config.image_grid, self.config.image_grid, self.config.code_depth)

    def training_targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ids and, with soft labels, each code's distribution over the codebook (B, N, D, K)."""
        temperature = self.hparams.soft_label_temperature
        if temperature is None:
            return super().training_targets(batch)
        if "images" not in batch or self.image_tokenizer is None:
            raise ValueError(
                "soft labels (soft_label_temperature) come from the residuals of the images: train on images "
                "with the `tokenizer` set, not on token shards, or set soft_label_temperature to null"
            )
        stochastic = self.hparams.stochastic_codes
        generator = torch.Generator(self.device).manual_seed(self.batch_seed()) if stochastic else None
        tokenizer = self.image_tokenizer.on(self.device)
        ids, targets = tokenizer.soft_codes(batch["images"], temperature, stochastic, generator)
        return self.checked_ids(ids), targets.flatten(1, 2)

    def shard_units(self) -> list[nn.Module]:
        return [*self.transformer.blocks, *self.transformer.depth_blocks]


def check_residual_tokenizer_fits(tokenizer: VQTokenizer, config: RQTransformerConfig, path: str) -> None:
    """Clear errors when the stage-1 tokenizer is not residual, or not of the transformer's depth,
    codebook and grid."""
    quantizer = tokenizer.quantizer
    if not isinstance(quantizer, ResidualQuantizer):
        raise ValueError(
            f"tokenizer {path} gives one id per position ({type(quantizer).__name__}): the RQ-Transformer models "
            "the (h, w, depth) ids of a ResidualQuantizer tokenizer (configs/tokenizer/rqvae_f32_d4.yaml); "
            "train TextImagePrior on this one"
        )
    if quantizer.depth != config.code_depth:
        raise ValueError(f"tokenizer {path} has depth {quantizer.depth} but transformer.code_depth is {config.code_depth}")
    check_codebook_and_grid(tokenizer, config, path)
