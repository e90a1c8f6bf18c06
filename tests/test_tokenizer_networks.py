"""Tokenizer networks: encoder and decoder shapes, the patch discriminator, GAN losses, LeCAM, LPIPS.

Tiny channel counts and 32-64 px images: the whole file runs in seconds on two CPU cores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from tessera.nn import lpips as lpips_module
from tessera.nn.autoencoder import AttnBlock, AutoencoderConfig, Decoder, Encoder, build_encoder, group_norm
from tessera.nn.discriminator import PatchDiscriminator
from tessera.nn.gan_losses import (
    LeCAMRegularizer,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from tessera.nn.lpips import LPIPS, normalize_channels


def tiny_config(ch_mult: tuple[int, ...], image_size: int = 32, **kwargs) -> AutoencoderConfig:
    return AutoencoderConfig(ch=8, ch_mult=ch_mult, num_res_blocks=1, z_channels=4, image_size=image_size, **kwargs)


# --- encoder and decoder ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ch_mult", "factor", "image_size"),
    [((1, 1, 2, 2), 8, 32), ((1, 1, 2, 2, 4), 16, 32), ((1, 1, 1, 2, 2, 4), 32, 64)],
)
def test_encoder_and_decoder_map_images_to_latents_of_size_image_over_factor_and_back(ch_mult, factor, image_size):
    config = tiny_config(ch_mult, image_size)
    assert config.downsample_factor == factor
    assert config.latent_size == image_size // factor
    x = torch.randn(2, 3, image_size, image_size)
    z = Encoder(config)(x)
    assert z.shape == (2, 4, image_size // factor, image_size // factor)
    assert Decoder(config)(z).shape == x.shape


def test_encoder_accepts_non_square_images_divisible_by_the_factor():
    config = tiny_config((1, 2, 2))  # f4
    assert Encoder(config)(torch.randn(1, 3, 16, 24)).shape == (1, 4, 4, 6)


def test_encoder_rejects_an_image_not_divisible_by_the_factor_naming_size_and_factor():
    encoder = Encoder(tiny_config((1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"30x32.*factor 8"):
        encoder(torch.randn(1, 3, 30, 32))


def test_config_rejects_an_image_size_not_divisible_by_the_factor():
    with pytest.raises(ValueError, match=r"image_size 40.*factor 16"):
        AutoencoderConfig(ch_mult=(1, 1, 2, 2, 4), image_size=40)


def test_default_config_is_taming_f16_at_256px():
    config = AutoencoderConfig()
    assert (config.downsample_factor, config.latent_size) == (16, 16)
    # attention at 16 px (lowest level) only, as taming's attn_resolutions=[16]
    assert [config.has_attention(level) for level in range(5)] == [False, False, False, False, True]


def test_attention_goes_to_the_lowest_level_and_to_listed_resolutions():
    def attn_blocks(config):
        return sum(isinstance(m, AttnBlock) for m in Encoder(config).down.modules())

    assert attn_blocks(tiny_config((1, 2, 2), attn_at_lowest=False)) == 0
    assert attn_blocks(tiny_config((1, 2, 2))) == 1  # one res block at the lowest level
    assert attn_blocks(tiny_config((1, 2, 2), attn_resolutions=(16,))) == 2  # plus the 16 px level


def test_config_accepts_lists_as_yaml_gives_them():
    config = AutoencoderConfig(ch_mult=[1, 2], attn_resolutions=[8], image_size=32)
    assert config.ch_mult == (1, 2) and config.attn_resolutions == (8,)


@pytest.mark.parametrize(("channels", "groups"), [(8, 8), (24, 24), (48, 24), (64, 32), (256, 32), (96, 32)])
def test_group_norm_uses_the_largest_divisor_of_channels_up_to_32(channels, groups):
    assert group_norm(channels).num_groups == groups


@pytest.mark.parametrize("encoder", ["taming", "patch"])
def test_only_a_patch_encoder_keeps_every_other_latent_when_one_pixel_changes(encoder):
    """Taming's receptive field, GroupNorm and attention span the image: one pixel moves every latent.
    A patch encoder's latent depends on its own f x f pixels alone."""
    torch.manual_seed(0)
    network = build_encoder(tiny_config((1, 2, 2), encoder=encoder)).eval()  # f4: 8x8 latents
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    changed = image.clone()
    changed[..., 13, 22] = -image[..., 13, 22]  # in patch (row 3, col 5)
    with torch.no_grad():
        moved = (network(image) - network(changed)).abs().amax(dim=1)[0] > 0  # (8, 8)
    assert moved[3, 5]
    assert moved.sum() == (1 if encoder == "patch" else 64)


def test_patch_encoder_maps_images_to_the_decoders_latent_grid():
    config = tiny_config((1, 2, 2, 2), encoder="patch")  # f8
    z = build_encoder(config)(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 4, 4, 4)
    assert Decoder(config)(z).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"30x32.*factor 8"):
        build_encoder(config)(torch.randn(1, 3, 30, 32))


def test_config_rejects_an_unknown_encoder_naming_the_choices():
    with pytest.raises(ValueError, match=r"taming.*patch.*'local'"):
        AutoencoderConfig(encoder="local")


def test_decoder_last_layer_is_conv_out_weight_and_receives_gradient():
    config = tiny_config((1, 2, 2))
    decoder = Decoder(config)
    assert decoder.last_layer is decoder.conv_out.weight
    decoder(torch.randn(1, 4, 8, 8)).square().mean().backward()
    assert decoder.last_layer.grad is not None and decoder.last_layer.grad.abs().sum() > 0


def test_dropout_is_active_in_training_only():
    encoder = Encoder(tiny_config((1, 2), dropout=0.5))
    x = torch.randn(1, 3, 32, 32)
    encoder.train()
    assert not torch.equal(encoder(x), encoder(x))
    encoder.eval()
    assert torch.equal(encoder(x), encoder(x))


def test_attention_block_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    block = AttnBlock(8)
    x = torch.randn(2, 8, 4, 5)
    h = block.norm(x)
    q, k, v = block.qkv(h).flatten(2).chunk(3, dim=1)  # each (B, C, HW)
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(8), dim=-1)  # (B, HW, HW)
    expected = x + block.proj_out((v @ weights.transpose(1, 2)).view(2, 8, 4, 5))
    torch.testing.assert_close(block(x), expected)


def test_attention_block_hands_sdpa_4d_contiguous_inputs(monkeypatch):
    """The fused (flash, memory-efficient) kernels take (B, heads, T, C) with a unit-stride last
    dimension; anything else runs the unfused math path on a GPU."""
    from tessera.nn import autoencoder

    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        seen.extend((q, k, v))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(autoencoder.F, "scaled_dot_product_attention", recording_sdpa)
    AttnBlock(8)(torch.randn(2, 8, 4, 5))
    assert [t.shape for t in seen] == [torch.Size([2, 1, 20, 8])] * 3
    assert all(t.is_contiguous() for t in seen)


# --- discriminator and GAN losses ------------------------------------------------------------


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_patch_discriminator_outputs_one_logit_map_shrunk_by_2_to_the_n_layers(n_layers, norm):
    disc = PatchDiscriminator(ndf=8, n_layers=n_layers, norm=norm)
    # n_layers stride-2 convs halve 32 px, then two stride-1 kernel-4 convs each take one off
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 32 // 2**n_layers - 2, 32 // 2**n_layers - 2)


def test_patch_discriminator_init_follows_taming():
    torch.manual_seed(0)
    disc = PatchDiscriminator(ndf=64, n_layers=3, norm="batch")
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001
    scales = torch.cat([n.weight for n in norms])
    assert abs(scales.mean().item() - 1.0) < 0.01 and all(n.bias.abs().sum() == 0 for n in norms)
    # convs followed by a norm carry no bias
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]


def test_patch_discriminator_rejects_an_unknown_norm():
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="instance")


def test_hinge_d_loss_is_zero_when_logits_are_beyond_the_margins_and_one_at_zero():
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    # only the real side violates its margin: 0.5 * relu(1 - 0.5)
    assert hinge_d_loss(torch.tensor([0.5]), torch.tensor([-3.0])).item() == pytest.approx(0.25)


def test_non_saturating_d_loss_is_log2_at_zero_and_falls_as_d_separates():
    assert non_saturating_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(math.log(2))
    separated = non_saturating_d_loss(torch.tensor([5.0]), torch.tensor([-5.0])).item()
    assert separated == pytest.approx(math.log1p(math.exp(-5.0)))


def test_generator_losses_on_hand_made_logits():
    logits_fake = torch.tensor([1.0, -3.0])
    assert hinge_g_loss(logits_fake).item() == pytest.approx(1.0)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(3.0))) / 2
    assert non_saturating_g_loss(logits_fake).item() == pytest.approx(expected)


def test_lecam_emas_move_toward_the_logit_means_in_training_mode_only():
    lecam = LeCAMRegularizer(decay=0.9)
    real, fake = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -1.0)
    lecam(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.2) and lecam.ema_fake.item() == pytest.approx(-0.1)
    lecam(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.38) and lecam.ema_fake.item() == pytest.approx(-0.19)
    lecam.eval()
    lecam(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.38)


def _lecam_on_rank(rank: int, world_size: int) -> list[float]:
    lecam = LeCAMRegularizer(decay=0.5)
    real = torch.full((2, 1, 3, 3), 2.0 + 2 * rank)  # rank 0's real logits 2, rank 1's 4
    lecam(real, -real)
    return [lecam.ema_real.item(), lecam.ema_fake.item()]


def test_lecam_anchors_follow_the_global_batch_and_agree_across_ranks():
    from tests.distributed import run_distributed

    # mean real logit over both ranks 3, so 0.5 * 0 + 0.5 * 3 on every rank
    assert run_distributed(_lecam_on_rank) == [[1.5, -1.5], [1.5, -1.5]]


def test_lecam_penalty_uses_the_other_sides_ema():
    lecam = LeCAMRegularizer().eval()
    lecam.ema_real.fill_(1.0)
    lecam.ema_fake.fill_(-1.0)
    # real 2 sits 3 above ema_fake; fake 0.5 sits 0.5 below ema_real
    penalty = lecam(torch.tensor([2.0, -2.0]), torch.tensor([0.5, 3.0]))
    assert penalty.item() == pytest.approx(9.0 / 2 + 0.25 / 2)


def test_lecam_penalty_gives_gradient_to_the_logits_not_the_emas():
    lecam = LeCAMRegularizer()
    real = torch.tensor([1.0, 2.0], requires_grad=True)
    lecam(real, torch.tensor([-1.0])).backward()
    assert real.grad is not None and real.grad.abs().sum() > 0
    assert not lecam.ema_real.requires_grad


def test_lecam_emas_are_in_state_dict_and_restore_exactly():
    lecam = LeCAMRegularizer()
    lecam(torch.randn(8), torch.randn(8))
    state = lecam.state_dict()
    assert set(state) == {"ema_real", "ema_fake"}
    resumed = LeCAMRegularizer()
    resumed.load_state_dict(state)
    assert torch.equal(resumed.ema_real, lecam.ema_real) and torch.equal(resumed.ema_fake, lecam.ema_fake)


# --- LPIPS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_random() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(pretrained=False)


def test_lpips_is_zero_for_identical_images_positive_otherwise_and_symmetric(lpips_random):
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(lpips_random(x, x), torch.zeros(2))
    d_xy, d_yx = lpips_random(x, y), lpips_random(y, x)
    assert d_xy.shape == (2,) and (d_xy > 0).all()
    torch.testing.assert_close(d_xy, d_yx)


@pytest.mark.parametrize("identical", [True, False])
def test_lpips_gradient_is_finite_where_squared_features_underflow(identical):
    # features of ~1e-28 square to 0 in fp32: the lpips package's x / (sqrt(sum x^2) + eps) then
    # backpropagates 0 / 0 through the sqrt, NaN, even for identical inputs. (Exactly-zero features
    # would not show it: ReLU's backward masks the NaN where its output is 0.)
    torch.manual_seed(0)
    lpips = LPIPS(pretrained=False)
    with torch.no_grad():
        for module in lpips.slices.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.bias.zero_()
        lpips.slices[0][0].weight.mul_(1e-28)
    x = (torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_(True)
    y = x.detach().clone() if identical else torch.rand(1, 3, 16, 16) * 2 - 1
    lpips(x, y).backward()
    assert torch.isfinite(x.grad).all()


def test_normalize_channels_has_finite_gradient_at_zero():
    x = torch.zeros(1, 4, 2, 2, requires_grad=True)
    normalize_channels(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_lpips_is_frozen_and_stays_in_eval_mode(lpips_random):
    assert not any(p.requires_grad for p in lpips_random.parameters())
    parent = torch.nn.Sequential(lpips_random)
    parent.train()
    assert not lpips_random.training and not any(m.training for m in lpips_random.modules())


def test_lpips_runs_on_a_bf16_model_as_lightning_bf16_true_makes_it():
    lpips = LPIPS(pretrained=False).to(torch.bfloat16)
    x = torch.rand(1, 3, 16, 16, dtype=torch.bfloat16) * 2 - 1
    assert torch.isfinite(lpips(x, x.flip(-1))).all()


def test_lpips_lin_weights_are_non_negative_even_when_random(lpips_random):
    assert all((lin.weight >= 0).all() for lin in lpips_random.lins)


def test_lpips_missing_files_raise_one_error_naming_both_files_and_their_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # pretend the lpips and torchmetrics packages sit in an empty folder, whether installed or not
    monkeypatch.setattr(lpips_module, "_package_dir", lambda name: tmp_path / name)
    with pytest.raises(FileNotFoundError) as error:
        LPIPS()
    message = str(error.value)
    assert "vgg16-397923af.pth" in message and "download.pytorch.org" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "vgg.pth" in message and "PerceptualSimilarity" in message
    assert str(tmp_path / "lpips" / "weights" / "v0.1" / "vgg.pth") in message


def test_lpips_default_search_follows_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    paths = lpips_module.lpips_weight_paths()
    assert paths["vgg16"] == [tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"]


def test_lpips_an_explicit_missing_path_is_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        LPIPS(vgg_weights=tmp_path / "nowhere.pth", lin_weights=tmp_path / "nowhere.pth")


@pytest.fixture(scope="module")
def saved_weights(tmp_path_factory):
    """A random torchvision VGG16 state dict and random lin layers in the lpips package's keys."""
    folder = tmp_path_factory.mktemp("lpips_weights")
    torch.manual_seed(1)
    vgg = torchvision.models.vgg16(weights=None).state_dict()
    # keep the file small: the 120M classifier weights are unused, one classifier key shows they are skipped
    vgg = {k: v for k, v in vgg.items() if k.startswith("features.") or k == "classifier.6.bias"}
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, folder / "vgg16-397923af.pth")
    torch.save(lin, folder / "vgg.pth")
    return folder / "vgg16-397923af.pth", folder / "vgg.pth", vgg, lin


def test_lpips_loads_torchvision_vgg16_and_lpips_lin_weights_from_explicit_paths(saved_weights):
    vgg_path, lin_path, vgg, lin = saved_weights
    lpips = LPIPS(vgg_weights=vgg_path, lin_weights=lin_path)
    assert torch.equal(lpips.slices[0][0].weight, vgg["features.0.weight"])
    assert torch.equal(lpips.slices[2][1].bias, vgg["features.10.bias"])  # relu3_3's slice starts at 9
    assert torch.equal(lpips.slices[4][-2].weight, vgg["features.28.weight"])  # conv5_3, last before relu5_3
    assert torch.equal(lpips.lins[3].weight, lin["lin3.model.1.weight"])


def test_lpips_matches_torchmetrics_with_the_same_weights(saved_weights):
    from torchmetrics.functional.image.lpips import _LPIPS

    vgg_path, lin_path, vgg, lin = saved_weights
    reference = _LPIPS(pretrained=False, net="vgg", pnet_rand=True).eval()
    # torchmetrics' slices keep torchvision's indices as names (net.slice1.0.weight = features.0.weight)
    # and its lin layers the lpips package's keys
    state = {
        f"net.slice{k}.{name}": vgg[f"features.{name}"]
        for k in range(1, 6)
        for name, _ in getattr(reference.net, f"slice{k}").named_parameters()
    }
    result = reference.load_state_dict(state | lin, strict=False)
    assert not result.unexpected_keys and all(key.startswith("lins.") for key in result.missing_keys)  # aliases of linK
    ours = LPIPS(vgg_weights=vgg_path, lin_weights=lin_path)
    torch.manual_seed(2)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    # eps differs (1e-8 in torchmetrics, 1e-10 here) but feature norms are far above both
    torch.testing.assert_close(ours(x, y), reference(x, y).flatten(), rtol=1e-4, atol=1e-6)


def test_lpips_falls_back_to_the_lin_weights_an_installed_package_ships(saved_weights):
    pytest.importorskip("torchmetrics")  # torchmetrics >= 1.x ships lpips_models/vgg.pth
    vgg_path, *_ = saved_weights
    searched = lpips_module.lpips_weight_paths()["lin"]
    assert any(p.parts[-4:] == ("functional", "image", "lpips_models", "vgg.pth") for p in searched)
    found = next(p for p in searched if p.is_file())
    shipped = torch.load(found, map_location="cpu", weights_only=True)
    lpips = LPIPS(vgg_weights=vgg_path)
    assert torch.equal(lpips.lins[0].weight, shipped["lin0.model.1.weight"])
    assert all((lin.weight >= 0).all() for lin in lpips.lins)
