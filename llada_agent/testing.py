"""Cheap models for tests and demos: random-weight tiny checkpoints with every component, in seconds.

```python
root = write_tiny_model(tmp_path / "tiny")
async with llada_agent.load(root) as model: ...
```
The outputs of a random model are noise, but exact, deterministic noise: enough to test caching,
sessions, events and grammar handling. For outputs that mean something, load the trained "tiny" model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_tiny_model(root: str | Path, *, seed: int = 0, vision: bool = True, **backbone: Any) -> Path:
    """`root`, now a checkpoint folder in the official layout with random tiny weights: backbone and
    tokenizer, and (with `vision`) the image tokenizer, decoders and VAE. `backbone` goes to
    `runtime.testing.checkpoint.write_tiny_checkpoint` (e.g. `config_overrides=`)."""
    from runtime.testing.checkpoint import TINY_IMAGE_CODES, write_tiny_checkpoint

    root = Path(root)
    write_tiny_checkpoint(root, seed=seed, **backbone)
    if vision:
        from runtime.testing.vision import write_tiny_vision_checkpoint

        write_tiny_vision_checkpoint(root, seed=seed, num_codes=TINY_IMAGE_CODES)
    return root


class _ScriptedHandle:
    """A finished text request whose ids were written by a test, not the model (see `scripted_text`)."""

    def __init__(self, request: Any, written: list[int], eos_id: int):
        from runtime.generate import GenerationResult, GenerationStats

        stops = request.options.stop_ids
        stops = stops if stops is not None else frozenset({eos_id})
        cut = next((i for i, t in enumerate(written) if t in stops), None)
        limit = request.options.max_new_tokens
        self.rest: list[int] = []
        if cut is not None and cut < limit:
            ids, reason, stop_id = written[:cut], "stop", written[cut]
            self.rest = written[cut:]
        else:
            ids, reason, stop_id = written[:limit], "length", None
        self.request = request
        self._result = GenerationResult(ids, reason, stop_id, GenerationStats(prompt_tokens=len(request.prompt)))
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self) -> Any:
        return self.events()

    async def events(self) -> Any:
        from runtime.generate import BlockDone

        if self._result.ids:
            yield BlockDone(tuple(self._result.ids))

    async def result(self) -> Any:
        return self._result


class ScriptedText:
    """A model's engine whose text requests return scripted ids (image requests and vision work run for
    real): drives sessions through exactly the outputs a test wants, well-formed or not.

    Each script entry is what the model "writes": ids, usually ending with a stop id (end-of-text, or a
    picture's header `<|image|> h w <boi>` for a thinking or story phase). A request held to a few ids (a
    header's grid sizes, `only_ids`) takes them from what the previous entry wrote past its stop, as the
    sampler would keep only those; when that holds too few, the model writes them for real. `requests`
    records the text requests the script answered, `header_requests` those held to grid sizes."""

    def __init__(self, engine: Any, outputs: list[list[int]], eos_id: int):
        self._engine = engine
        self._outputs = list(outputs)
        self._eos = eos_id
        self._rest: list[int] = []  # what the last entry wrote from its stop id on
        self.requests: list[Any] = []
        self.header_requests: list[Any] = []

    def submit(self, request: Any, *, timeout: float | None = None) -> Any:
        from runtime.engine import TextRequest

        if not isinstance(request, TextRequest):
            return self._engine.submit(request, timeout=timeout)
        only, limit = request.options.only_ids, request.options.max_new_tokens
        if only is not None:
            self.header_requests.append(request)
            kept = [t for t in self._rest if t in only][:limit]
            self._rest = []
            if len(kept) < limit:
                return self._engine.submit(request, timeout=timeout)
            return _ScriptedHandle(request, kept, self._eos)
        if not self._outputs:
            raise AssertionError("the script has no output left for this text request")
        self.requests.append(request)
        handle = _ScriptedHandle(request, self._outputs.pop(0), self._eos)
        self._rest = handle.rest
        return handle

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@contextmanager
def scripted_text(model: Any, outputs: list[list[int]]) -> Iterator[ScriptedText]:
    """Within the block, `model`'s text requests return `outputs` in order (see `ScriptedText`)."""
    real = model._engine
    scripted = ScriptedText(real, outputs, model.codec.special.eos)
    model._engine = scripted
    try:
        yield scripted
    finally:
        model._engine = real


@contextmanager
def serving(app: Any, ready: str = "/health") -> Iterator[str]:
    """`app` (e.g. `llada_agent.server.create_app(model)`) served on a free loopback port in a thread for the
    block; yields its URL once `ready` answers 200. Needs the `server` extra and httpx."""
    import asyncio
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 120  # a model server starts its model before it answers
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}{ready}", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
