import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.caption_image import EpochLoader
from datamodules.stream import (
    CaptionImageStream, CaptionTokenStream, check_shards, deal_shards, expand_urls, shard_sizes, without_padding,
)
from tests.samples import encode, gradient_image, img2dataset_samples, img2dataset_shards_with_bad_samples, write_wds_shard


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
    # shards of 50, 50 and 20 samples: one rank reads 50 + 20 of them, the other 50, whatever the shuffle
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
    # one worker reads 70 samples, the other 50 and then 10 of them again
    assert len(set(keys)) == 110 and sorted(Counter(Counter(keys).values()).items()) == [(1, 100), (2, 10)]


def test_uneven_shards_are_dealt_by_their_recorded_sizes():
    sizes = {"a": 50, "b": 50, "c": 20, "d": None}
    assert deal_shards(["a", "b", "c"], sizes, 2) == [["a", "c"], ["b"]]  # 70 and 50, not 100 and 20
    assert deal_shards(["c", "a", "b"], sizes, 2) == [["c", "b"], ["a"]]
    assert deal_shards(["a", "b", "c", "d"], dict.fromkeys("abcd", 7), 2) == [["a", "c"], ["b", "d"]]  # round-robin
    assert deal_shards(["c", "d", "a"], sizes, 2) == [["c", "a"], ["d"]]  # d counts as the mean, 40


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


def test_a_rank_short_of_good_samples_repeats_them_once_and_counts_repeats_and_skips_once(tmp_path, caption_tokenizer):
    # both shards record 8 samples; rank 1's holds 5 good ones and 3 that cannot be decoded
    urls = img2dataset_shards_with_bad_samples(tmp_path, [(8, 0), (5, 3)])
    ranks = [make_stream(urls, caption_tokenizer, samples_per_epoch=16, rank=r, world_size=2, shuffle=False) for r in range(2)]
    batches = [list(stream) for stream in ranks]

    assert [len(b) for b in batches] == [2, 2]
    short = [key for batch in batches[1] for key in batch["keys"]]
    assert len(short) == 8 and len(set(short)) == 5
    stats = sum((Counter(batch["stats"]) for batch in batches[1]), Counter())
    # the second pass met the first bad sample again, and did not count it again
    assert stats == {"repeated_samples": 3, "corrupt_image": 3}
    assert all(batch["stats"] == {} for batch in batches[0])


def test_a_rank_that_would_need_a_third_pass_over_its_shards_raises_naming_them(tmp_path, caption_tokenizer):
    # one good sample, recorded as 4, would fill two batches of 4
    urls = img2dataset_shards_with_bad_samples(tmp_path, [(4, 0), (1, 3)])
    stream = make_stream(urls, caption_tokenizer, samples_per_epoch=16, rank=1, world_size=2, shuffle=False)
    with pytest.raises(RuntimeError, match=r"00001\.tar.*twice this epoch.*train_samples"):
        list(stream)


def test_shards_without_a_good_sample_raise_naming_them(tmp_path, caption_tokenizer):
    urls = img2dataset_shards_with_bad_samples(tmp_path, [(4, 0), (0, 5)])
    stream = make_stream(urls, caption_tokenizer, samples_per_epoch=8, rank=1, world_size=2, shuffle=False)
    with pytest.raises(RuntimeError, match=r"no sample of its shards \[.*00001\.tar'\] can be used"):
        next(iter(stream))


def test_resampled_shards_of_only_bad_samples_raise_instead_of_spinning(tmp_path, caption_tokenizer, monkeypatch):
    monkeypatch.setattr("datamodules.stream.MAX_CONSECUTIVE_SKIPS", 100)
    write_wds_shard(tmp_path / "00000.tar", [{"__key__": f"k{i}", "png": b"broken", "txt": "x"} for i in range(5)])
    with pytest.raises(RuntimeError, match="bad samples in a row"):
        next(iter(make_stream([str(tmp_path / "00000.tar")], caption_tokenizer, samples_per_epoch=4, resampled=True)))


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


# --- validation ------------------------------------------------------------------------------


def validation_ranks(urls, captions, world_size: int, num_workers: int, batch_size: int, **options) -> list[list[dict]]:
    """Each rank's validation batches, read through the loader the datamodule uses, which says how many there are."""
    ranks = []
    for rank in range(world_size):
        stream = make_stream(urls, captions, batch_size=batch_size, rank=rank, world_size=world_size, validation=True,
                             **options)
        loader = EpochLoader(stream, 0, num_workers=num_workers)
        ranks.append(list(loader))
        assert len(ranks[-1]) == len(loader)
    return ranks


@pytest.mark.parametrize("shards, world_size, num_workers, batch_size", [
    (4, 2, 0, 4),  # by shard: 4 shards for 2 slots
    (4, 2, 2, 3),  # by shard, a slot per loader worker
    (1, 3, 0, 2),  # by sample: fewer shards than slots
])
def test_validation_reads_every_good_sample_once_over_the_ranks(tmp_path, caption_tokenizer, shards, world_size,
                                                                   num_workers, batch_size):
    layout = [(9, 2), (3, 1), (6, 0), (1, 3)][:shards]  # uneven, with samples that cannot be decoded
    urls = img2dataset_shards_with_bad_samples(tmp_path, layout)
    recorded = sum(good + bad for good, bad in layout)
    ranks = validation_ranks(urls, caption_tokenizer, world_size, num_workers, batch_size, samples_per_epoch=recorded)

    assert len({len(batches) for batches in ranks}) == 1  # every rank runs as many steps
    real = [key for batches in ranks for batch in batches for key in without_padding(batch)["keys"]]
    expected = [f"{shard:05d}{i:04d}" for shard, (good, _) in enumerate(layout) for i in range(good)]
    assert sorted(real) == expected  # each good sample exactly once
    for batch in (batch for batches in ranks for batch in batches):
        real_rows = int(batch["valid"].sum())
        assert batch["valid"][:real_rows].all() and batch["keys"][real_rows:] == [""] * (batch_size - real_rows)
        assert batch["images"].shape == (batch_size, 3, 32, 32)


def test_validation_with_a_sample_count_reads_that_many_first_samples(tmp_path, caption_tokenizer):
    urls = img2dataset_shards_with_bad_samples(tmp_path, [(9, 2), (3, 1)])  # 15 recorded
    ranks = validation_ranks(urls, caption_tokenizer, 2, 0, 4, samples_per_epoch=6)
    real = [key for batches in ranks for batch in batches for key in without_padding(batch)["keys"]]
    assert sorted(real) == [f"00000{i:04d}" for i in range(5)]  # the first 6 samples: a bad one and 5 good


def test_validation_shards_holding_more_than_their_records_raise_naming_them(tmp_path, caption_tokenizer):
    urls = img2dataset_shards_with_bad_samples(tmp_path, [(5, 0), (3, 0)])
    (tmp_path / "00001_stats.json").write_text(json.dumps({"successes": 2}))
    with pytest.raises(ValueError, match=r"00001\.tar.*more samples than their size records"):
        validation_ranks(urls, caption_tokenizer, 2, 0, 4, samples_per_epoch=7)


def test_a_token_validation_slot_without_samples_pads_in_the_shards_id_grid(tmp_path, caption_tokenizer):
    def ids() -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, np.ones((4, 4), dtype=np.uint16))
        return buffer.getvalue()

    write_wds_shard(tmp_path / "00000.tar", [{"__key__": str(i), "tokens.npy": ids(), "txt": "a red circle"} for i in range(3)])
    streams = [CaptionTokenStream([str(tmp_path / "00000.tar")], caption_tokenizer, samples_per_epoch=3, batch_size=2,
                                  rank=rank, world_size=4, validation=True) for rank in range(4)]
    batches = [list(stream) for stream in streams]
    assert [len(b) for b in batches] == [1, 1, 1, 1]
    last = batches[3][0]  # samples 0, 1 and 2 went to ranks 0, 1 and 2
    assert not last["valid"].any() and last["image_ids"].shape == (2, 4, 4)
