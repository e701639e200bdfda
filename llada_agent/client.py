"""What the two kinds of remote session share: the session's view of its history, the stream of a turn
running on a server, and the SDK errors of HTTP answers. `llada_agent.remote` (llada-agent servers) and
`llada_agent.stateless` (any OpenAI-compatible server) build on it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from . import errors, prompts
from .errors import InvalidInputError, LLaDAError, ModelClosed
from .hooks import Hooks
from .schemas import ImagePart, Message, Options, Reply, Task, TextPart
from .session import Content, Conversation, TurnStream, _user_parts, _with_decode

# The server's error codes (`llada_agent.server._status`) as the SDK's error kinds.
ERROR_CODES: dict[str, type[LLaDAError]] = {
    "session_not_found": errors.SessionNotFound, "payload_too_large": InvalidInputError,
    "context_length_exceeded": errors.ContextLengthError, "invalid_image": errors.ImageError,
    "invalid_request": InvalidInputError, "server_busy": errors.Busy, "session_busy": errors.Busy,
    "cancelled": errors.Cancelled, "model_unavailable": ModelClosed, "timeout": errors.Timeout,
}
# An `error` event names the exception's class; the SDK's own kinds come back as themselves.
ERROR_NAMES: dict[str, type[LLaDAError]] = {
    name: kind for name, kind in vars(errors).items() if isinstance(kind, type) and issubclass(kind, LLaDAError)
}


class ClientSession(Conversation):
    """A conversation with a model in another process: the history as this client knows it, one turn at a
    time, and the checks every turn passes before anything is sent. Subclasses say how a turn travels
    (`_request`)."""

    def __init__(self, model: Any, *, mode: Task = "chat", system: str | None = None):
        self.model = model
        self.mode: Task = mode
        self._system = prompts.system_prompt(mode) if system is None else system
        self._messages: list[Message] = [Message(role="system", parts=[TextPart(text=self._system)])]
        self._stream: RemoteTurnStream | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, turns={len(self._messages) // 2})"

    @property
    def system(self) -> str:
        return self._system

    @property
    def messages(self) -> list[Message]:
        """Every message so far, the system prompt first (user images as they were sent)."""
        return list(self._messages)

    @property
    def busy(self) -> bool:
        """Whether a turn is running."""
        return self._stream is not None

    def last_image(self) -> ImagePart | None:
        """The most recent image of the conversation."""
        for message in reversed(self._messages):
            if message.images:
                return message.images[-1]
        return None

    async def send(self, content: Content, *, task: Task | None = None, options: Options | None = None,
                   hooks: Hooks | None = None, decode: bool | None = None, timeout: float | None = None) -> Reply:
        """Run one turn on the server and return the reply (see `Session.send`; no hooks)."""
        stream = self.stream(content, task=task, options=options, hooks=hooks, decode=decode, timeout=timeout)
        async with stream as events:
            async for _ in events:
                pass
        assert stream.reply is not None
        return stream.reply

    def stream(self, content: Content, *, task: Task | None = None, options: Options | None = None,
               hooks: Hooks | None = None, decode: bool | None = None, timeout: float | None = None,
               ) -> RemoteTurnStream:
        """Run one turn on the server, yielding its typed events (see `Session.stream`)."""
        task = task or self.mode
        if task not in prompts.MODES:
            raise InvalidInputError(f"task must be one of {', '.join(prompts.MODES)}, got {task!r}")
        if hooks is not None:
            raise InvalidInputError("hooks run beside the model, so a remote session cannot call them; load the "
                                    "checkpoint in this process to use hooks")
        if decode is not None:
            options = _with_decode(task, options, decode)
        parts = _user_parts(content)
        return RemoteTurnStream(self, *self._request(task, parts, options, timeout))

    def _request(self, task: Task, parts: list[Any], options: Options | None, timeout: float | None,
                 ) -> tuple[Message, Callable[[Callable[[Any], None]], Awaitable[Reply]]]:
        """The user's message as the history keeps it, and the turn's HTTP work (see `RemoteTurnStream`)."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Cancel the running turn, if any: it ends with `Cancelled` and the history stays as it was."""
        if self._stream is not None:
            self._stream.cancel()


class RemoteTurnStream(TurnStream):
    """The events of one turn running on a server, as `TurnStream` gives a local turn's. Leaving early (or
    `cancel()`) closes the connection, which stops the turn on the server.

    `work(emit)` does the turn's HTTP work: it emits the typed events as they arrive and returns the reply;
    the history grows by the user's message and the reply only when it does."""

    def __init__(self, session: ClientSession, user: Message,
                 work: Callable[[Callable[[Any], None]], Awaitable[Reply]]):
        super().__init__(session)
        self._user = user
        self._work = work

    def _begin(self) -> None:
        if self._session._stream is not None:
            raise errors.Busy("this session is running a turn; wait for it, cancel it, or fork() the session")
        self._session._stream = self

    async def _turn(self) -> Reply:
        try:
            reply = await self._work(self._put)
        except asyncio.CancelledError:
            # `cancel()` and leaving early cancel the HTTP work: the turn ends as a cancelled local one does.
            raise errors.Cancelled("the turn was cancelled") from None
        except LLaDAError:  # the server's own error, already the SDK's kind (some are ValueErrors too)
            raise
        except (ValueError, KeyError, TypeError) as exc:  # an answer that is not what the protocol says
            raise errors.GenerationFailed(f"the server's answer is malformed: {type(exc).__name__}: {exc}") from exc
        self._session._messages += [self._user, reply.message()]
        return reply

    def _end(self) -> None:
        if self._session._stream is self:
            self._session._stream = None

    def cancel(self) -> None:
        """Stop the turn; iteration then ends with an `error` event and raises `Cancelled`."""
        if self._task is not None and not self._task.done():
            self._task.cancel()


# ---------------------------------------------------------------------------------------------------------
# Helpers


async def sse_payloads(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each Server-Sent Event (comments skipped) until `[DONE]`."""
    async for line in lines:
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return
        yield data


def response_error(status: int, content: bytes) -> LLaDAError:
    """The SDK error an error response stands for (OpenAI-shaped: `{"error": {"message", "code", ...}}`)."""
    try:
        error = json.loads(content)["error"]
        message, code = str(error["message"]), error.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = f"HTTP {status}: {content[:200]!r}", None
    kind = ERROR_CODES.get(code or "")
    if kind is None:
        kind = InvalidInputError if 400 <= status < 500 else errors.GenerationFailed
    return kind(message)


def transport_error(url: str, exc: Exception) -> LLaDAError:
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return errors.Timeout(f"the server at {url} did not answer in time: {exc!r}")
    return ModelClosed(f"lost the server at {url}: {exc!r}")
