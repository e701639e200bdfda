"""Streamed events arrive in a valid order, match what hooks see, and end with the reply or an error."""

import asyncio
from collections import defaultdict

import pytest

import llada_agent
from llada_agent import EditOptions, Hooks, ImageOptions, StoryOptions, TextOptions, ThinkOptions
from llada_agent.testing import scripted_text, write_tiny_model

IMAGE = ImageOptions(grid=(2, 2), steps=2, decoder_steps=2, seed=0)
IMAGE_ORDER = ["image_started", "image_progress", "image_tokens_done", "image_decode_progress", "image_decoded"]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model = llada_agent.load(write_tiny_model(tmp_path_factory.mktemp("events") / "tiny"))
    run(model.start())
    yield model
    run(model.close())


def collect(session, content, **kwargs):
    async def main():
        async with session.stream(content, **kwargs) as events:
            return [event async for event in events], events.reply

    return run(main())


def check_order(events, *, decoded=True):
    """Each image's events go started < progress* < tokens done < decode progress* < decoded; text comes
    before the end; turn_done is last and only once."""
    types = [e.type for e in events]
    assert types[-1] == "turn_done" and types.count("turn_done") == 1
    per_image = defaultdict(list)
    for event in events:
        if event.type.startswith("image_"):
            per_image[event.index].append(event.type)
    for sequence in per_image.values():
        ranks = [IMAGE_ORDER.index(t) for t in sequence]
        assert ranks == sorted(ranks)
        assert sequence[0] == "image_started" and sequence.count("image_tokens_done") == 1
        assert sequence[-1] == ("image_decoded" if decoded else "image_tokens_done")
    return per_image


def test_a_drawing_streams_progress_then_codes_then_the_picture(model):
    events, reply = collect(model.session(mode="draw"), "a circle", options=IMAGE)
    per_image = check_order(events)
    assert list(per_image) == [0]
    progress = [e.committed for e in events if e.type == "image_progress"]
    assert progress == sorted(progress) and progress[-1] == 4
    decoded = next(e for e in events if e.type == "image_decoded").image
    assert reply.image == decoded and reply.image.pil().size == (64, 64)


def test_without_decoding_the_image_keeps_its_codes_only(model):
    events, reply = collect(model.session(mode="draw"), "a circle", options=IMAGE, decode=False)
    check_order(events, decoded=False)
    assert reply.image.codes is not None and not reply.image.decoded


def test_text_blocks_come_before_the_end_and_add_up_to_the_reply(model):
    events, reply = collect(model.session(), "hello", options=TextOptions(max_tokens=70, steps=4))
    check_order(events)
    blocks = [e for e in events if e.type == "text_block"]
    assert len(blocks) >= 2 and "".join(b.text for b in blocks) == reply.text


def test_a_thinking_draw_streams_thinking_then_the_image(model):
    script = [model.codec.encode_text("I will draw it small.") + model.codec.image_header(1, 2)]
    with scripted_text(model, script):
        events, reply = collect(model.session(mode="think"), "a cat", options=ThinkOptions(image=IMAGE))
    check_order(events)
    types = [e.type for e in events]
    assert types.index("thinking_block") < types.index("image_started")
    assert reply.thinking == "I will draw it small." and reply.image.grid == (1, 2)


def test_a_story_streams_text_and_every_frame_in_order(model):
    codec = model.codec
    script = [codec.encode_text("Once") + codec.image_header(1, 2), codec.encode_text(" then") + codec.image_header(2, 1),
              codec.encode_text(" the end.") + [codec.special.eos]]
    options = StoryOptions(image=EditOptions(steps=2, decoder_steps=2, seed=0))
    with scripted_text(model, script):
        events, reply = collect(model.session(mode="story"), "tell me", options=options)
    per_image = check_order(events)
    assert list(per_image) == [0, 1]
    assert [p.type for p in reply.parts] == ["text", "image", "text", "image", "text"]
    assert reply.finish_reason == "stop" and all(image.decoded for image in reply.images)
    assert reply.text == "Once then the end."


def test_a_story_stops_at_max_frames(model):
    codec = model.codec
    script = [codec.encode_text("One") + codec.image_header(1, 1), codec.encode_text("Two") + codec.image_header(1, 1)]
    with scripted_text(model, script):
        reply = run(model.session(mode="story").story("go", max_frames=2, decode=False,
                                                     options=StoryOptions(image=EditOptions(steps=1))))
    assert reply.finish_reason == "max_frames" and len(reply.images) == 2


def test_the_on_event_hook_sees_every_streamed_event(model):
    seen = []
    events, _ = collect(model.session(mode="draw"), "a circle", options=IMAGE, hooks=Hooks(on_event=seen.append))
    assert seen == events


def test_a_failed_turn_ends_with_an_error_event_then_raises(model):
    session = model.session(mode="draw")

    async def main():
        received = []
        with pytest.raises(llada_agent.ContextLengthError):
            async with session.stream("huge", options=ImageOptions(grid=(40, 40), steps=1)) as events:
                async for event in events:
                    received.append(event)
        return received

    received = run(main())
    assert [e.type for e in received] == ["error"] and received[0].error == "ContextLengthError"
    assert len(session.messages) == 1
