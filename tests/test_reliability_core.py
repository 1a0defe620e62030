"""The core under threads, injected faults, memory pressure and a long soak."""

from __future__ import annotations

import random
import tracemalloc

import psutil
import pytest
import torch
from kvutil import cached_prefixes, kv_for, make_cache, run_threads

from radixkv.core.pool import KVPool


def test_eight_threads_sharing_one_cache_get_correct_kv_and_leave_no_lock() -> None:
    cache = make_cache(capacity_tokens=40 * 4, block_size=4)  # small: eviction under contention
    systems = [[s] * 12 for s in range(4)]
    checked = [0]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            ids = rng.choice(systems) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            with cache.match(ids[:-1]) as m:
                if m.num_tokens:
                    got = cache.gather(m)
                    want = kv_for(ids)
                    assert all(
                        torch.equal(gk, wk[:, :, : m.num_tokens]) and torch.equal(gv, wv[:, :, : m.num_tokens])
                        for (gk, gv), (wk, wv) in zip(got, want, strict=True)
                    ), "a thread read KV of another prefix"
                    checked[0] += 1
            cache.insert(ids, kv_for(ids))

    run_threads(worker, 8)
    cache.check_invariants()
    s = cache.stats
    assert s.locked_tokens == 0 and s.live_matches == 0
    assert s.lookups == 8 * 150 and checked[0] > 100 and s.evicted_tokens > 0


def test_an_insert_whose_kv_copy_fails_halfway_leaves_nothing_half_written_reachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = make_cache(capacity_tokens=24, block_size=4)
    a = list(range(12))
    cache.insert(a, kv_for(a))
    before = cached_prefixes(cache)
    real_write = KVPool.write
    boom = RuntimeError("device lost during copy")

    def write_one_layer_then_fail(self: KVPool, block_ids: list[int], kv: list, start: int) -> None:
        real_write(self, block_ids, kv[:1], start)  # layer 0 lands, layer 1 never does
        raise boom

    monkeypatch.setattr(KVPool, "write", write_one_layer_then_fail)
    b = [*range(8), 70, 71, 72, 73, 74, 75, 76, 77]  # shares two blocks, needs two new ones
    with pytest.raises(RuntimeError) as info:
        cache.insert(b, kv_for(b))
    assert info.value is boom  # the caller sees the exception unchanged
    assert cached_prefixes(cache) <= before, "a block of the failed insert is reachable"
    assert cache.stats.locked_tokens == 0
    cache.check_invariants()
    monkeypatch.setattr(KVPool, "write", real_write)
    assert cache.insert(b, kv_for(b)) == 8  # the next request works and is correct
    with cache.match(b) as m:
        assert m.num_tokens == 16
        for (gk, gv), (wk, wv) in zip(cache.gather(m), kv_for(b), strict=True):
            assert torch.equal(gk, wk) and torch.equal(gv, wv)
    cache.check_invariants()


def test_an_insert_into_a_pool_of_locked_blocks_stores_nothing_and_says_so() -> None:
    cache = make_cache(capacity_tokens=16, block_size=4)
    held = []
    for s in range(2):
        ids = [s] * 8
        cache.insert(ids, kv_for(ids))
        held.append(cache.match(ids))
    new = list(range(100, 108))
    assert cache.insert(new, kv_for(new)) == 0
    assert cache.stats.dropped_tokens == 8
    assert cache.stats.cached_tokens == 16 and cache.stats.locked_tokens == 16
    for m in held:
        cache.release(m)
    assert cache.insert(new, kv_for(new)) == 8
    cache.check_invariants()


def test_a_soak_of_ten_thousand_requests_stays_within_capacity_without_growing_memory() -> None:
    rng = random.Random(1234)
    block = 8
    cache = make_cache(capacity_tokens=300 * block, block_size=block)
    capacity = cache.stats.capacity_tokens
    systems = [[rng.randrange(500) for _ in range(rng.choice((64, 256, 1024)))] for _ in range(12)]
    # One KV source big enough for every request, so the loop allocates no tensors of its own.
    longest = 1024 + 900
    src = kv_for([rng.randrange(500) for _ in range(longest)])
    proc = psutil.Process()
    tracemalloc.start()
    marks: dict[int, tuple[int, int]] = {}
    for i in range(10_000):
        if rng.random() < 0.15:  # a long one-off prompt
            ids = [rng.randrange(500) for _ in range(rng.randrange(300, 900))]
        else:
            ids = rng.choice(systems) + [rng.randrange(500) for _ in range(rng.randrange(1, 64))]
        with cache.match(ids[:-1]) as m:
            assert m.num_tokens < len(ids)
        kv = [(k[:, :, : len(ids)], v[:, :, : len(ids)]) for k, v in src]
        cache.insert(ids, kv)
        s = cache.stats
        assert s.locked_tokens == 0, f"request {i} left {s.locked_tokens} tokens locked"
        assert s.cached_tokens + s.free_tokens == capacity, f"request {i}: pool accounting is off"
        if i % 100 == 99:
            cache.check_invariants()
        if i in (1_999, 9_999):
            marks[i] = (tracemalloc.get_traced_memory()[0], proc.memory_info().rss)
    tracemalloc.stop()
    traced_growth = marks[9_999][0] - marks[1_999][0]
    rss_growth = marks[9_999][1] - marks[1_999][1]
    print(f"soak: python heap growth {traced_growth / 1024:.1f} KiB, RSS growth {rss_growth / 2**20:.2f} MiB")
    s = cache.stats
    assert s.evicted_tokens > 10 * capacity, "the soak never put the pool under pressure"
    assert s.hit_tokens > 0
    # Bounded bookkeeping: the tree's size is capped by the pool, so after warm-up the Python heap
    # holds steady (a per-request leak of even 100 bytes over 8,000 requests would show here).
    assert traced_growth < 512 * 1024, f"python heap grew by {traced_growth} bytes after warm-up"
    assert rss_growth < 32 * 2**20, f"resident memory grew by {rss_growth / 2**20:.1f} MiB after warm-up"
