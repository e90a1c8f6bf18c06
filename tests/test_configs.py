"""Every YAML in configs/ parses as LightningCLI would parse it and builds its model and data, so no config rots."""

import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
# what each top-level section must build; a new kind of section needs an entry here
SECTION_TYPES = {"model": L.LightningModule, "data": L.LightningDataModule}


# what stands in for a language model's local checkpoint, which the user downloads
TINY_LLAMA = {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4}, "tokenizer": "clip-bpe"}


def _without_weight_files(sections: dict) -> dict:
    """Tests build LPIPS with random weights (CI has no VGG16 download), priors without the
    stage-1 tokenizer a real run would have trained first, and a tiny random Llama where a config
    names a language model's checkpoint directory."""
    init_args = sections.get("model", {}).get("init_args", {})
    if init_args.get("backbone", {}).get("path") is not None:
        init_args["backbone"] = TINY_LLAMA
    loss = init_args.get("loss")
    if loss is not None and loss.get("perceptual_weight", 1.0) > 0:
        loss["pretrained_lpips"] = False
    if "tokenizer" in init_args:
        init_args["tokenizer"] = None
    return sections


def _with_its_data_config(path: Path, sections: dict) -> dict:
    """A stage config's `data` section (its batch size) layered as its documented command layers it:
    `--config STAGE.yaml --config configs/data/NAME.yaml`, the data config's keys last."""
    if "data" not in sections or "train_shards" in sections["data"].get("init_args", {}):
        return sections
    named = re.search(r"--config (configs/data/\w+\.yaml)", path.read_text())
    assert named, f"{path} sets part of `data`: its comment must name the data config it goes with"
    data = yaml.safe_load((path.parents[2] / named.group(1)).read_text())["data"]
    assert data["class_path"] == sections["data"]["class_path"]
    sections["data"]["init_args"] = {**sections["data"]["init_args"], **data["init_args"]}
    return sections


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(p.parents[1]).as_posix())
def test_config_builds_its_sections(path):
    sections = _with_its_data_config(path, _without_weight_files(yaml.safe_load(path.read_text())))
    assert set(sections) <= {*SECTION_TYPES, "trainer"}, f"{path} has sections no test checks"
    if "trainer" in sections:  # type-checked; built only where its GPUs exist
        trainer_parser = ArgumentParser()
        trainer_parser.add_class_arguments(L.Trainer, "trainer")
        trainer_parser.parse_object({"trainer": sections.pop("trainer")})
    parser = ArgumentParser()
    for name in sections:
        parser.add_subclass_arguments(SECTION_TYPES[name], name)
    with torch.device("meta"):  # shapes and types without allocating a 1.3B-parameter model
        config = parser.instantiate_classes(parser.parse_object(sections))
    for name, expected_type in SECTION_TYPES.items():
        if name in sections:
            assert isinstance(config[name], expected_type)


TOKENIZER_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "tokenizer").glob("*.yaml"))


def _tokenizer_args(name: str) -> dict:
    return yaml.safe_load((Path(__file__).parents[1] / "configs" / "tokenizer" / name).read_text())["model"]["init_args"]


@pytest.mark.parametrize("path", TOKENIZER_CONFIGS, ids=lambda p: p.name)
def test_every_tokenizer_config_with_a_gan_names_its_discriminator_norm_and_both_gan_losses(path):
    init_args = _tokenizer_args(path.name)
    if init_args["loss"].get("disc_start", 0) is None:  # no GAN: nothing to name
        assert "discriminator" not in init_args and "disc_weight" not in init_args["loss"]
        return
    assert init_args["discriminator"]["norm"] in ("group", "batch", "none")
    assert {"generator_loss", "discriminator_loss"} <= set(init_args["loss"])


def test_taming_and_open_magvit2_configs_follow_their_recipes():
    taming = _tokenizer_args("taming_f16_16384.yaml")
    assert taming["discriminator"]["norm"] == "batch"
    assert (taming["loss"]["generator_loss"], taming["loss"]["discriminator_loss"]) == ("hinge", "hinge")
    magvit2 = _tokenizer_args("magvit2_lfq_f16.yaml")
    assert (magvit2["loss"]["generator_loss"], magvit2["loss"]["discriminator_loss"]) == ("non_saturating", "hinge")


def test_dalle_dvae_config_follows_its_recipe():
    """8,192 codes at f8, the ELBO alone, DALL-E's schedules, beta 6.6 over the 192 pixel values per position."""
    dvae = _tokenizer_args("dalle_dvae.yaml")
    quantizer = dvae["quantizer"]["init_args"]
    assert quantizer["codebook_size"] == 8192 and len(dvae["autoencoder"]["ch_mult"]) == 4  # f8
    assert (quantizer["temperature_start"], quantizer["temperature_end"]) == (1.0, 1 / 16)
    assert quantizer["kl_weight"] * 3 * 8**2 == pytest.approx(6.6) and quantizer["kl_warmup_steps"] == 5000
    assert dvae["loss"]["disc_start"] is None and dvae["loss"]["perceptual_weight"] == 0
