"""`Session`: a conversation whose history is kept as the exact token ids the model read and wrote.

Generated ids are never re-tokenised: each turn's prompt extends the previous turn's ids exactly, so the
engine's prefix cache serves every completed block of the history and only the last partial block and
the new blocks are computed. The structured messages are kept beside the ids; saving writes both, and
loading checks that they agree (and that the ids obey the grammar) before anything is trusted.

A turn changes the history only when it completes: a failed or cancelled turn leaves the session as it
was. One turn runs at a time per session; `fork()` a session to run branches of it concurrently (forks
share the cached prefix).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from typing_extensions import Self

from runtime import errors as rt_errors

from . import prompts
from .errors import Busy, ImageError, InvalidInputError, LLaDAError, SessionFileError
from .hooks import Hooks
from .schemas import (
    EditOptions,
    ErrorEvent,
    ImageOptions,
    ImagePart,
    Message,
    Options,
    Reply,
    SessionRecord,
    StoryOptions,
    Task,
    TextOptions,
    TextPart,
    ThinkingPart,
    ThinkOptions,
    TurnRecord,
)
from .spans import assistant_parts_match
from .turns import TurnRunner

if TYPE_CHECKING:
    from .model import Model

Content = Any  # str | Part | image source | a sequence of them


@dataclass(frozen=True)
class _Turn:
    message: Message
    ids: tuple[int, ...]


class Conversation:
    """The turns every conversation offers on top of `send`: `Session` here, `RemoteSession` over HTTP."""

    async def send(self, content: Content, *, task: Task | None = None, options: Options | None = None,
                   hooks: Hooks | None = None, decode: bool | None = None, timeout: float | None = None) -> Reply:
        raise NotImplementedError

    async def ask(self, question: str, image: Any = None, *, options: TextOptions | None = None,
                  timeout: float | None = None) -> Reply:
        """A text answer to `question`, about `image` (one source or a list) when given."""
        return await self.send([*_as_list(image), question], task="chat", options=options, timeout=timeout)

    async def draw(self, prompt: str, *, size: int | tuple[int, int] | None = None,
                   grid: tuple[int, int] | None = None, thinking: bool = False,
                   options: ImageOptions | ThinkOptions | None = None, hooks: Hooks | None = None,
                   decode: bool | None = None, timeout: float | None = None) -> Reply:
        """A picture of `prompt`. `size` (width, height) in pixels (an int: square) or `grid` (h, w) in
        codes; with `thinking` the model first writes a plan and chooses the grid itself (`hooks` see it)."""
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if thinking:
            think = options if isinstance(options, ThinkOptions) else ThinkOptions(image=options or ImageOptions())
            if size is not None or grid is not None:
                think = _revalidate(think, image=_revalidate(think.image, size=size, grid=grid))
            return await self.send(prompt, task="think", options=think, hooks=hooks, decode=decode,
                                   timeout=timeout)
        if isinstance(options, ThinkOptions):
            raise InvalidInputError("ThinkOptions are for draw(..., thinking=True); pass ImageOptions")
        image = options or ImageOptions()
        if size is not None or grid is not None:
            image = _revalidate(image, size=size, grid=grid)
        return await self.send(prompt, task="draw", options=image, decode=decode, timeout=timeout)

    async def edit(self, instruction: str, image: Any = None, *, options: EditOptions | None = None,
                   decode: bool | None = None, timeout: float | None = None) -> Reply:
        """The image edited by `instruction`. `image`: a source, a list of reference images, or None for
        the session's last image. The result has the first source's grid unless `options.grid` says."""
        return await self.send([*_as_list(image), instruction], task="edit", options=options, decode=decode,
                               timeout=timeout)

    async def story(self, prompt: str, *, max_frames: int | None = None, options: StoryOptions | None = None,
                    decode: bool | None = None, timeout: float | None = None) -> Reply:
        """Text with pictures: the model writes and draws in turn, up to `max_frames` pictures."""
        story = options or StoryOptions()
        if max_frames is not None:
            story = _revalidate(story, max_frames=max_frames)
        return await self.send(prompt, task="story", options=story, decode=decode, timeout=timeout)


class Session(Conversation):
    """A conversation with one model: send turns, stream their events, fork, save and load."""

    def __init__(self, model: Model, *, mode: Task = "chat", system: str | None = None,
                 _turns: Sequence[_Turn] | None = None):
        if mode not in prompts.MODES:
            raise InvalidInputError(f"mode must be one of {', '.join(prompts.MODES)}, got {mode!r}")
        self.model = model
        self.mode: Task = mode
        if _turns is None:
            system = prompts.system_prompt(mode) if system is None else system
            if not isinstance(system, str):
                raise InvalidInputError(f"system must be a str, got {type(system).__name__}")
            ids = list(model.chat.system_open) + model.codec.encode_text(system)
            _turns = [_Turn(Message(role="system", parts=[TextPart(text=system)]), tuple(ids))]
        self._turns: list[_Turn] = list(_turns)
        self._ids: list[int] = [t for turn in self._turns for t in turn.ids]
        self._runner: TurnRunner | None = None

    def __repr__(self) -> str:
        return f"Session(mode={self.mode!r}, turns={len(self._turns) - 1}, tokens={len(self._ids)})"

    # ----- views

    @property
    def system(self) -> str:
        return self._turns[0].message.parts[0].text

    @property
    def messages(self) -> list[Message]:
        """Every message so far, the system prompt first."""
        return [turn.message for turn in self._turns]

    @property
    def ids(self) -> list[int]:
        """The whole conversation as token ids (what the next turn's prompt starts with)."""
        return list(self._ids)

    @property
    def turns(self) -> list[TurnRecord]:
        """Every message with the exact ids it occupies."""
        return [TurnRecord(message=turn.message, ids=list(turn.ids)) for turn in self._turns]

    @property
    def busy(self) -> bool:
        """Whether a turn is running."""
        return self._runner is not None

    def last_image(self) -> ImagePart | None:
        """The most recent image of the conversation (the default source of `edit`)."""
        for turn in reversed(self._turns):
            images = turn.message.images
            if images:
                return images[-1]
        return None

    # ----- turns

    async def send(self, content: Content, *, task: Task | None = None, options: Options | None = None,
                   hooks: Hooks | None = None, decode: bool | None = None, timeout: float | None = None) -> Reply:
        """Run one turn and return the reply. `task` defaults to the session's mode; `options` must suit it
        (TextOptions, ImageOptions, ThinkOptions, EditOptions, StoryOptions); `decode` overrides whether
        pictures are decoded; `timeout` (seconds) bounds each engine request."""
        runner = self._runner_for(content, task, options, hooks, decode, timeout, emit=None)
        self._begin(runner)
        try:
            return await runner.run()
        finally:
            self._end(runner)

    def stream(self, content: Content, *, task: Task | None = None, options: Options | None = None,
               hooks: Hooks | None = None, decode: bool | None = None, timeout: float | None = None) -> TurnStream:
        """Run one turn, yielding its events as they happen (the last one is `turn_done` with the reply).

        Use `async with session.stream(...) as events: async for event in events: ...` so that leaving
        early cancels the turn. A failed turn yields an `error` event, then raises."""
        stream = TurnStream(self)
        stream._runner = self._runner_for(content, task, options, hooks, decode, timeout, emit=stream._put)
        return stream

    def cancel(self) -> None:
        """Cancel the running turn, if any: it ends with `Cancelled` and the history stays as it was."""
        if self._runner is not None:
            self._runner.cancel()

    def _runner_for(self, content: Content, task: Task | None, options: Options | None, hooks: Hooks | None,
                    decode: bool | None, timeout: float | None, emit: Any) -> TurnRunner:
        task = task or self.mode
        if task not in prompts.MODES:
            raise InvalidInputError(f"task must be one of {', '.join(prompts.MODES)}, got {task!r}")
        if hooks is not None and not isinstance(hooks, Hooks):
            raise InvalidInputError(f"hooks must be a Hooks, got {type(hooks).__name__}")
        if decode is not None:
            options = _with_decode(task, options, decode)
        return TurnRunner(self, task, _user_parts(content), options, hooks, emit, timeout)

    def _begin(self, runner: TurnRunner) -> None:
        if self._runner is not None:
            raise Busy("this session is running a turn; wait for it, cancel it, or fork() the session")
        self.model.engine  # noqa: B018 (a closed model fails here, before any work)
        self._runner = runner

    def _end(self, runner: TurnRunner) -> None:
        if self._runner is runner:
            self._runner = None

    # ----- ids of new turns (used by the turn runner)

    def _ids_list(self) -> list[int]:
        return list(self._ids)

    def _user_open(self) -> list[int]:
        chat = self.model.chat
        return list(chat.user_after_system if self._turns[-1].message.role == "system" else chat.user_after_assistant)

    def _user_turn_ids(self, parts: Sequence[Any]) -> list[int]:
        ids = self._user_open()
        for part in parts:
            ids += self._part_ids(part)
        return ids

    def _part_ids(self, part: Any) -> list[int]:
        codec = self.model.codec
        if isinstance(part, (TextPart, ThinkingPart)):
            return codec.encode_text(part.text)
        if part.codes is None:
            raise InvalidInputError("an image part reached the prompt without codes")
        try:
            return codec.image_span(part.grid[0], part.grid[1], part.codes)
        except rt_errors.TokenizationError as exc:  # codes given with a part, not read by this model
            raise ImageError(f"the image's codes do not fit this model's vocabulary: {exc}") from exc

    def _commit(self, user: Message, user_ids: list[int], reply: Reply) -> None:
        chat = self.model.chat
        assistant_ids = list(chat.assistant_open) + reply.ids + list(chat.assistant_close)
        for turn in (_Turn(user, tuple(user_ids)), _Turn(reply.message(), tuple(assistant_ids))):
            self._turns.append(turn)
            self._ids += turn.ids

    # ----- branching, saving, loading

    @classmethod
    async def from_messages(cls, model: Model, messages: Sequence[Message], *, mode: Task = "chat") -> Session:
        """A session continuing a conversation given as messages (e.g. an OpenAI-style request's history).

        An optional system message comes first, then user/assistant pairs. Text, assistant text included,
        is tokenised as text (it did not come from this session, so there are no generated ids to keep);
        images without codes are read by the image tokenizer. Send the next user message with `send()`."""
        messages = list(messages)
        system = None
        if messages and messages[0].role == "system":
            system = messages.pop(0).text
        roles = [m.role for m in messages]
        if roles != ["user", "assistant"] * (len(messages) // 2):
            raise InvalidInputError(f"after the system message, messages must be user/assistant pairs; got {roles}")
        session = cls(model, mode=mode, system=system)
        for user, assistant in zip(messages[::2], messages[1::2]):
            user_parts = await _read_images(model, user.parts)
            assistant_parts = await _read_images(model, assistant.parts)
            user_ids = session._user_turn_ids(user_parts)
            content = [t for part in assistant_parts for t in session._part_ids(part)]
            chat = model.chat
            assistant_ids = list(chat.assistant_open) + content + list(chat.assistant_close)
            for message, ids in ((Message(role="user", parts=user_parts), user_ids),
                                 (Message(role="assistant", parts=assistant_parts), assistant_ids)):
                session._turns.append(_Turn(message, tuple(ids)))
                session._ids += ids
        return session

    def fork(self, turns: int | None = None) -> Session:
        """A new session with this one's history (completed turns; with `turns`, only the first that many
        user/assistant pairs); both share the cached prefix."""
        completed = (len(self._turns) - 1) // 2
        if turns is None:
            turns = completed
        if isinstance(turns, bool) or not isinstance(turns, int) or not 0 <= turns <= completed:
            raise InvalidInputError(f"turns must be an int from 0 to {completed}, got {turns!r}")
        return Session(self.model, mode=self.mode, _turns=self._turns[:1 + 2 * turns])

    def to_record(self) -> SessionRecord:
        """The session as plain data (what `save` writes)."""
        return SessionRecord(checkpoint=self.model.fingerprint, mode=self.mode, turns=self.turns)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the session to `path` as JSON (atomically: a crash leaves the old file); returns the path."""
        path = Path(path)
        data = self.to_record().model_dump_json()
        temporary = path.with_name(path.name + ".tmp")
        try:
            temporary.write_text(data, encoding="utf-8")
            os.replace(temporary, path)
        except OSError as exc:
            raise SessionFileError(f"cannot write the session to {path}: {exc}") from exc
        return path

    @classmethod
    def load(cls, model: Model, path: str | os.PathLike) -> Session:
        """The session saved at `path`, checked against `model` (same checkpoint, ids that match the
        messages and obey the grammar). Raises `SessionFileError` saying what is wrong."""
        path = Path(path)
        try:
            data = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SessionFileError(f"cannot read a session from {path}: {exc}") from exc
        try:
            record = SessionRecord.model_validate_json(data)
        except ValidationError as exc:
            raise SessionFileError(f"{path} is not a valid session file: {_first_errors(exc)}") from exc
        try:
            return cls.from_record(model, record)
        except SessionFileError as exc:
            raise SessionFileError(f"{path}: {exc}") from exc

    @classmethod
    def from_record(cls, model: Model, record: SessionRecord) -> Session:
        """The session of a record, after checking it against `model` (see `load`)."""
        if record.checkpoint != model.fingerprint:
            raise SessionFileError(f"the session was saved with another checkpoint ({record.checkpoint}, this "
                                   f"model is {model.fingerprint})")
        turns = [_Turn(t.message, tuple(t.ids)) for t in record.turns]
        _check_turns(model, turns)
        return cls(model, mode=record.mode, _turns=turns)


class TurnStream:
    """The events of one running turn: an async iterator and an async context manager.

    Leaving the `async with` block (or `aclose()`) before the end cancels the turn; `cancel()` asks it to
    stop (it then ends with an `error` event and `Cancelled`). `reply` is set once the turn is done."""

    _END = object()

    def __init__(self, session: Session):
        self._session = session
        self._runner: TurnRunner | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[Reply] | None = None
        self._error: BaseException | None = None
        self._finished = False
        self.reply: Reply | None = None

    def _put(self, event: Any) -> None:
        self._queue.put_nowait(event)

    def __aiter__(self) -> TurnStream:
        return self

    async def __anext__(self) -> Any:
        if self._finished:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            raise StopAsyncIteration
        if self._task is None:
            self._begin()
            self._task = asyncio.ensure_future(self._run())
        item = await self._queue.get()
        if item is not self._END:
            return item
        self._finished = True
        if self._error is not None:
            return ErrorEvent(error=type(self._error).__name__, message=str(self._error))
        raise StopAsyncIteration

    async def _run(self) -> Reply:
        try:
            self.reply = await self._turn()
            return self.reply
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._end()
            self._queue.put_nowait(self._END)

    # What a turn is, for the stream (a remote turn is another: `llada_agent.client.RemoteTurnStream`).

    def _begin(self) -> None:
        self._session._begin(self._runner)

    async def _turn(self) -> Reply:
        return await self._runner.run()

    def _end(self) -> None:
        self._session._end(self._runner)

    def cancel(self) -> None:
        """Ask the turn to stop; iteration then ends with an `error` event and raises `Cancelled`."""
        if self._runner is not None:
            self._runner.cancel()

    async def aclose(self) -> None:
        """Stop the turn if it still runs (the history stays as it was) and wait until it has stopped."""
        self._finished = True
        self._error = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._task is not None:
            # The turn's outcome was already reported (or is moot once the caller leaves).
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _user_parts(content: Content) -> list[Any]:
    """The parts of a user turn from text, parts, image sources, or a list of them."""
    items = list(content) if isinstance(content, (list, tuple)) else [content]
    if not items:
        raise InvalidInputError("a user turn needs some content")
    parts: list[Any] = []
    for item in items:
        if isinstance(item, str):
            parts.append(TextPart(text=item))
        elif isinstance(item, (TextPart, ImagePart)):
            parts.append(item)
        elif isinstance(item, ThinkingPart):
            raise InvalidInputError("a user turn cannot hold thinking parts")
        elif isinstance(item, Message):
            raise InvalidInputError("send the parts of a message, not the message")
        else:
            parts.append(ImagePart.open(item))
    return parts


async def _read_images(model: Model, parts: Sequence[Any]) -> list[Any]:
    images = [p for p in parts if isinstance(p, ImagePart)]
    if not images:
        return list(parts)
    encoded = iter(await model.encode_images(images))
    return [next(encoded) if isinstance(p, ImagePart) else p for p in parts]


def _revalidate(options: Any, **changes: Any) -> Any:
    """A copy of options with `changes`, validated (copies made with model_copy are not). Fields the caller
    left unset stay unset, so a checkpoint's recommended settings still fill them."""
    try:
        return type(options).model_validate({**{k: getattr(options, k) for k in options.model_fields_set}, **changes})
    except ValidationError as exc:
        raise InvalidInputError(f"invalid {type(options).__name__}: {_first_errors(exc)}") from exc


def _with_decode(task: Task, options: Options | None, decode: bool) -> Options:
    if task == "chat":
        raise InvalidInputError("decode= is for turns that draw (draw, think, edit, story)")
    if task == "think":
        think = options if isinstance(options, ThinkOptions) else ThinkOptions()
        return _revalidate(think, image=_revalidate(think.image, decode=decode))
    if task == "story":
        story = options if isinstance(options, StoryOptions) else StoryOptions()
        return _revalidate(story, image=_revalidate(story.image, decode=decode))
    default = ImageOptions() if task == "draw" else EditOptions()
    return _revalidate(options if options is not None else default, decode=decode)


def _first_errors(exc: ValidationError, limit: int = 3) -> str:
    errors = exc.errors()
    shown = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'value'}: {e['msg']}" for e in errors[:limit])
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return shown + more


def _check_turns(model: Model, turns: list[_Turn]) -> None:
    """Raise SessionFileError unless the turns are a conversation `model` could have had, ids and all."""
    codec, chat = model.codec, model.chat
    roles = [turn.message.role for turn in turns]
    expected = ["system"] + ["user", "assistant"] * ((len(turns) - 1) // 2)
    if roles != expected or len(turns) % 2 == 0:
        raise SessionFileError(f"the roles must be system, then user/assistant pairs; got {roles}")
    for index, turn in enumerate(turns):
        where = f"turn {index} ({turn.message.role})"
        bad = [t for t in turn.ids if not 0 <= t < codec.vocab_size]
        if bad:
            raise SessionFileError(f"{where}: ids outside the vocabulary of {codec.vocab_size}: {bad[:5]}")
        ids = list(turn.ids)
        role = turn.message.role
        try:
            if role == "system":
                want = list(chat.system_open) + codec.encode_text(turn.message.parts[0].text)
            elif role == "user":
                opening = chat.user_after_system if index == 1 else chat.user_after_assistant
                want = list(opening)
                for part in turn.message.parts:
                    if isinstance(part, ImagePart) and part.codes is None:
                        raise SessionFileError(f"{where}: an image without codes")
                    want += (codec.encode_text(part.text) if isinstance(part, TextPart)
                             else codec.image_span(part.grid[0], part.grid[1], part.codes))
            else:
                want = ids
                head, tail = list(chat.assistant_open), list(chat.assistant_close)
                if ids[: len(head)] != head or len(ids) < len(head) + len(tail) or ids[len(ids) - len(tail):] != tail:
                    raise SessionFileError(f"{where}: the ids do not open and close an assistant turn")
                reason = assistant_parts_match(codec, ids[len(head): len(ids) - len(tail)], turn.message.parts)
                if reason:
                    raise SessionFileError(f"{where}: {reason}")
        except SessionFileError:
            raise
        except LLaDAError as exc:
            raise SessionFileError(f"{where}: {exc}") from exc
        except Exception as exc:  # the codec refusing a value (bad code, bad grid) is a bad file too
            raise SessionFileError(f"{where}: {type(exc).__name__}: {exc}") from exc
        if ids != want:
            raise SessionFileError(f"{where}: the ids do not match the message")
