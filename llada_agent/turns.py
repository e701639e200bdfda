"""How each kind of turn runs: its prompt and guidance branches as ids, its engine requests, its events,
and the reply it leaves in the history.

Every prompt extends the session's history ids exactly. A turn's parts:

- chat: text after the assistant opening, until end-of-text.
- draw: the image header, then h*w codes with simple guidance against the null prompt.
- think: text until the model opens its picture; the grid it then writes decides the size (MODEL_SPEC §10);
  then codes.
- edit: codes after the header of the source's grid, with editing guidance (full, no text, no image).
- story: text until the model opens a picture or ends, a picture for each, up to `max_frames` pictures.

Where the model opens a picture inside text (think, story), the header follows the span grammar by
construction (`TurnRunner._text_and_header`): the text stops at the first header id the model writes, the
two grid sizes are then sampled after `<|image|>` among the grid tokens alone, and `<boi>` closes the
header. What a chat reply writes is checked instead; a break ends the reply before it (finish_reason
"malformed", `warnings` say where) rather than putting broken ids into the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runtime import errors as rt_errors
from runtime import generate as rt
from runtime.engine import ImageRequest, TextRequest
from runtime.tokens import TokenCodec

from . import prompts
from .errors import Cancelled, ContextLengthError, ImageError, InvalidInputError, LLaDAError, wrap
from .hooks import (
    Accept,
    Approve,
    Draw,
    Drawing,
    DrawPlan,
    Hooks,
    PlanReview,
    Redraw,
    Revise,
    Skip,
    call_hook,
)
from .schemas import (
    EditOptions,
    FinishReason,
    ImageDecoded,
    ImageDecodeProgress,
    ImageOptions,
    ImagePart,
    ImageProgress,
    ImageStarted,
    ImageTokensDone,
    Message,
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
from .spans import first_format_id, read_text

if TYPE_CHECKING:
    from .session import Session

Emit = Callable[[Any], Awaitable[None]]


# ---------------------------------------------------------------------------------------------------------
# Option conversion


def runtime_text_options(options: TextOptions, stop_ids: frozenset[int] | None = None,
                         forbid_ids: frozenset[int] = frozenset()) -> rt.TextOptions:
    return rt.TextOptions(max_new_tokens=options.max_tokens, steps=options.steps, threshold=options.threshold,
                          temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                          stop_ids=stop_ids, forbid_ids=forbid_ids, seed=options.seed)


def runtime_image_options(options: ImageOptions | EditOptions, *, cfg_scale: float = 1.0,
                          cfg_text_scale: float = 0.0, cfg_image_scale: float = 0.0) -> rt.ImageOptions:
    return rt.ImageOptions(steps=options.steps, cfg_scale=cfg_scale, cfg_text_scale=cfg_text_scale,
                           cfg_image_scale=cfg_image_scale, cfg_rescale=options.cfg_rescale,
                           threshold=options.threshold, temperature=options.temperature, top_k=options.top_k,
                           top_p=options.top_p, seed=options.seed)


# ---------------------------------------------------------------------------------------------------------
# The turn


@dataclass
class _Progress:
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("cached_tokens", "prefilled_tokens", "steps", "forwards", "requests"), 0))
    warnings: list[str] = field(default_factory=list)
    images: int = 0

    def add(self, stats: rt.GenerationStats) -> None:
        self.usage["cached_tokens"] += stats.cached_tokens
        self.usage["prefilled_tokens"] += stats.prefilled_tokens
        self.usage["steps"] += stats.steps
        self.usage["forwards"] += stats.forwards
        self.usage["requests"] += 1


class TurnRunner:
    """Runs one turn of a session: builds its ids, drives the engine, emits events, commits the history."""

    def __init__(self, session: Session, task: Task, parts: list[Any], options: Any, hooks: Hooks | None,
                 emit: Callable[[Any], None] | None, timeout: float | None):
        self.session = session
        self.model = session.model
        self.codec: TokenCodec = session.model.codec
        self.task = task
        self.parts = parts
        self.options = options
        self.hooks = hooks or Hooks()
        self._sink = emit
        self.timeout = timeout
        self.progress = _Progress()
        self._decodes: list[asyncio.Task[None]] = []
        self._decoded: dict[int, ImagePart] = {}
        self._abort = threading.Event()
        self._handle: Any = None

    # ----- events

    async def emit(self, event: Any) -> None:
        if self.hooks.on_event is not None:
            result = self.hooks.on_event(event)
            if inspect.isawaitable(result):
                await result
        if self._sink is not None:
            self._sink(event)

    def cancel(self) -> None:
        """Stop the turn at the next step (the engine request and any decoding are cancelled)."""
        self._abort.set()
        if self._handle is not None:
            self._handle.cancel()

    # ----- the turn as a whole

    async def run(self) -> Reply:
        try:
            user_parts = await self._read_user_parts()
            user_ids = self.session._user_turn_ids(user_parts)
            self.prompt = self.session._ids_list() + user_ids + list(self.model.chat.assistant_open)
            program = {"chat": self._chat, "draw": self._draw, "think": self._think, "edit": self._edit,
                       "story": self._story}[self.task]
            content, parts, finish = await program(user_parts)
            if self._decodes:
                await asyncio.gather(*self._decodes)
            parts = [self._decoded.get(id(p), p) if isinstance(p, ImagePart) else p for p in parts]
            parts = [p for p in parts if not (isinstance(p, TextPart) and p.text == "")]
            reply = Reply(
                task=self.task, parts=parts, ids=content, finish_reason=finish,
                usage=Usage(prompt_tokens=len(self.prompt), generated_tokens=len(content), **self.progress.usage),
                cache=self.model.cache_stats(), warnings=self.progress.warnings,
            )
            self.session._commit(Message(role="user", parts=user_parts), user_ids, reply)
            await self.emit(TurnDone(reply=reply))
            return reply
        finally:
            self._abort.set()
            for pending in self._decodes:
                pending.cancel()
            if self._decodes:
                await asyncio.gather(*self._decodes, return_exceptions=True)

    async def _read_user_parts(self) -> list[Any]:
        """The user's parts with every image read by the image tokenizer (resized for the task).

        An edit without an image edits the session's last image (read by its codes, not re-encoded)."""
        parts = list(self.parts)
        purpose = "editing" if self.task == "edit" else "understanding"
        if self.task == "edit" and not any(isinstance(p, ImagePart) for p in parts):
            last = self.session.last_image()
            if last is None:
                raise ImageError("nothing to edit: pass an image, or draw one in this session first")
            parts.insert(0, last)
        images = [p for p in parts if isinstance(p, ImagePart)]
        if not images:
            return parts
        encoded = iter(await self.model.encode_images(images, purpose))
        return [next(encoded) if isinstance(p, ImagePart) else p for p in parts]

    # ----- engine requests

    async def _request(self, request: Any, on_event: Callable[[Any], Awaitable[None]]) -> rt.GenerationResult:
        if self._abort.is_set():
            raise Cancelled("the turn was cancelled")
        try:
            handle = self.model.engine.submit(request, timeout=self.timeout)
        except rt_errors.RuntimeErrorBase as exc:
            raise wrap(exc) from exc
        self._handle = handle
        finished = False
        try:
            async for raw in handle:
                await on_event(raw)
            result = await handle.result()
            finished = True
        except rt_errors.RuntimeErrorBase as exc:
            raise wrap(exc) from exc
        finally:
            self._handle = None
            if not finished:
                handle.cancel()
                # Wait for the worker to drop the request so its cache pins are released before we return.
                await asyncio.shield(_drain(handle))
        self.progress.add(result.stats)
        return result

    async def _text(self, prompt: list[int], options: TextOptions, *, thinking: bool,
                    stop_ids: frozenset[int] | None = None, forbid_ids: frozenset[int] = frozenset(),
                    ) -> rt.GenerationResult:
        streamer = _TextStreamer(self.codec, ThinkingBlock if thinking else TextBlock)

        async def on_event(raw: Any) -> None:
            if isinstance(raw, rt.BlockDone):
                event = streamer.feed(list(raw.ids))
                if event is not None:
                    await self.emit(event)

        result = await self._request(TextRequest(prompt, runtime_text_options(options, stop_ids, forbid_ids)),
                                     on_event)
        rest = streamer.feed([], last=True)
        if rest is not None:
            await self.emit(rest)
        return result

    async def _text_and_header(self, prompt: list[int], options: TextOptions, *, thinking: bool,
                               ) -> tuple[rt.GenerationResult, tuple[int, int] | None]:
        """Text until the model opens a picture or ends, then that picture's grid (None when it opened none).

        The text stops at the first id of a header (`<|image|>`, a grid size, `<boi>`; or a stray `<|/image|>`):
        there the model opens a picture. The height and width are then sampled among the grid tokens alone,
        after `<|image|>`, so the model chooses the size and the header is always well formed (left free, a
        small model writes text into a header, or `<boi>` without one)."""
        special = self.codec.special
        markup = self.codec.image_markup_ids
        result = await self._text(prompt, options, thinking=thinking, stop_ids=markup | {special.eos})
        if result.stop_id not in markup:
            return result, None
        sizes = rt.TextOptions(max_new_tokens=2, steps=2, threshold=None, temperature=options.temperature,
                               top_k=options.top_k, top_p=options.top_p, only_ids=self.codec.grid_ids,
                               seed=options.seed)
        header = await self._request(TextRequest(prompt + result.ids + [special.image_start], sizes), _ignore)
        grid = tuple(self.codec.grid_size(token) for token in header.ids)
        if len(grid) != 2 or None in grid:  # only a scripted test can write other ids here
            raise LLaDAError(f"the grid sizes of a header came back as {header.ids}, not two grid tokens")
        return result, grid  # type: ignore[return-value]

    async def _image(self, branches: list[list[int]], grid: tuple[int, int], options: rt.ImageOptions,
                     decode: ImageOptions | EditOptions) -> ImagePart:
        """Draw one image (codes after each branch); start its decoding in the background when asked."""
        index = self.progress.images
        self.progress.images += 1
        await self.emit(ImageStarted(index=index, grid=grid))

        async def on_event(raw: Any) -> None:
            if isinstance(raw, rt.StepDone):
                await self.emit(ImageProgress(index=index, committed=raw.committed, total=raw.total))

        result = await self._request(ImageRequest(branches, grid, options), on_event)
        part = ImagePart(grid=grid, codes=[self.codec.code_of(t) for t in result.ids])
        await self.emit(ImageTokensDone(index=index, image=part))
        if decode.decode:
            self._decodes.append(asyncio.ensure_future(self._decode(index, part, decode)))
        return part

    async def _decode(self, index: int, part: ImagePart, options: ImageOptions | EditOptions) -> None:
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        abort = self._abort

        def progress(step: int, total: int) -> None:
            if abort.is_set():
                raise Cancelled("decoding was cancelled")
            loop.call_soon_threadsafe(steps.put_nowait, (step, total))

        decoding = asyncio.ensure_future(self.model.decode_image(
            part, mode=options.decoder_mode, steps=options.decoder_steps, seed=options.seed, progress=progress))
        getter: asyncio.Future[tuple[int, int]] | None = None
        try:
            # Progress steps are queued before the decoding ends, so all of them are emitted before the end.
            while not (decoding.done() and steps.empty() and getter is None):
                if getter is None:
                    getter = asyncio.ensure_future(steps.get())
                await asyncio.wait({getter, decoding}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    step, total = getter.result()
                    getter = None
                    await self.emit(ImageDecodeProgress(index=index, step=step, total=total))
                elif decoding.done() and steps.empty():
                    break
            decoded = decoding.result()
        except Cancelled:
            raise
        except LLaDAError as exc:
            # The codes are what the model wrote and stay valid; only the picture is missing.
            self.progress.warnings.append(f"image {index} was not decoded: {exc}")
            return
        finally:
            for pending in (getter, decoding):
                if pending is not None and not pending.done():
                    pending.cancel()
        self._decoded[id(part)] = decoded
        await self.emit(ImageDecoded(index=index, image=decoded))

    async def _wait_decoded(self, part: ImagePart) -> ImagePart:
        if self._decodes:
            await asyncio.gather(*self._decodes)
        return self._decoded.get(id(part), part)

    # ----- helpers over ids

    def _null_prompt(self) -> list[int]:
        """The history with this turn's user content replaced by the null prompt `<uncondition>`."""
        return (self.session._ids_list() + self.session._user_open() + self.model.format.uncondition()
                + list(self.model.chat.assistant_open))

    def _check_fits(self, prompt_len: int, grid: tuple[int, int]) -> None:
        h, w = grid
        if max(h, w) > self.codec.max_grid:
            raise InvalidInputError(f"grid {h}x{w} is larger than the vocabulary writes ({self.codec.max_grid} "
                                    "per side)")
        if prompt_len + h * w + 2 > self.model.context_length:
            raise ContextLengthError(f"the conversation ({prompt_len} tokens) plus a {h}x{w} image ({h * w} "
                                     f"codes) does not fit the context of {self.model.context_length} tokens")

    def _fits(self, prompt_len: int, grid: tuple[int, int]) -> bool:
        try:
            self._check_fits(prompt_len, grid)
        except InvalidInputError:
            return False
        return True

    def _image_span_tail(self, part: ImagePart) -> list[int]:
        return [self.codec.code_id(c) for c in part.codes] + [self.codec.special.image_end]

    # ----- chat

    async def _chat(self, user_parts: list[Any]) -> tuple[list[int], list[Any], FinishReason]:
        options = self._options(TextOptions, TextOptions())
        # A chat answer is text: image markup (a header's grid tokens) would only make it malformed.
        result = await self._text(self.prompt, options, thinking=False, forbid_ids=self.codec.image_markup_ids)
        output = read_text(self.codec, result.ids)
        finish: FinishReason = result.finish_reason if output.warning is None else "malformed"
        if output.warning:
            self.progress.warnings.append(output.warning)
        return output.ids, [TextPart(text=self.codec.decode(output.ids))], finish

    # ----- draw

    async def _draw(self, user_parts: list[Any]) -> tuple[list[int], list[Any], FinishReason]:
        options = self._options(ImageOptions, ImageOptions())
        grid = options.grid_or(self.model.default_grid)
        self._check_fits(len(self.prompt) + 4, grid)
        header = self.codec.image_header(*grid)
        part = await self._image(self._simple_branches(self.prompt + header, header, options.cfg_scale),
                                 grid, runtime_image_options(options, cfg_scale=options.cfg_scale), options)
        return header + self._image_span_tail(part), [part], "complete"

    def _simple_branches(self, cond: list[int], header: list[int], cfg_scale: float) -> list[list[int]]:
        # Scale 1 is the conditional alone: no need to compute the unconditional branch.
        if cfg_scale == 1.0:
            return [cond]
        return [cond, self._null_prompt() + header]

    # ----- think, then draw

    async def _think(self, user_parts: list[Any]) -> tuple[list[int], list[Any], FinishReason]:
        options = self._options(ThinkOptions, ThinkOptions())
        image_options = options.image
        requested = image_options.grid_or(self.model.default_grid)
        request_text = "".join(p.text for p in user_parts if isinstance(p, TextPart))
        thinking, grid = await self._think_phase(self.prompt, options, requested)
        attempt = 0
        while True:
            plan = self.codec.decode(thinking)
            decision = await call_hook("after_thinking", self.hooks.after_thinking,
                                       PlanReview(prompt=request_text, plan=plan, grid=grid, attempt=attempt),
                                       (Approve, Revise))
            if isinstance(decision, Revise):
                if decision.plan is not None and decision.plan != plan:
                    thinking, plan = self.codec.encode_text(decision.plan), decision.plan
                grid = decision.grid or grid
            draw = await call_hook("before_drawing", self.hooks.before_drawing,
                                   DrawPlan(prompt=request_text, plan=plan, grid=grid, options=image_options,
                                            attempt=attempt), (Draw, Skip))
            if isinstance(draw, Skip):
                if draw.reason:
                    self.progress.warnings.append(f"drawing skipped: {draw.reason}")
                return thinking, [ThinkingPart(text=plan)], "skipped"
            if isinstance(draw, Draw) and draw.options is not None:
                image_options = self.model.recommended.apply(draw.options)
            header = self.codec.image_header(*grid)
            cond = self.prompt + thinking + header
            self._check_fits(len(cond), grid)
            part = await self._image(self._simple_branches(cond, header, image_options.cfg_scale), grid,
                                     runtime_image_options(image_options, cfg_scale=image_options.cfg_scale),
                                     image_options)
            verdict = await call_hook("after_drawing", self.hooks.after_drawing,
                                      Drawing(prompt=request_text, plan=plan, image=await self._wait_decoded(part),
                                              attempt=attempt), (Accept, Redraw))
            if not isinstance(verdict, Redraw):
                break
            if attempt >= options.max_redraws:
                self.progress.warnings.append(f"a redraw was asked after {attempt} redraw(s); the limit is "
                                              f"{options.max_redraws}, so the last picture stays")
                break
            attempt += 1
            if verdict.options is not None:
                image_options = self.model.recommended.apply(verdict.options)
            if verdict.feedback:
                thinking = thinking + self.codec.encode_text(
                    prompts.render("redraw_feedback.j2", feedback=verdict.feedback))
                more, new_grid = await self._think_phase(self.prompt + thinking, options, grid)
                thinking, grid = thinking + more, new_grid
        content = thinking + header + self._image_span_tail(part)
        return content, [ThinkingPart(text=plan), part], "complete"

    async def _think_phase(self, prompt: list[int], options: ThinkOptions,
                           fallback: tuple[int, int]) -> tuple[list[int], tuple[int, int]]:
        """Thinking text until the model opens its image; the grid it writes there (else `fallback`)."""
        result, grid = await self._text_and_header(prompt, options, thinking=True)
        if grid is None:
            ended = "stopped at the length limit" if result.stop_id is None else "ended its text"
            self.progress.warnings.append(f"the model {ended} without opening a picture; drawing at "
                                          f"{fallback[0]}x{fallback[1]}")
            grid = fallback
        elif not self._fits(len(prompt) + len(result.ids) + 4, grid):
            self.progress.warnings.append(f"the model's header asks for a {grid[0]}x{grid[1]} image, which does "
                                          f"not fit; drawing at {fallback[0]}x{fallback[1]}")
            grid = fallback
        return list(result.ids), grid

    # ----- edit

    async def _edit(self, user_parts: list[Any]) -> tuple[list[int], list[Any], FinishReason]:
        options = self._options(EditOptions, EditOptions())
        sources = [p for p in user_parts if isinstance(p, ImagePart)]
        grid = options.grid or sources[0].grid
        instruction = [p for p in user_parts if isinstance(p, TextPart)]
        span_ids = [t for p in sources for t in self.model.format.part_ids(_codes(p))]
        text_ids = [t for p in instruction for t in self.codec.encode_text(p.text)]
        header = self.codec.image_header(*grid)
        user_open = self.session._user_open()
        history = self.session._ids_list()
        tail = list(self.model.chat.assistant_open) + header
        full = self.prompt + header
        no_text = history + user_open + span_ids + self.model.format.uncondition() + tail
        branches = [full, no_text]
        self._check_fits(len(full), grid)
        if options.cfg_image_scale == 0.0:
            # With no image guidance the no-image branch has weight 0: simple guidance is the same numbers.
            rt_options = runtime_image_options(options, cfg_scale=options.cfg_text_scale)
        else:
            branches.append(history + user_open + [self.codec.special.image_start] + text_ids + tail)
            rt_options = runtime_image_options(options, cfg_text_scale=options.cfg_text_scale,
                                               cfg_image_scale=options.cfg_image_scale)
        part = await self._image(branches, grid, rt_options, options)
        return header + self._image_span_tail(part), [part], "complete"

    # ----- story

    async def _story(self, user_parts: list[Any]) -> tuple[list[int], list[Any], FinishReason]:
        options = self._options(StoryOptions, StoryOptions())
        image_options = options.image
        content: list[int] = []
        parts: list[Any] = []
        frames = 0
        last_image_end = 0  # content index just past the last picture
        while True:
            prompt = self.prompt + content
            try:
                result, grid = await self._text_and_header(prompt, options.text, thinking=False)
            except ContextLengthError:
                self.progress.warnings.append("the story reached the end of the context")
                return content, parts, "length"
            content += result.ids
            parts.append(TextPart(text=self.codec.decode(result.ids)))
            if grid is None:
                return content, parts, result.finish_reason
            header = self.codec.image_header(*grid)
            if not self._fits(len(prompt) + len(result.ids) + 4, grid):
                self.progress.warnings.append(f"the model opened a {grid[0]}x{grid[1]} picture that does not fit "
                                              "the context; the story ends before it")
                return content, parts, "length"
            current_text = content[last_image_end:]
            content += header
            full = self.prompt + content
            if frames == 0:
                branches = self._simple_branches(full, header, image_options.cfg_text_scale)
                rt_options = runtime_image_options(image_options, cfg_scale=image_options.cfg_text_scale)
            else:
                # Editing-style guidance: drop the text since the last picture / keep only that text.
                no_text = self.prompt + content[:last_image_end] + self.model.format.uncondition() + header
                no_image = self._null_prompt() + current_text + header
                branches = [full, no_text, no_image]
                rt_options = runtime_image_options(image_options, cfg_text_scale=image_options.cfg_text_scale,
                                                   cfg_image_scale=image_options.cfg_image_scale)
            part = await self._image(branches, grid, rt_options, image_options)
            content += self._image_span_tail(part)
            parts.append(part)
            last_image_end = len(content)
            frames += 1
            if frames >= options.max_frames:
                return content, parts, "max_frames"

    # ----- options

    def _options(self, kind: type, default: Any) -> Any:
        options = self.options if self.options is not None else default
        if not isinstance(options, kind):
            raise InvalidInputError(f"a {self.task!r} turn takes {kind.__name__}, got {type(options).__name__}")
        return self.model.recommended.apply(options)


def _codes(part: ImagePart) -> Any:
    from runtime.conversation import ImageCodes

    return ImageCodes(part.grid[0], part.grid[1], tuple(part.codes))


async def _ignore(raw: Any) -> None:
    """The events of a request no one watches (a header's two grid sizes)."""


async def _drain(handle: Any) -> None:
    # The request's end (cancelled, failed) is already being reported to the caller.
    with contextlib.suppress(Exception):
        await handle.result()


class _TextStreamer:
    """Turns committed text blocks into text deltas (held back at the first image-span id, and while the
    decoded text ends inside a multi-byte character)."""

    def __init__(self, codec: TokenCodec, kind: type):
        self.codec = codec
        self.kind = kind
        self.ids: list[int] = []
        self.sent_ids = 0
        self.sent_text = ""
        self.stopped = False

    def feed(self, block: list[int], *, last: bool = False) -> Any:
        """The delta of one more block; `last`: the text ends here, bytes held back so far go out as they are
        (an answer cut off inside a character ends with U+FFFD, in the reply and in the stream alike)."""
        if self.stopped:
            return None
        self.ids += block
        cut = first_format_id(self.codec, self.ids)
        if cut < len(self.ids):
            self.stopped = True
        text = self.codec.decode(self.ids[:cut])
        if not (self.stopped or last):
            text = text.rstrip("\ufffd")
        if not text.startswith(self.sent_text) or len(text) == len(self.sent_text):
            return None
        delta = text[len(self.sent_text):]
        new_ids = self.ids[self.sent_ids:cut]
        self.sent_text, self.sent_ids = text, cut
        return self.kind(text=delta, ids=new_ids)
