"""The VQGAN LightningModule through a real Trainer on CPU: steps, the discriminator's schedule,
learning on the shapes set, exact resume, checkpoints and export, DDP over gloo.

Tiny networks (ch 8-16, 16-32 px) keep the file in well under a minute on two cores.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from datamodules.shapes import SyntheticShapes
from lightning_modules.fsdp import AtomicModelParallelStrategy
from lightning_modules.vqgan import VQGAN, DiscriminatorConfig, LossConfig, OptimizerConfig, check_precision, load_tokenizer
from tessera.lr_schedule import decay_end, lr_factor
from tessera.nn.autoencoder import AutoencoderConfig
from tessera.nn.vector_quantizer import VectorQuantizer
from tessera.nn.vq_tokenizer import VQTokenizer

REPO = Path(__file__).parents[1]


class ShapesImages(Dataset):
    """Synthetic shapes as the datamodule hands them over: {"images": (3, S, S) float in [-1, 1]}."""

    def __init__(self, num_samples: int, image_size: int = 16, seed: int = 0):
        shapes = SyntheticShapes(num_samples, image_size=max(32, image_size), seed=seed)  # 32 px at least
        pixels = [np.array(shapes[i].image.convert("RGB").resize((image_size, image_size), Image.BOX)) for i in range(num_samples)]
        self.images = [torch.from_numpy(p).permute(2, 0, 1).float() / 127.5 - 1.0 for p in pixels]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"images": self.images[index]}


def loader(num_samples: int = 32, batch_size: int = 8, image_size: int = 16) -> DataLoader:
    return DataLoader(ShapesImages(num_samples, image_size), batch_size=batch_size, shuffle=False)


def tiny_vqgan(image_size: int = 16, **overrides) -> VQGAN:
    options = dict(
        quantizer=VectorQuantizer(dim=4, codebook_size=32),
        autoencoder=AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, image_size=image_size),
        discriminator=DiscriminatorConfig(ndf=8, n_layers=1),
        loss=LossConfig(pretrained_lpips=False, perceptual_weight=0.1),
        optimizer=OptimizerConfig(lr=1e-3),
    )
    options.update(overrides)
    return VQGAN(**options)


def trainer(tmp_path: Path, max_steps: int, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def discriminator_steps(model: VQGAN) -> int:
    """Adam's own count of the steps the discriminator's optimizer took."""
    opt_d = model.trainer.optimizers[1]
    states = [opt_d.state[p] for p in model.discriminator.parameters() if p in opt_d.state]
    return int(states[0]["step"]) if states else 0


# --- steps --------------------------------------------------------------------------------


class CountBatches(L.Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1


def test_max_steps_counts_batches_not_optimizer_steps(tmp_path):
    model, counter = tiny_vqgan(), CountBatches()
    trainer(tmp_path, max_steps=5, callbacks=[counter]).fit(model, loader())
    assert counter.batches == 5
    assert model.global_step == 5
    assert discriminator_steps(model) == 5


def test_images_of_another_size_than_the_tokenizers_are_refused_naming_both(tmp_path):
    with pytest.raises(ValueError, match=r"gives 16x16 images but the tokenizer is built for 32x32.*--data.image_size 32"):
        trainer(tmp_path, max_steps=1).fit(tiny_vqgan(image_size=32), loader())


def test_with_accumulation_a_step_is_accumulate_grad_batches_batches(tmp_path):
    model, counter = tiny_vqgan(optimizer=OptimizerConfig(accumulate_grad_batches=2)), CountBatches()
    trainer(tmp_path, max_steps=3, callbacks=[counter]).fit(model, loader(num_samples=64))
    assert counter.batches == 6
    assert model.global_step == 3
    assert discriminator_steps(model) == 3


class StepAfterEachBatch(L.Callback):
    """trainer.global_step after every training batch."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)


def test_an_epoch_of_no_multiple_of_accumulate_grad_batches_ends_with_a_step_of_its_leftover(tmp_path):
    model, steps = tiny_vqgan(optimizer=OptimizerConfig(accumulate_grad_batches=2)), StepAfterEachBatch()
    trainer(tmp_path, max_steps=4, callbacks=[steps]).fit(model, loader(num_samples=24))  # 3 batches an epoch
    # each epoch: a step of batches 0 and 1, then one of batch 2 alone; none carries into the next epoch
    assert steps.steps == [0, 1, 2, 2, 3, 4]
    assert discriminator_steps(model) == 4


def accumulating_vqgan() -> VQGAN:
    torch.manual_seed(0)
    return tiny_vqgan(optimizer=OptimizerConfig(lr=1e-3, accumulate_grad_batches=2))


def test_resumed_at_an_epochs_leftover_step_or_mid_epoch_accumulation_ends_with_the_uninterrupted_weights(tmp_path):
    """3 equal batches an epoch, 2 a step: resumed from the step of epoch 0's leftover batch (its
    last) and from epoch 1's first step (its leftover batch next)."""
    data = DataLoader(ConcatDataset([ShapesImages(8)] * 3), batch_size=8, shuffle=False)
    straight = accumulating_vqgan()
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    trainer(tmp_path / "a", max_steps=4, enable_checkpointing=True, callbacks=[every_step]).fit(straight, data)

    for name in ("epoch=0-step=2.ckpt", "epoch=1-step=3.ckpt"):
        resumed = accumulating_vqgan()
        trainer(tmp_path / "b", max_steps=4).fit(resumed, data, ckpt_path=tmp_path / "ckpt" / name)
        assert resumed.global_step == 4
        for key, value in straight.state_dict().items():
            torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=f"{name}: {key}")


def test_discriminator_does_not_train_before_disc_start(tmp_path):
    model = tiny_vqgan(loss=LossConfig(pretrained_lpips=False, disc_start=3))
    initial = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    trainer(tmp_path, max_steps=3).fit(model, loader())
    assert discriminator_steps(model) == 0
    assert all(torch.equal(initial[k], v) for k, v in model.discriminator.state_dict().items())

    trainer(tmp_path, max_steps=5).fit(model, loader())
    assert discriminator_steps(model) == 2


def test_without_disc_start_the_generator_trains_on_its_own_losses_alone(tmp_path):
    model = tiny_vqgan(loss=LossConfig(pretrained_lpips=False, disc_start=None))
    initial = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    fit = trainer(tmp_path, max_steps=3)
    fit.fit(model, loader())
    assert discriminator_steps(model) == 0 and "train/g_loss" not in fit.callback_metrics
    assert all(torch.equal(initial[k], v) for k, v in model.discriminator.state_dict().items())


class InspectGeneratorStep(L.Callback):
    """The generator's backward (the first of each batch) leaves the discriminator without gradient,
    and the generator's update leaves the discriminator where the batch found it."""

    def __init__(self):
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.detach().clone() for p in pl_module.discriminator.parameters()]
        self.backwards = 0

    def on_after_backward(self, trainer, pl_module):
        self.backwards += 1
        if self.backwards == 1:
            assert all(p.grad is None for p in pl_module.discriminator.parameters())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if optimizer is trainer.optimizers[0]:
            assert self.backwards >= 1
            assert all(torch.equal(a, p) for a, p in zip(self.before, pl_module.discriminator.parameters()))
            self.checked += 1


def test_generator_steps_leave_the_discriminator_untouched(tmp_path):
    inspector = InspectGeneratorStep()
    trainer(tmp_path, max_steps=3, callbacks=[inspector]).fit(tiny_vqgan(), loader())
    assert inspector.checked == 3


def test_learning_rate_warms_up_then_follows_a_cosine_to_the_floor():
    factors = [lr_factor(step, 10, "cosine", 110, 0.1) for step in range(0, 111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(1000, 10, "constant", None, 0.1) == 1.0


def test_a_cosine_with_decay_steps_follows_its_own_horizon_not_max_steps(tmp_path):
    model = tiny_vqgan(optimizer=OptimizerConfig(lr=1e-3, schedule="cosine", decay_steps=8))
    trainer(tmp_path, max_steps=4).fit(model, loader())
    generator_lr = model.trainer.optimizers[0].param_groups[0]["lr"]
    assert generator_lr == pytest.approx(1e-3 * lr_factor(4, 0, "cosine", 8, 0.1))  # halfway down, not at the floor
    assert decay_end("cosine", None, max_steps=20) == 20
    assert decay_end("constant", 8, max_steps=-1) is None
    with pytest.raises(ValueError, match="decay_steps or Trainer\\(max_steps"):
        decay_end("cosine", None, max_steps=-1)


@pytest.mark.parametrize("precision", ["16-mixed", "16-true", "16"])
def test_fp16_precision_is_refused_with_a_reason(precision):
    with pytest.raises(ValueError, match="bf16-mixed"):
        check_precision(precision)
    check_precision("bf16-mixed")
    check_precision("32-true")


def grad_norm(optimizer) -> float:
    """The total gradient norm over an optimizer's parameters."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()


def test_both_networks_clip_their_gradients_in_bf16_mixed_with_fused_adam(tmp_path):
    model = tiny_vqgan(optimizer=OptimizerConfig(lr=1e-3, gradient_clip_val=0.5))
    fit = trainer(tmp_path, max_steps=1, precision="bf16-mixed")
    fit.fit(model, loader())  # Lightning's mixed-precision clipping refuses fused optimizers
    assert all(optimizer.defaults["fused"] for optimizer in fit.optimizers)
    for optimizer in fit.optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.ones_like(param)
        model._clip(optimizer)
        assert grad_norm(optimizer) == pytest.approx(0.5, rel=1e-2)


def test_cosine_schedule_without_max_steps_is_refused(tmp_path):
    model = tiny_vqgan(optimizer=OptimizerConfig(schedule="cosine"))
    with pytest.raises(ValueError, match="max_steps"):
        trainer(tmp_path, max_steps=-1, max_epochs=1).fit(model, loader())


# --- losses ---------------------------------------------------------------------------------


def test_adaptive_gan_weight_is_the_clamped_gradient_norm_ratio_on_the_last_layer():
    model = tiny_vqgan()
    images = ShapesImages(4)[0]["images"][None].repeat(2, 1, 1, 1)
    reconstructions, _ = model.tokenizer(images)
    nll = (reconstructions - images).abs().mean()
    gan = -model.discriminator(reconstructions).mean()
    last = model.tokenizer.decoder.last_layer
    expected = torch.autograd.grad(nll, last, retain_graph=True)[0].norm() / (
        torch.autograd.grad(gan, last, retain_graph=True)[0].norm() + 1e-4
    )
    assert model.gan_weight(nll, gan).item() == pytest.approx(0.75 * expected.item(), rel=1e-5)
    assert not model.gan_weight(nll, gan).requires_grad


@pytest.mark.parametrize(
    ("generator_loss", "discriminator_loss"), [("hinge", "hinge"), ("non_saturating", "hinge"), ("hinge", "non_saturating")]
)
def test_generator_and_discriminator_gan_losses_are_chosen_apart(generator_loss, discriminator_loss):
    torch.manual_seed(0)
    loss = LossConfig(pretrained_lpips=False, perceptual_weight=0.0, adaptive_disc_weight=False, disc_weight=1.0,
                      generator_loss=generator_loss, discriminator_loss=discriminator_loss)
    model = tiny_vqgan(loss=loss)
    images = torch.stack([ShapesImages(2)[i]["images"] for i in range(2)])
    reconstructions, _, logs = model.generator_loss(images, gan_active=True)
    with torch.no_grad():
        fake, real = model.discriminator(reconstructions), model.discriminator(images)
    expected_g = {"hinge": -fake.mean(), "non_saturating": F.softplus(-fake).mean()}[generator_loss]
    assert logs["g_loss"].item() == pytest.approx(expected_g.item(), rel=1e-6)
    d_loss, _ = model.discriminator_loss(images, reconstructions.detach())
    expected_d = {
        "hinge": 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean()),
        "non_saturating": 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean()),
    }[discriminator_loss]
    assert d_loss.item() == pytest.approx(expected_d.item(), rel=1e-6)


def test_an_unknown_gan_loss_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"loss.generator_loss must be one of \['hinge', 'non_saturating'\], got 'wasserstein'"):
        LossConfig(generator_loss="wasserstein")


def test_the_generator_step_runs_a_batch_norm_discriminator_on_batch_statistics_without_moving_its_running_ones():
    """As taming, D normalises each call's batch in both steps (the generator is trained against the D
    that D's step trains); unlike taming, only D's step moves the running statistics, D's state."""
    torch.manual_seed(0)
    model = tiny_vqgan(discriminator=DiscriminatorConfig(ndf=8, n_layers=1, norm="batch"),
                       loss=LossConfig(pretrained_lpips=False, perceptual_weight=0.0, adaptive_disc_weight=False, disc_weight=1.0))
    images = torch.stack([ShapesImages(2)[i]["images"] for i in range(2)])
    buffers = {name: value.clone() for name, value in model.discriminator.named_buffers()}
    assert "main.3.running_mean" in buffers
    on_batch_statistics = copy.deepcopy(model.discriminator)  # in training mode
    reconstructions, _, logs = model.generator_loss(images, gan_active=True)
    assert all(torch.equal(value, buffers[name]) for name, value in model.discriminator.named_buffers())
    with torch.no_grad():
        assert logs["g_loss"].item() == pytest.approx(-on_batch_statistics(reconstructions).mean().item(), rel=1e-6)
        assert logs["g_loss"].item() != pytest.approx(-on_batch_statistics.eval()(reconstructions).mean().item(), rel=1e-3)
    model.discriminator_loss(images, reconstructions.detach())
    moved = dict(model.discriminator.named_buffers())
    assert not torch.equal(moved["main.3.running_mean"], buffers["main.3.running_mean"])
    assert int(moved["main.3.num_batches_tracked"]) == 2  # D's real and fake batches


def test_a_batch_norm_discriminator_becomes_sync_batch_norm_on_several_gpu_processes(tmp_path):
    model = tiny_vqgan(discriminator=DiscriminatorConfig(ndf=8, n_layers=1, norm="batch"))
    model.trainer = trainer(tmp_path, max_steps=1)  # one process: plain BatchNorm
    model.configure_model()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.discriminator.modules())
    model.trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    norm = model.discriminator.main[3]
    model.configure_model()
    synced = model.discriminator.main[3]
    assert isinstance(synced, torch.nn.SyncBatchNorm) and synced.weight is norm.weight and synced.running_mean is norm.running_mean
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.discriminator.modules())


def test_a_batch_norm_discriminator_on_several_cpu_processes_is_refused_with_the_fix(tmp_path):
    model = tiny_vqgan(discriminator=DiscriminatorConfig(ndf=8, n_layers=1, norm="batch"))
    model.trainer = trainer(tmp_path, max_steps=1, devices=2, strategy="ddp")
    with pytest.raises(ValueError, match=r"discriminator.norm 'batch'.*2 processes.*GPU.*'group'"):
        model.configure_model()


def test_a_batch_norm_discriminator_under_fsdp2_is_refused_with_the_fix():
    model = tiny_vqgan(discriminator=DiscriminatorConfig(ndf=8, n_layers=1, norm="batch"))
    model.trainer = SimpleNamespace(world_size=2, strategy=AtomicModelParallelStrategy())
    with pytest.raises(ValueError, match=r"discriminator.norm 'batch' is not supported under FSDP2.*ddp.yaml.*'group'"):
        model.configure_model()


class RecordLoss(L.Callback):
    def __init__(self):
        self.rec_losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rec_losses.append(trainer.callback_metrics["train/rec_loss"].item())


def test_tiny_tokenizer_learns_to_reconstruct_shapes(tmp_path):
    torch.manual_seed(0)
    model = tiny_vqgan(
        image_size=32,
        quantizer=VectorQuantizer(dim=8, codebook_size=64, l2_normalize=True),
        autoencoder=AutoencoderConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, image_size=32),
        loss=LossConfig(pretrained_lpips=False, perceptual_weight=0.0, disc_start=10_000),
        optimizer=OptimizerConfig(lr=2e-3, betas=(0.9, 0.95)),
    )
    recorder = RecordLoss()
    trainer(tmp_path, max_steps=150, callbacks=[recorder]).fit(model, loader(num_samples=128, batch_size=16, image_size=32))
    first, last = sum(recorder.rec_losses[:10]) / 10, sum(recorder.rec_losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


# --- resume, checkpoints, export ------------------------------------------------------------


def resumable_vqgan() -> VQGAN:
    torch.manual_seed(0)
    return tiny_vqgan(
        quantizer=VectorQuantizer(dim=4, codebook_size=32, ema_decay=0.9),
        loss=LossConfig(pretrained_lpips=False, perceptual_weight=0.1, disc_start=2, lecam_weight=0.1),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=2, schedule="cosine"),
        ema_decay=0.9,
    )


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    """Resume from the checkpoint a 6-step run wrote after its first epoch: the module's whole state
    (both networks, codebook EMA, weight EMA, LeCAM), both optimizers and both schedules continue
    exactly. Every batch holds the same images, so the check does not hang on where Lightning
    restarts a map-style loader (the datamodule's stream keeps its own position)."""
    data = DataLoader(ConcatDataset([ShapesImages(8)] * 3), batch_size=8, shuffle=False)  # 3 equal batches an epoch
    straight = resumable_vqgan()
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    trainer(tmp_path / "a", max_steps=6, enable_checkpointing=True, callbacks=[every_epoch]).fit(straight, data)

    resumed = resumable_vqgan()
    resumer = trainer(tmp_path / "b", max_steps=6)
    resumer.fit(resumed, data, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")

    assert resumed.global_step == straight.global_step == 6
    expected, actual = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    for ours, theirs in zip(resumer.optimizers, straight.trainer.optimizers):
        for a, b in zip(ours.state_dict()["state"].values(), theirs.state_dict()["state"].values()):
            torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=0)
    assert [config.scheduler.last_epoch for config in resumer.lr_scheduler_configs] == [6, 6]


def test_checkpoint_omits_lpips_and_gives_stage_2_a_frozen_tokenizer(tmp_path):
    model = resumable_vqgan()
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(model, loader())
    fit.save_checkpoint(tmp_path / "run.ckpt")
    state = torch.load(tmp_path / "run.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith("lpips.")]

    images = ShapesImages(4)[0]["images"][None]
    tokenizer = load_tokenizer(tmp_path / "run.ckpt")
    assert isinstance(tokenizer, VQTokenizer) and not tokenizer.training
    assert not any(p.requires_grad for p in tokenizer.parameters())
    ids = tokenizer.encode(images)
    assert ids.shape == (1, 8, 8) and ids.dtype == torch.long
    model.eval()
    torch.testing.assert_close(ids, model.encode(images))  # the EMA weights
    assert tokenizer.decode(ids).shape == (1, 3, 16, 16)

    reloaded = VQGAN.load_from_checkpoint(tmp_path / "run.ckpt", weights_only=True)
    torch.testing.assert_close(reloaded.encode(images), ids)


def test_export_writes_safetensors_and_config_that_load_back(tmp_path):
    from tessera.commands.cli import main

    model = resumable_vqgan()
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(model, loader())
    fit.save_checkpoint(tmp_path / "run.ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "run.ckpt"), "--out", str(tmp_path / "export")]) == 0
    exported = load_tokenizer(tmp_path / "export")
    description = exported.describe()
    assert description["codebook_size"] == 32 and description["downsample_factor"] == 2
    images = ShapesImages(2)[1]["images"][None]
    torch.testing.assert_close(exported.decode(exported.encode(images)), load_tokenizer(tmp_path / "run.ckpt").decode(exported.encode(images)))


def test_decode_rejects_ids_outside_the_codebook():
    tokenizer = tiny_vqgan().tokenizer
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        tokenizer.decode(torch.full((1, 8, 8), 32))


def test_loading_a_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tessera export"):
        load_tokenizer(tmp_path / "empty")


# --- the command line and DDP ---------------------------------------------------------------


@pytest.mark.slow
def test_fit_from_the_tiny_config_on_two_ddp_processes(tmp_path, shapes_dir):
    """`tessera fit` with the tiny config on 32 px shards, 2 CPU processes over gloo."""
    shards = sorted(str(p) for p in shapes_dir.glob("*.tar"))
    command = [
        sys.executable, "-m", "tessera.commands.cli", "fit",
        "--config", str(REPO / "configs/tokenizer/tiny_shapes.yaml"),
        "--model.init_args.autoencoder.image_size=32",
        "--model.init_args.loss.disc_start=2",
        f"--data=datamodules.caption_image.CaptionImageDataModule",
        f"--data.train_shards={shards[0]}", f"--data.val_shards={shards[2]}",
        "--data.image_size=32", "--data.batch_size=4", "--data.num_workers=0",
        "--trainer.devices=2", "--trainer.strategy=ddp_find_unused_parameters_true",
        "--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per rank on a 2-core machine
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints, result.stderr[-2000:]
    checkpoint = torch.load(checkpoints[0], weights_only=True)
    assert checkpoint["global_step"] == 4
    assert (tmp_path / "lightning_logs").exists() or list(tmp_path.rglob("config.yaml"))


class RecordDDPSettings(L.Callback):
    def on_train_start(self, trainer, pl_module):
        ddp = trainer.strategy.model  # the DistributedDataParallel wrapper
        self.settings = (ddp.find_unused_parameters, ddp.forward_sync_buffers)


def _plain_ddp_run(rank: int, world_size: int, root: str) -> dict:
    """A few G and D steps under a DDPStrategy of no options; (DDP's settings, every buffer) of this rank."""
    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size))  # the process group is up
    torch.manual_seed(rank)  # buffers that differed at the start would be synced when DDP wraps the module
    model = tiny_vqgan(
        quantizer=VectorQuantizer(dim=4, codebook_size=32, ema_decay=0.9, dead_code_threshold=0.5),
        loss=LossConfig(pretrained_lpips=False, perceptual_weight=0.1, disc_start=1, lecam_weight=0.1),
    )
    settings = RecordDDPSettings()
    fit = trainer(Path(root), max_steps=2, devices=world_size, strategy=DDPStrategy(), callbacks=[settings])
    fit.fit(model, loader(num_samples=16, batch_size=4))
    return {
        "settings": settings.settings,
        "buffers": {name: buffer.clone() for name, buffer in model.named_buffers()},
    }


@pytest.mark.slow
def test_a_plain_ddp_strategy_trains_the_gan_on_two_processes_with_identical_buffers_never_broadcast(tmp_path):
    """configs/trainer/ddp.yaml's DDPStrategy: the module asks for unused parameters (alternating G
    and D steps) and no per-step buffer broadcast, yet the codebook EMA, usage counts and LeCAM
    anchors stay the same on both ranks."""
    from tests.distributed import run_distributed

    ranks = run_distributed(_plain_ddp_run, str(tmp_path))
    assert [rank["settings"] for rank in ranks] == [(True, False)] * 2
    first, second = (rank["buffers"] for rank in ranks)
    assert "lecam.ema_real" in first and "tokenizer.quantizer.code_sum" in first
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=0, msg=name)
    assert first["lecam.ema_real"] != 0  # the anchors moved


def test_loading_a_checkpoint_that_is_no_vqgan_says_so(tmp_path):
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1e-3}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a VQGAN checkpoint"):
        load_tokenizer(tmp_path / "other.ckpt")
