"""The denoising rules of one block, as pure functions over logits and masks (MODEL_SPEC §6).

Nothing here knows about the model: callers hand in logits of the positions of the current block and get
back the tokens to commit. That keeps every rule testable on hand-made logits.

Order of operations in one step: CFG combination -> rescale -> vocabulary constraint -> temperature /
top-k / top-p -> proposal (token + confidence) -> commit selection (threshold, else the k most confident).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def commit_schedule(block_length: int, steps: int) -> list[int]:
    """How many positions each step of a block commits: `block_length // steps`, the first
    `block_length % steps` steps one more, so the counts sum to the block length."""
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    steps = min(steps, block_length)
    base, extra = divmod(block_length, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def cfg_simple(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance with one unconditional branch: `uncond + scale * (cond - uncond)`."""
    return uncond + scale * (cond - uncond)


def cfg_edit(full: Tensor, no_text: Tensor, no_image: Tensor, text_scale: float, image_scale: float) -> Tensor:
    """Three-branch editing guidance of the official code:
    `no_text + text_scale * (full - no_text) + image_scale * (no_text - no_image)`."""
    return no_text + text_scale * (full - no_text) + image_scale * (no_text - no_image)


def cfg_rescale(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Pull the guided logits' spread back towards the conditional one's (std over the vocabulary, per
    position): `r * guided * std(cond) / (std(guided) + 1e-6) + (1 - r) * guided`."""
    if rescale <= 0.0:
        return guided
    ratio = cond.std(dim=-1, keepdim=True) / (guided.std(dim=-1, keepdim=True) + 1e-6)
    return rescale * guided * ratio + (1.0 - rescale) * guided


def banned_ids(size: int, *, allowed: range | Iterable[int] | None = None, forbidden: Iterable[range | int] = (),
               device: torch.device | str | None = None) -> Tensor:
    """Bool [size]: the ids that may never be written — every id outside `allowed` (a range or a set of ids;
    None: no such bound) and every id or range in `forbidden`. Built once per request; `ban` applies it at
    every step."""
    banned = torch.zeros(size, dtype=torch.bool, device=device)
    if isinstance(allowed, range):
        banned[: allowed.start] = True
        banned[allowed.stop :] = True
    elif allowed is not None:
        banned[:] = True
        banned[sorted(allowed)] = False
    for ids in forbidden:
        if isinstance(ids, range):
            banned[ids.start : ids.stop] = True
        else:
            banned[ids] = True
    return banned


def ban(logits: Tensor, banned: Tensor) -> Tensor:
    """Logits with the `banned` ids (a bool mask over the vocabulary) set to -inf."""
    return logits.masked_fill(banned, float("-inf"))


def filter_top_k(logits: Tensor, top_k: int | None) -> Tensor:
    """Logits with everything below the k-th largest value per position set to -inf."""
    if top_k is None or top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, top_p: float | None) -> Tensor:
    """Logits restricted to the smallest set of ids whose probability mass reaches `top_p` (the most
    likely id always stays)."""
    if top_p is None or top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop an id once the mass *before* it already exceeds top_p.
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) > top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def propose(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A candidate token and its confidence (its probability after filtering) for every position.

    Temperature 0 takes the argmax; otherwise the token is sampled from the tempered, filtered
    distribution (with `generator` for reproducibility)."""
    logits = logits.float()
    if temperature > 0.0 and temperature != 1.0:
        logits = logits / temperature
    logits = filter_top_p(filter_top_k(logits, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0.0:
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
        confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, tokens = probs.max(dim=-1)
    return tokens, confidence


def select_commits(confidence: Tensor, masked: Tensor, count: int, threshold: float | None) -> Tensor:
    """Which positions to commit this step (bool, same shape as `masked`, 1-D).

    Every masked position above `threshold` is committed when there are at least `count` of them;
    otherwise the `count` most confident masked positions. Never more than the masked positions, so
    committed tokens are never overwritten (the official loop can pick unmasked positions when fewer
    than `count` remain; that overwrites prompt tokens and is not copied here)."""
    remaining = int(masked.sum())
    count = min(count, remaining)
    if count <= 0:
        return torch.zeros_like(masked)
    scores = torch.where(masked, confidence, torch.full_like(confidence, float("-inf")))
    if threshold is not None:
        confident = scores > threshold
        if int(confident.sum()) >= count:
            return confident
    chosen = torch.zeros_like(masked)
    chosen[torch.topk(scores, count).indices] = True
    return chosen


def first_stop(ids: list[int], stop_ids: frozenset[int] | set[int]) -> int | None:
    """Index of the first id of `stop_ids` in `ids`, or None."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return i
    return None
