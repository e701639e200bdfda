"""What the model writes is checked: broken spans end a reply gracefully, never crash or enter the history."""

import asyncio

import pytest

import llada_agent
from llada_agent import ImageOptions, StoryOptions, TextOptions, ThinkOptions
from llada_agent.schemas import ImagePart, TextPart
from llada_agent.spans import assistant_parts_match, read_headed_text, read_text
from llada_agent.testing import scripted_text, write_tiny_model


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model = llada_agent.load(write_tiny_model(tmp_path_factory.mktemp("malformed") / "tiny", vision=False))
    run(model.start())
    yield model
    run(model.close())


@pytest.fixture(scope="module")
def ids(model):
    """Builders of hand-made ids: text, special ids, headers."""
    codec = model.codec

    class Ids:
        text = staticmethod(codec.encode_text)
        eos = codec.special.eos
        boi = codec.special.boi
        start = codec.special.image_start
        end = codec.special.image_end
        header = staticmethod(codec.image_header)
        grid = staticmethod(codec.grid_token_id)
        code = staticmethod(codec.code_id)

    return Ids


def test_text_replies_end_before_the_first_image_span_id(model, ids):
    for stray in (ids.end, ids.boi, ids.start, ids.code(3)):
        output = read_text(model.codec, ids.text("fine so far") + [stray] + ids.text(" then junk"))
        assert output.ids == ids.text("fine so far") and "token" in output.warning
    assert read_text(model.codec, ids.text("all good")).warning is None


@pytest.mark.parametrize("written, reason", [
    (lambda i: [i.start, i.grid(2), i.boi], "malformed image header"),                      # width missing
    (lambda i: [i.start, i.grid(2), i.text("x")[0], i.boi], "malformed image header"),    # bad width token
    (lambda i: [i.start, i.grid(2), i.grid(2), i.grid(2), i.boi], "malformed image header"),  # too long
    (lambda i: [i.start, i.grid(2), i.grid(2), i.eos], "no complete header"),             # stopped early
    (lambda i: [i.end, i.eos], "outside an image"),
    (lambda i: [i.code(1), i.eos], "outside an image"),
])
def test_a_broken_header_keeps_the_text_before_it(model, ids, written, reason):
    *before_stop, stop = written(ids)
    output = read_headed_text(model.codec, ids.text("plan") + before_stop, stop)
    assert output.text == ids.text("plan") and output.grid is None and reason in output.warning


def test_a_well_formed_header_gives_the_grid_the_model_chose(model, ids):
    output = read_headed_text(model.codec, ids.text("plan") + ids.header(3, 5)[:-1], ids.boi)
    assert (output.text, output.grid, output.warning) == (ids.text("plan"), (3, 5), None)


def test_a_stray_boi_without_a_header_is_reported(model, ids):
    output = read_headed_text(model.codec, ids.text("plan"), ids.boi)
    assert output.grid is None and "without an image header" in output.warning


def test_parts_that_disagree_with_their_ids_are_found(model, ids):
    content = ids.text("hi") + model.codec.image_span(1, 2, [4, 5])
    good = [TextPart(text="hi"), ImagePart(grid=(1, 2), codes=[4, 5])]
    assert assistant_parts_match(model.codec, content, good) is None
    assert "codes differ" in assistant_parts_match(model.codec, content, [good[0], ImagePart(grid=(1, 2), codes=[4, 6])])
    assert "segment" in assistant_parts_match(model.codec, content, good[:1])
    assert "grammar" in assistant_parts_match(model.codec, content[:-2], good)


def test_a_chat_reply_with_a_stray_marker_finishes_malformed(model, ids):
    session = model.session()
    with scripted_text(model, [ids.text("the answer") + [ids.end] + ids.text(" junk") + [ids.eos]]):
        reply = run(session.ask("question?", options=TextOptions(max_tokens=40)))
    assert reply.finish_reason == "malformed" and reply.text == "the answer" and reply.warnings
    assert session.ids[-1 - len(ids.text("the answer")):] == ids.text("the answer") + [ids.eos]
    model.codec.parse(session.ids)


def test_a_thinking_draw_trusts_the_header_the_model_wrote(model, ids):
    session = model.session(mode="think")
    options = ThinkOptions(image=ImageOptions(grid=(4, 4), steps=2, decode=False))
    with scripted_text(model, [ids.text("a plan") + ids.header(1, 3)]):
        reply = run(session.draw("a picture", thinking=True, options=options))
    assert reply.image.grid == (1, 3) and reply.thinking == "a plan" and not reply.warnings


def test_a_thinking_draw_with_a_broken_header_draws_at_the_requested_grid(model, ids):
    session = model.session(mode="think")
    options = ThinkOptions(image=ImageOptions(grid=(2, 2), steps=2, decode=False))
    with scripted_text(model, [ids.text("a plan") + [ids.start, ids.grid(3), ids.boi]]):
        reply = run(session.draw("a picture", thinking=True, options=options))
    assert reply.image.grid == (2, 2) and reply.thinking == "a plan"
    assert any("malformed image header" in w for w in reply.warnings)
    model.codec.parse(session.ids)


def test_a_header_too_large_for_the_context_falls_back_to_the_requested_grid(model, ids):
    session = model.session(mode="think")
    options = ThinkOptions(image=ImageOptions(grid=(2, 2), steps=2, decode=False))
    with scripted_text(model, [ids.text("big") + ids.header(64, 64)]):
        reply = run(session.draw("a picture", thinking=True, options=options))
    assert reply.image.grid == (2, 2) and any("does not fit" in w for w in reply.warnings)


def test_a_story_with_a_broken_header_ends_malformed_with_its_pictures_so_far(model, ids):
    session = model.session(mode="story")
    script = [ids.text("Once") + ids.header(1, 2), ids.text(" then") + [ids.start, ids.end, ids.boi]]
    options = StoryOptions(image=llada_agent.EditOptions(steps=2, decode=False))
    with scripted_text(model, script):
        reply = run(session.story("tell", options=options))
    assert reply.finish_reason == "malformed"
    assert [p.type for p in reply.parts] == ["text", "image", "text"]
    model.codec.parse(session.ids)


def test_an_image_request_beyond_the_context_is_a_typed_error(model):
    session = model.session(mode="draw")
    with pytest.raises(llada_agent.ContextLengthError):
        run(session.draw("huge", grid=(40, 40), options=ImageOptions(steps=1, decode=False)))
    assert len(session.messages) == 1


def test_a_picture_that_cannot_be_decoded_keeps_its_codes_with_a_warning(model):
    # This checkpoint has no decoder: the codes stay valid and the turn completes.
    reply = run(model.session(mode="draw").draw("a circle", grid=(1, 2), options=ImageOptions(steps=1)))
    assert reply.image.codes is not None and not reply.image.decoded
    assert any("not decoded" in warning for warning in reply.warnings)
