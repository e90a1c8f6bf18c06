"""The pixel cap: an image whose header declares more than `max_pixels` pixels is refused before it is
decoded, and skipped as "oversized_image" by the shard writers, `tessera data check` and the training reader."""

from __future__ import annotations

import json

import lightning as L
import pytest

from callbacks import DataStatsMonitor
from datamodules.caption_image import CaptionImageDataModule
from datamodules.images import MAX_PIXELS, OversizedImage, decode_image
from datamodules.shard_writer import write_shards
from datamodules.sources import FolderSource
from datamodules.stream import STAT_NAMES, decode_sample
from tessera.commands.cli import main
from tests.samples import encode, gradient_image, img2dataset_samples, png_declaring, write_wds_shard
from tests.test_datamodule import RecordingModule

# 144 MP: past PIL's decompression-bomb warning (89 MP), short of its error (179 MP), so PIL would decode it
HUGE = png_declaring(12000, 12000)


def test_an_image_above_the_cap_is_refused_from_its_header():
    with pytest.raises(OversizedImage, match="12000x12000 is 144.0 MP"):
        decode_image(HUGE, max_pixels=MAX_PIXELS)  # HUGE holds no pixels: decoding would raise OSError
    with pytest.raises(OSError):
        decode_image(HUGE)  # no cap: PIL goes on to decode it


@pytest.mark.parametrize("side, reason", [(12000, "oversized_image"), (8192, "corrupt_image")])
def test_the_readers_default_cap_is_8192_squared(side, reason):
    # an image at the cap gets past it and fails only because this one holds no pixels
    sample = {"__key__": "k", "__url__": "u", "png": png_declaring(side, side), "txt": b"a caption"}
    assert decode_sample(sample, min_side=None)[0] == reason


def test_writer_skips_images_above_its_cap_and_counts_them(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "wide.jpg").write_bytes(encode(gradient_image(40, 30)))  # 1200 pixels
    (images / "small.jpg").write_bytes(encode(gradient_image(20, 20)))  # 400
    (images / "huge.png").write_bytes(HUGE)
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"file": f, "caption": f}) + "\n" for f in ("wide.jpg", "small.jpg", "huge.png")))

    assert write_shards(FolderSource(images, captions), tmp_path / "default").skipped == {"oversized_image": 1}
    report = write_shards(FolderSource(images, captions), tmp_path / "capped", max_pixels=1000)
    assert report.samples == 1 and report.skipped == {"oversized_image": 2}


def test_data_check_counts_images_above_the_cap(tmp_path, capsys):
    shard = tmp_path / "00000.tar"
    write_wds_shard(shard, img2dataset_samples(0, 3) + [{"__key__": "huge", "png": HUGE, "txt": "a huge image"}])
    for flags, skipped in [([], {"oversized_image": 1}), (["--max-pixels", "5000"], {"oversized_image": 4}),
                           (["--max-pixels", "0"], {"corrupt_image": 1})]:  # 0: no cap, so PIL tries to decode it
        assert main(["data", "check", str(shard), "--workers", "1", *flags]) == 0
        assert json.loads(capsys.readouterr().out)["skipped"] == skipped


def test_training_reader_skips_images_above_its_cap_and_logs_them(tmp_path):
    large = img2dataset_samples(1, 2, size=(200, 100))  # 20,000 pixels each, read first
    write_wds_shard(tmp_path / "00000.tar", large + img2dataset_samples(0, 8))  # 96 x 80 = 7,680 pixels
    data = CaptionImageDataModule(str(tmp_path / "00000.tar"), image_size=32, batch_size=4, num_workers=0,
                                  train_samples=8, shuffle_buffer=0, max_pixels=10_000)
    L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, max_epochs=1,
              callbacks=[DataStatsMonitor(every_n_steps=1)]).fit(RecordingModule(), datamodule=data)

    assert "oversized_image" in STAT_NAMES
    assert data.data_stats["oversized_image"] == 2
    assert data.trainer.callback_metrics["data/oversized_image"].item() == 2
