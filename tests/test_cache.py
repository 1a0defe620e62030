"""One test per rule of the PrefixCache contract (CPU, milliseconds each)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash
from kvutil import SPEC, cache_holding, kv_for, make_cache

from radixkv import KVSpec, PrefixCache


def test_bytes_per_token_is_two_times_layers_heads_dim_element_size() -> None:
    assert KVSpec(32, 32, 128, dtype=torch.float16).bytes_per_token == 524_288
    assert KVSpec(80, 8, 128, dtype=torch.bfloat16).bytes_per_token == 327_680
    assert KVSpec(2, 2, 4, dtype=torch.float32).bytes_per_token == 2 * 2 * 2 * 4 * 4


def test_pool_is_preallocated_for_the_whole_capacity_in_whole_blocks() -> None:
    cache = make_cache(capacity_tokens=50, block_size=4)  # rounds down to 12 blocks
    assert cache.stats.capacity_tokens == 48
    assert cache.stats.free_tokens == 48
    assert cache.stats.capacity_bytes == 48 * SPEC.bytes_per_token
    by_bytes = PrefixCache(SPEC, capacity_bytes=48 * SPEC.bytes_per_token + 7, block_size=4)
    assert by_bytes.stats.capacity_tokens == 48


def test_match_returns_the_longest_cached_whole_block_prefix() -> None:
    cache = make_cache()
    ids = list(range(10))
    assert cache.insert(ids, kv_for(ids)) == 8
    with cache.match([*range(7), 99, 99]) as m:
        assert m.num_tokens == 4  # block 2 differs at token 7
        assert len(m.block_ids) == len(m.block_hashes) == 1
    with cache.match(list(range(12))) as m:
        assert m.num_tokens == 8
    with cache.match(list(range(3))) as m:
        assert m.num_tokens == 0 and m.block_ids == ()


def test_match_accepts_lists_tuples_tensors_and_arrays_alike() -> None:
    cache, ids = cache_holding(9)
    for form in (ids, tuple(ids), torch.tensor(ids), torch.tensor(ids, dtype=torch.int32), np.array(ids)):
        with cache.match(form) as m:
            assert m.num_tokens == 8, type(form)


def test_gather_equals_inserted_kv_bit_for_bit_also_after_a_split() -> None:
    cache = make_cache()
    a = list(range(16))
    cache.insert(a, kv_for(a))
    b = [*range(8), 50, 51, 52, 53]
    cache.insert(b, kv_for(b))  # splits a's node after two blocks
    for ids in (a, b, a[:12]):
        with cache.match(ids) as m:
            got = cache.gather(m)
            want = kv_for(ids)
            n = m.num_tokens
            assert n == len(ids) // 4 * 4
            for (gk, gv), (wk, wv) in zip(got, want, strict=True):
                assert gk.shape == (1, SPEC.num_kv_heads, n, SPEC.head_dim)
                assert torch.equal(gk, wk[:, :, :n]) and torch.equal(gv, wv[:, :, :n])
    cache.check_invariants()


def test_gather_returns_fresh_tensors_that_callers_may_modify() -> None:
    cache, ids = cache_holding(8)
    with cache.match(ids) as m:
        first = cache.gather(m)
        first[0][0].fill_(-1.0)
        again = cache.gather(m)
    assert torch.equal(again[0][0], kv_for(ids)[0][0])


def test_insert_reuses_cached_blocks_and_never_rewrites_them() -> None:
    cache, ids = cache_holding(8)
    other_kv = [(k + 1, v + 1) for k, v in kv_for(ids)]
    assert cache.insert(ids, other_kv) == 0
    longer = list(range(12))
    assert cache.insert(longer, kv_for(longer)) == 4  # only the new block is stored
    with cache.match(longer) as m:
        assert torch.equal(cache.gather(m)[1][1], kv_for(longer)[1][1])


def test_insert_stores_only_whole_blocks_and_returns_the_new_token_count() -> None:
    cache = make_cache(block_size=4)
    assert cache.insert([1, 2, 3], kv_for([1, 2, 3])) == 0
    ids = list(range(11))
    assert cache.insert(ids, kv_for(ids)) == 8
    assert cache.stats.cached_tokens == 8 and cache.stats.inserted_tokens == 8


def test_matched_blocks_are_locked_until_released() -> None:
    cache, ids = cache_holding(8)
    m = cache.match(ids)
    assert cache.stats.locked_tokens == 8
    assert cache.evict(1000) == 0
    assert cache.stats.cached_tokens == 8
    cache.release(m)
    assert cache.stats.locked_tokens == 0
    assert cache.evict(1000) == 8


def test_a_match_used_as_context_manager_releases_on_exit_even_on_error() -> None:
    cache, ids = cache_holding(8)
    with pytest.raises(KeyError), cache.match(ids) as m:
        raise KeyError("boom")
    assert m.released and cache.stats.locked_tokens == 0 and cache.stats.live_matches == 0


def test_releasing_twice_is_an_error_not_a_double_decrement() -> None:
    cache, ids = cache_holding(8)
    keep = cache.match(ids)
    m = cache.match(ids)
    cache.release(m)
    with pytest.raises(ValueError, match="already released"):
        cache.release(m)
    assert cache.stats.locked_tokens == 8  # `keep` still holds its lock
    cache.check_invariants()
    cache.release(keep)


def test_a_match_from_another_cache_is_rejected() -> None:
    a, b = make_cache(), make_cache()
    ids = list(range(8))
    a.insert(ids, kv_for(ids))
    m = a.match(ids)
    with pytest.raises(ValueError, match="another PrefixCache"):
        b.release(m)
    with pytest.raises(ValueError, match="another PrefixCache"):
        b.gather(m)
    with pytest.raises(TypeError, match="PrefixMatch"):
        b.release("not a match")  # type: ignore[arg-type]
    a.release(m)


def test_a_released_match_cannot_be_gathered() -> None:
    cache, ids = cache_holding(8)
    m = cache.match(ids)
    cache.release(m)
    with pytest.raises(ValueError, match="already released"):
        cache.gather(m)


def test_a_full_pool_stores_the_prefix_that_fits_and_never_raises() -> None:
    cache = make_cache(capacity_tokens=16, block_size=4)  # 4 blocks
    a = list(range(8))
    cache.insert(a, kv_for(a))
    held = cache.match(a)  # locks 2 blocks
    b = list(range(100, 116))  # 4 blocks wanted, 2 free
    assert cache.insert(b, kv_for(b)) == 8
    with cache.match(b) as m:
        assert m.num_tokens == 8
        assert torch.equal(cache.gather(m)[0][0], kv_for(b)[0][0][:, :, :8])
    c = list(range(200, 208))
    held_b = cache.match(b)
    assert cache.insert(c, kv_for(c)) == 0  # everything is locked
    assert cache.stats.cached_tokens == 16
    cache.release(held)
    cache.release(held_b)
    assert cache.insert(c, kv_for(c)) == 8
    cache.check_invariants()


def _fill(cache: PrefixCache, *seqs: list[int], priority: int = 0) -> None:
    for s in seqs:
        cache.insert(s, kv_for(s), priority=priority)


def test_lru_evicts_the_least_recently_used_leaf_first() -> None:
    cache = make_cache(capacity_tokens=64, eviction="lru")
    a, b, c = [1] * 8, [2] * 8, [3] * 8
    _fill(cache, a, b, c)
    cache.release(cache.match(a))  # a is now the most recent
    cache.evict(8)
    assert cache.match(b).num_tokens == 0
    assert cache.match(a).num_tokens == 8 and cache.match(c).num_tokens == 8


def test_fifo_evicts_the_oldest_insert_first_whatever_its_use() -> None:
    cache = make_cache(capacity_tokens=64, eviction="fifo")
    a, b = [1] * 8, [2] * 8
    _fill(cache, a, b)
    cache.release(cache.match(a))
    cache.evict(8)
    assert cache.match(a).num_tokens == 0 and cache.match(b).num_tokens == 8


def test_lfu_evicts_the_least_matched_leaf_first() -> None:
    cache = make_cache(capacity_tokens=64, eviction="lfu")
    a, b = [1] * 8, [2] * 8
    _fill(cache, a, b)
    for _ in range(3):
        cache.release(cache.match(a))
    cache.release(cache.match(b))  # b is more recent but used less
    cache.evict(8)
    assert cache.match(b).num_tokens == 0 and cache.match(a).num_tokens == 8


def test_priority_evicts_the_lowest_priority_first_then_by_recency() -> None:
    cache = make_cache(capacity_tokens=64, eviction="priority")
    hi, lo1, lo2 = [1] * 8, [2] * 8, [3] * 8
    _fill(cache, hi, priority=5)
    _fill(cache, lo1, lo2, priority=0)
    cache.release(cache.match(lo1))
    cache.evict(8)
    assert cache.match(lo2).num_tokens == 0
    cache.evict(8)
    assert cache.match(lo1).num_tokens == 0 and cache.match(hi).num_tokens == 8


def test_eviction_removes_tail_blocks_before_head_blocks() -> None:
    cache, ids = cache_holding(12)
    assert cache.evict(1) == 4  # one whole block
    with cache.match(ids) as m:
        assert m.num_tokens == 8
        assert torch.equal(cache.gather(m)[0][1], kv_for(ids)[0][1][:, :, :8])


def test_a_parent_becomes_evictable_when_its_last_child_goes() -> None:
    cache = make_cache()
    a, b = [*range(8), 1, 1, 1, 1], [*range(8), 2, 2, 2, 2]
    _fill(cache, a, b)  # shared parent of 2 blocks, two 1-block leaves
    assert cache.stats.num_nodes == 3
    assert cache.evict(8) == 8  # both leaves
    assert cache.stats.num_nodes == 1
    assert cache.evict(8) == 8  # then the parent
    assert cache.stats.cached_tokens == 0 and cache.stats.num_nodes == 0
    cache.check_invariants()


def test_evict_zero_does_nothing_and_eviction_rounds_up_to_whole_blocks() -> None:
    cache, _ = cache_holding(16)
    assert cache.evict(0) == 0 and cache.stats.cached_tokens == 16
    assert cache.evict(5) == 8
    assert cache.stats.evicted_tokens == 8


def test_namespaces_never_share_nodes_or_blocks_and_keys_are_structured() -> None:
    cache = make_cache()
    ids = list(range(8))
    spaces: list[object] = [None, "a|b", ("a", "b"), ("a|b",), "1", 1, True, b"1", ("a", ("b",))]
    for ns in spaces:
        assert cache.insert(ids, kv_for(ids, ns), namespace=ns) == 8, ns
    assert len(cache._tree.roots) == len(spaces)
    seen: set[int] = set()
    for ns in spaces:
        with cache.match(ids, namespace=ns) as m:
            assert m.num_tokens == 8
            assert not seen & set(m.block_ids), f"{ns!r} shares a block"
            seen |= set(m.block_ids)
            assert torch.equal(cache.gather(m)[0][0], kv_for(ids, ns)[0][0])
    with cache.match(ids, namespace="other") as m:
        assert m.num_tokens == 0
    cache.check_invariants()


def test_block_hashes_chain_from_the_parent_and_the_namespace() -> None:
    cache = make_cache()
    a = [*range(4), 7, 7, 7, 7]
    b = [*range(100, 104), 7, 7, 7, 7]  # same second block after a different first one
    _fill(cache, a, b)
    cache.insert(a, kv_for(a, "ns"), namespace="ns")
    with cache.match(a) as ma, cache.match(b) as mb, cache.match(a, namespace="ns") as mn:
        assert ma.block_hashes[1] != mb.block_hashes[1]
        assert ma.block_hashes != mn.block_hashes
        with cache.match(a[:4]) as short:
            assert short.block_hashes == ma.block_hashes[:1]
        assert ma.block_hashes[1] == xxhash.xxh3_64_intdigest(
            np.array(a[4:], dtype=np.uint64).tobytes(), ma.block_hashes[0]
        )


def test_a_hash_collision_never_causes_a_false_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xxhash, "xxh3_64_intdigest", lambda data, seed=0: 0)  # every block collides
    cache = make_cache()
    a, b = list(range(8)), list(range(50, 58))
    cache.insert(a, kv_for(a))
    with cache.match(b) as m:
        assert m.num_tokens == 0
    cache.insert(b, kv_for(b))
    with cache.match(b) as m:
        assert torch.equal(cache.gather(m)[0][0], kv_for(b)[0][0])
    cache.check_invariants()


def test_reference_counts_count_the_tree_and_every_live_match_exactly_across_splits() -> None:
    cache, ids = cache_holding(12)
    m1 = cache.match(ids)
    m2 = cache.match(ids[:4])  # splits the node under m1's lock
    first, last = m1.block_ids[0], m1.block_ids[-1]
    assert cache.refcount(first) == 3 and cache.refcount(last) == 2
    cache.release(m1)
    assert cache.refcount(first) == 2 and cache.refcount(last) == 1
    cache.clear()  # the tree lets go; m2 still holds its block
    assert cache.refcount(first) == 1 and cache.refcount(last) == 0
    assert cache.stats.free_tokens == cache.stats.capacity_tokens - 4
    cache.check_invariants()
    cache.release(m2)
    assert cache.refcount(first) == 0 and cache.stats.free_tokens == cache.stats.capacity_tokens
    cache.check_invariants()


def test_clear_empties_the_tree_but_live_matches_stay_readable() -> None:
    cache, ids = cache_holding(8)
    m = cache.match(ids)
    cache.clear()
    assert cache.stats.cached_tokens == 0 and cache.stats.locked_tokens == 8
    other = list(range(100, 164))
    cache.insert(other, kv_for(other))  # reuses every free block, never m's
    assert torch.equal(cache.gather(m)[1][0], kv_for(ids)[1][0])
    with cache.match(ids) as again:
        assert again.num_tokens == 0
    cache.release(m)
    assert cache.stats.locked_tokens == 0
    cache.check_invariants()


def test_splitting_a_locked_node_keeps_every_lock_exact() -> None:
    cache, ids = cache_holding(16)
    long_match = cache.match(ids)
    short_match = cache.match(ids[:8])
    cache.release(long_match)
    assert cache.evict(1000) == 8  # only the tail that no one holds
    with cache.match(ids) as m:
        assert m.num_tokens == 8
    cache.release(short_match)
    assert cache.evict(1000) == 8
    cache.check_invariants()


def test_stats_count_lookups_queries_hits_inserts_and_evictions() -> None:
    cache, ids = cache_holding(10)
    cache.release(cache.match(ids))
    cache.release(cache.match([9, 9, 9, 9, 9]))
    s = cache.stats
    assert (s.lookups, s.query_tokens, s.hit_tokens, s.inserted_tokens) == (2, 15, 8, 8)
    assert s.hit_rate == pytest.approx(8 / 15)
    cache.evict(4)
    assert cache.stats.evicted_tokens == 4 and cache.stats.cached_tokens == 4
    cache.reset_stats()
    s = cache.stats
    assert (s.lookups, s.hit_tokens, s.evicted_tokens, s.cached_tokens) == (0, 0, 0, 4)


def test_an_insert_never_evicts_the_prefix_it_extends() -> None:
    cache = make_cache(capacity_tokens=16, block_size=4)
    a = list(range(8))
    cache.insert(a, kv_for(a))  # 2 of 4 blocks, the least recently used leaf
    longer = list(range(24))  # extends a by 4 blocks; only 2 are free
    assert cache.insert(longer, kv_for(longer)) == 8
    with cache.match(longer) as m:
        assert m.num_tokens == 16
        assert torch.equal(cache.gather(m)[0][0], kv_for(longer)[0][0][:, :, :16])
    cache.check_invariants()


def test_cache_options_lists_exactly_prefix_cache_keywords() -> None:
    """wrap passes CacheOptions through to PrefixCache and rejects any other keyword, so the two
    lists must stay the same: a keyword added to one only would be refused or untyped."""
    import inspect

    from radixkv.cache import CacheOptions

    params = inspect.signature(PrefixCache.__init__).parameters
    keywords = {name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(CacheOptions.__annotations__) == keywords
