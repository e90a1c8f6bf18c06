"""The TextImagePrior LightningModule through a real Trainer on CPU: learning on the shapes set,
start-up checks, caption dropout, exact resume, generation, the sample command and callback, a
prior without text loss (no text head, under DDP too), accumulation, MFU and its peak."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from callbacks.samples import SampleLogger
from datamodules.caption_image import CaptionImageDataModule
from lightning_modules.prior import PriorOptimizerConfig, TextImagePrior, load_prior, peak_flops_for_mfu
from tessera.flops import peak_bf16_flops
from tessera.nn.autoencoder import AutoencoderConfig
from tessera.nn.transformer import TransformerConfig
from tessera.nn.vector_quantizer import VectorQuantizer
from tessera.sampling import SamplingConfig
from tests.distributed import as_launched_rank, run_distributed
from tests.test_vqgan import StepAfterEachBatch, grad_norm, tiny_vqgan, trainer

TEXT_LENGTH = 24


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A random-init f8 tokenizer: 32 px images -> 4x4 ids of 64 codes."""
    torch.manual_seed(0)
    vqgan = tiny_vqgan(
        image_size=32,
        quantizer=VectorQuantizer(dim=4, codebook_size=64),
        autoencoder=AutoencoderConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=8, image_size=32),
    )
    return vqgan.tokenizer.save_pretrained(tmp_path_factory.mktemp("tokenizer"))


def tiny_config(**overrides) -> TransformerConfig:
    options = dict(text_length=TEXT_LENGTH, image_vocab_size=64, image_grid=4, n_layer=2, n_head=2, n_embd=64)
    return TransformerConfig(**{**options, **overrides})


def tiny_prior(tokenizer_dir, **overrides) -> TextImagePrior:
    torch.manual_seed(0)
    options = dict(
        transformer=tiny_config(), tokenizer=str(tokenizer_dir),
        optimizer=PriorOptimizerConfig(lr=3e-3, warmup_steps=5, schedule="constant"),
    )
    return TextImagePrior(**{**options, **overrides})


def shapes_data(shapes_dir, batch_size: int = 8) -> CaptionImageDataModule:
    return CaptionImageDataModule(
        train_shards=str(shapes_dir / "{00000..00002}.tar"), val_shards=str(shapes_dir / "00002.tar"),
        image_size=32, batch_size=batch_size, num_workers=0, text_length=TEXT_LENGTH, shuffle_buffer=0,
    )


class RecordLoss(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def test_tiny_prior_learns_captions_and_image_tokens_of_the_shapes_set(tmp_path, tokenizer_dir, shapes_dir):
    prior, recorder = tiny_prior(tokenizer_dir), RecordLoss()
    trainer(tmp_path, max_steps=30, callbacks=[recorder]).fit(prior, datamodule=shapes_data(shapes_dir, batch_size=16))
    first, last = np.mean(recorder.losses[:5]), np.mean(recorder.losses[-5:])
    assert last < 0.6 * first, (first, last)


def test_a_tokenizer_of_another_codebook_or_grid_is_refused_at_start_up(tokenizer_dir):
    with pytest.raises(ValueError, match="64 codes but transformer.image_vocab_size is 128"):
        TextImagePrior(transformer=tiny_config(image_vocab_size=128), tokenizer=str(tokenizer_dir))
    with pytest.raises(ValueError, match="4x4 id grids at its 32 px but transformer.image_grid is 8"):
        TextImagePrior(transformer=tiny_config(image_grid=8), tokenizer=str(tokenizer_dir))
    with pytest.raises(ValueError, match="49408 tokens but the transformer's text_vocab_size is 1000"):
        TextImagePrior(transformer=tiny_config(text_vocab_size=1000))


def test_captions_of_another_length_are_refused_with_the_fix(tmp_path, tokenizer_dir, shapes_dir):
    prior = tiny_prior(tokenizer_dir, transformer=tiny_config(text_length=32))
    with pytest.raises(ValueError, match="24 tokens, the transformer's text_length is 32"):
        trainer(tmp_path, max_steps=1).fit(prior, datamodule=shapes_data(shapes_dir))


def test_caption_dropout_replaces_whole_captions_by_the_empty_one(tokenizer_dir):
    prior = tiny_prior(tokenizer_dir, caption_dropout=0.5)
    seen = {}

    def spy(text_ids, text_mask, image_ids, *weights):
        seen.update(text_ids=text_ids, text_mask=text_mask)
        return {"loss": torch.zeros((), requires_grad=True), "text_loss": torch.zeros(()), "image_loss": torch.zeros(())}

    prior.transformer.loss = spy
    prior.log = prior.log_dict = lambda *args, **kwargs: None
    prior.log_throughput = lambda batch_size: None
    captions = prior.captions(["a red circle"] * 64)
    batch = {"text_ids": captions.ids, "text_mask": captions.mask, "image_ids": torch.zeros(64, 4, 4, dtype=torch.long)}
    prior.training_step(batch, 0)
    dropped = (seen["text_ids"] == prior.null_text_ids).all(1)
    kept = (seen["text_ids"] == captions.ids).all(1)
    assert (dropped | kept).all() and 16 < dropped.sum() < 48
    assert torch.equal(seen["text_mask"][dropped], prior.null_text_mask.expand(int(dropped.sum()), -1))
    assert torch.equal(dropped, prior.dropped_captions(64))  # a function of the step: resumes exactly


class Tokens(Dataset):
    """Eight fixed caption/id samples as token shards would give them."""

    def __init__(self, prior: TextImagePrior):
        generator = torch.Generator().manual_seed(1)
        captions = prior.captions([f"{n} red circles" for n in range(8)])
        self.samples = [
            {"text_ids": captions.ids[i], "text_mask": captions.mask[i], "image_ids": torch.randint(64, (4, 4), generator=generator)}
            for i in range(8)
        ]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def test_gradients_are_clipped_in_bf16_mixed_with_fused_adamw(tmp_path, tokenizer_dir):
    optimizer = PriorOptimizerConfig(lr=3e-3, warmup_steps=5, schedule="constant", gradient_clip_val=0.5)
    prior = tiny_prior(tokenizer_dir, optimizer=optimizer)
    fit = trainer(tmp_path, max_steps=1, precision="bf16-mixed")
    fit.fit(prior, DataLoader(Tokens(prior), batch_size=8))  # Lightning's mixed-precision clipping refuses fused AdamW
    (adamw,) = fit.optimizers
    assert adamw.defaults["fused"]
    for param in prior.transformer.parameters():
        param.grad = torch.ones_like(param)
    prior.configure_gradient_clipping(adamw)
    assert grad_norm(adamw) == pytest.approx(0.5, rel=1e-2)  # from ~2,500: ones everywhere


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, tokenizer_dir):
    straight = tiny_prior(tokenizer_dir, optimizer=PriorOptimizerConfig(lr=3e-3, warmup_steps=2, schedule="cosine"))
    data = DataLoader(ConcatDataset([Tokens(straight)] * 2), batch_size=8, shuffle=False)  # 2 equal batches an epoch
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    trainer(tmp_path / "a", max_steps=4, enable_checkpointing=True, callbacks=[every_epoch]).fit(straight, data)

    resumed = tiny_prior(tokenizer_dir, optimizer=PriorOptimizerConfig(lr=3e-3, warmup_steps=2, schedule="cosine"))
    resumer = trainer(tmp_path / "b", max_steps=4)
    resumer.fit(resumed, data, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    assert resumed.global_step == 4
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)
    assert not [key for key in checkpoint["state_dict"] if "tokenizer" in key]  # the frozen tokenizer is not saved


def test_generate_gives_images_reproducible_for_a_seed_with_and_without_guidance(tokenizer_dir):
    from tessera.sampling import SamplingConfig

    prior = tiny_prior(tokenizer_dir).eval()
    for sampling in (SamplingConfig(top_k=16), SamplingConfig(top_p=0.9, cfg_scale=3.0)):
        images = prior.generate(["a red circle", "a blue square"], sampling, seed=3)
        assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
        assert images.min() >= -1 and images.max() <= 1
        torch.testing.assert_close(prior.generate(["a red circle", "a blue square"], sampling, seed=3), images)


def test_sample_command_writes_pngs_a_grid_and_its_settings(tmp_path, tokenizer_dir):
    from tessera.commands.cli import main

    prior = tiny_prior(tokenizer_dir)
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(prior, DataLoader(Tokens(prior), batch_size=8))
    fit.save_checkpoint(tmp_path / "prior.ckpt")
    out = tmp_path / "samples"
    # several prompts after one flag, and the flag repeated: every prompt is drawn
    argv = ["sample", "--prior", str(tmp_path / "prior.ckpt"), "--prompt", "a red circle", "two blue squares",
            "--prompt", "a green triangle", "--num-images", "3", "--cfg-scale", "2", "--top-k", "8", "--seed", "5",
            "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{p:04d}_{i:02d}.png" for p in range(3) for i in range(3)]
    assert Image.open(out / "grid.png").size == (3 * 32 + 4 * 2, 3 * 32 + 4 * 2)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prompts"] == ["a red circle", "two blue squares", "a green triangle"] and settings["cfg_scale"] == 2.0
    first = np.asarray(Image.open(out / "images" / "0000_00.png"))
    assert main(argv[:-1] + [str(tmp_path / "again")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again" / "images" / "0000_00.png")), first)


def test_a_priors_sampling_settings_travel_with_it_and_the_command_line_overrides_them(tmp_path, tokenizer_dir):
    from lightning_modules.prior import export_prior, load_prior
    from tessera.commands.cli import main

    prior = tiny_prior(tokenizer_dir, sampling={"top_k": 5, "cfg_scale": 1.5})
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(prior, DataLoader(Tokens(prior), batch_size=8))
    fit.save_checkpoint(tmp_path / "prior.ckpt")
    export_prior(tmp_path / "prior.ckpt", tmp_path / "export")
    for path in (tmp_path / "prior.ckpt", tmp_path / "export"):
        assert load_prior(path).sampling == SamplingConfig(top_k=5, cfg_scale=1.5)

    argv = ["sample", "--prior", str(tmp_path / "export"), "--prompt", "a red circle", "--num-images", "1"]
    assert main(argv + ["--out", str(tmp_path / "own")]) == 0
    settings = json.loads((tmp_path / "own" / "settings.json").read_text())
    assert (settings["top_k"], settings["cfg_scale"], settings["temperature"]) == (5, 1.5, 1.0)
    assert settings["sampling_from"] == {"top_k": "prior", "top_p": "prior", "temperature": "prior", "cfg_scale": "prior"}
    assert main(argv + ["--cfg-scale", "3", "--top-k", "0", "--out", str(tmp_path / "given")]) == 0
    settings = json.loads((tmp_path / "given" / "settings.json").read_text())
    assert (settings["top_k"], settings["cfg_scale"]) == (None, 3.0)
    assert settings["sampling_from"]["cfg_scale"] == "given" and settings["sampling_from"]["temperature"] == "prior"


def test_a_prior_without_sampling_settings_samples_with_the_defaults(tmp_path, tokenizer_dir):
    from tessera.sampling import with_overrides

    assert tiny_prior(tokenizer_dir).sampling is None
    sampling, sources = with_overrides(None, temperature=0.5)
    assert sampling == SamplingConfig(temperature=0.5)
    assert sources == {"top_k": "default", "top_p": "default", "temperature": "given", "cfg_scale": "default"}


def test_sample_logger_logs_a_grid_of_the_fixed_prompts(tmp_path, tokenizer_dir):
    prior = tiny_prior(tokenizer_dir)
    logger = SampleLogger(["a red circle", "a blue square"], every_n_steps=2, images_per_prompt=2, top_k=8)
    run = trainer(tmp_path, max_steps=2, logger=CSVLogger(tmp_path), callbacks=[logger])
    run.fit(prior, DataLoader(Tokens(prior), batch_size=4))
    grid = Image.open(tmp_path / "lightning_logs" / "version_0" / "samples" / "step_00000002.png")
    assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)


def test_sample_command_keeps_the_candidates_clip_scores_best(tmp_path, tokenizer_dir, tiny_clip):
    from tessera.commands.cli import main

    prior = tiny_prior(tokenizer_dir)
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(prior, DataLoader(Tokens(prior), batch_size=8))
    fit.save_checkpoint(tmp_path / "prior.ckpt")
    clip_model, clip_weights = tiny_clip
    argv = ["sample", "--prior", str(tmp_path / "prior.ckpt"), "--prompt", "a red circle", "--num-images", "2",
            "--candidates", "6", "--clip-model", clip_model, "--clip-weights", str(clip_weights), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    scores = settings["clip_scores"][0]
    assert len(scores) == 2 and scores[0] >= scores[1]
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 2
    with pytest.raises(SystemExit, match="clip-weights"):
        main(argv[: argv.index("--clip-model")] + ["--out", str(tmp_path / "none")])


def test_a_residual_tokenizer_is_refused_at_start_up(tmp_path):
    from tessera.nn.residual_quantizer import ResidualQuantizer

    vqgan = tiny_vqgan(
        image_size=32,
        quantizer=ResidualQuantizer(dim=4, codebook_size=64, depth=2),
        autoencoder=AutoencoderConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=8, image_size=32),
    )
    export = vqgan.tokenizer.save_pretrained(tmp_path / "rq")
    with pytest.raises(ValueError, match="residual"):
        TextImagePrior(transformer=tiny_config(), tokenizer=str(export))


def test_sample_command_refuses_fewer_candidates_than_images(tmp_path):
    from tessera.commands.cli import main

    with pytest.raises(SystemExit, match="fewer than --num-images"):
        main(["sample", "--prior", str(tmp_path / "p.ckpt"), "--prompt", "a red circle", "--num-images", "4",
              "--candidates", "2", "--out", str(tmp_path / "out")])


# --- without text loss, accumulation, MFU ---------------------------------------------------------


def test_a_prior_without_text_loss_is_built_saved_exported_and_loaded_without_a_text_head(tmp_path, tokenizer_dir):
    from tessera.commands.cli import main

    prior = tiny_prior(tokenizer_dir, text_loss_weight=0.0)
    assert prior.transformer.text_head is None
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(prior, DataLoader(Tokens(prior), batch_size=8))
    fit.save_checkpoint(tmp_path / "prior.ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "prior.ckpt"), "--out", str(tmp_path / "export")]) == 0
    expected = prior.transformer.state_dict()
    for path in (tmp_path / "prior.ckpt", tmp_path / "export"):
        loaded = load_prior(path).transformer.state_dict()
        assert loaded.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=f"{path.name}: {name}")


def _fit_without_text_loss(rank: int, world_size: int, root: str) -> dict:
    torch.set_num_threads(1)
    as_launched_rank(rank, world_size)
    prior = tiny_prior(None, tokenizer=None, text_loss_weight=0.0)
    # plain "ddp": every parameter must get a gradient every step, as in configs/trainer/ddp.yaml
    fit = trainer(Path(root), max_steps=3, devices=world_size, strategy="ddp")
    fit.fit(prior, DataLoader(Tokens(prior), batch_size=2))  # 2 batches an epoch on each rank
    weights = {name: tensor.clone() for name, tensor in prior.transformer.state_dict().items()}
    return {"step": prior.global_step, "weights": weights}


@pytest.mark.slow  # two processes importing Lightning
def test_a_prior_without_text_loss_trains_on_two_ddp_processes(tmp_path):
    ranks = run_distributed(_fit_without_text_loss, str(tmp_path))
    assert [rank["step"] for rank in ranks] == [3, 3]
    for name, weight in ranks[0]["weights"].items():
        torch.testing.assert_close(ranks[1]["weights"][name], weight, rtol=0, atol=0, msg=name)


def test_with_accumulation_an_epochs_leftover_batches_make_a_step_of_their_own(tmp_path):
    """Lightning's automatic optimization, as the tokenizer's manual steps: no batch joins the next epoch's step."""
    prior, steps = tiny_prior(None, tokenizer=None), StepAfterEachBatch()
    fit = trainer(tmp_path, max_steps=4, accumulate_grad_batches=2, callbacks=[steps])
    fit.fit(prior, DataLoader(Tokens(prior), batch_size=3))  # batches of 3, 3 and 2 samples
    assert steps.steps == [0, 1, 2, 2, 3, 4]


def test_mfu_is_logged_against_the_given_peak_flops_and_not_on_a_cpu_without_one(tmp_path):
    for peak in (1e12, None):
        prior = tiny_prior(None, tokenizer=None, peak_flops=peak)
        fit = trainer(tmp_path, max_steps=2)  # throughput from the second step on: the time between two
        fit.fit(prior, DataLoader(Tokens(prior), batch_size=4))
        metrics = fit.callback_metrics
        if peak is None:
            assert "throughput/mfu" not in metrics and "throughput/tokens_per_s" in metrics
        else:
            expected = metrics["throughput/tokens_per_s"].item() * prior.transformer.flops_per_token() / peak
            assert metrics["throughput/mfu"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_a_gpus_peak_is_looked_up_by_its_whole_name(name, peak):
    assert peak_bf16_flops(name) == peak


def test_an_unknown_gpu_logs_no_mfu_with_a_warning_and_peak_flops_overrides_the_table(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    with pytest.warns(UserWarning, match=r"'NVIDIA GeForce RTX 4090'.*peak_flops"):
        assert peak_flops_for_mfu(gpu, None) is None
    assert peak_flops_for_mfu(gpu, 165e12) == 165e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops_for_mfu(gpu, None) == 756e12
    assert peak_flops_for_mfu(gpu, 700e12) == 700e12
    assert peak_flops_for_mfu(torch.device("cpu"), None) is None


def test_peak_flops_is_a_typed_argument_that_fits_command_line_sets():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(L.LightningModule, "model")  # as `tessera fit`'s LightningCLI does
    args = parser.parse_args(["--model=lightning_modules.prior.TextImagePrior", "--model.init_args.peak_flops=7.56e14"])
    with torch.device("meta"):  # GPT-2 small's shape, not allocated
        prior = parser.instantiate_classes(args).model
    assert prior.peak_flops == 7.56e14
