"""
The text-image prior's LightningModule: next-token cross-entropy over [caption tokens][image tokens].

Batches come from CaptionImageDataModule, either with "images" (then the frozen stage-1
tokenizer encodes them on the fly) or, from token shards (`image_tokens: true`), with
"image_ids" already made by `tessera tokenize`. Both carry "text_ids" and "text_mask".

With a multi-scale tokenizer (tessera/nn/multiscale_tokenizer.py) the prior models its coarse
map; a `fine_stage` (lightning_modules/fine_stage.py) draws the fine map from each sampled coarse
map in `generate`.

Caption dropout replaces a share of the captions with the empty caption, so every model trained
with the defaults can sample with classifier-free guidance.

Start-up checks: the tokenizer's codebook size and id grid must match the transformer's image
vocabulary and grid, and the text tokenizer's vocabulary must fit the text embedding; the first
batch's text length and id grid are checked too. A mismatch is an error naming both numbers.

Strategies: DDP, or FSDP2 with the `Block`s as shard units (configs/trainer/fsdp.yaml,
`configure_model`); FSDP1 (lightning_modules.fsdp.AtomicFSDPStrategy) still trains and loads.
The frozen tokenizer lives outside the module tree: not in checkpoints, not wrapped by DDP or
FSDP, never cast by a precision plugin.

On disk: `load_prior` reads a .ckpt file, an FSDP sharded checkpoint directory or a `tessera export`
directory (`export_prior`: the transformer's weights as one safetensors file, plus config.json), and
builds the prior class they name (`class_path`: TextImagePrior or a subclass, such as the RQ prior).
"""

from __future__ import annotations

import importlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file, save_file

from datamodules.stream import without_padding
from datamodules.text import CLIP_BPE, CaptionTokenizer
from lightning_modules.clipping import clip_grad_norm
from lightning_modules.fsdp import (
    AtomicModelParallelStrategy,
    checkpoint_hyperparameters,
    is_sharded_checkpoint,
    load_sharded_state,
)
from lightning_modules.nonfinite import NonFiniteLossGuard, drop_gradients
from lightning_modules.parallel import FrozenModule, adjust_ddp, shard, unwrapped_name
from lightning_modules.vqgan import load_tokenizer
from tessera.flops import peak_bf16_flops
from tessera.lr_schedule import decay_end, lr_factor
from tessera.nn.multiscale_tokenizer import MultiScaleIds
from tessera.nn.transformer import TextImageTransformer, TransformerConfig
from tessera.nn.vq_tokenizer import CONFIG_FILE, WEIGHTS_FILE, VQTokenizer
from tessera.sampling import SamplingConfig, Steps, image_token_steps, sample_image_tokens


@dataclass
class PriorOptimizerConfig:
    """AdamW (decay on matrices only), warm-up then cosine, by training step."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    """LlamaGen and nanoGPT: (0.9, 0.95)."""
    weight_decay: float = 0.05
    """On weight matrices and embeddings; never on norms and biases."""
    warmup_steps: int = 1000
    schedule: Literal["constant", "cosine"] = "cosine"
    """Cosine decays to min_lr_ratio * lr at decay_steps, flat after."""
    decay_steps: int | None = None
    """The step the cosine ends; None: Trainer(max_steps)."""
    min_lr_ratio: float = 0.1
    gradient_clip_val: float | None = 1.0
    """Gradient-norm clip, also under FSDP (Trainer's own option raises there); None does not clip."""
    max_nonfinite_steps: int = 20
    """A step whose loss is not finite on some rank is skipped (no weight changes); this many in a row stop the run."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)


def adamw_with_schedule(groups: list[dict], config: PriorOptimizerConfig, device: torch.device, max_steps: int) -> dict:
    """AdamW over `groups` and its per-step warm-up and decay, as `configure_optimizers` returns them."""
    # fused kernels on CUDA and CPU: on two CPU cores the tiny prior's step is ~20% faster, its
    # optimizer step 7x (the 6.3M-entry caption embedding dominates the per-tensor foreach path)
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, **fused)
    total_steps = decay_end(config.schedule, config.decay_steps, max_steps)

    def factor(step: int) -> float:
        return lr_factor(step, config.warmup_steps, config.schedule, total_steps, config.min_lr_ratio)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class TextImagePrior(L.LightningModule):
    """Trains `transformer` on caption-then-image sequences; samples images with `generate`.

    Other stage-2 families subclass it (lightning_modules/rq_prior.py), replacing the network
    (`config_class`, `build_network`, `shard_units`, `entry_points`) and the ids it models
    (`id_shape`, `check_tokenizer`); steps, optimizer, logs, sampling and files on disk are shared."""

    config_class = TransformerConfig
    # the network's entry points besides forward, none calling another (FSDP2 gathers around each)
    entry_points = ("loss", "prefill", "decode_step")

    def __init__(
        self,
        transformer: TransformerConfig | None = None,
        tokenizer: str | None = None,
        text_tokenizer: str = CLIP_BPE,
        caption_dropout: float = 0.1,
        text_loss_weight: float = 1.0,
        image_loss_weight: float = 7.0,
        optimizer: PriorOptimizerConfig | None = None,
        compile: bool = False,
        peak_flops: float | None = None,
        sampling: SamplingConfig | None = None,
        fine_stage: str | None = None,
    ):
        """
        Args:
            transformer: the network; `TransformerConfig.from_name` presets are in configs/prior/.
            tokenizer: the stage-1 tokenizer, a VQGAN checkpoint or a `tessera export` directory.
                Needed to train on images and to sample; training on token shards can do without.
            text_tokenizer: "clip-bpe" or a `transformers` tokenizer name or directory; must be the
                one the data is tokenized with.
            caption_dropout: share of training captions replaced by the empty caption (for guidance).
            text_loss_weight: weight of the caption tokens' cross-entropy (DALL-E: 1 of 8); 0 builds
                no text head, which dominates a small model's compute (LlamaGen trains no text loss).
            image_loss_weight: weight of the image tokens' cross-entropy (DALL-E: 7 of 8).
            optimizer: AdamW and its schedule.
            compile: torch.compile each transformer block in place, and the heads with their fp32
                cross-entropy as one graph (`TextImageTransformer.head_losses`), whose fp32 logits
                are then never stored; state-dict keys stay those of the module as built.
            peak_flops: dense bf16 peak FLOP/s of one device, for the logged MFU. None looks the GPU
                up by name in `tessera.flops.PEAK_BF16_FLOPS`; a GPU not there logs no MFU (and says
                so once), a CPU none.
            sampling: how this prior's images are drawn unless told otherwise (`generate` without
                settings, `tessera sample`, `tessera evaluate`): the settings it was tuned with,
                kept in its checkpoints and exports. None: SamplingConfig's defaults.
            fine_stage: with a multi-scale `tokenizer`, whose coarse map this prior models: a
                FineStage checkpoint or export; `generate` then draws the fine map from every
                sampled coarse map and decodes both. None decodes the coarse map alone.
        """
        super().__init__()
        if isinstance(transformer, dict):  # a checkpoint's hyperparameters
            transformer = self.config_class(**transformer)
        if isinstance(optimizer, dict):
            optimizer = PriorOptimizerConfig(**optimizer)
        if isinstance(sampling, dict):
            sampling = SamplingConfig(**sampling)
        self.sampling = sampling
        self.config = transformer if transformer is not None else self.config_class()
        self.optimizer_config = optimizer if optimizer is not None else PriorOptimizerConfig()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        # plain dicts, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                CLASS_PATH: f"{type(self).__module__}.{type(self).__qualname__}",  # what `load_prior` builds
                "transformer": asdict(self.config),
                "tokenizer": tokenizer,
                "text_tokenizer": text_tokenizer,
                "caption_dropout": caption_dropout,
                "text_loss_weight": text_loss_weight,
                "image_loss_weight": image_loss_weight,
                "optimizer": asdict(self.optimizer_config),
                "compile": compile,
                "sampling": asdict(sampling) if sampling is not None else None,
                # only when given: a prior without one keeps the arguments of every other prior family
                **({"fine_stage": fine_stage} if fine_stage is not None else {}),
            }
        )
        self.transformer = self.build_network(self.config, text_loss_weight)
        self.captions = CaptionTokenizer(text_tokenizer, self.config.text_length)
        if self.captions.vocab_size > self.config.text_vocab_size:
            raise ValueError(
                f"text tokenizer {text_tokenizer!r} has {self.captions.vocab_size} tokens but the transformer's "
                f"text_vocab_size is {self.config.text_vocab_size}"
            )
        self.image_tokenizer = FrozenModule(load_tokenizer(tokenizer)) if tokenizer is not None else None
        if self.image_tokenizer is not None:
            self.check_tokenizer(self.image_tokenizer.module, tokenizer)
        self.fine_stage = self._load_fine_stage(fine_stage, tokenizer)
        null = self.captions([""])  # the empty caption: what caption dropout trains and guidance contrasts with
        self.register_buffer("null_text_ids", null.ids[0], persistent=False)  # (T,)
        self.register_buffer("null_text_mask", null.mask[0], persistent=False)  # (T,)
        # counted here, before FSDP shards the parameters (a shard's numel would undercount them)
        self.flops_per_token = self.transformer.flops_per_token()
        # and the weight-decayed parameters chosen by shape here too: FSDP1 flattens them all to 1-D
        self.decayed = {name for name, p in self.transformer.named_parameters() if p.dim() >= 2}
        self.peak_flops = peak_flops  # a property of the machine, not the model: not a hyperparameter
        self._device_peak_flops: float | None = None  # what MFU divides by, found at the start of training
        self._last_step_time: float | None = None
        self.nonfinite = NonFiniteLossGuard(self.optimizer_config.max_nonfinite_steps)

    def _load_fine_stage(self, path: str | None, tokenizer: str | None) -> FrozenModule | None:
        if path is None:
            return None
        from lightning_modules.fine_stage import check_fine_stage_fits, load_fine_stage  # it imports this module

        if self.image_tokenizer is None:
            raise ValueError("a fine_stage needs the multi-scale `tokenizer` whose fine map it draws")
        stage = load_fine_stage(path)
        check_fine_stage_fits(self.image_tokenizer.module, stage.config, tokenizer)
        return FrozenModule(stage)

    @staticmethod
    def build_network(config: TransformerConfig, text_loss_weight: float) -> TextImageTransformer:
        return build_transformer(config, text_loss_weight)

    def check_tokenizer(self, tokenizer: VQTokenizer, path: str) -> None:
        check_tokenizer_fits(tokenizer, self.config, path)

    @property
    def id_shape(self) -> tuple[int, ...]:
        """The shape of one image's ids, as the tokenizer encodes and decodes them."""
        return (self.config.image_grid, self.config.image_grid)

    # -------------------------------------------------------------------------
    # sampling

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingConfig | None = None, seed: int = 0) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] for `prompts`, reproducible for a seed; drawn with
        `sampling`, else with the prior's own settings (its `sampling` argument)."""
        if self.image_tokenizer is None:
            raise ValueError("generate needs the stage-1 tokenizer: set `tokenizer` to its checkpoint or export")
        sampling = sampling or self.sampling or SamplingConfig()
        text_ids = self.captions(prompts).ids.to(self.device)
        generator = torch.Generator(self.device).manual_seed(seed)
        autocast = torch.autocast("cuda", torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            ids = sample_image_tokens(self.transformer, text_ids, sampling, generator, null_text_ids=self.null_text_ids)
        ids = ids.view(len(prompts), *self.id_shape)
        if self.fine_stage is not None:  # the fine map drawn from the coarse one, in one pass
            ids = MultiScaleIds(ids, self.fine_stage.on(self.device).generate(ids, generator))
        return self.image_tokenizer.on(self.device).decode(ids).float()

    # -------------------------------------------------------------------------
    # likelihood, for lossless coding (tessera/coding.py, `tessera compress`)

    coded_kind = "tokens"
    """What `symbol_steps` predicts: the tokenizer's ids ("tokens"), or a pixel model's subpixels ("pixels")."""

    @property
    def alphabet_size(self) -> int:
        """Values one of the `id_shape` symbols can take."""
        return self.config.image_vocab_size

    def symbol_steps(self, captions: list[str]) -> Steps:
        """This prior's distributions over the ids of one image a caption, one id at a time
        (`id_shape`, row-major), as `tessera.sampling.Steps`: the plain conditional likelihood (no
        guidance) through the KV-cached loop the sampler runs, in the module's dtype on its device.
        Eval mode and no_grad are the caller's."""
        return image_token_steps(self.transformer, self.captions(captions).ids.to(self.device))

    # -------------------------------------------------------------------------
    # training

    def configure_model(self) -> None:
        strategy = self.trainer.strategy if self._trainer is not None else None
        adjust_ddp(strategy)
        if isinstance(strategy, AtomicModelParallelStrategy):
            shard(self.transformer, self.shard_units(), strategy, str(self.trainer.precision), self.hparams.compile,
                  methods=self.entry_points)
        elif self.hparams.compile:
            for block in self.shard_units():
                block.compile()
        if self.hparams.compile:
            # one graph for the heads and their fp32 cross-entropy, beside the blocks' (compiled in
            # place, under FSDP2 after sharding); the embeddings stay eager, a lookup each
            self.transformer.head_losses = torch.compile(self.transformer.head_losses)

    def shard_units(self) -> list[nn.Module]:
        """The network's blocks: FSDP2's shard units, and what `compile` compiles."""
        return list(self.transformer.blocks)

    def on_train_start(self) -> None:
        self._device_peak_flops = peak_flops_for_mfu(self.device, self.peak_flops)

    def image_ids(self, batch: dict) -> torch.Tensor:
        """(B, N) ids of the batch's images, row-major ((B, N, D) for residual ids); encoded here
        when the batch has images."""
        if "image_ids" in batch:
            ids = batch["image_ids"]
        elif self.image_tokenizer is None:
            raise ValueError("the batch has images but no `tokenizer` was given to encode them")
        else:
            ids = self.image_tokenizer.on(self.device).encode(batch["images"])
            if isinstance(ids, MultiScaleIds):  # the prior models the coarse map, the fine stage the fine one
                ids = ids.coarse
        return self.checked_ids(ids)

    def checked_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """A batch's ids (B, *id_shape) with the grid's positions flattened row-major, checked first."""
        if ids.shape[1:] != self.id_shape:
            raise ValueError(
                f"the batch's image ids form a grid of {tuple(ids.shape[1:])}, the transformer expects {self.id_shape}: "
                "check the data's image_size against the tokenizer's downsampling factor and transformer.image_grid"
            )
        return ids.flatten(1, 2)

    def text(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        text_ids, text_mask = batch["text_ids"], batch["text_mask"]
        if text_ids.shape[1] != self.config.text_length:
            raise ValueError(
                f"the batch's captions have {text_ids.shape[1]} tokens, the transformer's text_length is "
                f"{self.config.text_length}: set the datamodule's text_length to match"
            )
        return text_ids, text_mask

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        text_ids, text_mask = self.text(batch)
        image_ids, image_targets = self.training_targets(batch)
        if self.hparams.caption_dropout > 0:
            dropped = self.dropped_captions(len(text_ids))  # (B,)
            text_ids = torch.where(dropped[:, None], self.null_text_ids, text_ids)
            text_mask = torch.where(dropped[:, None], self.null_text_mask, text_mask)
        losses = self.transformer.loss(
            text_ids, text_mask, image_ids, self.hparams.text_loss_weight, self.hparams.image_loss_weight, image_targets
        )
        self.nonfinite.observe(losses["loss"])
        self.log("train/loss", losses["loss"], prog_bar=True)
        self.log_dict({f"train/{name}": losses[name] for name in ("text_loss", "image_loss") if name in losses})
        self.log("train/nonfinite_skipped", host_scalar(self.nonfinite.skipped))
        self.log_throughput(len(text_ids))
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer) -> None:
        # after every micro-batch's backward, before clipping: a non-finite step updates no weight,
        # yet Lightning still counts it, so schedules and step numbers stay on the batches
        if not self.nonfinite.step_is_finite(self.global_step):
            drop_gradients(optimizer)

    def training_targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a training step's image loss is taken against: the ids, and soft targets or None."""
        return self.image_ids(batch), None

    def dropped_captions(self, batch_size: int) -> torch.Tensor:
        """(B,) bool on the module's device: which captions this batch replaces by the empty one,
        drawn with `batch_seed`. The generator is on the module's device: a mask drawn on the CPU
        would be a blocking copy to the GPU every step."""
        generator = torch.Generator(self.device).manual_seed(self.batch_seed())
        return torch.rand(batch_size, generator=generator, device=self.device) < self.hparams.caption_dropout

    def batch_seed(self) -> int:
        """A seed for this training batch's random draws: the count of training batches so far (saved
        in the checkpoint's loop state) and the rank, not the global RNG, so a resumed run draws
        exactly what the uninterrupted run would have."""
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready if self._trainer else 0
        return batches * 4096 + self.global_rank

    def log_throughput(self, batch_size: int) -> None:
        """tokens/s, samples/s and MFU of the whole job, from the wall time between training steps."""
        now = time.perf_counter()
        if self._last_step_time is not None:
            logs = throughput_logs(batch_size, batch_size * self.config.sequence_length, now - self._last_step_time,
                                   self.trainer.world_size, self.flops_per_token, self._device_peak_flops)
            self.log_dict({name: host_scalar(value) for name, value in logs.items()}, rank_zero_only=True)
        self._last_step_time = now

    # -------------------------------------------------------------------------
    # validation: sums over every real sample, added up over the ranks at the end, so the logged
    # losses are the same on one process or many and for any batch size; padding never counts

    def on_validation_epoch_start(self) -> None:
        # [caption cross-entropy, caption targets, image cross-entropy (per-sample means), samples]
        self.val_sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        real = without_padding(batch)
        # a batch of padding only still goes through the model, counted for nothing: under FSDP
        # every rank must take part in every forward
        counted = len(real["text_ids"]) > 0
        batch = real if counted else batch
        text_ids, text_mask = self.text(batch)
        losses = self.transformer.loss(
            text_ids, text_mask, self.image_ids(batch), self.hparams.text_loss_weight, self.hparams.image_loss_weight
        )
        if not counted:
            return
        targets = text_mask[:, 1:].sum().double()  # the caption tokens predicted (padding is never a target)
        text = losses["text_loss"].double() * targets if "text_loss" in losses else targets.new_zeros(())
        samples = targets.new_tensor(len(text_ids))
        self.val_sums += torch.stack([text, targets, losses["image_loss"].double() * samples, samples])

    def on_validation_epoch_end(self) -> None:
        self._last_step_time = None  # the validation pause is not a training step
        text, targets, image, samples = self.trainer.strategy.reduce(self.val_sums, reduce_op="sum")
        if samples == 0:
            return
        w_text, w_image = self.hparams.text_loss_weight, self.hparams.image_loss_weight
        logs = {"val/image_loss": image / samples, "val/samples": samples}
        logs["val/loss"] = logs["val/image_loss"]
        # the likelihood of the tokenizer's (lossy) codes, not of the pixels: in bits, per id (per
        # code of an RQ prior) and per image, the length a range coder of those ids would reach
        logs["val/bits_per_image_token"] = logs["val/image_loss"] / math.log(2)
        logs["val/bits_per_image"] = logs["val/bits_per_image_token"] * math.prod(self.id_shape)
        if w_text > 0:  # the whole set's means, weighted as TextImageTransformer.loss weights a batch's
            logs["val/text_loss"] = text / targets
            logs["val/loss"] = (w_text * logs["val/text_loss"] + w_image * logs["val/image_loss"]) / (w_text + w_image)
        # every rank holds the same values: syncing only keeps Lightning from warning that they were not
        self.log_dict({name: value.float() for name, value in logs.items()}, sync_dist=True)

    def parameter_groups(self) -> list[dict]:
        """AdamW's groups: decay on the matrices and embeddings, none on norms and biases, chosen by
        the names recorded before any wrapping (whose prefixes are dropped here)."""
        named = [(unwrapped_name(name), p) for name, p in self.transformer.named_parameters() if p.requires_grad]
        return [
            {"params": [p for name, p in named if name in self.decayed], "weight_decay": self.optimizer_config.weight_decay},
            {"params": [p for name, p in named if name not in self.decayed], "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        return adamw_with_schedule(self.parameter_groups(), self.optimizer_config, self.device, self.trainer.max_steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "nonfinite" in checkpoint:
            self.nonfinite.load_state_dict(checkpoint["nonfinite"])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = self.optimizer_config.gradient_clip_val
        if clip is None:
            return
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # the sharded norm needs FSDP's own all-reduce; Lightning's clip_gradients raises under FSDP
            self.trainer.strategy.model.clip_grad_norm_(clip)
        else:
            clip_grad_norm(self, optimizer, clip)


def host_scalar(value: float) -> torch.Tensor:
    """A number to log, as a CPU tensor: Lightning copies a Python number to the module's device,
    a blocking host-to-GPU copy each time."""
    return torch.tensor(float(value))


def throughput_logs(samples: int, tokens: int, seconds: float, world: int, flops_per_token: float,
                    peak_flops: float | None) -> dict[str, float]:
    """The job's samples/s, tokens/s and (given a peak) MFU, from one rank's training step of
    `samples` and `tokens` that took `seconds`, every rank alike."""
    logs = {"throughput/samples_per_s": samples * world / seconds, "throughput/tokens_per_s": tokens * world / seconds}
    if peak_flops is not None:
        logs["throughput/mfu"] = logs["throughput/tokens_per_s"] * flops_per_token / (peak_flops * world)
    return logs


def peak_flops_for_mfu(device: torch.device, peak_flops: float | None) -> float | None:
    """`peak_flops` when given, else the table's figure for this GPU; None (no MFU) on a CPU, or on a
    GPU the table lacks, which is said once (at the start of training) instead of an MFU against a
    wrong peak."""
    if peak_flops is not None:
        return peak_flops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_bf16_flops(name)
    if peak is None:
        rank_zero_warn(
            f"no dense bf16 peak FLOP/s is known for {name!r}, so no MFU is logged: set the prior's "
            "peak_flops (--model.init_args.peak_flops) to one device's peak to log it"
        )
    return peak


def build_transformer(config: TransformerConfig, text_loss_weight: float) -> TextImageTransformer:
    """The prior's network; without a text head when the caption loss has no weight, as its checkpoints
    and exports then hold none (under DDP a parameter that never gets a gradient fails the step after)."""
    return TextImageTransformer(config, text_head=text_loss_weight > 0)


def check_tokenizer_fits(tokenizer: VQTokenizer, config: TransformerConfig, path: str) -> None:
    """Clear errors when the stage-1 tokenizer and the transformer disagree."""
    check_codebook_and_grid(tokenizer, config, path)
    if "ResidualQuantizer" in tokenizer.describe()["quantizer"]["class_path"]:
        raise ValueError(
            f"tokenizer {path} is residual ((h, w, depth) ids): this prior models one id per position; "
            "use a VectorQuantizer, LookupFreeQuantizer, FiniteScalarQuantizer or GumbelQuantizer tokenizer, "
            "or model its ids with the RQ-Transformer (lightning_modules.rq_prior.RQTransformerPrior, configs/prior/rq_*.yaml)"
        )


def check_codebook_and_grid(tokenizer: VQTokenizer, config: TransformerConfig, path: str) -> None:
    """Clear errors when the tokenizer's codebook or id grid is not the transformer's."""
    description = tokenizer.describe()
    if description["codebook_size"] != config.image_vocab_size:
        raise ValueError(
            f"tokenizer {path} has {description['codebook_size']} codes but transformer.image_vocab_size is "
            f"{config.image_vocab_size}"
        )
    if description["latent_size"] != config.image_grid:
        raise ValueError(
            f"tokenizer {path} makes {description['latent_size']}x{description['latent_size']} id grids at its "
            f"{description['autoencoder']['image_size']} px but transformer.image_grid is {config.image_grid}"
        )


# -----------------------------------------------------------------------------
# a prior on disk: a training checkpoint (.ckpt file or FSDP sharded directory) or an export
# (model.safetensors: the transformer's fp32 weights; config.json: the prior's class and arguments)

PREFIX = "transformer."  # the transformer's entries in the LightningModule's state dict
CLASS_PATH = "class_path"  # the prior's class among its saved arguments; absent in older files: TextImagePrior


def prior_config(path: str | Path) -> dict[str, Any]:
    """TextImagePrior's constructor arguments, as a checkpoint or an export holds them."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        config = json.loads((path / CONFIG_FILE).read_text())
    else:
        config = checkpoint_hyperparameters(path)
    if "transformer" not in config:
        raise ValueError(f"{path} is not a TextImagePrior checkpoint or export: its config has no transformer")
    return config


def prior_class(config: dict[str, Any]) -> type[TextImagePrior]:
    """The class of the prior whose saved arguments are `config`: the one its `class_path` names."""
    module, _, name = config.get(CLASS_PATH, f"{__name__}.TextImagePrior").rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, TextImagePrior)):
        raise ValueError(f"{config[CLASS_PATH]!r} is not a prior class: a subclass of TextImagePrior was expected")
    return cls


def build_prior(config: dict[str, Any]) -> TextImagePrior:
    """The prior a checkpoint's or export's saved arguments describe, with fresh weights."""
    return prior_class(config)(**{name: value for name, value in config.items() if name != CLASS_PATH})


def load_transformer_weights(transformer: nn.Module, path: str | Path, prefix: str = PREFIX) -> None:
    """Copy the weights of a prior checkpoint or export at `path` into `transformer`, the module
    whose state-dict entries in the LightningModule start with `prefix`."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        transformer.load_state_dict(load_file(path / WEIGHTS_FILE))
        return
    if is_sharded_checkpoint(path):
        weights = load_sharded_state(path, prefix, transformer.state_dict())
    else:
        weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    transformer.load_state_dict({name.removeprefix(prefix): w for name, w in weights.items() if name.startswith(prefix)})


def load_prior(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    tokenizer: str | Path | None = None,
    fine_stage: str | Path | None = None,
) -> TextImagePrior:
    """A prior (TextImagePrior or the subclass it was saved as) in eval mode from a .ckpt file, an
    FSDP sharded checkpoint directory or a `tessera export` directory; `tokenizer` replaces the
    stage-1 tokenizer the checkpoint names, `fine_stage` the multi-scale fine stage (or adds one to a
    prior trained without)."""
    config = prior_config(path)
    if tokenizer is not None:
        config["tokenizer"] = str(tokenizer)
    if fine_stage is not None:
        config["fine_stage"] = str(fine_stage)
    prior = build_prior(config)
    load_transformer_weights(prior.transformer, path)
    return prior.to(map_location).eval()


def export_prior(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """A prior checkpoint (.ckpt file or FSDP sharded directory) -> OUT/model.safetensors (the
    transformer's weights in one file, fp32) + OUT/config.json (TextImagePrior's arguments), what
    `load_prior(out)` reads. Returns the config."""
    config = prior_config(checkpoint)
    # the transformer alone, fp32 on the CPU (load_state_dict casts bf16 weights up to it):
    # neither the stage-1 tokenizer nor a GPU need be here
    cls = prior_class(config)
    transformer = cls.build_network(cls.config_class(**config["transformer"]), config["text_loss_weight"])
    load_transformer_weights(transformer, checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(transformer.state_dict(), str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config
