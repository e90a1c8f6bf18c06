"""The stage-2 prior and its sampler: logits layout, loss masking and weights, causality, the KV
cache against the full forward, filters and guidance against transformers' logits processors,
preset sizes, FLOPs, overfitting one batch, activation checkpointing.

Models are 2 layers x 32-64 wide over 8 text and 16 image tokens: the file runs in seconds on CPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.generation.logits_process import (
    ClassifierFreeGuidanceLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tessera.nn.transformer import PRESETS, KVCache, TextImageTransformer, TransformerConfig
from tessera.sampling import (
    SamplingConfig,
    classifier_free_guidance,
    filter_top_k,
    filter_top_p,
    sample_image_tokens,
)

SOT, EOT = 98, 99  # the tiny text vocabulary's start and end of text, standing in for CLIP's 49406, 49407


def tiny_config(**overrides) -> TransformerConfig:
    fields = dict(
        text_vocab_size=100, text_length=8, image_vocab_size=60, image_grid=4, n_layer=2, n_head=4, n_embd=32
    )
    return TransformerConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> TextImageTransformer:
    torch.manual_seed(seed)
    return TextImageTransformer(tiny_config(**overrides))


def peaked(model: TextImageTransformer) -> TextImageTransformer:
    """Scales the image head up so a random model's draws depend on context, not near-uniform logits."""
    with torch.no_grad():
        model.image_head.weight.mul_(30.0)
    return model


def captions(lengths: list[int], text_length: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, text_length): SOT, random words, EOT, then EOT padding; mask 1 on SOT..EOT, as CaptionTokenizer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), text_length), EOT)
    mask = torch.zeros(len(lengths), text_length, dtype=torch.bool)
    for row, n in enumerate(lengths):  # n real tokens including SOT and EOT
        ids[row, 0] = SOT
        ids[row, 1 : n - 1] = torch.randint(0, 98, (n - 2,), generator=g)
        mask[row, :n] = True
    return ids, mask


def image_tokens(batch: int, n: int = 16, vocab: int = 60, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# --- config ----------------------------------------------------------------------------------


def test_padded_vocab_sizes_are_multiples_of_64_that_cover_the_vocabulary():
    config = tiny_config(text_vocab_size=100, image_vocab_size=60)
    assert (config.padded_text_vocab_size, config.padded_image_vocab_size) == (128, 64)
    clip = TransformerConfig()
    assert (clip.padded_text_vocab_size, clip.padded_image_vocab_size) == (49408, 16384)  # already multiples


def test_config_derives_lengths_and_head_dim():
    config = TransformerConfig(text_length=64, image_grid=16, n_embd=768, n_head=12)
    assert (config.image_length, config.sequence_length, config.head_dim) == (256, 320, 64)


def test_config_rejects_a_width_not_divisible_by_the_head_count():
    with pytest.raises(ValueError, match=r"n_embd 100 is not divisible by n_head 12"):
        TransformerConfig(n_embd=100, n_head=12)


@pytest.mark.parametrize(("field", "value"), [("norm", "batchnorm"), ("mlp", "relu"), ("text_length", 1)])
def test_config_rejects_unknown_choices_and_a_text_length_without_room_for_sot_and_eot(field, value):
    with pytest.raises(ValueError, match=field):
        TransformerConfig(**{field: value})


def test_from_name_applies_overrides_and_names_the_presets_on_a_typo():
    config = TransformerConfig.from_name("300m", image_grid=32)
    assert (config.n_layer, config.n_embd, config.n_head, config.image_grid) == (24, 1024, 16, 32)
    with pytest.raises(ValueError, match=r"'3b'.*1\.3b"):
        TransformerConfig.from_name("3b")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_with_the_gpt2_parameter_count(name):
    config = TransformerConfig.from_name(name)
    with torch.device("meta"):  # 1.3B parameters without allocating them
        model = TextImageTransformer(config)
    L, d = config.n_layer, config.n_embd
    # per block: qkv 3d^2 + 3d, attention out d^2 + d, MLP 8d^2 + 5d, two LayerNorms 4d; then ln_f 2d
    blocks = L * (12 * d * d + 13 * d) + 2 * d
    assert model.num_params() == blocks
    tables = (config.text_vocab_size + config.text_length + config.image_vocab_size + 2 * config.image_grid) * d
    heads = (config.padded_text_vocab_size + config.padded_image_vocab_size) * d
    assert model.num_params(exclude_embeddings=False) == blocks + tables + heads
    expected_millions = {"tiny": 0.8, "100m": 85, "300m": 302, "1.3b": 1190}[name]
    assert blocks / 1e6 == pytest.approx(expected_millions, rel=0.01)


def test_swiglu_rmsnorm_without_bias_keeps_the_mlp_parameter_count_and_has_no_biases():
    config = tiny_config(n_embd=96, n_head=4, norm="rmsnorm", mlp="swiglu", bias=False)
    model = TextImageTransformer(config)
    hidden = model.blocks[0].mlp.c_proj.in_features
    assert hidden == 256 and hidden % 64 == 0  # 8/3 x 96 = 256
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]
    assert isinstance(model.ln_f, torch.nn.RMSNorm)
    ids, mask = captions([5, 8])
    assert torch.isfinite(model.loss(ids, mask, image_tokens(2))["loss"])


def test_flops_per_token_counts_both_heads_at_the_positions_they_run_at():
    # 2 layers x 32 over 8 caption + 16 image tokens, 23 input positions (the last image token is
    # only a target); 6 FLOPs per matmul weight and position, forward and backward
    blocks = 6 * 2 * (3 * 32 * 32 + 32 * 32 + 2 * 4 * 32 * 32) * 23  # qkv, attention out, MLP in and out
    attention = 12 * 2 * 32 * 23 * 23  # 12 L d T at each of the 23 positions
    text_head = 6 * 32 * 128 * 7  # 100 ids padded to 128, at the 7 caption predictions
    image_head = 6 * 32 * 64 * 16  # 60 codes padded to 64, at the 16 image predictions
    assert tiny_model().flops_per_sequence() == blocks + attention + text_head + image_head == 4_166_400
    assert tiny_model().flops_per_token() == 4_166_400 / 24  # per token of the 24 that tokens/s counts
    assert TextImageTransformer(tiny_config(), text_head=False).flops_per_sequence() == 4_166_400 - text_head


@pytest.mark.parametrize("text_head", [True, False])
def test_flops_per_sequence_are_what_torchs_flop_counter_counts_in_a_training_step(text_head):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = TextImageTransformer(tiny_config(), text_head=text_head)
    ids, mask = captions([5, 8, 3])
    # the math kernel, whose matmuls the counter sees (it has no formula for the CPU's fused kernel)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.loss(ids, mask, image_tokens(3), text_loss_weight=float(text_head))["loss"].backward()
    assert counter.get_total_flops() == 3 * model.flops_per_sequence()


def test_residual_projections_get_gpt2_scaled_init():
    model = TextImageTransformer(tiny_config(n_layer=8, n_embd=64))
    std = model.blocks[0].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert model.blocks[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)


# --- forward and loss ------------------------------------------------------------------------


def test_forward_returns_text_logits_for_tokens_1_on_and_image_logits_for_every_given_image_token():
    model = tiny_model()
    ids, _ = captions([5, 8, 3])
    text_logits, image_logits = model(ids, image_tokens(3))
    assert text_logits.shape == (3, 7, 128)  # padded text vocabulary
    assert image_logits.shape == (3, 16, 64)  # padded image vocabulary
    assert model(ids, image_tokens(3, n=5))[1].shape == (3, 5, 64)
    assert model(ids)[1].shape == (3, 1, 64)  # the caption alone: logits for image token 0
    assert model(ids, image_tokens(3).view(3, 4, 4))[1].shape == (3, 16, 64)  # the tokenizer's grid


def test_forward_rejects_a_caption_of_the_wrong_length_and_too_many_image_tokens():
    model = tiny_model()
    ids, _ = captions([5], text_length=9)
    with pytest.raises(ValueError, match=r"text_length=8.*CaptionTokenizer"):
        model(ids)
    with pytest.raises(ValueError, match=r"image_length=16"):
        model(captions([5])[0], image_tokens(1, n=17))


def test_image_positions_are_a_row_embedding_plus_a_column_embedding():
    model = tiny_model()
    index = torch.arange(16)
    with torch.no_grad():
        positions = model._embed_image(torch.zeros(1, 16, dtype=torch.long), index)[0] - model.image_embed.weight[0]
    expected = model.image_row.weight[index // 4] + model.image_col.weight[index % 4]  # row-major 4x4 grid
    torch.testing.assert_close(positions, expected)


def test_changing_a_later_token_leaves_every_earlier_prediction_unchanged():
    model = tiny_model()
    ids, _ = captions([8, 6])
    images = image_tokens(2)
    _, before = model(ids, images)
    changed = images.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 60  # image token 5 is the input at position T + 5
    _, after = model(ids, changed)
    torch.testing.assert_close(after[:, :6], before[:, :6], rtol=0, atol=0)  # predictions of tokens 0..5
    assert not torch.allclose(after[:, 6:], before[:, 6:])
    changed_text = ids.clone()
    changed_text[:, 4] = 7
    text_after, _ = model(changed_text, images)
    text_before, _ = model(ids, images)
    torch.testing.assert_close(text_after[:, :4], text_before[:, :4], rtol=0, atol=0)


def test_text_loss_takes_only_real_caption_tokens_as_targets():
    model = tiny_model()
    ids, mask = captions([3, 8, 5])
    images = image_tokens(3)
    out = model.loss(ids, mask, images)
    text_logits, image_logits = model(ids, images)
    log_probs = text_logits[..., :100].log_softmax(-1)  # the real vocabulary only
    targets, real = ids[:, 1:], mask[:, 1:]
    manual_text = -log_probs.gather(-1, targets[..., None])[..., 0][real].mean()
    torch.testing.assert_close(out["text_loss"], manual_text)
    unmasked = F.cross_entropy(text_logits[..., :100].reshape(-1, 100), targets.reshape(-1))
    assert not torch.allclose(out["text_loss"], unmasked)  # the padding would have counted
    manual_image = F.cross_entropy(image_logits[..., :60].reshape(-1, 60), images.reshape(-1))
    torch.testing.assert_close(out["image_loss"], manual_image)


def test_loss_weighs_text_1_to_image_7_by_default_and_takes_other_weights():
    model = tiny_model()
    ids, mask = captions([4, 8])
    out = model.loss(ids, mask, image_tokens(2))
    torch.testing.assert_close(out["loss"], (out["text_loss"] + 7 * out["image_loss"]) / 8)
    image_only = model.loss(ids, mask, image_tokens(2), text_loss_weight=0.0, image_loss_weight=1.0)
    torch.testing.assert_close(image_only["loss"], out["image_loss"])


def test_without_a_text_head_there_are_no_text_logits_and_a_text_loss_is_refused():
    model = TextImageTransformer(tiny_config(), text_head=False)
    assert not [name for name in model.state_dict() if name.startswith("text_head")]
    ids, mask = captions([4, 8])
    text_logits, image_logits = model(ids, image_tokens(2))
    assert text_logits is None and image_logits.shape == (2, 16, 64)
    assert set(model.loss(ids, mask, image_tokens(2), text_loss_weight=0.0)) == {"loss", "image_loss"}
    with pytest.raises(ValueError, match=r"built without \(text_head=False\): pass text_loss_weight=0"):
        model.loss(ids, mask, image_tokens(2))


def test_loss_is_computed_in_fp32_under_bf16_autocast():
    model = tiny_model()
    ids, mask = captions([4, 8])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(ids, mask, image_tokens(2))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_tiny_model_overfits_one_batch():
    model = tiny_model(n_embd=64)
    ids, mask = captions([4, 8, 6, 5])
    images = image_tokens(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model.loss(ids, mask, images)["loss"].item()
    for _ in range(50):
        loss = model.loss(ids, mask, images)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 3.5  # ~ln(60) at init
    assert loss.item() < 0.2 * first


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    ids, mask = captions([4, 8])
    images = image_tokens(2)
    results = []
    for checkpointing in (False, True):
        model = tiny_model(dropout=0.1, activation_checkpointing=checkpointing)  # dropout: RNG replayed too
        model.train()
        torch.manual_seed(1)
        loss = model.loss(ids, mask, images)["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


# --- KV cache --------------------------------------------------------------------------------


def test_prefill_and_decode_steps_give_the_full_forward_logits():
    model = tiny_model().eval()
    ids, _ = captions([5, 8])
    images = image_tokens(2)
    _, full = model(ids, images)  # (2, 16, 64)
    cache = model.make_kv_cache(2)
    assert len(cache.k) == 2 and cache.k[0].shape == (2, 4, 24, 8)  # n_layer x (B, n_head, sequence_length, head_dim)
    for tensor in cache.k + cache.v:
        tensor.normal_()  # stale entries from an earlier batch must be masked out
    steps = [model.prefill(ids, cache)]
    for i in range(15):
        position = 8 + i if i % 2 else torch.tensor(8 + i)  # an int or a device tensor
        steps.append(model.decode_step(images[:, i], position, cache))
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_tensors_are_static_addresses_and_its_mask_is_additive():
    config = tiny_config()
    cache = KVCache(config, 2)
    # what torch._dynamo.mark_static_address records: a compiled step may keep these addresses in CUDA graphs
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in (*cache.k, *cache.v, cache.positions))
    mask = cache.attention_mask(torch.tensor([2, 3]))
    assert mask.dtype == cache.k[0].dtype and mask.shape == (2, config.sequence_length)
    assert mask[0, :3].eq(0).all() and mask[0, 3:].eq(float("-inf")).all() and mask[1, 3] == 0


def test_kv_cache_takes_the_autocast_dtype_when_autocast_is_on():
    model = tiny_model()
    assert model.make_kv_cache(1).k[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.make_kv_cache(1).k[0].dtype == torch.bfloat16
    assert KVCache(model.config, 3, dtype=torch.float16).v[0].shape[0] == 3


# --- filters and guidance against transformers -----------------------------------------------


@pytest.mark.parametrize("k", [1, 7, 256, 5000])
def test_top_k_keeps_the_same_tokens_as_transformers_top_k_warper(k):
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(k))
    ours = filter_top_k(logits, k)
    theirs = TopKLogitsWarper(top_k=k)(torch.zeros(4, 1, dtype=torch.long), logits)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert (~torch.isinf(ours)).sum(-1).tolist() == [min(k, 1000)] * 4
    torch.testing.assert_close(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999])
def test_top_p_keeps_the_same_tokens_as_transformers_top_p_warper(p):
    logits = 3 * torch.randn(4, 1000, generator=torch.Generator().manual_seed(int(p * 1000)))
    ours = filter_top_p(logits, p)
    # transformers sums probabilities in the logits' dtype: given them in fp64 it counts as we do
    theirs = TopPLogitsWarper(top_p=p)(torch.zeros(4, 1, dtype=torch.long), logits.double())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert ((~torch.isinf(ours)).sum(-1) >= 1).all()


def kept_by_an_fp64_count(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(B, V) bool: the most likely ids up to and including the one whose fp64 cumulative probability
    reaches p, by numpy in float64 throughout."""
    x = logits.double().numpy()
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=-1)
    kept_ranked = np.cumsum(ranked, axis=-1) - ranked < p  # the mass ranked above each id
    kept = np.empty_like(kept_ranked)
    np.put_along_axis(kept, order, kept_ranked, axis=-1)
    return torch.from_numpy(kept)


def test_top_p_on_near_uniform_rows_keeps_the_tokens_an_fp64_count_keeps():
    # 64 rows over 65,536 ids, each probability within ~10% of the others: the boundary token's mass
    # differs from its neighbours' by ~1/65,536, near the rounding error of an fp32 running sum
    # (which kept or dropped it wrongly in 3 of these rows)
    logits = 0.1 * torch.randn(64, 65536, generator=torch.Generator().manual_seed(0))
    kept = ~torch.isinf(filter_top_p(logits, 0.9))
    assert torch.equal(kept, kept_by_an_fp64_count(logits, 0.9))


def test_top_p_always_keeps_the_most_likely_token_and_p_1_keeps_all():
    logits = torch.tensor([[10.0, 0.0, -1.0]])
    assert torch.isinf(filter_top_p(logits, 0.01)).tolist() == [[False, True, True]]
    assert torch.equal(filter_top_p(logits, 1.0), logits)


def test_guidance_matches_transformers_classifier_free_guidance_processor():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))  # 3 conditional rows, 3 null
    cond, uncond = logits.chunk(2)
    theirs = ClassifierFreeGuidanceLogitsProcessor(guidance_scale=3.0)(torch.zeros(3, 1, dtype=torch.long), logits)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 3.0), theirs)


@pytest.mark.parametrize(
    "kwargs", [dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=0.0), dict(cfg_scale=-1.0)]
)
def test_sampling_config_rejects_out_of_range_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingConfig(**kwargs)


# --- sampling --------------------------------------------------------------------------------


def sample(model, ids, seed=0, **kwargs):
    null = kwargs.pop("null_text_ids", None)
    use_cache = kwargs.pop("use_cache", True)
    generator = torch.Generator().manual_seed(seed)
    return sample_image_tokens(
        model, ids, SamplingConfig(**kwargs), generator, null_text_ids=null, use_cache=use_cache
    )


@pytest.mark.parametrize(
    "settings",
    [dict(top_k=16), dict(top_k=None, top_p=0.8, temperature=0.7), dict(top_k=16, top_p=0.9, cfg_scale=3.0)],
    ids=["top_k", "top_p_temperature", "top_k_top_p_guided"],
)
def test_sampling_with_the_cache_equals_sampling_without_it_token_for_token(settings):
    model = peaked(tiny_model())
    ids, _ = captions([5, 8, 3])
    null, _ = captions([2])
    cached = sample(model, ids, null_text_ids=null[0], **settings)
    reference = sample(model, ids, null_text_ids=null[0], use_cache=False, **settings)
    assert cached.shape == (3, 16) and cached.dtype == torch.long
    assert torch.equal(cached, reference)


def test_sampling_is_reproducible_with_a_seed_and_varies_across_seeds():
    model = peaked(tiny_model())
    ids, _ = captions([5, 8])
    assert torch.equal(sample(model, ids, seed=3), sample(model, ids, seed=3))
    assert not torch.equal(sample(model, ids, seed=3), sample(model, ids, seed=4))


def test_guidance_scale_1_equals_plain_conditional_sampling():
    model = peaked(tiny_model())
    ids, _ = captions([5, 8])
    null, _ = captions([2])
    plain = sample(model, ids)
    assert torch.equal(sample(model, ids, cfg_scale=1.0, null_text_ids=null[0]), plain)
    assert not torch.equal(sample(model, ids, cfg_scale=3.0, null_text_ids=null[0]), plain)


def test_guidance_without_null_text_ids_raises_naming_the_empty_caption():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"cfg_scale=2\.0 needs null_text_ids.*empty caption"):
        sample(model, captions([5])[0], cfg_scale=2.0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_padded_image_ids_are_never_sampled(use_cache):
    model = tiny_model()  # 60 image codes, head padded to 64
    with torch.no_grad():  # every position's hidden state becomes the vector of ones ...
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.image_head.weight.zero_()
        model.image_head.weight[60:] = 1.0  # ... so the padding columns get logit 32, the real codes 0
    assert model(captions([5])[0])[1].argmax(-1).item() >= 60
    tokens = sample(model, captions([5, 8, 3])[0], top_k=None, use_cache=use_cache)
    assert tokens.max().item() < 60


def test_sampling_restores_training_mode_and_runs_under_bf16_autocast():
    model = tiny_model().train()
    ids, _ = captions([5, 8])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = sample(model, ids, top_k=8)
    assert model.training
    assert tokens.shape == (2, 16) and 0 <= tokens.min() and tokens.max() < 60


def test_without_text_loss_the_loss_is_the_image_loss_and_the_text_head_gets_no_gradient():
    torch.manual_seed(0)
    config = TransformerConfig(text_length=8, image_vocab_size=32, image_grid=2, n_layer=1, n_head=2, n_embd=32)
    model = TextImageTransformer(config)
    text_ids = torch.randint(49408, (2, 8))
    image_ids = torch.randint(32, (2, 4))
    losses = model.loss(text_ids, torch.ones_like(text_ids), image_ids, text_loss_weight=0.0)
    assert set(losses) == {"loss", "image_loss"}
    torch.testing.assert_close(losses["loss"], model.loss(text_ids, torch.ones_like(text_ids), image_ids)["image_loss"])
    losses["loss"].backward()
    assert model.text_head.weight.grad is None
