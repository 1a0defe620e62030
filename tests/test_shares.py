"""Fair shares between tenants: PrefixCache(shares={namespace: fraction})."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from kvutil import SPEC, kv_for, random_operations

from radixkv import PrefixCache

BS = 4


def _cache(blocks: int, **kw: object) -> PrefixCache:
    return PrefixCache(SPEC, capacity_tokens=blocks * BS, block_size=BS, **kw)  # type: ignore[arg-type]


def _serve(cache: PrefixCache, ids: list[int], ns: object = None, tenant: object = None) -> tuple[int, int]:
    """One request: match all but the last token, release, store; (hit tokens, query tokens)."""
    with cache.match(ids[:-1], namespace=ns, tenant=tenant) as m:
        hit = m.num_tokens
    cache.insert(ids, kv_for(ids, ns), namespace=ns, tenant=tenant)
    return hit, len(ids) - 1


def _prompt(tag: int, blocks: int) -> list[int]:
    return [tag * 1000 + i for i in range(blocks * BS)]


def _tenant_a(rng: random.Random) -> list[int]:
    """Tenant A: 10 prompts of 4 blocks (40 blocks), the first ones likelier."""
    return _prompt(rng.choices(range(10), weights=[1 / (k + 1) for k in range(10)])[0], 4)


def _a_hit_rate(cache: PrefixCache, with_b: bool, rounds: int = 200) -> float:
    rng = random.Random(7)
    hit = total = 0
    b_next = 0
    for r in range(rounds):
        h, t = _serve(cache, _tenant_a(rng), "A")
        hit, total = hit + h, total + t
        if with_b:
            for _ in range(20):  # B: 20x A's rate, cycling over 50 prompts x 4 blocks = 200 blocks
                _serve(cache, _prompt(100 + b_next % 50, 4), "B")
                b_next += 1
        if r % 20 == 0:
            cache.check_invariants()
    cache.check_invariants()
    return hit / total


def test_a_tenant_with_half_the_cache_keeps_its_hits_beside_a_flooding_tenant() -> None:
    """B cycles over a working set 3x the cache at 20x A's rate. With a 0.5 share, A's hit rate
    stays >= 95% of A alone in a cache of half the size; without shares B flushes A."""
    alone = _a_hit_rate(_cache(32), with_b=False)
    shared = _a_hit_rate(_cache(64, shares={"A": 0.5}), with_b=True)
    unshared = _a_hit_rate(_cache(64), with_b=True)
    assert alone > 0.3
    assert shared >= 0.95 * alone, (shared, alone)
    assert unshared < 0.5 * alone, (unshared, alone)


def test_under_pressure_blocks_go_first_from_tenants_above_their_share() -> None:
    """A (share 0.5 of 16 blocks) holds 4; B holds 12 (above the rest's 8). A's next inserts take
    B's blocks, B's least recently used first, never A's own."""
    cache = _cache(16, shares={"A": 0.5}, eviction="lru")
    a = [_prompt(1, 4)]
    cache.insert(a[0], kv_for(a[0], "A"), namespace="A")
    for t in range(3):
        ids = _prompt(10 + t, 4)
        cache.insert(ids, kv_for(ids, "B"), namespace="B")
    assert cache.stats.free_tokens == 0
    for t in range(2, 4):
        a.append(_prompt(t, 2))
        cache.insert(a[-1], kv_for(a[-1], "A"), namespace="A")
    ns = cache.stats.namespaces
    assert ns["A"].cached_tokens == 8 * BS and ns["B"].cached_tokens == 8 * BS
    for ids in a:
        with cache.match(ids, namespace="A") as m:
            assert m.num_tokens == len(ids)
    with cache.match(_prompt(10, 4), namespace="B") as m:
        assert m.num_tokens == 0  # B's oldest prompt went
    cache.check_invariants()


def test_a_tenant_within_its_share_loses_blocks_only_to_its_own_inserts() -> None:
    """With A exactly at its share and B at the rest, B's insert evicts B's own blocks; when B's
    blocks are all locked, B's insert stores what fits (nothing) rather than take A's."""
    cache = _cache(16, shares={"A": 0.5}, eviction="lru")
    a = _prompt(1, 8)
    cache.insert(a, kv_for(a, "A"), namespace="A")
    b = _prompt(2, 8)
    cache.insert(b, kv_for(b, "B"), namespace="B")
    with cache.match(b, namespace="B"):
        c = _prompt(3, 4)
        assert cache.insert(c, kv_for(c, "B"), namespace="B") == 0
        assert cache.stats.dropped_tokens == 4 * BS
    assert cache.insert(c, kv_for(c, "B"), namespace="B") == 4 * BS  # now B's own blocks go
    with cache.match(a, namespace="A") as m:
        assert m.num_tokens == len(a)
    # A's own insert may evict A's blocks.
    d = _prompt(4, 4)
    assert cache.insert(d, kv_for(d, "A"), namespace="A") == 4 * BS
    assert cache.stats.namespaces["A"].cached_tokens == 8 * BS
    cache.check_invariants()


def test_stats_count_each_tenants_cached_query_and_hit_tokens() -> None:
    cache = _cache(64, shares={"A": 0.25})
    for ns in ("A", "B", ("c", 1)):
        for _ in range(3):
            _serve(cache, _prompt(hash(ns) % 50, 3), ns)
    s = cache.stats
    assert set(s.namespaces) == {"A", "B", ("c", 1)}
    assert sum(n.query_tokens for n in s.namespaces.values()) == s.query_tokens
    assert sum(n.hit_tokens for n in s.namespaces.values()) == s.hit_tokens
    assert sum(n.cached_tokens for n in s.namespaces.values()) == s.cached_tokens
    assert s.namespaces["A"].share_tokens == 16 * BS and s.namespaces["B"].share_tokens is None
    assert s.namespaces["A"].hit_tokens == 2 * 2 * BS and s.namespaces["A"].hit_rate > 0
    assert isinstance(s.as_dict()["namespaces"], dict)
    cache.reset_stats()
    assert all(n.query_tokens == n.hit_tokens == 0 for n in cache.stats.namespaces.values())


def test_a_tenant_keyword_keeps_its_entries_apart_and_counts_against_its_share() -> None:
    """Namespaces ("x" and ("x",)) under tenant "A" count toward A; a namespace used with a tenant
    never shares entries with the same namespace without one, or with a namespace named like it."""
    cache = _cache(32, shares={"A": 0.5})
    ids = _prompt(1, 4)
    for ns in ("x", ("x",)):
        cache.insert(ids, kv_for(ids, ns), namespace=ns, tenant="A")
    assert cache.stats.namespaces["A"].cached_tokens == 8 * BS
    for ns, tenant in ((None, None), ("x", None), ("A", None), (("A", "x"), None)):
        with cache.match(ids, namespace=ns, tenant=tenant) as m:
            assert m.num_tokens == 0, (ns, tenant)
    with cache.match(ids, namespace="x", tenant="A") as m:
        assert m.num_tokens == len(ids)
    cache.check_invariants()


@pytest.mark.parametrize(
    ("shares", "err", "needle"),
    [
        ([("A", 0.5)], TypeError, "shares must be a mapping"),
        ({"A": 0.0}, ValueError, "shares\\['A'\\] must be a fraction"),
        ({"A": 1.5}, ValueError, "shares\\['A'\\] must be a fraction"),
        ({"A": float("nan")}, ValueError, "shares\\['A'\\] must be a fraction"),
        ({"A": True}, ValueError, "shares\\['A'\\] must be a fraction"),
        ({"A": 0.6, "B": 0.5}, ValueError, "shares add up to 1.1"),
        ({1.5: 0.5}, TypeError, "shares key must be"),
    ],
)
def test_bad_shares_raise_naming_the_argument(shares: object, err: type, needle: str) -> None:
    with pytest.raises(err, match=needle):
        _cache(16, shares=shares)


def test_a_bad_tenant_raises_and_changes_nothing() -> None:
    cache = _cache(16, shares={"A": 0.5})
    before = cache.stats
    with pytest.raises(TypeError, match="tenant must be"):
        cache.insert(_prompt(1, 2), kv_for(_prompt(1, 2)), tenant=1.5)
    with pytest.raises(TypeError, match="tenant must be"):
        cache.match(_prompt(1, 2), tenant=[1])
    assert cache.stats == before


def test_random_operations_with_shares_keep_every_invariant() -> None:
    """Seeded random traffic from three tenants (two with shares), held matches, evictions and
    clears: check_invariants (which recounts every tenant's and group's blocks) after each step,
    and a tenant within its share never loses blocks to another tenant's insert."""
    rng = random.Random("shares")
    cache = _cache(40, shares={"A": 0.3, "B": 0.2})

    def draw(rng: random.Random) -> tuple[list[int], object]:
        ns = rng.choice(["A", "B", "C", "C"])
        return _prompt(rng.randrange(12), rng.randrange(1, 6))[: rng.randrange(1, 24)], ns

    def no_blocks_taken_within_a_share(ids: list[int], ns: object, insert: Callable[[], None]) -> None:
        before = {k: v.cached_tokens for k, v in cache.stats.namespaces.items()}
        shares = {"A": 12 * BS, "B": 8 * BS}
        insert()
        after = cache.stats.namespaces
        for other, share in shares.items():
            if other != ns and before.get(other, 0) <= share and other in after:
                assert after[other].cached_tokens >= before.get(other, 0), f"{ns}'s insert took {other}'s blocks"

    random_operations(
        cache, rng, 2500, draw, evict_max=10 * BS, insert_below=0.5, around_insert=no_blocks_taken_within_a_share
    )
    assert cache.stats.evicted_tokens > 0


def test_shares_with_a_host_tier_keep_every_count_exact() -> None:
    """Evictions demote to the host tier and matches promote back from it; the tenants' and
    groups' block counts (rechecked by check_invariants) and counters stay exact."""
    rng = random.Random("shares-host")
    cache = _cache(24, shares={"A": 0.5}, host_capacity_tokens=64 * BS)
    for _ in range(400):
        ns = rng.choice(["A", "B"])
        ids = _prompt(rng.randrange(10), rng.randrange(1, 6))
        _serve(cache, ids, ns)
        cache.check_invariants()
    s = cache.stats
    assert sum(n.cached_tokens for n in s.namespaces.values()) == s.cached_tokens
    assert sum(n.hit_tokens for n in s.namespaces.values()) == s.hit_tokens
    host = cache.tier_stats["host"]
    assert s.evicted_tokens > 0 and host.demoted_tokens > 0 and host.promoted_tokens > 0
