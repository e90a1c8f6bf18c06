"""FID and CLIP score while training, on validation batches.

- `FIDCallback`: for a prior (a module with `generate`), images sampled for the validation
  captions against the validation images; for a tokenizer (`encode` / `decode`), the
  reconstructions of the validation images against the images themselves (rFID).
- `CLIPScoreCallback`: for a prior, CLIP score of images sampled for the validation captions,
  logged under both conventions (`tessera.clip_score`).

Both run on every `every_n_val_runs`-th validation run (sanity checks excluded) over the first
`num_samples` validation samples of the whole job: each rank takes its share of its own
validation batches, and in `on_validation_epoch_end` every rank joins the metric sync (torchmetrics
gathers the states; the value is then the same on every rank). The reference of FID (the real
images' statistics) is computed at the first evaluated run and kept, in the callback's state too,
so later runs and resumed runs extract features of generated images only; or it is a cache file
from `tessera evaluate stats` (`reference_stats`).

Samples are drawn with a seed per (validation batch, rank), so every evaluated run sees the same
captions and the same noise and only the model changes. The two callbacks sample separately.
Under FSDP2 each rank samples its own share with the sharded model, as under DDP, and a rank with
nothing to take from a batch that another rank samples from draws one sample it drops: every call
of the sharded model needs all ranks (`callbacks.samples.every_rank_samples`). FSDP1 is refused.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.samples import every_rank_samples
from datamodules.stream import without_padding
from tessera.pixels import to_uint8, to_unit_range
from tessera.clip_score import ClipScore, with_prefix
from tessera.fid import FeatureStats, FrechetDistance
from tessera.sampling import SamplingConfig


class _ValidationEvaluation(L.Callback):
    """Which validation runs are evaluated, and each rank's share of the samples."""

    def __init__(self, every_n_val_runs: int, num_samples: int, seed: int, sampling: SamplingConfig):
        if every_n_val_runs < 1 or num_samples < 2:
            raise ValueError(f"every_n_val_runs must be >= 1 and num_samples >= 2, got {every_n_val_runs}, {num_samples}")
        self.every_n_val_runs = every_n_val_runs
        self.num_samples = num_samples
        self.seed = seed
        self.sampling = sampling
        self.val_runs = 0  # validation runs seen, sanity checks excluded
        self.active = False
        self.taken = 0  # samples this rank has taken in the current run
        self.sharded = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.sharded = every_rank_samples(trainer, type(self).__name__)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = False
        if trainer.sanity_checking:
            return
        self.val_runs += 1
        self.active = self.val_runs % self.every_n_val_runs == 0
        self.taken = 0

    def quota(self, trainer: L.Trainer) -> int:
        """This rank's share of num_samples."""
        share, extra = divmod(self.num_samples, trainer.world_size)
        return share + (trainer.global_rank < extra)

    def take(self, trainer: L.Trainer, batch: dict) -> int:
        """How many of this batch's samples to use (0 when not evaluating or the share is full)."""
        if not self.active:
            return 0
        take = min(self.quota(trainer) - self.taken, len(batch["text_ids"] if "text_ids" in batch else batch["images"]))
        self.taken += max(take, 0)
        return max(take, 0)

    def batch_seed(self, trainer: L.Trainer, batch_idx: int) -> int:
        return self.seed + batch_idx * trainer.world_size + trainer.global_rank

    def joins_another_ranks_call(self, trainer: L.Trainer, pl_module: L.LightningModule, take: int, batch: dict) -> bool:
        """Under FSDP2, when this rank takes nothing from a batch that another rank takes samples
        from: one sample drawn (or one image reconstructed) and dropped, this rank's part in the
        other's calls of the sharded model. Returns whether it did."""
        if not (self.sharded and self.active):
            return False
        most = trainer.strategy.reduce(torch.tensor(take, device=pl_module.device), reduce_op="max")  # every rank, every batch
        if take > 0 or most == 0:
            return False
        if hasattr(pl_module, "generate"):
            pl_module.generate([""], self.sampling, seed=self.seed)
        else:
            pl_module.decode(pl_module.encode(_images_uint8_and_unit(batch["images"][:1])[1]))
        return True

    def state_dict(self) -> dict:
        return {"val_runs": self.val_runs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.val_runs = state_dict["val_runs"]


def _images_uint8_and_unit(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's images as uint8 and as floats in [-1, 1], whichever the loader gave."""
    if images.dtype == torch.uint8:
        return images, to_unit_range(images)
    return to_uint8(images), images


class FIDCallback(_ValidationEvaluation):
    """Logs `name` (FID; rFID for a tokenizer) and `<name>_samples` every `every_n_val_runs` validation runs.

    Args:
        every_n_val_runs: evaluate on every n-th validation run.
        num_samples: images compared, over all ranks (FID is biased upwards for small counts:
            compare runs at the same count only).
        inception_weights: the FID Inception weights file; None looks in $TORCH_HOME/hub/checkpoints.
        feature_extractor: a module mapping (B, 3, H, W) uint8 to (B, D) features instead of Inception.
        reference_stats: a `tessera evaluate stats` file to compare against instead of the validation images
            (refused if made with other feature weights; a kept reference of other weights is recomputed).
        name: the logged metric's name.
        seed, top_k, top_p, temperature, cfg_scale: sampling, for a prior.
    """

    def __init__(
        self,
        every_n_val_runs: int = 1,
        num_samples: int = 1000,
        inception_weights: str | None = None,
        feature_extractor: nn.Module | None = None,
        reference_stats: str | None = None,
        name: str = "val/fid",
        seed: int = 0,
        top_k: int | None = 256,
        top_p: float | None = None,
        temperature: float = 1.0,
        cfg_scale: float = 1.0,
    ):
        sampling = SamplingConfig(top_k=top_k, top_p=top_p, temperature=temperature, cfg_scale=cfg_scale)
        super().__init__(every_n_val_runs, num_samples, seed, sampling)
        self.inception_weights = inception_weights
        self.feature_extractor = feature_extractor
        self.reference_stats = reference_stats
        self.name = name
        self.metric: FrechetDistance | None = None
        self.reference: FeatureStats | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not (hasattr(pl_module, "generate") or hasattr(pl_module, "decode")):
            raise ValueError("FIDCallback needs a prior (generate) or a tokenizer (encode/decode)")
        if self.metric is None:
            self.metric = FrechetDistance(self.feature_extractor, self.inception_weights)
        if self.reference_stats is not None and self.reference is None:
            self.reference = FeatureStats.load(self.reference_stats, self.metric.extractor_id,
                                               weights_sha256=self.metric.weights_sha256)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        if self.active:
            self.metric = self.metric.to(pl_module.device)
            self.metric.reset()
            self.metric.reference = None
            if self.reference is not None and self.reference.weights_sha256 != self.metric.weights_sha256:
                # kept from a run with other feature weights (or saved before they were recorded): measure it again
                rank_zero_warn(f"FIDCallback: the kept reference statistics were made with feature weights of sha256 "
                               f"{self.reference.weights_sha256}, not {self.metric.weights_sha256}: recomputing them")
                self.reference = None
            if self.reference is not None:
                self.metric.set_reference(self.reference)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        real_rows = without_padding(batch)
        take = self.take(trainer, real_rows)
        if self.joins_another_ranks_call(trainer, pl_module, take, batch) or take == 0:
            return
        batch = real_rows
        if "images" not in batch and self.metric.reference is None:
            raise ValueError("FIDCallback: the validation batches have no images (token shards?): pass reference_stats")
        real = fake = None
        if "images" in batch:
            real, unit = _images_uint8_and_unit(batch["images"][:take])
        if hasattr(pl_module, "generate"):
            fake = pl_module.generate(list(batch["captions"][:take]), self.sampling, seed=self.batch_seed(trainer, batch_idx))
        else:
            fake = pl_module.decode(pl_module.encode(unit))
        if self.metric.reference is None:
            self.metric.update(real.to(pl_module.device), real=True)
        self.metric.update(to_uint8(fake).to(pl_module.device), real=False)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        self.active = False
        fid = self.metric.compute()  # every rank: the states are gathered here
        if self.metric.reference is None:
            self.reference = self.metric.statistics(real=True)  # a collective too; kept for later runs
        count = self.metric.statistics(real=False).count
        pl_module.log(self.name, fid.float(), on_epoch=True)
        pl_module.log(f"{self.name}_samples", float(count), on_epoch=True)
        self.metric.reset()

    def state_dict(self) -> dict:
        reference = None
        if self.reference is not None and self.reference_stats is None:
            r = self.reference
            reference = {"mean": r.mean.cpu(), "cov": r.cov.cpu(), "count": r.count, "extractor": r.extractor,
                         "preprocessing": r.preprocessing, "weights_sha256": r.weights_sha256}
        return {**super().state_dict(), "reference": reference}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("reference") is not None:
            self.reference = FeatureStats(**state_dict["reference"])


class CLIPScoreCallback(_ValidationEvaluation):
    """Logs `<prefix>_cosine` and `<prefix>_score` (see tessera.clip_score) every `every_n_val_runs` validation runs.

    Args:
        clip_weights: the open_clip weights file of `clip_model`.
        clip_model: an open_clip architecture ("ViT-B-32-quickgelu" for OpenAI's ViT-B/32).
        caption_prefix: put before every caption for the text encoder (e.g. "A photo depicts ").
        every_n_val_runs, num_samples, seed, top_k, top_p, temperature, cfg_scale: as FIDCallback.
        name: logged as `<name>_cosine` and `<name>_score`.
    """

    def __init__(
        self,
        clip_weights: str | None,
        clip_model: str = "ViT-B-32-quickgelu",
        caption_prefix: str = "",
        every_n_val_runs: int = 1,
        num_samples: int = 1000,
        name: str = "val/clip",
        seed: int = 0,
        top_k: int | None = 256,
        top_p: float | None = None,
        temperature: float = 1.0,
        cfg_scale: float = 1.0,
    ):
        sampling = SamplingConfig(top_k=top_k, top_p=top_p, temperature=temperature, cfg_scale=cfg_scale)
        super().__init__(every_n_val_runs, num_samples, seed, sampling)
        if clip_weights is not None and not Path(clip_weights).is_file():
            from tessera.clip_rerank import ClipScorer

            ClipScorer(clip_model, clip_weights)  # raises the error that names the file and where it comes from
        self.clip_weights, self.clip_model, self.caption_prefix, self.name = clip_weights, clip_model, caption_prefix, name
        self.scorer = None
        self.metric = ClipScore()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not hasattr(pl_module, "generate"):
            raise ValueError("CLIPScoreCallback needs a prior (a module with generate)")
        if self.scorer is None:
            from tessera.clip_rerank import ClipScorer

            self.scorer = ClipScorer(self.clip_model, self.clip_weights, pl_module.device)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        if self.active:
            self.metric = self.metric.to(pl_module.device)
            self.metric.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        real_rows = without_padding(batch)
        take = self.take(trainer, real_rows)
        if self.joins_another_ranks_call(trainer, pl_module, take, batch) or take == 0:
            return
        captions = list(real_rows["captions"][:take])
        images = pl_module.generate(captions, self.sampling, seed=self.batch_seed(trainer, batch_idx))
        self.metric.update(self.scorer(images, with_prefix(captions, self.caption_prefix)))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        self.active = False
        scores = self.metric.compute()  # every rank joins the sync
        pl_module.log(f"{self.name}_cosine", scores["clip_cosine"], on_epoch=True)
        pl_module.log(f"{self.name}_score", scores["clip_score"], on_epoch=True)
        self.metric.reset()
