"""Log what the data pipeline skipped or repeated, so a bad shard set shows up on the dashboard, not in a
post-mortem."""

from __future__ import annotations

import lightning as L
import torch

from datamodules.stream import REPEATED, STAT_NAMES


class DataStatsMonitor(L.Callback):
    """Logs `data/<reason>`: training samples skipped per reason and captions truncated, and
    `train/repeated_samples`: samples trained on twice in an epoch because a rank's shards held
    too few good ones (see datamodules/stream.py); all summed over all ranks since the start of
    the run, every `every_n_steps` batches.

    Reads the `data_stats` counter of the trainer's datamodule (CaptionImageDataModule keeps one).
    """

    def __init__(self, every_n_steps: int = 50):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        stats = getattr(trainer.datamodule, "data_stats", None)
        if stats is None or (batch_idx + 1) % self.every_n_steps:
            return
        names = {f"data/{name}": name for name in STAT_NAMES} | {f"train/{REPEATED}": REPEATED}
        local = torch.tensor([float(stats.get(name, 0)) for name in names.values()], device=pl_module.device)
        # every rank reaches this at the same batch_idx, so the collective cannot hang
        total = trainer.strategy.reduce(local, reduce_op="sum")
        pl_module.log_dict(dict(zip(names, total)), on_step=True, on_epoch=False)
