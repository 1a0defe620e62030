"""The shared Redis tier against real redis-server processes (Redis 7, localhost only).

Each test's docstring names the rule it checks. Servers are started by fixtures on free ports
with temporary directories and always stopped; only the key format test runs without one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from kvutil import SPEC, kv_for
from radixkv.benchmarks.shared import RedisCluster, RedisServer, free_port

from radixkv import KVSpec, PrefixCache, RedisOptions, SharedTierError
from radixkv.core.hashing import chain_hashes, namespace_key, pack_tokens, root_hash
from radixkv.tiers.codec import SpecFingerprint
from radixkv.tiers.disk import TierWarning
from radixkv.tiers.redis import RedisTier, model_id, shared_key

BS = 4
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def fresh_server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    yield srv
    srv.stop()


def opts(url: str, **kw: object) -> RedisOptions:
    return RedisOptions(url, min_tokens=0, **kw)  # type: ignore[arg-type]


def cache_on(url: str | RedisOptions, model: str = "model-a", spec: KVSpec = SPEC, capacity: int = 256) -> PrefixCache:
    shared = url if isinstance(url, RedisOptions) else opts(url)
    return PrefixCache(spec, capacity_tokens=capacity, block_size=BS, eviction="lru", shared=shared, shared_model=model)


def run_of(n_blocks: int, seed: int = 0, ns: object = None) -> tuple[bytes, int, list[int], list[int], torch.Tensor]:
    """(ns_key, parent hash, hashes, tokens, blocks [n, L, 2, H, bs, D]) of a random run."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (n_blocks * BS,), generator=g).tolist()
    ns_key = namespace_key(ns)
    parent = root_hash(ns_key)
    hashes = chain_hashes(parent, pack_tokens(tokens), BS)
    blocks = torch.randn((n_blocks, *SpecFingerprint.of(SPEC, BS).block_shape), generator=g)
    return ns_key, parent, hashes, tokens, blocks


def tier_on(url: str, model: str = "model-a", **kw: object) -> RedisTier:
    return RedisTier(opts(url, **kw), SPEC, BS, model)


def wait_for(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# ----- key format (no server) -----------------------------------------------------------
def test_keys_name_everything_that_makes_kv_valid_and_are_equal_across_processes() -> None:
    """A key changes with the model, the dtype, the shape, the block size, the namespace and the
    chain hash, and is the same string in another process with another hash seed."""
    fp = SpecFingerprint.of(SPEC, BS)
    ns = namespace_key(("tenant", 1))
    base = shared_key(model_id("m"), fp, ns, 42)
    others = [
        shared_key(model_id("m2"), fp, ns, 42),
        shared_key(model_id("m"), SpecFingerprint.of(KVSpec(2, 2, 4, torch.bfloat16), BS), ns, 42),
        shared_key(model_id("m"), SpecFingerprint.of(KVSpec(2, 2, 8, torch.float32), BS), ns, 42),
        shared_key(model_id("m"), SpecFingerprint.of(SPEC, 8), ns, 42),
        shared_key(model_id("m"), fp, namespace_key(("tenant", 2)), 42),
        shared_key(model_id("m"), fp, ns, 43),
    ]
    assert len({base, *others}) == 7
    code = (
        "import torch; from radixkv.tiers.redis import shared_key, model_id; from radixkv.tiers.codec import "
        "SpecFingerprint; from radixkv import KVSpec; from radixkv.core.hashing import namespace_key, chain_hashes, "
        "pack_tokens, root_hash; ns = namespace_key(('tenant', 1)); "
        "h = chain_hashes(root_hash(ns), pack_tokens(list(range(8))), 4)[-1]; "
        "print(shared_key(model_id('m'), SpecFingerprint.of(KVSpec(2, 2, 4, torch.float32), 4), ns, h))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("12345",)  # this process's seed is random: a fixed one elsewhere differs
    }  # fmt: skip
    here = shared_key(model_id("m"), fp, ns, chain_hashes(root_hash(ns), pack_tokens(list(range(8))), 4)[-1])
    assert outs == {here}


# ----- reads and writes -------------------------------------------------------------------
def test_reads_return_the_longest_present_prefix_exactly(server: RedisServer) -> None:
    """Written blocks read back bit for bit, across several pipelined batches; a missing block
    ends the prefix."""
    tier = tier_on(server.url, batch_blocks=3)
    try:
        ns, parent, hashes, tokens, blocks = run_of(10, seed=1)
        assert tier.write(ns, parent, hashes, tokens, blocks) == 10
        assert tier.flush(10)
        out = tier.read(ns, parent, hashes, tokens)
        assert out.shape == blocks.shape and torch.equal(out, blocks)
        server.client().delete(tier.key(ns, hashes[7]))
        out = tier.read(ns, parent, hashes, tokens)
        assert torch.equal(out, blocks[:7])
        s = tier.snapshot()
        assert (s.written, s.blocks_read, s.rejected_total) == (10, 17, 0)
    finally:
        tier.close()


CORRUPTIONS = ["truncated", "payload_bit", "header_bit", "other_model", "other_dtype", "other_tokens", "garbage"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_bad_value_is_a_counted_miss_never_kv(server: RedisServer, how: str) -> None:
    """A truncated or corrupt value, one of another model or dtype stored under our key, or one
    whose tokens differ from the query's (a collision) ends the prefix before it and is counted."""
    tier = tier_on(server.url)
    try:
        ns, parent, hashes, tokens, blocks = run_of(6, seed=2)
        tier.write(ns, parent, hashes, tokens, blocks)
        assert tier.flush(10)
        r = server.client()
        key = tier.key(ns, hashes[3])
        value = bytearray(r.get(key))
        if how == "truncated":
            value = value[:-10]
        elif how == "payload_bit":
            value[-5] ^= 1
        elif how == "header_bit":
            value[40] ^= 1
        elif how == "garbage":
            value = bytearray(b"x" * len(value))
        else:
            if how == "other_model":
                other = RedisTier(opts(server.url), SPEC, BS, "model-b")
            elif how == "other_dtype":
                other = RedisTier(opts(server.url), KVSpec(2, 2, 4, torch.float16), BS, "model-a")
            else:
                other = tier
            try:
                wrong = tokens[3 * BS : 4 * BS]
                wrong = [t + 1 for t in wrong] if how == "other_tokens" else wrong
                payload = blocks[3].to(other.dtype).contiguous().view(torch.uint8).numpy().tobytes()
                value = bytearray(other.encode(ns, hashes[2], hashes[3], wrong, payload))
            finally:
                if other is not tier:
                    other.close()
        r.set(key, bytes(value))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TierWarning)
            out = tier.read(ns, parent, hashes, tokens)
        assert torch.equal(out, blocks[:3])
        assert tier.snapshot().rejected_total == 1
    finally:
        tier.close()


def test_ttl_is_set_and_a_full_queue_drops_and_counts(server: RedisServer) -> None:
    """ttl_seconds expires written keys; writes beyond queue_bytes are dropped and counted."""
    tier = tier_on(server.url, ttl_seconds=100, queue_bytes=4 * 512)  # 4 blocks of 512 bytes
    try:
        ns, parent, hashes, tokens, blocks = run_of(5, seed=3)
        assert tier.write(ns, parent, hashes, tokens, blocks) == 0
        assert tier.snapshot().dropped_full == 5
        assert tier.write(ns, parent, hashes[:4], tokens[: 4 * BS], blocks[:4]) == 4
        assert tier.flush(10)
        ttl = server.client().pttl(tier.key(ns, hashes[0]))
        assert 0 < ttl <= 100_000
    finally:
        tier.close()


def test_a_block_larger_than_max_value_bytes_is_refused() -> None:
    """max_value_bytes bounds values: a block that cannot fit is an error at construction."""
    with pytest.raises(ValueError, match="max_value_bytes"):
        RedisTier(RedisOptions("redis://127.0.0.1:1/0", max_value_bytes=100), SPEC, BS, "m")


# ----- through PrefixCache -------------------------------------------------------------------
def test_a_second_cache_reads_what_the_first_inserted(server: RedisServer) -> None:
    """Cache B (empty) matches A's prefix from Redis, gathers A's KV exactly, and the tree stays
    consistent; the lookup is counted once and the tokens as shared."""
    ids = list(range(1000, 1041))  # 10 blocks + 1 token
    a, b = cache_on(server.url, capacity=64), cache_on(server.url, capacity=64)
    try:
        a.insert(ids, kv_for(ids))
        assert a.flush(10)
        with b.match(ids) as m:
            assert (m.num_tokens, m.shared_tokens, m.device_tokens) == (40, 40, 0)
            got = b.gather(m)
        want = kv_for(ids[:40])
        assert all(torch.equal(g[i], w[i]) for g, w in zip(got, want, strict=True) for i in (0, 1))
        assert (b.stats.lookups, b.stats.hit_tokens) == (1, 40)
        b.check_invariants()
        with b.match(ids) as m:  # now local
            assert (m.num_tokens, m.shared_tokens) == (40, 0)
    finally:
        a.close()
        b.close()


def test_a_continuation_under_min_tokens_is_recomputed_not_fetched(server: RedisServer) -> None:
    """With the default `min_tokens`, a Redis continuation one block short of it is left to
    recompute (no round trip), and one of exactly `min_tokens` is fetched."""
    from radixkv.tiers.redis import MIN_SHARED_LOAD_TOKENS as MIN

    assert MIN % BS == 0 and MIN > BS
    short, enough = list(range(2000, 2000 + MIN - BS)), list(range(3000, 3000 + MIN))
    a = cache_on(server.url, capacity=256)
    b = cache_on(RedisOptions(server.url), capacity=256)  # the default min_tokens
    try:
        a.insert(short, kv_for(short))
        a.insert(enough, kv_for(enough))
        assert a.flush(10)
        with b.match(short) as m:
            assert (m.num_tokens, m.shared_tokens) == (0, 0)
        assert b.shared_stats.lookups == 0
        with b.match(enough) as m:
            assert (m.num_tokens, m.shared_tokens) == (MIN, MIN)
        assert b.shared_stats.lookups == 1
    finally:
        a.close()
        b.close()


def test_tenants_models_and_dtypes_never_read_each_other(server: RedisServer) -> None:
    """Two namespaces on one server, another model fingerprint, another KV dtype: no hits; the
    same namespace and model: hits."""
    ids = list(range(2000, 2033))
    a = cache_on(server.url)
    others = {
        "tenant": (cache_on(server.url), "bob"),
        "model": (cache_on(server.url, model="model-b"), "alice"),
        "dtype": (cache_on(server.url, spec=KVSpec(2, 2, 4, torch.float16)), "alice"),
    }
    same = cache_on(server.url)
    try:
        a.insert(ids, kv_for(ids, "alice"), namespace="alice")
        assert a.flush(10)
        for name, (c, ns) in others.items():
            with c.match(ids, namespace=ns) as m:
                assert m.num_tokens == 0, name
        with same.match(ids, namespace="alice") as m:
            assert m.shared_tokens == 32
    finally:
        for c in [a, same, *(c for c, _ in others.values())]:
            c.close()


def test_shared_needs_a_model_fingerprint() -> None:
    """shared without shared_model is refused (other models' KV would be read as this one's)."""
    with pytest.raises(ValueError, match="shared_model"):
        PrefixCache(SPEC, capacity_tokens=64, block_size=BS, shared="redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="redis://"):
        PrefixCache(SPEC, capacity_tokens=64, block_size=BS, shared="http://x", shared_model="m")


_EXIT_SCRIPT = """
import sys; sys.path.insert(0, {tests!r})
from kvutil import SPEC, kv_for
from radixkv import PrefixCache, RedisOptions
c = PrefixCache(SPEC, capacity_tokens=256, block_size=4, shared=RedisOptions({url!r}, min_tokens=0), shared_model="m")
ids = list(range(3000, 3400))
c.insert(ids, kv_for(ids))
print(c.shared_stats.queued)
"""


def test_a_normal_exit_flushes_pending_writes(server: RedisServer) -> None:
    """A process that inserts and exits without calling flush still writes its blocks."""
    out = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT.format(tests=str(TESTS), url=server.url)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert out.stdout.strip() == "64"
    probe = cache_on(server.url, model="m", capacity=512)
    try:
        with probe.match(list(range(3000, 3400))) as m:
            assert m.shared_tokens == 256
    finally:
        probe.close()


# ----- faults -----------------------------------------------------------------------------------
def test_server_down_at_start_warns_once_then_recovers() -> None:
    """Down at start: one TierWarning, match/insert serve locally without raising; once a server
    listens on the port, the tier reconnects in the background and serves."""
    port = free_port()
    ids = list(range(4000, 4033))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = cache_on(opts(f"redis://127.0.0.1:{port}/0"))
        assert c.insert(ids, kv_for(ids)) == 32
        with c.match(ids) as m:
            assert m.num_tokens == 32
        for _ in range(3):
            with c.match(list(range(9000, 9020))) as m:
                assert m.num_tokens == 0
    assert [str(w.message) for w in caught if issubclass(w.category, TierWarning)].__len__() == 1
    assert c.shared_stats is not None and not c.shared_stats.up
    srv = RedisServer(port=port).start()
    try:
        wait_for(lambda: c.shared_stats.up)  # type: ignore[union-attr]
        c.insert(list(range(5000, 5033)), kv_for(list(range(5000, 5033))))
        assert c.flush(10)
        assert c.shared_stats.written == 8 and c.shared_stats.reconnects == 1  # type: ignore[union-attr]
    finally:
        c.close()
        srv.stop()


def test_server_killed_mid_run_never_raises_and_reconnects(fresh_server: RedisServer) -> None:
    """A server killed between calls: match and insert go on locally (counted errors), then the
    tier reconnects with backoff to the restarted server and serves again."""
    srv = fresh_server
    a, b = cache_on(srv.url), cache_on(srv.url)
    try:
        ids = list(range(6000, 6033))
        a.insert(ids, kv_for(ids))
        assert a.flush(10)
        srv.kill()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TierWarning)
            with b.match(ids) as m:
                assert m.num_tokens == 0
            more = list(range(7000, 7033))
            b.insert(more, kv_for(more))
            assert b.flush(10)
        s = b.shared_stats
        assert s is not None and not s.up and s.errors + s.timeouts >= 1
        srv.start()  # the same port
        wait_for(lambda: b.shared_stats.up)  # type: ignore[union-attr]
        c = list(range(8000, 8033))
        b.insert(c, kv_for(c))
        assert b.flush(10)
        fresh = cache_on(srv.url)
        with fresh.match(c) as m:
            assert m.shared_tokens == 32
        fresh.close()
        assert b.shared_stats.reconnects >= 1  # type: ignore[union-attr]
    finally:
        a.close()
        b.close()


def test_a_slow_server_costs_a_request_one_timeout(fresh_server: RedisServer) -> None:
    """A server that stops answering (CLIENT PAUSE 3 s): a match returns well before the pause
    ends, as a miss with a counted timeout, and serves again once the server answers."""
    srv = fresh_server
    c = cache_on(opts(srv.url, timeout_seconds=0.2))
    ids = list(range(9100, 9133))
    pauser = srv.client()
    try:
        pauser.execute_command("CLIENT", "PAUSE", 3000, "ALL")
        t0 = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TierWarning)
            with c.match(ids) as m:
                assert m.num_tokens == 0
        assert time.monotonic() - t0 < 2.0
        assert c.shared_stats.timeouts == 1  # type: ignore[union-attr]
        wait_for(lambda: c.shared_stats.up)  # type: ignore[union-attr]
    finally:
        pauser.execute_command("CLIENT", "UNPAUSE")
        c.close()


def test_requirepass_password_in_url_works_wrong_or_missing_fails_naming_it() -> None:
    """With requirepass, the URL's password connects; a wrong or missing one raises
    SharedTierError at construction, saying the server refused the password (not printing it)."""
    srv = RedisServer(password="s3cret-pw").start()
    try:
        c = cache_on(srv.url)
        assert c.shared_stats.up  # type: ignore[union-attr]
        c.close()
        bad = f"redis://:wrong-pw@127.0.0.1:{srv.port}/0"
        with pytest.raises(SharedTierError, match=r"refused the password.*wrong password") as err:
            cache_on(bad)
        assert "wrong-pw" not in str(err.value)
        with pytest.raises(SharedTierError, match="requires one"):
            cache_on(f"redis://127.0.0.1:{srv.port}/0")
    finally:
        srv.stop()


# ----- cluster ------------------------------------------------------------------------------------
def test_a_three_node_cluster_serves_and_spreads_keys() -> None:
    """On a 3-node Redis Cluster (detected from the server), a second cache reads the first's
    prefix in full, and the blocks' keys land on every node (no cross-slot command needed)."""
    cluster = RedisCluster().start()
    try:
        a, b = cache_on(cluster.url, capacity=512), cache_on(cluster.url, capacity=512)
        ids = list(range(10_000, 10_241))  # 60 blocks
        a.insert(ids, kv_for(ids))
        assert a.flush(10)
        with b.match(ids) as m:
            assert m.shared_tokens == 240
            got = b.gather(m)
        want = kv_for(ids[:240])
        assert all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(got, want, strict=True))
        assert a.shared_stats.cluster  # type: ignore[union-attr]
        sizes = [n.client().dbsize() for n in cluster.nodes]
        assert sum(sizes) == 60 and min(sizes) > 0
        a.close()
        b.close()
    finally:
        cluster.stop()


def test_concurrent_matches_and_inserts_stay_consistent(server: RedisServer) -> None:
    """Threads matching and inserting overlapping prefixes through Redis with a small pool:
    every gathered KV equals its tokens' KV and the invariants hold."""
    writer, reader = cache_on(server.url, capacity=512), cache_on(server.url, capacity=64)
    base = list(range(20_000, 20_040))
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            ids = base + list(range(30_000 + 100 * i, 30_000 + 100 * i + 8 * (i % 3 + 1)))
            writer.insert(ids, kv_for(ids))
            writer.flush(10)
            for _ in range(3):
                with reader.match(ids) as m:
                    got = reader.gather(m)
                    want = kv_for(ids[: m.num_tokens])
                    assert all(torch.equal(g[0], w[0]) for g, w in zip(got, want, strict=True))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors[0]
        reader.check_invariants()
        writer.check_invariants()
        assert reader.shared_stats.hits > 0  # type: ignore[union-attr]
    finally:
        writer.close()
        reader.close()


def test_redis_continues_where_the_host_tier_stops(server: RedisServer) -> None:
    """The shared tier is the lowest: a match takes what the host tier holds first, then the
    rest of the prefix from Redis, and the whole KV is exact."""
    ids = list(range(40_000, 40_081))  # 20 blocks + 1 token
    a = cache_on(server.url, capacity=128)
    b = PrefixCache(
        SPEC, capacity_tokens=128, block_size=BS, eviction="lru", host_capacity_tokens=256,
        shared=opts(server.url), shared_model="model-a",
    )  # fmt: skip
    try:
        a.insert(ids, kv_for(ids))
        assert a.flush(10)
        b.insert(ids[:32], kv_for(ids[:32]))  # 8 blocks, then pushed down to the host tier
        b.evict(32)
        with b.match(ids) as m:
            assert (m.num_tokens, m.host_tokens, m.shared_tokens) == (80, 32, 48)
            got = b.gather(m)
        want = kv_for(ids[:80])
        assert all(torch.equal(g[i], w[i]) for g, w in zip(got, want, strict=True) for i in (0, 1))
        b.check_invariants()
    finally:
        a.close()
        b.close()
