"""
The fine stage's LightningModule: a `FineTransformer` learns the fine id map of a frozen
`MultiScaleTokenizer` from its coarse map, by cross-entropy over every fine position at once.

Batches are caption-image batches (the captions unused): the frozen tokenizer encodes the images
into both maps on the fly. It trains apart from the prior, before, after or beside it, as both
only read the tokenizer's maps; `TextImagePrior(fine_stage=...)` then joins them for sampling.

The prior's pieces serve it: its optimizer config and `adamw_with_schedule` (AdamW, decay on
matrices and embeddings only, warm-up then cosine), the non-finite step guard, gradient clipping
through `clip_grad_norm`, and `FrozenModule` for the tokenizer (not in checkpoints, never cast).

On disk: `load_fine_stage` reads a .ckpt file or a `tessera export` directory (`export_fine_stage`:
the transformer's weights as one safetensors file, plus config.json).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors.torch import load_file, save_file

from datamodules.stream import without_padding
from lightning_modules.clipping import clip_grad_norm
from lightning_modules.fsdp import checkpoint_hyperparameters
from lightning_modules.nonfinite import NonFiniteLossGuard, drop_gradients
from lightning_modules.parallel import adjust_ddp
from lightning_modules.prior import FrozenModule, PriorOptimizerConfig, adamw_with_schedule, host_scalar
from lightning_modules.vqgan import load_tokenizer
from tessera.nn.fine_transformer import FineStageConfig, FineTransformer
from tessera.nn.multiscale_tokenizer import MultiScaleIds, MultiScaleTokenizer
from tessera.nn.vq_tokenizer import CONFIG_FILE, WEIGHTS_FILE, VQTokenizer
from tessera.sampling import SamplingConfig

PREFIX = "transformer."  # the transformer's entries in the LightningModule's state dict


class FineStage(L.LightningModule):
    """Trains `transformer` to draw a multi-scale tokenizer's fine map from its coarse map."""

    def __init__(
        self,
        fine_stage: FineStageConfig | None = None,
        tokenizer: str | None = None,
        optimizer: PriorOptimizerConfig | None = None,
        sampling: SamplingConfig | None = None,
    ):
        """
        Args:
            fine_stage: the network; its vocabularies and coarse grid must be the tokenizer's.
            tokenizer: the multi-scale tokenizer, a VQGAN checkpoint or a `tessera export` directory.
                Needed to train; a loaded fine stage that only samples (beside a prior, which has
                its own) can do without.
            optimizer: AdamW and its schedule, as the prior's.
            sampling: how fine ids are drawn (temperature, top-k, top-p) unless told otherwise,
                kept in checkpoints and exports. None takes the most likely id at every position.
        """
        super().__init__()
        if isinstance(fine_stage, dict):  # a checkpoint's hyperparameters
            fine_stage = FineStageConfig(**fine_stage)
        if isinstance(optimizer, dict):
            optimizer = PriorOptimizerConfig(**optimizer)
        if isinstance(sampling, dict):
            sampling = SamplingConfig(**sampling)
        self.config = fine_stage if fine_stage is not None else FineStageConfig()
        self.optimizer_config = optimizer if optimizer is not None else PriorOptimizerConfig()
        self.sampling = sampling
        # plain dicts, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "fine_stage": asdict(self.config),
                "tokenizer": tokenizer,
                "optimizer": asdict(self.optimizer_config),
                "sampling": asdict(sampling) if sampling is not None else None,
            }
        )
        self.transformer = FineTransformer(self.config)
        self.image_tokenizer = FrozenModule(load_tokenizer(tokenizer)) if tokenizer is not None else None
        if self.image_tokenizer is not None:
            check_fine_stage_fits(self.image_tokenizer.module, self.config, tokenizer)
        self.nonfinite = NonFiniteLossGuard(self.optimizer_config.max_nonfinite_steps)

    @torch.no_grad()
    def generate(self, coarse_ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fine ids (B, 2h, 2w) for coarse ids (B, h, w), drawn with this stage's own `sampling`."""
        return self.transformer.generate(coarse_ids.to(self.device), self.sampling, generator)

    # -------------------------------------------------------------------------
    # training

    def image_ids(self, batch: dict) -> MultiScaleIds:
        if self.image_tokenizer is None:
            raise ValueError("the fine stage trains on images: set `tokenizer` to the multi-scale tokenizer")
        return self.image_tokenizer.on(self.device).encode(batch["images"])

    def configure_model(self) -> None:
        adjust_ddp(self.trainer.strategy if self._trainer is not None else None)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ids = self.image_ids(batch)
        loss = self.transformer.loss(ids.coarse, ids.fine)
        self.nonfinite.observe(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/nonfinite_skipped", host_scalar(self.nonfinite.skipped))
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # as the prior: a non-finite step updates no weight, yet counts, so schedules stay on the batches
        if not self.nonfinite.step_is_finite(self.global_step):
            drop_gradients(optimizer)

    def configure_optimizers(self):
        named = [(name, p) for name, p in self.transformer.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": self.optimizer_config.weight_decay},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
        ]
        return adamw_with_schedule(groups, self.optimizer_config, self.device, self.trainer.max_steps)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.optimizer_config.gradient_clip_val is not None:
            clip_grad_norm(self, optimizer, self.optimizer_config.gradient_clip_val)

    # -------------------------------------------------------------------------
    # validation: sums over every real sample, added up over the ranks at the end, so the logged
    # means are the same on one process or many and for any batch size; padding never counts

    def on_validation_epoch_start(self) -> None:
        self.val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # [loss, accuracy, samples]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        batch = without_padding(batch)
        samples = len(batch["images"])
        if samples == 0:
            return
        ids = self.image_ids(batch)
        logits = self.transformer(ids.coarse)[..., : self.config.fine_vocab_size].float()  # (B, F, F, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), ids.fine.flatten())
        accuracy = (logits.argmax(-1) == ids.fine).double().mean()  # of the most likely fine id
        self.val_sums += torch.stack([loss.double() * samples, accuracy * samples, loss.new_tensor(samples).double()])

    def on_validation_epoch_end(self) -> None:
        loss, accuracy, samples = self.trainer.strategy.reduce(self.val_sums, reduce_op="sum")
        if samples == 0:
            return
        logs = {"val/loss": loss / samples, "val/accuracy": accuracy / samples, "val/samples": samples}
        self.log_dict({name: value.float() for name, value in logs.items()}, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "nonfinite" in checkpoint:
            self.nonfinite.load_state_dict(checkpoint["nonfinite"])


def check_fine_stage_fits(tokenizer: VQTokenizer, config: FineStageConfig, path: str) -> None:
    """Clear errors when the tokenizer is not multi-scale or its maps are not the fine stage's."""
    if not isinstance(tokenizer, MultiScaleTokenizer):
        raise ValueError(
            f"tokenizer {path} makes one id map: the fine stage needs a multi-scale tokenizer "
            "(quantizer: tessera.nn.multiscale_tokenizer.MultiScaleQuantizer)"
        )
    description = tokenizer.describe()
    expected = {
        "codebook_size": config.coarse_vocab_size,
        "fine_codebook_size": config.fine_vocab_size,
        "latent_size": config.coarse_grid,
    }
    names = {"codebook_size": "coarse_vocab_size", "fine_codebook_size": "fine_vocab_size", "latent_size": "coarse_grid"}
    for key, value in expected.items():
        if description[key] != value:
            raise ValueError(f"tokenizer {path} has {key} {description[key]} but fine_stage.{names[key]} is {value}")


# -----------------------------------------------------------------------------
# a fine stage on disk: a training checkpoint (.ckpt) or an export
# (model.safetensors: the transformer's fp32 weights; config.json: FineStage's arguments)


def fine_stage_config(path: str | Path) -> dict[str, Any]:
    """FineStage's constructor arguments, as a checkpoint or an export holds them."""
    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else checkpoint_hyperparameters(path)
    if "fine_stage" not in config:
        raise ValueError(f"{path} is not a FineStage checkpoint or export: its config has no fine_stage")
    return config


def _transformer_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_FILE).is_file():
        return load_file(path / WEIGHTS_FILE)
    weights = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {name.removeprefix(PREFIX): w for name, w in weights.items() if name.startswith(PREFIX)}


def load_fine_stage(path: str | Path, map_location: str | torch.device = "cpu") -> FineStage:
    """A FineStage in eval mode, without its tokenizer (a prior brings its own), from a .ckpt file
    or a `tessera export` directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no fine-stage checkpoint or export directory at {path}")
    config = {**fine_stage_config(path), "tokenizer": None}
    stage = FineStage(**config)
    stage.transformer.load_state_dict(_transformer_weights(path))
    return stage.to(map_location).eval()


def export_fine_stage(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """A fine-stage checkpoint -> OUT/model.safetensors + OUT/config.json, what `load_fine_stage(out)`
    reads. Returns the config."""
    config = fine_stage_config(checkpoint)
    transformer = FineTransformer(FineStageConfig(**config["fine_stage"]))
    transformer.load_state_dict(_transformer_weights(Path(checkpoint)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(transformer.state_dict(), str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config
