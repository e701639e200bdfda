"""Specification of the prefix cache: block-edged radix tree, phases, pins, LRU eviction under a byte budget."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from runtime.errors import CacheError, RuntimeErrorBase
from runtime.kvcache import CacheStats, PrefixCache

B = 32
BLOCK_BYTES = 2 * 2 * 1 * B * 4 * 4  # [layers, k/v, heads, tokens, head_dim] float32


def block(value: float, length: int = B) -> torch.Tensor:
    """A fake block of K/V whose every entry identifies it."""
    return torch.full((2, 2, 1, length, 4), float(value))


def seq(*block_values: int) -> list[int]:
    """Token ids made of whole blocks, block i filled with token block_values[i]."""
    return [v for v in block_values for _ in range(B)]


def fill(cache: PrefixCache, ids: list[int], phase: int = 0, first_value: int = 0, **kwargs):
    """Insert every complete edge of `ids` from token 0, block i valued first_value + i."""
    edges = ([phase] if phase else []) + [B] * ((len(ids) - phase) // B)
    return cache.insert(ids, [block(first_value + i, n) for i, n in enumerate(edges)], phase=phase, **kwargs)


# --- matching ---------------------------------------------------------------------------------------------


def test_match_on_empty_cache_returns_no_nodes_and_no_kv():
    match = PrefixCache().match(seq(1, 2))
    assert match.nodes == ()
    assert match.num_tokens == 0
    assert match.kv() is None


def test_match_of_inserted_sequence_returns_all_its_blocks():
    cache = PrefixCache()
    ids = seq(1, 2, 3)
    fill(cache, ids)
    match = cache.match(ids)
    assert match.num_tokens == 3 * B
    assert len(match.nodes) == 3


def test_match_of_longer_sequence_returns_the_cached_prefix():
    cache = PrefixCache()
    fill(cache, seq(1, 2))
    assert cache.match(seq(1, 2, 3, 4)).num_tokens == 2 * B


def test_divergence_inside_a_block_shares_only_the_whole_blocks_before_it():
    cache = PrefixCache()
    ids = seq(1, 2, 3)
    fill(cache, ids)
    diverging = list(ids)
    diverging[B + 5] = 99
    assert cache.match(diverging).num_tokens == B


def test_partial_trailing_block_is_never_matched():
    cache = PrefixCache()
    ids = seq(1, 2)
    fill(cache, ids)
    assert cache.match(ids[: 2 * B - 1]).num_tokens == B
    assert cache.match(ids[:5]).num_tokens == 0


def test_cached_tokens_counts_the_cached_prefix_without_touching_lru_or_stats():
    cache = PrefixCache(max_bytes=2 * BLOCK_BYTES)
    fill(cache, seq(1))
    fill(cache, seq(2))
    assert cache.cached_tokens(seq(1, 3)) == B
    fill(cache, seq(3))
    assert cache.cached_tokens(seq(1)) == 0
    assert cache.stats.lookups == 0


def test_match_accepts_a_tensor_of_ids():
    cache = PrefixCache()
    fill(cache, seq(1, 2))
    assert cache.match(torch.tensor(seq(1, 2))).num_tokens == 2 * B


def test_kv_is_the_inserted_blocks_concatenated_in_order():
    cache = PrefixCache()
    ids = seq(1, 2, 3)
    fill(cache, ids, first_value=10)
    kv = cache.match(ids).kv()
    assert kv.shape == (2, 2, 1, 3 * B, 4)
    assert torch.equal(kv, torch.cat([block(10), block(11), block(12)], dim=3))


# --- phases -----------------------------------------------------------------------------------------------


def test_first_edge_of_a_phased_sequence_is_phase_tokens_long():
    cache = PrefixCache()
    ids = list(range(7 + 2 * B))
    nodes = fill(cache, ids, phase=7)
    assert [node.num_tokens for node in nodes] == [7, B, B]
    assert cache.match(ids, phase=7).num_tokens == 7 + 2 * B
    assert cache.match(ids[: 7 + B - 1], phase=7).num_tokens == 7


def test_sequences_with_different_phases_never_share_nodes():
    cache = PrefixCache()
    ids = seq(1, 2, 3)
    fill(cache, ids, phase=0)
    assert cache.match(ids, phase=5).num_tokens == 0
    fill(cache, ids, phase=5, first_value=50)
    assert torch.equal(cache.match(ids, phase=0).kv()[..., :B, :], block(0))
    assert torch.equal(cache.match(ids, phase=5).kv()[..., :5, :], block(50, 5))


def test_phase_outside_a_block_is_rejected():
    cache = PrefixCache()
    with pytest.raises(CacheError):
        cache.match(seq(1), phase=B)
    with pytest.raises(CacheError):
        cache.match(seq(1), phase=-1)


# --- inserting --------------------------------------------------------------------------------------------


def test_insert_after_a_matched_prefix_extends_it():
    cache = PrefixCache()
    fill(cache, seq(1, 2))
    ids = seq(1, 2, 3, 4)
    match = cache.match(ids)
    new = cache.insert(ids, [block(7), block(8)], start=match.num_tokens)
    assert [node.num_tokens for node in new] == [B, B]
    assert torch.equal(cache.match(ids).kv()[..., 2 * B :, :], torch.cat([block(7), block(8)], dim=3))


def test_insert_of_existing_blocks_keeps_the_existing_nodes():
    cache = PrefixCache()
    ids = seq(1, 2)
    first = fill(cache, ids, first_value=0)
    second = fill(cache, ids, first_value=100)
    assert [a is b for a, b in zip(first, second)] == [True, True]
    assert cache.stats.nodes == 2
    assert cache.stats.bytes == 2 * BLOCK_BYTES
    assert torch.equal(cache.match(ids).kv(), torch.cat([block(0), block(1)], dim=3))


def test_insert_stores_a_compact_copy_of_a_view_into_a_larger_buffer():
    cache = PrefixCache()
    buffer = torch.zeros(2, 2, 1, 4 * B, 4)
    (node,) = cache.insert(seq(1), [buffer[:, :, :, :B]])
    assert node.kv.untyped_storage().nbytes() == BLOCK_BYTES


def test_insert_after_an_uncached_prefix_is_rejected():
    cache = PrefixCache()
    with pytest.raises(CacheError, match="not cached"):
        cache.insert(seq(1, 2), [block(1)], start=B)


def test_insert_at_a_start_off_the_edge_boundaries_is_rejected():
    cache = PrefixCache()
    fill(cache, seq(1, 2))
    with pytest.raises(CacheError, match="boundary"):
        cache.insert(seq(1, 2, 3), [block(1)], start=B + 1)


def test_insert_of_a_block_with_the_wrong_token_length_is_rejected():
    cache = PrefixCache()
    with pytest.raises(CacheError, match="shape"):
        cache.insert(seq(1), [block(1, B - 1)])


def test_insert_of_blocks_beyond_the_ids_is_rejected():
    cache = PrefixCache()
    with pytest.raises(CacheError, match="covers tokens"):
        cache.insert(seq(1), [block(1), block(2)])
    assert cache.stats.nodes == 0


def test_insert_of_a_block_whose_layout_differs_from_its_parent_is_rejected():
    cache = PrefixCache()
    fill(cache, seq(1))
    with pytest.raises(CacheError, match="layout"):
        cache.insert(seq(1, 2), [torch.zeros(3, 2, 1, B, 4)], start=B)


def test_cache_errors_are_runtime_errors():
    assert issubclass(CacheError, RuntimeErrorBase)


# --- pins and eviction ------------------------------------------------------------------------------------


def test_eviction_removes_least_recently_used_leaves_first():
    cache = PrefixCache(max_bytes=3 * BLOCK_BYTES)
    fill(cache, seq(1))
    fill(cache, seq(2))
    fill(cache, seq(3))
    cache.match(seq(1))
    fill(cache, seq(4))
    assert [cache.match(seq(v)).num_tokens for v in (1, 2, 3, 4)] == [B, 0, B, B]
    assert cache.stats.evicted_nodes == 1


def test_eviction_walks_up_a_branch_once_its_leaf_is_gone():
    cache = PrefixCache(max_bytes=3 * BLOCK_BYTES)
    fill(cache, seq(1, 2))
    fill(cache, seq(3))
    fill(cache, seq(4, 5))
    assert cache.match(seq(1, 2)).num_tokens == 0
    assert cache.match(seq(3)).num_tokens == B
    assert cache.stats.bytes == 3 * BLOCK_BYTES


def test_pinned_nodes_and_their_ancestors_survive_eviction():
    cache = PrefixCache(max_bytes=4 * BLOCK_BYTES)
    nodes = fill(cache, seq(1, 2, 3))
    cache.pin(nodes[-1:])
    fill(cache, seq(4, 5))
    assert cache.match(seq(1, 2, 3)).num_tokens == 3 * B
    assert cache.match(seq(4, 5)).num_tokens == B


def test_explicit_evict_frees_at_least_the_bytes_asked_and_reports_them():
    cache = PrefixCache()
    fill(cache, seq(1, 2, 3))
    assert cache.evict(BLOCK_BYTES + 1) == 2 * BLOCK_BYTES
    assert cache.match(seq(1, 2, 3)).num_tokens == B


def test_everything_pinned_stays_and_reports_over_budget():
    cache = PrefixCache(max_bytes=BLOCK_BYTES)
    fill(cache, seq(1, 2, 3), pin=True)
    stats = cache.stats
    assert stats.bytes == 3 * BLOCK_BYTES
    assert stats.over_budget_bytes == 2 * BLOCK_BYTES
    assert stats.evicted_nodes == 0


def test_insert_with_pin_protects_new_blocks_from_the_budget_it_triggers():
    cache = PrefixCache(max_bytes=BLOCK_BYTES)
    (old,) = fill(cache, seq(1))
    (new,) = fill(cache, seq(2), pin=True)
    assert old.evicted and not new.evicted
    assert new.lock_ref == 1


def test_unpin_evicts_what_pins_held_over_budget():
    cache = PrefixCache(max_bytes=BLOCK_BYTES)
    nodes = fill(cache, seq(1, 2, 3), pin=True)
    cache.unpin(nodes)
    assert cache.stats.bytes == BLOCK_BYTES
    assert cache.match(seq(1, 2, 3)).num_tokens == B


def test_unpinned_insert_beyond_a_tight_budget_is_evicted_at_once():
    cache = PrefixCache(max_bytes=0)
    (node,) = fill(cache, seq(1))
    assert node.evicted
    assert cache.stats.bytes == 0


def test_unpin_releases_a_node_for_eviction():
    cache = PrefixCache()
    nodes = fill(cache, seq(1))
    cache.pin(nodes)
    cache.pin(nodes)
    cache.unpin(nodes)
    assert cache.evict(BLOCK_BYTES) == 0
    cache.unpin(nodes)
    assert cache.evict(BLOCK_BYTES) == BLOCK_BYTES


def test_unpin_below_zero_is_an_error_and_changes_nothing():
    cache = PrefixCache()
    nodes = fill(cache, seq(1, 2))
    cache.pin(nodes[:1])
    with pytest.raises(CacheError, match="without a matching pin"):
        cache.unpin(nodes)
    assert nodes[0].lock_ref == 1
    assert cache.stats.pinned_nodes == 1


def test_pinning_an_evicted_node_is_an_error():
    cache = PrefixCache()
    nodes = fill(cache, seq(1))
    cache.clear()
    with pytest.raises(CacheError, match="evicted"):
        cache.pin(nodes)


def test_kv_of_a_match_whose_nodes_were_evicted_is_an_error():
    cache = PrefixCache()
    fill(cache, seq(1))
    match = cache.match(seq(1))
    cache.clear()
    with pytest.raises(CacheError, match="pin the match"):
        match.kv()


def test_clear_keeps_pinned_nodes_and_their_ancestors_only():
    cache = PrefixCache()
    nodes = fill(cache, seq(1, 2, 3))
    fill(cache, seq(4))
    cache.pin(nodes[1:2])
    cache.clear()
    assert cache.match(seq(1, 2, 3)).num_tokens == 2 * B
    assert cache.match(seq(4)).num_tokens == 0
    assert cache.stats.nodes == 2
    assert cache.stats.evicted_nodes == 0


def test_negative_sizes_are_rejected():
    with pytest.raises(CacheError):
        PrefixCache(max_bytes=-1)
    with pytest.raises(CacheError):
        PrefixCache(block_size=0)
    with pytest.raises(CacheError):
        PrefixCache().evict(-1)


# --- stats ------------------------------------------------------------------------------------------------


def test_stats_count_lookups_hits_inserts_duplicates_and_evictions():
    cache = PrefixCache(max_bytes=3 * BLOCK_BYTES)
    fill(cache, seq(1, 2))
    fill(cache, seq(1, 2, 3))
    cache.match(seq(1, 2, 9) + [0] * 5)
    fill(cache, seq(4))
    assert cache.stats == CacheStats(
        lookups=1,
        lookup_tokens=3 * B + 5,
        hit_tokens=2 * B,
        inserted_tokens=4 * B,
        duplicate_tokens=2 * B,
        evicted_nodes=1,
        evicted_tokens=B,
        bytes=3 * BLOCK_BYTES,
        nodes=3,
        pinned_nodes=0,
        max_bytes=3 * BLOCK_BYTES,
    )
    assert cache.stats.miss_tokens == B + 5


def test_reset_stats_zeroes_counters_and_keeps_sizes():
    cache = PrefixCache()
    fill(cache, seq(1), pin=True)
    cache.match(seq(1))
    cache.reset_stats()
    stats = cache.stats
    assert (stats.lookups, stats.hit_tokens, stats.inserted_tokens) == (0, 0, 0)
    assert (stats.bytes, stats.nodes, stats.pinned_nodes) == (BLOCK_BYTES, 1, 1)


def test_stats_read_from_another_thread_are_consistent_snapshots():
    cache = PrefixCache(max_bytes=8 * BLOCK_BYTES)
    snapshots: list[CacheStats] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            snapshots.append(cache.stats)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(200):
            fill(cache, seq(i, i + 1))
    finally:
        done.set()
        reader.join()
    assert all(s.bytes == s.nodes * BLOCK_BYTES <= 8 * BLOCK_BYTES for s in snapshots)


# --- property: the cache behaves like a plain dict of block prefixes under LRU ----------------------------

P_BLOCK = 4
TOKEN_BYTES = 2 * 2 * 1 * 2 * 4  # a [2, 2, 1, tokens, 2] float32 block costs this per token
P_BUDGET = 3 * P_BLOCK * TOKEN_BYTES

# Sequences built from a few whole chunks so that they often share, extend and diverge from each other.
CHUNKS = [(0, 0, 0, 0), (0, 1, 0, 1), (1, 1, 1, 1)]
ids_strategy = st.builds(
    lambda chunks, tail: [t for chunk in chunks for t in chunk] + tail,
    st.lists(st.sampled_from(CHUNKS), max_size=3),
    st.lists(st.integers(0, 1), max_size=3),
)
phase_strategy = st.integers(0, P_BLOCK - 1)
# Pins are taken rarely: a budget full of pinned blocks would leave LRU order nothing to decide.
rarely = st.sampled_from([False, False, False, True])


def p_block(value: int, length: int) -> torch.Tensor:
    return torch.full((2, 2, 1, length, 2), float(value))


def edges_of(ids: list[int], phase: int) -> list[tuple[int, ...]]:
    """The complete edges of `ids` under `phase`, as the reference model cuts them."""
    bounds = [0] + ([phase] if phase else [])
    while bounds[-1] + P_BLOCK <= len(ids):
        bounds.append(bounds[-1] + P_BLOCK)
    if bounds[-1] > len(ids):
        bounds.pop()
    return [tuple(ids[a:b]) for a, b in itertools.pairwise(bounds)]


class ReferenceCache:
    """Entries keyed by (phase, tuple of edges): value, last access, pins; LRU over unpinned leaves."""

    def __init__(self) -> None:
        self.entries: dict[tuple, dict] = {}
        self.clock = 0

    def path(self, ids: list[int], phase: int) -> list[tuple]:
        edges = edges_of(ids, phase)
        keys = []
        for k in range(1, len(edges) + 1):
            key = (phase, tuple(edges[:k]))
            if key not in self.entries:
                break
            keys.append(key)
        return keys

    def touch(self, keys: list[tuple]) -> None:
        for key in keys:
            self.clock += 1
            self.entries[key]["last"] = self.clock

    def nbytes(self) -> int:
        return sum(len(key[1][-1]) * TOKEN_BYTES for key in self.entries)

    def evictable_leaves(self) -> list[tuple]:
        parents = {(key[0], key[1][:-1]) for key in self.entries}
        return [key for key, e in self.entries.items() if key not in parents and e["pins"] == 0]

    def evict_down_to(self, target: int | None) -> None:
        while target is None or self.nbytes() > target:
            leaves = self.evictable_leaves()
            if not leaves:
                return
            del self.entries[min(leaves, key=lambda key: self.entries[key]["last"])]


class CacheMachine(RuleBasedStateMachine):
    sequences = Bundle("sequences")

    @initialize()
    def setup(self) -> None:
        self.cache = PrefixCache(block_size=P_BLOCK, max_bytes=P_BUDGET)
        self.ref = ReferenceCache()
        self.held: list[tuple[list, list[tuple]]] = []
        self.next_value = 1

    def check_match(self, ids: list[int], phase: int):
        match = self.cache.match(ids, phase)
        keys = self.ref.path(ids, phase)
        self.ref.touch(keys)
        assert match.num_tokens == sum(len(key[1][-1]) for key in keys)
        if keys:
            expected = [p_block(self.ref.entries[key]["value"], len(key[1][-1])) for key in keys]
            assert torch.equal(match.kv(), torch.cat(expected, dim=3))
        else:
            assert match.kv() is None
        return match, keys

    def insert_like_the_engine(self, ids: list[int], phase: int, from_zero: bool, pin: bool) -> tuple:
        """Match, then insert the remaining complete edges (from token 0 when `from_zero`, racing a twin)."""
        match, prefix = self.check_match(ids, phase)
        edges = edges_of(ids, phase)
        first = 0 if from_zero else len(prefix)
        blocks = []
        keys = []
        for k in range(first, len(edges)):
            key = (phase, tuple(edges[: k + 1]))
            blocks.append(p_block(self.next_value, len(edges[k])))
            self.ref.entries.setdefault(key, {"value": self.next_value, "last": 0, "pins": 0})
            self.next_value += 1
            keys.append(key)
        start = 0 if from_zero else match.num_tokens
        nodes = self.cache.insert(ids, blocks, start=start, phase=phase, pin=pin)
        self.ref.touch(([] if from_zero else prefix) + keys)
        if pin:
            for key in keys:
                self.ref.entries[key]["pins"] += 1
            self.held.append((nodes, keys))
        self.ref.evict_down_to(P_BUDGET)
        return ids, phase

    @rule(target=sequences, ids=ids_strategy, phase=phase_strategy, from_zero=st.booleans(), pin=rarely)
    def insert(self, ids: list[int], phase: int, from_zero: bool, pin: bool) -> tuple:
        return self.insert_like_the_engine(ids, phase, from_zero, pin)

    @rule(target=sequences, known=sequences, tail=ids_strategy, from_zero=st.booleans(), pin=rarely)
    def extend(self, known: tuple, tail: list[int], from_zero: bool, pin: bool) -> tuple:
        ids, phase = known
        return self.insert_like_the_engine(ids + tail, phase, from_zero, pin)

    @rule(known=sequences, cut=st.integers(0, 15))
    def match_known(self, known: tuple, cut: int) -> None:
        ids, phase = known
        self.check_match(ids[:cut], phase)

    @rule(ids=ids_strategy, phase=phase_strategy)
    def match_any(self, ids: list[int], phase: int) -> None:
        self.check_match(ids, phase)

    @rule(known=sequences, cut=st.integers(0, 15))
    def pin(self, known: tuple, cut: int) -> None:
        ids, phase = known
        match, keys = self.check_match(ids[:cut], phase)
        self.cache.pin(match.nodes)
        for key in keys:
            self.ref.entries[key]["pins"] += 1
        self.held.append((list(match.nodes), keys))

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 100))
    def unpin(self, index: int) -> None:
        nodes, keys = self.held.pop(index % len(self.held))
        self.cache.unpin(nodes)
        for key in keys:
            self.ref.entries[key]["pins"] -= 1
        self.ref.evict_down_to(P_BUDGET)

    @rule(num_bytes=st.integers(0, P_BUDGET))
    def evict(self, num_bytes: int) -> None:
        before = self.ref.nbytes()
        self.ref.evict_down_to(before - num_bytes)
        assert self.cache.evict(num_bytes) == before - self.ref.nbytes()

    @rule()
    def clear(self) -> None:
        self.cache.clear()
        self.ref.evict_down_to(None)

    @invariant()
    def sizes_agree_with_the_reference(self) -> None:
        stats = self.cache.stats
        assert stats.bytes == self.ref.nbytes()
        assert stats.nodes == len(self.ref.entries)
        assert stats.pinned_nodes == sum(e["pins"] > 0 for e in self.ref.entries.values())

    @invariant()
    def cached_prefixes_are_the_references(self) -> None:
        for phase, edges in self.ref.entries:
            ids = [t for edge in edges for t in edge]
            assert self.cache.cached_tokens(ids, phase) == len(ids)

    @invariant()
    def budget_holds_except_for_pinned_content(self) -> None:
        assert self.cache.stats.bytes <= P_BUDGET or not self.ref.evictable_leaves()


CacheMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, derandomize=True
)
test_cache_behaves_like_the_reference_model = CacheMachine.TestCase
