"""Pre-tokenized shards: caption-image shards -> image token ids, so stage 2 trains without
decoding JPEGs or running the tokenizer's encoder (LlamaGen trains its prior this way).

Each input shard `NAME.tar` becomes an output shard `NAME.tar` in the output directory holding,
per sample, `KEY.tokens.npy` (the ids, (h, w) or (h, w, D), uint16 when the codebook has at most
65,536 codes, else int32), `KEY.txt` (the caption) and `KEY.json` (the sample's own json, when
it has one). Images are decoded, resized and centre-cropped as for validation: no random crop.

The output directory also holds:
- `tokenizer.json`: the tokenizer's `describe()`, a hash of its weights, the image size and the
  source shards. A directory whose record names another tokenizer or image size is refused,
  so one directory never mixes tokens of two tokenizers.
- `NAME_stats.json` beside each output shard: its sample count ("successes", the field
  img2dataset's `*_stats.json` uses, so `shard_sizes` reads it) and its skips by reason.
- `sizes.json`, as the shard writer writes it, once every output shard exists (see below).

Splitting across processes: rank r of W takes input shards r, r + W, r + 2W, ... of the expanded
shard list, and a rank's loader worker w of N takes every N-th of those. Each process writes
only its own shards, so processes need no coordination. Every process, when done, writes
`sizes.json` from the `*_stats.json` files if every output shard of the list exists, else leaves
it to a later one. The process that writes the last stats file therefore always sees all of
them: `sizes.json` is complete once every rank has finished, and never exists incomplete.

Resuming: an output shard is written under a temporary name, its stats file is written, then it
is renamed, so a `NAME.tar` is always whole and has its stats. A rerun keeps output shards that
exist (the shard writer's rule) and rewrites the rest; temporary files a killed run left are
removed when their shard is written.

Bad input is skipped, logged and counted by the training stream's reasons (`missing_image`,
`missing_caption`, `corrupt_image`, `oversized_image` past the default pixel cap); a shard whose tar stream breaks is written up to the break,
which is counted as `unreadable_shard_data`, the samples training would have read from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tessera.nn.multiscale_tokenizer import MultiScaleIds
from tessera.pixels import to_unit_range
from datamodules.images import resize_and_crop
from datamodules.shard_writer import SIZES_FILE, add_member, count_samples, stats_path, write_json_atomically
from datamodules.stream import check_shards, decode_sample, expand_urls

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENS_EXT = "tokens.npy"
# what must match for two runs to share an output directory; "shards" is only a note
IDENTITY_FIELDS = ("tokenizer", "weights_sha256", "image_size")


class ImageTokenizer(Protocol):
    """What tokenizing needs of a frozen tokenizer in eval mode (a `VQTokenizer`), on the device used."""

    codebook_size: int
    downsample_factor: int

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...


@dataclass
class TokenizeReport:
    written: int = 0  # output shards written by this run
    kept: int = 0  # complete output shards of this rank left as they were
    samples: int = 0  # samples tokenized by this run
    skipped: Counter = field(default_factory=Counter)  # reason -> samples skipped by this run
    sizes_complete: bool = False  # whether sizes.json now covers every output shard
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "written": self.written, "kept": self.kept, "samples": self.samples, "skipped": dict(self.skipped),
            "sizes_complete": self.sizes_complete, "seconds": round(self.seconds, 2),
            "images_per_s": round(self.samples / self.seconds, 1) if self.seconds else 0.0,
        }


def tokenize_shards(
    tokenizer: ImageTokenizer,
    shards: str | list[str],
    out_dir: str | Path,
    image_size: int = 256,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> TokenizeReport:
    """Write this rank's output shards (input shards rank, rank + world_size, ...) into `out_dir`.

    `tokenizer` must already be on `device`; `workers` loader processes decode images (0: in
    this process). Bad samples are skipped, logged and counted by the stream's reasons.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}")
    if image_size % tokenizer.downsample_factor:
        raise ValueError(f"image size {image_size} is not a multiple of the tokenizer's downsampling factor {tokenizer.downsample_factor}")
    started = time.perf_counter()
    urls = expand_urls(shards)
    names = output_names(urls)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_out_dir(out_dir, tokenizer_record(tokenizer, shards, image_size))

    mine = urls[rank::world_size]
    done = {url for url in mine if (out_dir / names[url]).exists()}
    todo = [url for url in mine if url not in done]
    report = TokenizeReport(kept=len(done))
    log.info("rank %d of %d: %d of %d shards, %d already written to %s", rank, world_size, len(mine), len(urls), report.kept, out_dir)
    for url in done:
        _ensure_stats(out_dir / names[url], url)
    if todo:
        check_shards(todo)
        paths = {url: out_dir / names[url] for url in todo}
        _tokenize(tokenizer, paths, image_size, batch_size, torch.device(device), workers, report)
    report.sizes_complete = write_sizes_when_complete(out_dir, [names[url] for url in urls])
    report.seconds = time.perf_counter() - started
    log.info("rank %d: %s", rank, report.as_dict())
    return report


def output_names(urls: list[str]) -> dict[str, str]:
    """Each input shard's output file name: its own base name, which must be unique in the list."""
    names = {url: shard_basename(url) for url in urls}
    seen: dict[str, str] = {}
    for url, name in names.items():
        if name in seen:
            raise ValueError(f"two input shards share the name {name} ({seen[name]} and {url}): output shards are named after them")
        seen[name] = url
    return names


def shard_basename(url: str) -> str:
    """`00012.tar` from `/data/00012.tar`, `https://host/d/00012.tar?sig=..` or `pipe:aws s3 cp s3://b/00012.tar -`."""
    matches = re.findall(r"[^/\s?#'\"]+\.tar\b", url)
    if not matches:
        raise ValueError(f"cannot name an output shard after {url!r}: no `NAME.tar` in it")
    return matches[-1]


def token_dtype(codebook_size: int) -> np.dtype:
    """The narrowest of uint16 and int32 that holds every id: half the bytes of int32 for usual codebooks."""
    return np.dtype(np.uint16 if codebook_size <= 2**16 else np.int32)


# -----------------------------------------------------------------------------
# the output directory's tokenizer record


def tokenizer_record(tokenizer: ImageTokenizer, shards: str | list[str], image_size: int) -> dict:
    """tokenizer.json's content, as it reads back from JSON (tuples become lists)."""
    record = {
        "tokenizer": tokenizer.describe(),
        "weights_sha256": weights_fingerprint(tokenizer.state_dict()),
        "image_size": image_size,
        "token_dtype": token_dtype(tokenizer.codebook_size).name,
        "shards": shards if isinstance(shards, str) else [str(s) for s in shards],
    }
    return json.loads(json.dumps(record))


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the names and bytes of every tensor: two checkpoints of one architecture differ here."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def claim_out_dir(out_dir: Path, record: dict) -> None:
    """Write tokenizer.json, or check the one there: its tokenizer, weights and image size must match."""
    path = out_dir / TOKENIZER_FILE
    if not path.is_file():
        write_json_atomically(path, record)
        return
    existing = json.loads(path.read_text())
    differing = [name for name in IDENTITY_FIELDS if existing.get(name) != record[name]]
    if differing:
        raise ValueError(
            f"{out_dir} holds tokens of a different tokenizer: its {TOKENIZER_FILE} differs in {', '.join(differing)} "
            f"(image size {existing.get('image_size')} there, {record['image_size']} now). "
            "Tokens of two tokenizers must not share a directory: choose another --out."
        )


# -----------------------------------------------------------------------------
# reading: per-shard batches of decoded images


class ShardImages(IterableDataset):
    """Batches of one shard at a time: {"url", "images" (B, 3, S, S) uint8, "keys", "captions",
    "metas" (json bytes or None), "skipped" {reason: count}, "last"}. Loader worker w of N reads
    shards w, w + N, ...; every shard ends with a batch marked `last` (empty when its final
    samples were all bad), so the writer knows when a shard is whole.
    """

    def __init__(self, urls: list[str], image_size: int, batch_size: int):
        self.urls = urls
        self.image_size = image_size
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for url in self.urls[worker::num_workers]:
            yield from self._shard_batches(url)

    def _shard_batches(self, url: str) -> Iterator[dict]:
        pending: list[tuple] = []
        skipped: Counter = Counter()
        for sample in _read_shard(url, skipped):
            # draft-decodes JPEGs down to the crop size, as the validation stream does
            reason, image, caption = decode_sample(sample, self.image_size)
            if reason is not None:
                skipped[reason] += 1
                log.warning("skipping %s in %s: %s", sample["__key__"], url, reason)
                continue
            pending.append((resize_and_crop(image, self.image_size), sample["__key__"], caption, sample.get("json")))
            if len(pending) == self.batch_size:
                yield self._collate(url, pending, skipped, last=False)
                pending, skipped = [], Counter()
        yield self._collate(url, pending, skipped, last=True)

    def _collate(self, url: str, samples: list[tuple], skipped: Counter, last: bool) -> dict:
        images, keys, captions, metas = zip(*samples) if samples else ((), (), (), ())
        pixels = np.stack(images) if images else np.empty((0, self.image_size, self.image_size, 3), np.uint8)
        return {
            "url": url,
            "images": torch.from_numpy(pixels).permute(0, 3, 1, 2),  # (B, 3, S, S) uint8
            "keys": list(keys),
            "captions": list(captions),
            "metas": list(metas),
            "skipped": dict(skipped),
            "last": last,
        }


def _read_shard(url: str, skipped: Counter) -> Iterator[dict]:
    """Raw samples of one shard; a broken tar stream is counted as the stream counts it, and ends the shard."""

    def count_and_continue(error: Exception) -> bool:
        skipped["unreadable_shard_data"] += 1
        log.warning("unreadable data in %s: %r", url, error)
        return True

    yield from wds.tarfile_samples([{"url": url}], handler=count_and_continue)


# -----------------------------------------------------------------------------
# encoding and writing


def _tokenize(
    tokenizer: ImageTokenizer, paths: dict[str, Path], image_size: int, batch_size: int,
    device: torch.device, workers: int, report: TokenizeReport,
) -> None:
    """Tokenize the input shards `paths` maps to output paths: encode every batch as it arrives and
    append it to its shard; batches of up to `workers` shards interleave."""
    dtype = token_dtype(tokenizer.codebook_size)
    loader = DataLoader(
        ShardImages(list(paths), image_size, batch_size), batch_size=None, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None,
    )
    open_shards: dict[str, PartialShard] = {}
    try:
        for batch in loader:
            url = batch["url"]
            if url not in open_shards:
                open_shards[url] = PartialShard(paths[url], url)
            shard = open_shards[url]
            if batch["keys"]:
                ids = encode_images(tokenizer, batch["images"], device).astype(dtype)
                shard.add(batch["keys"], ids, batch["captions"], batch["metas"])
            shard.skipped.update(batch["skipped"])
            if batch["last"]:
                open_shards.pop(url).finish()
                report.written += 1
                report.samples += shard.samples
                report.skipped.update(shard.skipped)
    finally:
        for shard in open_shards.values():
            shard.abandon()


def encode_images(tokenizer: ImageTokenizer, images: torch.Tensor, device: torch.device) -> np.ndarray:
    """(B, 3, S, S) uint8 -> ids (B, h, w) or (B, h, w, D) on the host; bf16 on CUDA, where the
    quantizer still measures distances in fp32. A multi-scale tokenizer's coarse map: the prior's
    tokens (its fine stage trains on images)."""
    pixels = to_unit_range(images.to(device, non_blocking=True))
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        ids = tokenizer.encode(pixels)
    ids = ids.coarse if isinstance(ids, MultiScaleIds) else ids
    return ids.cpu().numpy()


class PartialShard:
    """An output shard being written under a temporary name; `finish` writes its stats, then renames it."""

    def __init__(self, path: Path, source: str):
        self.path = path
        self.source = source
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.tar = tarfile.open(self.tmp, "w")
        self.samples = 0
        self.skipped: Counter = Counter()

    def add(self, keys: list[str], ids: np.ndarray, captions: list[str], metas: list[bytes | None]) -> None:
        for key, sample_ids, caption, meta in zip(keys, ids, captions, metas):
            add_member(self.tar, f"{key}.{TOKENS_EXT}", _npy_bytes(sample_ids))
            add_member(self.tar, f"{key}.txt", caption.encode("utf-8"))
            if meta is not None:
                add_member(self.tar, f"{key}.json", meta)
        self.samples += len(keys)

    def finish(self) -> None:
        self.tar.close()
        # stats first: a NAME.tar on disk always has its stats beside it
        write_json_atomically(stats_path(self.path), {"successes": self.samples, "skipped": dict(self.skipped), "source": self.source})
        os.replace(self.tmp, self.path)
        for leftover in self.path.parent.glob(f".{self.path.stem}[._]*.tmp"):  # from killed runs
            leftover.unlink(missing_ok=True)
        log.info("wrote %s: %d samples, skipped %s", self.path, self.samples, dict(self.skipped) or "none")

    def abandon(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _ensure_stats(shard: Path, source: str) -> None:
    """Restore the stats of a kept shard whose stats file was lost, so sizes.json can still be completed."""
    if not stats_path(shard).is_file():
        write_json_atomically(stats_path(shard), {"successes": count_samples(shard), "skipped": {}, "source": source})


def write_sizes_when_complete(out_dir: Path, names: list[str]) -> bool:
    """sizes.json from every shard's stats in `out_dir`, written only once all of `names` exist."""
    missing = [name for name in names if not (out_dir / name).exists()]
    if missing:
        log.info("%s: %d output shards not written yet (first: %s); sizes.json is left to the process that ends last",
                 out_dir, len(missing), missing[0])
        return False
    sizes = {
        shard.name: json.loads(stats_path(shard).read_text())["successes"]
        for shard in sorted(out_dir.glob("*.tar")) if stats_path(shard).is_file()
    }
    write_json_atomically(out_dir / SIZES_FILE, sizes)
    return True
