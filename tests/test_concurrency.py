"""insert copies KV into the pool without the cache lock: lookups do not wait behind a copy, and
inserts that race on the same prefix leave one copy in the tree and no block leaked."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from kvutil import fingerprint, kv_for, make_cache, run_threads

from radixkv import PrefixCache
from radixkv.core.pool import KVPool

BS = 4
WAIT = 10.0  # seconds a blocked copy waits before giving up: a regression fails, never hangs


def _hold_writes(cache: PrefixCache, before_copy: Callable[[], None]) -> None:
    """Make `cache`'s pool call `before_copy()` at the start of every insert copy."""
    pool = cache._pool
    real = KVPool.write.__get__(pool)

    def write(block_ids: list[int], kv: list, start: int) -> None:
        before_copy()
        real(block_ids, kv, start)

    pool.write = write  # type: ignore[method-assign]


def _joined(thread: threading.Thread) -> None:
    thread.join(WAIT)
    assert not thread.is_alive(), "a thread is stuck (deadlock?)"


def test_a_match_completes_while_another_threads_insert_is_copying() -> None:
    cache = make_cache(capacity_tokens=256, block_size=BS)
    cached = list(range(100, 124))  # 6 blocks
    cache.insert(cached, kv_for(cached))
    copying, go, copy_done = threading.Event(), threading.Event(), threading.Event()

    def wait_for_main() -> None:
        copying.set()
        go.wait(WAIT)  # a copy under the cache lock would block the main thread's match till then

    _hold_writes(cache, wait_for_main)
    new = list(range(200, 240))  # 10 blocks, none cached
    errors: list[BaseException] = []

    def insert() -> None:
        try:
            assert cache.insert(new, kv_for(new)) == len(new)
        except BaseException as exc:
            errors.append(exc)
        finally:
            copy_done.set()

    writer = threading.Thread(target=insert)
    writer.start()
    try:
        assert copying.wait(WAIT), "the insert never reached its copy"
        with cache.match([*cached, 1]) as m:
            assert not copy_done.is_set(), "the match waited for the insert's copy"
            assert m.num_tokens == len(cached)
            k, v = cache.gather(m)[1]
            assert torch.equal(k, kv_for(cached)[1][0]) and torch.equal(v, kv_for(cached)[1][1])
        with cache.match(new) as m:  # the blocks being written are not reachable yet
            assert m.num_tokens == 0
        cache.check_invariants()  # the copy in flight is accounted for
        s = cache.stats
        assert s.cached_tokens == len(cached) and s.free_tokens == 256 - len(cached) - len(new)
    finally:
        go.set()
        _joined(writer)
    assert not errors, errors
    cache.check_invariants()
    with cache.match(new) as m:
        assert m.num_tokens == len(new)
        k, v = cache.gather(m)[0]
        assert torch.equal(k, kv_for(new)[0][0]) and torch.equal(v, kv_for(new)[0][1])
    assert cache.stats.free_tokens == 256 - len(cached) - len(new)


@pytest.mark.parametrize("overlap", ["same", "shared head"])
def test_inserts_racing_on_one_prefix_keep_one_copy_and_leak_no_block(overlap: str) -> None:
    cache = make_cache(capacity_tokens=256, block_size=BS)
    head = list(range(300, 324))  # 6 blocks
    prompts = [head + list(range(400, 416)), head + list(range(400, 416))]
    if overlap == "shared head":
        prompts[1] = head + list(range(500, 508))
    both_reserved = threading.Barrier(2, timeout=WAIT)  # both copies start before either attaches
    _hold_writes(cache, both_reserved.wait)
    stored = [0, 0]

    def insert(i: int) -> None:
        stored[i] = cache.insert(prompts[i], kv_for(prompts[i]))

    run_threads(insert, 2, timeout=2 * WAIT)
    cache.check_invariants()
    distinct = {tuple(p[: (b + 1) * BS]) for p in prompts for b in range(len(p) // BS)}
    s = cache.stats
    assert s.cached_tokens == len(distinct) * BS == sum(stored) == s.inserted_tokens
    assert s.free_tokens == 256 - s.cached_tokens and s.locked_tokens == 0
    for p in prompts:
        with cache.match(p) as m:
            assert m.num_tokens == len(p)
            got = cache.gather(m)
            for (k, v), (wk, wv) in zip(got, kv_for(p), strict=True):
                assert torch.equal(k, wk) and torch.equal(v, wv)


def test_a_clear_during_an_insert_copy_gives_its_blocks_back() -> None:
    cache = make_cache(capacity_tokens=128, block_size=BS)
    copying, go = threading.Event(), threading.Event()

    def wait_for_main() -> None:
        copying.set()
        go.wait(WAIT)

    _hold_writes(cache, wait_for_main)
    ids = list(range(40))
    result: list[int] = []
    writer = threading.Thread(target=lambda: result.append(cache.insert(ids, kv_for(ids))))
    writer.start()
    try:
        assert copying.wait(WAIT)
        cache.clear()
        cache.check_invariants()
    finally:
        go.set()
        _joined(writer)
    assert result == [0]  # attached to nothing: the clear came first
    cache.check_invariants()
    s = cache.stats
    assert s.cached_tokens == 0 and s.free_tokens == 128 and s.inserted_tokens == 0
    with cache.match(ids) as m:
        assert m.num_tokens == 0


def test_an_insert_whose_copy_raises_leaves_the_cache_as_it_was_and_unlocked() -> None:
    cache = make_cache(capacity_tokens=128, block_size=BS)
    base = list(range(16))
    cache.insert(base, kv_for(base))
    before = fingerprint(cache)

    def fail() -> None:
        raise RuntimeError("copy failed")

    _hold_writes(cache, fail)
    ids = base + list(range(50, 70))
    with pytest.raises(RuntimeError, match="copy failed"):
        cache.insert(ids, kv_for(ids))
    assert fingerprint(cache) == before
    cache.check_invariants()

    # Another thread takes the lock at once: the failing insert released it.
    def match_elsewhere(_: int) -> None:
        with cache.match(ids) as m:
            assert m.num_tokens == len(base)

    run_threads(match_elsewhere, 1, timeout=WAIT)


def test_an_insert_copy_in_flight_with_lower_tiers_demotes_and_later_promotes() -> None:
    """The reservation's eviction demotes to the host tier under the lock; a match during the
    copy sees the device prefix only (the pool is full of reserved and locked blocks); after the
    copy both prompts are whole again, the evicted part promoted back from the host tier."""
    cache = PrefixCache(make_cache().spec, capacity_tokens=16 * BS, block_size=BS, host_capacity_tokens=64 * BS)
    first, second = list(range(48)), list(range(1000, 1048))  # 12 blocks each
    cache.insert(first, kv_for(first))
    copying, go, copy_done = threading.Event(), threading.Event(), threading.Event()

    def wait_for_main() -> None:
        copying.set()
        go.wait(WAIT)

    _hold_writes(cache, wait_for_main)

    def insert() -> None:
        try:
            cache.insert(second, kv_for(second))
        finally:
            copy_done.set()

    writer = threading.Thread(target=insert)
    writer.start()
    try:
        assert copying.wait(WAIT)
        assert cache.tier_stats["host"].demoted_tokens == 8 * BS  # room for the 12 new blocks
        with cache.match(first) as m:
            assert not copy_done.is_set(), "the match waited for the insert's copy"
            assert (m.num_tokens, m.host_tokens) == (4 * BS, 0)
        cache.check_invariants()
    finally:
        go.set()
        _joined(writer)
    cache.check_invariants()
    with cache.match(second) as m:
        assert m.num_tokens == len(second)
    with cache.match(first) as m:
        assert (m.num_tokens, m.host_tokens) == (len(first), 8 * BS)
        for (k, v), (wk, wv) in zip(cache.gather(m), kv_for(first), strict=True):
            assert torch.equal(k, wk) and torch.equal(v, wv)
    cache.check_invariants()


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_concurrent_dequantising_gathers_all_return_the_same_values(kv_dtype: str) -> None:
    """Quantised gathers share no buffer between calls (int4 on CPU goes through torch's fused
    kernel): threads gathering at once each get what a lone gather gives."""
    cache = PrefixCache(make_cache().spec, capacity_tokens=256, block_size=BS, kv_dtype=kv_dtype)
    ids = list(range(64))
    cache.insert(ids, kv_for(ids))
    with cache.match(ids) as m:
        want = cache.gather(m)

    def worker(_: int) -> None:
        for _ in range(20):
            with cache.match(ids) as mine:
                got = cache.gather(mine)
            for (k, v), (wk, wv) in zip(got, want, strict=True):
                assert torch.equal(k, wk) and torch.equal(v, wv)

    run_threads(worker, 4)
    cache.check_invariants()
