"""What the model writes is checked: broken spans end a reply gracefully, never crash or enter the history;
a picture opened inside text gets a well-formed header by construction."""

import asyncio

import pytest

import llada_agent
from llada_agent import ImageOptions, StoryOptions, TextOptions, ThinkOptions
from llada_agent.schemas import ImagePart, TextPart
from llada_agent.spans import assistant_parts_match, read_text
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


@pytest.mark.parametrize("header", [
    lambda i: [i.start, i.grid(3), i.boi],                      # width missing
    lambda i: [i.start, i.grid(3), i.text("x")[0], i.boi],      # text inside the header
    lambda i: [i.grid(3), i.boi],                               # no <|image|>
    lambda i: [i.boi],                                          # <boi> alone
    lambda i: [i.end, i.eos],                                   # a stray end of image
])
def test_a_broken_header_becomes_a_well_formed_one_of_the_models_choosing(model, ids, header):
    session = model.session(mode="think")
    options = ThinkOptions(image=ImageOptions(grid=(2, 2), steps=1, decode=False))
    with scripted_text(model, [ids.text("a plan") + header(ids)]) as script:
        reply = run(session.draw("a picture", thinking=True, options=options))
    # The text ends where the header began; the grid sizes were sampled among the grid tokens alone.
    assert reply.thinking == "a plan" and reply.finish_reason == "complete"
    assert [r.options.only_ids for r in script.header_requests] == [model.codec.grid_ids]
    picture = [seg for seg in model.codec.parse(session.ids) if hasattr(seg, "codes")][-1]
    assert (picture.height, picture.width) == reply.image.grid
    assert not any("malformed" in w for w in reply.warnings)


def test_the_grid_sizes_of_a_header_are_the_models_own_choice_among_grid_tokens(model, ids):
    session = model.session(mode="story")
    options = StoryOptions(max_frames=1, image=llada_agent.EditOptions(steps=1, decode=False))
    with scripted_text(model, [ids.text("Once") + [ids.boi]]) as script:
        reply = run(session.story("tell", options=options))
    [header] = script.header_requests
    assert header.options.only_ids == model.codec.grid_ids and header.options.max_new_tokens == 2
    assert header.prompt[-1] == ids.start and header.prompt[-1 - len(ids.text("Once")):-1] == ids.text("Once")
    # This random model picks some grid; a large one ends the story before the picture, with a warning.
    if reply.finish_reason == "max_frames":
        assert [p.type for p in reply.parts] == ["text", "image"]
    else:
        assert reply.finish_reason == "length" and "does not fit" in reply.warnings[0]
    model.codec.parse(session.ids)


def test_a_header_too_large_for_the_context_falls_back_to_the_requested_grid(model, ids):
    session = model.session(mode="think")
    options = ThinkOptions(image=ImageOptions(grid=(2, 2), steps=2, decode=False))
    with scripted_text(model, [ids.text("big") + ids.header(64, 64)]):
        reply = run(session.draw("a picture", thinking=True, options=options))
    assert reply.image.grid == (2, 2) and any("does not fit" in w for w in reply.warnings)


def test_a_story_whose_header_breaks_goes_on_with_a_well_formed_one(model, ids):
    session = model.session(mode="story")
    # The second header holds text between its sizes: the sizes are what the model keeps, 2 x 1.
    broken = [ids.start, ids.grid(2), ids.text("x")[0], ids.grid(1), ids.boi]
    script = [ids.text("Once") + ids.header(1, 2), ids.text(" then") + broken, ids.text(" end") + [ids.eos]]
    options = StoryOptions(image=llada_agent.EditOptions(steps=1, decode=False))
    with scripted_text(model, script):
        reply = run(session.story("tell", options=options))
    assert [p.type for p in reply.parts] == ["text", "image", "text", "image", "text"]
    assert (reply.parts[1].grid, reply.parts[3].grid, reply.finish_reason) == ((1, 2), (2, 1), "stop")
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
