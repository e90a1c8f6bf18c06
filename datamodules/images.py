"""Image decoding and the training transform: any PIL mode to RGB, shorter side to size, crop.

`decode_image` and `to_rgb` are the one conversion to RGB: the training reader, `tessera data
check`, the shard writers (which store what the reader would make of a file) and the evaluation
all go through them, so an image gives the same pixels whichever command read it.

Decoding is the hot path of a text-to-image data loader, so a JPEG is decoded straight to the
smallest DCT scale (1/2, 1/4, 1/8) that still covers the output size (PIL's draft mode): that
skips most of the inverse DCT and all the downscaling that would throw those pixels away.
Images stay uint8 here; the batch is scaled to [-1, 1] after it reaches the device.
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ORIENTATION_TAG = 0x0112

# The default cap on an image's pixels, read from its header before anything is decoded. A decoded
# image costs 3 bytes a pixel (4 while RGBA) in every loader worker, and a flat image compresses to
# almost nothing: a 12000 x 12000 PNG of 140 KB decodes to 144 MP, which PIL only warns about (its
# decompression-bomb error starts at 179 MP). 8192 x 8192 (64 MP, 192 MiB as RGB) is above what
# cameras write at full resolution (phones 12-50 MP, a 61 MP full-frame sensor 60.2 MP), and images
# past it are rare in web-scraped sets and are cropped to a few hundred pixels for training anyway.
MAX_PIXELS = 8192 * 8192


class OversizedImage(Exception):
    """An image whose header declares more pixels than the cap: refused before it is decoded."""


# what reading an image may raise: PIL's errors for bytes that are not a whole, sane image, and the cap
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, OversizedImage)


def skip_reason(error: Exception) -> str:
    """The reason a sample whose image raised one of DECODE_ERRORS is counted under."""
    if isinstance(error, OversizedImage):
        return "oversized_image"
    if isinstance(error, FileNotFoundError):
        return "missing_image"
    return "corrupt_image"


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """Raise OversizedImage if width x height is above `max_pixels` (None: no cap)."""
    if max_pixels is not None and width * height > max_pixels:
        raise OversizedImage(
            f"{width}x{height} is {width * height / 1e6:.1f} MP, above the cap of {max_pixels / 1e6:.1f} MP "
            f"(max_pixels {max_pixels})"
        )


def decode_image(data: bytes, min_side: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Fully decoded RGB image; a JPEG whose shorter side is far above `min_side` is decoded reduced.

    Raises OSError (or PIL.Image.DecompressionBombError) for data that is not a whole image, and
    OversizedImage, before decoding, for one of more than `max_pixels` pixels.
    """
    image = Image.open(io.BytesIO(data))  # reads the header only
    check_pixels(image.width, image.height, max_pixels)
    if min_side is not None and image.format == "JPEG":
        # draft() picks the largest reduction that keeps both sides >= the requested ones,
        # so asking for a square of the shorter side's target keeps that side >= min_side
        image.draft("RGB", (min_side, min_side))
    image.load()
    if image.width == 0 or image.height == 0:
        raise OSError("zero-size image")
    if image.getexif().get(ORIENTATION_TAG, 1) != 1:  # phone photos are stored sideways with this tag
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any PIL mode: transparency composited on white, 16/32-bit greyscale scaled to 8 bits."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's own conversion clips these to 0..255 instead of scaling them
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
        grey = np.clip(pixels / _full_scale(image.mode, pixels.max()) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if "transparency" in image.info:  # a palette entry or PNG colour key marks transparent pixels
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _full_scale(mode: str, peak: float) -> float:
    """The white level of a wide greyscale image: 16 bits for I;16, else guessed from the peak value."""
    if mode.startswith("I;16"):
        return 65535.0
    for scale in (1.0, 255.0) if mode == "F" else (255.0,):
        if peak <= scale:
            return scale
    return 65535.0


def resize_and_crop(image: Image.Image, size: int, rng: random.Random | None = None) -> np.ndarray:
    """Shorter side resized to `size`, then a size x size crop: centred, or random when `rng` is given.

    Returns (size, size, 3) uint8.
    """
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        # reducing_gap: box-reduce by an integer factor first, then bicubic; near-identical output, much faster
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if rng is None:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left, top = rng.randint(0, new_w - size), rng.randint(0, new_h - size)
    return np.asarray(image.crop((left, top, left + size, top + size)))
