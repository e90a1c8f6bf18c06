"""The Gumbel-softmax quantizer (DALL-E's dVAE): its annealing schedules, argmax ids in eval, the
relaxed sample and its straight-through variant, the KL to the uniform prior, fp32 under bf16
autocast; then the dVAE tokenizer through a real Trainer (its ELBO falls, its schedules resume
where they stopped) and a prior trained over its ids.

Tiny networks (ch 8, 16-32 px): the whole file runs in seconds on two CPU cores.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.testing import assert_close

from lightning_modules.prior import PriorOptimizerConfig, TextImagePrior
from lightning_modules.vqgan import LossConfig, OptimizerConfig, load_tokenizer
from tessera.nn.autoencoder import AutoencoderConfig
from tessera.nn.gumbel_quantizer import GumbelQuantizer, cosine_ramp, kl_to_uniform
from tessera.nn.quantizer_base import build_quantizer, quantizer_spec
from tessera.nn.vq_tokenizer import VQTokenizer
from tests.devices import DEVICES
from tests.test_prior import shapes_data, tiny_config
from tests.test_vqgan import discriminator_steps, loader, tiny_vqgan, trainer


def flat(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C), the quantizer's rows."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


# --- schedules -------------------------------------------------------------------------------


def test_temperature_anneals_along_a_cosine_from_1_to_a_sixteenth_and_stays_there():
    quantizer = GumbelQuantizer(dim=4, codebook_size=8, temperature_steps=100)
    quarter = 1 / 16 + (15 / 16) * (1 + math.cos(math.pi / 4)) / 2
    for step, expected in [(0, 1.0), (25, quarter), (50, (1 + 1 / 16) / 2), (100, 1 / 16), (10_000, 1 / 16)]:
        quantizer.set_step(step)
        assert_close(quantizer.temperature(), torch.tensor(expected), msg=f"step {step}")


def test_kl_weight_rises_along_a_cosine_from_0_to_its_weight_and_is_held_there():
    quantizer = GumbelQuantizer(dim=4, codebook_size=8, kl_weight=6.6, kl_warmup_steps=5000)
    for step, expected in [(0, 0.0), (1250, 6.6 * (1 - math.cos(math.pi / 4)) / 2), (2500, 3.3), (5000, 6.6), (10**6, 6.6)]:
        quantizer.set_step(step)
        assert_close(quantizer.current_kl_weight(), torch.tensor(expected), msg=f"step {step}")


def test_a_schedule_of_no_steps_is_at_its_end_from_step_0():
    assert cosine_ramp(torch.tensor(0), 0) == 1.0


def test_a_temperature_that_would_anneal_up_or_to_zero_is_refused():
    with pytest.raises(ValueError, match="temperature_end <= temperature_start"):
        GumbelQuantizer(dim=4, codebook_size=8, temperature_start=0.5, temperature_end=1.0)
    with pytest.raises(ValueError, match="positive end"):
        GumbelQuantizer(dim=4, codebook_size=8, temperature_end=0.0)


# --- forward ---------------------------------------------------------------------------------


def test_eval_ids_are_the_argmax_of_the_logits_the_same_every_call_and_decode_to_z_q():
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(dim=4, codebook_size=32).eval()
    z = torch.randn(2, 4, 3, 5)
    first, second = quantizer(z), quantizer(z)
    assert first.ids.shape == (2, 3, 5) and first.ids.dtype == torch.long
    assert torch.equal(first.ids, second.ids) and torch.equal(first.z_q, second.z_q)
    assert torch.equal(first.ids.flatten(), quantizer.logits(flat(z)).argmax(-1))
    assert torch.equal(first.z_q, quantizer.ids_to_codes(first.ids))
    assert first.loss == 0 and first.losses == {}


def test_training_decodes_the_gumbel_softmax_sample_mixed_over_the_codebook():
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(dim=4, codebook_size=32, temperature_steps=10)
    quantizer.set_step(5)
    z = torch.randn(2, 4, 3, 3)
    torch.manual_seed(1)
    out = quantizer(z)
    torch.manual_seed(1)  # the same Gumbel noise
    soft = F.gumbel_softmax(quantizer.logits(flat(z)), tau=quantizer.temperature(), dim=-1)
    assert_close(flat(out.z_q), soft @ quantizer.codebook)
    assert torch.equal(out.ids.flatten(), soft.argmax(-1))
    assert_close(out.stats["temperature"], quantizer.temperature())
    assert not torch.equal(out.z_q, quantizer(z).z_q)  # a new sample every call


def test_gradients_reach_the_encoder_through_the_relaxation_and_not_through_eval_argmax():
    torch.manual_seed(0)
    config = AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, image_size=16)
    tokenizer = VQTokenizer(config, GumbelQuantizer(dim=8, codebook_size=16))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstructions, quantized = tokenizer(images)
    assert quantized.loss == 0  # the KL weight starts at 0: every gradient below comes through the sample
    F.mse_loss(reconstructions, images).backward()
    for parameter in (tokenizer.encoder.conv_in.weight, tokenizer.quantizer.to_logits.weight, tokenizer.quantizer.codebook):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0

    tokenizer.zero_grad(set_to_none=True)
    tokenizer.eval()
    reconstructions, _ = tokenizer(images)
    F.mse_loss(reconstructions, images).backward()
    assert tokenizer.encoder.conv_in.weight.grad is None  # the argmax passes no gradient


def test_kl_to_the_uniform_prior_is_zero_for_uniform_logits_and_positive_otherwise():
    assert_close(kl_to_uniform(torch.zeros(6, 16)), torch.tensor(0.0))
    assert_close(kl_to_uniform(torch.full((6, 16), 3.0)), torch.tensor(0.0))  # any constant row is uniform
    assert kl_to_uniform(torch.randn(6, 16)) > 0
    assert_close(kl_to_uniform(torch.eye(16) * 1e4), torch.tensor(math.log(16)))  # one-hot: log K

    quantizer = GumbelQuantizer(dim=4, codebook_size=16)
    with torch.no_grad():
        quantizer.to_logits.weight.zero_()
        quantizer.to_logits.bias.zero_()
    assert_close(quantizer(torch.randn(2, 4, 3, 3)).losses["kl"], torch.tensor(0.0))


def test_the_quantizer_loss_is_the_kl_at_its_scheduled_weight():
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(dim=4, codebook_size=16, kl_weight=0.5, kl_warmup_steps=10)
    quantizer.set_step(5)
    z = torch.randn(2, 4, 3, 3)
    out = quantizer(z)
    assert_close(out.losses["kl"], kl_to_uniform(quantizer.logits(flat(z))))
    assert_close(out.loss, 0.25 * out.losses["kl"])
    assert_close(out.stats["kl_weight"], torch.tensor(0.25))


def test_straight_through_decodes_the_argmax_code_with_the_relaxed_samples_gradient():
    torch.manual_seed(0)
    soft = GumbelQuantizer(dim=4, codebook_size=16)
    hard = GumbelQuantizer(dim=4, codebook_size=16, straight_through=True)
    hard.load_state_dict(soft.state_dict())
    z = torch.randn(2, 4, 3, 3)
    upstream = torch.randn(2, 4, 3, 3)
    gradients = {}
    for name, quantizer in (("soft", soft), ("hard", hard)):
        torch.manual_seed(1)  # the same Gumbel noise
        z_in = z.clone().requires_grad_()
        out = quantizer(z_in)
        (out.z_q * upstream).sum().backward()
        gradients[name] = z_in.grad
        if name == "hard":
            assert torch.equal(out.z_q, quantizer.ids_to_codes(out.ids))  # exactly the argmax codes
        else:
            assert not torch.equal(out.z_q, quantizer.ids_to_codes(out.ids))  # a mix of codes
    assert_close(gradients["hard"], gradients["soft"])  # the relaxed sample's gradient reaches z


@pytest.mark.parametrize("device", DEVICES)
def test_logits_and_codes_are_fp32_and_z_q_follows_z_dtype_under_bf16_autocast(device):
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(dim=4, codebook_size=64).to(device).eval()
    z = torch.randn(2, 4, 4, 4).bfloat16().to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = quantizer(z)
    assert torch.equal(out.ids, quantizer(z.float()).ids)
    assert out.z_q.dtype == torch.bfloat16 and quantizer.ids_to_codes(out.ids).dtype == torch.float32
    quantizer.train()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = quantizer(z)
    assert out.loss.dtype == torch.float32 and out.z_q.dtype == torch.bfloat16


def test_spec_rebuilds_the_same_quantizer_and_the_state_keeps_the_schedule_position():
    quantizer = GumbelQuantizer(dim=8, codebook_size=32, straight_through=True, temperature_end=0.1,
                                temperature_steps=50, kl_weight=0.2, kl_warmup_steps=7, usage_window=128)
    quantizer.set_step(20)
    spec = quantizer_spec(quantizer)
    rebuilt = build_quantizer(spec)
    assert type(rebuilt) is GumbelQuantizer and quantizer_spec(rebuilt) == spec and rebuilt.codebook_size == 32
    rebuilt.load_state_dict(quantizer.state_dict())
    assert_close(rebuilt.temperature(), quantizer.temperature())
    assert_close(rebuilt.current_kl_weight(), quantizer.current_kl_weight())


# --- the dVAE tokenizer through a Trainer ------------------------------------------------------


def tiny_dvae(**quantizer_options) -> L.LightningModule:
    """A VQGAN module with a Gumbel quantizer, trained on its ELBO alone: no LPIPS, no GAN."""
    options = dict(dim=8, codebook_size=32, temperature_steps=40, kl_weight=0.01, kl_warmup_steps=10)
    return tiny_vqgan(
        quantizer=GumbelQuantizer(**{**options, **quantizer_options}),
        loss=LossConfig(pretrained_lpips=False, perceptual_weight=0.0, disc_start=None),
        optimizer=OptimizerConfig(lr=3e-3, betas=(0.9, 0.95)),
    )


class RecordSchedules(L.Callback):
    """The loss, temperature and KL weight every training batch used."""

    def __init__(self):
        self.losses, self.temperatures, self.kl_weights = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.losses.append(metrics["train/loss"].item())
        self.temperatures.append(metrics["train/codebook/temperature"].item())
        self.kl_weights.append(metrics["train/codebook/kl_weight"].item())


def test_tiny_dvae_lowers_its_elbo_with_the_schedules_following_the_steps_and_no_discriminator(tmp_path):
    torch.manual_seed(0)
    model, recorder = tiny_dvae(), RecordSchedules()
    trainer(tmp_path, max_steps=20, callbacks=[recorder]).fit(model, loader(num_samples=32, batch_size=8))
    first, last = sum(recorder.losses[:5]) / 5, sum(recorder.losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    quantizer = model.tokenizer.quantizer
    expected = []
    for step in range(20):
        quantizer.set_step(step)
        expected.append((quantizer.temperature().item(), quantizer.current_kl_weight().item()))
    assert_close(list(zip(recorder.temperatures, recorder.kl_weights)), expected)
    assert discriminator_steps(model) == 0  # disc_start None: the ELBO alone


def test_a_resumed_dvae_continues_its_schedules_where_the_run_stopped(tmp_path):
    data = loader(num_samples=16, batch_size=8)  # 2 batches an epoch
    torch.manual_seed(0)
    straight, straight_record = tiny_dvae(), RecordSchedules()
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    trainer(tmp_path / "a", max_steps=6, enable_checkpointing=True, callbacks=[every_epoch, straight_record]).fit(straight, data)

    checkpoint = tmp_path / "ckpt" / "epoch=1-step=4.ckpt"
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert int(state["tokenizer.quantizer.step"]) == 3  # the last step trained before it was written

    torch.manual_seed(0)
    resumed, resumed_record = tiny_dvae(), RecordSchedules()
    trainer(tmp_path / "b", max_steps=6, callbacks=[resumed_record]).fit(resumed, data, ckpt_path=checkpoint)
    assert resumed_record.temperatures == straight_record.temperatures[4:]
    assert resumed_record.kl_weights == straight_record.kl_weights[4:]
    assert int(resumed.tokenizer.quantizer.step) == int(straight.tokenizer.quantizer.step) == 5


# --- stage 2 over the dVAE's ids -------------------------------------------------------------


def test_a_prior_trains_on_the_ids_of_an_exported_gumbel_tokenizer(tmp_path, shapes_dir):
    torch.manual_seed(0)
    dvae = tiny_vqgan(
        image_size=32,
        quantizer=GumbelQuantizer(dim=4, codebook_size=64),
        autoencoder=AutoencoderConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=8, image_size=32),
        loss=LossConfig(pretrained_lpips=False, perceptual_weight=0.0, disc_start=None),
    )
    export = dvae.tokenizer.save_pretrained(tmp_path / "dvae")
    tokenizer = load_tokenizer(export)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    dvae.eval()
    assert torch.equal(tokenizer.encode(images), dvae.encode(images))  # argmax ids, (B, 4, 4)

    prior = TextImagePrior(transformer=tiny_config(), tokenizer=str(export), optimizer=PriorOptimizerConfig(lr=3e-3))
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(prior, datamodule=shapes_data(shapes_dir))
    assert prior.global_step == 2 and torch.isfinite(fit.callback_metrics["train/loss"])
