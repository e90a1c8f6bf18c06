import json
import tarfile

import pytest

from datamodules.check import check_shards
from tessera.commands.cli import main
from tests.samples import encode, gradient_image, img2dataset_samples, write_wds_shard


@pytest.fixture
def mixed_shards(tmp_path):
    """Two shards: 5 good 96x80 samples + 2 bad ones, and 3 good 40x60 ones."""
    jpeg = encode(gradient_image(50, 50))
    bad = [{"__key__": "cut", "jpg": jpeg[:100], "txt": "truncated"}, {"__key__": "silent", "jpg": jpeg}]
    write_wds_shard(tmp_path / "00000.tar", img2dataset_samples(0, 5) + bad)
    write_wds_shard(tmp_path / "00001.tar", img2dataset_samples(1, 3, size=(40, 60)))
    return tmp_path


def test_data_check_counts_samples_skips_sizes_and_long_captions(mixed_shards):
    report = check_shards(str(mixed_shards / "{00000..00001}.tar"), text_length=7, workers=1)

    assert (report["shards"], report["samples"], report["readable"]) == (2, 10, 8)
    assert report["skipped"] == {"corrupt_image": 1, "missing_caption": 1}
    assert report["image_size"] == {"min": 40, "median": 80.0, "max": 80}
    # "photo number N of shard S": 6 words, start and end tokens
    assert report["caption_tokens"] == {"min": 8, "median": 8.0, "max": 8}
    assert report["over_text_length"] == 8
    assert report["unreadable_shards"] == {}


def test_data_check_command_prints_json_and_fails_on_a_missing_shard(mixed_shards, capsys):
    assert main(["data", "check", str(mixed_shards / "00000.tar"), "--workers", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"shards", "samples", "readable", "skipped", "image_size", "caption_tokens", "over_text_length"}
    assert report["over_text_length"] == 0

    assert main(["data", "check", str(mixed_shards / "{00000..00002}.tar")]) == 1
    report = json.loads(capsys.readouterr().out)
    assert list(report["unreadable_shards"]) == [str(mixed_shards / "00002.tar")]
    assert report["readable"] == 8


@pytest.mark.parametrize("tail", [b"", b"\x7f" * 700], ids=["cut", "garbled"])
def test_data_check_reports_a_cut_or_garbled_tar(tmp_path, capsys, tail):
    good = tmp_path / "00000.tar"
    write_wds_shard(good, img2dataset_samples(0, 4))
    (tmp_path / "00001.tar").write_bytes(good.read_bytes()[:5000] + tail)
    assert main(["data", "check", str(tmp_path / "{00000..00001}.tar"), "--workers", "1"]) == 1
    assert list(json.loads(capsys.readouterr().out)["unreadable_shards"]) == [str(tmp_path / "00001.tar")]


def test_data_check_reports_a_shard_shorter_than_its_size_record(tmp_path, capsys):
    write_wds_shard(tmp_path / "00000.tar", img2dataset_samples(0, 4))
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 5}))
    assert main(["data", "check", str(tmp_path / "00000.tar"), "--workers", "1"]) == 1
    assert "says 5" in json.loads(capsys.readouterr().out)["unreadable_shards"][str(tmp_path / "00000.tar")]


@pytest.mark.parametrize("make", [lambda path: tarfile.open(path, "w").close(), lambda path: path.write_bytes(b"")],
                         ids=["no-members", "zero-bytes"])
def test_data_check_flags_an_empty_shard(tmp_path, capsys, make):
    write_wds_shard(tmp_path / "00000.tar", img2dataset_samples(0, 2))
    make(tmp_path / "00001.tar")
    assert main(["data", "check", str(tmp_path / "{00000..00001}.tar"), "--workers", "1"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert list(report["unreadable_shards"]) == [str(tmp_path / "00001.tar")]
    assert "empty" in report["unreadable_shards"][str(tmp_path / "00001.tar")]


def test_shards_folder_command_refuses_captions_whose_images_are_all_missing(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.csv").write_text("file,caption\na.jpg,one\nb.jpg,two\n")
    with pytest.raises(SystemExit) as refused:
        main(["shards", "folder", "--images", str(tmp_path / "images"), "--captions", str(tmp_path / "captions.csv"),
              "--out", str(tmp_path / "out")])
    assert "every one of the 2 samples was skipped (missing_image: 2)" in str(refused.value.code)
    assert not list((tmp_path / "out").glob("*.tar"))


def test_shards_command_refuses_other_options_until_overwrite(tmp_path, capsys):
    command = ["shards", "synthetic", "--out", str(tmp_path), "--num-samples", "6", "--image-size", "32"]
    assert main(command + ["--samples-per-shard", "3"]) == 0
    with pytest.raises(SystemExit) as refused:
        main(command + ["--samples-per-shard", "2"])
    assert "samples_per_shard: 3 there, 2 now" in str(refused.value.code) and "--overwrite" in str(refused.value.code)

    assert main(command + ["--samples-per-shard", "2", "--overwrite"]) == 0
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 2}
    assert check_shards(str(tmp_path / "{00000..00002}.tar"), workers=1)["readable"] == 6


def test_shards_synthetic_command_writes_a_checkable_dataset(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["shards", "synthetic", "--out", str(out), "--num-samples", "30", "--image-size", "32",
                 "--samples-per-shard", "16", "--seed", "5"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["samples"] == 30
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 16, "00001.tar": 14}
    report = check_shards(str(out / "{00000..00001}.tar"), workers=1)
    assert report["readable"] == 30 and report["image_size"]["min"] == 32


def test_shards_synthetic_jitter_flag_reaches_the_samples(tmp_path, capsys):
    for flags in ([], ["--jitter"]):
        out = tmp_path / ("jittered" if flags else "centred")
        assert main(["shards", "synthetic", "--out", str(out), "--num-samples", "2", "--image-size", "32", *flags]) == 0
        with tarfile.open(out / "00000.tar") as tar:
            records = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
        assert len(records) == 2 and all(record["jitter"] == bool(flags) for record in records)


def test_a_single_value_option_given_twice_is_refused(tmp_path, capsys):
    # argparse alone would keep the second value and drop the first without a word
    with pytest.raises(SystemExit):
        main(["shards", "synthetic", "--out", str(tmp_path / "a"), "--seed", "1", "--seed", "2"])
    assert "--seed was given twice" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert "usage: tessera" in capsys.readouterr().err
