"""`tessera shards synthetic|folder|coco`: caption-image pairs as WebDataset shards (img2dataset layout)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datamodules.images import MAX_PIXELS
from datamodules.shard_writer import OPTIONS_FILE


def add_parser(commands: argparse._SubParsersAction) -> None:
    shards = commands.add_parser("shards", help="write caption-image pairs as WebDataset shards (img2dataset layout)")
    kinds = shards.add_subparsers(dest="kind", required=True)
    synthetic = _shard_writer_parser(kinds, "synthetic", "captioned scenes of flat-coloured shapes", "png")
    synthetic.add_argument("--num-samples", type=int, default=10_000)
    synthetic.add_argument("--image-size", type=int, default=64)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--jitter", action="store_true", help="shapes anywhere in their cells' slack, not centred")
    folder = _shard_writer_parser(kinds, "folder", "a directory of images and a JSONL or CSV captions file", "jpg")
    folder.add_argument("--images", required=True, help="directory the captions file's paths are relative to")
    folder.add_argument("--captions", required=True, help="JSONL or CSV with `file` and `caption` fields")
    coco = _shard_writer_parser(kinds, "coco", "MS-COCO captions: one sample per image, all captions kept", "jpg")
    coco.add_argument("--annotations", required=True, help="captions_train2014.json or captions_val2014.json")
    coco.add_argument("--images", required=True, help="the matching image directory (train2014/ or val2014/)")

def _shard_writer_parser(kinds, name: str, help: str, default_format: str) -> argparse.ArgumentParser:
    parser = kinds.add_parser(name, help=help)
    parser.add_argument("--out", required=True, type=Path, help="dataset directory; complete shards there are kept")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--image-format", choices=["jpg", "png", "webp"], default=default_format)
    parser.add_argument("--quality", type=int, default=95, help="JPEG / WebP quality")
    parser.add_argument("--workers", type=int, default=1, help="shards written in parallel")
    max_pixels_argument(parser, "skipped and counted")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove the shards and records in --out first (a re-run with options other than "
                             f"those in --out's {OPTIONS_FILE} is refused without it)")
    parser.set_defaults(run=run)
    return parser

def max_pixels_argument(parser: argparse.ArgumentParser, what_happens: str) -> None:
    parser.add_argument("--max-pixels", type=_pixel_cap, default=MAX_PIXELS,
                        help=f"images whose header declares more pixels are {what_happens}, undecoded "
                             f"(default {MAX_PIXELS:,}: 8192 x 8192); 0 for no cap")

def _pixel_cap(text: str) -> int | None:
    """--max-pixels: a pixel count, or 0 for no cap (None)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a pixel count, or 0 for no cap, got {value}")
    return value or None

def run(args: argparse.Namespace) -> int:
    from datamodules.shard_writer import write_shards
    from datamodules.shapes import SyntheticShapes
    from datamodules.sources import CocoSource, FolderSource

    try:
        if args.kind == "synthetic":
            source = SyntheticShapes(args.num_samples, args.image_size, args.seed, args.jitter)
        elif args.kind == "folder":
            source = FolderSource(args.images, args.captions)
        else:
            source = CocoSource(args.annotations, args.images)
        report = write_shards(source, args.out, args.samples_per_shard, args.image_format, args.quality,
                              args.workers, args.max_pixels, args.overwrite)
    except (ValueError, FileNotFoundError) as error:  # bad input or options: the message says what to do
        raise SystemExit(f"tessera shards {args.kind}: {error}") from error
    print(json.dumps({"out": str(args.out), "written": report.written, "kept": report.existing,
                      "all_skipped_shards": report.empty, "samples": report.samples,
                      "skipped": dict(report.skipped)}))
    return 0
