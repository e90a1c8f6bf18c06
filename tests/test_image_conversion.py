"""One conversion to RGB for every path: what the shard writers store, and what the evaluation reads,
is what the training reader (`decode_image`, `to_rgb`) makes of the same image, in every PIL mode."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from datamodules.images import decode_image, to_rgb
from datamodules.shard_writer import SourceSample, write_shards
from datamodules.sources import FolderSource

WIDTH, HEIGHT = 32, 16
# the file each mode usually comes in; I and F only exist as TIFF, CMYK mostly as JPEG
FILE_FORMATS = {"I;16": "png", "I": "tiff", "F": "tiff", "L": "png", "LA": "png", "P": "png", "RGBA": "png",
                "CMYK": "jpg", "1": "png"}


def image_in_mode(mode: str) -> Image.Image:
    """A WIDTH x HEIGHT image that PIL's plain convert("RGB") gets wrong where it can: a full-range
    ramp for the wide greyscale modes, hidden colours under transparent pixels."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    ramp = x / (WIDTH - 1)  # 0 .. 1, left to right
    top = y < HEIGHT // 2
    rgb = np.stack([ramp * 255, 255 - ramp * 255, np.full_like(ramp, 60)], axis=-1).astype(np.uint8)
    if mode == "I;16":
        return Image.fromarray((ramp * 65535).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((ramp * 65535).astype(np.int32))
    if mode == "F":
        return Image.fromarray(ramp.astype(np.float32))
    if mode == "L":
        return Image.fromarray((ramp * 255).astype(np.uint8))
    if mode == "LA":  # the top half transparent over dark grey
        return Image.fromarray(np.stack([np.full_like(x, 40), np.where(top, 0, 255)], axis=-1).astype(np.uint8), "LA")
    if mode == "RGBA":  # the top half transparent over the coloured ramp
        return Image.fromarray(np.dstack([rgb, np.where(top, 0, 255).astype(np.uint8)]), "RGBA")
    if mode == "P":  # four 8-pixel bands: black, red (transparent), blue, green
        image = Image.fromarray((x // 8).astype(np.uint8), "P")
        image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (252 * 3))
        image.info["transparency"] = 1
        return image
    if mode == "CMYK":
        return Image.fromarray(rgb).convert("CMYK")
    if mode == "1":
        return Image.fromarray(((x // 8) % 2 * 255).astype(np.uint8)).convert("1")
    raise ValueError(mode)


def save(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    options = {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
    image.save(buffer, {"jpg": "JPEG", "png": "PNG", "tiff": "TIFF"}[fmt], **options)
    return buffer.getvalue()


class ImageList:
    """A source of PIL images held in memory, as rendered or generated sources hand them over."""

    def __init__(self, images: list[Image.Image]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> SourceSample:
        return SourceSample(caption=f"image {index}", image=self.images[index])


def stored_images(shard) -> list[bytes]:
    with tarfile.open(shard) as tar:
        members = sorted(m for m in tar.getnames() if not m.endswith((".txt", ".json")))
        return [tar.extractfile(name).read() for name in members]


def assert_reader_sees_the_same(stored: bytes, expected: Image.Image, out_format: str, mode: str) -> None:
    got = np.asarray(decode_image(stored)).astype(int)
    assert got.shape == (HEIGHT, WIDTH, 3), mode
    difference = np.abs(got - np.asarray(expected).astype(int))
    if out_format == "png":
        assert difference.max() == 0, mode
    else:  # JPEG at quality 95: a little off, most near hard edges; a wrong conversion is off by 40 or more
        assert difference.mean() < 8, f"{mode}: mean difference {difference.mean():.1f}"


@pytest.mark.parametrize("out_format", ["jpg", "png"])
@pytest.mark.parametrize("mode", list(FILE_FORMATS))
def test_folder_shards_hold_the_readers_pixels_of_every_mode(tmp_path, mode, out_format):
    images = tmp_path / "images"
    images.mkdir()
    data = save(image_in_mode(mode), FILE_FORMATS[mode])
    (images / f"x.{FILE_FORMATS[mode]}").write_bytes(data)
    (tmp_path / "captions.jsonl").write_text(f'{{"file": "x.{FILE_FORMATS[mode]}", "caption": "a {mode} image"}}\n')

    report = write_shards(FolderSource(images, tmp_path / "captions.jsonl"), tmp_path / "out", image_format=out_format)

    assert report.samples == 1, report.skipped
    assert_reader_sees_the_same(stored_images(tmp_path / "out" / "00000.tar")[0], decode_image(data), out_format, mode)


@pytest.mark.parametrize("out_format", ["jpg", "png"])
def test_in_memory_images_are_stored_as_the_reader_converts_them(tmp_path, out_format):
    modes = list(FILE_FORMATS)
    source = ImageList([image_in_mode(mode) for mode in modes])

    report = write_shards(source, tmp_path, image_format=out_format)

    assert report.samples == len(modes), report.skipped
    for mode, stored in zip(modes, stored_images(tmp_path / "00000.tar")):
        assert_reader_sees_the_same(stored, to_rgb(image_in_mode(mode)), out_format, mode)


def test_sixteen_bit_ramp_is_scaled_not_clipped_in_jpeg_shards(tmp_path):
    """The case as found: a 16-bit greyscale PNG written by `tessera shards folder` (JPEG by default)."""
    (tmp_path / "images").mkdir()
    image_in_mode("I;16").save(tmp_path / "images" / "ramp.png")
    (tmp_path / "captions.jsonl").write_text('{"file": "ramp.png", "caption": "a ramp"}\n')
    write_shards(FolderSource(tmp_path / "images", tmp_path / "captions.jsonl"), tmp_path / "out")

    row = np.asarray(decode_image(stored_images(tmp_path / "out" / "00000.tar")[0]))[0, ::8, 0].astype(int)
    assert np.abs(row - [0, 66, 132, 197]).max() <= 3  # a plain RGB conversion clips this to 0, 255, 255, 255


def test_evaluation_grid_reads_images_as_the_reader_does(tmp_path):
    from tessera.commands.evaluate_coco import _write_grid

    path = tmp_path / "sample.png"
    image_in_mode("RGBA").save(path)
    _write_grid(tmp_path, [path, path])  # make_grid pads two images or more

    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    cell = grid[2 : 2 + HEIGHT, 2 : 2 + WIDTH]  # past the 2-pixel padding
    assert np.array_equal(cell, np.asarray(decode_image(path.read_bytes())))
    assert (cell[: HEIGHT // 2] == 255).all()  # the transparent half on white, not its hidden colours
