"""Specification of runtime.vision.encoder on random-weight tiny tokenizers in the official layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from runtime.errors import CheckpointError, ImageInputError, MissingTensorsError
from runtime.testing.vision import TOKENIZER_WEIGHTS, write_tiny_vision_checkpoint
from runtime.vision.encoder import EncodedImage, ImageTokenizer, resample_position_table


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_tiny_vision_checkpoint(tmp_path_factory.mktemp("vision"), seed=0, num_codes=64)


@pytest.fixture(scope="module")
def tokenizer(root) -> ImageTokenizer:
    return ImageTokenizer.from_folder(root / "image_tokenizer")


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random picture: low-frequency colour noise upsampled, like a photo more than like static."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC)


# --------------------------------------------------------------------------------------------------
# Position table
# --------------------------------------------------------------------------------------------------


def test_position_table_2x2_resampled_to_4x4_matches_hand_computation():
    a, b, c, d = 1.0, 2.0, 3.0, 5.0
    table = torch.tensor([[a], [b], [c], [d]])  # the 2x2 table [[a, b], [c, d]], one channel
    out = resample_position_table(table, 4, 4).view(4, 4)
    # Target cell centres fall at source coordinates -0.25, 0.25, 0.75, 1.25, clamped to [0, 1].
    weights = [0.0, 0.25, 0.75, 1.0]
    top = [a + (b - a) * u for u in weights]
    bottom = [c + (d - c) * u for u in weights]
    expected = torch.tensor([[t + (bt - t) * v for t, bt in zip(top, bottom)] for v in weights])
    torch.testing.assert_close(out, expected)


def test_position_table_2x2_resampled_to_1x1_is_the_mean_and_to_2x2_is_itself():
    table = torch.tensor([[1.0, -1.0], [2.0, 0.0], [3.0, 4.0], [5.0, 8.0]])
    torch.testing.assert_close(resample_position_table(table, 1, 1), table.mean(0, keepdim=True))
    torch.testing.assert_close(resample_position_table(table, 2, 2), table)


def test_position_table_2x2_resampled_to_a_1x2_row_averages_the_columns():
    table = torch.tensor([[1.0], [2.0], [3.0], [5.0]])
    torch.testing.assert_close(resample_position_table(table, 1, 2), torch.tensor([[2.0], [3.5]]))


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def test_config_comes_from_the_folder(tokenizer):
    assert tokenizer.num_codes == 64
    assert tokenizer.patch_size == 16
    assert tokenizer.config.depth == 2 and tokenizer.config.hidden_size == 32


@pytest.mark.parametrize(
    ("size", "grid"), [((64, 64), (4, 4)), ((96, 32), (2, 6)), ((32, 128), (8, 2)), ((16, 16), (1, 1))]
)
def test_grid_is_sixteen_pixels_per_cell(tokenizer, size, grid):
    (enc,) = tokenizer.encode([picture(*size)])
    assert isinstance(enc, EncodedImage)
    assert (enc.h, enc.w) == grid
    assert len(enc.codes) == grid[0] * grid[1]
    assert all(isinstance(c, int) and 0 <= c < tokenizer.num_codes for c in enc.codes)


def test_codes_are_stable_under_re_encoding(root, tokenizer):
    img = picture(64, 48)
    first = tokenizer.encode([img])[0]
    assert tokenizer.encode([img])[0] == first
    assert tokenizer.encode([img.copy()])[0] == first
    assert ImageTokenizer.from_folder(root / "image_tokenizer").encode([img])[0] == first


def test_codes_change_when_the_image_changes(tokenizer):
    first = tokenizer.encode([picture(64, 64, seed=1)])[0].codes
    second = tokenizer.encode([picture(64, 64, seed=2)])[0].codes
    assert first != second


def test_batch_of_different_sizes_equals_encoding_each_alone(tokenizer):
    images = [picture(64, 64, 1), picture(96, 32, 2), picture(32, 160, 3), picture(64, 64, 4)]
    batch = tokenizer.encode(images)
    assert [(e.h, e.w) for e in batch] == [(4, 4), (2, 6), (10, 2), (4, 4)]
    assert batch == [tokenizer.encode([img])[0] for img in images]


def test_empty_batch_gives_no_results(tokenizer):
    assert tokenizer.encode([]) == []


def test_transparent_image_is_encoded_as_composited_on_white(tokenizer):
    rgba = picture(64, 64).convert("RGBA")
    rgba.putalpha(0)
    assert tokenizer.encode([rgba]) == tokenizer.encode([Image.new("RGB", (64, 64), (255, 255, 255))])


def test_size_not_a_multiple_of_the_patch_is_refused(tokenizer):
    with pytest.raises(ImageInputError, match="70x64 is not a multiple of the 16-pixel patch"):
        tokenizer.encode([picture(70, 64)])


def test_bfloat16_tokenizer_loads_and_encodes(root):
    tok = ImageTokenizer.from_folder(root / "image_tokenizer", dtype=torch.bfloat16)
    assert tok.model.visual.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    (enc,) = tok.encode([picture(32, 32)])
    assert (enc.h, enc.w) == (2, 2) and all(0 <= c < 64 for c in enc.codes)


# --------------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------------


def edit_weights(folder: Path, edit) -> None:
    path = folder / TOKENIZER_WEIGHTS
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_missing_tensor_is_named(tmp_path):
    folder = write_tiny_vision_checkpoint(tmp_path) / "image_tokenizer"
    edit_weights(folder, lambda s: s.pop("model.visual.blocks.1.attn.qkv.weight"))
    with pytest.raises(
        MissingTensorsError, match=r"missing 1 tensor\(s\): model.visual.blocks.1.attn.qkv.weight"
    ):
        ImageTokenizer.from_folder(folder)


def test_unexpected_tensor_is_named(tmp_path):
    folder = write_tiny_vision_checkpoint(tmp_path) / "image_tokenizer"
    edit_weights(folder, lambda s: s.__setitem__("model.visual.blocks.2.norm1.weight", torch.ones(32)))
    with pytest.raises(
        MissingTensorsError, match=r"unexpected 1 tensor\(s\): model.visual.blocks.2.norm1.weight"
    ):
        ImageTokenizer.from_folder(folder)


def test_tensor_of_the_wrong_shape_is_named(tmp_path):
    folder = write_tiny_vision_checkpoint(tmp_path) / "image_tokenizer"
    edit_weights(
        folder, lambda s: s.__setitem__("model.vqmodel.quantize.embedding.weight", torch.zeros(65, 16))
    )
    with pytest.raises(
        CheckpointError, match=r"model.vqmodel.quantize.embedding.weight has shape \(65, 16\)"
    ):
        ImageTokenizer.from_folder(folder)


def test_config_without_a_required_key_is_refused(tmp_path):
    folder = write_tiny_vision_checkpoint(tmp_path) / "image_tokenizer"
    config = json.loads((folder / "config.json").read_text())
    del config["vision_config"]["depth"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing required key 'depth'"):
        ImageTokenizer.from_folder(folder)


def test_merged_patches_are_refused(tmp_path):
    folder = write_tiny_vision_checkpoint(tmp_path) / "image_tokenizer"
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre["merge_size"] = 2
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(CheckpointError, match="merge_size 2 is not supported"):
        ImageTokenizer.from_folder(folder)


def test_folder_without_weights_is_refused(tmp_path):
    folder = write_tiny_vision_checkpoint(tmp_path) / "image_tokenizer"
    (folder / TOKENIZER_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        ImageTokenizer.from_folder(folder)


def test_a_fixed_size_in_the_preprocessor_config_overrides_the_official_rules(tmp_path):
    import json

    from PIL import Image

    from runtime.testing.vision import write_tiny_vision_checkpoint
    from runtime.vision.encoder import ImageTokenizer

    root = write_tiny_vision_checkpoint(tmp_path)
    official = ImageTokenizer.from_folder(root / "image_tokenizer")
    picture = Image.new("RGB", (300, 100), "red")
    assert official.fit(picture).size == (288, 96)  # the official understanding rule
    pre = root / "image_tokenizer" / "preprocessor_config.json"
    config = json.loads(pre.read_text()) if pre.is_file() else {}
    config["size"] = {"height": 48, "width": 48}
    pre.write_text(json.dumps(config))
    fixed = ImageTokenizer.from_folder(root / "image_tokenizer")
    assert fixed.fit(picture).size == fixed.fit(picture, "editing").size == (48, 48)
    assert (fixed.encode([fixed.fit(picture)])[0].h, fixed.encode([fixed.fit(picture)])[0].w) == (3, 3)
