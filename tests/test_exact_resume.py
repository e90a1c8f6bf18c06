"""Exact mid-epoch resume: a run stopped at any batch and resumed from its checkpoint trains on the
same batches, in the same order, with the same random numbers, and ends with the same weights,
bit for bit, as the run that was never stopped. The stream on its own, then both stages through
a Trainer on CPU, on one process and on two DDP processes over gloo.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from datamodules.caption_image import CaptionImageDataModule, EpochLoader
from datamodules.stream import CaptionImageStream
from lightning_modules.prior import PriorOptimizerConfig, TextImagePrior
from tessera.nn.autoencoder import AutoencoderConfig
from tessera.nn.transformer import TransformerConfig
from tessera.nn.vector_quantizer import VectorQuantizer
from tests.distributed import as_launched_rank, run_distributed
from tests.samples import encode, write_wds_shard
from tests.test_vqgan import tiny_vqgan

TEXT_LENGTH = 24


# --- the stream ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_urls(tmp_path_factory) -> list[str]:
    """4 shards of 16 noisy 48x40 PNGs (wider than tall: random crops move) and a corrupt one."""
    out = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    urls = []
    for shard in range(4):
        pixels = rng.integers(0, 256, (16, 40, 48, 3), np.uint8)
        samples = [{"__key__": f"{shard}_{i:02d}", "png": encode(Image.fromarray(pixels[i]), "PNG"),
                    "txt": f"sample {i} of shard {shard}"} for i in range(16)]
        samples.insert(2, {"__key__": f"{shard}_corrupt", "png": b"not a png", "txt": "broken"})
        write_wds_shard(out / f"{shard:05d}.tar", samples)
        urls.append(str(out / f"{shard:05d}.tar"))
    return urls


def photo_stream(urls, captions) -> CaptionImageStream:
    # 10 batches of 4; with 2 workers, each draws at most 20 + 8 (buffer) + 2 (corrupt) of its 34
    # samples, so no key comes twice
    return CaptionImageStream(urls, captions, samples_per_epoch=40, batch_size=4, image_size=32,
                              shuffle_buffer=8, random_crop=True, seed=3)


def stop_and_resume(urls, captions, num_workers: int, stop: int, resumed_workers: int | None = None) -> list[dict]:
    """The batches of an epoch stopped after training on `stop` batches, then resumed from the loader's state."""
    loader = EpochLoader(photo_stream(urls, captions), 0, num_workers=num_workers)
    batches = iter(loader)
    trained = []
    for _ in range(stop):
        trained.append(next(batches))
        loader.trained_on(trained[-1]["position"])
    next(batches)  # fetched ahead, as Lightning does, but never trained on
    state = loader.state_dict()
    del batches

    resumed_workers = num_workers if resumed_workers is None else resumed_workers
    resumed = EpochLoader(photo_stream(urls, captions), 0, num_workers=resumed_workers)
    resumed.load_state_dict(state)
    return trained + list(resumed)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_resumed_mid_epoch_yields_the_rest_of_the_uninterrupted_epoch(photo_urls, caption_tokenizer, num_workers):
    straight = list(EpochLoader(photo_stream(photo_urls, caption_tokenizer), 0, num_workers=num_workers))
    resumed = stop_and_resume(photo_urls, caption_tokenizer, num_workers, stop=3)

    assert [b["keys"] for b in resumed] == [b["keys"] for b in straight]
    assert all(torch.equal(r["images"], s["images"]) for r, s in zip(resumed, straight))
    keys = [k for b in straight for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 40 and not [k for k in keys if "corrupt" in k]
    skipped = [sum(b["stats"].get("corrupt_image", 0) for b in run) for run in (straight, resumed)]
    assert any(b["stats"] for b in straight[:3])  # a skip among the samples that are replayed
    assert skipped[0] == skipped[1] > 0  # counted once, not again while replaying


def test_stream_resumed_with_another_worker_count_warns_and_finishes_the_epoch(photo_urls, caption_tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        batches = stop_and_resume(photo_urls, caption_tokenizer, num_workers=2, stop=3, resumed_workers=0)
    assert len(batches) == 10
    assert "start afresh" in caplog.text


# --- both stages through a Trainer -----------------------------------------------------------


class RecordKeys(L.Callback):
    def __init__(self):
        self.keys: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys.extend(batch["keys"])


def write_token_shards(directory: Path, id_shape: tuple[int, ...] = (4, 4)) -> str:
    """3 token shards of 16 caption + id samples (4x4 ids of 64 codes by default), as `tessera tokenize` writes them."""
    rng = np.random.default_rng(1)
    for shard in range(3):
        samples = []
        for i in range(16):
            buffer = io.BytesIO()
            np.save(buffer, rng.integers(0, 64, id_shape))
            samples.append({"__key__": f"{shard}_{i:02d}", "tokens.npy": buffer.getvalue(), "txt": f"{i % 5} red circles"})
        write_wds_shard(directory / f"{shard:05d}.tar", samples)
    return str(directory / "{00000..00002}.tar")


def vqgan_run(shards: str, **overrides):
    """The tokenizer with dropout and dead-code restarts (global RNG), and 40 samples an epoch in batches
    of 4; `overrides` replace VQGAN's arguments."""
    torch.manual_seed(0)
    model = tiny_vqgan(
        image_size=32,
        quantizer=VectorQuantizer(dim=4, codebook_size=32, dead_code_threshold=0.5),
        autoencoder=AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, image_size=32, dropout=0.2),
        **overrides,
    )
    data = CaptionImageDataModule(shards, image_size=32, batch_size=4, num_workers=2, text_length=TEXT_LENGTH,
                                  train_samples=40, shuffle_buffer=8)
    return model, data


def prior_run(shards: str):
    """The prior with dropout (global RNG) and caption dropout, and 24 token-shard samples an epoch in batches of 4."""
    torch.manual_seed(0)
    config = TransformerConfig(text_length=TEXT_LENGTH, image_vocab_size=64, image_grid=4, n_layer=2, n_head=2, n_embd=32,
                               dropout=0.2)
    model = TextImagePrior(transformer=config, optimizer=PriorOptimizerConfig(lr=3e-3, warmup_steps=2, schedule="cosine"))
    data = CaptionImageDataModule(shards, batch_size=4, num_workers=1, text_length=TEXT_LENGTH, train_samples=24,
                                  shuffle_buffer=8, image_tokens=True)
    return model, data


def fit(make_run, shards: str, root: Path, steps: int, checkpoint_at: int | None = None, ckpt_path: Path | None = None,
        callbacks: tuple[L.Callback, ...] = (), **trainer_options):
    """(final weights, keys trained on) of a run to `steps` that saves a checkpoint at step `checkpoint_at` or
    resumes from `ckpt_path`; `trainer_options` replace the CPU trainer's."""
    model, data = make_run(shards)
    keys = RecordKeys()
    callbacks = [keys, *callbacks]
    if checkpoint_at is not None:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=checkpoint_at, save_top_k=-1))
    if ckpt_path is not None:  # a fresh process's RNGs would be anywhere: resume must not depend on them
        torch.manual_seed(1234)
        random.seed(1234)
        np.random.seed(1234)
    options = dict(accelerator="cpu", max_steps=steps, default_root_dir=root, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=checkpoint_at is not None, callbacks=callbacks)
    trainer = L.Trainer(**{**options, **trainer_options})
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return {name: value.clone() for name, value in model.state_dict().items()}, keys.keys


def straight_and_resumed(make_run, shards: str, root: Path, steps: int, stop: int, **trainer_options):
    straight = fit(make_run, shards, root / "straight", steps, checkpoint_at=stop, **trainer_options)
    (checkpoint,) = (root / "straight" / "ckpt").glob(f"*step={stop}.ckpt")
    resumed = fit(make_run, shards, root / "resumed", steps, ckpt_path=checkpoint, **trainer_options)
    return straight, resumed


def assert_resumed_exactly(straight, resumed, stop: int, batch_size: int = 4) -> None:
    (expected_weights, expected_keys), (weights, keys) = straight, resumed
    assert keys == expected_keys[stop * batch_size:]
    assert weights.keys() == expected_weights.keys()
    unequal = [name for name in expected_weights if not torch.equal(weights[name], expected_weights[name])]
    assert not unequal, unequal


def test_tokenizer_resumed_mid_epoch_ends_with_the_weights_of_the_uninterrupted_run(tmp_path, shapes_dir):
    # 10 batches an epoch read by 2 workers: stopped after 5 (worker 1's turn next), run on into the next epoch
    straight, resumed = straight_and_resumed(vqgan_run, str(shapes_dir / "{00000..00002}.tar"), tmp_path, steps=13, stop=5)
    assert_resumed_exactly(straight, resumed, stop=5)


def test_prior_resumed_mid_epoch_ends_with_the_weights_of_the_uninterrupted_run(tmp_path):
    shards = write_token_shards(tmp_path)
    straight, resumed = straight_and_resumed(prior_run, shards, tmp_path, steps=9, stop=4)
    assert_resumed_exactly(straight, resumed, stop=4)
    (checkpoint,) = (tmp_path / "straight" / "ckpt").glob("*step=4.ckpt")
    (loader_state,) = torch.load(checkpoint, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["ranks"][0]["batches"] == 4  # trained on, not the one fetched ahead


def _on_two_ranks(rank: int, world_size: int, vqgan_shards: str, root: str) -> list:
    """Both stages stopped and resumed on this rank of a 2-process DDP run; (straight, resumed) per stage."""
    torch.set_num_threads(1)
    # loader workers fork, as under torchrun or Lightning's launcher, instead of re-importing everything
    multiprocessing.set_start_method("fork", force=True)
    as_launched_rank(rank, world_size)
    root = Path(root)
    token_shards = write_token_shards(root) if rank == 0 else str(root / "{00000..00002}.tar")
    torch.distributed.barrier()
    ddp = dict(devices=world_size, strategy="ddp_find_unused_parameters_true")
    return [
        straight_and_resumed(vqgan_run, vqgan_shards, root / "vqgan", steps=5, stop=3, **ddp),
        straight_and_resumed(prior_run, token_shards, root / "prior", steps=4, stop=2, **ddp),
    ]


def test_both_stages_resumed_on_two_ddp_processes_end_with_the_uninterrupted_weights(tmp_path, shapes_dir):
    ranks = run_distributed(_on_two_ranks, str(shapes_dir / "{00000..00002}.tar"), str(tmp_path))
    for rank_runs in ranks:
        (vqgan_straight, vqgan_resumed), (prior_straight, prior_resumed) = rank_runs
        assert_resumed_exactly(vqgan_straight, vqgan_resumed, stop=3)
        assert_resumed_exactly(prior_straight, prior_resumed, stop=2)
    keys = [set(rank_runs[0][0][1]) for rank_runs in ranks]
    assert not keys[0] & keys[1]  # the ranks read different samples
