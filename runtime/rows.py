"""Rows: the unit of a model forward, and the batching of rows of different lengths into one forward.

A row is one sequence's slice to run now: some input ids placed after the K/V of its earlier positions.
`forward_rows` pads rows of different input and prefix lengths into one batched forward (inputs right-
aligned, prefixes left-aligned, a boolean mask hiding padding and enforcing the block-causal rule), so the
engine can step every running request together. `KVBuffer` grows a row's stored K/V in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RowInput:
    """One row of a forward: `ids` sit at row positions start..start+T-1 after `prefix` (the K/V of
    positions 0..start-1, shaped [layers, 2, kv_heads, start, head_dim], or None when start is 0).

    Keys are visible to a query when their block is not after the query's block, with
    block(j) = (j + block_offset) // block_length. Logits are wanted for the last `logits_count` inputs and
    K/V for the first `kv_count`."""

    ids: Tensor
    start: int
    prefix: Tensor | None
    block_offset: int
    logits_count: int
    kv_count: int


@dataclass
class RowOutput:
    logits: Tensor | None  # [logits_count, vocab] float32
    kv: Tensor | None  # [layers, 2, kv_heads, kv_count, head_dim]


def forward_rows(model: torch.nn.Module, rows: Sequence[RowInput], block_length: int) -> list[RowOutput]:
    """Run rows of different lengths and prefix lengths as one batched forward.

    Inputs are right-aligned (so the positions that want logits are the last ones of every row) and
    prefixes left-aligned; a boolean mask hides padding and enforces the block-causal rule."""
    device = model.device
    n = len(rows)
    t_max = max(len(r.ids) for r in rows)
    p_max = max(r.start if r.prefix is not None else 0 for r in rows)
    c_max = max(r.logits_count for r in rows)
    k_max = max(r.kv_count for r in rows)

    input_ids = torch.zeros(n, t_max, dtype=torch.long, device=device)
    positions = torch.zeros(n, t_max, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        t = len(r.ids)
        input_ids[i, t_max - t :] = r.ids.to(device)
        positions[i, t_max - t :] = torch.arange(r.start, r.start + t, device=device)

    mask = _row_mask(rows, t_max, p_max, block_length, device)
    prefix_kv = _padded_prefix(rows, p_max) if p_max > 0 else None
    logits_positions = torch.arange(t_max - c_max, t_max, device=device)
    out = model(
        input_ids=input_ids,
        position_ids=positions,
        prefix_kv=prefix_kv,
        attention_mask=mask,
        logits_positions=logits_positions,
        return_kv=k_max > 0,
    )
    results = []
    for i, r in enumerate(rows):
        logits = out.logits[i, c_max - r.logits_count :] if r.logits_count else None
        kv = None
        if r.kv_count:
            first = t_max - len(r.ids)
            kv = torch.stack(
                [torch.stack((k[i, :, first : first + r.kv_count], v[i, :, first : first + r.kv_count]))
                 for k, v in out.kv]
            )
        results.append(RowOutput(logits=logits, kv=kv))
    return results


def _row_mask(rows: Sequence[RowInput], t_max: int, p_max: int, block_length: int,
              device: torch.device) -> Tensor | None:
    """Boolean [N, T, P+T] mask, or None when every query may see every key (one row, one block)."""
    if len(rows) == 1:
        r = rows[0]
        first = (r.start + r.block_offset) // block_length
        last = (r.start + len(r.ids) - 1 + r.block_offset) // block_length
        if first == last:
            return None
    n = len(rows)
    mask = torch.zeros(n, t_max, p_max + t_max, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        t = len(r.ids)
        first = t_max - t
        if r.prefix is not None and r.start:
            mask[i, first:, : r.start] = True
        block = (torch.arange(r.start, r.start + t, device=device) + r.block_offset) // block_length
        mask[i, first:, p_max + first :] = block[None, :] <= block[:, None]
        # Padded queries see only themselves so no row is all-hidden; their outputs are ignored.
        pad = torch.arange(first, device=device)
        mask[i, pad, p_max + pad] = True
    return mask


def _padded_prefix(rows: Sequence[RowInput], p_max: int) -> list[tuple[Tensor, Tensor]]:
    if len(rows) == 1:
        prefix = rows[0].prefix
        return [(prefix[layer, 0].unsqueeze(0), prefix[layer, 1].unsqueeze(0)) for layer in range(prefix.shape[0])]
    template = next(r.prefix for r in rows if r.prefix is not None)
    layers, _, heads, _, dim = template.shape
    padded = template.new_zeros(layers, 2, len(rows), heads, p_max, dim)
    for i, r in enumerate(rows):
        if r.prefix is not None and r.start:
            padded[:, :, i, :, : r.start] = r.prefix
    return [(padded[layer, 0], padded[layer, 1]) for layer in range(layers)]


class KVBuffer:
    """The K/V of a row's committed positions [0, length), grown in place (capacity doubles)."""

    def __init__(self, layers: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self._data = torch.empty(layers, 2, heads, 0, head_dim, dtype=dtype, device=device)
        self.length = 0

    def append(self, kv: Tensor) -> None:
        needed = self.length + kv.shape[3]
        if needed > self._data.shape[3]:
            grown = self._data.new_empty(*self._data.shape[:3], max(needed, 2 * self._data.shape[3], 64),
                                         self._data.shape[4])
            grown[:, :, :, : self.length] = self._data[:, :, :, : self.length]
            self._data = grown
        self._data[:, :, :, self.length : needed] = kv
        self.length = needed

    def view(self) -> Tensor | None:
        return self._data[:, :, :, : self.length] if self.length else None
