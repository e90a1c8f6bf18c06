"""Likelihood in bits and lossless coding with a prior: validation logs bits per token and per
image next to the nats; `compress` then `decompress` gives back exactly the ids (random, constant,
over several batches, flat and residual), in about -log2 p bits; a uniform model costs log2(K) a
token; files of another model, damaged files and probabilities that differ are refused; the
commands round-trip images and id grids, and a pixel prior's images bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.images import resize_and_crop
from datamodules.token_shards import encode_images
from lightning_modules.prior import TextImagePrior, export_prior, load_prior
from tessera.coding import decode, encode
from tessera.commands import compress as compress_module
from tessera.commands.cli import main
from tessera.commands.compress import compress, decompress, model_fingerprint
from tessera.sampling import image_token_steps
from tests.test_pixel_models import PRIORS as PIXEL_PRIORS
from tests.test_pixel_models import tiny_image_transformer_prior
from tests.test_prior import Tokens, tiny_config, tiny_prior, tokenizer_dir  # noqa: F401 (tokenizer_dir: a fixture)
from tests.test_rq_prior import ResidualTokens, tiny_rq_prior

CAPTIONS = ["a red circle", "two blue squares", "a green triangle", "", "three yellow stars"]
WORD_BITS = 32  # the range coder writes whole 32-bit words


def teacher_forced_bits(prior: TextImagePrior, ids: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """(B,) -log2 p of each image's ids from one full forward pass: the reference the coder's own sum is held to."""
    with torch.no_grad():
        _, logits = prior.transformer(prior.captions(captions).ids, prior.checked_ids(ids))
    log_p = logits[..., : prior.alphabet_size].float().log_softmax(-1).gather(-1, prior.checked_ids(ids)[..., None])
    return -log_p.flatten(1).sum(1) / math.log(2)


def test_validation_logs_bits_per_image_token_and_per_image_from_the_nats(tmp_path):
    flat, residual = tiny_prior(None, tokenizer=None), tiny_rq_prior(None)
    for prior, data, ids_per_image in ((flat, Tokens(flat), 4 * 4), (residual, ResidualTokens(residual), 4 * 4 * 2)):
        trainer = L.Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False)
        logged = trainer.validate(prior, DataLoader(data, batch_size=3), verbose=False)[0]
        bits = logged["val/image_loss"] / math.log(2)
        assert logged["val/bits_per_image_token"] == pytest.approx(bits, rel=1e-6)
        assert logged["val/bits_per_image"] == pytest.approx(bits * ids_per_image, rel=1e-6)
        assert 5 < logged["val/bits_per_image_token"] < 7  # a random-init prior: about log2(64) bits an id


@pytest.mark.parametrize("family", ["flat", "residual"])
def test_compress_then_decompress_gives_the_very_ids_back_in_about_minus_log2_p_bits(family):
    prior = (tiny_prior(None, tokenizer=None) if family == "flat" else tiny_rq_prior(None)).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.cat([
        torch.randint(64, (3, *prior.id_shape), generator=generator),  # random
        torch.zeros(1, *prior.id_shape, dtype=torch.long),  # all the same, the first id
        torch.full((1, *prior.id_shape), 63),  # all the same, the last
    ])
    compressed = compress(prior, ids, CAPTIONS, batch_size=2)  # three batches: 2, 2 and 1
    result = decompress(prior, compressed.data)

    assert torch.equal(result.symbols, ids) and result.captions == CAPTIONS and result.kind == "tokens"
    reference = teacher_forced_bits(prior, ids, CAPTIONS)
    torch.testing.assert_close(torch.from_numpy(compressed.information_bits).float(), reference, rtol=1e-4, atol=1e-3)
    coded_bits = 8 * (len(compressed.data) - compressed.header_bytes)
    # each batch's stream ends within two words of its information; never below it
    assert reference.sum() <= coded_bits <= reference.sum() + 3 * 2 * WORD_BITS
    header_length = int.from_bytes(compressed.data[6:10], "little")
    assert compressed.header_bytes == 10 + header_length + 4  # prefix, header, CRC-32: the rest is coded words
    assert compress_module.read_container(compressed.data)[0]["captions"] == CAPTIONS


def test_a_uniform_model_costs_log2_k_bits_a_token():
    prior = tiny_prior(None, tokenizer=None).eval()
    torch.nn.init.zeros_(prior.transformer.image_head.weight)  # every logit 0: uniform over the 64 ids
    ids = torch.randint(64, (4, *prior.id_shape), generator=torch.Generator().manual_seed(1))
    compressed = compress(prior, ids, CAPTIONS[:4], batch_size=4)
    tokens = ids.numel()

    np.testing.assert_allclose(compressed.information_bits.sum(), tokens * math.log2(64), rtol=1e-9)
    coded_bits = 8 * (len(compressed.data) - compressed.header_bytes)
    assert tokens * 6 <= coded_bits <= tokens * 6 + 2 * WORD_BITS
    assert torch.equal(decompress(prior, compressed.data).symbols, ids)


def test_the_coder_refuses_symbols_outside_the_alphabet_and_a_count_the_model_does_not_predict():
    prior = tiny_prior(None, tokenizer=None).eval()
    text_ids = prior.captions(CAPTIONS[:2]).ids
    out_of_range = torch.zeros(2, 16, dtype=torch.long)
    out_of_range[1, 3] = 64
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"symbols must lie in \[0, 64\), got \[0, 64\]"):
            encode(image_token_steps(prior.transformer, text_ids), out_of_range, 64)
        with pytest.raises(ValueError, match="the model predicts 16 symbols a row, 17 were given"):
            encode(image_token_steps(prior.transformer, text_ids), torch.zeros(2, 17, dtype=torch.long), 64)
        with pytest.raises(ValueError, match="the model predicts more than the 15 symbols given a row"):
            encode(image_token_steps(prior.transformer, text_ids), torch.zeros(2, 15, dtype=torch.long), 64)
        coded = encode(image_token_steps(prior.transformer, text_ids), torch.ones(2, 16, dtype=torch.long), 64)
        assert torch.equal(decode(image_token_steps(prior.transformer, text_ids), coded.words, 64), torch.ones(2, 16, dtype=torch.long))


def test_a_file_of_another_model_is_refused_naming_both_fingerprints():
    prior = tiny_prior(None, tokenizer=None).eval()
    data = compress(prior, torch.zeros(1, 4, 4, dtype=torch.long), CAPTIONS[:1]).data
    torch.manual_seed(1)
    other = TextImagePrior(transformer=tiny_config()).eval()
    with pytest.raises(ValueError, match=f"written with the model {model_fingerprint(prior)[:16]}, this prior is "
                                         f"{model_fingerprint(other)[:16]}"):
        decompress(other, data)


def test_a_truncated_corrupt_or_foreign_file_is_refused_with_its_reason():
    prior = tiny_prior(None, tokenizer=None).eval()
    data = compress(prior, torch.randint(64, (2, 4, 4)), CAPTIONS[:2]).data
    with pytest.raises(ValueError, match="corrupt or truncated"):
        decompress(prior, data[:-5])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        decompress(prior, data[:20])
    with pytest.raises(ValueError, match="truncated: 6 bytes"):
        decompress(prior, data[:6])
    flipped = bytearray(data)
    flipped[-9] ^= 0x10  # a bit of the coded words
    with pytest.raises(ValueError, match="corrupt or truncated"):
        decompress(prior, bytes(flipped))
    with pytest.raises(ValueError, match="not a `tessera compress` file"):
        decompress(prior, b"\x89PNG\r\n\x1a\n" + data[8:])
    with pytest.raises(ValueError, match="format version 2; this tessera reads version 1"):
        decompress(prior, data[:4] + (2).to_bytes(2, "little") + data[6:])


def test_probabilities_that_differ_from_the_encoders_fail_the_ids_checksum(monkeypatch):
    prior = tiny_prior(None, tokenizer=None).eval()
    data = compress(prior, torch.randint(64, (2, 4, 4)), CAPTIONS[:2]).data
    written_with = compress_module.read_container(data)[0]["model"]
    monkeypatch.setattr(compress_module, "model_fingerprint", lambda prior: written_with)
    with torch.no_grad():
        prior.transformer.image_head.weight.mul_(1.5)  # another machine's rounding, exaggerated
    with pytest.raises(ValueError, match="fail their checksum: this machine's prior gave other probabilities"):
        decompress(prior, data)


def test_coding_runs_the_prior_on_one_thread_whatever_torchs_setting_and_restores_it():
    prior = tiny_prior(None, tokenizer=None).eval()
    steps, seen = prior.symbol_steps, []

    def spied(captions):
        seen.append(torch.get_num_threads())
        return steps(captions)

    prior.symbol_steps = spied
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a sum split over two threads rounds otherwise than over one
    try:
        data = compress(prior, torch.randint(64, (2, 4, 4)), CAPTIONS[:2]).data
        decompress(prior, data)
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_coding_refuses_a_prior_off_the_cpu_or_below_fp32():
    prior = tiny_prior(None, tokenizer=None).eval().to(torch.bfloat16)
    with pytest.raises(ValueError, match="torch.bfloat16 on cpu: coding runs it in fp32 on the CPU"):
        compress(prior, torch.zeros(1, 4, 4, dtype=torch.long), CAPTIONS[:1])


def _checkpoint(prior: TextImagePrior, path: Path) -> Path:
    """A .ckpt as Lightning writes one, its weights and arguments (what load_prior and export read)."""
    torch.save({"state_dict": prior.state_dict(), "hyper_parameters": dict(prior.hparams)}, path)
    return path


def test_commands_round_trip_images_through_the_tokenizer_and_id_grids(tmp_path, tokenizer_dir):
    prior = tiny_prior(tokenizer_dir)
    checkpoint = _checkpoint(prior, tmp_path / "prior.ckpt")
    export_prior(checkpoint, tmp_path / "export")
    assert model_fingerprint(load_prior(checkpoint)) == model_fingerprint(load_prior(tmp_path / "export"))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(inputs / f"img{index}.png")
        (inputs / f"img{index}.txt").write_text(CAPTIONS[index])
    np.save(inputs / "grid.tokens.npy", rng.integers(0, 64, (4, 4)).astype(np.uint16))
    (inputs / "grid.txt").write_text("an id grid")
    paths = [str(p) for p in sorted(inputs.glob("*.png"))] + [str(inputs / "grid.tokens.npy")]

    assert main(["compress", *paths, "--prior", str(checkpoint), "--out", str(tmp_path / "all.tsr"), "--batch-size", "3"]) == 0
    # the export is the same model: its fingerprint matches the file's
    assert main(["decompress", str(tmp_path / "all.tsr"), "--prior", str(tmp_path / "export"), "--out", str(tmp_path / "out"),
                 "--png", "--tokenizer", str(tokenizer_dir)]) == 0

    tokenizer = prior.image_tokenizer.module
    for index in range(3):
        crop = resize_and_crop(Image.open(inputs / f"img{index}.png").convert("RGB"), 32)
        expected = encode_images(tokenizer, torch.tensor(crop).permute(2, 0, 1)[None], torch.device("cpu"))[0]
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"img{index}.tokens.npy"), expected)
        assert (tmp_path / "out" / f"img{index}.txt").read_text() == CAPTIONS[index]
        assert Image.open(tmp_path / "out" / f"img{index}.png").size == (32, 32)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "grid.tokens.npy"), np.load(inputs / "grid.tokens.npy"))


def test_compress_refuses_an_input_without_a_caption_or_of_another_grid(tmp_path):
    prior = tiny_prior(None, tokenizer=None)
    checkpoint = _checkpoint(prior, tmp_path / "prior.ckpt")
    np.save(tmp_path / "a.npy", np.zeros((4, 4), np.int64))
    with pytest.raises(SystemExit, match=r"no caption for .*a.npy: write it to .*a.txt, or give every image one with --caption"):
        main(["compress", str(tmp_path / "a.npy"), "--prior", str(checkpoint), "--out", str(tmp_path / "a.tsr")])
    np.save(tmp_path / "b.npy", np.zeros((8, 8), np.int64))
    with pytest.raises(SystemExit, match=r"b.npy gives symbols of shape \(8, 8\), the prior models \(4, 4\)"):
        main(["compress", str(tmp_path / "b.npy"), "--prior", str(checkpoint), "--out", str(tmp_path / "b.tsr"), "--caption", "x"])


@pytest.mark.parametrize("name", ["pixelcnn", "image_transformer"])
def test_a_pixel_priors_subpixels_round_trip_in_about_their_teacher_forced_minus_log2_p(name):
    prior = PIXEL_PRIORS[name](network=dict(image_grid=6)).eval()
    images = torch.cat([torch.randint(256, (2, 6, 6, 3), generator=torch.Generator().manual_seed(0)),
                        torch.full((1, 6, 6, 3), 255)])
    compressed = compress(prior, images, CAPTIONS[:3], batch_size=2)
    result = decompress(prior, compressed.data)

    assert torch.equal(result.symbols, images) and result.kind == "pixels"
    log_probs = prior.subpixel_log_probs(images, prior.captions(CAPTIONS[:3]).ids)  # one teacher-forced pass
    reference = -log_probs.gather(-1, images[..., None]).flatten(1).sum(1) / math.log(2)
    torch.testing.assert_close(torch.from_numpy(compressed.information_bits).float(), reference, rtol=1e-4, atol=1e-3)
    coded_bits = 8 * (len(compressed.data) - compressed.header_bytes)
    assert reference.sum() <= coded_bits <= reference.sum() + 2 * 2 * WORD_BITS


def test_a_pixel_priors_png_round_trips_bit_for_bit_through_the_commands(tmp_path):
    prior = tiny_image_transformer_prior(network=dict(image_grid=6))
    checkpoint = _checkpoint(prior, tmp_path / "pixel.ckpt")
    pixels = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "tiny.png")

    assert main(["compress", str(tmp_path / "tiny.png"), "--prior", str(checkpoint), "--out", str(tmp_path / "tiny.tsr"),
                 "--caption", "noise"]) == 0
    assert main(["decompress", str(tmp_path / "tiny.tsr"), "--prior", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "tiny.png")), pixels)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(SystemExit, match=r"big.png gives symbols of shape \(8, 8, 3\), the prior models \(6, 6, 3\)"):
        main(["compress", str(tmp_path / "big.png"), "--prior", str(checkpoint), "--out", str(tmp_path / "big.tsr"), "--caption", "x"])


def test_the_shapes_bench_puts_a_priors_coded_size_beside_the_lossless_codecs(tmp_path, tokenizer_dir):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from compression_shapes import main as bench

    checkpoint = _checkpoint(tiny_prior(tokenizer_dir), tmp_path / "prior.ckpt")
    bench(["--images", "3", "--image-size", "32", "--prior", str(checkpoint), "--coder-symbols", "128",
           "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())
    sizes = {row["coder"].split(":")[-1].strip(): row["bytes"] for row in rows["images"]}
    assert sizes["raw uint8"] == 3 * 32 * 32 * 3 and 0 < sizes["PNG (optimize)"] < sizes["raw uint8"]
    assert sizes["-log2 p"] <= sizes["coded, header apart"] <= sizes["-log2 p"] + 2 * WORD_BITS / 8 < sizes["coded file"]
    assert len(rows["coder"]) == 8 and all(row["excess_bits"] > -1 for row in rows["coder"])
