"""The denoising rules of one block, checked on hand-made logits."""

import math

import pytest
import torch

from runtime import diffusion


def test_commit_schedule_spreads_the_remainder_over_the_first_steps():
    assert diffusion.commit_schedule(32, 32) == [1] * 32
    assert diffusion.commit_schedule(32, 8) == [4] * 8
    assert diffusion.commit_schedule(32, 5) == [7, 7, 6, 6, 6]
    assert sum(diffusion.commit_schedule(32, 7)) == 32


def test_commit_schedule_never_has_more_steps_than_positions():
    assert diffusion.commit_schedule(4, 16) == [1, 1, 1, 1]


@pytest.mark.parametrize("steps", [0, -3])
def test_commit_schedule_rejects_non_positive_steps(steps):
    with pytest.raises(ValueError):
        diffusion.commit_schedule(32, steps)


def test_simple_cfg_extrapolates_from_the_unconditional_branch():
    cond = torch.tensor([2.0, 0.0])
    uncond = torch.tensor([1.0, 1.0])
    assert torch.equal(diffusion.cfg_simple(cond, uncond, 4.0), torch.tensor([5.0, -3.0]))
    assert torch.equal(diffusion.cfg_simple(cond, uncond, 1.0), cond)


def test_edit_cfg_combines_three_branches():
    full, no_text, no_image = torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.5])
    # no_text + 2 * (full - no_text) + 0.5 * (no_text - no_image) = 1 + 4 + 0.25
    assert diffusion.cfg_edit(full, no_text, no_image, 2.0, 0.5).item() == pytest.approx(5.25)
    # With the official default image scale 0 it is simple CFG against the no-text branch.
    assert torch.equal(diffusion.cfg_edit(full, no_text, no_image, 4.0, 0.0), diffusion.cfg_simple(full, no_text, 4.0))


def test_rescale_matches_the_conditional_spread():
    cond = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    guided = cond * 5.0
    full = diffusion.cfg_rescale(guided, cond, 1.0)
    assert torch.allclose(full.std(-1), cond.std(-1), atol=1e-5)
    mixed = diffusion.cfg_rescale(guided, cond, 0.7)
    assert torch.allclose(mixed, 0.7 * full + 0.3 * guided, atol=1e-5)
    assert torch.equal(diffusion.cfg_rescale(guided, cond, 0.0), guided)


def test_vocabulary_constraint_keeps_only_the_allowed_ids():
    logits = torch.arange(10.0)
    constrained = diffusion.ban(logits, diffusion.banned_ids(10, allowed=range(2, 5)))
    assert torch.isinf(constrained[[0, 1, 5, 9]]).all()
    assert torch.equal(constrained[2:5], logits[2:5])
    assert int(constrained.argmax()) == 4


def test_a_set_of_allowed_ids_keeps_only_those():
    banned = diffusion.banned_ids(10, allowed={7, 2, 4}, forbidden=[4])
    assert [i for i, b in enumerate(banned.tolist()) if not b] == [2, 7]
    assert int(diffusion.ban(torch.arange(10.0), banned).argmax()) == 7


def test_forbidding_ids_removes_them_from_the_argmax():
    logits = torch.arange(10.0)
    assert int(diffusion.ban(logits, diffusion.banned_ids(10, forbidden=[range(8, 10)])).argmax()) == 7
    # Single ids and ranges together, on top of an allowed range; every row of a batch alike.
    banned = diffusion.banned_ids(10, allowed=range(1, 9), forbidden=[7, range(5, 6)])
    assert banned.tolist() == [True, False, False, False, False, True, False, True, False, True]
    assert diffusion.ban(torch.zeros(3, 10), banned).argmax(-1).tolist() == [1, 1, 1]


def test_greedy_proposal_returns_argmax_and_its_probability():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])
    tokens, confidence = diffusion.propose(logits)
    assert tokens.tolist() == [1, 0]
    assert confidence.tolist() == pytest.approx([0.75, 0.8])


def test_top_k_leaves_the_k_best():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0])
    filtered = diffusion.filter_top_k(logits, 2)
    assert torch.isinf(filtered[[0, 3]]).all() and torch.equal(filtered[[1, 2]], logits[[1, 2]])


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    filtered = diffusion.filter_top_p(probs.log(), 0.7)
    assert torch.isfinite(filtered[:2]).all() and torch.isinf(filtered[2:]).all()
    # The most likely id always survives, even with a tiny top_p.
    assert torch.isfinite(diffusion.filter_top_p(probs.log(), 0.01)[0])


def test_sampling_is_reproducible_with_a_generator_and_respects_filters():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    a = diffusion.propose(logits, 1.0, 5, None, torch.Generator().manual_seed(1))
    b = diffusion.propose(logits, 1.0, 5, None, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0])
    top5 = torch.topk(logits, 5).indices
    assert (a[0][:, None] == top5).any(-1).all()


def test_commit_takes_every_confident_position_when_enough():
    confidence = torch.tensor([0.99, 0.97, 0.5, 0.96])
    masked = torch.tensor([True, True, True, True])
    assert diffusion.select_commits(confidence, masked, 2, 0.95).tolist() == [True, True, False, True]


def test_commit_falls_back_to_the_k_most_confident():
    confidence = torch.tensor([0.9, 0.2, 0.5, 0.96])
    masked = torch.tensor([True, True, True, True])
    assert diffusion.select_commits(confidence, masked, 2, 0.95).tolist() == [True, False, False, True]


def test_commit_never_touches_committed_positions():
    confidence = torch.tensor([0.99, 0.1, 0.99, 0.3])
    masked = torch.tensor([False, True, False, True])
    chosen = diffusion.select_commits(confidence, masked, 4, 0.95)
    assert chosen.tolist() == [False, True, False, True]


def test_first_stop_finds_the_earliest_stop_id():
    assert diffusion.first_stop([5, 7, 9, 7], {9, 7}) == 1
    assert diffusion.first_stop([5, 6], {9}) is None
