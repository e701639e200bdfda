"""A checkpoint's recommended settings (`llada_agent.json`): they fill what a caller leaves unset, never more."""

import asyncio
import json
import shutil

import pytest

import llada_agent
from llada_agent import ImageOptions, ModelLoadError, ThinkOptions
from llada_agent.recommended import FILE_NAME, Recommended
from llada_agent.testing import write_tiny_model

RECOMMENDATION = {"decoder_mode": "turbo",
                  "options": {"image": {"cfg_scale": 1.0, "temperature": 1.0, "seed": 5, "size": [64, 96]},
                              "edit": {"cfg_text_scale": 2.5}}}
SAMPLED = {"cfg_scale": 1.0, "temperature": 1.0, "seed": 5, "size": (64, 96)}


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("plain") / "tiny", vision=False)


@pytest.fixture(scope="module")
def tuned(plain, tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned") / "tiny"
    shutil.copytree(plain, root)
    (root / FILE_NAME).write_text(json.dumps(RECOMMENDATION))
    return root


def test_unset_fields_take_the_recommendation_and_set_ones_stay(tuned):
    recommended = Recommended.from_folder(tuned)
    assert recommended.decoder_mode == "turbo"
    mine = recommended.apply(ImageOptions(seed=3, cfg_scale=4.0))
    assert (mine.seed, mine.cfg_scale, mine.size) == (3, 4.0, (64, 96))  # JSON lists are tuples
    default = recommended.apply(ImageOptions())
    assert (default.cfg_scale, default.steps) == (1.0, ImageOptions().steps)
    # Nested options too: a thinking turn's picture, whether given or left to its default.
    assert recommended.apply(ThinkOptions()).image.cfg_scale == 1.0
    given = recommended.apply(ThinkOptions(max_tokens=9, image=ImageOptions(cfg_scale=3.0)))
    assert (given.max_tokens, given.image.cfg_scale, given.image.size) == (9, 3.0, (64, 96))
    assert recommended.apply(llada_agent.EditOptions()).cfg_text_scale == 2.5
    # Applying twice changes nothing more; no file recommends nothing.
    assert recommended.apply(default) == default
    assert Recommended.from_folder(tuned.parent).apply(ImageOptions()) == ImageOptions()


@pytest.mark.parametrize("content,message", [
    ("{not json", "not readable JSON"),
    ('["options"]', "must hold an object"),
    ('{"options": {"paint": {}}}', "unknown options 'paint'"),
    ('{"options": {"image": {"cfg_scale": -1}}}', "invalid 'image' options"),
    ('{"options": {"image": {"colour": 1}}}', "invalid 'image' options"),
    ('{"decoder_mode": "fast"}', "decoder_mode"),
    ('{"sampling": {}}', "unknown keys"),
])
def test_a_bad_recommendation_file_is_a_load_error(tmp_path, content, message):
    (tmp_path / FILE_NAME).write_text(content)
    with pytest.raises(ModelLoadError, match=message):
        Recommended.from_folder(tmp_path)


def test_a_model_draws_with_its_checkpoints_settings_unless_told_otherwise(plain, tuned):
    async def draw(root, options, **load_args):
        async with llada_agent.load(root, **load_args) as model:
            reply = await model.session(mode="draw").draw("a red circle.", options=options)
            return model.decoder_mode, reply.image.codes, reply.image.grid

    base = ImageOptions(steps=2, decode=False)
    # The tuned checkpoint's default is the plain one's draw with the recommended sampling and size...
    mode, codes, grid = run(draw(tuned, base))
    assert (mode, grid) == ("turbo", (3, 2))
    assert (codes, grid) == run(draw(plain, base.model_copy(update=SAMPLED)))[1:]
    # ... and what a caller sets wins: the official guidance, an explicit decoder.
    official = ImageOptions(steps=2, decode=False, cfg_scale=4.0, temperature=0.0, seed=None, size=(64, 96))
    assert run(draw(tuned, official))[1:] == run(draw(plain, official))[1:] != (codes, grid)
    assert run(draw(tuned, base, decoder_mode="normal"))[0] == "normal"
    assert run(draw(plain, base))[0] == "normal"
