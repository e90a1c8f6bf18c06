"""Reconstruction grids of fixed validation images while the tokenizer trains."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from callbacks.image_logging import image_grid, log_image_grid
from tessera.pixels import psnr, to_uint8, to_unit_range


class ReconstructionLogger(L.Callback):
    """Every `every_n_steps` training steps, logs `num_images` fixed validation images (top row)
    above their reconstructions (bottom row) as `reconstructions`, with their PSNR in the caption.

    The images are the first of the validation loader, taken once and kept in the callback's
    state, so a resumed run shows the same ones. The model must offer `encode(images) -> ids` and
    `decode(ids) -> images` (VQGAN does, with its EMA weights when it keeps them). Runs in eval
    mode, under DDP on global rank 0 only, without collectives, so the other ranks never wait on
    it. Under FSDP2 (ModelParallelStrategy) every call gathers the sharded parameters from every
    rank, so every rank reconstructs its own fixed images and rank 0 logs its own.
    """

    def __init__(self, every_n_steps: int = 1000, num_images: int = 8):
        if every_n_steps < 1 or num_images < 1:
            raise ValueError(f"every_n_steps and num_images must be >= 1, got {every_n_steps} and {num_images}")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.images: torch.Tensor | None = None  # (N, 3, H, W) uint8
        self.last_logged_step = -1

    def state_dict(self) -> dict:
        return {"images": self.images, "last_logged_step": self.last_logged_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.images = state_dict["images"]
        self.last_logged_step = state_dict["last_logged_step"]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        # under accumulation several batches end on the same step: log it once
        if step % self.every_n_steps or step == self.last_logged_step:
            return
        if not (trainer.is_global_zero or isinstance(trainer.strategy, ModelParallelStrategy)):
            return
        self.last_logged_step = step
        images = to_unit_range(self._fixed_images(trainer, batch).to(pl_module.device))
        was_training = pl_module.training
        pl_module.eval()
        reconstructions = pl_module.decode(pl_module.encode(images))
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        grid = image_grid(torch.cat([images, reconstructions]), nrow=len(images))
        caption = f"step {step}: top originals, bottom reconstructions, PSNR {psnr(images, reconstructions).mean():.2f} dB"
        log_image_grid(trainer, "reconstructions", grid, caption=caption)

    def _fixed_images(self, trainer: L.Trainer, batch: dict) -> torch.Tensor:
        """The kept images: at first use, the first validation batch's (this training batch's without one)."""
        if self.images is None:
            images = batch["images"]
            loader = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else None
            if isinstance(loader, DataLoader):
                images = next(iter(loader))["images"]
            images = images[: self.num_images]
            # loaders hand over uint8 (CaptionImageDataModule) or [-1, 1] floats
            self.images = (images if images.dtype == torch.uint8 else to_uint8(images)).cpu()
        return self.images
