"""Launching into a run directory again: atomic checkpoints, resume from the newest, the requeue signal."""

from __future__ import annotations

import os
import signal
import time

import lightning as L
import pytest
import yaml
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import ConcatDataset, DataLoader

from callbacks.preemption import REQUEUE_CHECKPOINT, Requeue
from lightning_modules.prior import PriorOptimizerConfig
from tessera.commands.fit import lightning_cli
from tessera.commands.fit import AtomicCheckpointIO, newest_checkpoint, prepare_trainer, resume_checkpoint
from tests.test_prior import Tokens, tiny_prior, tokenizer_dir  # noqa: F401 (fixture)
from tests.test_vqgan import REPO, trainer


def test_a_crash_while_writing_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)

    def dies_halfway(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_resume_picks_the_newest_checkpoint_unless_one_is_given(tmp_path):
    directory = tmp_path / "checkpoints"
    assert resume_checkpoint(tmp_path, None) is None
    directory.mkdir()
    for index, name in enumerate(["step=100.ckpt", "last.ckpt", REQUEUE_CHECKPOINT, ".last.ckpt.tmp-7.ckpt"]):
        (directory / name).write_bytes(b"x")
        os.utime(directory / name, ns=(index * 10**9, index * 10**9))
    assert newest_checkpoint(directory) == directory / REQUEUE_CHECKPOINT  # temporaries never count
    assert resume_checkpoint(tmp_path, "chosen.ckpt") == "chosen.ckpt"


def test_under_slurm_our_requeue_replaces_lightnings_signal_handler(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "prior")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NODELIST", "localhost")
    run = L.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, callbacks=[ModelCheckpoint()], logger=False)
    environment = run._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    prepare_trainer(run)
    assert not environment.auto_requeue
    assert [type(c) for c in run.callbacks if isinstance(c, Requeue)] == [Requeue]
    assert run.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")
    assert isinstance(run.strategy.checkpoint_io, AtomicCheckpointIO)


class SignalAt(L.Callback):
    """Sends this process `signum` at the start of training batch `batch`."""

    def __init__(self, batch: int, signum: int = signal.SIGUSR1):
        self.batch, self.signum = batch, signum
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batches == self.batch:
            os.kill(os.getpid(), self.signum)
        self.batches += 1


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_signal_checkpoints_at_the_next_step_stops_and_the_resumed_run_ends_equal(tmp_path, tokenizer_dir, accumulate):
    def prior():
        return tiny_prior(tokenizer_dir, optimizer=PriorOptimizerConfig(lr=3e-3, warmup_steps=2, schedule="cosine"))

    straight = prior()
    data = DataLoader(ConcatDataset([Tokens(straight)] * 16), batch_size=8, shuffle=False)  # 16 equal batches
    trainer(tmp_path / "a", max_steps=6, accumulate_grad_batches=accumulate).fit(straight, data)

    interrupted, requeue = prior(), Requeue(tmp_path / "b" / "checkpoints")
    signalled_in_batch = 2 if accumulate == 1 else 3  # with accumulation: the middle of step 1's window
    run = trainer(tmp_path / "b", max_steps=6, accumulate_grad_batches=accumulate, callbacks=[requeue, SignalAt(signalled_in_batch)])
    run.fit(interrupted, data)
    saved = torch.load(tmp_path / "b" / "checkpoints" / REQUEUE_CHECKPOINT, weights_only=True)
    assert saved["global_step"] == run.global_step == (3 if accumulate == 1 else 2)  # the first step boundary after it
    assert signal.getsignal(signal.SIGUSR1) is not requeue._on_signal  # handler restored

    resumed = prior()
    trainer(tmp_path / "b", max_steps=6, accumulate_grad_batches=accumulate).fit(
        resumed, data, ckpt_path=resume_checkpoint(tmp_path / "b", None)
    )
    assert resumed.global_step == 6
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_second_launch_into_the_run_directory_resumes_where_the_first_stopped(tmp_path, shapes_dir):
    shards = sorted(str(p) for p in shapes_dir.glob("*.tar"))

    def fit(max_steps: int) -> L.Trainer:
        return lightning_cli([
            "fit", "--config", str(REPO / "configs/tokenizer/tiny_shapes.yaml"),
            "--model.init_args.autoencoder.image_size=32", "--model.init_args.autoencoder.ch_mult=[1,2]",
            "--data=datamodules.caption_image.CaptionImageDataModule",
            f"--data.train_shards={shards[0]}", "--data.image_size=32", "--data.batch_size=4", "--data.num_workers=0",
            f"--trainer.max_steps={max_steps}", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
            "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}",
        ]).trainer

    first = fit(max_steps=3)
    assert (tmp_path / "config.yaml").exists() and newest_checkpoint(tmp_path / "checkpoints") is not None
    started = time.time()
    second = fit(max_steps=5)  # the same command but a later end: config.yaml exists, the run continues
    assert str(second.ckpt_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    assert first.global_step == 3 and second.global_step == 5
    assert newest_checkpoint(tmp_path / "checkpoints").stat().st_mtime >= started


def test_the_configs_keep_a_resume_checkpoint_and_the_newest_three_step_checkpoints(tmp_path, tokenizer_dir):
    from jsonargparse import ArgumentParser

    sections = yaml.safe_load((REPO / "configs/prior/300m.yaml").read_text())["trainer"]["callbacks"]
    checkpoint_sections = [c for c in sections if c["class_path"].endswith("ModelCheckpoint")]
    for section in checkpoint_sections:
        section["init_args"]["every_n_train_steps"] = 1 if section["init_args"].get("save_last") else 2
    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[L.Callback])
    callbacks = parser.instantiate_classes(parser.parse_object({"callbacks": checkpoint_sections})).callbacks
    prior = tiny_prior(tokenizer_dir)
    data = DataLoader(ConcatDataset([Tokens(prior)] * 16), batch_size=8, shuffle=False)
    run = trainer(tmp_path, max_steps=11, enable_checkpointing=True, callbacks=callbacks)
    prepare_trainer(run)
    run.fit(prior, data)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=0000006.ckpt", "step=0000008.ckpt", "step=0000010.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 11
