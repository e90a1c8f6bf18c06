"""
The VQ-GAN tokenizer's LightningModule: a generator step and a discriminator step per batch.

Steps. Lightning's `global_step` counts optimizer steps, so two optimizers would double it. Here
the discriminator is stepped through its raw torch optimizer, which Lightning does not count, so
`global_step`, `Trainer(max_steps=...)`, `disc_start`, `warmup_steps`, the schedules and
`log_every_n_steps` all count training steps: one per batch, or one per `accumulate_grad_batches`
batches when accumulating (Lightning's own meaning of a step under accumulation). As under
Lightning's automatic optimization, an epoch whose batch count is no multiple of
`accumulate_grad_batches` ends with a step of its leftover batches: no gradient crosses an epoch.

Generator loss (taming-transformers, LlamaGen, Open-MAGVIT2):
    rec = L1 or L2 of (x_hat - x) + perceptual_weight * LPIPS(x, x_hat)
    loss = rec + quantizer losses + w * G(D(x_hat))           (GAN term from disc_start on)
with w fixed (`disc_weight`) or adaptive: disc_weight * ||grad rec|| / (||grad G|| + 1e-4) on the
decoder's last layer, clamped to [0, max_adaptive_weight] (taming), and G the generator's GAN
loss: -mean(logits) ("hinge", taming's and LlamaGen's) or non-saturating (MAGVIT-v2's). Discriminator
loss, chosen apart: hinge or non-saturating on real and fake, + lecam_weight * LeCAM. With
`disc_start: null` and `perceptual_weight: 0` the loss is DALL-E's dVAE ELBO: the pixel term plus
the `GumbelQuantizer`'s weighted KL to the uniform prior, no discriminator ever trained.

Precision: bf16-mixed or fp32. fp16 is refused: the discriminator's raw step would bypass
Lightning's gradient scaler, and the adaptive weight's gradient norms overflow in fp16 anyway.

Strategies: DDP with `find_unused_parameters=True` (the generator step leaves the discriminator
unused and the other way round), which `configure_model` sets on any DDPStrategy, so that
`configs/trainer/ddp.yaml` composes with every tokenizer config. FSDP2
(lightning_modules.fsdp.AtomicModelParallelStrategy, configs/trainer/fsdp.yaml): `configure_model`
shards the encoder, decoder, quantizer (in fp32) and discriminator, each its own unit, and the EMA
copy alike; LPIPS stays whole on every rank, frozen, outside the module tree. A BatchNorm
discriminator is refused there. Lightning's FSDPStrategy (FSDP1) refuses manual optimization.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from datamodules.stream import without_padding
from lightning_modules.clipping import clip_grad_norm
from lightning_modules.nonfinite import NonFiniteLossGuard, drop_gradients
from lightning_modules.fsdp import (
    AtomicModelParallelStrategy,
    checkpoint_hyperparameters,
    is_sharded_checkpoint,
    load_sharded_state,
)
from lightning_modules.parallel import FrozenModule, adjust_ddp, shard, shard_in_fp32
from tessera.lr_schedule import decay_end, lr_factor
from tessera.nn.autoencoder import AutoencoderConfig
from tessera.nn.discriminator import PatchDiscriminator
from tessera.nn.ema import EMA
from tessera.nn.gan_losses import (
    LeCAMRegularizer,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from tessera.nn.lpips import LPIPS
from tessera.nn.multiscale_tokenizer import MultiScaleIds
from tessera.nn.quantizer_base import Quantizer, build_quantizer, code_counts, quantizer_spec, usage_stats
from tessera.nn.vq_tokenizer import VQTokenizer, build_tokenizer
from tessera.pixels import psnr

D_LOSSES = {"hinge": hinge_d_loss, "non_saturating": non_saturating_d_loss}
G_LOSSES = {"hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}


@dataclass
class DiscriminatorConfig:
    """The PatchGAN discriminator (tessera.nn.discriminator)."""

    ndf: int = 64
    """Channels of the first layer; doubled per layer up to 8x."""
    n_layers: int = 3
    """Stride-2 layers: 3 sees 70x70 patches; taming's f16 config uses 2."""
    norm: Literal["group", "batch", "none"] = "group"
    """GroupNorm normalises each image alone, the same on one GPU as on many. "batch" is taming's
    BatchNorm: batch statistics in both steps (the running ones move in D's steps only), and
    SyncBatchNorm, statistics over every rank's images, when the run has several processes (GPUs
    only, and under DDP only: FSDP2 refuses it)."""


@dataclass
class LossConfig:
    """Terms of the generator and discriminator losses."""

    reconstruction: Literal["l1", "l2"] = "l1"
    """Pixel loss: taming uses L1, LlamaGen L2."""
    perceptual_weight: float = 1.0
    """Weight of LPIPS; 0 skips the VGG16 forward altogether."""
    lpips_vgg_weights: str | None = None
    """torchvision's vgg16-397923af.pth; by default looked up in $TORCH_HOME/hub/checkpoints."""
    lpips_lin_weights: str | None = None
    """LPIPS' linear layers vgg.pth; by default the copy inside the lpips or torchmetrics package."""
    pretrained_lpips: bool = True
    """False builds LPIPS with random weights: for tests and smoke runs only."""
    generator_loss: Literal["hinge", "non_saturating"] = "hinge"
    """The generator's GAN term: "hinge" is -mean(D(x_hat)) (taming, LlamaGen), "non_saturating"
    mean(softplus(-D(x_hat))) (MAGVIT-v2 and Open-MAGVIT2, with a hinge discriminator)."""
    discriminator_loss: Literal["hinge", "non_saturating"] = "hinge"
    """The discriminator's loss: "hinge" or "non_saturating" (binary cross-entropy), both x0.5 as taming."""
    disc_start: int | None = 0
    """Training step from which the discriminator trains and the GAN term enters the generator loss;
    None never: no GAN (the discriminator is built but never trains)."""
    disc_weight: float = 0.75
    """Weight of the generator's GAN term (times the adaptive factor when adaptive)."""
    adaptive_disc_weight: bool = True
    """taming's gradient-norm ratio on the decoder's last layer; False uses disc_weight alone (LlamaGen, Open-MAGVIT2)."""
    max_adaptive_weight: float = 1e4
    """Clamp of the adaptive factor, as taming."""
    lecam_weight: float = 0.0
    """LeCAM regularisation of the discriminator (Open-MAGVIT2: 0.05); 0 disables it."""
    lecam_decay: float = 0.999

    def __post_init__(self) -> None:
        for name, losses in (("generator_loss", G_LOSSES), ("discriminator_loss", D_LOSSES)):
            if getattr(self, name) not in losses:
                raise ValueError(f"loss.{name} must be one of {sorted(losses)}, got {getattr(self, name)!r}")


@dataclass
class OptimizerConfig:
    """Adam for both networks, schedules by training step."""

    lr: float = 1e-4
    """Peak generator learning rate (taming scales 4.5e-6 by the total batch; LlamaGen uses 1e-4)."""
    disc_lr: float | None = None
    """Peak discriminator learning rate; defaults to lr."""
    betas: tuple[float, float] = (0.5, 0.9)
    """taming: (0.5, 0.9); LlamaGen: (0.9, 0.95)."""
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many training steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant, or cosine down to min_lr_ratio * lr at decay_steps, flat after."""
    decay_steps: int | None = None
    """The step the cosine ends; None: Trainer(max_steps)."""
    min_lr_ratio: float = 0.1
    gradient_clip_val: float | None = None
    """Clip each network's gradient norm to this (LlamaGen: 1.0); None does not clip."""
    accumulate_grad_batches: int = 1
    """Batches per training step (Trainer's own option raises under manual optimization)."""
    max_nonfinite_steps: int = 20
    """A step whose loss is not finite on some rank is skipped (no weight changes); this many in a row stop the run."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}")


def _config(cls: type, value: Any) -> Any:
    """A dataclass config from itself, a dict (a checkpoint's hyperparameters) or None (defaults)."""
    if value is None:
        return cls()
    return cls(**value) if isinstance(value, dict) else value


class VQGAN(L.LightningModule):
    """VQ-GAN tokenizer training: `tokenizer` (encoder, quantizer, decoder) against `discriminator`.

    Batches are dicts with "images" (B, 3, H, W) in [-1, 1], as CaptionImageDataModule yields.
    """

    def __init__(
        self,
        quantizer: Quantizer,
        autoencoder: AutoencoderConfig | None = None,
        discriminator: DiscriminatorConfig | None = None,
        loss: LossConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        ema_decay: float | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ):
        """
        Args:
            quantizer: VectorQuantizer, LookupFreeQuantizer, FiniteScalarQuantizer, ResidualQuantizer or
                GumbelQuantizer or MultiScaleQuantizer (a coarse and a fine id map: a MultiScaleTokenizer).
            autoencoder: encoder and decoder architecture; defaults to taming's f16 at 256 px.
            discriminator: PatchGAN architecture.
            loss: loss terms and their weights.
            optimizer: learning rates, schedules, clipping, accumulation.
            ema_decay: keep an EMA of the tokenizer's weights, used for validation and export; None keeps none.
            channels_last: NHWC weights and images, the layout tensor cores' convolutions want (GPU).
            compile: torch.compile the encoder, the decoder and the discriminator in place (same
                state-dict keys); the quantizer stays eager.
        """
        super().__init__()
        self.automatic_optimization = False
        if isinstance(quantizer, dict):  # a checkpoint's hyperparameters
            quantizer = build_quantizer(quantizer)
        autoencoder = _config(AutoencoderConfig, autoencoder)
        discriminator = _config(DiscriminatorConfig, discriminator)
        self.loss_config = _config(LossConfig, loss)
        self.optimizer_config = _config(OptimizerConfig, optimizer)
        # plain dicts, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "quantizer": quantizer_spec(quantizer),
                "autoencoder": asdict(autoencoder),
                "discriminator": asdict(discriminator),
                "loss": asdict(self.loss_config),
                "optimizer": asdict(self.optimizer_config),
                "ema_decay": ema_decay,
                "channels_last": channels_last,
                "compile": compile,
            }
        )
        self.channels_last = channels_last
        self.compile_networks = compile

        self.tokenizer = build_tokenizer(autoencoder, quantizer)
        self.discriminator = PatchDiscriminator(autoencoder.in_channels, **asdict(discriminator))
        self.ema = EMA(self.tokenizer, ema_decay) if ema_decay is not None else None
        self.lecam = LeCAMRegularizer(self.loss_config.lecam_decay)
        self.nonfinite = NonFiniteLossGuard(self.optimizer_config.max_nonfinite_steps)
        loss = self.loss_config
        # frozen VGG16 (58 MB), loaded from its own files: outside the module tree, so no checkpoint
        # holds it and no strategy wraps or shards it
        self.lpips = (
            FrozenModule(LPIPS(loss.lpips_vgg_weights, loss.lpips_lin_weights, pretrained=loss.pretrained_lpips))
            if loss.perceptual_weight > 0
            else None
        )

    # -------------------------------------------------------------------------
    # what stage 2 uses

    @property
    def inference_tokenizer(self) -> VQTokenizer:
        """The EMA weights when kept, else the live ones."""
        return self.ema.module if self.ema is not None else self.tokenizer

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.inference_tokenizer.encode(images)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inference_tokenizer.decode(ids)

    # -------------------------------------------------------------------------
    # training

    def setup(self, stage: str) -> None:
        check_precision(str(self.trainer.precision))

    def configure_model(self) -> None:
        strategy = self.trainer.strategy if self._trainer is not None else None  # load_from_checkpoint has no trainer
        adjust_ddp(strategy, find_unused_parameters=True)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
            if self.lpips is not None:  # outside the module tree
                self.lpips.module.to(memory_format=torch.channels_last)
        self._sync_batch_norm()
        if isinstance(strategy, AtomicModelParallelStrategy):
            self._shard(strategy)
        elif self.compile_networks:
            # the convolutional networks, each in place; the quantizer stays eager: its collectives
            # (all-reduced statistics, the gathered usage window, restarts broadcast from rank 0) and
            # buffer updates are no work for a compiler, and in a compiled graph they split it
            for network in (self.tokenizer.encoder, self.tokenizer.decoder, self.discriminator):
                network.compile()

    def _shard(self, strategy: AtomicModelParallelStrategy) -> None:
        """FSDP2: encoder, decoder and discriminator each a unit (gathered in bf16 under bf16-mixed on
        GPUs), the quantizer a unit in fp32 (`shard_in_fp32`), the tokenizer's two 1x1 convs in its
        root. The EMA copy is sharded alike, so that its update is a lerp of each rank's own shards;
        it is only ever evaluated, so it always frees its gathered parameters after a forward."""
        precision = str(self.trainer.precision)
        tokenizers = [(self.tokenizer, None)] + ([(self.ema.module, True)] if self.ema is not None else [])
        for tokenizer, reshard in tokenizers:
            shard_in_fp32(tokenizer.quantizer, strategy, methods=("ids_to_codes",), reshard_after_forward=reshard)
            shard(tokenizer, [tokenizer.encoder, tokenizer.decoder], strategy, precision, self.compile_networks,
                  methods=("encode", "decode"), reshard_after_forward=reshard)
        shard(self.discriminator, [], strategy, precision)
        if self.compile_networks:
            self.discriminator.compile()

    def _sync_batch_norm(self) -> None:
        """A BatchNorm discriminator on several processes normalises with every rank's images (SyncBatchNorm)."""
        processes = self.trainer.world_size if self._trainer is not None else 1  # load_from_checkpoint has no trainer
        if not any(isinstance(m, torch.nn.BatchNorm2d) for m in self.discriminator.modules()):
            return
        if self._trainer is not None and isinstance(self.trainer.strategy, AtomicModelParallelStrategy):
            # FSDP2 leaves each rank's running statistics apart, and would gather BatchNorm's scale in bf16
            raise ValueError(
                "discriminator.norm 'batch' is not supported under FSDP2 (AtomicModelParallelStrategy): train a "
                "BatchNorm discriminator with DDP (configs/trainer/ddp.yaml, the tokenizer's default), or use "
                "discriminator.norm 'group'"
            )
        if processes < 2:
            return
        if self.trainer.strategy.root_device.type == "cpu":
            raise ValueError(
                f"discriminator.norm 'batch' on {processes} processes needs SyncBatchNorm, which runs on GPU "
                "only: use discriminator.norm 'group' for multi-process CPU runs"
            )
        # the same parameters and buffers in new modules, before the optimizers and DDP see them
        self.discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.discriminator)

    def configure_optimizers(self):
        config = self.optimizer_config
        # fused kernels on CUDA and CPU (one pass over all parameters); the default foreach path elsewhere
        fused = {"fused": True} if self.device.type in ("cuda", "cpu") else {}
        opt_g = torch.optim.Adam(
            self.tokenizer.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, **fused
        )
        opt_d = torch.optim.Adam(
            self.discriminator.parameters(),
            lr=config.disc_lr if config.disc_lr is not None else config.lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
            **fused,
        )
        total_steps = decay_end(config.schedule, config.decay_steps, self.trainer.max_steps)

        def factor(step: int) -> float:
            return lr_factor(step, config.warmup_steps, config.schedule, total_steps, config.min_lr_ratio)

        schedules = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in (opt_g, opt_d)]
        return [opt_g, opt_d], schedules

    def training_step(self, batch: dict, batch_idx: int) -> None:
        images = self._layout(batch["images"])
        config = self.optimizer_config
        opt_g, opt_d = self.optimizers()
        step = self.global_step  # the step this batch contributes to
        finishes_step = self._finishes_step()
        gan_active = self.loss_config.disc_start is not None and step >= self.loss_config.disc_start
        self.tokenizer.quantizer.set_step(step)  # annealed quantizers (Gumbel-softmax) follow the same step

        self.toggle_optimizer(opt_g)
        reconstructions, g_loss, logs = self.generator_loss(images, gan_active)
        self.manual_backward(g_loss / config.accumulate_grad_batches)
        self.untoggle_optimizer(opt_g)
        self.nonfinite.observe(g_loss)
        if gan_active:
            # D sees the reconstructions of the weights G had before its step, as if stepped after G
            self.toggle_optimizer(opt_d)
            d_loss, d_logs = self.discriminator_loss(images, reconstructions.detach())
            logs.update(d_logs)
            self.manual_backward(d_loss / config.accumulate_grad_batches)
            self.untoggle_optimizer(opt_d)
            self.nonfinite.observe(d_loss)
        if finishes_step:
            self._take_step(opt_g, opt_d, gan_active)

        logs["lr"] = torch.tensor(opt_g.param_groups[0]["lr"])
        logs["nonfinite_skipped"] = torch.tensor(float(self.nonfinite.skipped))
        self.log("train/loss", logs.pop("loss"), prog_bar=True)
        self.log_dict({f"train/{name}": value for name, value in logs.items()}, on_step=True)

    def _finishes_step(self) -> bool:
        """Whether this batch completes a training step: the `accumulate_grad_batches`-th batch of a
        window, or the epoch's last batch (its leftover steps alone, as Lightning's automatic
        optimization does, instead of joining the next epoch's first window).

        Counted by the fit loop's own batch progress, not the batch_idx argument: the same count,
        but with the epoch's end beside it (the last batch, or num_training_batches under
        limit_train_batches), and saved in every checkpoint's loop state, so a resumed run keeps
        its windows where the uninterrupted run had them."""
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        batches = progress.current.ready  # of this epoch, this one included
        epoch_ends = progress.is_last_batch or batches == self.trainer.num_training_batches
        return batches % self.optimizer_config.accumulate_grad_batches == 0 or epoch_ends

    def _take_step(self, opt_g, opt_d, gan_active: bool) -> None:
        """Step both networks and schedules; a step with a non-finite loss on any rank updates no weight."""
        schedule_g, schedule_d = self.lr_schedulers()
        finite = self.nonfinite.step_is_finite(self.global_step)
        if not finite:
            drop_gradients(opt_g)
            drop_gradients(opt_d)
        self._clip(opt_g)
        opt_g.step()  # counted by Lightning: global_step += 1 (a no-op update when skipped)
        opt_g.zero_grad(set_to_none=True)
        schedule_g.step()
        if self.ema is not None and finite:
            self.ema.update(self.tokenizer)
        if gan_active:
            self._clip(opt_d)
            opt_d.optimizer.step()  # the raw optimizer: not counted in global_step
            opt_d.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # on the training step whether D trains yet or not, so its schedule reads the global
            # step; before disc_start torch warns that D's optimizer has not stepped, as intended
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            schedule_d.step()

    def generator_loss(self, images: torch.Tensor, gan_active: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        reconstructions, quantized = self.tokenizer(images)
        rec_loss, perceptual_loss = self.reconstruction_losses(images, reconstructions)
        nll = rec_loss + self.loss_config.perceptual_weight * perceptual_loss
        loss = nll + quantized.loss
        logs = {
            "rec_loss": rec_loss.detach(),
            "perceptual_loss": perceptual_loss.detach(),
            "quantizer_loss": quantized.loss.detach(),
            **{f"quantizer/{name}": value.detach() for name, value in quantized.losses.items()},
            **{f"codebook/{name}": value for name, value in quantized.stats.items()},
        }
        if gan_active:
            # D on this batch's statistics, as in its own step, but its running statistics are its state, moved there only
            with self.discriminator.running_stats_frozen():
                logits_fake = self.discriminator(reconstructions)
            gan_loss = G_LOSSES[self.loss_config.generator_loss](logits_fake)
            weight = self.gan_weight(nll, gan_loss)
            loss = loss + weight * gan_loss
            logs.update(g_loss=gan_loss.detach(), gan_weight=weight)
        logs["loss"] = loss.detach()
        return reconstructions, loss, logs

    def reconstruction_losses(self, images: torch.Tensor, reconstructions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixel = F.l1_loss if self.loss_config.reconstruction == "l1" else F.mse_loss
        rec_loss = pixel(reconstructions.float(), images.float())
        if self.lpips is None:
            return rec_loss, rec_loss.new_zeros(())
        return rec_loss, self.lpips.on(images.device)(images, reconstructions).mean()

    def gan_weight(self, nll: torch.Tensor, gan_loss: torch.Tensor) -> torch.Tensor:
        """disc_weight, times taming's adaptive factor when asked; a detached fp32 scalar."""
        config = self.loss_config
        if not config.adaptive_disc_weight:
            return nll.new_full((), config.disc_weight)  # a fill on the device, not a blocking copy to it
        last_layer = self._last_layer()
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0].float()
        gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0].float()
        factor = nll_grad.norm() / (gan_grad.norm() + 1e-4)
        # a non-finite norm (an overflowing gradient) must not poison every later step: drop the GAN term once
        factor = torch.nan_to_num(factor, nan=0.0, posinf=0.0).clamp(0.0, config.max_adaptive_weight)
        return (config.disc_weight * factor).detach()

    def _last_layer(self) -> torch.Tensor:
        """The decoder's last weight as this step's graph holds it. Under FSDP2 that is the gathered
        parameter, not the shard the module holds between forwards: `unshard` puts the same gathered
        tensor back on the module (and gathers it again if the forward freed it)."""
        decoder = self.tokenizer.decoder
        if isinstance(decoder, FSDPModule):
            decoder.unshard()
        return decoder.last_layer

    def discriminator_loss(self, images: torch.Tensor, reconstructions: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits_real = self.discriminator(images)
        logits_fake = self.discriminator(reconstructions)
        d_loss = D_LOSSES[self.loss_config.discriminator_loss](logits_real, logits_fake)
        logs = {"logits_real": logits_real.detach().float().mean(), "logits_fake": logits_fake.detach().float().mean()}
        if self.loss_config.lecam_weight > 0:
            lecam = self.lecam(logits_real, logits_fake)
            d_loss = d_loss + self.loss_config.lecam_weight * lecam
            logs["lecam"] = lecam.detach()
        logs["d_loss"] = d_loss.detach()
        return d_loss, logs

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        """A batch's images (B, 3, S, S), checked against the size the tokenizer is built for (a
        convolutional network would take any size, and its export would then promise the wrong
        grid to stage 2), in the tokenizer's memory layout."""
        size = self.tokenizer.config.image_size
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"the data gives {images.shape[-2]}x{images.shape[-1]} images but the tokenizer is built for "
                f"{size}x{size} (model.init_args.autoencoder.image_size): set --data.image_size {size}, or the "
                "tokenizer's image_size to the data's"
            )
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def _clip(self, optimizer) -> None:
        if self.optimizer_config.gradient_clip_val is not None:
            clip_grad_norm(self, optimizer, self.optimizer_config.gradient_clip_val)

    # -------------------------------------------------------------------------
    # validation: the EMA weights when kept. Sums over every real sample, added up over the ranks
    # at the end, so the logged means are the same on one process or many and for any batch size,
    # and codebook usage and perplexity are those of the whole validation set; padding never counts

    def on_validation_epoch_start(self) -> None:
        # [pixel loss, LPIPS, PSNR, samples] (sums of per-sample values), then how often each code came
        self.val_sums = torch.zeros(4 + self.tokenizer.codebook_size, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        batch = without_padding(batch)
        samples = len(batch["images"])
        if samples == 0:  # padding only: it keeps every rank's step count the same (no collective runs here)
            return
        images = self._layout(batch["images"])
        reconstructions, quantized = self.inference_tokenizer(images)
        rec_loss, perceptual_loss = self.reconstruction_losses(images, reconstructions)  # means over the batch
        psnr_sum = psnr(images, reconstructions).sum()
        sums = [rec_loss * samples, perceptual_loss * samples, psnr_sum, rec_loss.new_tensor(samples)]
        ids = quantized.ids.coarse if isinstance(quantized.ids, MultiScaleIds) else quantized.ids  # stage 2's vocabulary
        codes = code_counts(ids, self.tokenizer.codebook_size)  # (K,)
        self.val_sums += torch.cat([torch.stack([value.double() for value in sums]), codes.double()])

    def on_validation_epoch_end(self) -> None:
        totals = self.trainer.strategy.reduce(self.val_sums, reduce_op="sum")
        (rec_loss, perceptual_loss, psnr_sum, samples), codes = totals[:4], totals[4:]
        if samples == 0:
            return
        logs = {
            "rec_loss": rec_loss / samples,
            "perceptual_loss": perceptual_loss / samples,
            "psnr": psnr_sum / samples,
            "samples": samples,
            **{f"codebook/{name}": value for name, value in usage_stats(codes).items()},
        }
        # every rank holds the same values: syncing only keeps Lightning from warning that they were not
        self.log_dict({f"val/{name}": value.float() for name, value in logs.items()}, sync_dist=True)

    # -------------------------------------------------------------------------
    # checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "nonfinite" in checkpoint:
            self.nonfinite.load_state_dict(checkpoint["nonfinite"])


def check_precision(precision: str) -> None:
    if precision.startswith("16"):
        raise ValueError(
            f"precision {precision!r} is not supported for the VQ-GAN: use 'bf16-mixed' (or fp32). "
            "fp16 needs a gradient scaler that the discriminator's step bypasses."
        )


def load_tokenizer(path: str | Path, use_ema: bool = True) -> VQTokenizer:
    """A frozen tokenizer in eval mode from a VQGAN training checkpoint (.ckpt file or FSDP2 sharded
    directory) or an export directory.

    use_ema: take the EMA weights when the run kept them (what validation measured).
    """
    path = Path(path)
    sharded = is_sharded_checkpoint(path)  # an FSDP2 run's directory of shards
    if path.is_dir() and not sharded:
        return VQTokenizer.from_pretrained(path)
    if not path.is_file() and not sharded:
        raise FileNotFoundError(f"no tokenizer checkpoint or export directory at {path}")
    checkpoint = None if sharded else torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint_hyperparameters(path) if sharded else checkpoint.get("hyper_parameters", {})
    if "quantizer" not in hparams or "autoencoder" not in hparams:
        raise ValueError(f"{path} is not a VQGAN checkpoint: its hyperparameters lack the quantizer and autoencoder")
    tokenizer = VQTokenizer.from_description(hparams)
    prefix = "ema.module." if use_ema and hparams.get("ema_decay") is not None else "tokenizer."
    weights = load_sharded_state(path, prefix, tokenizer.state_dict()) if sharded else checkpoint["state_dict"]
    tokenizer.load_state_dict({key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)})
    return tokenizer.requires_grad_(False).eval()
