"""The engine: batched requests agree with running them alone; cancellation, limits and errors."""

import asyncio

import pytest
import torch

from runtime.engine import Engine, ImageRequest, TextRequest
from runtime.errors import EngineBusyError, EngineClosedError, GenerationError, RequestCancelled
from runtime.generate import (
    BlockDone,
    ImageOptions,
    StepDone,
    TextOptions,
    VocabLayout,
    generate_image,
    generate_text,
)
from runtime.model import LLaDA2MoeConfig, LLaDA2MoeModelLM
from runtime.testing.checkpoint import TINY_IMAGE_CODES, TINY_TEXT_VOCAB, tiny_backbone_config

VOCAB = VocabLayout(mask_id=500, eos_id=501, image_offset=TINY_TEXT_VOCAB, num_image_codes=TINY_IMAGE_CODES,
                    vocab_size=TINY_TEXT_VOCAB + TINY_IMAGE_CODES)
TEXT = TextOptions(max_new_tokens=40, steps=8, stop_ids=frozenset())
IMAGE = ImageOptions(steps=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LLaDA2MoeModelLM(LLaDA2MoeConfig(**tiny_backbone_config(max_position_embeddings=2048))).eval()


def prompt(length, seed):
    return torch.randint(0, 400, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_match_running_them_alone(model):
    texts = [TextRequest(prompt(10 + 9 * i, i), TEXT) for i in range(6)]
    images = [ImageRequest([prompt(20 + 7 * i, 50 + i), prompt(5 + i, 80 + i)], (3, 5), IMAGE) for i in range(3)]

    async def main():
        engine = Engine(model, VOCAB)
        try:
            handles = [engine.submit(r) for r in texts + images]
            results = await asyncio.gather(*(h.result() for h in handles))
        finally:
            engine.close()
        return results, engine.stats

    results, stats = run(main())
    alone = [generate_text(model, r.prompt, VOCAB, r.options).ids for r in texts]
    alone += [generate_image(model, r.branches, r.grid, VOCAB, r.options).ids for r in images]
    assert [r.ids for r in results] == alone
    # Batching really happened: fewer forwards than the requests' steps put together.
    assert stats.forwards < sum(r.stats.steps for r in results)


def test_events_stream_in_order_and_end_with_the_result(model):
    async def main():
        engine = Engine(model, VOCAB)
        try:
            handle = engine.submit(ImageRequest([prompt(30, 1), prompt(8, 2)], (4, 10), IMAGE))
            events = [e async for e in handle]
            return events, await handle.result()
        finally:
            engine.close()

    events, result = run(main())
    progress = [e.committed for e in events if isinstance(e, StepDone)]
    assert progress == sorted(progress) and progress[-1] == 40
    assert [t for e in events if isinstance(e, BlockDone) for t in e.ids] == result.ids


def test_cancelling_frees_the_cache_and_the_engine_keeps_serving(model):
    async def main():
        engine = Engine(model, VOCAB)
        try:
            handle = engine.submit(TextRequest(prompt(100, 3), TextOptions(max_new_tokens=400, steps=32,
                                                                           threshold=None)))
            async for event in handle:
                if isinstance(event, BlockDone):
                    handle.cancel()
                    break
            with pytest.raises(RequestCancelled):
                await handle.result()
            after = await engine.submit(TextRequest(prompt(20, 4), TEXT)).result()
            return engine.cache.stats, after
        finally:
            engine.close()

    stats, after = run(main())
    assert stats.pinned_nodes == 0
    assert after.ids == generate_text(model, prompt(20, 4), VOCAB, TEXT).ids


def test_a_full_queue_refuses_at_once(model):
    async def main():
        engine = Engine(model, VOCAB, max_active=1, max_queue=1)
        accepted = []
        try:
            # One request runs and one waits; the third finds the queue full (submits do not wait).
            with pytest.raises(EngineBusyError):
                for i in range(3):
                    accepted.append(engine.submit(TextRequest(prompt(10, 5 + i), TEXT)))
            assert 1 <= len(accepted) <= 2
            await asyncio.gather(*(h.result() for h in accepted))
        finally:
            engine.close()

    run(main())


def test_an_invalid_request_fails_alone(model):
    async def main():
        engine = Engine(model, VOCAB)
        try:
            bad = engine.submit(TextRequest([1, 2, 99_999], TEXT))
            good = engine.submit(TextRequest(prompt(12, 8), TEXT))
            with pytest.raises(GenerationError):
                await bad.result()
            return await good.result()
        finally:
            engine.close()

    assert run(main()).ids == generate_text(model, prompt(12, 8), VOCAB, TEXT).ids


def test_eviction_under_a_tiny_budget_never_breaks_running_requests(model):
    async def main():
        engine = Engine(model, VOCAB, cache_bytes=1)
        try:
            handles = [engine.submit(TextRequest(prompt(70, 20 + i), TEXT)) for i in range(4)]
            results = await asyncio.gather(*(h.result() for h in handles))
            return results, engine.cache.stats
        finally:
            engine.close()

    results, stats = run(main())
    assert [r.ids for r in results] == [generate_text(model, prompt(70, 20 + i), VOCAB, TEXT).ids for i in range(4)]
    assert stats.bytes <= 1 and stats.pinned_nodes == 0


def test_a_closed_engine_refuses_requests(model):
    async def main():
        engine = Engine(model, VOCAB)
        engine.close()
        with pytest.raises(EngineClosedError):
            engine.submit(TextRequest(prompt(5, 9), TEXT))

    run(main())
