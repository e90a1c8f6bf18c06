"""Images sampled from fixed prompts while the prior trains."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from callbacks.image_logging import image_grid, log_image_grid
from tessera.sampling import SamplingConfig


def every_rank_samples(trainer: L.Trainer, callback: str) -> bool:
    """Whether every rank must sample together: under FSDP2 (ModelParallelStrategy) each call of the
    sharded model (its `loss`, `prefill` and `decode_step` are FSDP2 forward methods) gathers each
    block's parameters from all ranks in turn, so a rank that stayed out would leave the others
    waiting. Sampling so holds no more of the model on a rank than training does (one block's
    gathered parameters beyond its shard) and keeps every rank at work (the evaluation callbacks
    split their samples over the ranks as under DDP), where a full state dict gathered on rank 0
    to sample there would hold the whole model once more (on the GPU, or on the CPU and slow)
    while the other ranks wait. FSDP1 is refused: it gathers parameters only around its root's
    forward, and a forward inside `summon_full_params` is forbidden by FSDP's documentation."""
    if isinstance(trainer.strategy, FSDPStrategy):
        raise ValueError(
            f"{callback} cannot sample under FSDPStrategy (FSDP1), which gathers parameters only around its "
            "root's forward: use FSDP2 (configs/trainer/fsdp.yaml, AtomicModelParallelStrategy) or DDP"
        )
    return isinstance(trainer.strategy, ModelParallelStrategy)


class SampleLogger(L.Callback):
    """Every `every_n_steps` training steps, samples `images_per_prompt` images for each of
    `prompts` with a fixed seed and logs them as one grid (`samples`, a row per prompt).

    The model must offer `generate(prompts, sampling, seed) -> images` (TextImagePrior does).
    Under DDP only global rank 0 samples, without collectives. Under FSDP2 every rank samples the
    same images with the sharded model (`every_rank_samples`) and rank 0 logs them: the images of
    one process, whose one seeded draw covers the whole grid.
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
        self.sharded = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.sharded = every_rank_samples(trainer, type(self).__name__)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        # under accumulation several batches end on the same step: sample once
        if step % self.every_n_steps or step == self.last_logged_step:
            return
        self.last_logged_step = step
        if not (self.sharded or trainer.is_global_zero):
            return
        prompts = [p for p in self.prompts for _ in range(self.images_per_prompt)]
        was_training = pl_module.training
        pl_module.eval()
        images = pl_module.generate(prompts, self.sampling, seed=self.seed)
        pl_module.train(was_training)
        if trainer.is_global_zero:
            caption = f"step {step}, a row per prompt: " + " | ".join(self.prompts)
            log_image_grid(trainer, "samples", image_grid(images, nrow=self.images_per_prompt), caption)
