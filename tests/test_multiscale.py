"""Coarse-to-fine multi-scale tokens: the two-level tokenizer (encode, decode, residual, export,
training as a VQGAN), the fine stage (its receptive field, training, export), and sampling through
the prior with a fine stage, down to `tessera sample`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from lightning_modules.fine_stage import FineStage, export_fine_stage, load_fine_stage
from lightning_modules.prior import PriorOptimizerConfig, TextImagePrior
from lightning_modules.vqgan import LossConfig, load_tokenizer
from tessera.commands.cli import main
from tessera.nn.autoencoder import AutoencoderConfig
from tessera.nn.fine_transformer import FineStageConfig, FineTransformer, local_attention_mask
from tessera.nn.finite_scalar_quantizer import FiniteScalarQuantizer
from tessera.nn.multiscale_tokenizer import MultiScaleIds, MultiScaleQuantizer, MultiScaleTokenizer, upsample
from tessera.nn.quantizer_base import build_quantizer, quantizer_spec
from tessera.nn.residual_quantizer import ResidualQuantizer
from tessera.nn.vector_quantizer import VectorQuantizer
from tessera.nn.vq_tokenizer import CONFIG_FILE, WEIGHTS_FILE, VQTokenizer
from tessera.sampling import SamplingConfig
from tests.test_prior import RecordLoss, tiny_config
from tests.test_vqgan import ShapesImages, tiny_vqgan, trainer

COARSE_LEVELS, FINE_LEVELS = (4, 4), (3, 3)  # 16 coarse codes, 9 fine codes, both 2 channels


def tiny_multiscale_vqgan(fine_dropout: float = 0.0):
    """f2 patch encoder at 32 px: 16x16 fine latents, an 8x8 coarse map."""
    quantizer = MultiScaleQuantizer(FiniteScalarQuantizer(COARSE_LEVELS), FiniteScalarQuantizer(FINE_LEVELS), fine_dropout)
    autoencoder = AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, image_size=32, encoder="patch")
    return tiny_vqgan(image_size=32, quantizer=quantizer, autoencoder=autoencoder)


def images(n: int = 4) -> torch.Tensor:
    return torch.stack([ShapesImages(n, image_size=32)[i]["images"] for i in range(n)])  # (n, 3, 32, 32)


@pytest.fixture(scope="module")
def multiscale_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return tiny_multiscale_vqgan().tokenizer.save_pretrained(tmp_path_factory.mktemp("multiscale"))


def tiny_fine_config(**overrides) -> FineStageConfig:
    options = dict(coarse_vocab_size=16, fine_vocab_size=9, coarse_grid=8, n_layer=2, n_head=2, n_embd=32, window=1)
    return FineStageConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
def fine_stage_dir(tmp_path_factory, multiscale_dir) -> Path:
    """A random-init fine stage for the tiny tokenizer, exported through its checkpoint."""
    torch.manual_seed(0)
    stage = FineStage(tiny_fine_config(), tokenizer=str(multiscale_dir))
    root = tmp_path_factory.mktemp("fine_stage")
    trainer(root, max_steps=1).fit(stage, DataLoader(ShapesImages(8, image_size=32), batch_size=4))
    checkpoint = root / "fine.ckpt"
    stage.trainer.save_checkpoint(checkpoint)
    export_fine_stage(checkpoint, root / "export")
    return root / "export"


# --- the multi-scale tokenizer --------------------------------------------------------------


def test_encode_gives_a_coarse_map_and_a_fine_map_of_twice_its_sides_and_decode_takes_both_or_the_coarse_alone():
    tokenizer = tiny_multiscale_vqgan().tokenizer.eval()
    ids = tokenizer.encode(images())
    assert isinstance(ids, MultiScaleIds)
    assert ids.coarse.shape == (4, 8, 8) and ids.fine.shape == (4, 16, 16)
    assert int(ids.coarse.max()) < 16 and int(ids.fine.max()) < 9
    full, coarse_only = tokenizer.decode(ids), tokenizer.decode(ids.coarse)
    assert full.shape == coarse_only.shape == (4, 3, 32, 32)
    reconstructions, _ = tokenizer(images())
    torch.testing.assert_close(full, reconstructions.clamp(-1, 1))  # decode(encode(x)) is the forward pass
    description = tokenizer.describe()
    assert (description["latent_size"], description["fine_latent_size"]) == (8, 16)
    assert (description["codebook_size"], description["fine_codebook_size"], description["downsample_factor"]) == (16, 9, 4)


def test_the_fine_level_quantizes_what_the_upsampled_coarse_codes_miss():
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(FiniteScalarQuantizer(COARSE_LEVELS), FiniteScalarQuantizer(FINE_LEVELS)).eval()
    z = torch.randn(2, 2, 8, 8)
    out = quantizer(z)
    coarse = quantizer.coarse(torch.nn.functional.avg_pool2d(z, 2))
    assert torch.equal(out.ids.coarse, coarse.ids)
    assert torch.equal(out.ids.fine, quantizer.fine(z - upsample(coarse.z_q)).ids)
    assert torch.equal(out.z_q, quantizer.ids_to_codes(out.ids))
    assert torch.equal(quantizer.ids_to_codes(out.ids.coarse), upsample(coarse.z_q))  # the coarse map alone


def test_fine_dropout_trains_some_images_on_their_coarse_codes_alone():
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(FiniteScalarQuantizer(COARSE_LEVELS), FiniteScalarQuantizer(FINE_LEVELS), 0.5)
    z = torch.randn(64, 2, 4, 4)
    z_q = quantizer(z).z_q
    ids = quantizer(z).ids
    coarse_only = (z_q == quantizer.ids_to_codes(ids.coarse)).flatten(1).all(1)  # (64,)
    with_fine = (z_q == quantizer.ids_to_codes(ids)).flatten(1).all(1)
    assert torch.all(coarse_only | with_fine)
    assert 10 < int(coarse_only.sum()) < 54  # about half, never all or none
    assert torch.equal(quantizer.eval()(z).z_q, quantizer.ids_to_codes(ids))  # no dropout outside training


def test_levels_of_different_widths_or_of_several_ids_a_position_are_refused():
    with pytest.raises(ValueError, match="same dim"):
        MultiScaleQuantizer(FiniteScalarQuantizer(COARSE_LEVELS), FiniteScalarQuantizer((3, 3, 3)))
    with pytest.raises(ValueError, match="one id per position"):
        MultiScaleQuantizer(VectorQuantizer(dim=2, codebook_size=8), ResidualQuantizer(dim=2, codebook_size=8, depth=2))


def test_a_multiscale_tokenizer_is_saved_and_loaded_as_one_with_both_levels(tmp_path):
    vqgan = tiny_multiscale_vqgan()
    spec = quantizer_spec(vqgan.tokenizer.quantizer)
    assert spec["init_args"]["coarse"]["init_args"]["levels"] == list(COARSE_LEVELS)
    assert isinstance(build_quantizer(json.loads(json.dumps(spec))), MultiScaleQuantizer)
    loaded = VQTokenizer.from_pretrained(vqgan.tokenizer.save_pretrained(tmp_path))
    assert isinstance(loaded, MultiScaleTokenizer)
    expected, got = vqgan.tokenizer.encode(images()), loaded.encode(images())
    assert torch.equal(expected.coarse, got.coarse) and torch.equal(expected.fine, got.fine)


def test_a_multiscale_tokenizer_trains_and_validates_as_a_vqgan_and_loads_from_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    vqgan = tiny_multiscale_vqgan(fine_dropout=0.2)
    vqgan.loss_config = LossConfig(pretrained_lpips=False, perceptual_weight=0.0, disc_start=1)
    data = DataLoader(ShapesImages(8, image_size=32), batch_size=4)
    fit = trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2)
    fit.fit(vqgan, data, data)
    assert "val/codebook/usage" in fit.callback_metrics  # usage of the coarse map, stage 2's vocabulary
    fit.save_checkpoint(tmp_path / "vqgan.ckpt")
    assert isinstance(load_tokenizer(tmp_path / "vqgan.ckpt"), MultiScaleTokenizer)


# --- the fine stage -------------------------------------------------------------------------


def test_a_coarse_token_changes_the_fine_logits_within_the_stages_reach_and_nowhere_else():
    torch.manual_seed(0)
    config = tiny_fine_config(coarse_grid=6, n_layer=2, window=1)  # reach: 2 fine positions
    model = FineTransformer(config).eval()
    coarse = torch.randint(16, (1, 6, 6))
    changed = coarse.clone()
    changed[0, 2, 3] = (coarse[0, 2, 3] + 1) % 16  # its fine children: rows 4-5, columns 6-7
    with torch.no_grad():
        moved = (model(coarse) != model(changed)).any(-1)[0]  # (12, 12)
    rows, cols = torch.arange(12)[:, None], torch.arange(12)[None, :]
    within = (rows >= 4 - config.reach) & (rows <= 5 + config.reach) & (cols >= 6 - config.reach) & (cols <= 7 + config.reach)
    assert torch.equal(moved, within)


def test_local_attention_reaches_window_positions_along_rows_and_columns():
    mask = local_attention_mask(grid=4, window=1)
    assert mask[5].view(4, 4).tolist() == [[True, True, True, False]] * 3 + [[False] * 4]


def test_a_few_steps_lower_the_fine_stages_loss(tmp_path, multiscale_dir):
    torch.manual_seed(0)
    stage = FineStage(
        tiny_fine_config(), tokenizer=str(multiscale_dir),
        optimizer=PriorOptimizerConfig(lr=3e-3, warmup_steps=0, schedule="constant"),
    )
    recorder = RecordLoss()
    data = DataLoader(ShapesImages(32, image_size=32), batch_size=8)
    trainer(tmp_path, max_steps=24, callbacks=[recorder]).fit(stage, data)
    assert sum(recorder.losses[-4:]) / 4 < 0.7 * sum(recorder.losses[:4]) / 4, recorder.losses


def test_a_fine_stage_for_another_tokenizer_or_a_single_scale_one_is_refused(tmp_path, multiscale_dir):
    with pytest.raises(ValueError, match="fine_codebook_size 9 but fine_stage.fine_vocab_size is 10"):
        FineStage(tiny_fine_config(fine_vocab_size=10), tokenizer=str(multiscale_dir))
    single = tiny_vqgan(image_size=32).tokenizer.save_pretrained(tmp_path / "single")
    with pytest.raises(ValueError, match="multi-scale tokenizer"):
        FineStage(tiny_fine_config(), tokenizer=str(single))


def test_the_fine_stage_exports_and_loads_with_its_weights_and_sampling(fine_stage_dir):
    stage = load_fine_stage(fine_stage_dir)
    assert stage.image_tokenizer is None and stage.sampling is None
    coarse = torch.randint(16, (2, 8, 8))
    torch.testing.assert_close(stage.generate(coarse), stage.transformer(coarse)[..., :9].argmax(-1))
    drawn = FineStage(tiny_fine_config(), sampling=SamplingConfig(top_k=4))
    first, again = (drawn.generate(coarse, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(first, again) and first.shape == (2, 16, 16)


# --- sampling: prior (coarse), fine stage, decoder -------------------------------------------


def multiscale_prior(multiscale_dir, fine_stage_dir=None) -> TextImagePrior:
    torch.manual_seed(0)
    return TextImagePrior(
        transformer=tiny_config(image_vocab_size=16, image_grid=8), tokenizer=str(multiscale_dir),
        fine_stage=str(fine_stage_dir) if fine_stage_dir else None, text_loss_weight=0.0,
        sampling=SamplingConfig(top_k=8),
    )


def test_the_prior_models_a_multiscale_tokenizers_coarse_map(multiscale_dir):
    prior = multiscale_prior(multiscale_dir)
    assert prior.image_ids({"images": images()}).shape == (4, 64)


def test_generate_with_a_fine_stage_decodes_coarse_and_fine_maps_to_images_reproducibly(multiscale_dir, fine_stage_dir):
    prompts = ["a large red circle on the left", "a small blue square"]
    coarse_only = multiscale_prior(multiscale_dir).generate(prompts, seed=3)
    prior = multiscale_prior(multiscale_dir, fine_stage_dir)
    full = prior.generate(prompts, seed=3)
    assert full.shape == coarse_only.shape == (2, 3, 32, 32)
    assert torch.equal(full, prior.generate(prompts, seed=3))
    assert not torch.equal(full, coarse_only)  # the same coarse draws, with fine detail added


def test_a_fine_stage_without_a_multiscale_tokenizer_is_refused(tmp_path, fine_stage_dir):
    single = tiny_vqgan(image_size=32, quantizer=VectorQuantizer(dim=4, codebook_size=16))
    single = single.tokenizer.save_pretrained(tmp_path / "single")
    with pytest.raises(ValueError, match="multi-scale tokenizer"):
        TextImagePrior(transformer=tiny_config(image_vocab_size=16, image_grid=16), tokenizer=str(single),
                       fine_stage=str(fine_stage_dir), text_loss_weight=0.0)


def exported_prior(directory: Path, multiscale_dir: Path) -> Path:
    """A multi-scale prior without a fine stage, as export_prior writes it."""
    prior = multiscale_prior(multiscale_dir)
    directory.mkdir()
    save_file(prior.transformer.state_dict(), str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(dict(prior.hparams)))
    return directory


def test_sample_command_runs_prior_fine_stage_and_decoder(tmp_path, multiscale_dir, fine_stage_dir):
    exported = exported_prior(tmp_path / "prior", multiscale_dir)
    out = tmp_path / "samples"
    assert main(["sample", "--prior", str(exported), "--fine-stage", str(fine_stage_dir),
                 "--prompt", "a red circle", "--num-images", "2", "--out", str(out)]) == 0
    assert len(list((out / "images").glob("*.png"))) == 2
    assert json.loads((out / "settings.json").read_text())["fine_stage"] == str(fine_stage_dir)


def test_token_shards_of_a_multiscale_tokenizer_hold_its_coarse_map(multiscale_dir):
    from datamodules.token_shards import encode_images

    uint8 = ((images() + 1) * 127.5).round().to(torch.uint8)
    ids = encode_images(load_tokenizer(multiscale_dir), uint8, torch.device("cpu"))
    assert ids.shape == (4, 8, 8)


def test_evaluate_shapes_runs_prior_fine_stage_and_decoder(tmp_path, multiscale_dir, fine_stage_dir):
    exported = exported_prior(tmp_path / "prior", multiscale_dir)
    out = tmp_path / "fidelity.json"
    assert main(["evaluate", "shapes", "--prior", str(exported), "--fine-stage", str(fine_stage_dir),
                 "--num-samples", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["fine_stage"] == str(fine_stage_dir) and report["image_size"] == 32
