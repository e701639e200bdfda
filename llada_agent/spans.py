"""Reading what the model wrote: text replies, text that opens an image, and assistant turns checked
against their messages. Pure functions over ids, so every malformed case can be built by hand and tested.

The span grammar itself (`TokenCodec.parse`) is strict; these readers decide how a reply ends when the
model breaks it: before the first id that does not belong, with a warning saying what it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runtime import errors as rt_errors
from runtime.tokens import TokenCodec

from .schemas import ImagePart, TextPart, ThinkingPart


def first_format_id(codec: TokenCodec, ids: Sequence[int]) -> int:
    """The index of the first id that belongs only inside an image span (`<|image|>`, `<|/image|>`,
    `<boi>`, an image code), or len(ids) when the ids are all text."""
    special = codec.special
    markers = {special.image_start, special.image_end, special.boi}
    for index, token_id in enumerate(ids):
        if token_id in markers or codec.is_image_id(token_id) or not 0 <= token_id < codec.vocab_size:
            return index
    return len(ids)


@dataclass(frozen=True)
class TextOutput:
    """Text the model wrote, cut before the first id a text reply may not hold (`warning` says why)."""

    ids: list[int]
    warning: str | None


def read_text(codec: TokenCodec, ids: Sequence[int]) -> TextOutput:
    """The text of a text-only reply: everything before the first image-span id."""
    ids = list(ids)
    cut = first_format_id(codec, ids)
    if cut == len(ids):
        return TextOutput(ids, None)
    return TextOutput(ids[:cut], f"the model wrote {codec.describe(ids[cut])} at token {cut} of a text reply; "
                                 "the reply ends before it")


@dataclass(frozen=True)
class HeadedText:
    """Text the model wrote before opening an image: the text ids, and the grid of a well-formed header
    (None when it wrote none or a broken one; `warning` then says what was wrong)."""

    text: list[int]
    grid: tuple[int, int] | None
    warning: str | None


def read_headed_text(codec: TokenCodec, ids: Sequence[int], stop_id: int | None) -> HeadedText:
    """Split the output of a phase that stops at `<boi>` (thinking, story text) into text and header.

    `ids` excludes the stop id; `stop_id` is the id that stopped it (None at the length limit)."""
    ids = list(ids)
    boi = codec.special.boi
    cut = first_format_id(codec, ids)
    if cut == len(ids):
        if stop_id == boi:
            return HeadedText(ids, None, f"the model wrote {codec.describe(boi)} without an image header")
        return HeadedText(ids, None, None)
    if ids[cut] != codec.special.image_start:
        return HeadedText(ids[:cut], None, f"the model wrote {codec.describe(ids[cut])} at token {cut} outside "
                                           "an image; the text ends before it")
    if stop_id != boi:
        return HeadedText(ids[:cut], None, f"the model opened an image at token {cut} but wrote no complete "
                                           "header before it stopped")
    try:
        parsed = codec.parse_thinking(ids[cut:] + [boi])
    except rt_errors.SpanError as exc:
        return HeadedText(ids[:cut], None, f"the model wrote a malformed image header at token {cut}: {exc}")
    if parsed.header is None or parsed.end != len(ids) - cut + 1:
        return HeadedText(ids[:cut], None, f"the model wrote a malformed image header at token {cut}")
    return HeadedText(ids[:cut], (parsed.header.height, parsed.header.width), None)


def assistant_parts_match(codec: TokenCodec, content: Sequence[int], parts: Sequence[Any]) -> str | None:
    """Why an assistant turn's content ids do not say what its parts say, or None when they agree."""
    try:
        segments = codec.parse(content)
    except rt_errors.SpanError as exc:
        return f"its ids break the image-span grammar: {exc}"
    expected = [p for p in parts if not (isinstance(p, (TextPart, ThinkingPart)) and p.text == "")]
    if len(segments) != len(expected):
        return f"its ids hold {len(segments)} text/image segment(s) but its message has {len(expected)} part(s)"
    for index, (segment, part) in enumerate(zip(segments, expected)):
        if isinstance(part, ImagePart):
            if not hasattr(segment, "codes"):
                return f"part {index} is an image but its ids are text"
            if (segment.height, segment.width) != part.grid or list(segment.codes) != part.codes:
                return f"part {index}: the image's grid or codes differ from its ids"
        else:
            if hasattr(segment, "codes"):
                return f"part {index} is text but its ids are an image"
            if codec.decode(segment.ids) != part.text:
                return f"part {index}: the text differs from its ids"
    return None
