"""Send an image grid to whatever loggers the trainer has: W&B, TensorBoard, else PNG files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from torchvision.utils import make_grid

from tessera.pixels import to_uint8


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> one (3, H', W') uint8 grid, `nrow` images a row."""
    return make_grid(to_uint8(images).cpu(), nrow=nrow, padding=2, pad_value=255)


def log_image_grid(trainer: L.Trainer, key: str, grid: torch.Tensor, caption: str) -> list[str]:
    """Log a (3, H, W) uint8 grid at the trainer's global step; call it on global rank 0 only.

    W&B and TensorBoard loggers get it as an image; with neither (CSV logger, or no logger), it
    is written as `<log dir>/<key>/step_<global step>.png`. Returns where it went.
    """
    step = trainer.global_step
    sent = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[grid.permute(1, 2, 0).numpy()], step=step, caption=[caption])
            sent.append("wandb")
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step)
            sent.append("tensorboard")
    if not sent:
        # the logger's own directory: Trainer.log_dir broadcasts it from rank 0, a collective this rank-0-only call would hang on
        log_dir = getattr(trainer.loggers[0], "log_dir", None) if trainer.loggers else None
        directory = Path(log_dir or trainer.default_root_dir) / key
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"step_{step:08d}.png"
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
        sent.append(str(path))
    return sent
