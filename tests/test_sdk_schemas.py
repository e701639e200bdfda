"""The SDK's data: JSON round trips, strict validation with messages that say what to fix, image parts."""

import io

import pytest
from PIL import Image
from pydantic import ValidationError

from llada_agent import (
    EVENT_ADAPTER,
    CacheInfo,
    EditOptions,
    ImageDecoded,
    ImageError,
    ImageOptions,
    ImagePart,
    ImageProgress,
    Message,
    Reply,
    StoryOptions,
    TextBlock,
    TextOptions,
    TextPart,
    ThinkingPart,
    ThinkOptions,
    TurnDone,
    Usage,
)


def png_of(colour=(255, 0, 0), size=(8, 8)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def a_reply():
    image = ImagePart(grid=(1, 2), codes=[3, 4], png=png_of())
    return Reply(task="think", parts=[ThinkingPart(text="plan"), image], ids=[1, 2, 3], finish_reason="complete",
                 usage=Usage(prompt_tokens=5, generated_tokens=3), cache=CacheInfo(enabled=True, max_bytes=None))


def test_a_reply_round_trips_through_json():
    reply = a_reply()
    again = Reply.model_validate_json(reply.model_dump_json())
    assert again == reply
    assert again.image.png == reply.image.png and again.thinking == "plan"


def test_events_round_trip_through_the_discriminated_union():
    events = [TextBlock(text="hi", ids=[1]), ImageProgress(index=0, committed=3, total=6),
              ImageDecoded(index=0, image=a_reply().image), TurnDone(reply=a_reply())]
    for event in events:
        assert EVENT_ADAPTER.validate_json(event.model_dump_json()) == event


def test_options_round_trip_and_nest():
    options = ThinkOptions(max_tokens=100, image=ImageOptions(size=(512, 256), steps=8))
    assert ThinkOptions.model_validate_json(options.model_dump_json()) == options
    assert StoryOptions.model_validate_json(StoryOptions().model_dump_json()) == StoryOptions()


def test_pixel_sizes_must_be_multiples_of_32_and_the_message_suggests_one():
    with pytest.raises(ValidationError, match="multiples of 32.*nearest: 512x512"):
        ImageOptions(size=(500, 520))


def test_size_and_grid_are_exclusive_and_a_size_gives_its_grid():
    with pytest.raises(ValidationError, match="not both"):
        ImageOptions(size=(512, 512), grid=(16, 16))
    assert ImageOptions(size=(1024, 512)).grid_or((1, 1)) == (16, 32)
    assert ImageOptions().grid_or((4, 4)) == (4, 4)


@pytest.mark.parametrize("make, field", [
    (lambda: TextOptions(steps=0), "steps"),
    (lambda: TextOptions(max_tokens=0), "max_tokens"),
    (lambda: ImageOptions(cfg_scale=-1.0), "cfg_scale"),
    (lambda: ImageOptions(cfg_rescale=1.5), "cfg_rescale"),
    (lambda: EditOptions(grid=(0, 4)), "grid"),
    (lambda: TextOptions(top_p=0.0), "top_p"),
    (lambda: ImageOptions(decoder_mode="fast"), "decoder_mode"),
    (lambda: TextOptions(steps="8"), "steps"),
    (lambda: TextOptions(temprature=0.5), "temprature"),
])
def test_invalid_options_are_rejected_naming_the_field(make, field):
    with pytest.raises(ValidationError) as info:
        make()
    assert field in str(info.value)


def test_image_parts_need_matching_grid_and_codes():
    with pytest.raises(ValidationError, match="holds 6 codes"):
        ImagePart(grid=(2, 3), codes=[1, 2])
    with pytest.raises(ValidationError, match="go together"):
        ImagePart(codes=[1], png=png_of())
    with pytest.raises(ValidationError, match="needs codes"):
        ImagePart()


def test_an_altered_png_fails_its_digest():
    part = ImagePart(png=png_of())
    data = part.model_dump(mode="json")
    data["png"] = ImagePart(png=png_of((0, 0, 255))).model_dump(mode="json")["png"]
    with pytest.raises(ValidationError, match="sha256 does not match"):
        ImagePart.model_validate(data)


def test_image_parts_open_paths_bytes_and_pil_images(tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(png_of(size=(10, 6)))
    for source in (path, str(path), path.read_bytes(), Image.new("RGB", (10, 6), (255, 0, 0))):
        part = ImagePart.open(source)
        assert part.pil().size == (10, 6) and part.codes is None


def test_unreadable_images_raise_image_error(tmp_path):
    with pytest.raises(ImageError):
        ImagePart.open(b"not an image")
    with pytest.raises(ImageError):
        ImagePart.open(tmp_path / "missing.png")


def test_codes_only_images_say_how_to_get_pixels():
    with pytest.raises(ImageError, match="decode"):
        ImagePart(grid=(1, 1), codes=[0]).pil()


def test_saving_an_image_writes_its_png(tmp_path):
    part = ImagePart(png=png_of())
    assert part.save(tmp_path / "out.png").read_bytes() == part.png
    assert Image.open(part.save(tmp_path / "out.jpg")).size == (8, 8)


def test_messages_check_their_parts_by_role():
    with pytest.raises(ValidationError, match="exactly one text part"):
        Message(role="system", parts=[TextPart(text="a"), TextPart(text="b")])
    with pytest.raises(ValidationError, match="thinking"):
        Message(role="user", parts=[ThinkingPart(text="hmm")])
    assert Message(role="assistant", parts=[ThinkingPart(text="x")]).parts[0].text == "x"


def test_strict_models_refuse_coercion_and_unknown_fields():
    with pytest.raises(ValidationError):
        TextPart(text=3)
    with pytest.raises(ValidationError):
        Message.model_validate_json('{"role": "user", "parts": [{"type": "text", "text": "a", "extra": 1}]}')
