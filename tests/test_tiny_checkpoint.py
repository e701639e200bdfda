"""Specification of the bundled tiny checkpoint: it loads through the same loaders as the real one and is sane.

Sanity only (shapes, layout, determinism, a scene surviving the image tokenizer); what the model can do is
tested through the SDK.
"""

from __future__ import annotations

import json

import pytest
import torch

from runtime.checkpoint import TINY_CHECKPOINT, load_backbone, resolve_source
from runtime.conversation import UNDERSTANDING_SYSTEM, ConversationFormat, ImageCodes, Turn, vocab_layout
from runtime.generate import TextOptions, generate_text
from runtime.tiny.world import Scene, Shape, render
from runtime.tokens import TokenCodec
from runtime.vision.decoder import ImageDecoder
from runtime.vision.encoder import ImageTokenizer

SCENE = Scene.of(Shape("circle", "red", "top-left"), Shape("triangle", "blue", "center"))
# The code layout of the tiny tokenizer: cell * 19 + content (0 empty, 1 + shape * 6 + color).
SCENE_CODES = [1, 19, 38, 57, 91, 95, 114, 133, 152]


@pytest.fixture(scope="module")
def codec() -> TokenCodec:
    return TokenCodec.from_pretrained(TINY_CHECKPOINT)


@pytest.fixture(scope="module")
def image_tokenizer() -> ImageTokenizer:
    return ImageTokenizer.from_folder(TINY_CHECKPOINT / "image_tokenizer")


def test_tiny_resolves_to_the_bundled_folder():
    assert resolve_source("tiny") == TINY_CHECKPOINT


def test_the_checkpoint_has_every_component_of_the_official_layout():
    expected = [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "image_tokenizer/config.json", "image_tokenizer/preprocessor_config.json",
        "image_tokenizer/sigvq_embedding.pt", "decoder/config.json", "decoder/model.safetensors",
        "decoder-turbo/config.json", "decoder-turbo/model.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert [name for name in expected if not (TINY_CHECKPOINT / name).is_file()] == []
    assert list((TINY_CHECKPOINT / "image_tokenizer").glob("*.safetensors"))


def test_the_checkpoint_stays_small():
    total = sum(f.stat().st_size for f in TINY_CHECKPOINT.rglob("*") if f.is_file())
    assert total < 40 * 2**20


def test_the_preprocessor_config_asks_for_48_pixel_pictures():
    config = json.loads((TINY_CHECKPOINT / "image_tokenizer" / "preprocessor_config.json").read_text())
    assert config["size"] == {"height": 48, "width": 48}
    assert config["patch_size"] == 16


def test_the_tokenizer_places_image_codes_after_the_text_vocabulary(codec):
    config = json.loads((TINY_CHECKPOINT / "config.json").read_text())
    assert codec.vocab_size == config["vocab_size"] == len(codec.tokenizer)
    assert codec.tokenizer.convert_tokens_to_ids("<IMAGE0>") == config["image_token_offset"]
    assert codec.special.eos == config["eos_token_id"]
    assert codec.special.mask == config["mask_token_id"]
    assert codec.grid_token_id(3) != codec.grid_token_id(4)


def test_world_words_are_single_tokens(codec):
    for word in (" red", " purple", " triangle", " square", " circle", " center"):
        assert len(codec.encode_text(word)) == 1, word


def test_the_backbone_loads_strictly_and_gives_finite_logits(codec):
    model = load_backbone(TINY_CHECKPOINT)
    assert model.config.num_experts > model.config.num_experts_per_tok
    ids = torch.tensor([codec.encode_text("draw a red circle at the top.")])
    positions = torch.arange(ids.shape[1])[None]
    logits = model(ids, positions).logits
    assert logits.shape == (1, ids.shape[1], codec.vocab_size)
    assert torch.isfinite(logits).all()


def test_the_image_tokenizer_turns_a_clean_picture_into_one_code_per_cell(image_tokenizer):
    (encoded,) = image_tokenizer.encode([render(SCENE, 48)])
    assert (encoded.h, encoded.w) == (3, 3)
    assert encoded.codes == SCENE_CODES


def test_the_image_tokenizer_reads_a_larger_render_resized_to_48(image_tokenizer):
    from PIL import Image

    picture = render(SCENE, 96).resize((48, 48), Image.Resampling.BICUBIC)
    assert image_tokenizer.encode([picture])[0].codes == SCENE_CODES


@pytest.mark.parametrize("mode, steps", [("turbo", 2), ("normal", 3)])
def test_the_decoders_draw_96_pixel_pictures_deterministically(mode, steps):
    decoder = ImageDecoder(TINY_CHECKPOINT)
    first = decoder.decode(SCENE_CODES, 3, 3, mode=mode, steps=steps, generator=torch.Generator().manual_seed(0))
    again = decoder.decode(SCENE_CODES, 3, 3, mode=mode, steps=steps, generator=torch.Generator().manual_seed(0))
    assert first.size == (96, 96)
    assert first.tobytes() == again.tobytes()


def test_an_understanding_prompt_generates_text_that_ends(codec):
    model = load_backbone(TINY_CHECKPOINT)
    fmt = ConversationFormat(codec)
    prompt = fmt.prompt(UNDERSTANDING_SYSTEM, [Turn("HUMAN", (ImageCodes(3, 3, tuple(SCENE_CODES)),
                                                             "describe the image."))])
    result = generate_text(model, prompt, vocab_layout(codec), TextOptions(max_new_tokens=64))
    assert result.finish_reason == "stop"
    assert all(not codec.is_image_id(i) for i in result.ids)
