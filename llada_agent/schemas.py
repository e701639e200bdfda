"""The SDK's data: message parts, messages, replies, options and stream events, as strict Pydantic models.

Everything here round-trips through JSON (`model_dump_json` / `model_validate_json`): PNG bytes travel as
base64, grids as `[h, w]` arrays. Models are frozen; build changed copies with `model_copy(update=...)`.
Validation is strict (no "3" -> 3), except that a list is accepted where a pair is expected.

Sizes: a *grid* `(h, w)` counts image codes (the model writes h*w codes); a picture decoded from a grid is
`32*w x 32*h` pixels. Pixel sizes are `(width, height)` and must be multiples of 32.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictInt,
    TypeAdapter,
    model_validator,
)

PIXELS_PER_CELL = 32
"""Pixels per grid cell side of a decoded picture (16-pixel patches, upsampled twice by the decoder)."""

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _decode_base64(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"PNG data must be base64 text: {exc}") from exc
    return value


PngBytes = Annotated[
    bytes,
    BeforeValidator(_decode_base64),
    PlainSerializer(lambda data: base64.b64encode(data).decode("ascii"), return_type=str, when_used="json"),
]
"""PNG file bytes; base64 text in JSON (and accepted as base64 text in Python too)."""

Grid = Annotated[tuple[StrictInt, StrictInt], Field(strict=False)]
"""An image grid (h, w): h rows of w codes."""

PixelSize = Annotated[tuple[StrictInt, StrictInt], Field(strict=False)]
"""A picture size (width, height) in pixels."""

Task = Literal["chat", "draw", "think", "edit", "story"]
"""What a turn does: answer in text, draw, think then draw, edit an image, or write text with pictures."""

DecoderMode = Literal["normal", "turbo"]


# ---------------------------------------------------------------------------------------------------------
# Parts and messages


class TextPart(_Model):
    """Plain text."""

    type: Literal["text"] = "text"
    text: str


class ThinkingPart(_Model):
    """The assistant's thinking (its plan before drawing)."""

    type: Literal["thinking"] = "thinking"
    text: str


class ImagePart(_Model):
    """A picture: its codes on an (h, w) grid once the model wrote or read it, its PNG once decoded or given.

    Build an input image with `ImagePart.open(path | bytes | PIL.Image | numpy array)`. Generated images
    carry `grid` and `codes`, plus `png` once decoded. `sha256` is the digest of `png`, filled in for you and
    checked on validation.
    """

    type: Literal["image"] = "image"
    grid: Grid | None = None
    codes: list[StrictInt] | None = None
    png: PngBytes | None = None
    sha256: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_digest(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sha256") is None and isinstance(data.get("png"), (bytes, str)):
            png = _decode_base64(data["png"])
            if isinstance(png, bytes):
                data = {**data, "png": png, "sha256": hashlib.sha256(png).hexdigest()}
        return data

    @model_validator(mode="after")
    def _check(self) -> ImagePart:
        if self.codes is None and self.png is None:
            raise ValueError("an image part needs codes (with grid) or png bytes (use ImagePart.open)")
        if (self.grid is None) != (self.codes is None):
            raise ValueError("grid and codes go together: give both or neither")
        if self.grid is not None:
            h, w = self.grid
            if h < 1 or w < 1:
                raise ValueError(f"grid must be positive, got {h}x{w}")
            if len(self.codes) != h * w:
                raise ValueError(f"a {h}x{w} grid holds {h * w} codes, got {len(self.codes)}")
            if any(code < 0 for code in self.codes):
                raise ValueError("image codes must be >= 0")
        if self.png is not None:
            if not self.png.startswith(_PNG_MAGIC):
                raise ValueError("png does not hold PNG data (wrong magic bytes)")
            if self.sha256 != hashlib.sha256(self.png).hexdigest():
                raise ValueError("sha256 does not match the PNG bytes (the image was altered)")
        elif self.sha256 is not None:
            raise ValueError("sha256 given without png")
        return self

    @classmethod
    def open(cls, source: str | os.PathLike | bytes | Any) -> ImagePart:
        """An input image from a file path, encoded bytes, a PIL image or a numpy array (stored as PNG).

        Raises `ImageError` when the source is unreadable, corrupt or too large.
        """
        from runtime.errors import ImageInputError
        from runtime.vision.preprocess import load_image

        from .errors import ImageError

        if isinstance(source, ImagePart):
            return source
        try:
            picture = load_image(source)
        except ImageInputError as exc:
            raise ImageError(str(exc)) from exc
        except (OSError, TypeError, ValueError) as exc:
            raise ImageError(f"cannot read an image from {type(source).__name__}: {exc}") from exc
        return cls.from_pil(picture)

    @classmethod
    def from_pil(cls, picture: Any, *, grid: tuple[int, int] | None = None,
                 codes: list[int] | None = None) -> ImagePart:
        """A part holding `picture` as PNG (and optionally the codes it was read as)."""
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return cls(png=buffer.getvalue(), grid=grid, codes=codes)

    @property
    def decoded(self) -> bool:
        """Whether the picture itself (PNG) is here, not only its codes."""
        return self.png is not None

    @property
    def pixel_size(self) -> tuple[int, int] | None:
        """(width, height) of the picture a generated grid decodes to, or None without a grid."""
        if self.grid is None:
            return None
        return self.grid[1] * PIXELS_PER_CELL, self.grid[0] * PIXELS_PER_CELL

    def pil(self) -> Any:
        """The picture as a PIL RGB image. Raises `ImageError` when only codes are here (not decoded)."""
        from PIL import Image

        from .errors import ImageError

        if self.png is None:
            raise ImageError("this image holds codes only; decode it (decode=True or Model.decode_image)")
        with Image.open(io.BytesIO(self.png)) as picture:
            return picture.convert("RGB")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the picture to `path` (format from the suffix; PNG bytes as they are for .png), creating its
        folder if needed; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".png" and self.png is not None:
            path.write_bytes(self.png)
        else:
            self.pil().save(path)
        return path


Part = Annotated[TextPart | ThinkingPart | ImagePart, Field(discriminator="type")]

Role = Literal["system", "user", "assistant"]


class Message(_Model):
    """One turn of a conversation: who spoke and what, in order."""

    role: Role
    parts: list[Part]

    @model_validator(mode="after")
    def _check_parts(self) -> Message:
        kinds = [part.type for part in self.parts]
        if self.role == "system" and kinds != ["text"]:
            raise ValueError(f"a system message holds exactly one text part, got {kinds}")
        if self.role == "user":
            if not kinds:
                raise ValueError("a user message needs at least one part")
            if "thinking" in kinds:
                raise ValueError("a user message cannot hold thinking parts")
        return self

    @property
    def text(self) -> str:
        """The text parts joined."""
        return "".join(part.text for part in self.parts if isinstance(part, TextPart))

    @property
    def images(self) -> list[ImagePart]:
        return [part for part in self.parts if isinstance(part, ImagePart)]


# ---------------------------------------------------------------------------------------------------------
# Replies


class Usage(_Model):
    """What one turn cost. Token counts are of the conditional branch; `requests` counts engine requests
    (a thinking draw makes two, a story one per text or image phase)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    steps: int = 0
    forwards: int = 0
    requests: int = 0


class CacheInfo(_Model):
    """A snapshot of the model's prefix cache (counters since the model started)."""

    enabled: bool
    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens: int = 0
    inserted_tokens: int = 0
    evicted_nodes: int = 0
    evicted_tokens: int = 0
    bytes: int = 0
    nodes: int = 0
    pinned_nodes: int = 0
    max_bytes: int | None = None


FinishReason = Literal["stop", "length", "complete", "max_frames", "skipped", "malformed"]


class Reply(_Model):
    """One assistant turn: its parts in order, the exact ids it added to the history, and what it cost.

    `finish_reason`: "stop" (the model ended its text), "length" (token budget), "complete" (the image is
    done), "max_frames" (a story reached its frame limit), "skipped" (a hook skipped drawing), "malformed"
    (the model broke the format; the reply holds what came before the break, `warnings` says what).
    """

    task: Task
    parts: list[Part]
    ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    cache: CacheInfo
    warnings: list[str] = Field(default_factory=list)

    @property
    def text(self) -> str:
        """The text parts joined (thinking excluded)."""
        return "".join(part.text for part in self.parts if isinstance(part, TextPart))

    @property
    def thinking(self) -> str | None:
        """The thinking text, or None when the turn had no thinking."""
        texts = [part.text for part in self.parts if isinstance(part, ThinkingPart)]
        return "".join(texts) if texts else None

    @property
    def images(self) -> list[ImagePart]:
        return [part for part in self.parts if isinstance(part, ImagePart)]

    @property
    def image(self) -> ImagePart | None:
        """The last image of the turn, or None."""
        images = self.images
        return images[-1] if images else None

    def message(self) -> Message:
        """The reply as an assistant `Message`."""
        return Message(role="assistant", parts=list(self.parts))


# ---------------------------------------------------------------------------------------------------------
# Options


class _Sampling(_Model):
    steps: int = Field(ge=1, description="denoising steps per 32-token block")
    threshold: float | None = Field(default=None, ge=0.0, le=1.0,
                                    description="commit every position at least this confident")
    temperature: float = Field(default=0.0, ge=0.0)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None


class TextOptions(_Sampling):
    """How to write text (defaults: the official understanding settings)."""

    max_tokens: int = Field(default=2048, ge=1, description="most tokens to write")
    steps: int = Field(default=32, ge=1)
    threshold: float | None = Field(default=0.95, ge=0.0, le=1.0)


class ThinkOptions(TextOptions):
    """How to think before drawing (defaults: the official thinking settings); `image` for the drawing.

    `max_redraws` bounds how often an `after_drawing` hook may send the turn back to drawing."""

    max_tokens: int = Field(default=4096, ge=1)
    image: ImageOptions = Field(default_factory=lambda: ImageOptions())
    max_redraws: int = Field(default=2, ge=0)


class _ImageSampling(_Sampling):
    cfg_rescale: float = Field(default=0.7, ge=0.0, le=1.0)
    decode: bool = Field(default=True, description="decode the codes to a picture (False keeps codes only)")
    decoder_mode: DecoderMode | None = Field(default=None, description="None: the model's default")
    decoder_steps: int | None = Field(default=None, ge=1)


class ImageOptions(_ImageSampling):
    """How to draw (defaults: the official text-to-image settings). Give `size` or `grid`, not both;
    neither means the model's default grid."""

    size: PixelSize | None = Field(default=None, description="(width, height) in pixels, multiples of 32")
    grid: Grid | None = Field(default=None, description="(h, w) in codes; the picture is 32*w x 32*h")
    steps: int = Field(default=16, ge=1)
    cfg_scale: float = Field(default=4.0, ge=0.0, description="guidance scale; 1 turns guidance off")

    @model_validator(mode="after")
    def _check_size(self) -> ImageOptions:
        if self.size is not None and self.grid is not None:
            raise ValueError("give size (pixels) or grid (codes), not both")
        if self.size is not None:
            _check_pixel_size(self.size)
        if self.grid is not None:
            _check_grid(self.grid)
        return self

    def grid_or(self, default: tuple[int, int]) -> tuple[int, int]:
        """The grid to draw: `grid`, or `size` / 32, or `default`."""
        if self.grid is not None:
            return self.grid
        if self.size is not None:
            width, height = self.size
            return height // PIXELS_PER_CELL, width // PIXELS_PER_CELL
        return default


class EditOptions(_ImageSampling):
    """How to edit (defaults: the official editing settings). The output grid is the source's unless
    `grid` is given. Guidance: `cfg_text_scale` pulls toward the instruction, `cfg_image_scale` toward the
    source picture."""

    grid: Grid | None = None
    steps: int = Field(default=8, ge=1)
    cfg_text_scale: float = Field(default=4.0, ge=0.0)
    cfg_image_scale: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _check_grid(self) -> EditOptions:
        if self.grid is not None:
            _check_grid(self.grid)
        return self


class StoryOptions(_Model):
    """How to write a story with pictures (defaults: SGLang-Omni's interleaved settings).

    The model writes text and opens each picture with a header; `image` says how the pictures are drawn:
    the first with simple guidance at `cfg_text_scale`, later ones with editing-style guidance."""

    max_frames: int = Field(default=10, ge=1)
    text: TextOptions = Field(default_factory=lambda: TextOptions(max_tokens=1024))
    image: EditOptions = Field(default_factory=lambda: EditOptions(steps=32, cfg_text_scale=7.5,
                                                                   cfg_image_scale=1.5))


def _check_pixel_size(size: tuple[int, int]) -> None:
    width, height = size
    if width < PIXELS_PER_CELL or height < PIXELS_PER_CELL or width % PIXELS_PER_CELL or height % PIXELS_PER_CELL:
        def near(x: int) -> int:
            return max(PIXELS_PER_CELL, round(x / PIXELS_PER_CELL) * PIXELS_PER_CELL)

        raise ValueError(
            f"size {width}x{height} must be positive multiples of {PIXELS_PER_CELL} pixels "
            f"(nearest: {near(width)}x{near(height)})"
        )


def _check_grid(grid: tuple[int, int]) -> None:
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"grid {h}x{w} must be positive (codes per column x per row)")


Options = TextOptions | ThinkOptions | ImageOptions | EditOptions | StoryOptions
OPTIONS_OF_TASK: dict[str, type[_Model]] = {"chat": TextOptions, "draw": ImageOptions, "think": ThinkOptions,
                                            "edit": EditOptions, "story": StoryOptions}
"""The options class each task takes."""


# ---------------------------------------------------------------------------------------------------------
# Events


class TextBlock(_Model):
    """New text of the reply (`text` is the delta; `ids` the block's ids)."""

    type: Literal["text_block"] = "text_block"
    text: str
    ids: list[int]


class ThinkingBlock(_Model):
    """New thinking text (`text` is the delta; `ids` the block's ids)."""

    type: Literal["thinking_block"] = "thinking_block"
    text: str
    ids: list[int]


class ImageStarted(_Model):
    """The model starts drawing image `index` of the turn on `grid`."""

    type: Literal["image_started"] = "image_started"
    index: int
    grid: Grid


class ImageProgress(_Model):
    """`committed` of `total` codes of image `index` are final."""

    type: Literal["image_progress"] = "image_progress"
    index: int
    committed: int
    total: int


class ImageTokensDone(_Model):
    """All codes of image `index` are written (`image` holds them, not yet the picture)."""

    type: Literal["image_tokens_done"] = "image_tokens_done"
    index: int
    image: ImagePart


class ImageDecodeProgress(_Model):
    """The decoder made `step` of `total` model calls for image `index`."""

    type: Literal["image_decode_progress"] = "image_decode_progress"
    index: int
    step: int
    total: int


class ImageDecoded(_Model):
    """Image `index` is decoded: `image` holds its codes and its PNG."""

    type: Literal["image_decoded"] = "image_decoded"
    index: int
    image: ImagePart


class TurnDone(_Model):
    """The turn is over and in the history; `reply` is the whole of it."""

    type: Literal["turn_done"] = "turn_done"
    reply: Reply


class ErrorEvent(_Model):
    """The turn failed (`error` is the SDK error class name); the history is unchanged."""

    type: Literal["error"] = "error"
    error: str
    message: str


Event = Annotated[
    TextBlock | ThinkingBlock | ImageStarted | ImageProgress | ImageTokensDone | ImageDecodeProgress
    | ImageDecoded | TurnDone | ErrorEvent,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(Event)
"""Parses any event from JSON: `EVENT_ADAPTER.validate_json(data)`."""


# ---------------------------------------------------------------------------------------------------------
# Saved sessions


class TurnRecord(_Model):
    """A message with the exact ids it occupies in the conversation (role markers included)."""

    message: Message
    ids: list[StrictInt]


class SessionRecord(_Model):
    """A saved session: the checkpoint it belongs to, its mode, and every turn with its exact ids."""

    format: Literal["llada-agent/session"] = "llada-agent/session"
    version: Literal[1] = 1
    checkpoint: str
    mode: Task
    turns: list[TurnRecord] = Field(min_length=1)


ThinkOptions.model_rebuild()
StoryOptions.model_rebuild()
