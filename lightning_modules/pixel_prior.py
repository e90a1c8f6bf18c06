"""
Pixel-level autoregressive baselines as priors: a gated PixelCNN (tessera/nn/pixelcnn.py) or an
Image Transformer (tessera/nn/image_transformer.py) over the raw subpixels of the batch's images,
conditioned on the caption.

They are TextImagePrior subclasses whose "image ids" are the images' own uint8 subpixels
(B, H, W, 3), so there is no stage-1 tokenizer: `SubpixelCodec` stands in for it, turning the
loader's images into subpixels and sampled subpixels back into images. Everything else is the
prior's: batches from CaptionImageDataModule, caption dropout for classifier-free guidance, AdamW
and its schedule, clipping, the non-finite guard, logs and MFU, DDP, checkpoints and exports that
`load_prior`, `tessera sample`, `tessera evaluate` and `tessera export` take by their `class_path`.

Logged beside the prior's losses: train/bits_per_dim and val/bits_per_dim, the mean negative
log-likelihood per subpixel in bits (8 is a uniform model).

For likelihoods and lossless coding, `subpixel_log_probs` (teacher forced, one pass) and
`subpixel_steps` (the next subpixel's distribution given those pushed so far) on an eval-mode
prior, tessera/nn/subpixels.py documents both; `symbol_steps` is the latter as a generator.
"""

from __future__ import annotations

import torch

from datamodules.text import CLIP_BPE
from lightning_modules.prior import PriorOptimizerConfig, TextImagePrior
from tessera.nn.image_transformer import ImageTransformer, ImageTransformerConfig, ImageTransformerSteps
from tessera.nn.pixelcnn import PixelCNN, PixelCNNConfig, PixelCNNSteps
from tessera.nn.subpixels import bits_per_dim
from tessera.pixels import from_subpixels, to_subpixels
from tessera.sampling import SamplingConfig


class SubpixelCodec:
    """The pixel priors' stand-in for a stage-1 tokenizer: an image's ids are its subpixels. It has
    no weights, so it is the same object on any device."""

    def on(self, device: torch.device) -> SubpixelCodec:
        return self

    @staticmethod
    def encode(images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) long in [0, 255], exactly the loader's uint8 pixels."""
        return to_subpixels(images)

    @staticmethod
    def decode(subpixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) in [0, 255] -> (B, 3, H, W) in [-1, 1]."""
        return from_subpixels(subpixels)


class PixelPrior(TextImagePrior):
    """What both pixel priors share; `PixelCNNPrior` and `ImageTransformerPrior` name the network."""

    def __init__(
        self,
        transformer: PixelCNNConfig | ImageTransformerConfig | None = None,
        tokenizer: str | None = None,
        text_tokenizer: str = CLIP_BPE,
        caption_dropout: float = 0.1,
        text_loss_weight: float = 0.0,
        image_loss_weight: float = 1.0,
        optimizer: PriorOptimizerConfig | None = None,
        compile: bool = False,
        peak_flops: float | None = None,
        sampling: SamplingConfig | None = None,
    ):
        """
        Args:
            transformer: the network (the argument keeps the prior's name): a PixelCNNConfig or an
                ImageTransformerConfig; its `image_grid` is the data's image size in pixels.
            tokenizer: none: the subpixels are the ids. Kept for the prior's saved arguments.
            text_tokenizer: as TextImagePrior's; the caption conditions the image and is not modelled.
            caption_dropout: share of training captions replaced by the empty caption (for guidance).
            text_loss_weight: must be 0: the caption is a condition, not a target.
            image_loss_weight: the loss is the image's negative log-likelihood alone, whatever its weight.
            optimizer: AdamW and its schedule.
            compile: torch.compile each block in place, and the head with its fp32 loss as one graph.
            peak_flops: as TextImagePrior's, for the logged MFU.
            sampling: how this prior's images are drawn unless told otherwise (temperature, top-k and
                top-p per subpixel, guidance), kept in its checkpoints and exports.
        """
        if tokenizer is not None:
            raise ValueError(f"a pixel prior models the subpixels themselves and takes no stage-1 tokenizer, got {tokenizer!r}")
        if text_loss_weight != 0:
            raise ValueError(f"a pixel prior conditions on the caption and does not model it: text_loss_weight must be 0, got {text_loss_weight}")
        super().__init__(transformer, None, text_tokenizer, caption_dropout, text_loss_weight, image_loss_weight,
                         optimizer, compile, peak_flops, sampling)
        self.image_tokenizer = SubpixelCodec()

    @property
    def id_shape(self) -> tuple[int, ...]:
        return (self.config.image_grid, self.config.image_grid, 3)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)  # the image's NLL per subpixel: no text loss
        self.log("train/bits_per_dim", bits_per_dim(loss.detach()))
        return loss

    def on_validation_epoch_end(self) -> None:
        image, samples = self.val_sums[2:].clone()  # this rank's, before the prior's epoch end sums them over ranks
        super().on_validation_epoch_end()
        image, samples = self.trainer.strategy.reduce(torch.stack([image, samples]), reduce_op="sum")
        if samples > 0:
            self.log("val/bits_per_dim", bits_per_dim(image / samples).float(), sync_dist=True)

    # -------------------------------------------------------------------------
    # likelihood and coding (tessera/nn/subpixels.py)

    def _check_eval(self, use: str) -> None:
        if self.training:
            raise ValueError(f"{use} needs the prior in eval mode (`load_prior` returns it so; else call .eval())")

    @torch.no_grad()
    def subpixel_log_probs(self, images: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """Teacher forced, one pass: images (B, H, W, 3) of integers in [0, 255] and their captions'
        ids (B, text_length) (`self.captions(prompts).ids`) -> (B, H, W, 3, 256) fp32
        log-probabilities of every subpixel given the caption and the subpixels before it."""
        self._check_eval("subpixel_log_probs")
        return self.transformer.subpixel_log_probs(images.to(self.device), text_ids.to(self.device))

    def subpixel_steps(self, text_ids: torch.Tensor) -> PixelCNNSteps | ImageTransformerSteps:
        """Step by step for captions' ids (B, text_length): `.log_probs()` (B, 256) of the next
        subpixel, `.push(values)` its values (B,), 3*H*W times in raster order over (row, col,
        channel). An encoder and a decoder that both step through it get bitwise the same
        distributions (same device, dtype, batch size and threads)."""
        self._check_eval("subpixel_steps")
        return self.transformer.subpixel_steps(text_ids.to(self.device))

    coded_kind = "pixels"
    """What `symbol_steps` (the prior's, through tessera.sampling.image_token_steps) predicts, for a
    lossless coder: the images' own subpixels."""


class PixelCNNPrior(PixelPrior):
    """A gated PixelCNN over the subpixels, the caption a per-layer bias (configs/pixel/tiny_shapes_pixelcnn.yaml)."""

    config_class = PixelCNNConfig
    entry_points = ("loss",)  # sampling steps run `features` and `outputs` unsharded: DDP, not FSDP2

    @staticmethod
    def build_network(config: PixelCNNConfig, text_loss_weight: float) -> PixelCNN:
        return PixelCNN(config)


class ImageTransformerPrior(PixelPrior):
    """An Image Transformer over the caption then the subpixels (configs/pixel/tiny_shapes_image_transformer.yaml)."""

    config_class = ImageTransformerConfig

    @staticmethod
    def build_network(config: ImageTransformerConfig, text_loss_weight: float) -> ImageTransformer:
        return ImageTransformer(config, text_head=False)
