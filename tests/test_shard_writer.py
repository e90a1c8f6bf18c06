import csv
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from datamodules.shapes import SyntheticShapes
from datamodules.shard_writer import count_samples, write_shards
from datamodules.sources import CocoSource, FolderSource
from tests.samples import encode, gradient_image


def read_shard(path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_synthetic_shards_round_trip_in_img2dataset_layout(tmp_path):
    source = SyntheticShapes(25, image_size=32, seed=3)
    report = write_shards(source, tmp_path, samples_per_shard=10, image_format="png")

    assert (report.written, report.samples) == (3, 25)
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 10, "00001.tar": 10, "00002.tar": 5}
    samples = read_shard(tmp_path / "00001.tar")
    assert sorted(samples) == [f"00001{i}" for i in range(10)]
    first = samples["000010"]
    assert set(first) == {"png", "txt", "json"}
    expected = source[10]
    record = json.loads(first["json"])
    assert first["txt"].decode() == expected.caption == record["caption"]
    assert (record["key"], record["width"], record["height"]) == ("000010", 32, 32)
    assert record["objects"] == expected.meta["objects"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first["png"]))), np.asarray(expected.image))


def test_rerun_keeps_complete_shards_and_rewrites_missing_ones(tmp_path):
    source = SyntheticShapes(30, image_size=32)
    write_shards(source, tmp_path, samples_per_shard=10, image_format="png")
    kept = (tmp_path / "00000.tar").stat().st_mtime_ns
    first_bytes = (tmp_path / "00002.tar").read_bytes()
    (tmp_path / "00002.tar").unlink()

    report = write_shards(source, tmp_path, samples_per_shard=10, image_format="png")

    assert (report.written, report.existing, report.samples) == (1, 2, 30)
    assert json.loads((tmp_path / "00002_stats.json").read_text()) == {"successes": 10, "skipped": {}}
    assert (tmp_path / "00000.tar").stat().st_mtime_ns == kept
    assert (tmp_path / "00002.tar").read_bytes() == first_bytes  # same source, byte-identical shard
    assert not list(tmp_path.glob(".*tmp"))


def test_rerun_with_other_options_is_refused_naming_the_difference(tmp_path):
    source = SyntheticShapes(30, image_size=32)
    write_shards(source, tmp_path, samples_per_shard=10, image_format="png")
    before = sorted(p.name for p in tmp_path.iterdir())

    with pytest.raises(ValueError, match="samples_per_shard: 10 there, 5 now") as refused:
        write_shards(source, tmp_path, samples_per_shard=5, image_format="png")
    assert "overwrite" in str(refused.value)
    with pytest.raises(ValueError, match="source_samples: 30 there, 31 now"):
        write_shards(SyntheticShapes(31, image_size=32), tmp_path, samples_per_shard=10, image_format="png")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside the old shards


def test_options_are_recorded_beside_sizes_json(tmp_path):
    write_shards(SyntheticShapes(12, image_size=32), tmp_path, samples_per_shard=5, image_format="webp", quality=80,
                 max_pixels=4096)
    assert json.loads((tmp_path / "options.json").read_text()) == {
        "source": "SyntheticShapes", "source_samples": 12, "samples_per_shard": 5, "image_format": "webp",
        "quality": 80, "max_pixels": 4096,
    }


def test_overwrite_removes_the_old_shards_and_records(tmp_path):
    source = SyntheticShapes(30, image_size=32)
    write_shards(source, tmp_path, samples_per_shard=10, image_format="png")
    (tmp_path / "notes.txt").write_text("mine")

    report = write_shards(source, tmp_path, samples_per_shard=20, image_format="png", overwrite=True)

    assert (report.written, report.existing, report.samples) == (2, 0, 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "notes.txt", "options.json", "sizes.json"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 20, "00001.tar": 10}
    assert json.loads((tmp_path / "options.json").read_text())["samples_per_shard"] == 20


def test_shards_without_an_options_record_are_refused(tmp_path):
    source = SyntheticShapes(10, image_size=32)
    write_shards(source, tmp_path, samples_per_shard=10, image_format="png")
    (tmp_path / "options.json").unlink()  # as a directory another tool wrote
    with pytest.raises(ValueError, match="no options.json"):
        write_shards(source, tmp_path, samples_per_shard=10, image_format="png")


def test_jpeg_quality_option_changes_encoding(tmp_path):
    source = SyntheticShapes(4, image_size=64)
    write_shards(source, tmp_path / "low", samples_per_shard=4, image_format="jpg", quality=20)
    write_shards(source, tmp_path / "high", samples_per_shard=4, image_format="jpg", quality=95)
    low, high = (sum(len(s["jpg"]) for s in read_shard(tmp_path / d / "00000.tar").values()) for d in ("low", "high"))
    assert low < high


def test_bad_writer_options_raise(tmp_path):
    source = SyntheticShapes(4, image_size=32)
    with pytest.raises(ValueError, match="image_format"):
        write_shards(source, tmp_path, image_format="bmp")
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards(source, tmp_path, samples_per_shard=0)


def test_parallel_writing_gives_the_same_shards(tmp_path):
    source = SyntheticShapes(40, image_size=32)
    write_shards(source, tmp_path / "one", samples_per_shard=10, image_format="png", workers=1)
    write_shards(source, tmp_path / "two", samples_per_shard=10, image_format="png", workers=2)
    for name in ("00000.tar", "00003.tar"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.fixture
def image_folder(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.jpg").write_bytes(encode(gradient_image(40, 30)))
    gradient_image(20, 20, "L").save(images / "sub" / "b.png")
    (images / "broken.jpg").write_bytes(encode(gradient_image(40, 30))[:200])
    return images


def test_folder_source_from_jsonl_copies_matching_files_and_skips_broken_or_missing_ones(tmp_path, image_folder):
    captions = tmp_path / "captions.jsonl"
    rows = [{"file": "a.jpg", "caption": "a gradient", "license": "cc0"},
            {"file": "sub/b.png", "caption": "a grey square"},
            {"file": "broken.jpg", "caption": "cut short"},
            {"file": "gone.jpg", "caption": "never there"}]
    captions.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    report = write_shards(FolderSource(image_folder, captions), tmp_path / "out", samples_per_shard=10)

    assert report.samples == 2 and report.skipped == {"corrupt_image": 1, "missing_image": 1}
    samples = read_shard(tmp_path / "out" / "00000.tar")
    assert samples["000000"]["jpg"] == (image_folder / "a.jpg").read_bytes()  # already JPEG: copied as is
    record = json.loads(samples["000000"]["json"])
    assert (record["file"], record["license"], record["width"], record["height"]) == ("a.jpg", "cc0", 40, 30)
    assert Image.open(io.BytesIO(samples["000001"]["jpg"])).format == "JPEG"  # PNG re-encoded
    assert count_samples(tmp_path / "out" / "00000.tar") == 2


def test_rerun_reports_the_skips_of_the_shards_it_keeps(tmp_path, image_folder):
    captions = tmp_path / "captions.jsonl"
    rows = [{"file": "a.jpg", "caption": "fine"}, {"file": "gone.jpg", "caption": "missing"},
            {"file": "broken.jpg", "caption": "cut"}, {"file": "sub/b.png", "caption": "fine too"}]
    captions.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first = write_shards(FolderSource(image_folder, captions), tmp_path / "out", samples_per_shard=2)

    again = write_shards(FolderSource(image_folder, captions), tmp_path / "out", samples_per_shard=2)

    assert first.skipped == again.skipped == {"missing_image": 1, "corrupt_image": 1}
    assert (again.written, again.existing, again.samples) == (0, 2, 2)


def test_a_shard_whose_samples_are_all_skipped_is_not_written(tmp_path, image_folder):
    captions = tmp_path / "captions.jsonl"
    rows = [{"file": "a.jpg", "caption": "fine"}, {"file": "gone.jpg", "caption": "missing"},
            {"file": "broken.jpg", "caption": "cut"}, {"file": "sub/b.png", "caption": "fine too"}]
    captions.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    report = write_shards(FolderSource(image_folder, captions), tmp_path / "out", samples_per_shard=1)

    assert (report.written, report.empty, report.samples) == (2, 2, 2)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar", "00003.tar"]
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 1, "00003.tar": 1}


def test_a_source_whose_samples_are_all_skipped_is_refused_and_writes_no_shard(tmp_path, image_folder):
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"file": "gone.jpg", "caption": "x"}\n{"file": "also/gone.png", "caption": "y"}\n')
    with pytest.raises(ValueError, match="every one of the 2 samples was skipped \\(missing_image: 2\\)"):
        write_shards(FolderSource(image_folder, captions), tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.tar")) and not (tmp_path / "out" / "sizes.json").exists()


def test_folder_source_reads_csv_and_rejects_rows_without_caption(tmp_path, image_folder):
    captions = tmp_path / "captions.csv"
    with captions.open("w", newline="") as f:
        csv.writer(f).writerows([["file", "caption"], ["a.jpg", "first"], ["sub/b.png", "second"]])
    assert [FolderSource(image_folder, captions)[i].caption for i in range(2)] == ["first", "second"]

    captions.write_text("file,caption\na.jpg,\n")
    with pytest.raises(ValueError, match="row 1"):
        FolderSource(image_folder, captions)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        FolderSource(image_folder, tmp_path / "missing.jsonl")


@pytest.mark.parametrize("name, text", [("captions.csv", "file,caption\na.jpg,first\n"),
                                        ("captions.jsonl", '{"file": "a.jpg", "caption": "first"}\n')])
def test_captions_saved_with_a_byte_order_mark_are_read(tmp_path, image_folder, name, text):
    captions = tmp_path / name
    captions.write_bytes(b"\xef\xbb\xbf" + text.encode())  # what spreadsheet programs put first
    source = FolderSource(image_folder, captions)
    assert (source[0].caption, source[0].meta["file"]) == ("first", "a.jpg")


def test_coco_source_keeps_every_caption_and_orders_by_image_id(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    for image_id in (42, 7, 9):
        gradient_image(64, 48).save(images / f"COCO_val2014_{image_id:012d}.jpg")
    annotations = {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 64, "height": 48} for i in (42, 7, 9)],
        "annotations": [
            {"id": 1, "image_id": 42, "caption": "A dog  on a couch."},
            {"id": 2, "image_id": 7, "caption": "A cat."},
            {"id": 3, "image_id": 42, "caption": "A brown dog resting."},
        ],
    }
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(annotations))

    report = write_shards(CocoSource(path, images), tmp_path / "out", samples_per_shard=10)

    assert report.samples == 2 and report.skipped == {"missing_caption": 1}  # image 9 has no caption
    samples = read_shard(tmp_path / "out" / "00000.tar")
    assert sorted(samples) == ["000000", "000002"]  # ordered by id: 7, (9), 42
    first, second = (json.loads(samples[k]["json"]) for k in ("000000", "000002"))
    assert (first["image_id"], second["image_id"]) == (7, 42)
    assert second["captions"] == ["A dog on a couch.", "A brown dog resting."]
    assert samples["000002"]["txt"].decode() == "A dog on a couch."

    path.write_text(json.dumps({"info": {}}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        CocoSource(path, images)
