"""The "adaptive" eviction policy (radixkv/adaptive.py): LRU unless a sampled miniature replay
shows the learned reuse order winning."""

from __future__ import annotations

import random

import pytest
from kvutil import SPEC, blocks_cache, kv_for, prefixes_of, random_operations, serve

from radixkv import POLICIES, PrefixCache
from radixkv.eviction.adaptive import Adaptive

BS = 4


def test_adaptive_is_registered_and_starts_as_lru() -> None:
    cache = blocks_cache(64, "adaptive")
    policy = cache.policy
    assert POLICIES["adaptive"] is Adaptive and isinstance(policy, Adaptive)
    assert not policy.learned and policy.switches == 0
    assert policy.rate == 1.0 and policy.mini_lru.cap == 64  # a small cache is simulated in full


def test_a_large_cache_samples_between_one_and_five_percent_of_blocks() -> None:
    policy = Adaptive()
    policy.bind(160_000)  # 2,560,000 tokens of 16
    assert 0.01 <= policy.rate <= 0.05
    assert policy.mini_lru.cap == round(160_000 * policy.rate)


@pytest.mark.parametrize(
    "kwargs",
    [{"target": 0}, {"target": 1.5}, {"min_rate": 0.0}, {"min_rate": 2.0}, {"margin": -0.1}, {"horizon": 0.0}],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Adaptive(**kwargs)


def test_it_switches_to_the_learned_order_under_floods_and_keeps_the_shared_prefix() -> None:
    """A hot prefix beside long one-off prompts: the learned order keeps the prefix, LRU flushes
    it; the miniatures see that, the policy switches, and the real cache then keeps the prefix."""
    hot = list(range(8 * BS))
    hits = {}
    for eviction in ("lru", "adaptive"):
        cache, nxt, total = blocks_cache(40, eviction), 10_000, 0
        rng = random.Random(0)
        for _ in range(600):
            if rng.random() < 0.5:
                total += serve(cache, [*hot, nxt, nxt + 1, nxt + 2, nxt + 3])
            else:
                total += serve(cache, list(range(nxt, nxt + 24 * BS)))  # 24 blocks, used once
            nxt += 24 * BS + 4
        cache.check_invariants()
        hits[eviction] = total
        if eviction == "adaptive":
            assert cache.policy.learned and cache.policy.switches >= 1
    assert hits["adaptive"] > 1.1 * hits["lru"]


def test_a_switch_rekeys_every_evictable_leaf_before_the_next_eviction() -> None:
    """After the order changes, the evictable list follows the new keys (checked by check_invariants
    and by comparing each listed key with the policy's key now)."""
    cache = blocks_cache(40, "adaptive")
    policy = cache.policy
    for i in range(30):
        ids = list(range(1000 * i, 1000 * i + 5 * BS))
        cache.insert(ids, kv_for(ids))
        with cache.match(ids[: 2 * BS]):
            pass
    policy.learned = True  # as a switch does
    policy.generation += 1
    cache.evict(BS)
    tree = cache._tree
    listed = [(key, uid) for g in tree.groups for key, uid in g.evictable]
    assert listed and all(key == policy.key(tree._evictable_nodes[uid]) for key, uid in listed)
    cache.check_invariants()


def test_random_operations_keep_every_invariant_of_tree_and_policy() -> None:
    """Seeded random matches (some held), inserts, evictions and clears in two namespaces, with
    a policy that may switch often: check_invariants after every step."""
    rng = random.Random("adaptive-stress")
    policy = Adaptive(margin=0.0, sigmas=0.0, horizon=0.5)
    cache = PrefixCache(SPEC, capacity_tokens=30 * BS, block_size=BS, eviction=policy)
    bases = [[rng.randrange(5) for _ in range(10 * BS)] for _ in range(6)]
    draw = prefixes_of(bases, [None, "t"], tail_max=3 * BS)
    random_operations(cache, rng, 3000, draw, evict_max=12 * BS)
    assert cache.stats.evicted_tokens > 0 and policy.switches >= 2


class _ReferenceMiniReuse:
    """The learned miniature's documented semantics, by brute force: on a miss over capacity,
    evict the live block with the smallest (key, hash); remember evicted use counts, oldest
    forgotten first beyond 8x the capacity."""

    def __init__(self, cap: int, offsets: list[float], max_count: int) -> None:
        self.cap, self.offsets, self.max_count = cap, offsets, max_count
        self.blocks: dict[int, tuple[float, int]] = {}
        self.evicted: dict[int, int] = {}

    def run(self, hashes: list[int], now: int, decay: float, hits: float) -> float:
        for h in hashes:
            if h in self.blocks:
                uses = self.blocks[h][1] + 1
                hits = hits * decay + 1.0
            else:
                uses = self.evicted.pop(h, 0) + 1
                hits = hits * decay
            self.blocks[h] = (now + self.offsets[min(uses, self.max_count)], uses)
            if len(self.blocks) > self.cap:
                gone = min(self.blocks, key=lambda g: (self.blocks[g][0], g))
                self.evicted[gone] = self.blocks.pop(gone)[1]
                if len(self.evicted) > 8 * self.cap:
                    del self.evicted[next(iter(self.evicted))]
        return hits


@pytest.mark.parametrize("offsets_kind", ["zero", "rising", "falling", "random"])
def test_the_learned_miniature_evicts_exactly_the_smallest_key(offsets_kind: str) -> None:
    """The miniature's heap skips the push on hits that raise a block's key; its contents, use
    counts and hit counter must still equal a brute-force minimum search at every step, with
    offsets that tie keys (zero), only raise them on a hit (rising), lower them (falling: a hit
    that lowers the key must still be found) or mix both."""
    from radixkv.eviction.adaptive import _MiniReuse
    from radixkv.eviction.reuse_odds import ReuseOdds

    rng = random.Random(7)
    learner = ReuseOdds(max_count=6)
    n = learner.max_count + 1
    learner.offsets = {
        "zero": [0.0] * n,
        "rising": [10.0 * f for f in range(n)],
        "falling": [-25.0 * f for f in range(n)],
        "random": [rng.uniform(-60.0, 60.0) for _ in range(n)],
    }[offsets_kind]
    cap = 24
    mini, ref = _MiniReuse(cap, learner), _ReferenceMiniReuse(cap, learner.offsets, learner.max_count)
    got = want = 0.0
    for now in range(4000):
        run = [rng.randrange(80) for _ in range(rng.randrange(1, 9))]
        got, want = mini.run(run, now, 0.99, got), ref.run(run, now, 0.99, want)
        assert {h: (k, u) for h, (k, u, _) in mini.blocks.items()} == ref.blocks, now
        assert dict(mini.evicted) == ref.evicted and got == pytest.approx(want, abs=1e-9), now
        assert all(heap_key <= key for key, _, heap_key in mini.blocks.values())
    assert len(mini.heap) <= 4 * cap + 16  # rebuilt before it outgrows the live blocks
