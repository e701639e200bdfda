"""Specification of runtime.vision.preprocess: the two resize rules and loading every kind of user image."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.errors import ImageInputError
from runtime.vision.preprocess import (
    cover_box,
    editing_crop_sizes,
    editing_size,
    fit_for_editing,
    fit_for_understanding,
    load_image,
    understanding_size,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encoded(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def halves(width: int, height: int, left=RED, right=BLUE) -> Image.Image:
    """Left half `left`, right half `right`."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = left
    arr[:, width // 2 :] = right
    return Image.fromarray(arr)


def close_to(pixel, expected, tol=8) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


# --------------------------------------------------------------------------------------------------
# Understanding size
# --------------------------------------------------------------------------------------------------

UNDERSTANDING_TABLE = [
    # (width, height, several) -> (width, height), each checked by hand
    ((640, 480, False), (640, 480)),  # already multiples of 32, inside the bounds
    ((1, 1, False), (128, 128)),  # tiny: scaled up to the 128² minimum
    ((10, 10, False), (128, 128)),
    ((208, 208, False), (192, 192)),  # 6.5 patches rounds half to even -> 6
    ((240, 240, False), (256, 256)),  # 7.5 -> 8
    ((801, 801, False), (800, 800)),
    ((4000, 3000, False), (896, 672)),  # huge: sqrt(800²/12e6) = 0.2309 -> floor(28.87), floor(21.65) patches
    ((4000, 3000, True), (512, 384)),  # several images: the 448² budget
    ((48, 1000, False), (64, 992)),  # 1.5 patches rounds to 2
    ((100000, 1, False), (20000, 32)),  # extreme aspect: long side cut so the area stays <= 800²
    ((1, 100000, False), (32, 20000)),
    ((5000, 20, True), (4992, 32)),
]


@pytest.mark.parametrize(("source", "expected"), UNDERSTANDING_TABLE)
def test_understanding_size_table(source, expected):
    width, height, several = source
    assert understanding_size(width, height, several=several) == expected


@pytest.mark.parametrize("several", [False, True])
@pytest.mark.parametrize(
    "size", [(1, 1), (31, 33), (127, 129), (500, 375), (3000, 2000), (7, 9000), (12000, 11000), (65535, 3)]
)
def test_understanding_size_is_32_multiples_within_the_pixel_bounds(size, several):
    w, h = understanding_size(*size, several=several)
    assert w % 32 == 0 and h % 32 == 0
    assert 128 * 128 <= w * h <= (448 * 448 if several else 800 * 800)


# --------------------------------------------------------------------------------------------------
# Editing size
# --------------------------------------------------------------------------------------------------


def test_editing_staircase_is_32_multiples_up_to_512_squared_and_4_to_1():
    sizes = editing_crop_sizes()
    assert (512, 512) in sizes and (1024, 256) in sizes and (256, 1024) in sizes
    for w, h in sizes:
        assert w % 32 == 0 and h % 32 == 0
        assert w * h <= 512 * 512
        assert max(w, h) / min(w, h) <= 4


EDITING_TABLE = [
    ((1000, 1000), (512, 512)),
    ((1, 1), (512, 512)),  # tiny images are scaled up, never padded
    ((2000, 1000), (704, 352)),  # exactly 2:1 exists on the staircase (22 x 11 patches)
    ((1000, 2000), (352, 704)),
    ((10000, 10), (1024, 256)),  # extreme aspects stop at 4:1
    ((10, 10000), (256, 1024)),
    ((1920, 1080), (672, 384)),
    ((4000, 3000), (576, 448)),
]


@pytest.mark.parametrize(("source", "expected"), EDITING_TABLE)
def test_editing_size_table(source, expected):
    assert editing_size(*source) == expected


# --------------------------------------------------------------------------------------------------
# Fitting images
# --------------------------------------------------------------------------------------------------


def test_cover_box_scales_by_the_larger_ratio_and_crops_the_centre():
    assert cover_box(200, 100, 100, 100) == (50.0, 0.0, 150.0, 100.0)
    assert cover_box(100, 400, 50, 100) == (0.0, 100.0, 100.0, 300.0)


def test_fit_for_editing_resizes_a_small_image_instead_of_padding_it():
    small = Image.new("RGB", (40, 30), RED)
    out = fit_for_editing(small)
    assert out.size == editing_size(40, 30)
    assert np.all(np.asarray(out) == RED)  # no black border anywhere


def test_fit_for_understanding_crops_the_centre_of_a_wide_image():
    # 3 vertical stripes red | white | blue on a 3:1 image fitted to a square keeps mostly the middle one.
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :100], arr[:, 100:200], arr[:, 200:] = RED, WHITE, BLUE
    fitted = fit_for_understanding(Image.fromarray(arr))
    w, h = fitted.size
    assert (w, h) == understanding_size(300, 100)
    assert close_to(fitted.getpixel((w // 2, h // 2)), WHITE)
    assert close_to(fitted.getpixel((0, h // 2)), RED)
    assert close_to(fitted.getpixel((w - 1, h // 2)), BLUE)


@pytest.mark.parametrize("size", [(13, 7), (300, 200), (2000, 40), (40, 2000)])
def test_fitted_images_have_the_rule_sizes(size):
    img = Image.new("RGB", size, RED)
    assert fit_for_understanding(img).size == understanding_size(*size)
    assert fit_for_understanding(img, several=True).size == understanding_size(*size, several=True)
    assert fit_for_editing(img).size == editing_size(*size)


def test_fit_accepts_non_rgb_and_returns_rgb():
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    out = fit_for_editing(rgba)
    assert out.mode == "RGB" and close_to(out.getpixel((0, 0)), WHITE, tol=0)


# --------------------------------------------------------------------------------------------------
# Loading: sources
# --------------------------------------------------------------------------------------------------


def test_load_from_path_str_path_bytes_and_pil(tmp_path: Path):
    img = halves(64, 32)
    data = encoded(img, "PNG")
    file = tmp_path / "x.png"
    file.write_bytes(data)
    for source in (str(file), file, data, bytearray(data), memoryview(data), img):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (64, 32)
        assert np.array_equal(np.asarray(out), np.asarray(img))


def test_load_never_returns_or_changes_the_callers_image():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    out = load_image(img)
    assert out is not img and img.mode == "RGBA"
    rgb = Image.new("RGB", (8, 8), RED)
    assert load_image(rgb) is not rgb


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((4, 6), 200, np.uint8), (200, 200, 200)),
        (np.full((4, 6, 1), 200, np.uint8), (200, 200, 200)),
        (np.full((4, 6, 3), (1, 2, 3), np.uint8), (1, 2, 3)),
        (np.full((4, 6, 4), (255, 0, 0, 0), np.uint8), WHITE),  # fully transparent -> white
        (np.full((4, 6, 3), 65535, np.uint16), WHITE),
        (np.full((4, 6, 3), 257 * 100, np.uint16), (100, 100, 100)),
        (np.full((4, 6, 3), 0.5, np.float32), (128, 128, 128)),
        (np.ones((4, 6), bool), WHITE),
        (np.full((4, 6, 3), 7, np.int64), (7, 7, 7)),
    ],
)
def test_load_numpy_arrays(array, expected):
    out = load_image(array)
    assert out.mode == "RGB" and out.size == (6, 4)
    assert out.getpixel((0, 0)) == expected


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros((4, 6, 2), np.uint8), "not an image"),
        (np.zeros((2, 4, 6, 3), np.uint8), "not an image"),
        (np.zeros((0, 6, 3), np.uint8), "no pixels"),
        (np.full((4, 6, 3), 2.0, np.float32), r"\[0, 1\]"),
        (np.full((4, 6, 3), np.nan, np.float32), "NaN"),
        (np.full((4, 6, 3), 300, np.int32), r"\[0, 255\]"),
        (np.zeros((4, 6, 3), np.complex64), "dtype"),
    ],
)
def test_load_rejects_arrays_that_are_not_images(array, problem):
    with pytest.raises(ImageInputError, match=problem):
        load_image(array)


# --------------------------------------------------------------------------------------------------
# Loading: odd kinds of images
# --------------------------------------------------------------------------------------------------


def test_rgba_is_composited_on_white():
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255
    arr[0, 0, 3], arr[0, 1, 3], arr[0, 2, 3] = 0, 255, 128
    out = load_image(encoded(Image.fromarray(arr), "PNG"))
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == RED
    assert close_to(out.getpixel((2, 0)), (255, 127, 127), tol=1)


def test_la_is_composited_on_white():
    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((1, 1), (0, 255))
    out = load_image(encoded(la, "PNG"))
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 1)) == (0, 0, 0)


def test_palette_gif_with_a_transparent_index_is_composited_on_white():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 0)
    out = load_image(encoded(p, "GIF", transparency=1))
    assert out.getpixel((0, 0)) == RED and out.getpixel((3, 3)) == WHITE


def test_palette_png_with_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    p = rgba.convert("P")
    out = load_image(encoded(p, "PNG"))
    assert out.getpixel((0, 0)) == BLUE and out.getpixel((2, 2)) == WHITE


def test_grayscale_becomes_three_equal_channels():
    out = load_image(encoded(Image.new("L", (5, 5), 77), "PNG"))
    assert out.mode == "RGB" and out.getpixel((2, 2)) == (77, 77, 77)


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # full magenta + yellow = red
    out = load_image(encoded(cmyk, "JPEG", quality=95))
    assert out.mode == "RGB" and close_to(out.getpixel((8, 8)), RED, tol=12)


def test_lab_image_is_colour_converted():
    out = load_image(Image.new("LAB", (4, 4), (128, 128, 128)))  # L = 50 %, neutral a and b
    assert close_to(out.getpixel((0, 0)), (119, 119, 119), tol=2)


def test_16_bit_grayscale_png_is_scaled_not_clipped():
    arr = np.full((4, 4), 32896, np.uint16)  # 128 * 257
    arr[0, 0] = 65535
    out = load_image(encoded(Image.fromarray(arr), "PNG"))
    assert out.getpixel((1, 1)) == (128, 128, 128)
    assert out.getpixel((0, 0)) == WHITE


def test_32_bit_float_image_is_read_as_unit_range():
    out = load_image(Image.fromarray(np.full((3, 3), 0.25, np.float32)))
    assert out.getpixel((0, 0)) == (64, 64, 64)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt):
    img = halves(40, 20)  # red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a quarter turn clockwise
    out = load_image(encoded(img, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {})))
    assert out.size == (20, 40)
    assert close_to(out.getpixel((10, 5)), RED, tol=20)  # the left half is now on top
    assert close_to(out.getpixel((10, 34)), BLUE, tol=20)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = load_image(data)
    assert close_to(out.getpixel((4, 4)), RED, tol=0)


def test_animated_pil_image_on_a_later_frame_gives_the_first_frame():
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    anim = Image.open(io.BytesIO(encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])))
    anim.seek(1)
    assert close_to(load_image(anim).getpixel((4, 4)), RED, tol=0)


# --------------------------------------------------------------------------------------------------
# Loading: hostile and broken inputs
# --------------------------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data stream holds a handful of bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_from_its_header():
    with pytest.raises(ImageInputError, match="decompression bomb"):
        load_image(png_header_only(60000, 60000))


def test_image_above_the_source_limit_is_refused_by_name():
    with pytest.raises(ImageInputError, match=r"declares 300x200 = 60000 pixels"):
        load_image(encoded(Image.new("RGB", (300, 200)), "PNG"), max_source_pixels=50000)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_image_is_downscaled_while_loading(fmt):
    img = halves(1000, 800)
    out = load_image(encoded(img, fmt), max_pixels=100 * 100)
    assert out.width * out.height <= 100 * 100
    assert out.width / out.height == pytest.approx(1.25, rel=0.05)
    assert close_to(out.getpixel((5, 40)), RED, tol=20) and close_to(
        out.getpixel((out.width - 5, 40)), BLUE, tol=20
    )


def test_truncated_jpeg_raises_naming_truncation():
    data = encoded(halves(256, 256), "JPEG")
    with pytest.raises(ImageInputError, match="truncated"):
        load_image(data[: len(data) // 2])


def test_truncated_png_raises_a_typed_error():
    data = encoded(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG"
    )
    with pytest.raises(ImageInputError, match="truncated|corrupt"):
        load_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        (b"definitely not an image", "not a recognised image format"),
        (b"", "empty"),
        ("/nonexistent/picture.png", "not found"),
        (12345, "cannot read an image from a int"),
    ],
)
def test_bad_sources_raise_typed_errors(source, problem):
    with pytest.raises(ImageInputError, match=problem):
        load_image(source)
