"""Validation over every good sample exactly once: on shards with undecodable samples and uneven
sizes, the losses and metrics of both stages are the same for any batch size and any number of
loader workers or DDP processes (whose last batches are padded so all run as many steps):
padding never counts."""

from __future__ import annotations

import io
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.caption_image import CaptionImageDataModule
from lightning_modules.prior import TextImagePrior
from tessera.nn.autoencoder import AutoencoderConfig
from tessera.nn.transformer import TransformerConfig
from tests.distributed import run_distributed
from tests.samples import img2dataset_shards_with_bad_samples, write_wds_shard
from tests.test_vqgan import tiny_vqgan

TEXT_LENGTH = 24
# (good, undecodable) samples per shard; the size records count both. Image shards are split between
# the two ranks by shard (9 and 3 + 4 recorded), the one token shard by sample.
IMAGE_SHARDS = [(7, 2), (2, 1), (4, 0)]
TOKEN_SHARDS = [(8, 3)]


def write_token_shards(directory: Path, layout: list[tuple[int, int]]) -> list[str]:
    """Token shards as `tessera tokenize` writes them (4x4 ids of 64 codes), with unreadable ids."""
    rng = np.random.default_rng(0)
    urls = []
    for shard, (good, bad) in enumerate(layout):
        samples = []
        for i in range(good):
            buffer = io.BytesIO()
            np.save(buffer, rng.integers(0, 64, (4, 4)).astype(np.uint16))
            samples.append({"__key__": f"{shard}_{i:02d}", "tokens.npy": buffer.getvalue(), "txt": f"{i % 5} red circles"})
        samples += [{"__key__": f"{shard}_bad{i}", "tokens.npy": b"garbage", "txt": "cut"} for i in range(bad)]
        write_wds_shard(directory / f"{shard:05d}.tar", samples)
        (directory / f"{shard:05d}_stats.json").write_text(f'{{"successes": {good + bad}}}')
        urls.append(str(directory / f"{shard:05d}.tar"))
    return urls


def validate_both_stages(images: list[str], tokens: list[str], root: Path, val_batch_size: int = 3, num_workers: int = 0,
                         **trainer_options) -> dict[str, float]:
    """The validation metrics of a tiny tokenizer on the image shards and a tiny prior on the token shards."""
    def validate(model: L.LightningModule, data: CaptionImageDataModule) -> dict[str, float]:
        trainer = L.Trainer(accelerator="cpu", default_root_dir=root, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, **trainer_options)
        return trainer.validate(model, datamodule=data, verbose=False)[0]

    data = dict(val_batch_size=val_batch_size, num_workers=num_workers, text_length=TEXT_LENGTH)
    torch.manual_seed(0)
    autoencoder = AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, image_size=32)
    tokenizer = validate(tiny_vqgan(image_size=32, autoencoder=autoencoder),
                         CaptionImageDataModule(images, val_shards=images, image_size=32, **data))
    torch.manual_seed(0)
    config = TransformerConfig(text_length=TEXT_LENGTH, image_vocab_size=64, image_grid=4, n_layer=1, n_head=2, n_embd=32)
    token_data = CaptionImageDataModule(tokens, val_shards=tokens, image_tokens=True, **data)
    prior = validate(TextImagePrior(transformer=config), token_data)
    return {**{f"tokenizer {name}": value for name, value in tokenizer.items()},
            **{f"prior {name}": value for name, value in prior.items()}}


def _on_two_ranks(rank: int, world_size: int, images: list[str], tokens: list[str], root: str) -> dict[str, float]:
    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size))  # the process group is up: no launching
    return validate_both_stages(images, tokens, Path(root), devices=world_size, strategy="ddp")


@pytest.fixture
def shards(tmp_path) -> tuple[list[str], list[str]]:
    (tmp_path / "images").mkdir(), (tmp_path / "tokens").mkdir()
    images = img2dataset_shards_with_bad_samples(tmp_path / "images", IMAGE_SHARDS)
    return images, write_token_shards(tmp_path / "tokens", TOKEN_SHARDS)


def assert_same_metrics(logged: dict[str, float], expected: dict[str, float]) -> None:
    assert logged.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(logged[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_validation_metrics_count_every_good_sample_once_whatever_the_batches_and_loader_workers(tmp_path, shards):
    # two loader workers split the samples as two ranks would: the one with fewer pads out its last
    # batch and adds one of padding only
    one = validate_both_stages(*shards, tmp_path, val_batch_size=16)
    split = validate_both_stages(*shards, tmp_path, val_batch_size=3, num_workers=2)

    assert one["tokenizer val/samples"] == 13 and one["prior val/samples"] == 8  # the good samples, once each
    assert {"tokenizer val/rec_loss", "tokenizer val/psnr", "tokenizer val/codebook/usage", "prior val/loss",
            "prior val/text_loss", "prior val/image_loss"} <= one.keys()
    assert_same_metrics(split, one)


@pytest.mark.slow
def test_validation_on_two_ddp_processes_logs_what_one_process_logs(tmp_path, shards):
    one = validate_both_stages(*shards, tmp_path / "one", devices=1)
    for logged in run_distributed(_on_two_ranks, *shards, str(tmp_path / "two")):
        assert_same_metrics(logged, one)
