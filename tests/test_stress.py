"""Seeded randomized operations against a reference model, with invariants after every step."""

from __future__ import annotations

import random

import pytest
import torch
from kvutil import cached_prefixes, kv_for, make_cache

from radixkv import POLICIES, PrefixMatch
from radixkv.core.hashing import namespace_key

BS = 4
NAMESPACES: list[object] = [None, "tenant-a", ("lora", 7)]


def _prefixes(ns: object, ids: list[int]) -> set[tuple[bytes, tuple[int, ...]]]:
    key = namespace_key(ns)
    return {(key, tuple(ids[: (b + 1) * BS])) for b in range(len(ids) // BS)}


def _longest(content: set[tuple[bytes, tuple[int, ...]]], ns: object, ids: list[int]) -> int:
    key = namespace_key(ns)
    n = 0
    while n + BS <= len(ids) and (key, tuple(ids[: n + BS])) in content:
        n += BS
    return n


def _random_ids(rng: random.Random, bases: list[list[int]]) -> list[int]:
    # Mostly extensions of shared bases (system prompts, chat histories), some fresh prompts.
    if rng.random() < 0.75:
        base = rng.choice(bases)
        ids = base[: rng.randrange(0, len(base) + 1)]
    else:
        ids = []
    return ids + [rng.randrange(6) for _ in range(rng.randrange(0, 14))]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_random_operations_match_the_reference_model_and_keep_every_invariant(policy: str) -> None:
    rng = random.Random(f"stress-{policy}")
    cache = make_cache(capacity_tokens=24 * BS, block_size=BS, eviction=policy)
    bases = [[rng.randrange(6) for _ in range(28)] for _ in range(5)]
    live: list[tuple[PrefixMatch, list[int], int]] = []  # match, query, clear generation
    generation = 0
    steps = 5_000  # x 4 policies = 20,000 operations
    counts = dict.fromkeys(("insert", "match", "release", "evict", "clear"), 0)
    for _ in range(steps):
        before = cached_prefixes(cache)
        evicted_before = cache.stats.evicted_tokens
        op = rng.random()
        ns = rng.choice(NAMESPACES)
        if op < 0.42:
            counts["insert"] += 1
            ids = _random_ids(rng, bases)
            stored = cache.insert(ids, kv_for(ids, ns), namespace=ns, priority=rng.randrange(3))
            after = cached_prefixes(cache)
            added = after - before
            assert added <= _prefixes(ns, ids), "insert stored something it was not given"
            assert len(added) * BS == stored, "insert miscounted what it stored"
            gone = before - after
            assert len(gone) * BS == cache.stats.evicted_tokens - evicted_before
            if not gone and cache.stats.free_tokens > 0:
                assert _prefixes(ns, ids) <= after, "insert dropped blocks while the pool had room"
        elif op < 0.72:
            counts["match"] += 1
            ids = _random_ids(rng, bases)
            m = cache.match(ids, namespace=ns)
            assert m.num_tokens == _longest(before, ns, ids), "match is not the longest cached prefix"
            assert cached_prefixes(cache) == before, "a match changed what is cached"
            if m.num_tokens and rng.random() < 0.3:
                for (gk, gv), (wk, wv) in zip(cache.gather(m), kv_for(ids, ns), strict=True):
                    assert torch.equal(gk, wk[:, :, : m.num_tokens]) and torch.equal(gv, wv[:, :, : m.num_tokens])
            if rng.random() < 0.5 or len(live) > 4:
                cache.release(m)
            else:
                live.append((m, ids, generation))
        elif op < 0.90:
            counts["release"] += 1
            if live:
                m, _, _ = live.pop(rng.randrange(len(live)))
                cache.release(m)
                assert cached_prefixes(cache) == before
        elif op < 0.98:
            counts["evict"] += 1
            want = rng.randrange(0, 40)
            unlocked = sum(len(n.block_ids) for n in cache._tree.iter_nodes() if n.lock_ref == 0)
            got = cache.evict(want)
            after = cached_prefixes(cache)
            assert after <= before and len(before - after) * BS == got
            assert got == min(-(-want // BS), unlocked) * BS, "evict did not free what it could"
        else:
            counts["clear"] += 1
            cache.clear()
            generation += 1
            assert cached_prefixes(cache) == set()
        # Locked prefixes survive everything but a clear.
        content = cached_prefixes(cache)
        for m, ids, gen in live:
            if gen == generation and m.num_tokens:
                assert _prefixes(m.namespace, ids[: m.num_tokens]) <= content, "a locked prefix was evicted"
        cache.check_invariants()
    for m, _, _ in live:
        cache.release(m)
    cache.check_invariants()
    assert cache.stats.locked_tokens == 0
    assert cache.stats.free_tokens + cache.stats.cached_tokens == cache.stats.capacity_tokens
    assert min(counts.values()) > 0, counts
    assert cache.stats.evicted_tokens > 0, "the stress test never reached memory pressure"
