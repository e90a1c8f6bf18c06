"""The caption-image stream: WebDataset shards -> decoded, cropped, tokenized batches.

Every (rank, worker) pair is a *slot*. Each epoch the shard list is shuffled with the seed and
the epoch and dealt to the slots in that order, each shard to the slot with the fewest recorded
samples so far (round-robin when the shards are the same size), so slots see disjoint data and
about the same amount of it. With fewer shards than slots every slot reads every shard and keeps
every S-th sample instead. In resampled mode each slot draws shards at random, with replacement,
forever.

Every slot yields a fixed number of batches per epoch, whatever the shard sizes and however
many bad samples were skipped, so every rank yields the same number of batches and DDP never
waits on a rank that has stopped. An epoch is `samples_per_epoch` rounded down to whole global
batches. The count comes from the shards' size records, which also count samples that cannot
be decoded, so a slot may run out: it then starts a second pass over its own shards, reordered,
and counts every sample it takes from it under "repeated_samples". A second pass is the bound:
a slot that would need a third (fewer decodable samples than half its share) stops with an
error that names its shards, and so does one without a single decodable sample. Bad samples
are counted on the first pass only, once per epoch, not again at every re-reading.

Validation (`validation=True`) reads every sample exactly once over all ranks: one pass, in
order, without shuffling, split between slots as above (by shard when the size records add up
to `samples_per_epoch`, else the first `samples_per_epoch` samples by sample). Each slot yields
as many batches as the fullest slot needs; the rows that fill them out are padding, marked
False in the batch's "valid" mask (they come after the real rows), and `without_padding` drops
them.

All randomness comes from Python RNGs of the stream's own, never the global ones: shard order
from (seed, epoch), the sample shuffle buffer from (seed, epoch, rank, worker), a random crop
from (seed, epoch, sample). So a run is reproducible for a given number of ranks and workers.
The shuffle buffer empties at the end of each pass, so no sample comes twice before every one
has come once.

Resume. Each batch carries its "position": the worker whose data it is and how many raw samples
(good and bad) that worker has drawn from its shuffled stream so far. The loader records the
positions of the batches training has used (see `EpochLoader` in caption_image.py) and hands
them back through `resume`; each worker then rebuilds its shuffled stream for the epoch, draws
and drops that many raw samples without decoding them (reading tar bytes only, so replaying is
far cheaper than training on them), and yields the batches it had left. The loader reads its
workers round-robin from worker 0, so after b batches worker w takes on the data of worker
(w + b) % W, which keeps the order of the uninterrupted run.

Bad samples (corrupt, missing or oversized image, missing caption) are skipped and counted; each batch
carries the counts since the slot's previous batch under "stats", so the training process can
log them although they happen in worker processes.
"""

from __future__ import annotations

import heapq
import io
import itertools
import json
import logging
import math
import multiprocessing
import random
import tarfile
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.images import DECODE_ERRORS, IMAGE_EXTENSIONS, MAX_PIXELS, decode_image, resize_and_crop, skip_reason
from datamodules.shard_writer import SIZES_FILE
from datamodules.text import CaptionTokenizer

log = logging.getLogger(__name__)

# what a batch's "stats" may count: samples skipped, by reason, and captions cut to fit
STAT_NAMES = (
    "missing_image", "missing_caption", "corrupt_image", "oversized_image", "missing_tokens", "corrupt_tokens",
    "unreadable_shard_data", "truncated_captions",
)
# and the samples a slot took from a second pass over its shards (see the module's docstring)
REPEATED = "repeated_samples"
# a stream that skips this many samples in a row is broken, not unlucky: stop rather than spin
MAX_CONSECUTIVE_SKIPS = 10_000


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard URLs from brace patterns (`/data/{00000..00331}.tar`), `::`-joined lists or lists of
    those; a local directory stands for the `*.tar` shards in it, in name order."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    return [url for pattern in patterns for item in wds.shardlists.expand_urls(str(pattern)) for url in directory_shards(item)]


def directory_shards(url: str) -> list[str]:
    """[url], or the shards of a local directory (an empty one is an error that says so)."""
    path = Path(url.removeprefix("file:"))
    if not is_local(url) or not path.is_dir():
        return [url]
    shards = sorted(str(shard) for shard in path.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{path} holds no .tar shards: {WRITE_SHARDS_HINT}")
    return shards


# what an error about missing shards tells a user to do
WRITE_SHARDS_HINT = (
    "write them with `tessera shards synthetic|folder|coco --out DIR` (`tessera quickstart` writes "
    "quickstart/data/train and quickstart/data/val), or point the config at your own shards"
)


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def check_shards(urls: list[str]) -> None:
    """Fail at setup, naming the shard, if a local shard is missing or is not a tar file."""
    if not urls:
        raise ValueError("no shards given")
    for url in filter(is_local, urls):
        path = Path(url.removeprefix("file:"))
        if not path.is_file():
            raise FileNotFoundError(f"shard {url} does not exist: {WRITE_SHARDS_HINT}")
        try:
            with tarfile.open(path) as tar:
                tar.next()
        except (tarfile.TarError, OSError) as error:
            raise OSError(f"shard {url} is not a readable tar file: {error}") from error


def shard_sizes(urls: list[str]) -> list[int | None]:
    """Samples per shard from our `sizes.json` or img2dataset's `NNNNN_stats.json`; None where unknown."""
    sizes_files: dict[Path, dict] = {}
    sizes: list[int | None] = []
    for url in urls:
        if not is_local(url):
            sizes.append(None)
            continue
        path = Path(url.removeprefix("file:"))
        if path.parent not in sizes_files:
            sizes_file = path.parent / SIZES_FILE
            sizes_files[path.parent] = _read_json(sizes_file) if sizes_file.is_file() else {}
        size = sizes_files[path.parent].get(path.name)
        stats_file = path.with_name(f"{path.stem}_stats.json")
        if size is None and stats_file.is_file():
            size = _read_json(stats_file).get("successes")
        sizes.append(size)
    return sizes


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def deal_shards(urls: list[str], sizes: dict[str, int | None], num_slots: int) -> list[list[str]]:
    """`urls` dealt in their order to `num_slots` slots, each to the slot with the fewest recorded
    samples so far (the lowest slot on a tie): round-robin when the shards are the same size, and
    no slot far short of the others when they are not. An unknown size counts as the known ones' mean."""
    known = [size for size in sizes.values() if size is not None]
    mean = sum(known) / len(known) if known else 1.0
    totals = [(0.0, slot) for slot in range(num_slots)]  # a heap of (samples so far, slot)
    dealt: list[list[str]] = [[] for _ in range(num_slots)]
    for url in urls:
        total, slot = heapq.heappop(totals)
        dealt[slot].append(url)
        size = sizes.get(url)
        heapq.heappush(totals, (total + (mean if size is None else size), slot))
    return dealt


def without_padding(batch: dict) -> dict:
    """The batch's real samples only: validation batches end in padding rows (their "valid" is
    False) so that every rank runs as many steps; a metric must not count them."""
    valid = batch.get("valid")
    if valid is None or bool(valid.all()):
        return batch
    keep = valid.tolist()

    def real_rows(value):
        if isinstance(value, torch.Tensor) and value.dim() and len(value) == len(keep):
            return value[valid]
        if isinstance(value, list) and len(value) == len(keep):
            return [item for item, real in zip(value, keep) if real]
        return value  # stats, position

    return {name: real_rows(value) for name, value in batch.items()}


def _names(shards: list[str]) -> str:
    return f"{shards[:3]}{'...' if len(shards) > 3 else ''}"


class CaptionImageStream(IterableDataset):
    """Batches of {"images": (B, 3, H, W) uint8, "text_ids": (B, L) long, "text_mask": (B, L) bool,
    "valid": (B,) bool (False on padding rows), "captions": [str], "keys": [str],
    "stats": {reason: count}, "position": {"worker": int, "items": int}} from caption-image shards.

    `validation`: read every sample once over all ranks, padding the last batches (see above).
    `sizes`: the shards' recorded sample counts, as `shard_sizes(urls)` reads them (then when None).

    `resume`, when set, makes the epoch it names pick up where a run left it:
    {"epoch": int, "batches": batches this rank had trained on, "workers": per worker of the
    loader {"batches": its batches trained on, "items": the "items" of the last of them}, or None
    to start the epoch's remaining batches afresh (the loader's worker count or world size changed)}.
    """

    def __init__(
        self,
        urls: list[str],
        captions: CaptionTokenizer,
        samples_per_epoch: int,
        batch_size: int,
        image_size: int = 256,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        random_crop: bool = False,
        resampled: bool = False,
        jpeg_draft: bool = True,
        max_pixels: int | None = MAX_PIXELS,
        rank: int | None = None,
        world_size: int | None = None,
        validation: bool = False,
        sizes: list[int | None] | None = None,
    ):
        if not urls:
            raise ValueError("no shards given")
        self.urls = list(urls)
        # recorded samples per shard (None where unknown): they deal shards evenly to the slots
        self.sizes = dict(zip(self.urls, shard_sizes(self.urls) if sizes is None else sizes))
        self.captions = captions
        self.batch_size = batch_size
        self.image_size = image_size
        self.seed = seed
        self.validation = validation
        self.shuffle = shuffle and not validation
        self.shuffle_buffer = shuffle_buffer if self.shuffle else 0
        self.random_crop = random_crop
        self.resampled = resampled
        self.jpeg_draft = jpeg_draft
        self.max_pixels = max_pixels
        if rank is None or world_size is None:
            initialized = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)
        self.rank, self.world_size = rank, world_size
        self.samples_per_epoch = samples_per_epoch
        # worker processes of the loader that reads this stream (EpochLoader sets it): a validation
        # run's batch count depends on how many slots share the samples
        self.loader_workers = 1
        # shared with worker processes, so set_epoch reaches persistent workers too
        self._epoch = multiprocessing.Value("q", 0, lock=False)
        self.resume: dict | None = None

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        if self.validation:
            return self.loader_workers * self._validation_plan(0, self.world_size * self.loader_workers)[3]
        return max(1, self.samples_per_epoch // (self.world_size * self.batch_size))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if self.validation:
            yield from self._validation_batches(worker, num_workers)
            return
        worker, num_batches, drawn = self._share(worker, num_workers)
        slot, num_slots = self.rank * num_workers + worker, self.world_size * num_workers
        shards, split_by_sample = self._slot_shards(slot, num_slots)
        stats: Counter = Counter()
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
        raw = self._raw_samples(shards, split_by_sample, slot, num_slots, stats, rng)
        replayed = deque(itertools.islice(raw, drawn), maxlen=1)  # replay what was drawn before a resume
        stats.clear()  # skips met while replaying were counted before the interruption
        # the last sample replayed was the last of a batch trained on: a good one
        last_good_pass = replayed[0]["__pass__"] if replayed else -1
        decoded = self._decoded(raw, stats, drawn, last_good_pass, shards, worker)
        for _ in range(num_batches):
            samples = [next(decoded) for _ in range(self.batch_size)]
            yield self._collate(samples, stats, worker)
            stats.clear()  # the batch took a copy; the readers keep counting into this one

    def _share(self, worker: int, num_workers: int) -> tuple[int, int, int]:
        """(the worker whose data this one yields, batches it yields this epoch, raw samples of that
        worker's stream already drawn before a resume)."""
        batches = len(self)
        resume = self.resume if self.resume is not None and self.resume["epoch"] == self.epoch else None
        if resume is None:
            return worker, batches // num_workers + (worker < batches % num_workers), 0
        done = resume["batches"]
        if resume["workers"] is None:  # positions of another layout: the remaining batches, afresh
            left = max(0, batches - done)
            return worker, left // num_workers + (worker < left % num_workers), 0
        # the loader asks workers for batches round-robin from worker 0, and the uninterrupted run's
        # next batch would have come from worker done % W: so worker w plays worker (w + done) % W
        playing = (worker + done) % num_workers
        position = resume["workers"][playing]
        share = batches // num_workers + (playing < batches % num_workers)
        return playing, share - position["batches"], position["items"]

    def _slot_shards(self, slot: int, num_slots: int) -> tuple[list[str], bool]:
        """(the shards this slot reads this epoch, whether it keeps only every num_slots-th sample of them)."""
        order = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        if len(order) < num_slots:
            return order, True
        return deal_shards(order, self.sizes, num_slots)[slot], False

    def _raw_samples(
        self, shards: list[str], split_by_sample: bool, slot: int, num_slots: int, stats: Counter, rng: random.Random
    ) -> Iterator[dict]:
        """Undecoded samples (dicts of extension -> bytes) for this slot, without end, each marked
        with the pass over the slot's shards it comes from ("__pass__"; always 0 when resampled)."""
        if self.resampled:
            draw = random.Random(f"{self.seed}:{self.epoch}:resampled:{slot}")
            samples = self._read(iter(lambda: draw.choice(self.urls), None), stats)
            yield from self._marked(self._shuffled(samples, rng), 0)
            return
        shards = list(shards)
        for pass_index in itertools.count():
            if pass_index and self.shuffle:
                random.Random(f"{self.seed}:{self.epoch}:pass{pass_index}").shuffle(shards)
            # a re-reading meets the same bad samples: they were counted on the first pass
            counts = stats if pass_index == 0 else Counter()
            samples = self._kept(self._read(shards, counts), split_by_sample, slot, num_slots)
            kept = 0
            for sample in self._marked(self._shuffled(samples, rng), pass_index):  # the buffer empties every pass
                kept += 1
                yield sample
            if kept == 0:
                raise RuntimeError(
                    f"slot {slot} of {num_slots} (rank x worker) found no samples in its shards "
                    f"{_names(shards)}: they are empty or unreadable, "
                    "or hold fewer samples than there are ranks x workers"
                )

    @staticmethod
    def _kept(samples: Iterator[dict], split_by_sample: bool, slot: int, num_slots: int) -> Iterator[dict]:
        """The slot's part of one reading of its shards: every sample, or every num_slots-th when split by sample."""
        for index, sample in enumerate(samples):
            if not split_by_sample or index % num_slots == slot:
                yield sample

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        return _shuffled(samples, self.shuffle_buffer, rng) if self.shuffle_buffer > 1 else samples

    @staticmethod
    def _marked(samples: Iterator[dict], pass_index: int) -> Iterator[dict]:
        for sample in samples:
            sample["__pass__"] = pass_index
            yield sample

    def _read(self, shards, stats: Counter) -> Iterator[dict]:
        def count_and_continue(error: Exception) -> bool:
            stats["unreadable_shard_data"] += 1
            log.warning("skipping unreadable shard data: %r", error)
            return True

        yield from wds.tarfile_samples(({"url": url} for url in shards), handler=count_and_continue)

    def _decoded(
        self, raw: Iterator[dict], stats: Counter, drawn: int, last_good_pass: int, shards: list[str], worker: int
    ) -> Iterator[tuple]:
        """(payload, caption, key, raw samples drawn so far) for each good sample, the first
        `drawn` already gone; bad ones are counted in stats, on their first pass only, and good
        ones from a second pass as repeated. `last_good_pass`: the pass of the last good sample
        before these (-1: none)."""
        consecutive_skips = 0
        for drawn, sample in enumerate(raw, start=drawn + 1):
            pass_index = sample["__pass__"]
            if pass_index > last_good_pass + 1:  # a whole pass without one good sample
                raise RuntimeError(
                    f"rank {self.rank}, loader worker {worker}: no sample of its shards {_names(shards)} can be "
                    f"used (skipped: {dict(stats)}); check them with `tessera data check`"
                )
            reason, payload, caption = self._decode(sample)
            if reason is not None:
                if pass_index == 0:
                    stats[reason] += 1
                consecutive_skips += 1
                if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                    raise RuntimeError(
                        f"{consecutive_skips} bad samples in a row (last: {reason} in {sample['__url__']}); "
                        f"skipped so far in this batch: {dict(stats)}"
                    )
                continue
            consecutive_skips = 0
            if pass_index >= 2:
                raise RuntimeError(
                    f"rank {self.rank}, loader worker {worker} has used every good sample of its shards "
                    f"{_names(shards)} twice this epoch and still needs more: they hold fewer than half of its share "
                    f"of the epoch's {self.samples_per_epoch} samples. That count comes from the shards' size records "
                    "(sizes.json, img2dataset's *_stats.json), which also count samples that cannot be decoded: set "
                    "`train_samples` to what the shards hold (`tessera data check` counts the readable ones), or "
                    "spread the samples over more shards"
                )
            if pass_index == 1:
                stats[REPEATED] += 1
            last_good_pass = pass_index
            yield payload, caption, sample["__key__"], drawn

    def _validation_plan(self, slot: int, num_slots: int) -> tuple[list[str], bool, int, int]:
        """(the shards this slot reads, whether it keeps only every num_slots-th sample of them,
        how many of their first samples it reads, batches every slot yields)."""
        if self._counted_by_records() and len(self.urls) >= num_slots:
            dealt = deal_shards(self.urls, self.sizes, num_slots)
            counts = [sum(self.sizes[url] for url in shards) for shards in dealt]
            return dealt[slot], False, counts[slot], math.ceil(max(counts) / self.batch_size)
        # by sample: slot s keeps samples s, s + S, ... of the first samples_per_epoch
        fullest = math.ceil(self.samples_per_epoch / num_slots)
        return self.urls, True, self.samples_per_epoch, math.ceil(fullest / self.batch_size)

    def _counted_by_records(self) -> bool:
        """Whether samples_per_epoch is what the shards' size records add up to (not a count of one's own)."""
        sizes = list(self.sizes.values())
        return None not in sizes and sum(sizes) == self.samples_per_epoch

    def _validation_batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        """Every good sample of this slot's part once, in batches padded to the count every slot yields."""
        slot, num_slots = self.rank * num_workers + worker, self.world_size * num_workers
        shards, split_by_sample, limit, num_batches = self._validation_plan(slot, num_slots)
        stats: Counter = Counter()
        reader = self._read(shards, stats)
        raw = self._marked(self._kept(itertools.islice(reader, limit), split_by_sample, slot, num_slots), 0)
        decoded = self._decoded(raw, stats, 0, -1, shards, worker)
        padding = None
        for _ in range(num_batches):
            samples = list(itertools.islice(decoded, self.batch_size))
            if samples:  # padding rows copy a real one's payload, so that every row has the same shape
                padding = (samples[-1][0], "", "", samples[-1][3])
            elif padding is None:
                padding = (self._blank(), "", "", 0)
            yield self._collate(samples + [padding] * (self.batch_size - len(samples)), stats, worker, len(samples))
            stats.clear()
        deque(decoded, maxlen=0)  # bad samples after the last good one: the batches hold every good one
        extra = next(reader, None)
        if extra is not None and self._counted_by_records():
            raise ValueError(
                f"validation shards {_names(shards)} hold more samples than their size records count ({limit}), "
                f"{extra['__url__']} at least: the rest would go unvalidated. Correct its sizes.json or "
                "*_stats.json, or set `val_samples` to validate only that many"
            )

    def _blank(self) -> np.ndarray:
        """The payload of padding rows for a slot without a sample: one the model takes like any
        other, for a batch of padding still goes through it (under FSDP every rank's forward counts)."""
        return np.zeros((self.image_size, self.image_size, 3), np.uint8)

    def _decode(self, sample: dict) -> tuple[str | None, np.ndarray | None, str]:
        """(skip reason or None, (H, W, 3) uint8 crop, caption)."""
        reason, image, caption = decode_sample(sample, self.image_size if self.jpeg_draft else None, self.max_pixels)
        if reason is not None:
            return reason, None, caption
        rng = None
        if self.random_crop:  # a crop of its own per sample and epoch: replaying skipped samples needs no decoding
            rng = random.Random(f"{self.seed}:{self.epoch}:{sample['__url__']}:{sample['__key__']}")
        return None, resize_and_crop(image, self.image_size, rng), caption

    def _stack(self, payloads: tuple) -> dict:
        return {"images": torch.from_numpy(np.stack(payloads)).permute(0, 3, 1, 2)}  # (B, 3, H, W) uint8

    def _collate(self, samples: list[tuple], stats: Counter, worker: int, real: int | None = None) -> dict:
        """A batch of `samples`, of which the first `real` (all when None) are samples and the rest padding."""
        payloads, captions, keys, drawn = zip(*samples)
        tokens = self.captions(list(captions))
        real = len(samples) if real is None else real
        if tokens.truncated:
            stats["truncated_captions"] += tokens.truncated
        return {
            **self._stack(payloads),
            "text_ids": tokens.ids,
            "text_mask": tokens.mask,
            "valid": torch.arange(len(samples)) < real,  # (B,) bool
            "captions": list(captions),
            "keys": list(keys),
            "stats": dict(stats),
            "position": {"worker": worker, "items": drawn[-1]},
        }


class CaptionTokenStream(CaptionImageStream):
    """The same stream over token shards from `tessera tokenize`: batches carry "image_ids"
    (B, h, w) or (B, h, w, D) long, read from KEY.tokens.npy, instead of "images". `image_size`
    and the crop options do not apply: the ids were made from validation crops."""

    def _decode(self, sample: dict) -> tuple[str | None, np.ndarray | None, str]:
        caption = _caption(sample)
        if "tokens.npy" not in sample:
            return "missing_tokens", None, caption
        if not caption:
            return "missing_caption", None, ""
        try:
            ids = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        except ValueError as error:  # also what numpy raises for a cut or garbled .npy
            log.debug("skipping %s from %s: %r", sample["__key__"], sample["__url__"], error)
            return "corrupt_tokens", None, caption
        return None, ids, caption

    def _stack(self, payloads: tuple) -> dict:
        shapes = {ids.shape for ids in payloads}
        if len(shapes) > 1:
            raise ValueError(f"token shards mix id grids of shapes {sorted(shapes)}: were they made by one tokenizer?")
        return {"image_ids": torch.from_numpy(np.stack(payloads).astype(np.int64))}  # (B, h, w) long

    def _blank(self) -> np.ndarray:
        # zeros in the grid of the shards' first good sample: the grid is the tokenizer's, not the stream's
        for sample in self._read(self.urls, Counter()):
            reason, ids, _ = self._decode(sample)
            if reason is None:
                return np.zeros_like(ids)
        raise RuntimeError(f"no sample of the shards {_names(self.urls)} can be used")


def decode_sample(
    sample: dict, min_side: int | None, max_pixels: int | None = MAX_PIXELS
) -> tuple[str | None, Image.Image | None, str]:
    """(skip reason or None, RGB image, caption) for one raw sample; images of more than
    `max_pixels` pixels are skipped as "oversized_image" before they are decoded."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        return "missing_image", None, ""
    caption = _caption(sample)
    if not caption:
        return "missing_caption", None, ""
    try:
        return None, decode_image(sample[ext], min_side, max_pixels), caption
    except DECODE_ERRORS as error:
        log.debug("skipping %s from %s: %r", sample["__key__"], sample["__url__"], error)
        return skip_reason(error), None, caption


def _caption(sample: dict) -> str:
    """From KEY.txt, else the "caption" field of KEY.json (img2dataset writes both)."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace").strip()
    if "json" in sample:
        try:
            caption = _json_loads(sample["json"]).get("caption")
        except ValueError:
            return ""
        return caption.strip() if isinstance(caption, str) else ""
    return ""


def _json_loads(data: bytes) -> dict:
    value = json.loads(data)
    return value if isinstance(value, dict) else {}


def _shuffled(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: fill, then swap a random element out for each new one; at the end of the
    items, the rest of the buffer in random order."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer
