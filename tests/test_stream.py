import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.stream import CaptionImageStream, check_shards, expand_urls, shard_sizes
from tests.samples import encode, gradient_image, img2dataset_samples, write_wds_shard


def make_stream(urls, captions, samples_per_epoch=120, batch_size=4, **options):
    return CaptionImageStream(urls, captions, samples_per_epoch=samples_per_epoch, batch_size=batch_size,
                              image_size=options.pop("image_size", 32), **options)


def all_keys(stream) -> list[str]:
    return [key for batch in stream for key in batch["keys"]]


def test_batches_hold_uint8_images_caption_ids_and_keys(shapes_urls, caption_tokenizer):
    batch = next(iter(make_stream(shapes_urls, caption_tokenizer)))

    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["text_ids"].shape == (4, 24) and batch["text_ids"].dtype == torch.long
    assert batch["text_mask"].dtype == torch.bool and batch["text_mask"][:, 0].all()
    assert len(batch["captions"]) == len(batch["keys"]) == 4
    assert batch["stats"] == {}


def test_one_epoch_without_shuffle_reads_every_sample_once(shapes_urls, caption_tokenizer):
    keys = all_keys(make_stream(shapes_urls, caption_tokenizer, shuffle=False))
    assert len(keys) == 120 and len(set(keys)) == 120


def test_same_seed_gives_same_order_and_epochs_differ(shapes_urls, caption_tokenizer):
    first, second = make_stream(shapes_urls, caption_tokenizer), make_stream(shapes_urls, caption_tokenizer)
    assert all_keys(first) == all_keys(second)
    second.set_epoch(1)
    assert all_keys(second) != all_keys(first)
    assert all_keys(make_stream(shapes_urls, caption_tokenizer, seed=1)) != all_keys(first)


def test_two_ranks_over_uneven_shards_get_disjoint_samples_and_equal_batch_counts(shapes_urls, caption_tokenizer):
    # shards of 50, 50 and 20 samples: rank 0 reads two of them, rank 1 one, whatever the shuffle
    ranks = [make_stream(shapes_urls, caption_tokenizer, rank=r, world_size=2, shuffle_buffer=10) for r in range(2)]
    for epoch in range(3):
        for stream in ranks:
            stream.set_epoch(epoch)
        batches = [list(stream) for stream in ranks]
        assert len(batches[0]) == len(batches[1]) == len(ranks[0]) == 120 // (2 * 4)
        keys = [{k for batch in rank_batches for k in batch["keys"]} for rank_batches in batches]
        assert not keys[0] & keys[1]


def test_fewer_shards_than_slots_splits_by_sample(shapes_urls, caption_tokenizer):
    ranks = [make_stream(shapes_urls[:1], caption_tokenizer, samples_per_epoch=48, rank=r, world_size=4, shuffle=False)
             for r in range(4)]
    keys = [all_keys(stream) for stream in ranks]
    assert [len(k) for k in keys] == [12] * 4
    assert len(set().union(*map(set, keys))) == 48


def test_loader_workers_split_shards_and_yield_the_epoch_length(shapes_urls, caption_tokenizer):
    stream = make_stream(shapes_urls, caption_tokenizer, batch_size=5, shuffle=False)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    keys = [key for batch in loader for key in batch["keys"]]
    assert len(loader) == 24 and len(keys) == 120
    assert len(set(keys)) > 60  # two workers read different shards; the one with less data starts over


def test_resampled_mode_yields_the_epoch_length(shapes_urls, caption_tokenizer):
    stream = make_stream(shapes_urls, caption_tokenizer, samples_per_epoch=64, resampled=True, rank=1, world_size=2)
    assert len(list(stream)) == 8


def test_random_crops_are_reproducible(shapes_urls, caption_tokenizer):
    def images(seed):
        stream = make_stream(shapes_urls, caption_tokenizer, samples_per_epoch=8, random_crop=True, seed=seed, image_size=24)
        return torch.cat([b["images"] for b in stream])

    assert torch.equal(images(0), images(0))
    assert not torch.equal(images(0), images(1))


def test_reads_img2dataset_shards_written_by_webdataset(tmp_path, caption_tokenizer):
    write_wds_shard(tmp_path / "00000.tar", img2dataset_samples(0, 6))
    write_wds_shard(tmp_path / "00001.tar", img2dataset_samples(1, 4))
    for shard, count in ((0, 6), (1, 4)):
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps({"count": count + 1, "successes": count}))
    urls = expand_urls(str(tmp_path / "{00000..00001}.tar"))

    assert shard_sizes(urls) == [6, 4]
    batches = list(make_stream(urls, caption_tokenizer, samples_per_epoch=10, batch_size=5, shuffle=False))
    expected = [f"{shard:05d}{index:04d}" for shard, count in ((0, 6), (1, 4)) for index in range(count)]
    assert sorted(k for b in batches for k in b["keys"]) == expected
    assert "photo number 0 of shard 0" in batches[0]["captions"] + batches[1]["captions"]


def test_bad_samples_are_skipped_and_counted(tmp_path, caption_tokenizer):
    good = img2dataset_samples(0, 4)
    jpeg = encode(gradient_image(64, 64))
    rgba = gradient_image(40, 40, "RGBA")
    cmyk = gradient_image(40, 40, "CMYK")
    sixteen_bit = Image.fromarray((np.arange(48 * 48).reshape(48, 48) * 28).astype(np.uint16))
    bad = [
        {"__key__": "truncated", "jpg": jpeg[: len(jpeg) // 3], "txt": "cut short"},
        {"__key__": "garbage", "png": b"not an image at all", "txt": "noise"},
        {"__key__": "empty", "webp": b"", "txt": "nothing"},
        {"__key__": "uncaptioned", "jpg": jpeg},
        {"__key__": "blankcaption", "jpg": jpeg, "txt": "   "},
        {"__key__": "textonly", "txt": "a caption without an image"},
        {"__key__": "jsoncaption", "jpeg": jpeg, "json": json.dumps({"caption": "from the json"})},
        {"__key__": "rgba", "png": encode(rgba, "PNG"), "txt": "transparent"},
        {"__key__": "cmyk", "jpg": encode(cmyk), "txt": "print colours"},
        {"__key__": "greyscale16", "png": encode(sixteen_bit, "PNG"), "txt": "sixteen bits"},
        {"__key__": "palette", "png": encode(gradient_image(30, 50).convert("P"), "PNG"), "txt": "palette"},
    ]
    write_wds_shard(tmp_path / "00000.tar", good + bad)

    batch = next(iter(make_stream([str(tmp_path / "00000.tar")], caption_tokenizer, samples_per_epoch=9,
                                  batch_size=9, shuffle=False)))

    assert batch["stats"] == {"corrupt_image": 3, "missing_caption": 2, "missing_image": 1}
    assert set(batch["keys"]) == {s["__key__"] for s in good} | {"jsoncaption", "rgba", "cmyk", "greyscale16", "palette"}
    assert "from the json" in batch["captions"]


def test_bad_samples_are_counted_in_the_batch_they_were_skipped_for(tmp_path, caption_tokenizer):
    broken = {"__key__": "broken", "png": b"not a png", "txt": "broken"}
    samples = img2dataset_samples(0, 4) + [broken, {**broken, "__key__": "broken2"}] + img2dataset_samples(1, 4)
    write_wds_shard(tmp_path / "00000.tar", samples)
    stream = make_stream([str(tmp_path / "00000.tar")], caption_tokenizer, samples_per_epoch=8, shuffle=False)
    assert [batch["stats"] for batch in stream] == [{}, {"corrupt_image": 2}]


def test_truncated_captions_are_counted(shapes_urls):
    from datamodules.text import CaptionTokenizer

    batch = next(iter(make_stream(shapes_urls, CaptionTokenizer(text_length=6))))
    assert batch["stats"]["truncated_captions"] == 4
    assert (batch["text_ids"][:, -1] == 49407).all()


def test_shards_of_only_bad_samples_raise_instead_of_spinning(tmp_path, caption_tokenizer, monkeypatch):
    monkeypatch.setattr("datamodules.stream.MAX_CONSECUTIVE_SKIPS", 100)
    write_wds_shard(tmp_path / "00000.tar", [{"__key__": f"k{i}", "png": b"broken", "txt": "x"} for i in range(5)])
    with pytest.raises(RuntimeError, match="bad samples in a row"):
        next(iter(make_stream([str(tmp_path / "00000.tar")], caption_tokenizer, samples_per_epoch=4)))


def test_empty_shards_raise_instead_of_spinning(tmp_path, caption_tokenizer):
    write_wds_shard(tmp_path / "00000.tar", [])
    with pytest.raises(RuntimeError, match="found no samples"):
        next(iter(make_stream([str(tmp_path / "00000.tar")], caption_tokenizer, samples_per_epoch=4)))


def test_missing_or_unreadable_shard_is_named_at_setup(tmp_path, shapes_urls):
    missing = str(tmp_path / "00042.tar")
    with pytest.raises(FileNotFoundError, match="00042.tar does not exist: write them with `tessera shards"):
        check_shards(shapes_urls + [missing])
    (tmp_path / "00043.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(OSError, match="00043.tar"):
        check_shards([str(tmp_path / "00043.tar")])


def test_brace_patterns_and_lists_expand(tmp_path):
    assert expand_urls("/d/{000..002}.tar::/e/x.tar") == ["/d/000.tar", "/d/001.tar", "/d/002.tar", "/e/x.tar"]
    assert expand_urls(["/a/{0..1}.tar", "pipe:cat /b/0.tar"]) == ["/a/0.tar", "/a/1.tar", "pipe:cat /b/0.tar"]


def test_a_directory_stands_for_its_shards_in_name_order(tmp_path, shapes_dir):
    assert expand_urls(str(shapes_dir)) == [str(shapes_dir / f"{index:05d}.tar") for index in range(3)]
    assert expand_urls(f"{shapes_dir}::/e/x.tar")[-1] == "/e/x.tar"
    with pytest.raises(FileNotFoundError, match="holds no .tar shards: write them with `tessera shards"):
        expand_urls(str(tmp_path))


def test_pipe_urls_are_read(shapes_urls, caption_tokenizer):
    urls = [f"pipe:cat {url}" for url in shapes_urls]
    assert shard_sizes(urls) == [None, None, None]
    keys = all_keys(make_stream(urls, caption_tokenizer, shuffle=False))
    assert len(set(keys)) == 120
