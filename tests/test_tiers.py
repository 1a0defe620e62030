"""Host and disk tiers under the device pool: demotion, promotion, exactness, concurrency."""

from __future__ import annotations

import random
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from kvutil import SPEC, kv_for

from radixkv import PrefixCache
from radixkv.tiers.disk import SUFFIX, DiskTier, TierWarning

BS = 4


def tiered(
    tmp_path: Path | None = None, capacity: int = 32, host: int | None = 64, disk_bytes: int = 1 << 20
) -> PrefixCache:
    cache = PrefixCache(
        SPEC,
        capacity_tokens=capacity,
        block_size=BS,
        eviction="lru",
        host_capacity_tokens=host,
        disk_path=tmp_path,
        disk_capacity_bytes=disk_bytes if tmp_path is not None else None,
    )
    if cache._tiers is not None:
        cache._tiers.min_disk_tokens = BS
    return cache


def assert_exact(cache: PrefixCache, ids: list[int], namespace: object = None) -> int:
    """Match `ids`; the gathered KV must equal the KV of that prefix. Returns the match length."""
    with cache.match(ids, namespace) as m:
        got = cache.gather(m)
        want = kv_for(ids[: m.num_tokens], namespace)
        for (gk, gv), (wk, wv) in zip(got, want, strict=True):
            assert torch.equal(gk, wk) and torch.equal(gv, wv), "a promoted block holds the wrong KV"
        return m.num_tokens


def put(cache: PrefixCache, ids: list[int], namespace: object = None) -> None:
    cache.insert(ids, kv_for(ids, namespace), namespace)


def test_device_eviction_demotes_to_host_and_match_promotes() -> None:
    """An evicted prefix comes back from the host tier with exactly its KV, reported as host tokens."""
    cache = tiered(capacity=32, host=64)
    a, b = list(range(24)), list(range(100, 124))
    put(cache, a)
    put(cache, b)  # evicts most of a (32-token pool)
    assert cache.stats.evicted_tokens >= 16
    with cache.match(a) as m:
        assert m.num_tokens == 24 and m.host_tokens >= 16 and m.device_tokens == 24 - m.host_tokens
        assert m.disk_tokens == 0
    assert assert_exact(cache, a) == 24
    s = cache.tier_stats["host"]
    assert s.hits == 1 and s.promoted_tokens >= 16 and s.demoted_tokens >= 16
    assert s.bytes_written > 0 and s.bytes_read > 0
    cache.check_invariants()


def test_host_eviction_demotes_to_disk_and_a_restart_hits(tmp_path: Path) -> None:
    """Runs leaving the host tier land on disk; a new cache on the same directory serves them."""
    cache = tiered(tmp_path, capacity=16, host=16)
    prompts = [list(range(i * 1000, i * 1000 + 16)) for i in range(6)]
    for p in prompts:
        put(cache, p)
    assert cache.tier_stats["disk"].demoted_tokens >= 16
    assert assert_exact(cache, prompts[0]) == 16
    with cache.match(prompts[1]) as m:
        assert m.disk_tokens == 16
    cache.check_invariants()
    again = tiered(tmp_path, capacity=16, host=16)
    with again.match(prompts[2]) as m:
        assert (m.num_tokens, m.disk_tokens) == (16, 16)
    assert assert_exact(again, prompts[2]) == 16
    again.check_invariants()


def test_match_spans_device_host_and_disk(tmp_path: Path) -> None:
    """The longest prefix over all tiers: a device head, a host middle and a disk tail."""
    cache = tiered(tmp_path, capacity=48, host=16)
    ids = list(range(48))
    put(cache, ids)
    cache.evict(48)  # all of it: 16 tokens fit in the host, the rest goes to disk
    with cache.match(ids[:16]) as m:  # the head back on the device
        assert m.num_tokens == 16
    with cache.match(ids) as m:
        assert m.num_tokens == 48
        assert m.device_tokens == 16 and m.host_tokens + m.disk_tokens == 32 and m.disk_tokens > 0
    assert assert_exact(cache, ids) == 48
    cache.check_invariants()


def test_promotion_that_does_not_fit_returns_the_part_that_did() -> None:
    """With the pool full of locked blocks, a promotion stores what fits; the rest stays in the host."""
    cache = tiered(capacity=32, host=64)
    a, b = list(range(32)), list(range(500, 516))
    put(cache, a)
    cache.evict(32)
    put(cache, b)
    with cache.match(b) as held:  # 16 tokens locked: 16 free
        assert held.num_tokens == 16
        with cache.match(a) as m:
            assert m.num_tokens == 16 and m.host_tokens == 16
            assert assert_exact(cache, a) == 16
        assert cache.tier_stats["host"].cached_tokens == 16
        cache.check_invariants()
    assert assert_exact(cache, a) >= 16


def test_short_disk_hit_is_not_loaded(tmp_path: Path) -> None:
    cache = tiered(tmp_path, capacity=16, host=None)
    cache._tiers.min_disk_tokens = 16  # type: ignore[union-attr]
    put(cache, list(range(8)))
    put(cache, list(range(100, 116)))  # demotes the 8 tokens to disk
    assert cache.tier_stats["disk"].demoted_tokens == 8
    with cache.match(list(range(8))) as m:
        assert m.num_tokens == 0
    assert cache.tier_stats["disk"].bytes_read == 0


def test_disk_tier_without_host_tier(tmp_path: Path) -> None:
    cache = tiered(tmp_path, capacity=16, host=None)
    put(cache, list(range(16)))
    put(cache, list(range(100, 116)))
    assert "host" not in cache.tier_stats
    with cache.match(list(range(16))) as m:
        assert m.disk_tokens == 16
    assert assert_exact(cache, list(range(16))) == 16


def test_corrupt_disk_file_is_a_counted_miss_in_the_cache(tmp_path: Path) -> None:
    cache = tiered(tmp_path, capacity=16, host=None)
    put(cache, list(range(16)))
    put(cache, list(range(100, 116)))
    for path in tmp_path.glob(f"*{SUFFIX}"):
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x55
        path.write_bytes(bytes(data))
    with pytest.warns(TierWarning, match="checksum"), cache.match(list(range(16))) as m:
        assert m.num_tokens == 0
    assert cache.tier_stats["disk"].files_skipped == 1
    cache.check_invariants()


def test_namespaces_stay_apart_in_lower_tiers(tmp_path: Path) -> None:
    cache = tiered(tmp_path, capacity=16, host=16)
    ids = list(range(16))
    put(cache, ids, "a")
    for i in range(1, 4):
        put(cache, list(range(i * 100, i * 100 + 16)), "b")
    with cache.match(ids, "b") as m:
        assert m.num_tokens == 0
    assert assert_exact(cache, ids, "a") == 16


def test_bad_tier_arguments_name_themselves(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="host_capacity_tokens"):
        PrefixCache(SPEC, capacity_tokens=16, host_capacity_tokens=-1)
    with pytest.raises(TypeError, match="host_capacity_tokens"):
        PrefixCache(SPEC, capacity_tokens=16, host_capacity_tokens=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="disk_capacity_bytes"):
        PrefixCache(SPEC, capacity_tokens=16, disk_path=tmp_path, disk_capacity_bytes=-5)
    with pytest.raises(ValueError, match="disk_capacity_bytes"):
        PrefixCache(SPEC, capacity_tokens=16, disk_path=tmp_path)
    with pytest.raises(ValueError, match="disk_path"):
        PrefixCache(SPEC, capacity_tokens=16, disk_capacity_bytes=100)
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(ValueError, match="disk_path"):
        PrefixCache(SPEC, capacity_tokens=16, disk_path=afile, disk_capacity_bytes=100)


def test_without_tiers_nothing_is_kept_below() -> None:
    """No tier keywords: an evicted prefix is gone, as before."""
    cache = PrefixCache(SPEC, capacity_tokens=16, block_size=BS, eviction="lru")
    assert cache._tiers is None and cache._tree.on_evict is None and cache.tier_stats == {}
    put(cache, list(range(16)))
    put(cache, list(range(100, 116)))
    with cache.match(list(range(16))) as m:
        assert m.num_tokens == 0 and m.host_tokens == m.disk_tokens == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_stay_exact(tmp_path: Path, seed: int) -> None:
    """Seeded random inserts, matches (held and released), evictions and clears over all tiers:
    every match returns exactly the KV of its prefix, hits over all tiers are at least the
    device-only cache's, and the invariants hold after every step."""
    rng = random.Random(seed)
    cache = tiered(tmp_path / str(seed), capacity=48, host=32, disk_bytes=6000)
    plain = PrefixCache(SPEC, capacity_tokens=48, block_size=BS, eviction="lru")
    stems = [[rng.randrange(50) for _ in range(rng.choice([4, 8, 12]))] for _ in range(5)]
    held = []
    for _ in range(150):
        ids = rng.choice(stems) + [rng.randrange(50) for _ in range(rng.randrange(0, 14))]
        ns = rng.choice([None, "x"])
        op = rng.random()
        if op < 0.45:
            put(cache, ids, ns)
            put(plain, ids, ns)
        elif op < 0.9:
            n = assert_exact(cache, ids, ns)
            with plain.match(ids, ns) as pm:
                assert n >= pm.num_tokens or held
            if rng.random() < 0.3 and len(held) < 3:
                held.append(cache.match(ids, ns))
        elif op < 0.95 and held:
            cache.release(held.pop())
        else:
            cache.evict(rng.randrange(0, 24))
        if rng.random() < 0.02:
            cache.clear()
        cache.check_invariants()
    for m in held:
        cache.release(m)
    cache.check_invariants()


def _on_disk_only(tmp_path: Path) -> tuple[PrefixCache, list[int]]:
    """A cache without a host tier whose only copy of 32 tokens is on disk."""
    cache = tiered(tmp_path, capacity=64, host=None)
    ids = list(range(32))
    put(cache, ids)
    cache.evict(64)
    return cache, ids


def _before_disk_reads(monkeypatch: pytest.MonkeyPatch, before: Callable[[], None]) -> None:
    """Call `before()` at the start of every disk tier read."""
    real_read = DiskTier.read

    def read(self: DiskTier, *args: object) -> torch.Tensor:
        before()
        return real_read(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(DiskTier, "read", read)


def test_concurrent_matches_promote_a_disk_prefix_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads asking for the same disk prefix at once: one reads it, all get it, once in the pool."""
    cache, ids = _on_disk_only(tmp_path)
    reads = []

    def slow() -> None:
        reads.append(1)
        time.sleep(0.3)

    _before_disk_reads(monkeypatch, slow)
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with cache.match(ids) as m:
                results.append((m.num_tokens, m.disk_tokens))
                got = cache.gather(m)
                assert torch.equal(got[0][0], kv_for(ids)[0][0])
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
    assert all(not t.is_alive() for t in threads)
    assert len(reads) == 1
    assert sorted(results) == [(32, 0)] * 3 + [(32, 32)]
    assert cache.tier_stats["disk"].promoted_tokens == 32
    cache.check_invariants()


def test_cache_lock_is_not_held_during_a_disk_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one thread reads a file, another thread's device match and insert complete."""
    cache, ids = _on_disk_only(tmp_path)
    put(cache, list(range(200, 216)))
    entered, finish = threading.Event(), threading.Event()

    def blocking() -> None:
        entered.set()
        assert finish.wait(10)

    _before_disk_reads(monkeypatch, blocking)
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(assert_exact(cache, ids)))
    t.start()
    try:
        assert entered.wait(10)
        assert assert_exact(cache, list(range(200, 216))) == 16  # would deadlock under the lock
        put(cache, list(range(300, 316)))
    finally:
        finish.set()
        t.join(10)
    assert out == [32]
    cache.check_invariants()


def test_full_disk_turns_the_tier_off_and_serving_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    cache = tiered(tmp_path, capacity=16, host=None)

    def enospc(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("radixkv.tiers.disk.open", enospc, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(4):
            put(cache, list(range(i * 100, i * 100 + 16)))
    assert len([w for w in caught if issubclass(w.category, TierWarning)]) == 1
    assert not cache.tier_stats["disk"].enabled
    assert assert_exact(cache, list(range(300, 316))) == 16
    cache.check_invariants()


def test_host_tier_lru_overflow_and_verification() -> None:
    """The host tier evicts least recently used runs, sends the part of a run larger than itself
    on at once, and counts a block only when namespace, chain and tokens all agree."""
    from radixkv.core.hashing import chain_hashes, namespace_key, pack_tokens, root_hash
    from radixkv.tiers.host import HostTier

    ns = namespace_key(None)
    host = HostTier(SPEC, BS, 4, pin=False)
    shape = (SPEC.num_layers, 2, SPEC.num_kv_heads, BS, SPEC.head_dim)

    def run(first: int, n: int) -> tuple[int, list[int], list[int], torch.Tensor]:
        toks = list(range(first, first + n * BS))
        parent = root_hash(ns)
        return parent, chain_hashes(parent, pack_tokens(toks), BS), toks, torch.full((n, *shape), float(first))

    pa, ha, ta, ka = run(0, 2)
    pb, hb, tb, kb = run(100, 2)
    assert host.put(ns, pa, ha, ta, ka) == [] and host.put(ns, pb, hb, tb, kb) == []
    assert host.count(ns, pa, ha, ta) == 2
    assert host.count(namespace_key("x"), pa, ha, ta) == 0
    assert host.count(ns, pa, ha, [t + 1 for t in ta]) == 0
    assert host.count(ns, hb[0], ha, ta) == 0  # wrong chain before the block
    host.put(ns, pa, ha, ta, ka)  # already held: only touched, so b is now the oldest
    pc, hc, tc, kc = run(200, 6)
    out = host.put(ns, pc, hc, tc, kc)
    # c's last 2 blocks, which exceed the 4-block tier, then b and a (oldest first).
    assert [r.hashes for r, _ in out] == [hc[4:], hb, ha]
    assert torch.equal(out[0][1], kc[4:]) and out[0][0].parent_hash == hc[3]
    assert host.count(ns, pc, hc, tc) == 4
    assert torch.equal(host.take(hc[1:3]), kc[1:3])
    assert host.count(ns, pc, hc, tc) == 1 and host.count(ns, hc[2], hc[3:], tc[12:]) == 1
    host.check()


def test_threads_insert_and_match_over_all_tiers_exactly(tmp_path: Path) -> None:
    """Four threads insert and match overlapping prompts through a small pool, host and disk:
    every match returns exactly its prefix's KV, and the invariants hold afterwards."""
    from kvutil import run_threads

    cache = tiered(tmp_path, capacity=64, host=32, disk_bytes=20_000)
    stems = [list(range(i * 50, i * 50 + 24)) for i in range(6)]

    def worker(i: int) -> None:
        rng = random.Random(i)
        for _ in range(40):
            ids = rng.choice(stems) + [rng.randrange(1000, 1100) for _ in range(rng.randrange(0, 9))]
            if rng.random() < 0.5:
                put(cache, ids)
            else:
                assert_exact(cache, ids)

    run_threads(worker, 4)
    cache.check_invariants()
    stats = cache.tier_stats
    assert stats["host"].promoted_tokens > 0 and stats["disk"].promoted_tokens > 0  # both tiers served
    for s in stems:
        assert_exact(cache, s)


def test_an_insert_without_room_in_the_pool_keeps_the_rest_below(tmp_path: Path) -> None:
    """Swap instead of drop: blocks an insert cannot place (pool full of locked blocks) go to the
    host tier, or to disk without one, and a later match gets them back exactly."""
    for host in (64, None):
        cache = tiered(tmp_path / str(host), capacity=32, host=host)
        a, b = list(range(32)), list(range(500, 516))
        put(cache, b)
        with cache.match(b) as held:
            assert held.num_tokens == 16
            assert cache.insert(a, kv_for(a)) == 16  # 16 stored in the pool, 16 below
            assert cache.stats.dropped_tokens == 16
        cache.check_invariants()
        with cache.match(a) as m:
            assert m.num_tokens == 32 and m.device_tokens == 16
            assert (m.host_tokens if host else m.disk_tokens) == 16
        assert assert_exact(cache, a) == 32
        cache.check_invariants()
