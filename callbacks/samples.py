"""Images sampled from fixed prompts while the prior trains."""

from __future__ import annotations

from contextlib import nullcontext

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from callbacks.image_logging import image_grid, log_image_grid
from tessera.sampling import SamplingConfig


class SampleLogger(L.Callback):
    """Every `every_n_steps` training steps, samples `images_per_prompt` images for each of
    `prompts` with a fixed seed and logs them as one grid (`samples`, a row per prompt).

    The model must offer `generate(prompts, sampling, seed) -> images` (TextImagePrior does).
    Under DDP only global rank 0 samples, without collectives. Under FSDP every rank must join
    the parameter gathers, so all ranks sample the same images and rank 0 logs: FSDP1 inside
    `summon_full_params`, FSDP2 (ModelParallelStrategy) through the gathers of each block's call.
    """

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 1000,
        images_per_prompt: int = 4,
        seed: int = 0,
        top_k: int | None = 256,
        top_p: float | None = None,
        temperature: float = 1.0,
        cfg_scale: float = 1.0,
    ):
        if not prompts:
            raise ValueError("SampleLogger needs at least one prompt")
        if every_n_steps < 1 or images_per_prompt < 1:
            raise ValueError(f"every_n_steps and images_per_prompt must be >= 1, got {every_n_steps}, {images_per_prompt}")
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.images_per_prompt = images_per_prompt
        self.seed = seed
        self.sampling = SamplingConfig(top_k=top_k, top_p=top_p, temperature=temperature, cfg_scale=cfg_scale)
        self.last_logged_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        # under accumulation several batches end on the same step: sample once
        if step % self.every_n_steps or step == self.last_logged_step:
            return
        self.last_logged_step = step
        sharded = isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))
        if not (sharded or trainer.is_global_zero):
            return
        gathered = nullcontext()
        if isinstance(trainer.strategy, FSDPStrategy):
            from torch.distributed.fsdp import FullyShardedDataParallel

            gathered = FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False)
        prompts = [p for p in self.prompts for _ in range(self.images_per_prompt)]
        was_training = pl_module.training
        pl_module.eval()
        with gathered:
            images = pl_module.generate(prompts, self.sampling, seed=self.seed)
        pl_module.train(was_training)
        if trainer.is_global_zero:
            caption = f"step {step}, a row per prompt: " + " | ".join(self.prompts)
            log_image_grid(trainer, "samples", image_grid(images, nrow=self.images_per_prompt), caption)
