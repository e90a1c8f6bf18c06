"""Non-finite losses: the step is skipped on every rank and counted; K in a row stop the run."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import ConcatDataset, DataLoader

from lightning_modules.nonfinite import NonFiniteLossError, NonFiniteLossGuard
from lightning_modules.prior import PriorOptimizerConfig
from lightning_modules.vqgan import LossConfig
from tessera.nn.vector_quantizer import VectorQuantizer
from tests.distributed import run_distributed
from tests.test_prior import Tokens, tiny_prior, tokenizer_dir  # noqa: F401 (fixture)
from tests.test_vqgan import loader, tiny_vqgan, trainer


class PoisonBatches(L.Callback):
    """Turns the images (VQGAN) or the loss scale (prior) of chosen batches into NaN, and records
    the weights around every batch."""

    def __init__(self, poisoned: set[int]):
        self.poisoned = poisoned
        self.changed: dict[int, bool] = {}
        self._before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = {k: v.clone() for k, v in pl_module.state_dict().items() if v.is_floating_point()}
        if trainer.global_step in self.poisoned:
            for value in batch.values():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    value.fill_(math.nan)
            pl_module.poison_loss = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.poison_loss = False
        after = pl_module.state_dict()
        self.changed[trainer.global_step - 1] = any(not torch.equal(after[k], v) for k, v in self._before.items())


def poisonable_prior(tokenizer_dir, **optimizer):
    """The tiny prior whose loss is NaN while `poison_loss` is set (token batches have no float input)."""
    prior = tiny_prior(tokenizer_dir, optimizer=PriorOptimizerConfig(lr=3e-3, warmup_steps=0, schedule="constant", **optimizer))
    prior.poison_loss = False
    loss = prior.transformer.loss

    def maybe_poisoned(*args, **kwargs):
        losses = loss(*args, **kwargs)
        if prior.poison_loss:
            losses["loss"] = losses["loss"] * math.nan
        return losses

    prior.transformer.loss = maybe_poisoned
    return prior


def test_vqgan_skips_a_nan_step_without_touching_any_weight(tmp_path):
    # every piece of state a forward pass updates: EMA codebook, dead-code restarts, LeCAM anchors
    model = tiny_vqgan(
        quantizer=VectorQuantizer(dim=4, codebook_size=32, ema_decay=0.9, dead_code_threshold=0.5),
        loss=LossConfig(pretrained_lpips=False, perceptual_weight=0.0, disc_start=0, lecam_weight=0.1),
        ema_decay=0.9,
    )
    poison = PoisonBatches({2})
    trainer(tmp_path, max_steps=4, callbacks=[poison]).fit(model, loader())
    assert model.global_step == 4  # the skipped step still counts, so schedules stay on the batches
    assert poison.changed == {0: True, 1: True, 2: False, 3: True}
    assert model.nonfinite.skipped == 1 and model.nonfinite.consecutive == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_prior_skips_a_nan_step_without_touching_any_weight(tmp_path, tokenizer_dir):
    prior = poisonable_prior(tokenizer_dir)
    data = DataLoader(ConcatDataset([Tokens(prior)] * 4), batch_size=8, shuffle=False)
    poison = PoisonBatches({1})
    trainer(tmp_path, max_steps=3, callbacks=[poison]).fit(prior, data)
    assert prior.global_step == 3
    assert poison.changed == {0: True, 1: False, 2: True}
    assert prior.nonfinite.skipped == 1
    assert all(torch.isfinite(p).all() for p in prior.parameters())


def test_consecutive_nan_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, tokenizer_dir):
    prior = poisonable_prior(tokenizer_dir, max_nonfinite_steps=3)
    data = DataLoader(ConcatDataset([Tokens(prior)] * 8), batch_size=8, shuffle=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    run = trainer(tmp_path, max_steps=8, enable_checkpointing=True, callbacks=[checkpoints, PoisonBatches({4, 5, 6, 7})])
    with pytest.raises(NonFiniteLossError, match="3 training steps in a row"):
        run.fit(prior, data)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6  # saved after the step-5 skip, whose update was a no-op
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_the_guard_needs_a_loss_before_deciding():
    with pytest.raises(RuntimeError, match="before any observe"):
        NonFiniteLossGuard(3).step_is_finite(0)
    with pytest.raises(ValueError):
        NonFiniteLossGuard(0)


def _decide_with_nan_on_rank_one(rank: int, world_size: int) -> list[bool]:
    guard = NonFiniteLossGuard(max_consecutive=5)
    decisions = []
    for step in range(3):
        loss = torch.tensor(math.nan if (rank == 1 and step == 1) else 1.0)
        guard.observe(loss)
        decisions.append(guard.step_is_finite(step))
    return decisions


def test_one_rank_with_a_nan_loss_makes_every_rank_skip():
    assert run_distributed(_decide_with_nan_on_rank_one) == [[True, False, True]] * 2

