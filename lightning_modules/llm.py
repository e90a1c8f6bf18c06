"""
A pretrained `transformers` language model trained to draw and to caption images: the stage-1
tokenizer's codes are tokens of its vocabulary (tessera/llm.py), and every batch mixes
caption-then-image sequences with image-then-caption ones (Chameleon, Liquid).

Batches are CaptionImageDataModule's, with "images" (the frozen tokenizer encodes them here) or
"image_ids" from token shards; the captions are tokenized here, from the batch's "captions", with
the language model's own tokenizer (the datamodule's "text_ids" are not used), so the model
never sees ids of another vocabulary.

Validation runs every pair both ways: val/image_loss over the codes (with <boi> and <eoi>) drawn
from the caption, val/caption_loss over the caption (with <eos>) drawn from the image.

Optimizer, schedule, gradient clipping and the non-finite step guard are the prior's
(`PriorOptimizerConfig`). Strategies: DDP, or FSDP2 with the model's own decoder-layer class as
the shard unit (`configure_model`). The frozen tokenizer lives outside the module tree, as in
TextImagePrior.

On disk: `load_llm` reads a .ckpt file, an FSDP sharded checkpoint directory or an `export_llm`
directory: a plain `transformers` checkpoint (model and tokenizer, image tokens included) that
loads without Tessera, the image tokenizer in image_tokenizer/ and this module's settings in
tessera.json.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn

from datamodules.stream import without_padding
from datamodules.text import clean_caption, new_text_tokenizer
from lightning_modules.clipping import clip_grad_norm
from lightning_modules.fsdp import AtomicModelParallelStrategy, checkpoint_hyperparameters, is_sharded_checkpoint
from lightning_modules.nonfinite import NonFiniteLossGuard, drop_gradients
from lightning_modules.parallel import FrozenModule, adjust_ddp, shard
from lightning_modules.prior import (
    PriorOptimizerConfig,
    adamw_with_schedule,
    host_scalar,
    load_prior,
    load_transformer_weights,
    peak_flops_for_mfu,
    prior_config,
    throughput_logs,
)
from lightning_modules.vqgan import load_tokenizer
from tessera.llm import (
    IMAGE,
    TEXT,
    BackboneConfig,
    add_image_tokens,
    build_sequences,
    generate_text,
    load_backbone,
    sample_image_codes,
    sequence_loss,
)
from tessera.flops import causal_lm_flops_per_token
from tessera.nn.vq_tokenizer import VQTokenizer
from tessera.sampling import SamplingConfig

EXPORT_CONFIG = "tessera.json"
IMAGE_TOKENIZER_DIR = "image_tokenizer"


class LLMTextImageModel(L.LightningModule):
    """A causal LM over text and image tokens; draws images with `generate`, captions with `caption`."""

    def __init__(
        self,
        backbone: BackboneConfig,
        codebook_size: int,
        image_grid: int,
        tokenizer: str | None = None,
        text_length: int = 64,
        image_to_text: float = 0.5,
        caption_dropout: float = 0.1,
        text_loss_weight: float = 1.0,
        image_loss_weight: float = 1.0,
        z_loss_weight: float = 0.0,
        optimizer: PriorOptimizerConfig | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
        sampling: SamplingConfig | None = None,
        peak_flops: float | None = None,
    ):
        """
        Args:
            backbone: the language model, a local checkpoint directory or a config (random weights).
            codebook_size: the stage-1 tokenizer's codes, each a new token.
            image_grid: the side of its id grid: an image is image_grid**2 tokens.
            tokenizer: the stage-1 tokenizer, a VQGAN checkpoint or a `tessera export` directory.
                Needed to train on images, to sample and to caption; token shards can do without.
            text_length: caption tokens kept (the rest cut), without special tokens.
            image_to_text: share of each batch's pairs that caption their image (Liquid's 1 - T2I_ratio,
                0.5); the rest draw the image from the caption.
            caption_dropout: share of text-to-image captions replaced by the empty caption (for guidance).
            text_loss_weight: weight of the caption tokens' cross-entropy, both directions.
            image_loss_weight: weight of <boi>, the codes and <eoi> in text-to-image sequences.
            z_loss_weight: weight of Chameleon's z-loss, the mean of log^2 of the softmax normaliser
                (1e-5 reported, unverified); 0 adds none.
            optimizer: AdamW and its schedule, as the prior's.
            compile: torch.compile each decoder layer in place.
            activation_checkpointing: recompute each decoder layer's activations in the backward
                pass (`transformers`' gradient checkpointing, non-reentrant) instead of keeping them:
                what a 7B model's batch needs to fit, for about a third more compute a step.
            sampling: how images are drawn unless told otherwise (`generate` without settings,
                `tessera sample`); kept in checkpoints and exports. None: SamplingConfig's defaults.
            peak_flops: dense bf16 peak FLOP/s of one device, for the logged MFU, as the prior's.
        """
        super().__init__()
        if isinstance(backbone, dict):  # a checkpoint's hyperparameters
            backbone = BackboneConfig(**backbone)
        if isinstance(optimizer, dict):
            optimizer = PriorOptimizerConfig(**optimizer)
        if isinstance(sampling, dict):
            sampling = SamplingConfig(**sampling)
        for name, share in (("image_to_text", image_to_text), ("caption_dropout", caption_dropout)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {share}")
        if min(text_loss_weight, image_loss_weight, z_loss_weight) < 0 or text_loss_weight + image_loss_weight <= 0:
            raise ValueError("loss weights must be >= 0, and the text and image weights not both 0")
        self.sampling = sampling
        self.optimizer_config = optimizer if optimizer is not None else PriorOptimizerConfig()
        # plain dicts, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "backbone": asdict(backbone), "codebook_size": codebook_size, "image_grid": image_grid,
                "tokenizer": tokenizer, "text_length": text_length, "image_to_text": image_to_text,
                "caption_dropout": caption_dropout, "text_loss_weight": text_loss_weight,
                "image_loss_weight": image_loss_weight, "z_loss_weight": z_loss_weight,
                "optimizer": asdict(self.optimizer_config), "compile": compile,
                "activation_checkpointing": activation_checkpointing,
                "sampling": asdict(sampling) if sampling is not None else None,
            }
        )
        # a tokenizer of its own: tokens are added to it
        text_tokenizer = new_text_tokenizer(backbone.tokenizer) if backbone.tokenizer else None
        self.model, self.text_tokenizer = load_backbone(backbone, text_tokenizer)
        self.vocab = add_image_tokens(self.model, self.text_tokenizer, codebook_size)
        self.eos_id = self.text_tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the backbone's tokenizer has no eos token: a caption drawn from an image could never end")
        self.pad_id = self.text_tokenizer.pad_token_id if self.text_tokenizer.pad_token_id is not None else self.eos_id
        # what every sequence starts with: the tokenizer's bos where it has one, as in pretraining
        self.prefix = [self.text_tokenizer.bos_token_id] if self.text_tokenizer.bos_token_id is not None else []
        longest = len(self.prefix) + text_length + image_grid**2 + 3  # <boi>, <eoi>, and <eos> after a caption
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and longest > positions:
            raise ValueError(
                f"sequences of up to {longest} tokens ({text_length} caption tokens, {image_grid}x{image_grid} codes and "
                f"the special tokens) exceed the backbone's max_position_embeddings {positions}: shorten text_length "
                "or use a tokenizer with a smaller grid"
            )
        self.image_tokenizer = FrozenModule(load_tokenizer(tokenizer)) if tokenizer is not None else None
        if self.image_tokenizer is not None:
            check_image_tokenizer(self.image_tokenizer.module, codebook_size, image_grid, tokenizer)
        self.nonfinite = NonFiniteLossGuard(self.optimizer_config.max_nonfinite_steps)
        self.peak_flops = peak_flops  # a property of the machine, not the model: not a hyperparameter
        self._device_peak_flops: float | None = None
        self._last_step_time: float | None = None

    def caption_ids(self, captions: list[str]) -> list[list[int]]:
        """Each caption's token ids without special tokens, cut to text_length; cleaned as the
        datamodules clean every caption (`clean_caption`: mojibake mended, whitespace collapsed,
        lowercased), at training and at sampling alike."""
        # split_special_tokens: "<boi>" or "</s>" typed in an alt-text is text, not a control token
        ids = self.text_tokenizer([clean_caption(c) for c in captions], add_special_tokens=False,
                                  split_special_tokens=True)["input_ids"]
        return [row[: self.hparams.text_length] for row in ids]

    # -------------------------------------------------------------------------
    # sampling

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingConfig | None = None, seed: int = 0) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] for `prompts`, reproducible for a seed; drawn with
        `sampling`, else with the model's own settings (its `sampling` argument)."""
        image_tokenizer = self._image_tokenizer("generate")
        sampling = sampling or self.sampling or SamplingConfig()
        generator = torch.Generator(self.device).manual_seed(seed)
        prompt_ids = [self.prefix + caption for caption in self.caption_ids(prompts)]
        grid = self.hparams.image_grid
        with evaluating(self.model), self._autocast():
            codes = sample_image_codes(self.model, self.vocab, prompt_ids, grid * grid, sampling, generator,
                                       null_prompt=self.prefix, pad=self.pad_id)  # (B, grid * grid)
        return image_tokenizer.decode(codes.view(len(prompts), grid, grid)).float()

    @torch.no_grad()
    def caption(self, images: torch.Tensor, sampling: SamplingConfig | None = None, seed: int = 0,
                max_new_tokens: int | None = None) -> list[str]:
        """A caption for each image (B, 3, H, W) in [-1, 1]: greedy, or drawn with `sampling`'s
        temperature, top-k and top-p; at most max_new_tokens tokens (default text_length + 1)."""
        codes = self.image_codes({"images": images.to(self.device)}, self._image_tokenizer("caption"))
        prompts = [self.prefix + [self.vocab.boi, *(row + self.vocab.first_code).tolist(), self.vocab.eoi] for row in codes]
        generator = torch.Generator(self.device).manual_seed(seed)
        with evaluating(self.model), self._autocast():
            ids = generate_text(self.model, self.vocab, prompts, max_new_tokens or self.hparams.text_length + 1,
                                self.eos_id, sampling, generator, pad=self.pad_id)
        return self.text_tokenizer.batch_decode(ids, skip_special_tokens=True)

    @property
    def image_size(self) -> int:
        """The side in pixels of the images the stage-1 tokenizer encodes and decodes."""
        return self._image_tokenizer("image_size").config.image_size

    def _image_tokenizer(self, use: str) -> VQTokenizer:
        if self.image_tokenizer is None:
            raise ValueError(f"{use} needs the stage-1 tokenizer: set `tokenizer` to its checkpoint or export")
        return self.image_tokenizer.on(self.device)

    def _autocast(self):
        return torch.autocast("cuda", torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    # -------------------------------------------------------------------------
    # training

    def configure_model(self) -> None:
        strategy = self.trainer.strategy if self._trainer is not None else None
        adjust_ddp(strategy)
        if self.hparams.activation_checkpointing:  # before sharding: each layer's call is wrapped
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if isinstance(strategy, AtomicModelParallelStrategy):
            shard(self.model, decoder_layers(self.model), strategy, str(self.trainer.precision), self.hparams.compile)
        elif self.hparams.compile:
            for layer in decoder_layers(self.model):
                layer.compile()

    def on_train_start(self) -> None:
        self._device_peak_flops = peak_flops_for_mfu(self.device, self.peak_flops)

    def image_codes(self, batch: dict, image_tokenizer: VQTokenizer | None = None) -> torch.Tensor:
        """(B, grid * grid) codes of the batch's images, row-major; encoded here when it has images."""
        if "image_ids" in batch:
            ids = batch["image_ids"]
        else:
            ids = (image_tokenizer or self._image_tokenizer("training on images")).encode(batch["images"])
        grid = self.hparams.image_grid
        if ids.shape[1:] != (grid, grid):
            raise ValueError(
                f"the batch's image ids form a grid of {tuple(ids.shape[1:])}, the model expects ({grid}, {grid}): "
                "check the data's image_size against the tokenizer's downsampling factor and image_grid"
            )
        return ids.flatten(1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        codes = self.image_codes(batch)
        captions = self.caption_ids(batch["captions"])
        to_text, dropped = self.directions(len(captions))
        captions = [[] if drop else caption for caption, drop in zip(captions, dropped.tolist())]
        ids, kinds = self.sequences(captions, codes, to_text)
        # no attention mask: the padding is at the ends of the rows, where the causal mask
        # already keeps every real token from seeing it
        logits = self.model(input_ids=ids, use_cache=False).logits  # (B, L, V)
        h = self.hparams
        losses = sequence_loss(logits, ids, kinds, h.text_loss_weight, h.image_loss_weight, h.z_loss_weight)
        self.nonfinite.observe(losses["loss"])
        self.log("train/loss", losses["loss"], prog_bar=True)
        self.log_dict({f"train/{name}": losses[name] for name in ("text_loss", "image_loss", "z_loss")})
        self.log("train/nonfinite_skipped", float(self.nonfinite.skipped))
        self.log_throughput(ids)
        return losses["loss"]

    def log_throughput(self, ids: torch.Tensor) -> None:
        """tokens/s (padding included: it is computed all the same), samples/s and MFU of the whole
        job, from the wall time between training steps; rows are as long as the batch's longest."""
        now = time.perf_counter()
        if self._last_step_time is not None:
            logs = throughput_logs(len(ids), ids.numel(), now - self._last_step_time, self.trainer.world_size,
                                   causal_lm_flops_per_token(self.model, ids.size(1)), self._device_peak_flops)
            self.log_dict({name: host_scalar(value) for name, value in logs.items()}, rank_zero_only=True)
        self._last_step_time = now

    def sequences(self, captions: list[list[int]], codes: torch.Tensor, to_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and kinds (B, L) of both directions' rows (`build_sequences`)."""
        return build_sequences(captions, codes, to_text, self.vocab, self.prefix[0] if self.prefix else None,
                               self.eos_id, self.pad_id)

    def directions(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) bool twice: the rows that caption their image (round(image_to_text * B) of them),
        and the text-to-image rows whose caption is replaced by the empty one.

        Drawn from a generator seeded by the count of training batches so far (saved in the
        checkpoint's loop state) and the rank, not the global RNG, so a resumed run makes the
        same choices as the uninterrupted one."""
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready if self._trainer else 0
        generator = torch.Generator().manual_seed(batches * 4096 + self.global_rank)
        to_text = torch.zeros(batch_size, dtype=torch.bool)
        to_text[torch.randperm(batch_size, generator=generator)[: round(self.hparams.image_to_text * batch_size)]] = True
        dropped = (torch.rand(batch_size, generator=generator) < self.hparams.caption_dropout) & ~to_text
        return to_text, dropped

    # -------------------------------------------------------------------------
    # validation: every pair both ways, as sums over the real samples added up over the ranks at
    # the end, so the logged losses are the same on one process or many and for any batch size

    def on_validation_epoch_start(self) -> None:
        # [image cross-entropy, image targets, caption cross-entropy, caption targets]
        self.val_sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        real = without_padding(batch)
        # a batch of padding only still goes through the model, counted for nothing: under FSDP
        # every rank must take part in every forward
        counted = len(real["captions"]) > 0
        batch = real if counted else batch
        codes, captions = self.image_codes(batch), self.caption_ids(batch["captions"])
        sums = []
        for to_text, name, kind in ((False, "image_loss", IMAGE), (True, "text_loss", TEXT)):
            ids, kinds = self.sequences(captions, codes, torch.full((len(captions),), to_text))
            losses = sequence_loss(self.model(input_ids=ids, use_cache=False).logits, ids, kinds)
            targets = (kinds[:, 1:] == kind).sum().double()
            sums += [losses[name].double() * targets, targets]
        if counted:
            self.val_sums += torch.stack(sums)

    def on_validation_epoch_end(self) -> None:
        self._last_step_time = None  # the validation pause is not a training step
        image, image_targets, caption, caption_targets = self.trainer.strategy.reduce(self.val_sums, reduce_op="sum")
        if image_targets == 0:
            return
        # every rank holds the same values: syncing only keeps Lightning from warning that they were not
        logs = {"val/image_loss": image / image_targets, "val/caption_loss": caption / caption_targets}
        self.log_dict({name: value.float() for name, value in logs.items()}, sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        # as the prior: a non-finite step updates no weight, yet still counts
        if not self.nonfinite.step_is_finite(self.global_step):
            drop_gradients(optimizer)

    def configure_optimizers(self):
        # decay on matrices and embeddings, none on norms and biases (FSDP2 keeps each parameter's shape)
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.optimizer_config.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return adamw_with_schedule(groups, self.optimizer_config, self.device, self.trainer.max_steps)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.optimizer_config.gradient_clip_val is not None:
            clip_grad_norm(self, optimizer, self.optimizer_config.gradient_clip_val)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "nonfinite" in checkpoint:
            self.nonfinite.load_state_dict(checkpoint["nonfinite"])


@contextmanager
def evaluating(module: nn.Module):
    """`module` in eval mode inside the block, its own mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, found by the class names transformers keeps whole on one
    device (`_no_split_modules`: LlamaDecoderLayer, Qwen2DecoderLayer, ...): FSDP2's units."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder-layer class in _no_split_modules: cannot shard it by layer")
    return layers


def check_image_tokenizer(tokenizer: VQTokenizer, codebook_size: int, image_grid: int, path: str) -> None:
    """Clear errors when the stage-1 tokenizer and the vocabulary or grid disagree."""
    description = tokenizer.describe()
    if description["codebook_size"] != codebook_size:
        raise ValueError(f"tokenizer {path} has {description['codebook_size']} codes but codebook_size is {codebook_size}")
    if description["latent_size"] != image_grid:
        raise ValueError(f"tokenizer {path} makes {description['latent_size']}x{description['latent_size']} id grids but image_grid is {image_grid}")
    if "ResidualQuantizer" in description["quantizer"]["class_path"]:
        raise ValueError(f"tokenizer {path} is residual ((h, w, depth) ids): one token per position needs a single-code quantizer")


# -----------------------------------------------------------------------------
# on disk: a training checkpoint (.ckpt file or FSDP sharded directory) or an export

PREFIX = "model."  # the language model's entries in the LightningModule's state dict


def llm_config(path: str | Path) -> dict[str, Any]:
    """LLMTextImageModel's constructor arguments, as a checkpoint or an export holds them."""
    path = Path(path)
    if (path / EXPORT_CONFIG).is_file():
        config = json.loads((path / EXPORT_CONFIG).read_text())
        config["backbone"] = {"path": str(path)}
        config["tokenizer"] = str(path / IMAGE_TOKENIZER_DIR) if (path / IMAGE_TOKENIZER_DIR).is_dir() else None
        return config
    config = checkpoint_hyperparameters(path)
    if "backbone" not in config:
        raise ValueError(f"{path} is not an LLMTextImageModel checkpoint or export: its config has no backbone")
    return config


def is_llm(path: str | Path) -> bool:
    """Whether `path` holds an LLMTextImageModel (else another stage-2 model)."""
    path = Path(path)
    if (path / EXPORT_CONFIG).is_file():
        return True
    if path.is_dir() and not is_sharded_checkpoint(path):  # another family's export
        return False
    return "backbone" in checkpoint_hyperparameters(path)


def image_generator_config(path: str | Path) -> dict[str, Any]:
    """The constructor arguments of the stage-2 model at `path`, an LLMTextImageModel's or a
    TextImagePrior's (its `sampling` among them), read without building the model."""
    return llm_config(path) if is_llm(path) else prior_config(path)


def load_image_generator(path: str | Path, map_location: str | torch.device = "cpu",
                         tokenizer: str | Path | None = None, fine_stage: str | Path | None = None) -> L.LightningModule:
    """The stage-2 model at `path`, an LLMTextImageModel or a TextImagePrior, whichever it holds:
    what `tessera sample` and `tessera evaluate shapes` draw images with (`generate`). `fine_stage`
    adds or replaces a prior's multi-scale fine stage."""
    if not is_llm(path):
        return load_prior(path, map_location=map_location, tokenizer=tokenizer, fine_stage=fine_stage)
    if fine_stage is not None:
        raise ValueError(f"{path} is an LLM backbone: a multi-scale fine stage goes with a TextImagePrior's coarse map")
    return load_llm(path, map_location=map_location, tokenizer=tokenizer)


def load_llm(path: str | Path, map_location: str | torch.device = "cpu", tokenizer: str | Path | None = None) -> LLMTextImageModel:
    """An LLMTextImageModel in eval mode from a .ckpt file, an FSDP sharded checkpoint directory or an
    export directory; `tokenizer` replaces the stage-1 tokenizer it names."""
    config = llm_config(path)
    if tokenizer is not None:
        config["tokenizer"] = str(tokenizer)
    model = LLMTextImageModel(**config)
    if not (Path(path) / EXPORT_CONFIG).is_file():  # an export's weights are the backbone's own
        load_transformer_weights(model.model, path, prefix=PREFIX)
    return model.to(map_location).eval()


def export_llm(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """A training checkpoint -> OUT as `save_pretrained` writes a `transformers` causal LM and its tokenizer
    (image tokens included; AutoModelForCausalLM and AutoTokenizer load it without Tessera),
    OUT/image_tokenizer (the stage-1 tokenizer's export) and OUT/tessera.json (this module's other
    arguments). Returns the module's config."""
    config = llm_config(checkpoint)
    model = LLMTextImageModel(**{**config, "tokenizer": None})  # the image tokenizer is copied, not used
    load_transformer_weights(model.model, checkpoint, prefix=PREFIX)
    out = Path(out)
    model.model.save_pretrained(out)
    model.text_tokenizer.save_pretrained(out)
    if config["tokenizer"] is not None:
        load_tokenizer(config["tokenizer"]).save_pretrained(out / IMAGE_TOKENIZER_DIR)
    settings = {name: value for name, value in config.items() if name not in ("backbone", "tokenizer")}
    (out / EXPORT_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    return config
