"""The "reuse" eviction policy (radixkv/reuse_odds.py) and its memory of evicted runs (ghost.py)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvutil import SPEC, blocks_cache, cached_prefixes, kv_for, prefixes_of, random_operations, serve

from radixkv import DEFAULT_EVICTION, POLICIES, PrefixCache
from radixkv.core.tree import Node
from radixkv.eviction.ghost import EvictedRuns, checkpoints
from radixkv.eviction.reuse_odds import ReuseOdds, _exponential_mean, _observed_mean

BS = 4


class _Fresh:
    """Distinct token ids: every call gives blocks no earlier prompt had."""

    def __init__(self) -> None:
        self.next = 10_000

    def __call__(self, blocks: int) -> list[int]:
        out = list(range(self.next, self.next + blocks * BS))
        self.next += blocks * BS
        return out


def _depth(node: Node) -> int:
    """How many nodes lie above `node` (its root included)."""
    depth = 0
    while node.parent is not None:
        node, depth = node.parent, depth + 1
    return depth


def _policy(cache: PrefixCache) -> ReuseOdds:
    assert isinstance(cache.policy, ReuseOdds)
    return cache.policy


# ----- registration and arguments -----------------------------------------------------------
def test_reuse_is_registered_and_selected_by_name() -> None:
    """`eviction="reuse"` gives a fresh ReuseOdds per cache."""
    assert POLICIES["reuse"] is ReuseOdds
    a, b = blocks_cache(8, "reuse"), blocks_cache(8, "reuse")
    assert isinstance(a.policy, ReuseOdds) and a.policy is not b.policy


def test_a_cache_built_without_eviction_gets_the_default_policy() -> None:
    """A cache built without `eviction` gets DEFAULT_EVICTION."""
    cache = PrefixCache(SPEC, capacity_tokens=8 * BS, block_size=BS)
    assert isinstance(cache.policy, POLICIES[DEFAULT_EVICTION])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ghost_entries": 0},
        {"max_count": 0},
        {"update_every": True},
        {"window": 0.0},
        {"window": 1.0},
        {"window": "4"},
        {"window": float("inf")},
        {"ghost_entries": 1.5},
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict) -> None:
    """Every size must be a positive int (window a finite number above 1); the message names it."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ReuseOdds(**kwargs)


# ----- behaviour on hand-made sequences ---------------------------------------------------------
def _train_hot_prefix(cache: PrefixCache, hot: list[int], fresh: _Fresh, rounds: int) -> None:
    """A prefix shared by every 4th request, one-off prompts in between (chat-like traffic)."""
    for _ in range(rounds):
        serve(cache, hot + fresh(1))
        for _ in range(3):
            serve(cache, fresh(3))


def test_a_much_reused_prefix_survives_a_flood_of_one_off_prompts_that_flushes_it_under_lru() -> None:
    """The failure this policy exists for: long one-off prompts flush the prefix many requests
    share. Once the policy has seen that one-offs are never reused and the prefix always is, a
    flood of one-offs larger than the whole cache evicts one-offs, not the prefix; LRU loses the
    prefix."""
    hot = list(range(8 * BS))  # 8 blocks
    survived = {}
    for eviction in ("lru", "reuse"):
        cache, fresh = blocks_cache(40, eviction), _Fresh()
        _train_hot_prefix(cache, hot, fresh, rounds=30)
        for _ in range(16):  # 16 prompts x 6 blocks = 96 blocks: 2.4 caches' worth
            serve(cache, fresh(6))
        cache.check_invariants()
        with cache.match(hot) as m:
            survived[eviction] = m.num_tokens
    assert survived == {"lru": 0, "reuse": len(hot)}


def test_a_prefix_that_stops_being_used_ages_out() -> None:
    """It is not a pin: the prefix's advantage is worth a bounded time (a few mean reuse gaps),
    after which a long enough run of new prompts evicts it."""
    hot = list(range(8 * BS))
    cache, fresh = blocks_cache(40, "reuse"), _Fresh()
    _train_hot_prefix(cache, hot, fresh, rounds=30)
    for _ in range(400):
        serve(cache, fresh(6))
    with cache.match(hot) as m:
        assert m.num_tokens == 0


def test_with_no_reuse_seen_yet_the_order_is_exactly_lru() -> None:
    """Before any block is used twice the learned offsets are all zero: the same evictions as LRU."""
    seqs = [list(range(200 * i, 200 * i + n * BS)) for i, n in enumerate([3, 5, 2, 7, 4] * 4)]
    caches = {e: blocks_cache(12, e) for e in ("lru", "reuse")}
    for ids in seqs:
        for cache in caches.values():
            cache.insert(ids, kv_for(ids))
    assert cached_prefixes(caches["lru"]) == cached_prefixes(caches["reuse"])
    assert _policy(caches["reuse"]).offsets == [0.0] * (_policy(caches["reuse"]).max_count + 1)


def test_it_learns_that_blocks_used_twice_are_done_when_sessions_last_two_turns() -> None:
    """Not a built-in love of frequency: when every prompt is used exactly twice, a block used
    once is the likelier to come back, and the learned odds rank it above a block used twice
    (LFU would keep the finished pair)."""
    cache, fresh = blocks_cache(64, "reuse"), _Fresh()
    pending: list[list[int]] = []
    for i in range(400):
        if i % 2 == 0 or not pending:
            ids = fresh(2)
            pending.append(ids)
        else:
            ids = pending.pop(0)
        serve(cache, ids)
    policy = _policy(cache)
    assert policy.offsets[1] > 0 > policy.offsets[2]


def test_an_evicted_prefix_stored_again_resumes_its_use_count_on_a_node_of_its_own() -> None:
    """The ghost remembers how often evicted blocks were used; a prompt that stores them again
    gets a node for them (with the remembered count) and another for its new blocks."""
    cache = blocks_cache(32, "reuse")
    prefix = list(range(6 * BS))
    cache.insert(prefix, kv_for(prefix))
    for _ in range(3):
        cache.release(cache.match(prefix))  # 1 insert + 3 matches = 4 uses
    assert cache.evict(6 * BS) == 6 * BS
    longer = prefix + list(range(500, 500 + 2 * BS))
    cache.insert(longer, kv_for(longer))
    nodes = sorted(cache._tree.iter_nodes(), key=_depth)
    assert [len(n.block_ids) for n in nodes] == [6, 2]
    assert [_policy(cache).uses(n) for n in nodes] == [5, 1]  # 4 remembered + this insert; new
    assert len(_policy(cache).ghost) == 0
    cache.check_invariants()


def test_a_prompt_that_leaves_an_evicted_run_midway_is_credited_only_for_what_it_shares() -> None:
    """Hash chains make agreement on a block imply agreement on every block before it, so the
    checkpoints bound what a diverging prompt shares; blocks after the divergence count as new."""
    cache = blocks_cache(64, "reuse")
    prefix = list(range(16 * BS))
    cache.insert(prefix, kv_for(prefix))
    cache.release(cache.match(prefix))
    cache.evict(16 * BS)
    other = prefix[: 8 * BS] + list(range(900, 900 + 8 * BS))  # shares blocks 1..8 of the run
    cache.insert(other, kv_for(other))
    nodes = sorted(cache._tree.iter_nodes(), key=_depth)
    assert [len(n.block_ids) for n in nodes] == [8, 8]
    assert [_policy(cache).uses(n) for n in nodes] == [3, 1]
    cache.check_invariants()


def test_clear_forgets_evicted_runs_but_keeps_what_was_learned() -> None:
    """`clear` drops the ghost (those blocks are gone) and keeps the traffic statistics."""
    cache, fresh = blocks_cache(40, "reuse"), _Fresh()
    _train_hot_prefix(cache, list(range(8 * BS)), fresh, rounds=20)
    policy = _policy(cache)
    offsets, gap = list(policy.offsets), policy.mean_gap
    assert len(policy.ghost) > 0 and gap > 0
    cache.clear()
    assert len(policy.ghost) == 0 and policy.offsets == offsets and policy.mean_gap == gap
    cache.check_invariants()


# ----- memory bound and invariants ----------------------------------------------------------
def test_the_ghost_never_holds_more_runs_than_its_bound_and_each_entry_is_small() -> None:
    """Memory: at most `ghost_entries` runs, each O(log run length) bytes, however much churns."""
    policy = ReuseOdds(ghost_entries=8)
    cache, fresh = blocks_cache(16, policy), _Fresh()
    for i in range(300):
        serve(cache, fresh(1 + i % 9))
        assert len(policy.ghost) <= 8
    policy.check()
    for entry in policy.ghost._runs.values():
        assert len(entry) <= 32 + 8 * 2 * 4  # header + two checkpoints per bit of a run <= 9 blocks


def test_random_operations_keep_every_invariant_of_tree_and_policy() -> None:
    """Seeded random matches (some held), inserts of shared, evicted-and-returning and fresh
    prompts, evictions and clears, in two namespaces; check_invariants after every step checks
    the tree, the ghost bound and the policy's statistics, and every node's count is sane."""
    rng = random.Random("reuse-stress")
    policy = ReuseOdds(ghost_entries=16, update_every=8)
    cache = PrefixCache(SPEC, capacity_tokens=30 * BS, block_size=BS, eviction=policy)
    bases = [[rng.randrange(5) for _ in range(10 * BS)] for _ in range(6)]
    draw = prefixes_of(bases, [None, "t"], tail_max=3 * BS)

    def counts_are_sane(step: int) -> None:
        for node in cache._tree.iter_nodes():
            assert isinstance(node.policy_state, int) and node.policy_state >= 0, f"step {step}: {node}"

    random_operations(cache, rng, 4000, draw, evict_max=12 * BS, after_step=counts_are_sane)
    assert cache.stats.evicted_tokens > 0 and policy.mean_gap > 0
    assert any(n.policy_state for n in cache._tree.iter_nodes()) or len(policy.ghost) > 0


# ----- the pieces -----------------------------------------------------------------------------
def test_checkpoints_are_sorted_distinct_logarithmic_and_include_both_ends() -> None:
    """Offsets 1, 2, 4, ... and length, length - 1, length - 3, ...: at most 2 per bit."""
    for length in range(1, 300):
        c = checkpoints(length)
        assert c == sorted(set(c)) and c[0] == 1 and c[-1] == length
        assert len(c) <= 2 * length.bit_length()


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 200), shared=st.integers(1, 220), extra=st.integers(0, 30), start=st.integers(0, 5))
def test_shared_finds_the_largest_checkpoint_a_new_chain_verifiably_repeats(
    length: int, shared: int, extra: int, start: int
) -> None:
    """`shared` returns (run length, k): k is the largest checkpoint not past the true agreement
    nor past the new chain's end; it never claims a block that differs."""
    run = [1_000 + i for i in range(length)]
    ghost = EvictedRuns(4)
    ghost.remember(run, uses=2, last_use=5, now=9)
    agree = min(shared, length)
    new = [7] * start + run[:agree] + [5_000 + i for i in range(extra)]
    got = ghost.shared(new, start)
    assert got is not None
    room = len(new) - start
    want = max(c for c in checkpoints(length) if c <= min(agree, room))
    assert got == (length, want)


def test_expire_and_take_forget_runs() -> None:
    """Old runs expire from the old end; take removes a run and returns its record."""
    ghost = EvictedRuns(10)
    for i in range(5):
        ghost.remember([100 * i, 100 * i + 1], uses=i + 1, last_use=10 * i, now=10 * i + 1)
    ghost.expire(last_use_before=25)
    assert [r.last_use for r in ghost.entries()] == [30, 40]
    run = ghost.take(300)
    assert run is not None and (run.uses, run.length, run.evicted_at) == (4, 2, 31)
    assert ghost.take(300) is None and len(ghost) == 1


@pytest.mark.parametrize("mean", [3.0, 50.0, 900.0, 5000.0])
@pytest.mark.parametrize("span", [1000.0, 20000.0])
def test_the_mean_gap_fit_undoes_the_young_cache_bias(mean: float, span: float) -> None:
    """`_observed_mean` is what a cache `span` ticks old sees of exponential gaps of mean `mean`;
    `_exponential_mean` recovers `mean` from it (capped at 4 spans), and long spans need no fix."""
    seen = _observed_mean(mean, span)
    assert seen <= mean
    assert _exponential_mean(seen, span) == pytest.approx(min(mean, 4 * span), rel=1e-6)
    assert _observed_mean(mean, 1e9) == pytest.approx(mean, rel=1e-5)
