"""The HTTP API's request bodies: OpenAI's chat, image and edit requests with SGLang-Omni's extensions
(MODEL_SPEC §9), plus this server's session requests, as strict Pydantic models.

`parse` turns a body into one of them or raises `InvalidInputError` with a short summary of what is wrong;
nothing here knows of HTTP or of the model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidInputError
from .schemas import OPTIONS_OF_TASK, Options, Part, Task


def summary(exc: ValidationError, limit: int = 3) -> str:
    """The first few validation errors, one line: "field.path: message; ..."."""
    errors = exc.errors(include_url=False)
    shown = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in errors[:limit])
    return shown + (f" (and {len(errors) - limit} more)" if len(errors) > limit else "")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextContent(_Strict):
    type: Literal["text"]
    text: str


class ImageURLContent(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str


class ImageRefContent(_Strict):
    """A picture of an assistant message, by its id in the message's `images` (interleaved replies)."""

    type: Literal["image_ref"]
    image_id: str


ContentPart = Annotated[TextContent | ImageURLContent | ImageRefContent, Field(discriminator="type")]


class ImageObject(_Strict):
    """A picture as this server returns it (accepted back in an assistant message of the history)."""

    id: str | None = None
    data: str
    format: str = "png"
    width: int | None = None
    height: int | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    image: ImageObject | None = None
    images: list[ImageObject] | None = None


DecodeMode = Literal["normal", "turbo", "decoder", "decoder-turbo"]
# SGLang-Omni's decode_mode names -> the SDK's decoder modes.
DECODER_MODES = {"normal": "normal", "decoder": "normal", "turbo": "turbo", "decoder-turbo": "turbo"}


class ImageGeneration(_Strict):
    """SGLang-Omni's `image_generation` object (plus `max_frames` of interleaved mode)."""

    mode: Literal["normal", "thinking", "interleaved"] | None = None
    image_h: int | None = Field(default=None, ge=1)
    image_w: int | None = Field(default=None, ge=1)
    cfg_scale: float | None = Field(default=None, ge=0.0)
    cfg_rescale: float | None = Field(default=None, ge=0.0, le=1.0)
    cfg_text_scale: float | None = Field(default=None, ge=0.0)
    cfg_image_scale: float | None = Field(default=None, ge=0.0)
    dllm_steps: int | None = Field(default=None, ge=1, le=1024)
    decode_mode: DecodeMode | None = None
    decoder_steps: int | None = Field(default=None, ge=1, le=1000)
    seed: int | None = None
    max_frames: int | None = Field(default=None, ge=1, le=64)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """`POST /v1/chat/completions`. `dllm_steps` (top level, an extension) is the text's steps per block."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "image"]] | None = Field(default=None, min_length=1)
    image_generation: ImageGeneration | None = None
    images: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    seed: int | None = None
    n: Literal[1] | None = None
    user: str | None = None
    dllm_steps: int | None = Field(default=None, ge=1, le=1024)


class SessionMessageRequest(ChatCompletionRequest):
    """`POST /v1/sessions/{id}/messages`: one user message; `task` (optional) overrides what the turn does."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1)
    task: Task | None = None


class CreateSessionRequest(_Strict):
    """`POST /v1/sessions`: a mode, an optional system prompt, and optionally a history to continue."""

    mode: Task = "chat"
    system: str | None = None
    messages: list[ChatMessage] | None = None


class TurnRequest(BaseModel):
    """`POST /v1/sessions/{id}/turns`: one turn in the SDK's own terms (what `RemoteSession` sends).

    `content` is the user's parts as the SDK writes them in JSON (text, and images as PNG or as codes on a
    grid); `options` are the fields of the task's options class that the caller set (the rest keep the
    server's defaults, a checkpoint's recommendations included); `timeout` bounds each engine request (the
    server's own limit still applies); `stream` answers with typed SDK events instead of the `Reply`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    content: list[Part] = Field(min_length=1)
    task: Task | None = None
    options: dict[str, Any] | None = None
    timeout: float | None = Field(default=None, gt=0)
    stream: bool = False


class ForkRequest(_Strict):
    """`POST /v1/sessions/{id}/fork`: optionally, how many of the session's turns the fork keeps."""

    turns: int | None = Field(default=None, ge=0)


def turn_options(task: Task, options: dict[str, Any] | None) -> Options | None:
    """The options object of `task` from its JSON fields (None: the defaults)."""
    if options is None:
        return None
    kind = OPTIONS_OF_TASK[task]
    try:
        return kind.model_validate(options)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid {kind.__name__} for a {task} turn: {summary(exc)}") from exc


class ImageControls(BaseModel):
    """The fields the image endpoints share (OpenAI's and SGLang-Omni's names for the same controls)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png"] | None = None
    user: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = Field(default=None, ge=1, le=1000)
    guidance_scale: float | None = Field(default=None, ge=0.0)
    dllm_steps: int | None = Field(default=None, ge=1, le=1024)
    cfg_scale: float | None = Field(default=None, ge=0.0)
    cfg_rescale: float | None = Field(default=None, ge=0.0, le=1.0)
    decode_mode: DecodeMode | None = None
    decoder_steps: int | None = Field(default=None, ge=1, le=1000)

    def generation(self, **extra: Any) -> ImageGeneration:
        """The `image_generation` object these fields mean (OpenAI names mapped to SGLang-Omni's)."""
        pairs = (("num_inference_steps", "decoder_steps"), ("guidance_scale", "cfg_scale"))
        for native, ours in pairs:
            a, b = getattr(self, native), getattr(self, ours)
            if a is not None and b is not None and a != b:
                raise InvalidInputError(f"{native} and {ours} disagree ({a} vs {b})")
        fields = {"dllm_steps": self.dllm_steps, "cfg_rescale": self.cfg_rescale, "decode_mode": self.decode_mode,
                  "decoder_steps": self.decoder_steps if self.decoder_steps is not None else self.num_inference_steps,
                  "cfg_scale": self.cfg_scale if self.cfg_scale is not None else self.guidance_scale,
                  "seed": self.seed, **extra}
        try:
            return ImageGeneration(**{k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            raise InvalidInputError(f"invalid request: {summary(exc)}") from exc


class ImageGenerationsRequest(ImageControls):
    """`POST /v1/images/generations` (OpenAI fields, plus SGLang-Omni's controls and mode)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    size: str | None = Field(default=None, pattern=r"^[0-9]+x[0-9]+$")
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    mode: Literal["normal", "thinking"] | None = None


class ImageEditsRequest(ImageControls):
    """The form fields of `POST /v1/images/edits` besides the image (form values arrive as text)."""

    cfg_text_scale: float | None = Field(default=None, ge=0.0)
    cfg_image_scale: float | None = Field(default=None, ge=0.0)


def parse(schema: type[BaseModel], body: bytes) -> Any:
    """`body` (JSON bytes) as `schema`, or InvalidInputError naming what is wrong."""
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise InvalidInputError(f"the body is not valid JSON: {exc.errors()[0]['msg']}") from exc
        raise InvalidInputError(f"invalid request: {summary(exc)}") from exc
