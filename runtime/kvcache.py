"""Prefix cache of completed blocks' K/V: a radix tree over token ids whose edges are whole blocks.

A sequence is cut into edges by its *phase*: with phase 0 every edge is `block_size` tokens; with
0 < phase < block_size the first edge is the first `phase` tokens and the rest are `block_size` tokens.
The K/V of a block depend on how the sequence is cut, so each phase has its own root and sequences with
different phases never share nodes.

Each node holds the K/V of its edge for every layer as one tensor of shape
[num_layers, 2, n_kv_heads, edge_len, head_dim]; the cache treats it as opaque apart from its size and
token length. Nodes in use are pinned with explicit reference counts; unpinned leaves are evicted by
least-recent access until the cache fits its byte budget.

The engine's worker thread is the only mutator; a lock keeps `stats` readable from other threads.
"""

from __future__ import annotations

import heapq
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from runtime.errors import CacheError

_TOKEN_DIM = 3
_KV_NDIM = 5


class CacheNode:
    """One edge of the tree: its token ids, the K/V of those tokens, and bookkeeping.

    `key` is the edge's token ids; `kv` its K/V (None once evicted, and for roots); `parent` and
    `children` (keyed by the child's `key`) link the tree; `lock_ref` counts pins; `last_access`
    orders eviction; `evicted` tells callers holding a stale node that its K/V are gone.
    """

    __slots__ = ("children", "evicted", "key", "kv", "last_access", "lock_ref", "nbytes", "parent")

    def __init__(self, key: tuple[int, ...], kv: torch.Tensor | None, parent: CacheNode | None):
        self.key = key
        self.kv = kv
        self.parent = parent
        self.children: dict[tuple[int, ...], CacheNode] = {}
        self.lock_ref = 0
        self.last_access = 0
        self.nbytes = 0 if kv is None else kv.numel() * kv.element_size()
        self.evicted = False

    @property
    def num_tokens(self) -> int:
        """Number of tokens on this edge."""
        return len(self.key)

    def __repr__(self) -> str:
        return (
            f"CacheNode(tokens={len(self.key)}, children={len(self.children)}, "
            f"lock_ref={self.lock_ref}, evicted={self.evicted})"
        )


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix of a sequence: its nodes root-to-leaf and how many tokens they cover."""

    nodes: tuple[CacheNode, ...]
    num_tokens: int
    phase: int

    def kv(self) -> torch.Tensor | None:
        """Return the matched K/V as one tensor [num_layers, 2, n_kv_heads, num_tokens, head_dim], or None.

        Gather before anything can evict the nodes (pin them if other work runs in between).
        """
        if not self.nodes:
            return None
        if any(node.evicted for node in self.nodes):
            raise CacheError("a matched node was evicted before its K/V were gathered; pin the match first")
        return torch.cat([node.kv for node in self.nodes], dim=_TOKEN_DIM)


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache: counters since the last `reset_stats()` and the current sizes."""

    lookups: int
    lookup_tokens: int
    hit_tokens: int
    inserted_tokens: int
    duplicate_tokens: int
    evicted_nodes: int
    evicted_tokens: int
    bytes: int
    nodes: int
    pinned_nodes: int
    max_bytes: int | None

    @property
    def miss_tokens(self) -> int:
        """Tokens asked for in `match` that the cache could not serve."""
        return self.lookup_tokens - self.hit_tokens

    @property
    def over_budget_bytes(self) -> int:
        """Bytes above the budget that could not be evicted because they are pinned (0 when within budget)."""
        if self.max_bytes is None:
            return 0
        return max(0, self.bytes - self.max_bytes)


class PrefixCache:
    """A radix tree of completed blocks' K/V keyed by token ids and block phase, under an optional byte budget."""

    def __init__(self, block_size: int = 32, max_bytes: int | None = None):
        if block_size < 1:
            raise CacheError(f"block_size must be at least 1, got {block_size}")
        if max_bytes is not None and max_bytes < 0:
            raise CacheError(f"max_bytes must be non-negative or None, got {max_bytes}")
        self.block_size = block_size
        self._max_bytes = max_bytes
        self._roots: dict[int, CacheNode] = {}
        self._lock = threading.Lock()
        self._clock = 0
        self._bytes = 0
        self._nodes = 0
        self._pinned = 0
        self._reset_counters()

    @property
    def max_bytes(self) -> int | None:
        """The byte budget, or None for no limit."""
        return self._max_bytes

    @property
    def stats(self) -> CacheStats:
        """A consistent snapshot of counters and sizes; safe to read from any thread."""
        with self._lock:
            return CacheStats(
                lookups=self._lookups,
                lookup_tokens=self._lookup_tokens,
                hit_tokens=self._hit_tokens,
                inserted_tokens=self._inserted_tokens,
                duplicate_tokens=self._duplicate_tokens,
                evicted_nodes=self._evicted_nodes,
                evicted_tokens=self._evicted_tokens,
                bytes=self._bytes,
                nodes=self._nodes,
                pinned_nodes=self._pinned,
                max_bytes=self._max_bytes,
            )

    def reset_stats(self) -> None:
        """Zero the counters (lookups, hits, inserts, evictions); sizes are left as they are."""
        with self._lock:
            self._reset_counters()

    def match(self, ids: Sequence[int], phase: int = 0) -> PrefixMatch:
        """Return the longest cached prefix of `ids` made of complete edges, touching it for LRU."""
        ids = _as_list(ids)
        self._check_phase(phase)
        with self._lock:
            nodes = self._walk(ids, phase, len(ids))
            self._touch(nodes)
            num_tokens = sum(node.num_tokens for node in nodes)
            self._lookups += 1
            self._lookup_tokens += len(ids)
            self._hit_tokens += num_tokens
            return PrefixMatch(nodes=tuple(nodes), num_tokens=num_tokens, phase=phase)

    def cached_tokens(self, ids: Sequence[int], phase: int = 0) -> int:
        """Return how many leading tokens of `ids` the cache holds, leaving LRU order and stats untouched."""
        ids = _as_list(ids)
        self._check_phase(phase)
        with self._lock:
            return sum(node.num_tokens for node in self._walk(ids, phase, len(ids)))

    def insert(
        self,
        ids: Sequence[int],
        blocks_kv: Sequence[torch.Tensor],
        *,
        start: int = 0,
        phase: int = 0,
        pin: bool = False,
    ) -> list[CacheNode]:
        """Add the K/V of consecutive edges starting at token `start`; return one node per block given.

        `ids` is the sequence from its position 0 and must cover every inserted edge; `ids[:start]` must
        already be cached (match and pin it first) and `start` must fall on an edge boundary. Block `i`
        covers the `i`-th edge from `start`, its token dim sized to that edge. An edge that is already
        cached keeps its existing node (its K/V are equal by exactness) and the given tensor is dropped.

        The budget is enforced after inserting. With `pin=True` the returned nodes are pinned first, so
        they survive it; without, a tight budget may evict them at once (their `evicted` flag says so).
        """
        ids = _as_list(ids)
        self._check_phase(phase)
        if not self._is_boundary(start, phase):
            raise CacheError(f"start={start} is not an edge boundary for phase {phase}")
        edges = []
        offset = start
        for i, kv in enumerate(blocks_kv):
            length = self._edge_len(offset, phase)
            if offset + length > len(ids):
                raise CacheError(
                    f"block {i} covers tokens {offset}..{offset + length} but ids has only {len(ids)}"
                )
            if kv.ndim != _KV_NDIM or kv.shape[_TOKEN_DIM] != length:
                raise CacheError(
                    f"block {i} must have shape [num_layers, 2, n_kv_heads, {length}, head_dim], "
                    f"got {list(kv.shape)}"
                )
            edges.append((tuple(ids[offset : offset + length]), kv))
            offset += length
        with self._lock:
            path = self._walk(ids, phase, start)
            if sum(node.num_tokens for node in path) != start:
                raise CacheError(
                    f"the first {start} tokens are not cached; match and pin them before inserting"
                )
            parent = path[-1] if path else self._root(phase)
            inserted = []
            for key, kv in edges:
                child = parent.children.get(key)
                if child is None:
                    _check_layout(kv, parent.kv)
                    child = CacheNode(key, _owned(kv), parent)
                    parent.children[key] = child
                    self._nodes += 1
                    self._bytes += child.nbytes
                    self._inserted_tokens += len(key)
                else:
                    self._duplicate_tokens += len(key)
                inserted.append(child)
                parent = child
            self._touch(path + inserted)
            if pin:
                self._pin(inserted)
            if self._max_bytes is not None:
                self._evict_down_to(self._max_bytes)
            return inserted

    def pin(self, nodes: Iterable[CacheNode]) -> None:
        """Take one reference on each node; a pinned node and its ancestors are never evicted."""
        nodes = list(nodes)
        with self._lock:
            for node in nodes:
                if node.evicted:
                    raise CacheError(f"cannot pin an evicted node: {node!r}")
            self._pin(nodes)

    def unpin(self, nodes: Iterable[CacheNode]) -> None:
        """Drop one reference on each node, then enforce the budget; raises if a count would go below zero."""
        counts = Counter(nodes)
        with self._lock:
            for node, n in counts.items():
                if node.lock_ref < n:
                    raise CacheError(f"unpin without a matching pin: {node!r} released {n} time(s)")
            for node, n in counts.items():
                node.lock_ref -= n
                if node.lock_ref == 0:
                    self._pinned -= 1
            # Content that pins held over budget is evictable now; dropping it here keeps memory bounded.
            if self._max_bytes is not None:
                self._evict_down_to(self._max_bytes)

    def evict(self, num_bytes: int) -> int:
        """Evict unpinned leaves, least recently used first, until `num_bytes` are freed; return bytes freed.

        Frees less when the rest is pinned.
        """
        if num_bytes < 0:
            raise CacheError(f"num_bytes must be non-negative, got {num_bytes}")
        with self._lock:
            before = self._bytes
            self._evict_down_to(self._bytes - num_bytes)
            return before - self._bytes

    def clear(self) -> None:
        """Drop every node that is neither pinned nor an ancestor of a pinned node (not counted as evictions)."""
        with self._lock:
            self._evict_down_to(None, count=False)

    def _reset_counters(self) -> None:
        self._lookups = 0
        self._lookup_tokens = 0
        self._hit_tokens = 0
        self._inserted_tokens = 0
        self._duplicate_tokens = 0
        self._evicted_nodes = 0
        self._evicted_tokens = 0

    def _check_phase(self, phase: int) -> None:
        if not 0 <= phase < self.block_size:
            raise CacheError(f"phase must be in [0, {self.block_size}), got {phase}")

    def _edge_len(self, offset: int, phase: int) -> int:
        return phase if offset == 0 and phase > 0 else self.block_size

    def _is_boundary(self, offset: int, phase: int) -> bool:
        return offset == 0 or (offset >= phase and (offset - phase) % self.block_size == 0)

    def _root(self, phase: int) -> CacheNode:
        root = self._roots.get(phase)
        if root is None:
            root = self._roots[phase] = CacheNode((), None, None)
        return root

    def _walk(self, ids: list[int], phase: int, limit: int) -> list[CacheNode]:
        """Nodes of the longest cached path whose edges all end within `ids[:limit]`."""
        nodes = []
        node = self._roots.get(phase)
        offset = 0
        while node is not None:
            length = self._edge_len(offset, phase)
            if offset + length > limit:
                break
            node = node.children.get(tuple(ids[offset : offset + length]))
            if node is not None:
                nodes.append(node)
                offset += length
        return nodes

    def _touch(self, nodes: list[CacheNode]) -> None:
        # Root-to-leaf order gives descendants later times than ancestors, so LRU never prefers a parent.
        for node in nodes:
            self._clock += 1
            node.last_access = self._clock

    def _pin(self, nodes: list[CacheNode]) -> None:
        for node in nodes:
            if node.lock_ref == 0:
                self._pinned += 1
            node.lock_ref += 1

    def _evict_down_to(self, target_bytes: int | None, count: bool = True) -> None:
        """Evict LRU unpinned leaves until bytes <= target_bytes; None evicts everything evictable."""
        if target_bytes is not None and self._bytes <= target_bytes:
            return
        heap = [
            (node.last_access, id(node), node)
            for node in self._iter_nodes()
            if not node.children and node.lock_ref == 0
        ]
        heapq.heapify(heap)
        while heap and (target_bytes is None or self._bytes > target_bytes):
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            del parent.children[node.key]
            self._bytes -= node.nbytes
            self._nodes -= 1
            if count:
                self._evicted_nodes += 1
                self._evicted_tokens += node.num_tokens
            node.kv = None
            node.evicted = True
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))

    def _iter_nodes(self) -> Iterable[CacheNode]:
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.parent is not None:
                yield node


def _as_list(ids: Sequence[int]) -> list[int]:
    # Tensors must become Python ints: slices of a tensor hash by identity, not by value.
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


def _check_layout(kv: torch.Tensor, parent_kv: torch.Tensor | None) -> None:
    if parent_kv is None:
        return
    shape = kv.shape[:_TOKEN_DIM] + kv.shape[_TOKEN_DIM + 1 :]
    parent_shape = parent_kv.shape[:_TOKEN_DIM] + parent_kv.shape[_TOKEN_DIM + 1 :]
    if shape != parent_shape or kv.dtype != parent_kv.dtype or kv.device != parent_kv.device:
        raise CacheError(
            f"block layout {list(kv.shape)} {kv.dtype} on {kv.device} differs from its parent's "
            f"{list(parent_kv.shape)} {parent_kv.dtype} on {parent_kv.device}"
        )


def _owned(kv: torch.Tensor) -> torch.Tensor:
    # A slice of a larger K/V buffer would keep the whole buffer alive while counting only the slice.
    kv = kv.detach()
    if not kv.is_contiguous() or kv.untyped_storage().nbytes() != kv.numel() * kv.element_size():
        kv = kv.clone(memory_format=torch.contiguous_format)
    return kv
