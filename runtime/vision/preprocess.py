"""Turning whatever a user passes into an RGB picture of a size the image tokenizer accepts.

Two resize rules (MODEL_SPEC §7), both "scale to cover, then center-crop", never padding:

- understanding: sides are multiples of 32 and the area lies in [128², 800²] (<= 448² each when one message
  carries several images), found like Qwen2-VL's `smart_resize`;
- editing: the crop size comes from a staircase of 32-multiples with area <= 512² and aspect <= 4:1, the one
  nearest the image's aspect.

The size functions are pure integer arithmetic over (width, height) so they can be tested on tables.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from runtime.errors import ImageInputError

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray

SIZE_FACTOR = 32
"""Every side handed to the tokenizer is a multiple of this (patch 16, and the decoder's x2 upsample)."""

UNDERSTANDING_MIN_PIXELS = 128 * 128
UNDERSTANDING_MAX_PIXELS = 800 * 800
UNDERSTANDING_MAX_PIXELS_SEVERAL = 448 * 448
EDITING_MAX_PIXELS = 512 * 512
EDITING_MAX_ASPECT = 4.0

MAX_SOURCE_PIXELS = 1 << 27
"""Images declaring more pixels than this (about 11600²) are refused before any pixel is decoded."""

MAX_WORKING_PIXELS = 4096 * 4096
"""Larger images are shrunk while loading; every resize target is far smaller, so no detail that matters is
lost, and no later step ever holds a full-size copy of a gigantic photo."""

_RESAMPLE = Image.Resampling.BICUBIC
_WHITE = (255, 255, 255)

# EXIF orientation tag values -> the transpose that shows the picture upright.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# What a broken file makes Pillow raise, depending on the plugin and on where the data stops.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


# --------------------------------------------------------------------------------------------------
# Size rules (pure)
# --------------------------------------------------------------------------------------------------


def understanding_size(width: int, height: int, *, several: bool = False) -> tuple[int, int]:
    """Return the (width, height) an image of this size is tokenised at for understanding.

    Sides are multiples of 32, the area is within [128², 800²] (or [128², 448²] with `several`), and the
    aspect stays as close to the original as that allows. Unlike the official code this also holds for extreme
    aspect ratios, where a side pinned at 32 would otherwise push the area past the limit.
    """
    _check_size(width, height)
    f = SIZE_FACTOR
    max_pixels = UNDERSTANDING_MAX_PIXELS_SEVERAL if several else UNDERSTANDING_MAX_PIXELS
    # Python's round (half to even) is what the official smart_resize uses.
    h = max(round(height / f) * f, f)
    w = max(round(width / f) * f, f)
    if h * w > max_pixels:
        scale = math.sqrt(max_pixels / (height * width))
        h = max(math.floor(height * scale / f) * f, f)
        w = max(math.floor(width * scale / f) * f, f)
    elif h * w < UNDERSTANDING_MIN_PIXELS:
        scale = math.sqrt(UNDERSTANDING_MIN_PIXELS / (height * width))
        h = math.ceil(height * scale / f) * f
        w = math.ceil(width * scale / f) * f
    if h * w > max_pixels:
        # Only reachable when one side was pinned at 32: shorten the long side until the area fits.
        if h >= w:
            h = max_pixels // w // f * f
        else:
            w = max_pixels // h // f * f
    return w, h


def editing_crop_sizes(
    max_pixels: int = EDITING_MAX_PIXELS, step: int = SIZE_FACTOR, max_aspect: float = EDITING_MAX_ASPECT
) -> list[tuple[int, int]]:
    """Return the staircase of candidate (width, height) crops for editing, widest first.

    In units of `step`, for each width `a` the heights run from floor(N/(a+1)) to floor(N/a) with
    N = max_pixels/step²: the cells on and just under the hyperbola a*b = N, the same set the official
    `generate_crop_size_list` walks. Sizes whose aspect exceeds `max_aspect` are left out.
    """
    n = max_pixels // (step * step)
    sizes = []
    for a in range(n, 0, -1):
        for b in range(max(1, n // (a + 1)), n // a + 1):
            if max(a, b) / min(a, b) <= max_aspect:
                sizes.append((a * step, b * step))
    return sizes


_EDITING_SIZES = editing_crop_sizes()


def editing_size(width: int, height: int) -> tuple[int, int]:
    """Return the (width, height) an image of this size is cropped to for editing: the staircase size nearest
    its aspect (ties go to the larger size, as in the official code)."""
    _check_size(width, height)

    def closeness(size: tuple[int, int]) -> tuple[float, int, int]:
        sx, sy = size[0] / width, size[1] / height
        return min(sx, sy) / max(sx, sy), size[0], size[1]

    return max(_EDITING_SIZES, key=closeness)


def cover_box(width: int, height: int, target_w: int, target_h: int) -> tuple[float, float, float, float]:
    """Return the centred source box (left, top, right, bottom) that, scaled to (target_w, target_h), covers
    the target: the image is scaled by the larger ratio and the overflow is cut evenly from both sides."""
    _check_size(width, height)
    scale = max(target_w / width, target_h / height)
    box_w, box_h = target_w / scale, target_h / scale
    left, top = (width - box_w) / 2, (height - box_h) / 2
    return left, top, left + box_w, top + box_h


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ImageInputError(f"image of size {width}x{height} has no pixels")


# --------------------------------------------------------------------------------------------------
# Resizing images
# --------------------------------------------------------------------------------------------------


def fit_for_understanding(img: Image.Image, *, several: bool = False) -> Image.Image:
    """Return an RGB copy of `img` scaled to cover and center-cropped to `understanding_size`."""
    return resize_cover(img, *understanding_size(*img.size, several=several))


def fit_for_editing(img: Image.Image) -> Image.Image:
    """Return an RGB copy of `img` scaled to cover and center-cropped to `editing_size` (never padded)."""
    return resize_cover(img, *editing_size(*img.size))


def resize_cover(img: Image.Image, target_w: int, target_h: int) -> Image.Image:
    """Return an RGB copy of `img` scaled to cover (target_w, target_h) and center-cropped to it."""
    rgb = to_rgb(img)
    # Resizing only the kept box in one call: no full-size intermediate, however extreme the aspect.
    return rgb.resize((target_w, target_h), _RESAMPLE, box=cover_box(*rgb.size, target_w, target_h))


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = MAX_WORKING_PIXELS,
    max_source_pixels: int = MAX_SOURCE_PIXELS,
) -> Image.Image:
    """Return the upright RGB picture in `source`, at most `max_pixels` large.

    `source` is a file path, encoded bytes, a PIL image or a numpy array (HxW, HxWx1, HxWx3 RGB or HxWx4 RGBA;
    uint8, uint16, bool, or float in [0, 1]). Transparency is composited on white, grayscale / CMYK / 16-bit
    are converted, the EXIF orientation is applied, an animation gives its first frame. Images declaring more
    than `max_source_pixels` are refused from their header alone; larger than `max_pixels` are shrunk while
    loading (JPEGs are decoded at reduced scale). Raises `ImageInputError` saying what is wrong otherwise.
    """
    with _opened(source) as img:
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageInputError(f"image has no pixels ({width}x{height})")
        if width * height > max_source_pixels:
            raise ImageInputError(
                f"image declares {width}x{height} = {width * height} pixels, above the limit of "
                f"{max_source_pixels}; refusing it (possible decompression bomb)"
            )
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        orientation = _orientation(img)
        if width * height > max_pixels and img.format == "JPEG":
            img.draft(None, _shrunk_size(width, height, max_pixels))
        try:
            img.load()
        except _DECODE_ERRORS as exc:
            if "truncated" in str(exc):
                raise ImageInputError(f"image data is truncated: {exc}") from exc
            raise ImageInputError(f"image data is corrupt: {exc}") from exc
        out = to_rgb(img)
        if out.width * out.height > max_pixels:
            out = out.resize(_shrunk_size(out.width, out.height, max_pixels), _RESAMPLE, reducing_gap=3.0)
        if orientation in _ORIENTATION:
            out = out.transpose(_ORIENTATION[orientation])
        # Never hand back the object that may still hold an open file or belongs to the caller.
        return out.copy() if out is img else out


def to_rgb(img: Image.Image) -> Image.Image:
    """Return `img` as 8-bit RGB: transparency composited on white, 16-bit and float scaled to 8 bits.

    Returns `img` itself when it already is plain RGB.
    """
    mode = img.mode
    if mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_to_uint8(np.asarray(img), mode)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (*_WHITE, 255)), rgba).convert("RGB")
    if mode == "RGB":
        return img
    if mode == "LAB":
        # Pillow's plain LAB -> RGB conversion copies channels; a colour transform is what the values mean.
        lab_to_srgb = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(img, lab_to_srgb)
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageInputError(f"unsupported pixel mode {mode!r}: {exc}") from exc


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    if mode.startswith("I;16"):
        scaled = arr.astype(np.float32) / 257.0
    elif mode == "I":
        # 32-bit integer images come from 16-bit sources (older Pillow opens 16-bit PNGs so) or from 8-bit
        # math; values above 255 can only mean the former.
        scaled = arr.astype(np.float32) / (257.0 if arr.max(initial=0) > 255 else 1.0)
    else:
        scaled = _float_to_unit(arr) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _float_to_unit(arr: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(arr)):
        raise ImageInputError("float image contains NaN or infinite values")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ImageInputError(
            f"float image values must lie in [0, 1]; got [{float(arr.min())}, {float(arr.max())}]"
        )
    return arr.astype(np.float32)


def _shrunk_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except _DECODE_ERRORS + (TypeError, KeyError):
        # A broken EXIF block is no reason to refuse the picture itself.
        return 1


@contextmanager
def _opened(source: ImageSource) -> Iterator[Image.Image]:
    if isinstance(source, Image.Image):
        yield source
        return
    if isinstance(source, np.ndarray):
        yield _from_array(source)
        return
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageInputError("image bytes are empty")
        fp: io.BytesIO | Path = io.BytesIO(data)
        what = f"{len(data)} bytes of image data"
    elif isinstance(source, (str, os.PathLike)):
        fp = Path(source)
        if not fp.is_file():
            raise ImageInputError(f"image file not found: {fp}")
        what = str(fp)
    else:
        raise ImageInputError(
            f"cannot read an image from a {type(source).__name__}; "
            "pass a path, bytes, a PIL image or an array"
        )
    try:
        img = Image.open(fp)
    except UnidentifiedImageError as exc:
        raise ImageInputError(f"{what}: not a recognised image format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"{what}: refused as a possible decompression bomb: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageInputError(f"{what}: unreadable image header: {exc}") from exc
    with img:
        yield img


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageInputError(
            f"array of shape {arr.shape} is not an image: expected HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA)"
        )
    if arr.size == 0:
        raise ImageInputError(f"array of shape {arr.shape} has no pixels")
    if arr.dtype == np.bool_:
        arr8 = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint8:
        arr8 = arr
    elif arr.dtype == np.uint16:
        arr8 = np.rint(arr.astype(np.float32) / 257.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() > 255:
            raise ImageInputError(
                f"integer image of dtype {arr.dtype} must hold values in [0, 255]; "
                f"got [{int(arr.min())}, {int(arr.max())}]"
            )
        arr8 = arr.astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        arr8 = np.rint(_float_to_unit(arr) * 255.0).astype(np.uint8)
    else:
        raise ImageInputError(f"arrays of dtype {arr.dtype} are not images")
    return Image.fromarray(np.ascontiguousarray(arr8))
