"""The pixel-level baselines: the gated PixelCNN (softmax and logistic-mixture outputs) and the
Image Transformer see only earlier subpixels, bits/dim and the mixture's exact bins, the stepwise
distributions a coder uses (bitwise repeatable, equal to the teacher-forced pass and, for the
Image Transformer, with or without its cache), and the priors through a Trainer, generate, export,
load_prior and the commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_modules.pixel_prior import ImageTransformerPrior, PixelCNNPrior, SubpixelCodec
from lightning_modules.prior import PriorOptimizerConfig, load_prior
from tessera.nn.image_transformer import ImageTransformer, ImageTransformerConfig
from tessera.nn.logistic_mixture import mixture_log_likelihood, mixture_params, mixture_subpixel_log_probs
from tessera.nn.pixelcnn import PixelCNN, PixelCNNConfig
from tessera.nn.subpixels import check_subpixels
from tessera.pixels import to_unit_range
from tessera.sampling import SamplingConfig, sample_image_tokens
from tests.devices import DEVICES
from tests.test_evaluation import coco  # noqa: F401 (a fixture: a tiny COCO-format val set)
from tests.test_prior import RecordLoss, shapes_data
from tests.test_vqgan import trainer

TEXT_LENGTH = 24
PROMPTS = ["a red circle", "two blue squares"]


def pixelcnn(output: str = "softmax", **overrides) -> PixelCNN:
    torch.manual_seed(0)
    options = dict(text_vocab_size=100, text_length=5, image_grid=4, n_layer=3, n_embd=12, output=output, n_mixtures=2,
                   text_embd=8, cond_dim=16)
    return PixelCNN(PixelCNNConfig(**{**options, **overrides})).eval()


def image_transformer(**overrides) -> ImageTransformer:
    torch.manual_seed(0)
    options = dict(text_vocab_size=100, text_length=5, image_grid=4, n_layer=2, n_head=2, n_embd=32, window=10)
    return ImageTransformer(ImageTransformerConfig(**{**options, **overrides}), text_head=False).eval()


NETWORKS = {
    "pixelcnn_softmax": lambda: pixelcnn("softmax"),
    "pixelcnn_logistic_mixture": lambda: pixelcnn("logistic_mixture"),
    "image_transformer": image_transformer,
}


def inputs(network, batch_size: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    grid, c = network.config.image_grid, network.config
    return (torch.randint(256, (batch_size, grid, grid, 3), generator=generator, dtype=torch.uint8),
            torch.randint(c.text_vocab_size, (batch_size, c.text_length), generator=generator))


def with_subpixel_changed(images: torch.Tensor, index: int) -> torch.Tensor:
    flat = images.long().flatten(1).clone()
    flat[:, index] = (flat[:, index] + 101) % 256
    return flat.view_as(images)


# --- causality ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NETWORKS)
def test_changing_subpixel_i_leaves_the_distributions_of_subpixels_up_to_i_unchanged(name):
    network = NETWORKS[name]()
    images, text_ids = inputs(network)
    before = network.subpixel_log_probs(images, text_ids).flatten(1, 3)  # (B, 3HW, 256)
    length = before.size(1)
    for i in range(length):
        after = network.subpixel_log_probs(with_subpixel_changed(images, i), text_ids).flatten(1, 3)
        torch.testing.assert_close(after[:, : i + 1], before[:, : i + 1], rtol=0, atol=1e-5, msg=f"subpixel {i} leaks")
        if i + 1 < length:  # and it does reach later ones
            assert (after[:, i + 1 :] - before[:, i + 1 :]).abs().max() > 1e-4, f"subpixel {i} reaches no later one"


def test_the_gated_pixelcnn_has_no_blind_spot_every_earlier_subpixel_reaches_the_centre():
    network = pixelcnn(n_layer=4, image_grid=5, conditional=False)
    images, text_ids = inputs(network, batch_size=1)
    target = (2 * 5 + 2) * 3 + 2  # B of the centre pixel: up-right neighbours are a single masked stack's blind spot
    before = network.subpixel_log_probs(images, text_ids).flatten(1, 3)[:, target]
    unseen = [i for i in range(target)
              if torch.equal(network.subpixel_log_probs(with_subpixel_changed(images, i), text_ids).flatten(1, 3)[:, target], before)]
    assert unseen == []


def test_an_image_transformer_layer_sees_the_caption_always_and_the_window_of_subpixels_before():
    network = image_transformer(n_layer=1, window=7)
    images, text_ids = inputs(network)
    before = network.subpixel_log_probs(images, text_ids).flatten(1, 3)
    length = before.size(1)
    for i in range(length):
        after = network.subpixel_log_probs(with_subpixel_changed(images, i), text_ids).flatten(1, 3)
        seen = [j for j in range(length) if (after[:, j] - before[:, j]).abs().max() > 1e-6]
        # subpixel j is predicted at the input of subpixel j - 1, whose window reaches back 7 inputs
        assert seen == [j for j in range(i + 1, length) if j - 1 - i < 7], i
    other_caption = text_ids.roll(1, dims=1)
    last = network.subpixel_log_probs(images, other_caption).flatten(1, 3)[:, -1]
    assert (last - before[:, -1]).abs().max() > 1e-4  # far past the window, the caption still conditions


def test_chunked_local_attention_is_the_banded_causal_mask():
    network = image_transformer(window=6, n_head=2, n_embd=16)
    attention = network.blocks[0].attn
    T, n, W = 5, 20, 6
    q, k, v = torch.randn(3, 2, 2, T + n, 8).unbind(0)
    query, key = torch.arange(T + n)[:, None], torch.arange(T + n)[None, :]
    banded = (key <= query) & ((key < T) | (query - key < W))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=banded)
    torch.testing.assert_close(attention.attention(q, k, v, None), expected, rtol=0, atol=1e-6)


# --- likelihood ----------------------------------------------------------------------------------


def test_a_uniform_model_scores_exactly_8_bits_per_dim_in_training_and_validation(tmp_path, shapes_dir):
    for prior in (tiny_pixelcnn_prior(), tiny_image_transformer_prior()):
        head = prior.transformer.head[-1] if isinstance(prior, PixelCNNPrior) else prior.transformer.image_head
        torch.nn.init.zeros_(head.weight)
        if getattr(head, "bias", None) is not None:
            torch.nn.init.zeros_(head.bias)
        fit = trainer(tmp_path, max_steps=1, limit_val_batches=2)
        metrics = fit.validate(prior, datamodule=shapes_data(shapes_dir, batch_size=4), verbose=False)[0]
        # to the rounding of fp32 log-softmax (a few ulps of 8: 1e-6 each)
        assert metrics["val/bits_per_dim"] == pytest.approx(8.0, abs=5e-6)
        assert metrics["val/image_loss"] == pytest.approx(math.log(256), abs=5e-6)


def test_logistic_mixture_bins_sum_to_one_and_its_conditionals_multiply_to_the_pixels_likelihood():
    torch.manual_seed(0)
    K = 3
    params = torch.randn(64, mixture_params(K)) * 4  # wide and narrow logistics, means far in the tails
    params[:8, K + 3 * K : K + 6 * K] = -9.0  # scales below the clamp: all mass in one bin
    values = torch.randint(256, (64, 3))
    values[:4] = 0
    values[4:8] = 255
    log_probs = mixture_subpixel_log_probs(params, values, K)  # (64, 3, 256)
    assert log_probs.isfinite().all()
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(64, 3), rtol=0, atol=1e-5)
    chained = log_probs.gather(-1, values[..., None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(chained, mixture_log_likelihood(params, values, K), rtol=1e-5, atol=1e-4)


def test_a_single_logistics_edge_bins_integrate_to_infinity_and_inner_bins_are_cdf_differences():
    mean, log_scale = 0.3, math.log(0.2)
    params = torch.tensor([[0.0, mean, 0.0, 0.0, log_scale, 0.0, 0.0, 0.0, 0.0, 0.0]])  # K = 1; G, B irrelevant here
    red = mixture_subpixel_log_probs(params, torch.zeros(1, 3, dtype=torch.long), 1)[0, 0].double().exp()  # (256,)
    edges = (torch.arange(255, dtype=torch.float64) + 0.5) / 127.5 - 1  # between bins j and j + 1
    cdf = torch.sigmoid((edges - mean) / 0.2)
    expected = torch.cat([cdf[:1], cdf[1:] - cdf[:-1], 1 - cdf[-1:]])
    torch.testing.assert_close(red, expected, rtol=1e-4, atol=1e-7)


def test_loss_is_the_mean_of_the_teacher_forced_negative_log_probs_for_both_outputs():
    for output in ("softmax", "logistic_mixture"):
        network = pixelcnn(output)
        images, text_ids = inputs(network)
        log_probs = network.subpixel_log_probs(images, text_ids)
        nll = -log_probs.gather(-1, images.long()[..., None]).mean()
        loss = network.loss(text_ids, torch.ones_like(text_ids), images)["image_loss"]
        torch.testing.assert_close(loss, nll, rtol=1e-5, atol=1e-5)


# --- the stepwise distributions (sampling, coding) ------------------------------------------------


def stepped(network, images: torch.Tensor, text_ids: torch.Tensor, **options) -> torch.Tensor:
    """(B, 3HW, 256): every step's log_probs with the images' own subpixels pushed."""
    steps = network.subpixel_steps(text_ids, **options)
    flat, out = images.long().flatten(1), []
    for i in range(steps.length):
        out.append(steps.log_probs())
        steps.push(flat[:, i])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("name", NETWORKS)
def test_steps_repeat_bitwise_and_match_the_teacher_forced_pass(name):
    network = NETWORKS[name]()
    images, text_ids = inputs(network)
    first = stepped(network, images, text_ids)
    assert torch.equal(stepped(network, images, text_ids), first)  # an encoder and a decoder agree bit for bit
    torch.testing.assert_close(first, network.subpixel_log_probs(images, text_ids).flatten(1, 3), rtol=0, atol=1e-4)
    torch.testing.assert_close(first.exp().sum(-1), torch.ones(first.shape[:2]), rtol=0, atol=1e-5)


def test_pixelcnn_steps_on_the_rows_that_reach_the_current_one_match_the_whole_image():
    network = pixelcnn(n_layer=2, image_grid=7)  # rows_above 3: rows 4 and later drop the top ones
    images, text_ids = inputs(network)
    assert network.rows_above < network.config.image_grid - 1
    torch.testing.assert_close(stepped(network, images, text_ids), network.subpixel_log_probs(images, text_ids).flatten(1, 3),
                               rtol=0, atol=1e-5)


def test_image_transformer_with_its_rolling_cache_steps_and_samples_as_without():
    network = image_transformer(window=7)  # 48 subpixels: the 7-slot cache wraps around many times
    images, text_ids = inputs(network)
    torch.testing.assert_close(stepped(network, images, text_ids), stepped(network, images, text_ids, use_cache=False),
                               rtol=0, atol=1e-5)
    null = torch.zeros(network.config.text_length, dtype=torch.long)
    for sampling in (SamplingConfig(top_k=None), SamplingConfig(top_k=32, top_p=0.9, temperature=0.8, cfg_scale=2.0)):
        cached = sample_image_tokens(network, text_ids, sampling, torch.Generator().manual_seed(1), null, use_cache=True)
        uncached = sample_image_tokens(network, text_ids, sampling, torch.Generator().manual_seed(1), null, use_cache=False)
        assert cached.shape == (2, 48) and torch.equal(cached, uncached)


def test_steps_refuse_values_out_of_range_and_a_push_past_the_last_subpixel():
    network = pixelcnn(image_grid=1)
    steps = network.subpixel_steps(inputs(network)[1])
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        steps.push(torch.tensor([3, 256]))
    with pytest.raises(ValueError, match=r"\(2,\) integer values"):
        steps.push(torch.tensor([3.0, 4.0]))
    for _ in range(3):
        steps.push(torch.tensor([1, 2]))
    assert torch.equal(steps.image()[:, 0, 0], torch.tensor([[1, 1, 1], [2, 2, 2]]))
    with pytest.raises(ValueError, match="no next one"):
        steps.log_probs()


def test_subpixels_of_another_size_or_out_of_range_are_refused_with_the_shape_expected():
    with pytest.raises(ValueError, match=r"\(B, 4, 4, 3\)"):
        check_subpixels(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="integers"):
        check_subpixels(torch.zeros(2, 4, 4, 3), 4)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        check_subpixels(torch.full((2, 4, 4, 3), 300), 4)
    with pytest.raises(ValueError, match="multiple of 3"):
        PixelCNNConfig(n_embd=16)


# --- the priors ----------------------------------------------------------------------------------


def tiny_pixelcnn_prior(**overrides) -> PixelCNNPrior:
    torch.manual_seed(0)
    config = PixelCNNConfig(**{**dict(text_length=TEXT_LENGTH, image_grid=32, n_layer=3, n_embd=24), **overrides.pop("network", {})})
    options = dict(transformer=config, optimizer=PriorOptimizerConfig(lr=3e-3, warmup_steps=2, schedule="constant"))
    return PixelCNNPrior(**{**options, **overrides})


def tiny_image_transformer_prior(**overrides) -> ImageTransformerPrior:
    torch.manual_seed(0)
    shape = dict(text_length=TEXT_LENGTH, image_grid=32, n_layer=1, n_head=2, n_embd=32, window=48)
    config = ImageTransformerConfig(**{**shape, **overrides.pop("network", {})})
    options = dict(transformer=config, optimizer=PriorOptimizerConfig(lr=3e-3, warmup_steps=2, schedule="constant"))
    return ImageTransformerPrior(**{**options, **overrides})


PRIORS = {"pixelcnn": tiny_pixelcnn_prior, "image_transformer": tiny_image_transformer_prior}


def test_the_codec_gives_the_loaders_uint8_pixels_back_exactly():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    subpixels = SubpixelCodec.encode(to_unit_range(pixels))
    assert subpixels.shape == (2, 16, 16, 3) and torch.equal(subpixels, pixels.permute(0, 2, 3, 1).long())
    assert torch.equal(SubpixelCodec.decode(subpixels), to_unit_range(pixels))


@pytest.mark.parametrize("name", PRIORS)
def test_pixel_prior_learns_the_subpixels_of_the_shapes_set_and_logs_bits_per_dim(tmp_path, shapes_dir, name):
    prior, recorder = PRIORS[name](), RecordLoss()
    fit = trainer(tmp_path, max_steps=25, callbacks=[recorder], limit_val_batches=1, val_check_interval=25)
    fit.fit(prior, datamodule=shapes_data(shapes_dir, batch_size=4))
    first, last = sum(recorder.losses[:3]) / 3, sum(recorder.losses[-3:]) / 3
    assert first > 4.5 and last < 0.6 * first, (first, last)  # from ~ln 256: most of a scene is its flat background
    metrics = fit.callback_metrics
    assert metrics["train/bits_per_dim"] == pytest.approx(recorder.losses[-1] / math.log(2), rel=1e-5)
    assert metrics["val/bits_per_dim"] == pytest.approx(float(metrics["val/image_loss"]) / math.log(2), rel=1e-5)


def small_prior(name: str, **overrides):
    """An 8 px prior: sampling steps through 192 subpixels."""
    return PRIORS[name](network={"image_grid": 8}, **overrides)


@pytest.mark.parametrize("name", PRIORS)
def test_generate_gives_images_in_range_reproducible_for_a_seed_with_and_without_guidance(name):
    prior = small_prior(name).eval()
    for sampling in (SamplingConfig(top_k=None), SamplingConfig(top_k=16, top_p=0.9, cfg_scale=2.0)):
        images = prior.generate(PROMPTS, sampling, seed=3)
        assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
        assert images.min() >= -1 and images.max() <= 1
        assert torch.equal(SubpixelCodec.decode(SubpixelCodec.encode(images)), images)  # whole uint8 values
        assert torch.equal(prior.generate(PROMPTS, sampling, seed=3), images)


def test_a_pixel_prior_refuses_a_tokenizer_a_caption_loss_and_images_of_another_size(shapes_dir):
    with pytest.raises(ValueError, match="no stage-1 tokenizer"):
        tiny_pixelcnn_prior(tokenizer="runs/tokenizer")
    with pytest.raises(ValueError, match="text_loss_weight must be 0"):
        tiny_image_transformer_prior(text_loss_weight=0.1)
    prior = small_prior("pixelcnn")
    batch = {"images": torch.zeros(2, 3, 32, 32)}
    with pytest.raises(ValueError, match=r"grid of \(32, 32, 3\), the transformer expects \(8, 8, 3\)"):
        prior.image_ids(batch)
    with pytest.raises(ValueError, match="eval mode"):
        prior.train().subpixel_steps(prior.captions(PROMPTS).ids)


@pytest.mark.parametrize("name", PRIORS)
def test_symbol_steps_yield_the_subpixel_steps_distributions_and_return_what_was_sent(name):
    prior = small_prior(name).eval()
    subpixels = torch.randint(256, (2, 8 * 8 * 3), generator=torch.Generator().manual_seed(0))
    expected = stepped(prior, subpixels, prior.captions(PROMPTS).ids)
    generator, yielded, returned = prior.symbol_steps(PROMPTS), [], None
    log_probs = next(generator)
    for i in range(subpixels.size(1)):
        yielded.append(log_probs)
        try:
            log_probs = generator.send(subpixels[:, i])
        except StopIteration as end:
            assert i == subpixels.size(1) - 1
            returned = end.value
    assert torch.equal(torch.stack(yielded, dim=1), expected) and torch.equal(returned, subpixels)


class Scenes(Dataset):
    """Eight fixed caption / 8 px image samples as the datamodule gives them."""

    def __init__(self, prior):
        generator = torch.Generator().manual_seed(1)
        captions = prior.captions([f"{n} red circles" for n in range(8)])
        images = to_unit_range(torch.randint(256, (8, 3, 8, 8), generator=generator, dtype=torch.uint8))
        self.samples = [{"text_ids": captions.ids[i], "text_mask": captions.mask[i], "images": images[i]} for i in range(8)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


@pytest.fixture(scope="module", params=list(PRIORS))
def checkpoint(request, tmp_path_factory) -> Path:
    """An 8 px pixel prior one step into training, saved, with sampling settings of its own."""
    root = tmp_path_factory.mktemp(request.param)
    prior = small_prior(request.param, sampling={"top_k": 64, "cfg_scale": 1.5})
    fit = trainer(root, max_steps=1)
    fit.fit(prior, DataLoader(Scenes(prior), batch_size=8))
    fit.save_checkpoint(root / "prior.ckpt")
    return root / "prior.ckpt"


def test_export_then_load_prior_gives_the_same_class_settings_and_log_probs(tmp_path, checkpoint):
    from tessera.commands.cli import main

    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    from_checkpoint, from_export = load_prior(checkpoint), load_prior(tmp_path / "export")
    assert type(from_export) is type(from_checkpoint) and type(from_checkpoint) in (PixelCNNPrior, ImageTransformerPrior)
    assert from_export.sampling == SamplingConfig(top_k=64, cfg_scale=1.5)
    images = torch.randint(256, (2, 8, 8, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    text_ids = from_export.captions(PROMPTS).ids
    expected = from_checkpoint.subpixel_log_probs(images, text_ids)
    assert expected.shape == (2, 8, 8, 3, 256)
    assert torch.equal(from_export.subpixel_log_probs(images, text_ids), expected)


def test_sample_and_evaluate_shapes_commands_take_a_pixel_prior(tmp_path, checkpoint):
    from tessera.commands.cli import main

    argv = ["sample", "--prior", str(checkpoint), "--prompt", *PROMPTS, "--num-images", "2", "--top-k", "0",
            "--out", str(tmp_path / "samples")]
    assert main(argv) == 0
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == 4
    settings = json.loads((tmp_path / "samples" / "settings.json").read_text())
    assert (settings["top_k"], settings["cfg_scale"]) == (None, 1.5)  # given, and the prior's own
    out = tmp_path / "shapes.json"
    argv = ["evaluate", "shapes", "--prior", str(checkpoint), "--num-samples", "2", "--batch-size", "4",
            "--image-size", "32", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["seen"]["n"] == report["held_out"]["n"] == 2 and report["image_size"] == 32


def test_evaluate_coco_command_takes_a_pixel_prior(tmp_path, coco, checkpoint):
    from tessera.commands.cli import main

    annotations, images = coco
    argv = ["evaluate", "coco", "--prior", str(checkpoint), "--annotations", str(annotations), "--images", str(images),
            "--num-samples", "2", "--batch-size", "2", "--feature-extractor", "tests.test_evaluation:tiny_extractor",
            "--image-size", "32", "--workers", "0", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["count"] == 2 and results["fid"] > 0
    assert (results["sampler"]["top_k"], results["sampler"]["cfg_scale"]) == (64, 1.5)  # the prior's own


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", PRIORS)
def test_pixel_priors_sample_and_step_on_each_device(name, device):
    """On a GPU `generate` runs under bf16 autocast (the Image Transformer's cache in bf16); the
    stepwise distributions stay fp32 and match the teacher-forced pass."""
    prior = small_prior(name).eval().to(device)
    images = prior.generate(PROMPTS, SamplingConfig(top_k=None, cfg_scale=2.0), seed=0)
    assert images.shape == (2, 3, 8, 8) and images.device.type == device and -1 <= images.min() and images.max() <= 1
    subpixels = torch.randint(256, (2, 8, 8, 3), generator=torch.Generator().manual_seed(0))
    text_ids = prior.captions(PROMPTS).ids
    expected = prior.subpixel_log_probs(subpixels, text_ids).flatten(1, 3)
    torch.testing.assert_close(stepped(prior, subpixels.to(device), text_ids), expected, rtol=0, atol=1e-4)
