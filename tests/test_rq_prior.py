"""The RQTransformerPrior LightningModule through a real Trainer on CPU: learning on the shapes set
through a frozen residual tokenizer, start-up checks, exact resume from token shards on one
process and on two DDP processes, and export -> load -> sample through the commands."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Dataset

from datamodules.caption_image import CaptionImageDataModule
from lightning_modules.fsdp import AtomicModelParallelStrategy
from lightning_modules.prior import PriorOptimizerConfig, TextImagePrior, build_prior, load_prior
from lightning_modules.rq_prior import RQTransformerPrior
from tessera.nn.autoencoder import AutoencoderConfig
from tessera.nn.residual_quantizer import ResidualQuantizer
from tessera.nn.rq_transformer import RQTransformerConfig
from tessera.sampling import SamplingConfig
from tests.distributed import as_launched_rank, run_distributed
from tests.test_evaluation import coco  # noqa: F401 (a fixture: a tiny COCO-format val set)
from tests.test_exact_resume import assert_resumed_exactly, straight_and_resumed, write_token_shards
from tests.test_prior import RecordLoss, shapes_data, tokenizer_dir  # noqa: F401 (tokenizer_dir: a fixture, flat)
from tests.test_vqgan import tiny_vqgan, trainer

TEXT_LENGTH = 24
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def rq_tokenizer_dir(tmp_path_factory) -> Path:
    """A random-init residual f8 tokenizer: 32 px images -> 4x4 positions x 2 codes of 64."""
    torch.manual_seed(0)
    vqgan = tiny_vqgan(
        image_size=32,
        quantizer=ResidualQuantizer(dim=4, codebook_size=64, depth=2),
        autoencoder=AutoencoderConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=8, image_size=32),
    )
    return vqgan.tokenizer.save_pretrained(tmp_path_factory.mktemp("rq_tokenizer"))


def tiny_rq_config(**overrides) -> RQTransformerConfig:
    options = dict(text_length=TEXT_LENGTH, image_vocab_size=64, image_grid=4, code_depth=2, n_layer=2, depth_n_layer=1,
                   n_head=2, n_embd=32)
    return RQTransformerConfig(**{**options, **overrides})


def tiny_rq_prior(tokenizer_dir, **overrides) -> RQTransformerPrior:
    torch.manual_seed(0)
    options = dict(
        transformer=tiny_rq_config(), tokenizer=None if tokenizer_dir is None else str(tokenizer_dir),
        optimizer=PriorOptimizerConfig(lr=3e-3, warmup_steps=5, schedule="constant"),
    )
    return RQTransformerPrior(**{**options, **overrides})


class ResidualTokens(Dataset):
    """Eight fixed caption / (4, 4, 2) id samples as token shards would give them."""

    def __init__(self, prior: RQTransformerPrior):
        generator = torch.Generator().manual_seed(1)
        captions = prior.captions([f"{n} red circles" for n in range(8)])
        self.samples = [
            {"text_ids": captions.ids[i], "text_mask": captions.mask[i],
             "image_ids": torch.randint(64, (4, 4, 2), generator=generator)}
            for i in range(8)
        ]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def test_rq_prior_learns_the_codes_of_the_shapes_set_through_a_frozen_residual_tokenizer(tmp_path, rq_tokenizer_dir,
                                                                                         shapes_dir):
    prior, recorder = tiny_rq_prior(rq_tokenizer_dir), RecordLoss()
    trainer(tmp_path, max_steps=30, callbacks=[recorder]).fit(prior, datamodule=shapes_data(shapes_dir, batch_size=16))
    first, last = np.mean(recorder.losses[:5]), np.mean(recorder.losses[-5:])
    assert last < 0.6 * first, (first, last)
    assert not [name for name in prior.state_dict() if "tokenizer" in name]  # frozen, outside the module tree


def test_a_tokenizer_of_one_id_per_position_or_another_depth_is_refused_at_start_up(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="one id per position .VectorQuantizer.*TextImagePrior"):
        tiny_rq_prior(tokenizer_dir)
    tiny_vqgan(
        image_size=32, quantizer=ResidualQuantizer(dim=4, codebook_size=64, depth=3),
        autoencoder=AutoencoderConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=8, image_size=32),
    ).tokenizer.save_pretrained(tmp_path / "depth3")
    with pytest.raises(ValueError, match="depth 3 but transformer.code_depth is 2"):
        tiny_rq_prior(tmp_path / "depth3")
    with pytest.raises(ValueError, match="64 codes but transformer.image_vocab_size is 128"):
        tiny_rq_prior(tmp_path / "depth3", transformer=tiny_rq_config(code_depth=3, image_vocab_size=128))


def test_token_shards_of_another_depth_are_refused_with_the_grid_expected(tmp_path):
    prior = tiny_rq_prior(None)
    batch = next(iter(DataLoader(ResidualTokens(prior), batch_size=4)))
    batch["image_ids"] = batch["image_ids"][..., :1]
    with pytest.raises(ValueError, match=r"grid of \(4, 4, 1\), the transformer expects \(4, 4, 2\)"):
        prior.image_ids(batch)


# --- exact resume from token shards, on one process and two -----------------------------------


def rq_prior_run(shards: str):
    """The RQ prior with dropout (global RNG) and caption dropout, 24 token-shard samples an epoch in batches of 4."""
    torch.manual_seed(0)
    model = RQTransformerPrior(transformer=tiny_rq_config(dropout=0.2),
                               optimizer=PriorOptimizerConfig(lr=3e-3, warmup_steps=2, schedule="cosine"))
    data = CaptionImageDataModule(shards, batch_size=4, num_workers=1, text_length=TEXT_LENGTH, train_samples=24,
                                  shuffle_buffer=8, image_tokens=True)
    return model, data


def test_rq_prior_resumed_mid_epoch_ends_with_the_weights_of_the_uninterrupted_run(tmp_path):
    shards = write_token_shards(tmp_path, id_shape=(4, 4, 2))
    straight, resumed = straight_and_resumed(rq_prior_run, shards, tmp_path, steps=9, stop=4)
    assert_resumed_exactly(straight, resumed, stop=4)


def _resumed_on_two_ranks(rank: int, world_size: int, root: str) -> tuple:
    torch.set_num_threads(1)
    multiprocessing.set_start_method("fork", force=True)  # loader workers fork, as under torchrun
    as_launched_rank(rank, world_size)
    root = Path(root)
    shards = write_token_shards(root, id_shape=(4, 4, 2)) if rank == 0 else str(root / "{00000..00002}.tar")
    torch.distributed.barrier()
    # plain "ddp": every parameter of both transformers must get a gradient every step
    return straight_and_resumed(rq_prior_run, shards, root / "prior", steps=4, stop=2, devices=world_size, strategy="ddp")


@pytest.mark.slow  # two processes importing Lightning
def test_rq_prior_trains_and_resumes_exactly_on_two_ddp_processes(tmp_path):
    ranks = run_distributed(_resumed_on_two_ranks, str(tmp_path))
    for straight, resumed in ranks:
        assert_resumed_exactly(straight, resumed, stop=2)
    (weights, keys), (other_weights, other_keys) = ranks[0][0], ranks[1][0]
    assert not set(keys) & set(other_keys)  # the ranks read different samples
    for name, weight in weights.items():
        torch.testing.assert_close(other_weights[name], weight, rtol=0, atol=0, msg=name)  # and stay in step


def _under_ddp_and_fsdp2(rank: int, world_size: int, root: str, tokenizer_dir: str) -> dict:
    torch.set_num_threads(1)
    as_launched_rank(rank, world_size)
    runs = {}
    for name, strategy in (("ddp", DDPStrategy()), ("fsdp2", AtomicModelParallelStrategy())):
        prior, losses = tiny_rq_prior(tokenizer_dir), RecordLoss()
        fit = trainer(Path(root) / name, max_steps=3, devices=world_size, strategy=strategy, callbacks=[losses])
        fit.fit(prior, DataLoader(ResidualTokens(prior), batch_size=2))  # 2 batches an epoch on each rank
        # under FSDP2 every rank samples with the sharded model: the depth steps gather their blocks too
        runs[name] = {"losses": losses.losses, "images": prior.generate(PROMPTS, seed=0)}
    return runs


@pytest.mark.slow  # two processes importing Lightning
def test_rq_prior_under_fsdp2_trains_as_under_ddp_and_samples_on_every_rank(tmp_path, rq_tokenizer_dir):
    ranks = run_distributed(_under_ddp_and_fsdp2, str(tmp_path), str(rq_tokenizer_dir))
    for rank in ranks:
        torch.testing.assert_close(rank["fsdp2"]["losses"], rank["ddp"]["losses"])
        assert rank["fsdp2"]["images"].shape == (2, 3, 32, 32)
    torch.testing.assert_close(ranks[1]["fsdp2"]["images"], ranks[0]["fsdp2"]["images"], rtol=0, atol=0)


# --- export, load, sample ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, rq_tokenizer_dir) -> Path:
    """An RQ prior one step into training, saved, with sampling settings of its own."""
    root = tmp_path_factory.mktemp("rq_fit")
    prior = tiny_rq_prior(rq_tokenizer_dir, sampling={"top_k": 16, "cfg_scale": 2.0})
    fit = trainer(root, max_steps=1)
    fit.fit(prior, DataLoader(ResidualTokens(prior), batch_size=8))
    fit.save_checkpoint(root / "prior.ckpt")
    return root / "prior.ckpt"


def test_export_then_load_gives_the_rq_prior_its_weights_and_its_images(tmp_path, checkpoint):
    from tessera.commands.cli import main

    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    from_checkpoint, from_export = load_prior(checkpoint), load_prior(tmp_path / "export")
    for prior in (from_checkpoint, from_export):
        assert type(prior) is RQTransformerPrior and prior.sampling == SamplingConfig(top_k=16, cfg_scale=2.0)
    expected = from_checkpoint.transformer.state_dict()
    assert from_export.transformer.state_dict().keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(from_export.transformer.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    images = from_export.generate(PROMPTS, seed=3)
    assert images.shape == (2, 3, 32, 32) and -1 <= images.min() and images.max() <= 1
    torch.testing.assert_close(from_checkpoint.generate(PROMPTS, seed=3), images, rtol=0, atol=0)


def test_sample_with_clip_reranking_and_evaluate_shapes_commands_take_an_rq_prior(tmp_path, checkpoint, tiny_clip):
    from tessera.commands.cli import main

    clip_model, clip_weights = tiny_clip
    argv = ["sample", "--prior", str(checkpoint), "--prompt", *PROMPTS, "--num-images", "2", "--candidates", "3",
            "--clip-model", clip_model, "--clip-weights", str(clip_weights), "--top-k", "8", "--out", str(tmp_path / "samples")]
    assert main(argv) == 0
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == 4
    settings = json.loads((tmp_path / "samples" / "settings.json").read_text())
    assert (settings["top_k"], settings["cfg_scale"]) == (8, 2.0)  # given, and the prior's own
    assert all(len(scores) == 2 and scores[0] >= scores[1] for scores in settings["clip_scores"])  # the best 2 of 3
    out = tmp_path / "shapes.json"
    argv = ["evaluate", "shapes", "--prior", str(checkpoint), "--num-samples", "2", "--batch-size", "2", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["seen"]["n"] == report["held_out"]["n"] == 2


def test_evaluate_coco_command_takes_an_rq_prior(tmp_path, coco, checkpoint):
    from tessera.commands.cli import main

    annotations, images = coco
    argv = ["evaluate", "coco", "--prior", str(checkpoint), "--annotations", str(annotations), "--images", str(images),
            "--num-samples", "2", "--batch-size", "2", "--feature-extractor", "tests.test_evaluation:tiny_extractor",
            "--image-size", "32", "--workers", "0", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["count"] == 2 and results["fid"] > 0
    assert (results["sampler"]["top_k"], results["sampler"]["cfg_scale"]) == (16, 2.0)  # the prior's own


def test_a_flat_prior_still_loads_as_a_flat_prior(tmp_path, tokenizer_dir):
    from tests.test_prior import Tokens, tiny_prior

    prior = tiny_prior(tokenizer_dir)
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(prior, DataLoader(Tokens(prior), batch_size=8))
    fit.save_checkpoint(tmp_path / "prior.ckpt")
    assert type(load_prior(tmp_path / "prior.ckpt")) is TextImagePrior


# --- soft labels and stochastic codes ------------------------------------------------------------


def test_soft_codes_are_the_softmax_of_minus_the_distance_to_each_code_of_the_residual_each_depth_quantizes():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(dim=4, codebook_size=8, depth=3, ema_decay=None).eval()
    z = torch.randn(2, 4, 3, 3)
    ids, targets = quantizer.soft_codes(z, temperature=0.5)
    assert torch.equal(ids, quantizer(z).ids) and targets.shape == (2, 3, 3, 3, 8)
    torch.testing.assert_close(targets.sum(-1), torch.ones(2, 3, 3, 3))
    codebook = quantizer.vq.codebook
    residual = z.permute(0, 2, 3, 1)  # (B, H, W, dim): what depth 0 quantizes
    for depth in range(3):
        expected = (-(residual[..., None, :] - codebook).square().sum(-1) / 0.5).softmax(-1)
        torch.testing.assert_close(targets[..., depth, :], expected)
        residual = residual - codebook[ids[..., depth]]


def test_stochastic_codes_are_drawn_from_the_soft_targets_and_the_residuals_follow_the_drawn_codes():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(dim=4, codebook_size=8, depth=2, ema_decay=None).eval()
    z = torch.randn(4, 4, 4, 4)
    nearest, _ = quantizer.soft_codes(z, temperature=100.0)
    drawn, targets = quantizer.soft_codes(z, 100.0, stochastic=True, generator=torch.Generator().manual_seed(1))
    again, _ = quantizer.soft_codes(z, 100.0, stochastic=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(drawn, again) and not torch.equal(drawn, nearest)  # near-uniform at temperature 100
    residual = z.permute(0, 2, 3, 1) - quantizer.vq.codebook[drawn[..., 0]]
    expected = (-(residual[..., None, :] - quantizer.vq.codebook).square().sum(-1) / 100.0).softmax(-1)
    torch.testing.assert_close(targets[..., 1, :], expected)


def test_with_soft_labels_a_training_step_takes_the_tokenizers_soft_codes_drawn_with_the_batch_seed(rq_tokenizer_dir):
    prior = tiny_rq_prior(rq_tokenizer_dir, soft_label_temperature=0.5, stochastic_codes=True, caption_dropout=0.0)
    captions = prior.captions([f"{n} red circles" for n in range(8)])
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"images": images, "text_ids": captions.ids, "text_mask": captions.mask}
    ids, targets = prior.training_targets(batch)
    assert ids.shape == (8, 16, 2) and targets.shape == (8, 16, 2, 64)
    torch.testing.assert_close(targets.sum(-1), torch.ones(8, 16, 2))
    assert torch.equal(prior.training_targets(batch)[0], ids)  # the batch's seed: a resumed run draws the same
    prior.log = prior.log_dict = lambda *args, **kwargs: None
    prior.log_throughput = lambda batch_size: None
    text_ids, text_mask = prior.text(batch)
    soft = prior.transformer.loss(text_ids, text_mask, ids, 0.1, 0.9, targets)["loss"]
    torch.testing.assert_close(prior.training_step(batch, 0), soft)  # the step's loss is against the soft targets
    assert not torch.allclose(soft, prior.transformer.loss(text_ids, text_mask, ids, 0.1, 0.9)["loss"])
    with pytest.raises(ValueError, match="token shards"):
        prior.training_targets({"image_ids": ids.view(8, 4, 4, 2)})
    with pytest.raises(ValueError, match="set soft_label_temperature too"):
        tiny_rq_prior(None, stochastic_codes=True)
    rebuilt = build_prior(dict(prior.hparams))  # what load_prior does with a checkpoint's or export's arguments
    assert (rebuilt.hparams.soft_label_temperature, rebuilt.hparams.stochastic_codes) == (0.5, True)
