"""Write caption-image pairs as WebDataset shards in the img2dataset layout.

A dataset directory holds `{shard:05d}.tar` files, each with `KEY.<image ext>`, `KEY.txt`
(the caption) and `KEY.json` (caption, key, width, height and the source's own fields), and a
`sizes.json` mapping shard file names to sample counts. This is the layout img2dataset writes
for LAION, CC3M, CC12M and COCO, so our readers see one format. Beside each shard,
`{shard:05d}_stats.json` holds its sample count ("successes", img2dataset's field) and its skips
by reason, so a re-run reports the skips of the shards it keeps.

Images are stored as the training reader sees them: a file is decoded by the reader's own
`decode_image` (RGB, transparency on white, wide greyscale scaled, EXIF rotation applied), so one
it would skip is skipped here, and whatever is re-encoded holds exactly the reader's pixels.

Sample i of a source always lands in shard i // samples_per_shard, so a shard is a pure
function of the source and can be written by any process, skipped when it already exists,
and rewritten alone after a crash. Each shard is written under a temporary name, its stats
written, and then renamed: a `.tar` on disk is always a whole shard with its stats. A shard
whose samples were all skipped is not written at all.

`options.json` records what decides the shards' contents (the source's kind and length, samples
per shard, image format, quality, pixel cap). It is written before the first shard, and a re-run
with other options is refused while shards are there, so one directory never mixes two layouts;
`overwrite` removes the shards and records and starts again.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image

from datamodules.images import DECODE_ERRORS, MAX_PIXELS, check_pixels, decode_image, skip_reason, to_rgb

log = logging.getLogger(__name__)

IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
SIZES_FILE = "sizes.json"
OPTIONS_FILE = "options.json"
# every file a writer leaves in its directory: shards, their stats, the two records, and their temporary names
WRITTEN_FILE = re.compile(r"\.?(\d{5,}\.tar|\d{5,}_stats\.json|sizes\.json|options\.json)(\.\d+\.tmp)?")
SHARD_FILE = re.compile(r"\d{5,}\.tar")


@dataclass
class SourceSample:
    """One caption-image pair as a source yields it, before it has a key.

    `image` is a PIL image (rendered or decoded) or the path of an image file; a file already
    in the shard's image format is copied byte for byte, anything else is re-encoded.
    `meta` holds the source's own fields, stored in KEY.json beside caption, key and size.
    """

    caption: str
    image: Image.Image | Path
    meta: dict = field(default_factory=dict)


class SkipSample(Exception):
    """What a source raises for a sample it knows is unusable; counted under `reason`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Source(Protocol):
    """An indexed collection of samples; `__getitem__` may raise SkipSample, or an image that
    cannot be read may fail to decode, for a bad sample."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> SourceSample: ...


@dataclass(frozen=True)
class ShardOptions:
    """What decides the shards a source becomes, besides the source."""

    samples_per_shard: int
    image_format: str  # a key of IMAGE_FORMATS
    quality: int  # JPEG / WebP
    max_pixels: int | None  # images with more pixels are skipped; None: no cap


@dataclass
class ShardReport:
    written: int = 0  # shards written by this run
    existing: int = 0  # complete shards left as they were
    empty: int = 0  # shards not written: every one of their samples was skipped
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count, kept shards' included


def sample_key(shard: int, index: int, samples_per_shard: int) -> str:
    """img2dataset's key: the shard id then the index within the shard, both zero-padded."""
    return f"{shard:05d}{index:0{len(str(samples_per_shard - 1))}d}"


def write_shards(
    source: Source,
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    quality: int = 95,
    workers: int = 1,
    max_pixels: int | None = MAX_PIXELS,
    overwrite: bool = False,
) -> ShardReport:
    """Write `source` into `out_dir` as shards; complete shards already there are kept.

    A directory holding shards written with other options is refused unless `overwrite`, which
    removes them first. Raises ValueError if every sample of the source is skipped.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1 (or None for no cap), got {max_pixels}")
    if len(source) == 0:
        raise ValueError("the source holds no samples")
    options = ShardOptions(samples_per_shard, image_format, quality, max_pixels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        remove_written_files(out_dir)
    record_options(out_dir, {"source": type(source).__name__, "source_samples": len(source), **asdict(options)})
    num_shards = -(-len(source) // samples_per_shard)
    jobs = [(source, out_dir, shard, options) for shard in range(num_shards)]

    report, sizes = ShardReport(), {}
    started = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_write_one_shard, *zip(*jobs)))
    else:
        results = [_write_one_shard(*job) for job in jobs]
    for shard, (count, skipped, outcome) in enumerate(results):
        report.samples += count
        report.skipped.update(skipped)
        report.written += outcome == "written"
        report.existing += outcome == "kept"
        report.empty += outcome == "empty"
        if outcome != "empty":
            sizes[shard_name(shard)] = count
    if report.samples == 0:
        raise ValueError(
            f"every one of the {len(source)} samples was skipped ({_reasons(report.skipped)}), so no shard was "
            f"written to {out_dir}: the warnings above name each sample and why"
        )
    write_json_atomically(out_dir / SIZES_FILE, sizes)
    log.info(
        "%s: %d shards (%d written, %d kept, %d not written: all skipped), %d samples, skipped %s in %.1fs",
        out_dir, num_shards, report.written, report.existing, report.empty, report.samples,
        dict(report.skipped) or "none", time.perf_counter() - started,
    )
    return report


def record_options(out_dir: Path, options: dict) -> None:
    """Write `options` to OPTIONS_FILE, refusing if shards there were written with others."""
    path = out_dir / OPTIONS_FILE
    shards = sorted(p.name for p in out_dir.iterdir() if SHARD_FILE.fullmatch(p.name))
    if shards:  # with no shard there, nothing can be mixed: a record of a run that wrote none is replaced
        if not path.is_file():
            raise ValueError(
                f"{out_dir} holds shards ({shards[0]}, ...) but no {OPTIONS_FILE}, so what they were written with is "
                "unknown: pass --overwrite (overwrite=True) to remove them and start again, or choose another --out"
            )
        recorded = json.loads(path.read_text())
        differing = [name for name in options if recorded.get(name) != options[name]]
        if differing:
            changes = "; ".join(f"{name}: {recorded.get(name)!r} there, {options[name]!r} now" for name in differing)
            raise ValueError(
                f"{out_dir} holds shards written with other options ({changes}); writing beside them would mix "
                "two layouts: re-run with the recorded options to complete it, pass --overwrite (overwrite=True) "
                "to remove its shards and start again, or choose another --out"
            )
    write_json_atomically(path, options)


def remove_written_files(out_dir: Path) -> None:
    """Remove what a writer leaves in `out_dir` (shards, stats, records, temporary files); nothing else."""
    removed = [p for p in out_dir.iterdir() if WRITTEN_FILE.fullmatch(p.name)]
    for path in removed:
        path.unlink()
    if removed:
        log.info("%s: removed %d files of an earlier run", out_dir, len(removed))


def _reasons(skipped: Counter) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))


def shard_name(shard: int) -> str:
    return f"{shard:05d}.tar"


def stats_path(shard: Path) -> Path:
    """img2dataset's name for a shard's stats: `00012.tar` -> `00012_stats.json`."""
    return shard.with_name(f"{shard.stem}_stats.json")


def _write_one_shard(source: Source, out_dir: Path, shard: int, options: ShardOptions) -> tuple[int, Counter, str]:
    """Returns (samples in the shard, skipped reasons, "written", "kept" or "empty")."""
    path = out_dir / shard_name(shard)
    if path.exists():
        count, skipped = kept_shard_stats(path)
        return count, skipped, "kept"
    start = shard * options.samples_per_shard
    stop = min(start + options.samples_per_shard, len(source))
    skipped: Counter = Counter()
    count = 0
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for index in range(start, stop):
            key = sample_key(shard, index - start, options.samples_per_shard)
            try:
                sample = source[index]
                image_bytes, width, height = encode_image(sample.image, options)
            except (SkipSample, *DECODE_ERRORS) as error:
                reason = error.reason if isinstance(error, SkipSample) else skip_reason(error)
                skipped[reason] += 1
                log.warning("skipping sample %d (key %s): %s: %s", index, key, reason, error)
                continue
            record = {"key": key, "caption": sample.caption, "width": width, "height": height, **sample.meta}
            add_member(tar, f"{key}.{options.image_format}", image_bytes)
            add_member(tar, f"{key}.txt", sample.caption.encode("utf-8"))
            add_member(tar, f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
            count += 1
    if count == 0:  # an empty tar would read as a shard with nothing in it: leave none
        tmp.unlink()
        log.warning("%s not written: all %d of its samples were skipped (%s)", path.name, stop - start, _reasons(skipped))
        return 0, skipped, "empty"
    # stats first: a shard on disk always has its stats beside it
    write_json_atomically(stats_path(path), {"successes": count, "skipped": dict(skipped)})
    os.replace(tmp, path)
    return count, skipped, "written"


def kept_shard_stats(path: Path) -> tuple[int, Counter]:
    """(samples, skips by reason) of a shard already on disk, from its stats; counted from the tar
    if the stats file was lost (its skips then unknown)."""
    stats = stats_path(path)
    if not stats.is_file():
        log.warning("%s has no %s: counting its samples; its skips are unknown", path, stats.name)
        return count_samples(path), Counter()
    recorded = json.loads(stats.read_text())
    return recorded["successes"], Counter(recorded["skipped"])


def encode_image(image: Image.Image | Path, options: ShardOptions) -> tuple[bytes, int, int]:
    """The bytes stored for `image`, and its width and height as the reader sees them.

    A file is decoded whole by the reader's `decode_image` (a truncated one fails here, not in
    training) and copied byte for byte when it is already in the shard's format, else re-encoded
    from the reader's pixels; a PIL image is stored as `to_rgb` makes it.
    """
    if isinstance(image, Path):
        data = image.read_bytes()
        decoded = decode_image(data, max_pixels=options.max_pixels)
        if _extension_format(image) == IMAGE_FORMATS[options.image_format] == Image.open(io.BytesIO(data)).format:
            return data, decoded.width, decoded.height
        return _encode_rgb(decoded, options), decoded.width, decoded.height
    check_pixels(image.width, image.height, options.max_pixels)
    return _encode_rgb(to_rgb(image), options), image.width, image.height


def _encode_rgb(image: Image.Image, options: ShardOptions) -> bytes:
    pil_format = IMAGE_FORMATS[options.image_format]
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format, **({"quality": options.quality} if pil_format in ("JPEG", "WEBP") else {}))
    return buffer.getvalue()


def _extension_format(path: Path) -> str | None:
    ext = path.suffix.lower().lstrip(".")
    return IMAGE_FORMATS.get("jpg" if ext == "jpeg" else ext)


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # the same source writes byte-identical shards
    tar.addfile(info, io.BytesIO(payload))


def count_samples(path: str | Path) -> int:
    """Samples in a shard: distinct keys among its members."""
    with tarfile.open(path) as tar:
        return len({name.split(".", 1)[0] for name in tar.getnames()})


def write_json_atomically(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)

