"""`tessera data check`: read every sample of a shard set once and report what training would see."""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import webdataset as wds

from datamodules.images import MAX_PIXELS
from datamodules.stream import decode_sample, expand_urls, is_local, shard_sizes
from datamodules.text import CLIP_BPE, CaptionTokenizer


def check_shards(
    shards: str | list[str],
    text_length: int = 64,
    tokenizer: str = CLIP_BPE,
    workers: int | None = None,
    max_pixels: int | None = MAX_PIXELS,
) -> dict:
    """A report with `shards`, `samples`, `readable`, `skipped` (reason -> count), `image_size` and
    `caption_tokens` (min / median / max), `over_text_length` and `unreadable_shards` (shard -> error:
    missing, cut short, garbled, empty, or fewer samples than its size record). `max_pixels` is the
    training reader's pixel cap: images above it are counted as skipped, as training would skip them."""
    urls = expand_urls(shards)
    workers = max(1, min(workers or os.cpu_count() or 1, len(urls)))
    jobs = [(url, text_length, tokenizer, max_pixels) for url in urls]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_check_one_shard, *zip(*jobs)))
    else:
        results = [_check_one_shard(*job) for job in jobs]

    skipped: Counter = Counter()
    sides, tokens, unreadable = [], [], {}
    samples = 0
    for url, recorded, result in zip(urls, shard_sizes(urls), results):
        samples += result["samples"]
        skipped.update(result["skipped"])
        sides.append(result["sides"])
        tokens.append(result["tokens"])
        if result["error"]:
            unreadable[url] = result["error"]
        elif result["samples"] == 0:  # a whole tar of nothing: training would read no sample from it
            unreadable[url] = "empty: the shard holds no samples"
        elif recorded is not None and recorded != result["samples"]:
            unreadable[url] = f"holds {result['samples']} samples where its size record says {recorded}"
    sides, tokens = np.concatenate(sides), np.concatenate(tokens)
    return {
        "shards": len(urls),
        "samples": samples,
        "readable": int(sides.size),
        "skipped": dict(skipped),
        "image_size": _summary(sides),
        "caption_tokens": _summary(tokens),
        "text_length": text_length,
        "over_text_length": int((tokens > text_length).sum()),
        "unreadable_shards": unreadable,
    }


def _check_one_shard(url: str, text_length: int, tokenizer: str, max_pixels: int | None) -> dict:
    errors: list[str] = []

    def record(error: Exception) -> bool:
        errors.append(f"{type(error).__name__}: {error}")
        return False  # a broken tar stream cannot be trusted past its first error

    if is_local(url) and os.path.isfile(url.removeprefix("file:")):
        # a streaming tar reader stops quietly at a cut or garbled tail; a whole-file read does not
        errors.extend(filter(None, [_tar_layout_error(Path(url.removeprefix("file:")))]))
    skipped: Counter = Counter()
    sides, captions, samples = [], [], 0
    for sample in wds.tarfile_samples([{"url": url}], handler=record):
        samples += 1
        reason, image, caption = decode_sample(sample, None, max_pixels)
        if reason is not None:
            skipped[reason] += 1
            continue
        sides.append(min(image.size))
        captions.append(caption)
    counts = CaptionTokenizer(tokenizer, text_length).token_counts(captions) if captions else []
    return {
        "samples": samples,
        "skipped": dict(skipped),
        "sides": np.asarray(sides, np.int64),
        "tokens": np.asarray(counts, np.int64),
        "error": errors[0] if errors else None,
    }


def _tar_layout_error(path: Path) -> str | None:
    """Why a local tar file is not whole: a member running past the end, or bytes after the last one
    that are not the zero blocks ending an archive."""
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.offset_data + member.size > size:
                    return f"truncated: {member.name} runs past the end of the file"
            end = tar.offset
    except tarfile.TarError as error:
        return f"{type(error).__name__}: {error}"
    with path.open("rb") as f:
        f.seek(end)
        if f.read().strip(b"\0"):
            return f"corrupt: {size - end} bytes after the last readable member are not a tar member"
    return None


def _summary(values: np.ndarray) -> dict | None:
    if values.size == 0:
        return None
    return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}
