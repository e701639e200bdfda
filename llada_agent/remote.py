"""A model served over HTTP: `llada_agent.load("http://host:8000")` talks to `llada-agent serve` instead of
loading weights.

```python
async with llada_agent.load("http://127.0.0.1:8000") as model:
    chat = model.session(mode="chat")
    reply = await chat.ask("What is in this picture?", image="photo.png")
```

A llada-agent server keeps each session's history as the exact token ids the model read and wrote, so a
remote session's later turns are served from the server's prefix cache as a local session's are. Turns
travel in the SDK's own terms (`POST /v1/sessions/{id}/turns`: parts, task and options as JSON, answered by
typed events), so `send`, `stream`, `ask`, `draw`, `edit`, `story`, `fork` and `cancel` behave as on a local
`Session`, errors included: the server's error comes back as the same `LLaDAError` kind. What needs the
model in this process stays local-only: hooks (they run beside the model), `save`/`load` (the history
lives on the server), and `encode_images`/`decode_image`. Any other server of SGLang-Omni's
OpenAI-compatible API gets `StatelessSession`s instead (`llada_agent.stateless`), which keep the history
here and re-send it each turn.

Needs httpx (`pip install 'llada-agent[remote]'`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, Literal

from typing_extensions import Self

from . import errors, prompts
from .client import ERROR_NAMES, ClientSession, response_error, sse_payloads, transport_error
from .errors import InvalidInputError, ModelClosed, ModelLoadError
from .schemas import EVENT_ADAPTER, ErrorEvent, Message, Options, Reply, Task, TurnDone
from .stateless import StatelessSession

Protocol = Literal["auto", "sessions", "openai"]


def is_server_url(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


class RemoteModel:
    """A model behind a server: makes sessions whose history and cache live on a llada-agent server, or
    stateless ones for any other server of the OpenAI-compatible API."""

    def __init__(self, url: str, *, protocol: Protocol = "auto", timeout: float | None = None,
                 headers: dict[str, str] | None = None):
        """`protocol`: "sessions" (a llada-agent server: history and cache kept there), "openai" (any server of
        SGLang-Omni's OpenAI-compatible API: `StatelessSession`s re-send the history), or "auto" (sessions
        when the server has them); `timeout`: seconds to wait for the server between two events of a turn
        (None: as long as the turn runs; a turn's own deadline is `send(..., timeout=)`); `headers` go with
        every request (e.g. an Authorization header for a proxy in front of the server)."""
        if not is_server_url(url):
            raise InvalidInputError(f"a server URL starts with http:// or https://, got {url!r}")
        if protocol not in ("auto", "sessions", "openai"):
            raise InvalidInputError(f"protocol must be 'auto', 'sessions' or 'openai', got {protocol!r}")
        self.protocol = protocol
        self.source = url
        self.url = url.rstrip("/")
        self.name: str | None = None
        self._timeout = timeout
        self._headers = dict(headers or {})
        self._client: Any = None
        self._sessions: set[str] = set()

    # ----- lifecycle

    async def start(self) -> Self:
        """Connect and find out what the server speaks (see `protocol`); returns self. Raises
        `ModelLoadError` when nothing usable answers."""
        if self._client is not None:
            return self
        try:
            import httpx
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ModelLoadError("connecting to a server needs httpx: pip install 'llada-agent[remote]'") from exc
        client = httpx.AsyncClient(base_url=self.url, headers=self._headers,
                                   timeout=httpx.Timeout(self._timeout, connect=30.0))
        try:
            protocol, self.name = await self._handshake(client)
        except BaseException:
            await client.aclose()
            raise
        if self.protocol == "sessions" and protocol != "sessions":
            await client.aclose()
            raise ModelLoadError(f"the server at {self.url} keeps no llada-agent sessions; use protocol='openai'")
        self.protocol = protocol if self.protocol == "auto" else self.protocol
        self._client = client
        return self

    async def _handshake(self, client: Any) -> tuple[Protocol, str | None]:
        """What the server speaks and its model's name: a llada-agent server says both on `/health`; another
        OpenAI-compatible server must answer `/v1/models`."""
        import httpx

        try:
            health = await client.get("/health")
            body = health.json() if health.headers.get("content-type", "").startswith("application/json") else {}
            if health.status_code == 200 and body.get("status") == "ok" and "sessions" in body:
                return "sessions", body.get("model")
            if health.status_code == 503:
                raise ModelLoadError(f"the server at {self.url} is not ready: {health.text[:200]!r}")
            models = await client.get("/v1/models")
        except (httpx.HTTPError, ValueError) as exc:
            raise ModelLoadError(f"no llada-agent server answers at {self.url}: {exc}") from exc
        if models.status_code != 200:
            raise ModelLoadError(f"the server at {self.url} is neither a llada-agent server nor OpenAI-compatible "
                                 f"(GET /v1/models: HTTP {models.status_code})")
        try:
            names = [entry["id"] for entry in models.json()["data"]]
        except (ValueError, KeyError, TypeError):
            names = []
        return "openai", names[0] if names else None

    async def close(self) -> None:
        """Delete the sessions this model opened on the server (best effort) and disconnect."""
        client, self._client = self._client, None
        if client is None:
            return
        for session_id in list(self._sessions):
            with contextlib.suppress(Exception):
                await client.delete(f"/v1/sessions/{session_id}")
        self._sessions.clear()
        await client.aclose()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def started(self) -> bool:
        return self._client is not None

    def __repr__(self) -> str:
        return f"RemoteModel({self.url!r}, model={self.name!r})"

    def session(self, mode: Task = "chat", *, system: str | None = None) -> RemoteSession | StatelessSession:
        """A new conversation: on the server (opened there with its first turn), or kept here for a server
        without sessions (`StatelessSession`); see `Model.session`."""
        self._http()  # fail early when not connected
        if mode not in prompts.MODES:
            raise InvalidInputError(f"mode must be one of {', '.join(prompts.MODES)}, got {mode!r}")
        if system is not None and not isinstance(system, str):
            raise InvalidInputError(f"system must be a str, got {type(system).__name__}")
        if self.protocol == "openai":
            return StatelessSession(self, mode=mode, system=system)
        return RemoteSession(self, mode=mode, system=system)

    # ----- HTTP

    def _http(self) -> Any:
        if self._client is None:
            raise ModelClosed("the remote model is not connected; use `async with llada_agent.load(url) as model`")
        return self._client

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON request; an error response raises the SDK error it stands for."""
        import httpx

        try:
            response = await self._http().request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise transport_error(self.url, exc) from exc
        if response.status_code >= 400:
            raise response_error(response.status_code, response.content)
        return response.json()

    @contextlib.asynccontextmanager
    async def _event_lines(self, path: str, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[str]]:
        """A streamed request's Server-Sent Event payloads, as they arrive."""
        import httpx

        try:
            async with self._http().stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    raise response_error(response.status_code, await response.aread())
                yield sse_payloads(response.aiter_lines())
        except httpx.HTTPError as exc:
            raise transport_error(self.url, exc) from exc


class RemoteSession(ClientSession):
    """A conversation kept on a llada-agent server; the same turns as a local `Session` (see the module docs)."""

    def __init__(self, model: RemoteModel, *, mode: Task = "chat", system: str | None = None,
                 _origin: tuple[RemoteSession, int] | None = None):
        super().__init__(model, mode=mode, system=system)
        self.id: str | None = None  # the server's id, once the first turn opened the session there
        # A fork is opened on the server, at its first turn, from (its parent, how many turns of it).
        self._origin = _origin

    def __repr__(self) -> str:
        return f"RemoteSession(mode={self.mode!r}, turns={len(self._messages) // 2}, id={self.id!r})"

    def _request(self, task: Task, parts: list[Any], options: Options | None, timeout: float | None,
                 ) -> tuple[Message, Callable[[Callable[[Any], None]], Awaitable[Reply]]]:
        body: dict[str, Any] = {"content": [part.model_dump(mode="json") for part in parts], "task": task,
                                "stream": True}
        if options is not None:
            # Only what the caller set: the server's defaults (and its checkpoint's recommendations) fill the rest.
            body["options"] = options.model_dump(mode="json", exclude_unset=True)
        if timeout is not None:
            body["timeout"] = timeout
        return Message(role="user", parts=parts), partial(self._turn, body)

    def fork(self) -> RemoteSession:
        """A new session with this one's completed turns (on the server, sharing their cached prefix)."""
        turns = (len(self._messages) - 1) // 2
        fork = RemoteSession(self.model, mode=self.mode, system=self._system,
                             _origin=(self, turns) if turns else None)
        fork._messages = list(self._messages)
        return fork

    async def delete(self) -> None:
        """Delete the session on the server (its history is gone; a later turn starts a new one)."""
        if self.id is not None:
            session_id, self.id = self.id, None
            self.model._sessions.discard(session_id)
            await self.model._call("DELETE", f"/v1/sessions/{session_id}")
        self._messages = self._messages[:1]
        self._origin = None

    async def _turn(self, body: dict[str, Any], emit: Callable[[Any], None]) -> Reply:
        """One turn over `POST /v1/sessions/{id}/turns`: the server's typed events, passed on as they come."""
        session_id = await self._open()
        async with self.model._event_lines(f"/v1/sessions/{session_id}/turns", body) as lines:
            async for payload in lines:
                event = EVENT_ADAPTER.validate_json(payload)
                if isinstance(event, ErrorEvent):
                    raise ERROR_NAMES.get(event.error, errors.GenerationFailed)(event.message)
                emit(event)
                if isinstance(event, TurnDone):
                    return event.reply
        raise errors.GenerationFailed("the server ended the turn without its reply")

    async def _open(self) -> str:
        """The session's id on the server, opening it there first if needed."""
        if self.id is None:
            if self._origin is not None:
                parent, turns = self._origin
                created = await self.model._call("POST", f"/v1/sessions/{await parent._open()}/fork",
                                                 {"turns": turns})
            else:
                created = await self.model._call("POST", "/v1/sessions", {"mode": self.mode, "system": self._system})
            self.id = created["id"]
            self.model._sessions.add(self.id)
            self._origin = None
        return self.id


