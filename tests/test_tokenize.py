"""`tessera tokenize`: caption-image shards -> token shards, with a tiny random-init 32 px tokenizer
(f2, 16x16 ids, 32 codes) over the shapes fixture's three shards of 50, 50 and 20 samples."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from datamodules.images import resize_and_crop
from datamodules.stream import decode_sample, shard_sizes
from datamodules.token_shards import (
    claim_out_dir, output_names, shard_basename, token_dtype, tokenize_shards, tokenizer_record,
)
from lightning_modules.vqgan import load_tokenizer
from tessera.commands.cli import main
from tessera.nn.vq_tokenizer import VQTokenizer
from tessera.pixels import to_unit_range
from tests.samples import encode, gradient_image, img2dataset_samples, write_wds_shard
from tests.test_shard_writer import read_shard
from tests.test_vqgan import tiny_vqgan

SHARD_NAMES = ["00000.tar", "00001.tar", "00002.tar"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return tiny_vqgan(image_size=32).tokenizer.save_pretrained(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> VQTokenizer:
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def pattern(shapes_dir) -> str:
    return str(shapes_dir / "{00000..00002}.tar")


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tokenizer, pattern):
    """One process over every shard: the reference the other tests compare with."""
    out = tmp_path_factory.mktemp("tokens")
    return out, tokenize_shards(tokenizer, pattern, out, image_size=32, batch_size=16)


def expected_samples(urls: list[str], tokenizer: VQTokenizer, batch_size: int = 16) -> dict[str, tuple]:
    """key -> (ids, caption, json bytes), each shard's images decoded, centre-cropped and encoded in
    batches as the tokenize run batched them: CPU kernels round differently for other batch sizes,
    which flips near-ties between the codes of a random codebook."""
    expected = {}
    for url in urls:
        samples = list(wds.tarfile_samples([{"url": url}]))
        for start in range(0, len(samples), batch_size):
            batch = [decode_sample(sample, 32) for sample in samples[start : start + batch_size]]
            pixels = torch.from_numpy(np.stack([resize_and_crop(image, 32) for _, image, _ in batch])).permute(0, 3, 1, 2)
            ids = tokenizer.encode(to_unit_range(pixels)).numpy()  # (B, 16, 16)
            for sample, (_, _, caption), sample_ids in zip(samples[start : start + batch_size], batch, ids):
                expected[sample["__key__"]] = (sample_ids, caption, sample["json"])
    return expected


def load_tokens(payload: bytes) -> np.ndarray:
    return np.load(io.BytesIO(payload), allow_pickle=False)


def test_every_sample_is_tokenized_once_as_the_tokenizer_encodes_it(tokenized, tokenizer, shapes_urls, pattern):
    out, report = tokenized
    assert (report.written, report.kept, report.samples, dict(report.skipped)) == (3, 0, 120, {})

    written: dict[str, dict] = {}
    for name in SHARD_NAMES:
        samples = read_shard(out / name)
        assert not set(samples) & set(written)
        written.update(samples)
    expected = expected_samples(shapes_urls, tokenizer)
    assert written.keys() == expected.keys()
    for key, (ids, caption, meta) in expected.items():
        tokens = load_tokens(written[key]["tokens.npy"])
        assert tokens.dtype == np.uint16 and tokens.shape == (16, 16)
        np.testing.assert_array_equal(tokens, ids)
        assert written[key]["txt"].decode() == caption
        assert written[key]["json"] == meta

    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 50, "00001.tar": 50, "00002.tar": 20}
    assert shard_sizes([str(out / name) for name in SHARD_NAMES]) == [50, 50, 20]
    record = json.loads((out / "tokenizer.json").read_text())
    assert record["tokenizer"] == json.loads(json.dumps(tokenizer.describe()))
    assert (record["image_size"], record["token_dtype"], record["shards"]) == (32, "uint16", pattern)


def test_two_ranks_one_after_the_other_write_what_one_process_writes(tmp_path, tokenized, tokenizer, pattern):
    reference, _ = tokenized
    first = tokenize_shards(tokenizer, pattern, tmp_path, image_size=32, batch_size=16, rank=0, world_size=2)
    assert (first.written, first.samples, first.sizes_complete) == (2, 70, False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar", "00002.tar"]
    assert not (tmp_path / "sizes.json").exists()  # never written incomplete

    second = tokenize_shards(tokenizer, pattern, tmp_path, image_size=32, batch_size=16, rank=1, world_size=2)
    assert (second.written, second.samples, second.sizes_complete) == (1, 50, True)
    for name in [*SHARD_NAMES, "sizes.json", "tokenizer.json"]:
        assert (tmp_path / name).read_bytes() == (reference / name).read_bytes(), name


def test_rerun_keeps_complete_shards_and_ignores_a_killed_runs_temp_file(tmp_path, tokenized, tokenizer, pattern):
    out = shutil.copytree(tokenized[0], tmp_path / "out")
    kept = (out / "00000.tar").stat().st_mtime_ns
    original = (out / "00001.tar").read_bytes()
    (out / "00001.tar").unlink()
    (out / "sizes.json").unlink()
    leftover = out / ".00001.tar.99999.tmp"
    leftover.write_bytes(b"the first half of a shard")

    report = tokenize_shards(tokenizer, pattern, out, image_size=32, batch_size=16)

    assert (report.written, report.kept, report.samples, report.sizes_complete) == (1, 2, 50, True)
    assert (out / "00000.tar").stat().st_mtime_ns == kept
    assert (out / "00001.tar").read_bytes() == original
    assert not leftover.exists() and not list(out.glob(".*"))
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 50, "00001.tar": 50, "00002.tar": 20}


class FailsAfter:
    """A tokenizer that raises on its n+1-th batch, as a run killed mid-shard would stop."""

    def __init__(self, tokenizer: VQTokenizer, batches: int):
        self.tokenizer, self.batches = tokenizer, batches
        self.codebook_size, self.downsample_factor = tokenizer.codebook_size, tokenizer.downsample_factor
        self.describe, self.state_dict = tokenizer.describe, tokenizer.state_dict

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.batches -= 1
        if self.batches < 0:
            raise RuntimeError("killed")
        return self.tokenizer.encode(images)


def test_a_run_stopped_mid_shard_leaves_no_shard_that_looks_complete(tmp_path, tokenized, tokenizer, pattern):
    with pytest.raises(RuntimeError, match="killed"):
        tokenize_shards(FailsAfter(tokenizer, batches=5), pattern, tmp_path, image_size=32, batch_size=16)
    # 00000.tar took 4 batches; the 5th and 6th belong to 00001.tar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00000_stats.json", "tokenizer.json"]

    report = tokenize_shards(tokenizer, pattern, tmp_path, image_size=32, batch_size=16)
    assert (report.written, report.kept, report.sizes_complete) == (2, 1, True)
    assert (tmp_path / "00001.tar").read_bytes() == (tokenized[0] / "00001.tar").read_bytes()


def test_another_tokenizer_or_image_size_is_refused_before_anything_is_written(tmp_path, tokenizer, pattern):
    claim_out_dir(tmp_path, tokenizer_record(tokenizer, pattern, 32))
    torch.manual_seed(1)
    retrained = VQTokenizer.from_description(tokenizer.describe()).eval()  # same architecture, other weights

    with pytest.raises(ValueError, match="different tokenizer.*weights_sha256"):
        tokenize_shards(retrained, pattern, tmp_path, image_size=32)
    with pytest.raises(ValueError, match="different tokenizer.*image_size"):
        tokenize_shards(tokenizer, pattern, tmp_path, image_size=16)
    with pytest.raises(ValueError, match="not a multiple of the tokenizer's downsampling factor 2"):
        tokenize_shards(tokenizer, pattern, tmp_path, image_size=33)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path, tokenizer):
    jpeg = encode(gradient_image(48, 40))
    bad = [
        {"__key__": "truncated", "jpg": jpeg[: len(jpeg) // 3], "txt": "cut short"},
        {"__key__": "garbage", "png": b"not an image at all", "txt": "noise"},
        {"__key__": "uncaptioned", "jpg": jpeg},
        {"__key__": "textonly", "txt": "a caption without an image"},
    ]
    good = img2dataset_samples(0, 3, size=(48, 40))
    write_wds_shard(tmp_path / "00000.tar", good[:1] + bad + good[1:])

    report = tokenize_shards(tokenizer, str(tmp_path / "00000.tar"), tmp_path / "out", image_size=32, batch_size=2)

    reasons = {"corrupt_image": 2, "missing_caption": 1, "missing_image": 1}
    assert (report.samples, dict(report.skipped)) == (3, reasons)
    assert sorted(read_shard(tmp_path / "out" / "00000.tar")) == sorted(s["__key__"] for s in good)
    assert json.loads((tmp_path / "out" / "00000_stats.json").read_text())["skipped"] == reasons


def test_tokenize_command_takes_rank_from_slurm_or_flags(tmp_path, tokenized, tokenizer_dir, pattern, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    command = ["tokenize", "--tokenizer", str(tokenizer_dir), "--shards", pattern, "--out", str(tmp_path),
               "--image-size", "32", "--batch-size", "16", "--device", "cpu"]

    assert main([*command, "--workers", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["rank"], report["world_size"], report["written"], report["samples"]) == (1, 2, 1, 50)
    assert not report["sizes_complete"]

    assert main([*command, "--workers", "0", "--rank", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["rank"], report["written"], report["sizes_complete"]) == (0, 2, True)
    for name in [*SHARD_NAMES, "sizes.json"]:
        assert (tmp_path / name).read_bytes() == (tokenized[0] / name).read_bytes(), name


def test_ids_are_stored_as_uint16_while_they_fit():
    assert token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.int32


@pytest.mark.parametrize("url", ["/data/cc3m/00012.tar", "https://host/cc3m/00012.tar?sig=abc", "pipe:aws s3 cp s3://bucket/cc3m/00012.tar -"])
def test_output_shards_take_the_input_shards_name(url):
    assert shard_basename(url) == "00012.tar"


def test_two_input_shards_of_one_name_are_refused():
    with pytest.raises(ValueError, match="share the name 00000.tar"):
        output_names(["/a/00000.tar", "/b/00000.tar"])


def test_the_datamodule_reads_token_shards_back_as_image_ids(tokenized, tokenizer, shapes_urls):
    from datamodules.caption_image import CaptionImageDataModule

    out, _ = tokenized
    data = CaptionImageDataModule(
        train_shards=str(out / "{00000..00002}.tar"), batch_size=8, num_workers=0, text_length=24,
        image_tokens=True, shuffle_buffer=0,
    )
    data.setup("fit")
    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)
    assert "images" not in batch
    assert batch["image_ids"].shape == (8, 16, 16) and batch["image_ids"].dtype == torch.long
    assert batch["text_ids"].shape == (8, 24)
    expected = expected_samples(shapes_urls, tokenizer)
    for key, ids, caption in zip(batch["keys"], batch["image_ids"], batch["captions"]):
        np.testing.assert_array_equal(ids.numpy(), expected[key][0])
        assert caption == expected[key][1]


def test_a_token_shard_sample_without_tokens_is_counted_as_a_skip(tmp_path):
    from datamodules.stream import CaptionTokenStream
    from datamodules.text import CaptionTokenizer

    buffer = io.BytesIO()
    np.save(buffer, np.zeros((4, 4), dtype=np.uint16))
    good = {"__key__": "0", "tokens.npy": buffer.getvalue(), "txt": b"a red circle"}
    write_wds_shard(tmp_path / "00000.tar", [good, {"__key__": "1", "txt": b"no ids"}, {**good, "__key__": "2", "tokens.npy": b"garbage"}] + [{**good, "__key__": str(i)} for i in range(3, 8)])
    stream = CaptionTokenStream([str(tmp_path / "00000.tar")], CaptionTokenizer(text_length=8), samples_per_epoch=6, batch_size=6, shuffle=False)
    batch = next(iter(stream))
    assert batch["image_ids"].shape == (6, 4, 4)
    assert batch["stats"] == {"missing_tokens": 1, "corrupt_tokens": 1}


def test_token_shards_of_two_id_grids_are_refused_with_a_reason(tmp_path):
    from datamodules.stream import CaptionTokenStream
    from datamodules.text import CaptionTokenizer

    def sample(key: str, side: int) -> dict:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((side, side), dtype=np.uint16))
        return {"__key__": key, "tokens.npy": buffer.getvalue(), "txt": b"a red circle"}

    write_wds_shard(tmp_path / "00000.tar", [sample("0", 4), sample("1", 8)])
    stream = CaptionTokenStream([str(tmp_path / "00000.tar")], CaptionTokenizer(text_length=8), samples_per_epoch=2, batch_size=2, shuffle=False)
    with pytest.raises(ValueError, match="one tokenizer"):
        next(iter(stream))
