"""Reading what the model wrote: text replies, and assistant turns checked against their messages. Pure
functions over ids, so every malformed case can be built by hand and tested.

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
    """The index of the first id that belongs only inside an image span (`<|image|>`, a grid size, `<boi>`,
    an image code, `<|/image|>`), or len(ids) when the ids are all text."""
    markup = codec.image_markup_ids
    for index, token_id in enumerate(ids):
        if token_id in markup or codec.is_image_id(token_id) or not 0 <= token_id < codec.vocab_size:
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
