"""bench/memory_estimate.py: per-GPU memory of a prior's training step, and the presets' comments that quote it."""

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from memory_estimate import GIB, HEADROOM, estimate_from_configs, prior_memory  # noqa: E402

from tessera.nn.rq_transformer import RQTransformerConfig  # noqa: E402
from tessera.nn.transformer import TextImageTransformer, TransformerConfig  # noqa: E402

PRESETS = sorted((REPO / "configs/prior").glob("*.yaml"))
LARGE = [path for path in PRESETS if "tiny" not in path.stem]
H100_GIB = 79.1


def test_states_are_16_bytes_a_parameter_and_sharding_divides_them():
    config = TransformerConfig(n_layer=2, n_head=2, n_embd=64, text_length=8, image_grid=4, image_vocab_size=64)
    parameters = sum(p.numel() for p in TextImageTransformer(config).parameters())
    replicated = prior_memory(config, batch_size=4, sharded=False, gpus=8, activation_checkpointing=False)
    sharded = prior_memory(config, batch_size=4, sharded=True, gpus=8, activation_checkpointing=False)
    assert replicated.parameters == parameters
    assert replicated.states == pytest.approx(16 * parameters / GIB)
    assert sharded.states == pytest.approx(replicated.states / 8)
    assert sharded.activations == replicated.activations


def test_activation_checkpointing_and_smaller_batches_lower_activations():
    config = TransformerConfig.from_name("300m")
    full = prior_memory(config, 64, sharded=True, gpus=8, activation_checkpointing=False)
    checkpointed = prior_memory(config, 64, sharded=True, gpus=8, activation_checkpointing=True)
    half = prior_memory(config, 32, sharded=True, gpus=8, activation_checkpointing=False)
    assert checkpointed.activations < full.activations / 4
    assert half.activations == pytest.approx(full.activations / 2)


@pytest.mark.parametrize("preset", LARGE, ids=lambda path: path.stem)
def test_each_preset_recommends_a_strategy_it_fits_on_an_80gb_card_and_quotes_the_estimate(preset):
    header = preset.read_text().split("\nmodel:", 1)[0]
    trainer = re.search(r"--config (configs/trainer/\w+\.yaml)", header).group(1)
    data = REPO / "configs/data/laion_style.yaml"
    estimate, _ = estimate_from_configs(preset, REPO / trainer, data)
    assert estimate.total <= HEADROOM * H100_GIB, f"{preset.name} with {trainer}: {estimate.total:.1f} GiB"
    for strategy in ("ddp", "fsdp"):
        quoted = float(re.search(rf"{strategy.upper()}[^,.]*?([\d.]+) GiB", header).group(1))
        expected, _ = estimate_from_configs(preset, REPO / f"configs/trainer/{strategy}.yaml", data)
        assert quoted == round(expected.total, 1), f"{preset.name}'s comment quotes {strategy} {quoted} GiB"


def test_the_1_3b_prior_does_not_fit_an_80gb_card_under_ddp():
    estimate, _ = estimate_from_configs(REPO / "configs/prior/1_3b.yaml", REPO / "configs/trainer/ddp.yaml",
                                        REPO / "configs/data/laion_style.yaml")
    assert estimate.total > HEADROOM * H100_GIB


def test_an_rq_transformers_depth_blocks_add_activations_over_every_code_and_logits_at_every_code():
    shape = dict(n_layer=2, n_head=2, n_embd=64, text_length=8, image_grid=4, image_vocab_size=64)
    flat = prior_memory(TransformerConfig(**shape), 4, sharded=False, gpus=1, activation_checkpointing=False)
    rq = prior_memory(RQTransformerConfig(**shape, code_depth=4, depth_n_layer=1), 4, sharded=False, gpus=1,
                      activation_checkpointing=False)
    depth_blocks = 34 * (4 * 16 * 4) * 64 / GIB  # one layer over B * N * D codes
    assert rq.activations == pytest.approx(flat.activations + depth_blocks)
    assert rq.logits - flat.logits == pytest.approx(10 * 4 * 16 * 3 * 64 / GIB)  # 3 more codes a position
