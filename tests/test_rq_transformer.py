"""The RQ-Transformer network and its sampler on CPU: what the spatial and depth transformers see,
the loss, and KV-cached sampling against the full forward."""

from __future__ import annotations

import pytest
import torch

from tessera.nn.rq_transformer import RQTransformer, RQTransformerConfig
from tessera.sampling import SamplingConfig, sample_image_tokens

TEXT_LENGTH = 6


def tiny_rq(**overrides) -> RQTransformer:
    torch.manual_seed(0)
    options = dict(text_vocab_size=50, text_length=TEXT_LENGTH, image_vocab_size=16, image_grid=3, code_depth=3,
                   n_layer=2, depth_n_layer=2, n_head=2, n_embd=32)
    return RQTransformer(RQTransformerConfig(**{**options, **overrides})).eval()


def random_ids(model: RQTransformer, batch_size: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    c = model.config
    generator = torch.Generator().manual_seed(seed)
    text_ids = torch.randint(c.text_vocab_size, (batch_size, c.text_length), generator=generator)
    image_ids = torch.randint(c.image_vocab_size, (batch_size, c.image_grid, c.image_grid, c.code_depth), generator=generator)
    return text_ids, image_ids


def test_the_spatial_input_of_a_position_is_the_sum_of_its_code_embeddings_plus_its_row_and_column():
    model = tiny_rq()
    _, image_ids = random_ids(model)
    ids = image_ids.flatten(1, 2)  # (B, 9, 3)
    index = torch.arange(9)
    expected = sum(model.image_embed(ids[:, :, d]) for d in range(3)) + model.image_row(index // 3) + model.image_col(index % 3)
    torch.testing.assert_close(model._embed_image(ids, index), expected)
    # the order of a position's codes does not change its input, their sum does
    torch.testing.assert_close(model._embed_image(ids.flip(-1), index), expected)


def test_code_d_is_predicted_from_earlier_codes_and_positions_only():
    model = tiny_rq()
    text_ids, image_ids = random_ids(model)
    _, logits = model(text_ids, image_ids)  # (B, 9, 3, Vi)
    t, d = 4, 1  # row 1, column 1, the second code
    changed = image_ids.clone()
    changed[:, 1, 1, d] = (changed[:, 1, 1, d] + 1) % 16
    _, after = model(text_ids, changed)
    torch.testing.assert_close(after[:, :t], logits[:, :t], rtol=0, atol=0)  # earlier positions
    torch.testing.assert_close(after[:, t, : d + 1], logits[:, t, : d + 1], rtol=0, atol=0)  # codes <= d here
    assert not torch.allclose(after[:, t, d + 1 :], logits[:, t, d + 1 :])  # the later codes of the position see it
    assert not torch.allclose(after[:, t + 1 :], logits[:, t + 1 :])  # and every later position


def test_the_loss_is_the_cross_entropy_of_every_code_weighted_with_the_captions():
    model = tiny_rq()
    text_ids, image_ids = random_ids(model)
    mask = torch.ones_like(text_ids)
    text_logits, image_logits = model(text_ids, image_ids)
    image = torch.nn.functional.cross_entropy(image_logits[..., :16].reshape(-1, 16), image_ids.reshape(-1))
    text = torch.nn.functional.cross_entropy(text_logits[..., :50].reshape(-1, 50), text_ids[:, 1:].reshape(-1))
    losses = model.loss(text_ids, mask, image_ids, text_loss_weight=1.0, image_loss_weight=9.0)
    torch.testing.assert_close(losses["image_loss"], image)
    torch.testing.assert_close(losses["text_loss"], text)
    torch.testing.assert_close(losses["loss"], (text + 9 * image) / 10)


def test_ids_of_another_shape_are_refused_with_the_expected_one():
    model = tiny_rq()
    text_ids, image_ids = random_ids(model)
    with pytest.raises(ValueError, match=r"code_depth=3\) or \(B, 3, 3, 3\); got \(2, 3, 3, 2\)"):
        model.loss(text_ids, torch.ones_like(text_ids), image_ids[..., :2])


@pytest.mark.parametrize("sampling", [SamplingConfig(top_k=8), SamplingConfig(top_p=0.9, temperature=0.8, cfg_scale=2.5)],
                         ids=["top-k", "top-p-guided"])
def test_cached_sampling_draws_the_codes_of_the_full_forward_one_by_one(sampling):
    model = tiny_rq()
    text_ids, _ = random_ids(model, batch_size=3)
    null = torch.zeros(TEXT_LENGTH, dtype=torch.long)
    drawn = [
        sample_image_tokens(model, text_ids, sampling, torch.Generator().manual_seed(7), null, use_cache=use_cache)
        for use_cache in (True, False)
    ]
    assert drawn[0].shape == (3, 9, 3) and 0 <= drawn[0].min() and drawn[0].max() < 16
    torch.testing.assert_close(drawn[0], drawn[1], rtol=0, atol=0)


def test_guidance_changes_the_codes_and_a_seed_repeats_them():
    model = tiny_rq()
    text_ids, _ = random_ids(model)
    null = torch.zeros(TEXT_LENGTH, dtype=torch.long)

    def draw(scale: float) -> torch.Tensor:
        return sample_image_tokens(model, text_ids, SamplingConfig(top_k=None, cfg_scale=scale),
                                      torch.Generator().manual_seed(3), null)

    torch.testing.assert_close(draw(3.0), draw(3.0), rtol=0, atol=0)
    assert not torch.equal(draw(3.0), draw(1.0))


def test_flops_count_the_depth_transformer_at_every_code():
    model = tiny_rq()
    flat = tiny_rq(code_depth=1, depth_n_layer=1)
    assert model.flops_per_sequence() > flat.flops_per_sequence()
    assert model.num_params() == sum(p.numel() for name, p in model.named_parameters()
                                     if name.startswith(("blocks.", "ln_f.", "depth_blocks.", "depth_ln.")))


def test_soft_targets_give_the_cross_entropy_against_each_codes_distribution_and_one_hot_ones_the_hard_loss():
    model = tiny_rq()
    text_ids, image_ids = random_ids(model)
    mask = torch.ones_like(text_ids)
    hard = model.loss(text_ids, mask, image_ids, 0.0, 1.0)["image_loss"]
    one_hot = torch.nn.functional.one_hot(image_ids, 16).float()  # (B, 3, 3, 3, 16)
    torch.testing.assert_close(model.loss(text_ids, mask, image_ids, 0.0, 1.0, one_hot)["image_loss"], hard)
    targets = torch.rand(*image_ids.shape, 16).softmax(-1)
    _, logits = model(text_ids, image_ids)
    expected = -(targets.flatten(1, 2) * logits[..., :16].log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(model.loss(text_ids, mask, image_ids, 0.0, 1.0, targets)["image_loss"], expected)
