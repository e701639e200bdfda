"""Specification of runtime.vision.decoder on random-weight tiny checkpoints in the official layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.errors import CheckpointError, GenerationError, MissingTensorsError
from runtime.testing.vision import DECODER_WEIGHTS, VAE_WEIGHTS, write_tiny_vision_checkpoint
from runtime.vision.decoder import ImageDecoder, normal_timesteps, turbo_timesteps


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_tiny_vision_checkpoint(tmp_path_factory.mktemp("vision"), seed=0, num_codes=64)


@pytest.fixture(scope="module")
def decoder(root) -> ImageDecoder:
    return ImageDecoder(root)


CODES_2x2 = [3, 17, 42, 63]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def count_calls(module: torch.nn.Module) -> list[int]:
    """Batch sizes of every forward of `module` from now on (the hook stays for the module's life)."""
    calls: list[int] = []
    module.register_forward_pre_hook(
        lambda _m, _args, kwargs: calls.append(len(kwargs["x"])), with_kwargs=True
    )
    return calls


# --------------------------------------------------------------------------------------------------
# Time grids
# --------------------------------------------------------------------------------------------------


def test_normal_grid_is_linspace_shifted_by_six():
    expected = [0.0, 0.25 / 4.75, 0.5 / 3.5, 0.75 / 2.25, 1.0]  # t / (t + 6 - 6t)
    torch.testing.assert_close(normal_timesteps(5), torch.tensor(expected))


def test_turbo_grid_is_unshifted_with_one_interval_per_step():
    torch.testing.assert_close(turbo_timesteps(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(1, 1), (2, 3), (3, 1)])
def test_output_is_32_pixels_per_grid_cell(decoder, h, w):
    img = decoder.decode(list(range(h * w)), h, w, mode="turbo", steps=1, generator=seeded(0))
    assert img.mode == "RGB"
    assert img.size == (32 * w, 32 * h) == ImageDecoder.output_size(h, w)


@pytest.mark.parametrize("mode", ["normal", "turbo"])
def test_same_seed_same_picture_other_seed_other_picture(decoder, mode):
    first = np.asarray(decoder.decode(CODES_2x2, 2, 2, mode=mode, steps=2, generator=seeded(1)))
    again = np.asarray(decoder.decode(CODES_2x2, 2, 2, mode=mode, steps=2, generator=seeded(1)))
    other = np.asarray(decoder.decode(CODES_2x2, 2, 2, mode=mode, steps=2, generator=seeded(2)))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_picture_depends_on_the_codes(decoder):
    first = np.asarray(decoder.decode(CODES_2x2, 2, 2, mode="turbo", steps=1, generator=seeded(0)))
    other = np.asarray(decoder.decode(CODES_2x2[::-1], 2, 2, mode="turbo", steps=1, generator=seeded(0)))
    assert not np.array_equal(first, other)


def test_normal_runs_steps_minus_one_guided_calls_turbo_runs_steps_calls(root):
    decoder = ImageDecoder(root)
    decoder.load("normal", "turbo")
    normal_calls = count_calls(decoder._component("normal"))
    turbo_calls = count_calls(decoder._component("turbo"))
    decoder.decode([5], 1, 1, mode="normal", steps=5, generator=seeded(0))
    decoder.decode([5], 1, 1, mode="turbo", steps=3, generator=seeded(0))
    assert normal_calls == [2] * 4  # each call batches the codes' caption with the all-zero caption
    assert turbo_calls == [1] * 3


class StopAfterFirstStep(Exception):
    pass


@pytest.mark.parametrize(("mode", "model_calls"), [("normal", 49), ("turbo", 8)])
def test_default_steps_are_50_normal_and_8_turbo(decoder, mode, model_calls):
    totals: list[int] = []

    def stop(_step: int, total: int) -> None:
        totals.append(total)
        raise StopAfterFirstStep  # a progress callback may abort a decode; no need to run all the steps

    with pytest.raises(StopAfterFirstStep):
        decoder.decode([5], 1, 1, mode=mode, generator=seeded(0), progress=stop)
    assert totals == [model_calls]


@pytest.mark.parametrize(("mode", "steps", "total"), [("normal", 4, 3), ("turbo", 3, 3)])
def test_progress_is_reported_after_every_model_call(decoder, mode, steps, total):
    seen: list[tuple[int, int]] = []
    decoder.decode(
        [1], 1, 1, mode=mode, steps=steps, generator=seeded(0), progress=lambda i, n: seen.append((i, n))
    )
    assert seen == [(i, total) for i in range(1, total + 1)]


def test_components_load_lazily_and_stay_resident(root):
    decoder = ImageDecoder(root)
    assert decoder.loaded == ()
    decoder.decode([1], 1, 1, mode="turbo", steps=1, generator=seeded(0))
    assert set(decoder.loaded) == {"sigvq", "turbo", "vae"}
    vae = decoder._component("vae")
    decoder.decode([1], 1, 1, mode="turbo", steps=1, generator=seeded(0))
    assert decoder._component("vae") is vae
    decoder.unload("turbo")
    assert set(decoder.loaded) == {"sigvq", "vae"}


def test_components_use_the_requested_dtype(root):
    decoder = ImageDecoder(root, dtype=torch.bfloat16, device="cpu")
    img = decoder.decode(CODES_2x2, 2, 2, mode="turbo", steps=1, generator=seeded(0))
    assert img.size == (64, 64)
    for name in ("sigvq", "turbo", "vae"):
        params = list(decoder._component(name).parameters())
        assert {p.dtype for p in params} == {torch.bfloat16}
        assert {p.device.type for p in params} == {"cpu"}


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"codes": [1, 2, 3], "h": 2, "w": 2}, "3 codes do not fill a 2x2 grid"),
        ({"codes": [1, 2, 3, 64], "h": 2, "w": 2}, r"must lie in \[0, 64\)"),
        ({"codes": [1, 2, 3, -1], "h": 2, "w": 2}, r"must lie in \[0, 64\)"),
        ({"mode": "fast"}, "decode mode must be"),
        ({"mode": "normal", "steps": 1}, "at least 2 steps"),
        ({"mode": "turbo", "steps": 0}, "at least 1 steps"),
    ],
)
def test_invalid_requests_raise_generation_errors(decoder, kwargs, problem):
    request = {"codes": CODES_2x2, "h": 2, "w": 2, **kwargs}
    with pytest.raises(GenerationError, match=problem):
        decoder.decode(request.pop("codes"), request.pop("h"), request.pop("w"), **request)


# --------------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------------


def edit_safetensors(path: Path, edit) -> None:
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_decoder_missing_tensor_is_named_as_the_checkpoint_names_it(tmp_path):
    root = write_tiny_vision_checkpoint(tmp_path)
    edit_safetensors(root / "decoder" / DECODER_WEIGHTS, lambda s: s.pop("semantic_embedder.1.weight"))
    with pytest.raises(
        MissingTensorsError,
        match=r"decoder transformer \(decoder\): missing 1 tensor\(s\): "
        r"semantic_embedder.1.weight",
    ):
        ImageDecoder(root).load("normal")


def test_turbo_decoder_unexpected_tensor_is_named(tmp_path):
    root = write_tiny_vision_checkpoint(tmp_path)
    edit_safetensors(
        root / "decoder-turbo" / DECODER_WEIGHTS, lambda s: s.__setitem__("layers.9.extra", torch.ones(1))
    )
    with pytest.raises(
        MissingTensorsError, match=r"\(decoder-turbo\): unexpected 1 tensor\(s\): layers.9.extra"
    ):
        ImageDecoder(root).load("turbo")


def test_vae_missing_tensor_is_named(tmp_path):
    root = write_tiny_vision_checkpoint(tmp_path)
    edit_safetensors(root / "vae" / VAE_WEIGHTS, lambda s: s.pop("decoder.conv_out.weight"))
    with pytest.raises(MissingTensorsError, match=r"VAE: missing 1 tensor\(s\): decoder.conv_out.weight"):
        ImageDecoder(root).load("vae")


def test_sigvq_missing_tensor_is_named(tmp_path):
    root = write_tiny_vision_checkpoint(tmp_path)
    path = root / "image_tokenizer" / "sigvq_embedding.pt"
    state = torch.load(path, weights_only=True)
    del state["prior_projector.net.2.bias"]
    torch.save(state, path)
    with pytest.raises(
        MissingTensorsError, match=r"SigVQ embedder: missing 1 tensor\(s\): prior_projector.net.2.bias"
    ):
        ImageDecoder(root).load("sigvq")


def test_sigvq_pickle_with_code_is_refused(tmp_path):
    root = write_tiny_vision_checkpoint(tmp_path)
    torch.save({"weights": object()}, root / "image_tokenizer" / "sigvq_embedding.pt")
    with pytest.raises(CheckpointError, match="not a loadable state dict"):
        ImageDecoder(root).load("sigvq")


def test_decoder_weights_under_the_model_card_file_name_load(tmp_path):
    root = write_tiny_vision_checkpoint(tmp_path)
    (root / "decoder-turbo" / DECODER_WEIGHTS).rename(root / "decoder-turbo" / "decoder_model.safetensors")
    img = ImageDecoder(root).decode([1], 1, 1, mode="turbo", steps=1, generator=seeded(0))
    assert img.size == (32, 32)


def test_vae_that_is_not_8x_is_refused(tmp_path):
    root = write_tiny_vision_checkpoint(tmp_path)
    config_path = root / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = config["block_out_channels"][:3]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"needs an 8x VAE \(4 blocks\); this one has 3"):
        ImageDecoder(root).load("vae")


def test_decoder_config_with_an_unknown_key_is_refused(tmp_path):
    root = write_tiny_vision_checkpoint(tmp_path)
    config_path = root / "decoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["n_dragons"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown key.*n_dragons"):
        ImageDecoder(root).load("normal")
