"""Real photographs go the whole way: load -> fit -> encode -> decode, on tiny weights in the official layout.

The tokenizer and decoder are loaded from disk exactly as a real checkpoint is (`ImageTokenizer.from_folder`,
`ImageDecoder(root)`); only the sizes of the random weights differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.testing.vision import write_tiny_vision_checkpoint
from runtime.vision.decoder import ImageDecoder
from runtime.vision.encoder import ImageTokenizer
from runtime.vision.preprocess import (
    editing_size,
    fit_for_editing,
    fit_for_understanding,
    load_image,
    understanding_size,
)

PHOTOS = sorted((Path(__file__).parent / "data" / "photos").glob("*.jpg"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_tiny_vision_checkpoint(tmp_path_factory.mktemp("vision"), seed=0)


@pytest.fixture(scope="module")
def tokenizer(root) -> ImageTokenizer:
    return ImageTokenizer.from_folder(root / "image_tokenizer")


@pytest.fixture(scope="module")
def decoder(root) -> ImageDecoder:
    return ImageDecoder(root)


def test_the_photos_are_there():
    assert {p.name for p in PHOTOS} == {"rocket.jpg", "chelsea.jpg"}


@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.name)
def test_photo_round_trip_for_understanding(path, tokenizer, decoder):
    photo = load_image(path)
    assert photo.mode == "RGB" and photo.size == Image.open(path).size
    fitted = fit_for_understanding(photo)
    assert fitted.size == understanding_size(*photo.size)
    (enc,) = tokenizer.encode([fitted])
    assert (enc.w * 16, enc.h * 16) == fitted.size and len(enc.codes) == enc.h * enc.w
    picture = decoder.decode(
        enc.codes, enc.h, enc.w, mode="turbo", steps=1, generator=torch.Generator().manual_seed(0)
    )
    assert picture.size == (2 * fitted.width, 2 * fitted.height)
    assert np.asarray(picture).std() > 0


@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.name)
def test_photo_round_trip_for_editing(path, tokenizer, decoder):
    photo = load_image(path.read_bytes())
    fitted = fit_for_editing(photo)
    assert fitted.size == editing_size(*photo.size)
    (enc,) = tokenizer.encode([fitted])
    picture = decoder.decode(
        enc.codes, enc.h, enc.w, mode="normal", steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert picture.size == (32 * enc.w, 32 * enc.h) == (2 * fitted.width, 2 * fitted.height)


def test_several_photos_in_one_message_encode_in_one_batch(tokenizer):
    photos = [fit_for_understanding(load_image(p), several=True) for p in PHOTOS]
    batch = tokenizer.encode(photos)
    assert [(e.w * 16, e.h * 16) for e in batch] == [p.size for p in photos]
    assert all(e.w * e.h * 256 <= 448 * 448 for e in batch)
    assert batch == [tokenizer.encode([p])[0] for p in photos]
