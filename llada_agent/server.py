"""An HTTP server over one `Model`: SGLang-Omni's OpenAI-compatible API (MODEL_SPEC §9) plus sessions.

```
llada-agent serve --model tiny --host 127.0.0.1 --port 8000
```

Endpoints:

- `POST /v1/chat/completions`: OpenAI chat completions with SGLang-Omni's `modalities` and
  `image_generation` {mode, image_h, image_w, cfg_scale, cfg_rescale, cfg_text_scale, cfg_image_scale,
  dllm_steps, decode_mode, decoder_steps, seed, max_frames}. `["text"]` answers in text; `["image"]` draws
  (or edits, when the last user message holds an image); mode "thinking" plans before drawing; mode
  "interleaved" writes text with pictures (`content` = text and `image_ref` parts, plus `images`).
  `stream: true` streams OpenAI chunks as Server-Sent Events; images come in the last chunk.
- `POST /v1/images/generations` (JSON) and `POST /v1/images/edits` (multipart, one `image` file).
- `POST /v1/sessions`, `POST /v1/sessions/{id}/messages`, `GET /v1/sessions[/{id}]`,
  `DELETE /v1/sessions/{id}`: conversations whose history stays on the server as exact token ids, so each
  turn computes only its new blocks (`usage.prompt_tokens_details.cached_tokens` shows the reuse).
- `POST /v1/sessions/{id}/turns` and `POST /v1/sessions/{id}/fork`: the same sessions in the SDK's own
  terms — parts, task and options as the SDK writes them in JSON, answered by the `Reply` or (`stream`)
  its typed events — which `llada_agent.load("http://...")` speaks (`llada_agent.remote`).
- `GET /v1/models`, `GET /health`.

Images travel inline only (data: URIs or base64): the server never fetches URLs or reads its own files.
Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`): 400 invalid input, 404 unknown
session, 409 session busy, 413 too large, 429 server busy, 503 model closed, 504 timeout, 500 otherwise.

Needs the `server` extra (starlette, uvicorn, python-multipart).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

try:
    from starlette.applications import Starlette
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("llada_agent.server needs the 'server' extra: pip install 'llada-agent[server]'") from exc

from runtime import errors as rt_errors

from .errors import (
    Busy,
    Cancelled,
    ContextLengthError,
    GenerationFailed,
    ImageError,
    InvalidInputError,
    LLaDAError,
    ModelClosed,
    SessionFileError,
    SessionNotFound,
    Timeout,
)
from .model import Model
from .schemas import (
    EditOptions,
    ErrorEvent,
    ImageOptions,
    ImagePart,
    ImageProgress,
    ImageTokensDone,
    Message,
    Options,
    Reply,
    StoryOptions,
    Task,
    TextBlock,
    TextOptions,
    TextPart,
    ThinkingBlock,
    ThinkOptions,
)
from .session import Session, TurnStream
from .wire import (
    DECODER_MODES,
    ChatCompletionRequest,
    ChatMessage,
    CreateSessionRequest,
    ForkRequest,
    ImageControls,
    ImageEditsRequest,
    ImageGeneration,
    ImageGenerationsRequest,
    ImageURLContent,
    SessionMessageRequest,
    TextContent,
    TurnRequest,
    parse,
    summary,
    turn_options,
)

__all__ = ["PayloadTooLarge", "ServerBusy", "ServerLimits", "SessionNotFound", "create_app", "serve"]


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server."""

    max_body_bytes: int = 64 << 20
    """Largest request body (JSON or multipart), in bytes."""
    max_image_bytes: int = 16 << 20
    """Largest single input image, encoded (PNG/JPEG/... bytes after base64 decoding)."""
    max_images: int = 16
    """Most input images in one request (history included)."""
    max_sessions: int = 1024
    """Most sessions kept; when full, the least recently used idle session is dropped."""
    turn_timeout: float | None = None
    """Seconds each engine request of a turn may run (None: no deadline)."""


# ---------------------------------------------------------------------------------------------------------
# Errors of the server itself


class PayloadTooLarge(InvalidInputError):
    """The request body or one of its images is larger than the server's limits."""


class ServerBusy(Busy):
    """The server is at capacity (engine queue full, or every kept session busy); retry later."""


def _status(error: BaseException) -> tuple[int, str, str]:
    """HTTP status, OpenAI error type and code for an error."""
    if isinstance(error, SessionNotFound):
        return 404, "not_found_error", "session_not_found"
    if isinstance(error, PayloadTooLarge):
        return 413, "invalid_request_error", "payload_too_large"
    if isinstance(error, ContextLengthError):
        return 400, "invalid_request_error", "context_length_exceeded"
    if isinstance(error, ImageError):
        return 400, "invalid_request_error", "invalid_image"
    if isinstance(error, (InvalidInputError, SessionFileError)):
        return 400, "invalid_request_error", "invalid_request"
    if isinstance(error, ServerBusy) or isinstance(error.__cause__, rt_errors.EngineBusyError):
        return 429, "rate_limit_error", "server_busy"
    if isinstance(error, Busy):
        return 409, "conflict_error", "session_busy"
    if isinstance(error, Cancelled):
        return 409, "conflict_error", "cancelled"
    if isinstance(error, ModelClosed):
        return 503, "server_error", "model_unavailable"
    if isinstance(error, Timeout):
        return 504, "server_error", "timeout"
    if isinstance(error, LLaDAError):
        return 500, "server_error", "generation_failed"
    return 500, "server_error", "internal_error"


def _error_body(error: BaseException) -> dict[str, Any]:
    _, kind, code = _status(error)
    message = str(error) if isinstance(error, LLaDAError) else "internal server error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _error_response(error: BaseException) -> JSONResponse:
    status = _status(error)[0]
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse(_error_body(error), status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------------------
# Requests into turns: parts, task, options


class _ImageBudget:
    """Counts and sizes the images of one request against the limits; decodes them off the event loop."""

    def __init__(self, limits: ServerLimits):
        self.limits = limits
        self.count = 0

    async def open(self, source: str | bytes) -> ImagePart:
        self.count += 1
        if self.count > self.limits.max_images:
            raise InvalidInputError(f"at most {self.limits.max_images} images per request")
        data = source if isinstance(source, bytes) else self._decode(source)
        if len(data) > self.limits.max_image_bytes:
            raise PayloadTooLarge(f"an image of {len(data)} bytes is over the limit of "
                                  f"{self.limits.max_image_bytes} bytes")
        return await asyncio.to_thread(ImagePart.open, data)

    def _decode(self, text: str) -> bytes:
        if text.startswith(("http://", "https://", "file:")):
            raise ImageError("images must be sent inline (a data: URI or base64); the server fetches no URLs")
        if text.startswith("data:"):
            header, comma, text = text.partition(",")
            if not comma or not header.endswith(";base64"):
                raise ImageError("a data: URI must carry base64 data (data:image/png;base64,...)")
        if len(text) > 4 * (self.limits.max_image_bytes // 3 + 1):
            raise PayloadTooLarge(f"an image is over the limit of {self.limits.max_image_bytes} bytes")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"an image is neither a data: URI nor valid base64 ({exc}); the server reads "
                             "no files or URLs") from exc


async def _message(chat: ChatMessage, budget: _ImageBudget) -> Message:
    """The SDK message of an OpenAI-style message (images read, ids of `image_ref` parts resolved)."""
    role = "system" if chat.role == "developer" else chat.role
    if role != "assistant" and (chat.image is not None or chat.images):
        raise InvalidInputError(f"only assistant messages carry `image` / `images`, not {chat.role}")
    refs = {image.id: image for image in chat.images or [] if image.id is not None}
    placed: set[str] = set()
    parts: list[Any] = []
    items = [TextContent(type="text", text=chat.content)] if isinstance(chat.content, str) else chat.content or []
    for item in items:
        if isinstance(item, TextContent):
            if item.text or role != "assistant":
                parts.append(TextPart(text=item.text))
        elif isinstance(item, ImageURLContent):
            url = item.image_url if isinstance(item.image_url, str) else item.image_url.url
            parts.append(await budget.open(url))
        else:
            if item.image_id not in refs:
                raise InvalidInputError(f"image_ref {item.image_id!r} names no image of the message's `images`")
            placed.add(item.image_id)
            parts.append(await budget.open(refs[item.image_id].data))
    extra = [image for image in chat.images or [] if image.id not in placed]
    for image in [*extra, *([chat.image] if chat.image is not None else [])]:
        parts.append(await budget.open(image.data))
    if role == "system":
        if any(isinstance(p, ImagePart) for p in parts):
            raise InvalidInputError("a system message holds text only")
        parts = [TextPart(text="".join(p.text for p in parts))]
    try:
        return Message(role=role, parts=parts)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid {chat.role} message: {summary(exc)}") from exc


@dataclass(frozen=True)
class _Turn:
    """What one request asks: the task, its options, the new user parts, and what the reply shows."""

    task: Task
    options: Options
    content: list[Any]
    show_text: bool


def _plan(body: ChatCompletionRequest, content: list[Any], *, mode: Task | None = None,
          task: Task | None = None) -> _Turn:
    """The turn of a request: `task` when given; else what modalities and image_generation ask; else a
    session's `mode` (without a session: chat)."""
    gen = body.image_generation
    has_image = any(isinstance(part, ImagePart) for part in content)
    modalities = body.modalities
    if modalities is not None and gen is not None and "image" not in modalities:
        raise InvalidInputError("image_generation needs 'image' in modalities")
    if task is None and (modalities is not None or gen is not None):
        if modalities is None:
            modalities = ["text", "image"] if gen.mode == "interleaved" else ["image"]
        kind = (gen.mode if gen is not None else None) or "normal"
        if "image" not in modalities:
            task = "chat"
        elif kind == "interleaved":
            if "text" not in modalities:
                raise InvalidInputError("interleaved mode needs modalities ['text', 'image']")
            task = "story"
        elif kind == "thinking":
            if has_image:
                raise InvalidInputError("thinking mode draws from text; it does not edit images")
            task = "think"
        else:
            task = "edit" if has_image or mode == "edit" else "draw"
    task = task or mode or "chat"
    if modalities is None:
        modalities = {"chat": ["text"], "draw": ["image"], "edit": ["image"]}.get(task, ["text", "image"])
    return _Turn(task, _options(task, body, gen or ImageGeneration()), content, "text" in modalities)


def _present(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def _merged(default: BaseModel, changes: dict[str, Any]) -> Any:
    return type(default).model_validate({**dict(default), **changes})


def _options(task: Task, body: ChatCompletionRequest, gen: ImageGeneration) -> Options:
    """The SDK options of a request; SDK defaults stand for whatever the request leaves out."""
    text = _present(max_tokens=body.max_completion_tokens or body.max_tokens, steps=body.dllm_steps,
                    temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed)
    image = _present(steps=gen.dllm_steps, cfg_rescale=gen.cfg_rescale, decoder_steps=gen.decoder_steps,
                     decoder_mode=DECODER_MODES.get(gen.decode_mode or ""),
                     seed=gen.seed if gen.seed is not None else body.seed)
    sized = gen.image_h is not None or gen.image_w is not None
    if gen.max_frames is not None and task != "story":
        raise InvalidInputError("max_frames is for interleaved mode")
    try:
        if task == "chat":
            return TextOptions(**text)
        if task in ("draw", "think"):
            if gen.cfg_text_scale is not None or gen.cfg_image_scale is not None:
                raise InvalidInputError("cfg_text_scale and cfg_image_scale are for edits and interleaved mode; "
                                        "use cfg_scale")
            if sized and (gen.image_h is None or gen.image_w is None):
                raise InvalidInputError("give image_h and image_w together")
            size = (gen.image_w, gen.image_h) if sized else None
            draw = ImageOptions(**image, **_present(cfg_scale=gen.cfg_scale, size=size))
            return draw if task == "draw" else ThinkOptions(**text, image=draw)
        if sized:
            raise InvalidInputError(f"a {'story' if task == 'story' else 'edit'}'s pictures follow the model or "
                                    "the source image; leave image_h and image_w out")
        guidance = _present(cfg_text_scale=gen.cfg_text_scale if gen.cfg_text_scale is not None else gen.cfg_scale,
                            cfg_image_scale=gen.cfg_image_scale)
        if task == "edit":
            return EditOptions(**image, **guidance)
        story = StoryOptions()
        return StoryOptions(max_frames=gen.max_frames or story.max_frames, text=_merged(story.text, text),
                            image=_merged(story.image, {**image, **guidance}))
    except ValidationError as exc:
        raise InvalidInputError(f"invalid generation options: {summary(exc)}") from exc


async def _user_content(body: ChatCompletionRequest, message: ChatMessage, budget: _ImageBudget) -> list[Any]:
    """The parts of the new user message, the request's `images` (SGLang-Omni's extension) first."""
    if message.role != "user":
        raise InvalidInputError(f"the last message must be the user's, not {message.role}")
    extra = [await budget.open(source) for source in body.images or []]
    return [*extra, *(await _message(message, budget)).parts]


# ---------------------------------------------------------------------------------------------------------
# Replies into OpenAI JSON


_FINISH = {"stop": "stop", "complete": "stop", "skipped": "stop", "malformed": "stop", "length": "length",
           "max_frames": "length"}


def _finish(reply: Reply) -> str:
    """OpenAI's finish reason: "length" when a limit ended the turn, else "stop" (`warnings` say more)."""
    return _FINISH.get(reply.finish_reason, "stop")


def _png_size(png: bytes) -> tuple[int, int]:
    # Width and height are the first fields of the IHDR chunk, right after the 8-byte signature.
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _image_object(part: ImagePart, image_id: str) -> dict[str, Any]:
    """`{id, data, format, width, height}`; `data` is null when the picture could not be decoded."""
    width, height = _png_size(part.png) if part.png is not None else part.pixel_size or (None, None)
    data = base64.b64encode(part.png).decode("ascii") if part.png is not None else None
    return {"id": image_id, "data": data, "format": "png", "width": width, "height": height}


def _image_id(completion_id: str, index: int) -> str:
    return f"{completion_id}-image-{index}"


def _assistant_message(reply: Reply, turn: _Turn, completion_id: str) -> dict[str, Any]:
    if reply.task == "chat":
        return {"role": "assistant", "content": reply.text}
    if reply.task == "story":
        content, images = [], []
        for part in reply.parts:
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                image_id = _image_id(completion_id, len(images))
                content.append({"type": "image_ref", "image_id": image_id})
                images.append(_image_object(part, image_id))
        return {"role": "assistant", "content": content, "images": images}
    message: dict[str, Any] = {"role": "assistant", "content": (reply.thinking or "") if turn.show_text else None}
    if reply.image is not None:
        message["image"] = _image_object(reply.image, _image_id(completion_id, 0))
    return message


def _usage(reply: Reply) -> dict[str, Any]:
    usage = reply.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.generated_tokens,
            "total_tokens": usage.prompt_tokens + usage.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------------------------------
# Sessions kept on the server


@dataclass
class _Entry:
    session: Session
    created: int
    active: bool = False


class _Sessions:
    """The server's sessions by id, least recently used first; a session serves one request at a time."""

    def __init__(self, limit: int):
        self.limit = limit
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, session: Session) -> str:
        if len(self._entries) >= self.limit:
            idle = next((key for key, entry in self._entries.items() if not self._busy(entry)), None)
            if idle is None:
                raise ServerBusy(f"all {self.limit} sessions are busy")
            del self._entries[idle]
        session_id = _new_id("sess")
        self._entries[session_id] = _Entry(session, int(time.time()))
        return session_id

    def get(self, session_id: str) -> _Entry:
        entry = self._entries.get(session_id)
        if entry is None:
            raise SessionNotFound(f"no session {session_id!r}")
        self._entries.move_to_end(session_id)
        return entry

    def check_free(self, session_id: str) -> _Entry:
        entry = self.get(session_id)
        if self._busy(entry):
            raise Busy(f"session {session_id} is answering another request; wait for it or DELETE to cancel")
        return entry

    @contextlib.contextmanager
    def use(self, session_id: str) -> Iterator[_Entry]:
        entry = self.check_free(session_id)
        entry.active = True
        try:
            yield entry
        finally:
            entry.active = False

    def remove(self, session_id: str) -> None:
        entry = self.get(session_id)
        entry.session.cancel()
        del self._entries[session_id]

    def ids(self) -> list[str]:
        return list(self._entries)

    @staticmethod
    def _busy(entry: _Entry) -> bool:
        return entry.active or entry.session.busy


def _session_summary(session_id: str, entry: _Entry) -> dict[str, Any]:
    session = entry.session
    return {"id": session_id, "object": "session", "created": entry.created, "mode": session.mode,
            "system": session.system, "turns": (len(session.messages) - 1) // 2, "tokens": len(session.ids),
            "busy": entry.active or session.busy}


# ---------------------------------------------------------------------------------------------------------
# The application


class _Server:
    def __init__(self, model: Model, name: str, limits: ServerLimits):
        self.model = model
        self.name = name
        self.limits = limits
        self.sessions = _Sessions(limits.max_sessions)

    # ----- OpenAI-compatible endpoints

    async def chat_completions(self, request: Request) -> Response:
        body = parse(ChatCompletionRequest, await request.body())
        budget = _ImageBudget(self.limits)
        *history, last = body.messages
        content = await _user_content(body, last, budget)
        turn = _plan(body, content)
        messages = [await _message(message, budget) for message in history]
        session = await Session.from_messages(self.model, messages, mode=turn.task)
        return await self._answer(session, turn, body)

    async def image_generations(self, request: Request) -> Response:
        body = parse(ImageGenerationsRequest, await request.body())
        size = _requested_size(body)
        extra = _present(mode=body.mode, image_w=size[0] if size else None, image_h=size[1] if size else None)
        chat = ChatCompletionRequest(messages=[ChatMessage(role="user", content=body.prompt)],
                                     image_generation=body.generation(**extra), modalities=["image"])
        turn = _plan(chat, [TextPart(text=body.prompt)])
        return await self._images_response(turn, body)

    async def image_edits(self, request: Request) -> Response:
        async with request.form(max_files=4, max_fields=64) as form:
            sources = [value for key, value in form.multi_items() if key in ("image", "image[]")]
            others = [(key, value) for key, value in form.multi_items() if key not in ("image", "image[]")]
            fields = dict(others)
            if len(sources) != 1:
                raise InvalidInputError(f"an edit takes exactly one `image`, got {len(sources)}")
            if len(fields) != len(others):
                raise InvalidInputError("a form field appears more than once")
            try:
                body = ImageEditsRequest.model_validate(fields)
            except ValidationError as exc:
                raise InvalidInputError(f"invalid request: {summary(exc)}") from exc
            source = sources[0]
            data = await source.read() if isinstance(source, UploadFile) else source
        image = await _ImageBudget(self.limits).open(data)
        gen = body.generation(**_present(cfg_text_scale=body.cfg_text_scale, cfg_image_scale=body.cfg_image_scale))
        chat = ChatCompletionRequest(messages=[ChatMessage(role="user", content=body.prompt)],
                                     image_generation=gen, modalities=["image"])
        turn = _plan(chat, [image, TextPart(text=body.prompt)])
        return await self._images_response(turn, body)

    async def _images_response(self, turn: _Turn, body: ImageControls) -> Response:
        session = self.model.session(mode=turn.task)
        reply = await session.send(turn.content, task=turn.task, options=turn.options, timeout=self.limits.turn_timeout)
        image = reply.image
        if image is None or image.png is None:
            raise GenerationFailed("; ".join(reply.warnings) or "the model returned no picture")
        encoded = base64.b64encode(image.png).decode("ascii")
        item: dict[str, Any] = ({"url": f"data:image/png;base64,{encoded}"} if body.response_format == "url"
                                else {"b64_json": encoded})
        if reply.thinking is not None:
            item["revised_prompt"] = reply.thinking
        return JSONResponse({"created": int(time.time()), "data": [item], "usage": _usage(reply)})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                                         "owned_by": "llada-agent"}]})

    async def health(self, request: Request) -> Response:
        if not self.model.started:
            return JSONResponse({"status": "unavailable", "model": self.name}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.name, "sessions": len(self.sessions),
                             "cache": self.model.cache_stats().model_dump(mode="json")})

    # ----- sessions

    async def create_session(self, request: Request) -> Response:
        raw = await request.body()
        body = parse(CreateSessionRequest, raw) if raw.strip() else CreateSessionRequest()
        if body.messages:
            budget = _ImageBudget(self.limits)
            messages = [await _message(message, budget) for message in body.messages]
            if body.system is not None:
                if messages[0].role == "system":
                    raise InvalidInputError("give the system prompt as `system` or as the first message, not both")
                messages.insert(0, Message(role="system", parts=[TextPart(text=body.system)]))
            session = await Session.from_messages(self.model, messages, mode=body.mode)
        else:
            session = self.model.session(mode=body.mode, system=body.system)
        session_id = self.sessions.add(session)
        return JSONResponse(_session_summary(session_id, self.sessions.get(session_id)), status_code=201)

    async def list_sessions(self, request: Request) -> Response:
        data = [_session_summary(key, self.sessions.get(key)) for key in self.sessions.ids()]
        return JSONResponse({"object": "list", "data": data})

    async def get_session(self, request: Request) -> Response:
        session_id = request.path_params["session_id"]
        entry = self.sessions.get(session_id)
        summary = _session_summary(session_id, entry)
        summary["messages"] = [message.model_dump(mode="json") for message in entry.session.messages]
        return JSONResponse(summary)

    async def delete_session(self, request: Request) -> Response:
        session_id = request.path_params["session_id"]
        self.sessions.remove(session_id)
        return JSONResponse({"id": session_id, "object": "session.deleted", "deleted": True})

    async def session_message(self, request: Request) -> Response:
        session_id = request.path_params["session_id"]
        entry = self.sessions.check_free(session_id)
        body = parse(SessionMessageRequest, await request.body())
        content = await _user_content(body, body.messages[0], _ImageBudget(self.limits))
        turn = _plan(body, content, mode=entry.session.mode, task=body.task)
        return await self._answer(entry.session, turn, body, session_id=session_id)

    async def fork_session(self, request: Request) -> Response:
        """A new session with the history of another, or its first `turns` turns (sharing the cached prefix)."""
        entry = self.sessions.get(request.path_params["session_id"])
        raw = await request.body()
        body = parse(ForkRequest, raw) if raw.strip() else ForkRequest()
        session_id = self.sessions.add(entry.session.fork(body.turns))
        return JSONResponse(_session_summary(session_id, self.sessions.get(session_id)), status_code=201)

    async def session_turn(self, request: Request) -> Response:
        """One turn in the SDK's own terms (`TurnRequest`): the `Reply` as JSON, or its typed events."""
        session_id = request.path_params["session_id"]
        entry = self.sessions.check_free(session_id)
        body = parse(TurnRequest, await request.body())
        self._check_parts(body.content)
        task = body.task or entry.session.mode
        options = turn_options(task, body.options)
        deadlines = [t for t in (body.timeout, self.limits.turn_timeout) if t is not None]
        timeout = min(deadlines) if deadlines else None
        if body.stream:
            stream = entry.session.stream(body.content, task=task, options=options, timeout=timeout)
            return StreamingResponse(self._events(stream, session_id), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        with self.sessions.use(session_id):
            reply = await entry.session.send(body.content, task=task, options=options, timeout=timeout)
        return JSONResponse({"object": "session.turn", "session_id": session_id,
                             "reply": reply.model_dump(mode="json")})

    def _check_parts(self, parts: list[Any]) -> None:
        """The images of a turn request against the limits (the session checks their codes)."""
        images = [part for part in parts if isinstance(part, ImagePart)]
        if len(images) > self.limits.max_images:
            raise InvalidInputError(f"at most {self.limits.max_images} images per request")
        for image in images:
            if image.png is not None and len(image.png) > self.limits.max_image_bytes:
                raise PayloadTooLarge(f"an image of {len(image.png)} bytes is over the limit of "
                                      f"{self.limits.max_image_bytes} bytes")

    async def _events(self, stream: TurnStream, session_id: str) -> AsyncIterator[str]:
        """A turn's events as Server-Sent Events of SDK event JSON: the last is `turn_done` or `error`."""
        reported = False
        try:
            with self.sessions.use(session_id):
                async with stream as events:
                    async for event in events:
                        reported = isinstance(event, ErrorEvent)
                        yield _sse(event.model_dump(mode="json"))
        except (LLaDAError, rt_errors.RuntimeErrorBase) as error:
            if not reported:  # it failed before the turn began (e.g. the session became busy)
                yield _sse(ErrorEvent(error=type(error).__name__, message=str(error)).model_dump(mode="json"))
        yield "data: [DONE]\n\n"

    # ----- one turn, whole or streamed

    async def _answer(self, session: Session, turn: _Turn, body: ChatCompletionRequest, *,
                      session_id: str | None = None) -> Response:
        completion_id = _new_id("chatcmpl")
        head: dict[str, Any] = {"id": completion_id, "created": int(time.time()), "model": self.name}
        if session_id is not None:
            head["session_id"] = session_id
        if body.stream:
            if session_id is not None:
                self.sessions.check_free(session_id)
            # Made here so that a request the turn refuses fails with its status, before the stream starts.
            stream = session.stream(turn.content, task=turn.task, options=turn.options,
                                    timeout=self.limits.turn_timeout)
            chunks = self._chunks(stream, turn, body, head, session_id)
            return StreamingResponse(chunks, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        with self.sessions.use(session_id) if session_id is not None else contextlib.nullcontext():
            reply = await session.send(turn.content, task=turn.task, options=turn.options,
                                       timeout=self.limits.turn_timeout)
        result = {**head, "object": "chat.completion",
                  "choices": [{"index": 0, "message": _assistant_message(reply, turn, completion_id),
                               "finish_reason": _finish(reply)}],
                  "usage": _usage(reply)}
        if reply.warnings:
            result["warnings"] = reply.warnings
        return JSONResponse(result)

    async def _chunks(self, stream: TurnStream, turn: _Turn, body: ChatCompletionRequest, head: dict[str, Any],
                      session_id: str | None) -> AsyncIterator[str]:
        """The turn as OpenAI chunks: text deltas as they are written, pictures in the last chunk.

        Interleaved turns mark where each picture goes with an `image_ref` delta. Image progress goes out as
        SSE comments (which clients ignore), so long drawings keep the connection alive."""
        head = {**head, "object": "chat.completion.chunk"}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        reply: Reply | None = None
        try:
            with self.sessions.use(session_id) if session_id is not None else contextlib.nullcontext():
                yield chunk({"role": "assistant", "content": ""})
                async with stream as events:
                    async for event in events:
                        if isinstance(event, TextBlock) or (isinstance(event, ThinkingBlock) and turn.show_text):
                            yield chunk({"content": event.text})
                        elif isinstance(event, ImageTokensDone) and turn.task == "story":
                            image_id = _image_id(head["id"], event.index)
                            yield chunk({"image_ref": {"type": "image_ref", "image_id": image_id}})
                        elif isinstance(event, ImageProgress):
                            yield f": image {event.index} {event.committed}/{event.total}\n\n"
                reply = stream.reply
        except (LLaDAError, rt_errors.RuntimeErrorBase) as error:
            yield _sse(_error_body(error))
            yield "data: [DONE]\n\n"
            return
        assert reply is not None
        images = [_image_object(part, _image_id(head["id"], index)) for index, part in enumerate(reply.images)]
        yield chunk({"images": images} if images else {}, _finish(reply))
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(reply)})
        yield "data: [DONE]\n\n"


def _requested_size(body: ImageGenerationsRequest) -> tuple[int, int] | None:
    """(width, height) from `size` "WxH" or `width` + `height`; None for the model's default."""
    if (body.width is None) != (body.height is None):
        raise InvalidInputError("give width and height together")
    pair = (body.width, body.height) if body.width is not None else None
    if body.size is not None:
        width, height = (int(x) for x in body.size.split("x"))
        if pair is not None and pair != (width, height):
            raise InvalidInputError(f"size {body.size} and width/height {pair[0]}x{pair[1]} disagree")
        pair = (width, height)
    return pair


class _BodyLimit:
    """ASGI middleware: refuses request bodies over `limit` bytes (by Content-Length, or while reading)."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            error = (PayloadTooLarge(f"the body is over the limit of {self.limit} bytes") if declared.isdigit()
                     else InvalidInputError("Content-Length is not a number"))
            await _error_response(error)(scope, receive, send)
            return
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise PayloadTooLarge(f"the body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def create_app(model: Model, *, name: str | None = None, limits: ServerLimits | None = None) -> Starlette:
    """An ASGI application serving `model` (see the module docs for the endpoints).

    The application owns the model: it starts it when the server starts (if not yet started) and closes
    it when the server stops. `name` is the model id in responses (default: the model's source)."""
    if not isinstance(model, Model):
        raise InvalidInputError(f"a server serves a model loaded in this process, not {type(model).__name__}")
    limits = limits or ServerLimits()
    server = _Server(model, name or _model_name(model), limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await model.start()
        try:
            yield
        finally:
            await model.close()

    async def llada_error(request: Request, exc: Exception) -> Response:
        return _error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": exc.detail, "type": kind, "param": None, "code": None}},
                            status_code=exc.status_code, headers=exc.headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Starlette raises the error again after this response, so the ASGI server logs its traceback.
        return _error_response(exc)

    routes = [
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/images/generations", server.image_generations, methods=["POST"]),
        Route("/v1/images/edits", server.image_edits, methods=["POST"]),
        Route("/v1/sessions", server.create_session, methods=["POST"]),
        Route("/v1/sessions", server.list_sessions, methods=["GET"]),
        Route("/v1/sessions/{session_id}", server.get_session, methods=["GET"]),
        Route("/v1/sessions/{session_id}", server.delete_session, methods=["DELETE"]),
        Route("/v1/sessions/{session_id}/messages", server.session_message, methods=["POST"]),
        Route("/v1/sessions/{session_id}/turns", server.session_turn, methods=["POST"]),
        Route("/v1/sessions/{session_id}/fork", server.fork_session, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
    ]
    handlers = {LLaDAError: llada_error, HTTPException: http_error, Exception: internal_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan,
                     middleware=[Middleware(_BodyLimit, limit=limits.max_body_bytes)])


def _model_name(model: Model) -> str:
    """A local checkpoint's folder name; "tiny" or a Hub id as given."""
    path = Path(model.source)
    return path.name if path.is_dir() else str(model.source)


async def serve(model: Model, *, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
                limits: ServerLimits | None = None, log_level: str = "info") -> None:
    """Start `model` and serve it over HTTP until interrupted (Ctrl-C); the model is closed at the end.

    A checkpoint that fails to load raises here (`ModelLoadError`), before the server binds its port."""
    import uvicorn

    await model.start()
    try:
        config = uvicorn.Config(create_app(model, name=name, limits=limits), host=host, port=port,
                                log_level=log_level, timeout_graceful_shutdown=5)
        await uvicorn.Server(config).serve()
    finally:
        await model.close()
