"""Block-diffusion generation over explicit id lists: the low-level API under sessions and the engine.

A generation fills a sequence after a prompt one block at a time. Blocks are `block_length` (32) tokens
aligned to position 0 of the conditional prompt; inside a block attention is bidirectional, across blocks
causal. Each block starts fully masked (except the prompt tail that shares it), and denoising steps commit
positions until none is masked (rules in `runtime.diffusion`).

Two ways to run the same algorithm:

* ``cached`` — every step runs only the active block against the K/V of the blocks before it. A finished
  block's K/V is computed once, fused into the first step of the next block (the finished block and the new
  one go through one forward with a block-causal mask), and optionally stored in a `PrefixCache`.
* ``recompute`` — every step re-runs the whole window from position 0, as the official code does. It is the
  baseline for exactness tests and benchmarks.

Classifier-free guidance runs extra *branches* (rows) that share the generated tokens but have their own
prompt. A branch is its own unpadded sequence (positions start at 0) whose block boundaries are shifted so
that the generated tokens fall at the same offsets within their blocks as in the conditional branch — the
exact equivalent of the official left-padding.

The unit the engine schedules is a `GenerationTask`: it says which rows to run next (`next_inputs`) and
consumes their logits and K/V (`advance`). `run_task` drives one task alone; the engine batches the rows
of many tasks into one forward with `runtime.rows.forward_rows`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from runtime import diffusion
from runtime.errors import ContextTooLongError, GenerationError
from runtime.kvcache import PrefixCache
from runtime.rows import KVBuffer, RowInput, RowOutput, forward_rows

Mode = Literal["cached", "recompute"]


# ---------------------------------------------------------------------------------------------------------
# Plain data: vocabulary facts, options, results, events


@dataclass(frozen=True)
class VocabLayout:
    """The ids generation needs to know: the mask and end-of-text ids and where image codes live."""

    mask_id: int
    eos_id: int
    image_offset: int
    num_image_codes: int
    vocab_size: int

    @property
    def image_ids(self) -> range:
        return range(self.image_offset, self.image_offset + self.num_image_codes)


@dataclass(frozen=True)
class TextOptions:
    """How to generate text (defaults: the official understanding settings)."""

    max_new_tokens: int = 2048
    steps: int = 32
    threshold: float | None = 0.95
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop_ids: frozenset[int] | None = None  # None: stop at end-of-text
    allow_image_ids: bool = False  # interleaved writing lets the model emit image codes itself
    forbid_ids: frozenset[int] = frozenset()  # never written either (a plain answer holds no image markup)
    only_ids: frozenset[int] | None = None  # when given, the only ids it may write (a header's grid sizes)
    seed: int | None = None

    def validate(self) -> None:
        _check(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        _check(self.only_ids is None or len(self.only_ids) > 0, "only_ids, when given, must name some ids")
        _check_sampling(self.steps, self.threshold, self.temperature, self.top_k, self.top_p)


@dataclass(frozen=True)
class ImageOptions:
    """How to generate image codes (defaults: the official text-to-image settings).

    Guidance follows the branches given: one branch is unguided, two use `cfg_scale`, three are editing
    guidance (full, no-text, no-image) with `cfg_text_scale` and `cfg_image_scale`."""

    steps: int = 16
    cfg_scale: float = 4.0
    cfg_text_scale: float = 4.0
    cfg_image_scale: float = 0.0
    cfg_rescale: float = 0.7
    threshold: float | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def validate(self) -> None:
        _check_sampling(self.steps, self.threshold, self.temperature, self.top_k, self.top_p)
        _check(0.0 <= self.cfg_rescale <= 1.0, "cfg_rescale must be within [0, 1]")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise GenerationError(message)


def _check_sampling(steps: int, threshold: float | None, temperature: float, top_k: int | None,
                    top_p: float | None) -> None:
    _check(steps >= 1, "steps must be >= 1")
    _check(threshold is None or 0.0 <= threshold <= 1.0, "threshold must be within [0, 1]")
    _check(temperature >= 0.0, "temperature must be >= 0")
    _check(top_k is None or top_k >= 1, "top_k must be >= 1")
    _check(top_p is None or 0.0 < top_p <= 1.0, "top_p must be within (0, 1]")


@dataclass
class GenerationStats:
    """What a generation cost: model forwards, denoising steps, and tokens computed versus reused."""

    forwards: int = 0
    steps: int = 0
    blocks: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    prefilled_tokens: int = 0  # prompt tokens in whole blocks whose K/V this generation computed


@dataclass
class GenerationResult:
    """Generated ids (text up to, not including, the stop token; image: exactly h*w code ids)."""

    ids: list[int]
    finish_reason: Literal["stop", "length", "complete"]
    stop_id: int | None
    stats: GenerationStats


@dataclass(frozen=True)
class BlockDone:
    """A block of generated ids is final (text: clipped to what the result will hold)."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class StepDone:
    """A denoising step committed positions: `committed` of `total` generated positions are final."""

    committed: int
    total: int


Event = BlockDone | StepDone


# ---------------------------------------------------------------------------------------------------------
# The task


@dataclass
class _Row:
    prompt: list[int]
    shift: int  # row index = conditional index + shift (the row's prompt length minus the conditional's)
    block_offset: int  # block(j) = (j + block_offset) // block_length
    phase: int  # length of the row's first (partial) block; 0 when blocks start at 0
    kv: KVBuffer | None
    pins: list[object] = field(default_factory=list)


class GenerationTask:
    """One generation request as a state machine over model forwards (see module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        branches: Sequence[Sequence[int]],
        vocab: VocabLayout,
        *,
        kind: Literal["text", "image"],
        options: TextOptions | ImageOptions,
        length: int,
        mode: Mode = "cached",
        cache: PrefixCache | None = None,
        block_length: int = 32,
        prefill_chunk: int = 2048,
        on_event: Callable[[Event], None] | None = None,
    ):
        options.validate()
        if not branches or any(len(b) == 0 for b in branches):
            raise GenerationError("every branch needs a non-empty prompt")
        if len(branches) > 3:
            raise GenerationError("at most three guidance branches (full, no-text, no-image)")
        if kind == "text" and len(branches) != 1:
            raise GenerationError("text generation takes exactly one branch")
        if mode not in ("cached", "recompute"):
            raise GenerationError(f"mode must be 'cached' or 'recompute', not {mode!r}")
        for branch in branches:
            bad = [t for t in branch if not 0 <= t < vocab.vocab_size]
            if bad:
                raise GenerationError(f"prompt ids outside the vocabulary: {bad[:5]}")
        self.model = model
        self.vocab = vocab
        self.kind = kind
        self.options = options
        self.mode = mode
        self.cache = cache if mode == "cached" else None
        self.block_length = block_length
        self.prefill_chunk = max(block_length, prefill_chunk - prefill_chunk % block_length)
        self.on_event = on_event
        self.stats = GenerationStats(prompt_tokens=len(branches[0]))
        self.result: GenerationResult | None = None

        config = model.config
        limit = getattr(config, "max_position_embeddings", None)
        prompt_len = len(branches[0])
        if kind == "image":
            self.end = prompt_len + length
            if limit is not None and self.end + 1 > limit:
                raise ContextTooLongError(
                    f"prompt ({prompt_len}) + image ({length} codes) + end marker exceeds the context of {limit}")
        else:
            if limit is not None and prompt_len >= limit:
                raise ContextTooLongError(f"prompt of {prompt_len} tokens leaves no room in the context of {limit}")
            self.max_new = min(length, limit - prompt_len) if limit is not None else length
            self.end = prompt_len + self.max_new
        self.length_limit = limit

        device = model.device
        self.generator = None
        if options.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(options.seed)
        self.schedule = diffusion.commit_schedule(block_length, options.steps)
        self.stop_ids = frozenset()
        if isinstance(options, TextOptions):
            self.stop_ids = options.stop_ids if options.stop_ids is not None else frozenset({vocab.eos_id})
        # MASK is the absence of a token: committing it would leave the position masked forever.
        forbidden: list[range | int] = [vocab.mask_id]
        if isinstance(options, TextOptions):
            if kind == "text" and not options.allow_image_ids:
                forbidden.append(range(vocab.image_offset, vocab.vocab_size))
            forbidden += options.forbid_ids
        # One mask for every denoising step of the request.
        allowed = vocab.image_ids if kind == "image" else getattr(options, "only_ids", None)
        self._banned = diffusion.banned_ids(vocab.vocab_size, allowed=allowed, forbidden=forbidden, device=device)

        layers = config.num_hidden_layers
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next(model.parameters()).dtype
        self.rows: list[_Row] = []
        for branch in branches:
            shift = len(branch) - prompt_len
            offset = (-shift) % block_length
            kv = KVBuffer(layers, heads, head_dim, dtype, device) if mode == "cached" else None
            self.rows.append(_Row(list(branch), shift, offset, (block_length - offset) % block_length, kv))

        # Generated positions (conditional coordinates prompt_len..): MASK until committed.
        self.prompt_len = prompt_len
        self.generated = torch.empty(0, dtype=torch.long, device=device)
        self.block_start = (prompt_len // block_length) * block_length
        self.step_in_block = 0
        self._input_rows: list[_Row] = []
        self._open_block()
        if self.cache is not None:
            self._attach_cache()

    # ----- block bookkeeping (conditional coordinates)

    def _block_end(self) -> int:
        end = self.block_start + self.block_length
        if self.kind == "image":
            return min(end, self.end)
        if self.length_limit is not None:
            end = min(end, self.length_limit)
        return end

    def _open_block(self) -> None:
        gen_from = max(self.block_start, self.prompt_len) - self.prompt_len
        gen_to = self._block_end() - self.prompt_len
        pad = torch.full((gen_to - gen_from,), self.vocab.mask_id, dtype=torch.long, device=self.generated.device)
        self.generated = torch.cat([self.generated[:gen_from], pad])
        self.gen_from = gen_from
        self.step_in_block = 0
        self.stats.blocks += 1

    def _row_tokens(self, row: _Row, start: int, stop: int) -> Tensor:
        """Row ids at row positions [start, stop): prompt, then generated (with MASKs)."""
        prompt = torch.tensor(row.prompt[start : min(stop, len(row.prompt))], dtype=torch.long)
        gen_lo = max(start - len(row.prompt), 0)
        gen_hi = max(stop - len(row.prompt), 0)
        return torch.cat([prompt.to(self.generated.device), self.generated[gen_lo:gen_hi]])

    def _row_block_start(self, row: _Row) -> int:
        return max(self.block_start + row.shift, 0)

    # ----- prefix cache

    def _attach_cache(self) -> None:
        for row in self.rows:
            match = self.cache.match(row.prompt[: self._row_block_start(row)], row.phase)
            if not match.num_tokens:
                continue
            self.cache.pin(match.nodes)
            row.pins.extend(match.nodes)
            row.kv.append(match.kv())
            if row is self.rows[0]:
                self.stats.cached_tokens += match.num_tokens

    def _cache_blocks(self, row: _Row, start: int, kv: Tensor) -> None:
        """Store K/V of row positions [start, start + len) — whole blocks on the row's grid — in the cache."""
        ids = self._row_tokens(row, 0, start + kv.shape[3]).tolist()
        edges, at = [], start
        while at < len(ids):
            size = row.phase if (at == 0 and row.phase) else self.block_length
            edges.append(kv[:, :, :, at - start : at - start + size])
            at += size
        row.pins.extend(self.cache.insert(ids, edges, start=start, phase=row.phase, pin=True))

    def release(self) -> None:
        """Unpin every cache node this task holds (idempotent); call when the task ends or is cancelled."""
        if self.cache is None:
            return
        for row in self.rows:
            self.cache.unpin(row.pins)
            row.pins.clear()

    # ----- stepping

    @property
    def done(self) -> bool:
        return self.result is not None

    def next_inputs(self) -> list[RowInput]:
        """The rows of the next forward (all branches, or only those still prefilling a long prompt)."""
        if self.mode == "recompute":
            self._input_rows = list(self.rows)
            return [self._recompute_input(row) for row in self.rows]
        pending = [self._row_block_start(row) - row.kv.length for row in self.rows]
        if max(pending) > self.prefill_chunk:
            self._input_rows = [row for row, p in zip(self.rows, pending) if p > self.prefill_chunk]
            return [self._prefill_input(row) for row in self._input_rows]
        self._input_rows = list(self.rows)
        return [self._step_input(row) for row in self.rows]

    def _logits_count(self) -> int:
        return self._block_end() - max(self.block_start, self.prompt_len)

    def _recompute_input(self, row: _Row) -> RowInput:
        stop = self._block_end() + row.shift
        return RowInput(self._row_tokens(row, 0, stop), 0, None, row.block_offset, self._logits_count(), 0)

    def _prefill_input(self, row: _Row) -> RowInput:
        start = row.kv.length
        # Chunks end on the row's block boundaries: a block's K/V depend on all of its tokens.
        stop = start + self.prefill_chunk
        stop -= (stop + row.block_offset) % self.block_length
        return RowInput(self._row_tokens(row, start, stop), start, row.kv.view(), row.block_offset, 0,
                        stop - start)

    def _step_input(self, row: _Row) -> RowInput:
        start = row.kv.length
        stop = self._block_end() + row.shift
        pending = self._row_block_start(row) - start
        return RowInput(self._row_tokens(row, start, stop), start, row.kv.view(), row.block_offset,
                        self._logits_count(), pending)

    def advance(self, outputs: Sequence[RowOutput]) -> list[Event]:
        """Apply the outputs of the forward over the rows `next_inputs` returned; returns its events."""
        self.stats.forwards += 1
        events: list[Event] = []
        for row, output in zip(self._input_rows, outputs):
            if output.kv is not None:
                self._store_kv(row, output.kv)
        if outputs[0].logits is None:  # a prefill-only forward
            return events
        self._denoise([o.logits for o in outputs], events)
        for event in events:
            if self.on_event is not None:
                self.on_event(event)
        return events

    def _store_kv(self, row: _Row, kv: Tensor) -> None:
        start = row.kv.length
        row.kv.append(kv)
        if row is self.rows[0]:
            whole_prompt_blocks = (self.prompt_len // self.block_length) * self.block_length
            self.stats.prefilled_tokens += max(0, min(row.kv.length, whole_prompt_blocks) - start)
        if self.cache is not None:
            self._cache_blocks(row, start, kv)

    def _denoise(self, logits: list[Tensor], events: list[Event]) -> None:
        self.stats.steps += 1
        block = self.generated[self.gen_from :]
        masked = block == self.vocab.mask_id
        guided = self._guide(logits)
        guided = diffusion.ban(guided, self._banned)
        opts = self.options
        tokens, confidence = diffusion.propose(guided, opts.temperature, opts.top_k, opts.top_p, self.generator)
        count = self.schedule[min(self.step_in_block, len(self.schedule) - 1)]
        commit = diffusion.select_commits(confidence, masked, count, opts.threshold)
        block[commit] = tokens[commit]
        self.step_in_block += 1
        if self.kind == "image":
            committed = int((self.generated != self.vocab.mask_id).sum())
            events.append(StepDone(committed, self.end - self.prompt_len))
        if bool((block == self.vocab.mask_id).any()) and not self._settled(block):
            return
        self._finish_block(events)

    def _settled(self, block: Tensor) -> bool:
        """Whether a text block's reply is already fixed: a stop id committed with nothing masked before it.
        What follows a stop is never part of the reply, so the block ends there: the same ids as denoising it
        to the end, in fewer steps (a short answer's padding is often all that is left)."""
        if self.kind == "image":
            return False
        masked = (block == self.vocab.mask_id).tolist()
        for position, token in enumerate(block.tolist()):
            if masked[position]:
                return False
            if token in self.stop_ids:
                return True
        return False

    def _guide(self, logits: list[Tensor]) -> Tensor:
        if len(logits) == 1:
            return logits[0]
        opts = self.options
        assert isinstance(opts, ImageOptions)
        if len(logits) == 2:
            guided = diffusion.cfg_simple(logits[0], logits[1], opts.cfg_scale)
        else:
            guided = diffusion.cfg_edit(logits[0], logits[1], logits[2], opts.cfg_text_scale, opts.cfg_image_scale)
        return diffusion.cfg_rescale(guided, logits[0], opts.cfg_rescale)

    def _finish_block(self, events: list[Event]) -> None:
        block_ids = self.generated[self.gen_from :].tolist()
        block_end = self._block_end()
        if self.kind == "image":
            events.append(BlockDone(tuple(block_ids)))
            if block_end >= self.end:
                self._complete(self.generated.tolist(), "complete", None)
                return
        else:
            so_far = self.generated.tolist()
            stop = diffusion.first_stop(so_far, self.stop_ids)
            limit = self.max_new if stop is None else min(stop, self.max_new)
            events.append(BlockDone(tuple(so_far[self.gen_from : max(limit, self.gen_from)])))
            if stop is not None and stop < self.max_new:
                self._complete(so_far[:stop], "stop", so_far[stop])
                return
            if len(so_far) >= self.max_new or block_end >= self.end:
                self._complete(so_far[: self.max_new], "length", None)
                return
        self.block_start += self.block_length
        self._open_block()

    def _complete(self, ids: list[int], reason: Literal["stop", "length", "complete"], stop_id: int | None) -> None:
        self.result = GenerationResult(ids, reason, stop_id, self.stats)
        self.release()


# ---------------------------------------------------------------------------------------------------------
# Driving one task alone


@torch.no_grad()
def run_task(task: GenerationTask) -> GenerationResult:
    """Run a task to completion on its own (no batching with other tasks)."""
    try:
        while not task.done:
            inputs = task.next_inputs()
            task.advance(forward_rows(task.model, inputs, task.block_length))
    finally:
        task.release()
    assert task.result is not None
    return task.result


def generate_text(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    vocab: VocabLayout,
    options: TextOptions = TextOptions(),
    *,
    mode: Mode = "cached",
    cache: PrefixCache | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> GenerationResult:
    """Text after `prompt_ids` (the official `generate_bd` semantics), up to a stop id or the length limit."""
    task = GenerationTask(model, [prompt_ids], vocab, kind="text", options=options, length=options.max_new_tokens,
                          mode=mode, cache=cache, on_event=on_event)
    return run_task(task)


def generate_image(
    model: torch.nn.Module,
    branches: Sequence[Sequence[int]],
    grid: tuple[int, int],
    vocab: VocabLayout,
    options: ImageOptions = ImageOptions(),
    *,
    mode: Mode = "cached",
    cache: PrefixCache | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> GenerationResult:
    """Exactly h*w image code ids after each branch's prompt (each ending with the image header).

    `branches` is [conditional] (no guidance), [conditional, unconditional] (simple CFG) or
    [full, no-text, no-image] (editing CFG)."""
    h, w = grid
    if h < 1 or w < 1:
        raise GenerationError(f"image grid must be positive, got {h}x{w}")
    task = GenerationTask(model, branches, vocab, kind="image", options=options, length=h * w, mode=mode,
                          cache=cache, on_event=on_event)
    return run_task(task)
