"""Image decoding and the training transform (datamodules/images.py), on images built in memory."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from datamodules.images import decode_image, resize_and_crop, to_rgb
from tests.samples import png_declaring

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int, height: int) -> np.ndarray:
    """A smooth RGB gradient: red left to right, green top to bottom, blue along the diagonal."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)], axis=-1
    ).astype(np.uint8)


def pixels(image: Image.Image) -> list:
    return np.asarray(image).tolist()


def assert_rgb_like(converted: Image.Image, original: Image.Image) -> None:
    assert converted.mode == "RGB"
    assert converted.size == original.size


# ---------------------------------------------------------------- to_rgb


def test_rgb_image_is_returned_unchanged():
    image = Image.new("RGB", (3, 2), (1, 2, 3))
    assert to_rgb(image) is image


def test_greyscale_l_is_replicated_to_three_channels():
    image = Image.new("L", (3, 1))
    image.putdata([0, 128, 255])
    rgb = to_rgb(image)
    assert_rgb_like(rgb, image)
    assert pixels(rgb) == [[[0, 0, 0], [128, 128, 128], [255, 255, 255]]]


def test_bilevel_1_maps_to_black_and_white():
    image = Image.new("1", (2, 1))
    image.putdata([0, 1])
    rgb = to_rgb(image)
    assert_rgb_like(rgb, image)
    assert pixels(rgb) == [[[0, 0, 0], [255, 255, 255]]]


def test_cmyk_is_converted_to_rgb():
    image = Image.new("CMYK", (3, 1))
    image.putdata([(0, 0, 0, 0), (0, 255, 255, 0), (0, 0, 0, 255)])  # paper white, red, full black ink
    rgb = to_rgb(image)
    assert_rgb_like(rgb, image)
    assert pixels(rgb) == [[[255, 255, 255], [255, 0, 0], [0, 0, 0]]]


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (3, 1))
    image.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128)])
    rgb = to_rgb(image)
    assert_rgb_like(rgb, image)
    transparent, opaque, half = pixels(rgb)[0]
    assert transparent == [255, 255, 255]
    assert opaque == [10, 20, 30]
    assert all(abs(c - 127) <= 1 for c in half)  # black at 50% alpha over white is mid grey


def test_la_is_composited_on_white():
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 0), (50, 255)])
    rgb = to_rgb(image)
    assert_rgb_like(rgb, image)
    assert pixels(rgb) == [[[255, 255, 255], [50, 50, 50]]]


def palette_image(transparent_index: int | None) -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (253 * 3))
    image.putdata([0, 1, 2])
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def test_palette_without_transparency_keeps_palette_colours():
    image = palette_image(None)
    rgb = to_rgb(image)
    assert_rgb_like(rgb, image)
    assert pixels(rgb) == [[[0, 0, 0], list(RED), list(BLUE)]]


def test_palette_transparency_entry_becomes_white():
    image = palette_image(transparent_index=0)
    rgb = to_rgb(image)
    assert_rgb_like(rgb, image)
    assert pixels(rgb) == [[list(WHITE), list(RED), list(BLUE)]]


def test_palette_transparency_survives_a_png_round_trip():
    data = encode(palette_image(None), "PNG", transparency=2)
    assert pixels(decode_image(data)) == [[[0, 0, 0], list(RED), list(WHITE)]]


def test_16_bit_greyscale_is_scaled_not_clipped():
    image = Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16))
    assert image.mode == "I;16"
    rgb = to_rgb(image)
    assert_rgb_like(rgb, image)
    grey = np.asarray(rgb)[0, :, 0].tolist()
    assert grey == [0, 1, 128, 255]  # PIL's own convert("RGB") would give [0, 255, 255, 255]
    assert (np.asarray(rgb) == np.asarray(rgb)[..., :1]).all()


def test_16_bit_big_endian_greyscale_is_scaled():
    values = np.array([[0, 32768, 65535]], dtype=">u2")
    image = Image.frombytes("I;16B", (3, 1), values.tobytes())
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 128, 255]


def test_16_bit_png_decodes_scaled():
    image = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    rgb = decode_image(encode(image, "PNG"))
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 255]


def test_32_bit_integer_greyscale_is_scaled_as_16_bit_range():
    image = Image.fromarray(np.array([[0, 32768, 65535], [1, 2, 3]], dtype=np.int32))
    assert image.mode == "I"
    rgb = to_rgb(image)
    assert_rgb_like(rgb, image)
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 255]


def test_float_greyscale_in_unit_range_is_scaled():
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert image.mode == "F"
    rgb = to_rgb(image)
    assert_rgb_like(rgb, image)
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 255]


def test_float_greyscale_above_one_is_read_as_16_bit_range():
    image = Image.fromarray(np.array([[0.0, 32768.0, 65535.0]], dtype=np.float32))
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 128, 255]


# Found while writing these tests: a tRNS chunk on a greyscale or truecolour PNG is a transparent
# colour key, which PIL keeps in image.info["transparency"]; to_rgb only honours it for mode "P".
def test_greyscale_png_transparent_colour_becomes_white():
    image = Image.new("L", (2, 1))
    image.putdata([0, 200])
    assert pixels(decode_image(encode(image, "PNG", transparency=0))) == [[list(WHITE), [200, 200, 200]]]


def test_truecolour_png_transparent_colour_becomes_white():
    image = Image.new("RGB", (2, 1))
    image.putdata([(0, 0, 0), (10, 20, 30)])
    assert pixels(decode_image(encode(image, "PNG", transparency=(0, 0, 0)))) == [[list(WHITE), [10, 20, 30]]]


# ---------------------------------------------------------------- decode_image


@pytest.mark.parametrize(
    "fmt, mode",
    [("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"), ("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK")]
    + [("WEBP", "RGB"), ("WEBP", "RGBA")],
)
def test_decode_returns_rgb_of_the_same_size(fmt, mode):
    image = Image.fromarray(gradient(40, 30)).convert(mode)
    decoded = decode_image(encode(image, fmt))
    assert decoded.mode == "RGB"
    assert decoded.size == (40, 30)


def test_decoded_png_is_lossless():
    array = gradient(40, 30)
    assert np.array_equal(np.asarray(decode_image(encode(Image.fromarray(array), "PNG"))), array)


def test_decoded_jpeg_is_close_to_the_original():
    array = gradient(64, 48)
    decoded = np.asarray(decode_image(encode(Image.fromarray(array), "JPEG", quality=95)))
    assert np.abs(decoded.astype(int) - array).mean() < 2


def test_truncated_jpeg_raises_oserror():
    data = encode(Image.fromarray(gradient(256, 256)), "JPEG")
    with pytest.raises(OSError):
        decode_image(data[: len(data) // 2])


def test_truncated_png_raises_oserror():
    data = encode(Image.fromarray(gradient(256, 256)), "PNG")
    with pytest.raises(OSError):
        decode_image(data[: len(data) // 2])


def test_random_bytes_raise_oserror():
    data = random.Random(0).randbytes(4096)
    with pytest.raises(OSError):
        decode_image(data)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64])
def test_garbage_data_raises_oserror(data):
    with pytest.raises(OSError):
        decode_image(data)


def test_zero_size_image_cannot_be_decoded():
    with pytest.raises(ValueError):  # PIL refuses to even write one
        encode(Image.new("RGB", (0, 0)), "PNG")
    with pytest.raises(OSError):
        decode_image(png_declaring(0, 0))


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return encode(Image.fromarray(gradient(1024, 768)), "JPEG", quality=95)


def test_jpeg_with_min_side_is_decoded_reduced_but_covers_min_side(large_jpeg):
    reduced = decode_image(large_jpeg, min_side=256)
    assert reduced.mode == "RGB"
    assert reduced.size == (512, 384)  # 1/2 scale: 1/4 would make the shorter side 192 < 256
    assert min(reduced.size) >= 256


@pytest.mark.parametrize(
    "min_side, size",
    [(100, (256, 192)), (192, (256, 192)), (193, (512, 384)), (384, (512, 384)), (385, (1024, 768)), (2000, (1024, 768))],
)
def test_jpeg_draft_picks_the_smallest_scale_covering_min_side(large_jpeg, min_side, size):
    decoded = decode_image(large_jpeg, min_side=min_side)
    assert decoded.size == size
    assert min(decoded.size) >= min(min_side, 768)


def test_jpeg_without_min_side_is_decoded_full_size(large_jpeg):
    assert decode_image(large_jpeg).size == (1024, 768)


def test_reduced_jpeg_decode_matches_full_decode_after_resize(large_jpeg):
    full = resize_and_crop(decode_image(large_jpeg), 256).astype(int)
    reduced = resize_and_crop(decode_image(large_jpeg, min_side=256), 256).astype(int)
    assert full.shape == reduced.shape == (256, 256, 3)
    assert np.abs(full - reduced).mean() < 3


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_reduced_jpeg_decode_of_other_modes_is_rgb(mode):
    data = encode(Image.fromarray(gradient(1024, 768)).convert(mode), "JPEG")
    decoded = decode_image(data, min_side=256)
    assert decoded.mode == "RGB"
    assert decoded.size == (512, 384)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_min_side_is_ignored_for_non_jpeg(fmt):
    data = encode(Image.fromarray(gradient(1024, 768)), fmt)
    assert decode_image(data, min_side=256).size == (1024, 768)


# ---------------------------------------------------------------- resize_and_crop


@pytest.mark.parametrize(
    "width, height",
    [(300, 100), (100, 300), (128, 128), (64, 64), (65, 64), (20, 10), (10, 20), (1, 1), (1000, 7)],
    ids=["landscape", "portrait", "square", "exact", "one-wider", "small-landscape", "small-portrait", "1px", "sliver"],
)
def test_resize_and_crop_returns_size_square_uint8(width, height):
    image = Image.fromarray(gradient(max(width, 2), max(height, 2))).resize((width, height))
    for rng in (None, random.Random(0)):
        out = resize_and_crop(image, 64, rng)
        assert out.shape == (64, 64, 3)
        assert out.dtype == np.uint8


def test_image_of_exactly_size_is_returned_untouched():
    array = gradient(64, 64)
    assert np.array_equal(resize_and_crop(Image.fromarray(array), 64), array)
    assert np.array_equal(resize_and_crop(Image.fromarray(array), 64, random.Random(3)), array)


def test_centre_crop_takes_the_middle_without_resizing_when_shorter_side_fits():
    array = gradient(96, 64)  # shorter side already 64: only the crop happens
    assert np.array_equal(resize_and_crop(Image.fromarray(array), 64), array[:, 16:80])
    portrait = gradient(64, 101)
    assert np.array_equal(resize_and_crop(Image.fromarray(portrait), 64), portrait[18:82])


def test_centre_crop_is_deterministic():
    image = Image.fromarray(gradient(300, 200))
    assert np.array_equal(resize_and_crop(image, 64), resize_and_crop(image, 64))


def test_small_image_is_upscaled_to_fill_the_crop():
    image = Image.new("RGB", (8, 4), (10, 200, 30))
    out = resize_and_crop(image, 32)
    assert out.shape == (32, 32, 3)
    assert (out == [10, 200, 30]).all()


def test_random_crop_is_reproducible_for_the_same_seed():
    image = Image.fromarray(gradient(400, 100))
    first = resize_and_crop(image, 64, random.Random(7))
    second = resize_and_crop(image, 64, random.Random(7))
    assert np.array_equal(first, second)


def test_random_crop_picks_the_window_its_rng_draws():
    array = gradient(160, 64)  # no resize: the crop is a plain window of the array
    rng = random.Random(11)
    expected_left, expected_top = random.Random(11).randint(0, 96), 0
    out = resize_and_crop(Image.fromarray(array), 64, rng)
    assert np.array_equal(out, array[expected_top : expected_top + 64, expected_left : expected_left + 64])


def test_random_crop_differs_across_seeds_on_an_elongated_image():
    image = Image.fromarray(gradient(400, 100))
    crops = [resize_and_crop(image, 64, random.Random(seed)) for seed in range(8)]
    distinct = {crop.tobytes() for crop in crops}
    assert len(distinct) >= 4
    assert not np.array_equal(crops[0], crops[1])


def test_random_crop_of_a_square_image_has_no_freedom():
    image = Image.fromarray(gradient(100, 100))
    crops = {resize_and_crop(image, 64, random.Random(seed)).tobytes() for seed in range(5)}
    assert crops == {resize_and_crop(image, 64).tobytes()}


def test_centre_crop_of_two_to_one_image_keeps_both_halves():
    array = np.zeros((100, 200, 3), dtype=np.uint8)
    array[:, :100] = RED
    array[:, 100:] = BLUE
    out = resize_and_crop(Image.fromarray(array), 64)
    assert out.shape == (64, 64, 3)
    assert (out[:, :28] == RED).all()
    assert (out[:, 36:] == BLUE).all()
    # the seam is in the middle: half the crop's columns are mostly red
    red_columns = (out[..., 0].astype(int) > out[..., 2]).all(axis=0).sum()
    assert red_columns == 32
