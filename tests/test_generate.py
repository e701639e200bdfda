"""Block-diffusion generation: the cached engine agrees with the recompute-everything baseline."""

import itertools

import pytest
import torch

from runtime.errors import ContextTooLongError, GenerationError
from runtime.generate import (
    BlockDone,
    GenerationTask,
    ImageOptions,
    StepDone,
    TextOptions,
    VocabLayout,
    generate_image,
    generate_text,
    run_task,
)
from runtime.kvcache import PrefixCache
from runtime.model import LLaDA2MoeConfig, LLaDA2MoeModelLM
from runtime.rows import forward_rows
from runtime.testing.checkpoint import TINY_IMAGE_CODES, TINY_TEXT_VOCAB, tiny_backbone_config

VOCAB = VocabLayout(mask_id=500, eos_id=501, image_offset=TINY_TEXT_VOCAB, num_image_codes=TINY_IMAGE_CODES,
                    vocab_size=TINY_TEXT_VOCAB + TINY_IMAGE_CODES)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LLaDA2MoeConfig(**tiny_backbone_config(max_position_embeddings=2048))
    return LLaDA2MoeModelLM(config).eval()


def prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 400, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("length", [5, 31, 32, 45, 64, 70])
@pytest.mark.parametrize("steps,threshold", [(32, 0.95), (8, None), (5, 0.3)])
def test_cached_text_equals_recompute(model, length, steps, threshold):
    options = TextOptions(max_new_tokens=70, steps=steps, threshold=threshold, stop_ids=frozenset())
    cached = generate_text(model, prompt(length), VOCAB, options)
    recompute = generate_text(model, prompt(length), VOCAB, options, mode="recompute")
    assert cached.ids == recompute.ids
    assert len(cached.ids) == 70 and cached.finish_reason == "length"
    assert mask_free(cached.ids)


def test_cached_sampling_equals_recompute_with_a_seed(model):
    options = TextOptions(max_new_tokens=40, steps=8, temperature=0.9, top_k=50, top_p=0.9, seed=7,
                          stop_ids=frozenset())
    cached = generate_text(model, prompt(40), VOCAB, options)
    assert cached.ids == generate_text(model, prompt(40), VOCAB, options, mode="recompute").ids
    assert cached.ids == generate_text(model, prompt(40), VOCAB, options).ids


def test_cached_steps_touch_only_the_active_block(model):
    options = TextOptions(max_new_tokens=64, steps=4, threshold=None, stop_ids=frozenset())
    task = GenerationTask(model, [prompt(100)], VOCAB, kind="text", options=options, length=64)
    first = task.next_inputs()[0]
    # The prompt's 3 complete blocks are prefilled together with the first step of the block holding its tail.
    assert (first.start, len(first.ids), first.kv_count, first.logits_count) == (0, 128, 96, 28)
    seen = []
    while not task.done:
        inputs = task.next_inputs()
        seen.append(inputs[0])
        task.advance(forward_rows(model, inputs, 32))
    # Later steps run the active block alone, or fused with the block just finished (to store its K/V).
    assert all(len(r.ids) in (32, 64) for r in seen[1:])
    # 64 new tokens after a 100-token prompt span blocks [96,128), [128,160), [160,192): the first two are
    # finished before the last starts, so their K/V are stored; the last one never needs it.
    assert sum(r.kv_count for r in seen) == 96 + 64
    assert task.result.stats.forwards == task.result.stats.steps


def test_text_stops_at_the_first_stop_id_and_reports_it(model):
    free = generate_text(model, prompt(20), VOCAB, TextOptions(max_new_tokens=64, stop_ids=frozenset()))
    stop_token = free.ids[10]
    first = free.ids.index(stop_token)
    stopped = generate_text(model, prompt(20), VOCAB, TextOptions(max_new_tokens=64, stop_ids=frozenset({stop_token})))
    assert stopped.ids == free.ids[:first]
    assert stopped.finish_reason == "stop" and stopped.stop_id == stop_token


def test_a_block_ends_once_its_reply_is_settled_with_the_ids_of_denoising_it_to_the_end(model, monkeypatch):
    options = TextOptions(max_new_tokens=64, steps=32, threshold=None, stop_ids=frozenset())
    free = generate_text(model, prompt(20), VOCAB, options)
    stop_token = free.ids[2]  # settled once the positions up to it are committed
    stopping = TextOptions(max_new_tokens=64, steps=32, threshold=None, stop_ids=frozenset({stop_token}))
    early = generate_text(model, prompt(20), VOCAB, stopping)
    monkeypatch.setattr(GenerationTask, "_settled", lambda self, block: False)
    to_the_end = generate_text(model, prompt(20), VOCAB, stopping)
    assert early.ids == to_the_end.ids == free.ids[: free.ids.index(stop_token)]
    assert early.finish_reason == to_the_end.finish_reason == "stop"
    assert early.stats.steps < to_the_end.stats.steps


def test_text_generation_never_emits_image_codes_unless_allowed(model):
    result = generate_text(model, prompt(20), VOCAB, TextOptions(max_new_tokens=64, stop_ids=frozenset()))
    assert all(t < VOCAB.image_offset for t in result.ids)


def test_forbidden_ids_are_never_written_and_the_rest_of_the_answer_adapts(model):
    free = generate_text(model, prompt(20), VOCAB, TextOptions(max_new_tokens=64, stop_ids=frozenset()))
    banned = frozenset(sorted(set(free.ids))[:3])
    options = TextOptions(max_new_tokens=64, stop_ids=frozenset(), forbid_ids=banned)
    result = generate_text(model, prompt(20), VOCAB, options)
    assert not banned & set(result.ids) and result.ids != free.ids
    assert all(t < VOCAB.image_offset for t in result.ids)  # image codes stay forbidden too
    assert result.ids == generate_text(model, prompt(20), VOCAB, options, mode="recompute").ids


def test_only_ids_holds_the_answer_to_those_ids(model):
    free = generate_text(model, prompt(20), VOCAB, TextOptions(max_new_tokens=8, stop_ids=frozenset()))
    only = frozenset(range(40, 43)) - set(free.ids)
    options = TextOptions(max_new_tokens=8, stop_ids=frozenset(), only_ids=only, threshold=None, steps=8)
    result = generate_text(model, prompt(20), VOCAB, options)
    assert len(result.ids) == 8 and set(result.ids) <= only
    assert result.ids == generate_text(model, prompt(20), VOCAB, options, mode="recompute").ids
    with pytest.raises(GenerationError, match="only_ids"):
        generate_text(model, prompt(20), VOCAB, TextOptions(only_ids=frozenset()))


def test_block_events_add_up_to_the_result(model):
    events = []
    result = generate_text(model, prompt(40), VOCAB, TextOptions(max_new_tokens=50, stop_ids=frozenset()),
                           on_event=events.append)
    blocks = [e for e in events if isinstance(e, BlockDone)]
    assert [t for b in blocks for t in b.ids] == result.ids


def test_long_prompts_prefill_in_block_aligned_chunks(model):
    options = TextOptions(max_new_tokens=32, steps=8, stop_ids=frozenset())
    whole = generate_text(model, prompt(300), VOCAB, options)
    task = GenerationTask(model, [prompt(300)], VOCAB, kind="text", options=options, length=32, prefill_chunk=64)
    chunked = run_task(task)
    assert chunked.ids == whole.ids
    assert chunked.stats.forwards > whole.stats.forwards


def uncond_prompt(length: int) -> list[int]:
    return prompt(length, seed=99)


@pytest.mark.parametrize("cond_len,uncond_len", [(40, 12), (33, 64), (64, 5), (20, 47)])
def test_cached_simple_cfg_image_equals_recompute(model, cond_len, uncond_len):
    branches = [prompt(cond_len), uncond_prompt(uncond_len)]
    options = ImageOptions(steps=8, cfg_scale=3.0, cfg_rescale=0.7)
    cached = generate_image(model, branches, (5, 9), VOCAB, options)
    recompute = generate_image(model, branches, (5, 9), VOCAB, options, mode="recompute")
    assert cached.ids == recompute.ids
    assert len(cached.ids) == 45 and all(t in VOCAB.image_ids for t in cached.ids)


@pytest.mark.parametrize("cond_len", [30, 64])
def test_cached_editing_cfg_image_equals_recompute(model, cond_len):
    branches = [prompt(cond_len), uncond_prompt(cond_len - 3), prompt(cond_len + 9, seed=5)]
    options = ImageOptions(steps=8, cfg_text_scale=4.0, cfg_image_scale=1.5, cfg_rescale=0.7)
    cached = generate_image(model, branches, (4, 8), VOCAB, options)
    assert cached.ids == generate_image(model, branches, (4, 8), VOCAB, options, mode="recompute").ids


def test_guidance_changes_the_image(model):
    branches = [prompt(40), uncond_prompt(12)]
    guided = generate_image(model, branches, (4, 8), VOCAB, ImageOptions(steps=8, cfg_scale=4.0))
    unguided = generate_image(model, branches[:1], (4, 8), VOCAB, ImageOptions(steps=8))
    assert guided.ids != unguided.ids


def test_image_larger_than_1088_codes_is_generated_whole(model):
    events = []
    result = generate_image(model, [prompt(40), uncond_prompt(10)], (34, 33), VOCAB, ImageOptions(steps=2),
                            on_event=events.append)
    assert len(result.ids) == 34 * 33 > 1088
    assert all(t in VOCAB.image_ids for t in result.ids)
    progress = [e for e in events if isinstance(e, StepDone)]
    assert progress[-1].committed == progress[-1].total == 34 * 33
    assert all(a.committed < b.committed for a, b in itertools.pairwise(progress))


def test_prompt_that_fills_the_context_is_refused(model):
    with pytest.raises(ContextTooLongError):
        generate_text(model, prompt(2048), VOCAB, TextOptions(max_new_tokens=8))
    with pytest.raises(ContextTooLongError):
        generate_image(model, [prompt(2000)], (8, 8), VOCAB, ImageOptions(steps=2))


@pytest.mark.parametrize("options", [TextOptions(steps=0), TextOptions(max_new_tokens=0),
                                     TextOptions(temperature=-1.0), TextOptions(top_p=0.0),
                                     TextOptions(threshold=1.5)])
def test_invalid_options_are_refused(model, options):
    with pytest.raises(GenerationError):
        generate_text(model, prompt(10), VOCAB, options)


def test_ids_outside_the_vocabulary_are_refused(model):
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate_text(model, [1, 2, 10_000], VOCAB, TextOptions(max_new_tokens=8))


def mask_free(ids):
    return VOCAB.mask_id not in ids


def test_prefix_cache_cold_warm_and_disabled_agree(model):
    cache = PrefixCache()
    options = TextOptions(max_new_tokens=40, steps=8, stop_ids=frozenset())
    disabled = generate_text(model, prompt(75), VOCAB, options)
    cold = generate_text(model, prompt(75), VOCAB, options, cache=cache)
    warm = generate_text(model, prompt(75), VOCAB, options, cache=cache)
    assert disabled.ids == cold.ids == warm.ids
    assert (cold.stats.cached_tokens, cold.stats.prefilled_tokens) == (0, 64)
    assert (warm.stats.cached_tokens, warm.stats.prefilled_tokens) == (64, 0)
    assert cache.stats.pinned_nodes == 0


def test_a_continued_conversation_computes_only_the_new_blocks(model):
    cache = PrefixCache()
    options = TextOptions(max_new_tokens=64, steps=8, stop_ids=frozenset())
    first = generate_text(model, prompt(50), VOCAB, options, cache=cache)
    history = prompt(50) + first.ids + prompt(30, seed=3)
    second = generate_text(model, history, VOCAB, options, cache=cache)
    # The first turn stored every block it finished: [0,32) from its prompt, [32,64) and [64,96) while generating.
    assert second.stats.cached_tokens == 96
    assert second.stats.prefilled_tokens == (len(history) // 32) * 32 - 96
    assert second.ids == generate_text(model, history, VOCAB, options).ids


def test_guidance_branches_share_the_cache_exactly(model):
    cache = PrefixCache()
    branches = [prompt(70), uncond_prompt(21)]
    options = ImageOptions(steps=8)
    uncached = generate_image(model, branches, (4, 8), VOCAB, options)
    cold = generate_image(model, branches, (4, 8), VOCAB, options, cache=cache)
    warm = generate_image(model, branches, (4, 8), VOCAB, options, cache=cache)
    assert uncached.ids == cold.ids == warm.ids
    assert warm.stats.cached_tokens == 64 and warm.stats.prefilled_tokens == 0
    # The unconditional branch (phase (21 - 70) % 32 = 15) is cached on its own grid: 15 tokens, then nothing whole.
    assert cache.cached_tokens(uncond_prompt(21), phase=15) == 15


def test_the_mask_token_is_never_committed_even_when_the_model_prefers_it(model):
    # A head that favours MASK everywhere must still produce real tokens (else the block never finishes).
    biased = LLaDA2MoeModelLM(model.config).eval()
    biased.load_state_dict(model.state_dict())
    plain_forward = biased.forward

    def forward(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        if out.logits is not None:
            out.logits[..., VOCAB.mask_id] = 1e4
        return out

    biased.forward = forward
    result = generate_text(biased, prompt(20), VOCAB, TextOptions(max_new_tokens=40, steps=8, stop_ids=frozenset()))
    assert len(result.ids) == 40 and VOCAB.mask_id not in result.ids
