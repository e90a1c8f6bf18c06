"""Test data builders: encoded images, gradients, shards written by webdataset's own TarWriter."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image



def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 128.0)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB").convert(mode)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height 8-bit RGB pixels but whose data holds none:
    any attempt to decode it fails, so only what is read from the header can succeed."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write_wds_shard(path: Path, samples: list[dict]) -> None:
    """A shard written by webdataset's TarWriter, as img2dataset writes them."""
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def img2dataset_samples(shard: int, count: int, size: tuple[int, int] = (96, 80)) -> list[dict]:
    """img2dataset's layout: key = shard id + index, .jpg, .txt and a .json with url, caption, status..."""
    samples = []
    for index in range(count):
        key = f"{shard:05d}{index:04d}"
        caption = f"photo number {index} of shard {shard}"
        meta = {"url": f"http://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
                "width": size[0], "height": size[1], "original_width": size[0] * 2, "original_height": size[1] * 2}
        samples.append({"__key__": key, "jpg": encode(gradient_image(*size)), "txt": caption,
                        "json": json.dumps(meta)})
    return samples


def img2dataset_shards_with_bad_samples(directory: Path, layout: list[tuple[int, int]]) -> list[str]:
    """Shards of (good, undecodable) samples each, in img2dataset's layout, every good image a
    noise of its own: the undecodable ones downloaded fine, so `*_stats.json` counts them among
    the "successes" as well. One sits first in its shard (so every reading of the shard meets it),
    the others last."""
    urls = []
    for shard, (good, bad) in enumerate(layout):
        samples = img2dataset_samples(shard, good)
        noise = np.random.default_rng(shard).integers(0, 256, (good, 36, 40, 3), np.uint8)
        for sample, pixels in zip(samples, noise):
            sample["jpg"] = encode(Image.fromarray(pixels))
        broken = [{"__key__": f"{shard:05d}bad{i}", "jpg": b"not a jpeg", "txt": "broken"} for i in range(bad)]
        write_wds_shard(directory / f"{shard:05d}.tar", broken[:1] + samples + broken[1:])
        (directory / f"{shard:05d}_stats.json").write_text(json.dumps({"count": good + bad, "successes": good + bad}))
        urls.append(str(directory / f"{shard:05d}.tar"))
    return urls
