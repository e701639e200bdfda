"""`StatelessSession`: a conversation with a server that keeps none, over SGLang-Omni's OpenAI-compatible
`POST /v1/chat/completions` (MODEL_SPEC §9) — what `llada_agent.load(url)` uses for a server that is not a
llada-agent one (or with `RemoteModel(url, protocol="openai")`).

The client keeps the history and sends all of it with every turn (pictures as data URIs, each answer as
the text and pictures it came back as), so the server reads it again each turn: what the llada-agent
server's sessions avoid. Turns come back as the SDK's typed events and `Reply`, with what the API carries:
text and thinking as written, pictures as PNG (no codes), usage as counted by the server; `Reply.ids` is
empty (the server does not say which ids it wrote) and `Reply.cache` reports no cache. Options the API has
no field for (e.g. a text threshold, `decode=False`) are refused rather than dropped.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

from .client import ClientSession, response_error
from .errors import GenerationFailed, ImageError, InvalidInputError
from .schemas import (
    OPTIONS_OF_TASK,
    CacheInfo,
    EditOptions,
    ImageDecoded,
    ImageOptions,
    ImagePart,
    Message,
    Options,
    Reply,
    StoryOptions,
    Task,
    TextBlock,
    TextOptions,
    TextPart,
    ThinkingBlock,
    ThinkingPart,
    ThinkOptions,
    TurnDone,
    Usage,
)

# Option fields the API carries: the SDK's name -> the request's (top level for text, `image_generation`
# for pictures). The rest of each options class has no field in the API.
_TEXT_FIELDS = {"max_tokens": "max_tokens", "steps": "dllm_steps", "temperature": "temperature", "top_p": "top_p",
                "top_k": "top_k", "seed": "seed"}
_IMAGE_FIELDS = {"steps": "dllm_steps", "cfg_rescale": "cfg_rescale", "decoder_steps": "decoder_steps",
                 "seed": "seed", "decoder_mode": "decode_mode"}
_DRAW_FIELDS = {**_IMAGE_FIELDS, "cfg_scale": "cfg_scale"}
_EDIT_FIELDS = {**_IMAGE_FIELDS, "cfg_text_scale": "cfg_text_scale", "cfg_image_scale": "cfg_image_scale"}
# What a turn asks for: modalities and image_generation's mode.
_MODES: dict[str, tuple[list[str], str | None]] = {
    "chat": (["text"], None), "draw": (["image"], "normal"), "edit": (["image"], "normal"),
    "think": (["text", "image"], "thinking"), "story": (["text", "image"], "interleaved"),
}
_FINISH = {"stop": "stop", "length": "length"}


class StatelessSession(ClientSession):
    """A conversation whose history this client keeps and re-sends each turn (see the module docs)."""

    def _request(self, task: Task, parts: list[Any], options: Options | None, timeout: float | None,
                 ) -> tuple[Message, Callable[[Callable[[Any], None]], Awaitable[Reply]]]:
        if timeout is not None:
            raise InvalidInputError("the chat completions API takes no deadline; give RemoteModel a timeout")
        if task == "edit" and not any(isinstance(part, ImagePart) for part in parts):
            last = self.last_image()
            if last is None:
                raise ImageError("nothing to edit: pass an image, or draw one in this session first")
            parts = [last, *parts]
        body = {"messages": [*_history(self._messages), _message("user", parts)], "stream": True,
                "stream_options": {"include_usage": True}, **request_fields(task, options)}
        return Message(role="user", parts=parts), lambda emit: self._turn(task, body, emit)

    def fork(self) -> StatelessSession:
        """A new session with this one's history (both re-send it; the server keeps neither)."""
        fork = StatelessSession(self.model, mode=self.mode, system=self._system)
        fork._messages = list(self._messages)
        return fork

    async def _turn(self, task: Task, body: dict[str, Any], emit: Callable[[Any], None]) -> Reply:
        """One chat completion, streamed: text deltas as text (or thinking) blocks, pictures at the end."""
        pieces: list[Any] = []  # text, or ("image", id) where an interleaved reply places a picture
        images: dict[str, dict[str, Any]] = {}
        finish, usage = None, Usage()
        thinking = task == "think"
        async with self.model._event_lines("/v1/chat/completions", body) as lines:
            async for payload in lines:
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise response_error(500, json.dumps(chunk).encode())
                if chunk.get("usage"):
                    usage = Usage(prompt_tokens=chunk["usage"]["prompt_tokens"],
                                  generated_tokens=chunk["usage"]["completion_tokens"],
                                  cached_tokens=(chunk["usage"].get("prompt_tokens_details") or {}).get(
                                      "cached_tokens") or 0)
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        text = delta["content"]
                        if pieces and isinstance(pieces[-1], str):
                            pieces[-1] += text
                        else:
                            pieces.append(text)
                        emit((ThinkingBlock if thinking else TextBlock)(text=text, ids=[]))
                    if delta.get("image_ref"):
                        pieces.append(("image", delta["image_ref"]["image_id"]))
                    for image in delta.get("images") or []:
                        images[image["id"]] = image
                    finish = choice.get("finish_reason") or finish
        placed = {piece[1] for piece in pieces if isinstance(piece, tuple)}
        pieces += [("image", key) for key in images if key not in placed]
        parts: list[Any] = []
        warnings: list[str] = []
        for piece in pieces:
            if isinstance(piece, str):
                parts.append(ThinkingPart(text=piece) if thinking else TextPart(text=piece))
                continue
            image = images.get(piece[1])
            if image is None or image.get("data") is None:
                warnings.append(f"the server sent no picture for {piece[1]}")
                continue
            part = ImagePart(png=base64.b64decode(image["data"]))
            emit(ImageDecoded(index=sum(isinstance(p, ImagePart) for p in parts), image=part))
            parts.append(part)
        if finish is None:
            raise GenerationFailed("the server ended the turn without a finish reason")
        reply_finish = _FINISH.get(finish, "stop")
        if task != "chat" and reply_finish == "stop" and any(isinstance(p, ImagePart) for p in parts):
            reply_finish = "complete"
        reply = Reply(task=task, parts=parts, ids=[], finish_reason=reply_finish, usage=usage,
                      cache=CacheInfo(enabled=False), warnings=warnings)
        emit(TurnDone(reply=reply))
        return reply


def request_fields(task: Task, options: Options | None) -> dict[str, Any]:
    """The chat completion fields that ask for `task` with `options` (only what the caller set)."""
    modalities, mode = _MODES[task]
    fields: dict[str, Any] = {"modalities": modalities}
    generation: dict[str, Any] = {"mode": mode} if mode is not None else {}
    if options is not None:
        text, image = _split(task, options)
        if text is not None:
            fields.update(_carried(text, _TEXT_FIELDS, also=("image", "max_redraws")))
        if image is not None:
            generation.update(_carried(image, _DRAW_FIELDS if isinstance(image, ImageOptions) else _EDIT_FIELDS,
                                       sized=isinstance(image, ImageOptions)))
        if isinstance(options, StoryOptions) and "max_frames" in options.model_fields_set:
            generation["max_frames"] = options.max_frames
    if generation:
        fields["image_generation"] = generation
    return fields


def _split(task: Task, options: Options) -> tuple[TextOptions | None, ImageOptions | EditOptions | None]:
    """The text and picture options of a turn's options object."""
    expected = OPTIONS_OF_TASK[task]
    if type(options) is not expected:
        raise InvalidInputError(f"a {task} turn takes {expected.__name__}, got {type(options).__name__}")
    if isinstance(options, ThinkOptions):
        _refuse(options, {*_TEXT_FIELDS, "image"}, "ThinkOptions")
        return options, options.image if "image" in options.model_fields_set else None
    if isinstance(options, StoryOptions):
        _refuse(options, {"text", "image", "max_frames"}, "StoryOptions")
        return (options.text if "text" in options.model_fields_set else None,
                options.image if "image" in options.model_fields_set else None)
    if isinstance(options, TextOptions):
        return options, None
    return None, options


def _carried(options: Any, names: dict[str, str], sized: bool = False, also: tuple[str, ...] = ()) -> dict[str, Any]:
    """The request fields of the options' fields the caller set; `also`: fields looked at elsewhere."""
    _refuse(options, {*names, *also, *(("size", "grid") if sized else ())}, type(options).__name__)
    fields = {names[name]: getattr(options, name) for name in options.model_fields_set if name in names}
    if sized and options.size is not None:
        fields["image_w"], fields["image_h"] = options.size
    elif sized and options.grid is not None:
        fields["image_h"], fields["image_w"] = (side * 32 for side in options.grid)
    return fields


def _refuse(options: Any, carried: set[str], name: str) -> None:
    lost = sorted(set(options.model_fields_set) - carried)
    if lost:
        raise InvalidInputError(f"the chat completions API has no field for {name}.{', '.join(lost)}; "
                                "leave them unset for a server without llada-agent sessions")


def _history(messages: list[Message]) -> list[dict[str, Any]]:
    return [_message(message.role, message.parts) for message in messages]


def _message(role: str, parts: list[Any]) -> dict[str, Any]:
    """An OpenAI-style message: text and pictures as content parts (an answer's pictures as `images`)."""
    if role == "system":
        return {"role": "system", "content": "".join(part.text for part in parts)}
    content: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, (TextPart, ThinkingPart)):
            content.append({"type": "text", "text": part.text})
            continue
        if part.png is None:
            raise InvalidInputError("a server without llada-agent sessions reads pictures, not codes: decode "
                                    "the image first")
        data = base64.b64encode(part.png).decode("ascii")
        if role == "user":
            content.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
        else:
            image_id = f"image-{len(images)}"
            content.append({"type": "image_ref", "image_id": image_id})
            images.append({"id": image_id, "data": data, "format": "png"})
    message: dict[str, Any] = {"role": role, "content": content}
    if images:
        message["images"] = images
    return message
