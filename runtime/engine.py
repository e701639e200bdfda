"""The engine: one model, one prefix cache, a worker thread that batches every running request.

`Engine.submit` takes a text or image request (explicit ids, see `runtime.generate`) and returns a
`RequestHandle`: an async iterator of raw events (`BlockDone`, `StepDone`) that ends with the
`GenerationResult`, cancellable at any time. The worker thread admits queued requests, asks every running
task for the rows of its next step, runs the small rows of all tasks as one batched forward (long prefills
go alone so they do not pad everyone), and hands each task its outputs. A second thread runs vision work
(encoding pictures, decoding codes) so text keeps flowing while an image decodes.

Bounded: at most `max_active` tasks step together and `max_queue` wait; a full queue is an
`EngineBusyError` at once, not an unbounded wait.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from runtime.errors import (
    EngineBusyError,
    EngineClosedError,
    GenerationError,
    RequestCancelled,
    RequestTimeout,
)
from runtime.generate import (
    Event,
    GenerationResult,
    GenerationTask,
    ImageOptions,
    TextOptions,
    VocabLayout,
)
from runtime.kvcache import PrefixCache
from runtime.rows import RowInput, forward_rows

T = TypeVar("T")


@dataclass(frozen=True)
class TextRequest:
    """Generate text after `prompt`."""

    prompt: list[int]
    options: TextOptions = field(default_factory=TextOptions)


@dataclass(frozen=True)
class ImageRequest:
    """Generate h*w image codes after each branch (conditional first; see `generate_image`)."""

    branches: list[list[int]]
    grid: tuple[int, int]
    options: ImageOptions = field(default_factory=ImageOptions)


Request = TextRequest | ImageRequest


@dataclass
class EngineStats:
    """Counters of the worker: forwards run, rows they carried, requests by outcome."""

    forwards: int = 0
    rows: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0


class RequestHandle:
    """A submitted request: iterate it for raw events; `await result()` for the outcome; `cancel()` it."""

    _ids = itertools.count(1)

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, deadline: float | None):
        self.id = next(self._ids)
        self.request = request
        self.deadline = deadline
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._outcome: GenerationResult | BaseException | None = None

    # ----- consumer side (event loop)

    def cancel(self) -> None:
        """Ask the worker to stop this request; its cache pins are released and the handle ends with
        `RequestCancelled`."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def events(self) -> AsyncIterator[Event]:
        """Raw events in order; raises the request's error (or `RequestCancelled`) if it did not finish."""
        while True:
            if self._outcome is not None and self._queue.empty():
                break
            item = await self._queue.get()
            if isinstance(item, _End):
                self._outcome = item.outcome
                break
            yield item
        if isinstance(self._outcome, BaseException):
            raise self._outcome

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    async def result(self) -> GenerationResult:
        """Wait for the end (dropping unread events) and return the result, or raise its error."""
        async for _ in self.events():
            pass
        assert isinstance(self._outcome, GenerationResult)
        return self._outcome

    # ----- producer side (worker thread)

    def _post(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is gone: nobody is listening
            pass


@dataclass(frozen=True)
class _End:
    outcome: GenerationResult | BaseException


@dataclass
class _Running:
    handle: RequestHandle
    task: GenerationTask
    inputs: list[RowInput] = field(default_factory=list)


class Engine:
    """Owns the model and the prefix cache; runs requests on a worker thread, batched step by step."""

    def __init__(
        self,
        model: torch.nn.Module,
        vocab: VocabLayout,
        *,
        cache_bytes: int | None = 1 << 30,
        cache_enabled: bool = True,
        max_active: int = 16,
        max_queue: int = 256,
        block_length: int = 32,
        prefill_chunk: int = 2048,
    ):
        if max_active < 1 or max_queue < 1:
            raise GenerationError("max_active and max_queue must be >= 1")
        self.model = model
        self.vocab = vocab
        self.block_length = block_length
        self.prefill_chunk = prefill_chunk
        self.cache = PrefixCache(block_size=block_length, max_bytes=cache_bytes) if cache_enabled else None
        self.max_active = max_active
        self.max_queue = max_queue
        self.stats = EngineStats()
        self._queue: deque[RequestHandle] = deque()
        self._running: list[_Running] = []
        self._wake = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="llada-engine", daemon=True)
        self._vision = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llada-vision")
        self._worker.start()

    # ----- public API

    def submit(self, request: Request, *, timeout: float | None = None) -> RequestHandle:
        """Queue a request; must be called from a running event loop (the handle reports there)."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout if timeout is not None else None
        handle = RequestHandle(request, loop, deadline)
        with self._wake:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if len(self._queue) >= self.max_queue:
                raise EngineBusyError(f"{len(self._queue)} requests already wait (max_queue={self.max_queue})")
            self._queue.append(handle)
            self._wake.notify()
        return handle

    async def run_vision(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the vision thread (encoding or decoding pictures) without blocking text."""
        if self._closed:
            raise EngineClosedError("the engine is closed")
        return await asyncio.wrap_future(self._vision.submit(fn, *args))

    def close(self) -> None:
        """Stop taking requests, cancel what runs or waits, and join the threads."""
        with self._wake:
            if self._closed:
                return
            self._closed = True
            self._wake.notify()
        self._worker.join()
        self._vision.shutdown(wait=True, cancel_futures=True)

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    # ----- worker

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._closed and not self._queue and not self._running:
                    self._wake.wait()
                if self._closed:
                    break
                admitted = []
                while self._queue and len(self._running) + len(admitted) < self.max_active:
                    admitted.append(self._queue.popleft())
            for handle in admitted:
                self._admit(handle)
            self._step()
        for running in self._running:
            running.task.release()
            running.handle._post(_End(EngineClosedError("the engine was closed")))
        for handle in self._queue:
            handle._post(_End(EngineClosedError("the engine was closed")))
        self._running.clear()
        self._queue.clear()

    def _admit(self, handle: RequestHandle) -> None:
        request = handle.request
        try:
            if isinstance(request, TextRequest):
                task = GenerationTask(self.model, [request.prompt], self.vocab, kind="text",
                                      options=request.options, length=request.options.max_new_tokens,
                                      cache=self.cache, block_length=self.block_length,
                                      prefill_chunk=self.prefill_chunk)
            else:
                h, w = request.grid
                if h < 1 or w < 1:
                    raise GenerationError(f"image grid must be positive, got {h}x{w}")
                task = GenerationTask(self.model, request.branches, self.vocab, kind="image",
                                      options=request.options, length=h * w, cache=self.cache,
                                      block_length=self.block_length, prefill_chunk=self.prefill_chunk)
        except Exception as error:  # noqa: BLE001 - an invalid request fails alone; the engine serves on
            self.stats.failed += 1
            handle._post(_End(error))
            return
        self._running.append(_Running(handle, task))

    def _step(self) -> None:
        now = time.monotonic()
        for running in list(self._running):
            handle = running.handle
            if handle.cancelled:
                self._drop(running, RequestCancelled(f"request {handle.id} was cancelled"))
            elif handle.deadline is not None and now > handle.deadline:
                self._drop(running, RequestTimeout(f"request {handle.id} ran past its deadline"))
        if not self._running:
            return
        small, large = [], []
        for running in self._running:
            running.inputs = running.task.next_inputs()
            fits = all(len(r.ids) <= 2 * self.block_length for r in running.inputs)
            (small if fits else large).append(running)
        groups = ([small] if small else []) + [[running] for running in large]
        for group in groups:
            self._forward(group)

    def _forward(self, group: list[_Running]) -> None:
        rows = [row for running in group for row in running.inputs]
        try:
            outputs = forward_rows(self.model, rows, self.block_length)
        except Exception as error:  # noqa: BLE001 - a broken forward fails its requests, not the engine
            for running in group:
                self._drop(running, GenerationError(f"model forward failed: {error!r}"))
            return
        self.stats.forwards += 1
        self.stats.rows += len(rows)
        at = 0
        for running in group:
            mine = outputs[at : at + len(running.inputs)]
            at += len(running.inputs)
            try:
                for event in running.task.advance(mine):
                    running.handle._post(event)
            except Exception as error:  # noqa: BLE001 - a failing task ends alone
                self._drop(running, error)
                continue
            if running.task.done:
                self._running.remove(running)
                self.stats.finished += 1
                running.handle._post(_End(running.task.result))

    def _drop(self, running: _Running, error: BaseException) -> None:
        running.task.release()
        if running in self._running:
            self._running.remove(running)
        if isinstance(error, RequestCancelled):
            self.stats.cancelled += 1
        else:
            self.stats.failed += 1
        running.handle._post(_End(error))
