"""Image decoding and the training transform: any PIL mode to RGB, shorter side to size, crop.

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
# what PIL raises for bytes that are not a whole, sane image
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
ORIENTATION_TAG = 0x0112


def decode_image(data: bytes, min_side: int | None = None) -> Image.Image:
    """Fully decoded RGB image; a JPEG whose shorter side is far above `min_side` is decoded reduced.

    Raises OSError (or PIL.Image.DecompressionBombError) for data that is not a whole image.
    """
    image = Image.open(io.BytesIO(data))
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
