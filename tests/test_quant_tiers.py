"""Quantised pools with lower tiers: host, disk and Redis keep the pool's codes and scales, so a
block's dequantised KV is bit-identical whichever tier it comes back from, and stored KV of one
kv_dtype is never served to a cache of another."""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from radixkv.benchmarks.shared import RedisServer

from radixkv import KVSpec, PrefixCache, RedisOptions
from radixkv.core import quant as quant_module
from radixkv.core.quant import KVQuantizer
from radixkv.tiers import codec as kv_codec
from radixkv.tiers.codec import FIXED, SpecFingerprint, encode_header
from radixkv.tiers.disk import TierWarning

BS = 4
# head_dim 8: int4 packs it into 4 bytes; float32 so any change of a bit shows.
SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32)
QUANT = ("int8", "int4")
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


def random_kv(ids: list[int], seed: int) -> LayerKV:
    """Random KV of `ids` with an outlier token, different per layer, K and V."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(SPEC.num_layers):
        k, v = (torch.randn(1, SPEC.num_kv_heads, len(ids), SPEC.head_dim, generator=g) for _ in range(2))
        k[:, :, 3] *= 30
        out.append((k, v))
    return out


def cache(kv_dtype: str | None, capacity: int = 32, **tiers: object) -> PrefixCache:
    c = PrefixCache(SPEC, capacity_tokens=capacity, block_size=BS, eviction="lru", kv_dtype=kv_dtype, **tiers)
    if c._tiers is not None:
        c._tiers.min_disk_tokens = BS
    return c


def gathered(c: PrefixCache, ids: list[int]) -> tuple[int, int, int, int, LayerKV]:
    """(tokens, host, disk, shared tokens, gathered KV) of a match of `ids`."""
    with c.match(ids) as m:
        return m.num_tokens, m.host_tokens, m.disk_tokens, m.shared_tokens, c.gather(m)


def assert_identical(got: LayerKV, want: LayerKV) -> None:
    assert len(got) == len(want)
    for (gk, gv), (wk, wv) in zip(got, want, strict=True):
        assert gk.dtype == wk.dtype == SPEC.dtype
        assert torch.equal(gk, wk) and torch.equal(gv, wv), "a block came back with other KV than the pool gave"


@pytest.mark.parametrize("kv_dtype", QUANT)
def test_a_block_evicted_to_host_comes_back_bit_identical(kv_dtype: str) -> None:
    c = cache(kv_dtype, capacity=32, host_capacity_tokens=64)
    a, b = list(range(24)), list(range(100, 124))
    c.insert(a, random_kv(a, 1))
    n, _, _, _, before = gathered(c, a)
    assert n == 24
    c.insert(b, random_kv(b, 2))  # evicts most of a from the 32-token pool
    n, host, disk, _, after = gathered(c, a)
    assert n == 24 and host >= 16 and disk == 0
    assert_identical(after, before)
    assert c.tier_stats["host"].promoted_tokens >= 16
    # The host tier holds bytes in the pool's stored width, not the model dtype's.
    q = KVQuantizer(kv_dtype, SPEC.head_dim)
    assert c._tiers.host.data.dtype == torch.uint8
    assert c._tiers.host.data.shape[-1] == q.code_dim + 2 * q.scale_dim
    c.check_invariants()


@pytest.mark.parametrize("kv_dtype", QUANT)
def test_a_block_evicted_to_disk_comes_back_bit_identical_also_after_a_restart(kv_dtype: str, tmp_path: Path) -> None:
    disk = {"disk_path": tmp_path, "disk_capacity_bytes": 1 << 20}
    c = cache(kv_dtype, capacity=16, **disk)  # no host tier: evictions go straight to disk
    a, b = list(range(16)), list(range(100, 116))
    c.insert(a, random_kv(a, 3))
    _, _, _, _, before = gathered(c, a)
    c.insert(b, random_kv(b, 4))  # evicts all of a
    assert c.tier_stats["disk"].demoted_tokens == 16
    n, host, disk_tok, _, after = gathered(c, a)
    assert (n, host, disk_tok) == (16, 0, 16)
    assert_identical(after, before)
    c.check_invariants()
    again = cache(kv_dtype, capacity=16, **disk)
    n, _, disk_tok, _, restarted = gathered(again, b)  # b was demoted when a came back
    assert (n, disk_tok) == (16, 16)
    assert_identical(restarted, random_kv_via_pool(kv_dtype, b, 4))


def random_kv_via_pool(kv_dtype: str, ids: list[int], seed: int) -> LayerKV:
    """What a plain quantised pool (no tiers) gives for `ids` inserted with `random_kv(ids, seed)`."""
    plain = cache(kv_dtype, capacity=64)
    plain.insert(ids, random_kv(ids, seed))
    n, _, _, _, kv = gathered(plain, ids)
    assert n == len(ids)
    return kv


@pytest.mark.parametrize("kv_dtype", QUANT)
def test_an_insert_that_does_not_fit_stores_below_what_the_pool_would_have(kv_dtype: str) -> None:
    """Blocks an insert cannot place in the pool go to the host tier quantised exactly as the
    pool would have quantised them."""
    c = cache(kv_dtype, capacity=16, host_capacity_tokens=64)
    ids = list(range(24))
    c.insert(ids, random_kv(ids, 5))  # 4 blocks fit, 2 go below
    plain = cache(kv_dtype, capacity=64)
    plain.insert(ids, random_kv(ids, 5))
    with plain.match(ids) as m:
        want = plain._pool.read_blocks(m.block_ids[4:])  # [2, L, 2, H, bs, W] uint8
        hashes = m.block_hashes[4:]
    host = c._tiers.host
    slots = [host._index[h][0].slots[host._index[h][1]] for h in hashes]
    assert torch.equal(host.data[slots], want)
    assert c.tier_stats["host"].demoted_tokens == 8


# ----- exact_pool: an exact pool over quantised tiers ------------------------------------------
def _blockwise(kv: LayerKV) -> list[torch.Tensor]:
    """Per block of BS tokens, all its layers' K and V as one tensor."""
    stacked = torch.stack([torch.stack((k[0], v[0])) for k, v in kv])  # [L, 2, H, T, D]
    return list(stacked.split(BS, dim=3))


@pytest.mark.parametrize(("kv_dtype", "fused"), [("int8", False), ("int4", False), ("int4", True)])
def test_exact_pool_serves_exact_blocks_and_promotes_the_quantised_pools_values(
    kv_dtype: str, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int4 promotions dequantise through the fused kernel on CPU, or the plain ops."""
    monkeypatch.setattr(quant_module, "FUSED_INT4", fused)
    c = cache(kv_dtype, capacity=32, host_capacity_tokens=64, exact_pool=True)
    a, b = list(range(24)), list(range(100, 124))
    exact = random_kv(a, 1)
    c.insert(a, exact)
    n, _, _, _, got = gathered(c, a)
    assert n == 24
    assert_identical(got, exact)  # from the pool: bit for bit what was inserted
    c.insert(b, random_kv(b, 2))  # pushes most of a to the host, quantised
    n, host, _, _, got = gathered(c, a)
    assert n == 24 and host >= 16
    quantised = random_kv_via_pool(kv_dtype, a, 1)
    split = (n - host) // BS  # blocks still in the pool come first, the promoted ones after
    for i, (g, e, q) in enumerate(zip(_blockwise(got), _blockwise(exact), _blockwise(quantised), strict=True)):
        assert torch.equal(g, e if i < split else q), i
    assert c.stats.exact_pool and c.stats.bytes_per_token == SPEC.bytes_per_token
    q = KVQuantizer(kv_dtype, SPEC.head_dim)
    assert c._tiers.host.data.dtype == torch.uint8 and c._tiers.host.data.shape[-1] == q.row_bytes
    c.check_invariants()


@pytest.mark.parametrize("kv_dtype", QUANT)
def test_exact_pool_never_quantises_a_promoted_block_again(kv_dtype: str) -> None:
    """Two prefixes take turns in a pool that holds one: every round trip demotes one and
    promotes the other. A block is quantised once, when it first leaves the pool; later
    round trips serve that same stored form, so its values never drift (re-quantising
    dequantised KV moves the scale up a step each time)."""
    c = cache(kv_dtype, capacity=32, host_capacity_tokens=128, exact_pool=True)
    a, b = list(range(24)), list(range(100, 124))
    want = {}
    for ids, seed in ((a, 1), (b, 2)):
        exact, quantised = random_kv(ids, seed), random_kv_via_pool(kv_dtype, ids, seed)
        want[ids[0]] = list(zip(_blockwise(exact), _blockwise(quantised), strict=True))
    c.insert(a, random_kv(a, 1))
    c.insert(b, random_kv(b, 2))
    promoted = 0
    for _ in range(6):
        for ids in (a, b):
            n, host, _, _, got = gathered(c, ids)
            assert n == 24
            promoted += host
            for i, (g, (e, q)) in enumerate(zip(_blockwise(got), want[ids[0]], strict=True)):
                assert torch.equal(g, e) or torch.equal(g, q), (ids[0], i)
    assert promoted >= 6 * 2 * 16
    assert c._tiers.host.num_held <= 12  # one stored copy per block, never a second
    c.check_invariants()


@pytest.mark.parametrize("kv_dtype", QUANT)
def test_exact_pool_drops_a_promoted_block_whose_stored_copy_is_gone(kv_dtype: str) -> None:
    """Three prefixes rotate through a pool that holds one and a host tier that holds one: the
    host evicts the stored copies of blocks the pool still holds dequantised. When the pool
    evicts those, they are dropped, not quantised again; a later request recomputes them, as a
    miss does, and every block served is exact or the one quantised form."""
    c = cache(kv_dtype, capacity=32, host_capacity_tokens=24, exact_pool=True)
    prefixes = [(list(range(k * 100, k * 100 + 24)), k + 1) for k in range(3)]
    want = {
        ids[0]: list(
            zip(_blockwise(random_kv(ids, seed)), _blockwise(random_kv_via_pool(kv_dtype, ids, seed)), strict=True)
        )
        for ids, seed in prefixes
    }
    promoted = 0
    for _ in range(6):
        for ids, seed in prefixes:
            n, host, _, _, got = gathered(c, ids)
            promoted += host
            blocks = _blockwise(got) if n else []
            for i, (g, (e, q)) in enumerate(zip(blocks, want[ids[0]][: n // BS], strict=True)):
                assert torch.equal(g, e) or torch.equal(g, q), (ids[0], i)
            c.insert(ids, random_kv(ids, seed))  # what generate stores: the computed, exact KV
    assert promoted > 0
    c.check_invariants()


def test_exact_pool_files_are_served_to_a_quantised_pool_and_back(tmp_path: Path) -> None:
    """Both keep the same stored form under the same fingerprint: a restart may switch."""
    disk = {"disk_path": tmp_path, "disk_capacity_bytes": 1 << 20}
    c = cache("int8", capacity=16, exact_pool=True, **disk)
    a, b = list(range(16)), list(range(100, 116))
    c.insert(a, random_kv(a, 3))
    c.insert(b, random_kv(b, 4))  # a goes to disk
    plain = cache("int8", capacity=16, **disk)
    n, _, disk_tok, _, got = gathered(plain, a)
    assert (n, disk_tok) == (16, 16)
    assert_identical(got, random_kv_via_pool("int8", a, 3))
    plain.insert(list(range(200, 216)), random_kv(list(range(200, 216)), 5))  # a goes down again
    again = cache("int8", capacity=16, exact_pool=True, **disk)
    n, _, disk_tok, _, got = gathered(again, a)
    assert (n, disk_tok) == (16, 16)
    assert_identical(got, random_kv_via_pool("int8", a, 3))


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"kv_dtype": "int8", "exact_pool": 1, "host_capacity_tokens": 64}, TypeError, "exact_pool must be a bool"),
        ({"exact_pool": True, "host_capacity_tokens": 64}, ValueError, "needs a kv_dtype"),
        ({"kv_dtype": "int4", "exact_pool": True}, ValueError, "host_capacity_tokens, disk_path or shared"),
    ],
)
def test_exact_pool_arguments_are_checked_by_name(kwargs: dict, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        PrefixCache(SPEC, capacity_tokens=32, block_size=BS, **kwargs)


def test_a_file_of_an_older_format_version_is_a_counted_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Format 1 packed int4 codes in another order: its files must never be decoded by this
    build (they would dequantise to other values), only skipped, with a warning naming why."""
    disk = {"disk_path": tmp_path, "disk_capacity_bytes": 1 << 20}
    with monkeypatch.context() as old:
        old.setattr(kv_codec, "FORMAT_VERSION", 1)
        c = cache("int4", capacity=16, **disk)
        a, b = list(range(16)), list(range(100, 116))
        c.insert(a, random_kv(a, 6))
        c.insert(b, random_kv(b, 7))  # a goes to disk, written as format 1
        assert c.tier_stats["disk"].demoted_tokens == 16
    with pytest.warns(TierWarning, match="format version 1"):
        later = cache("int4", capacity=16, **disk)
    assert later._tiers.disk.snapshot().files_skipped == 1
    n, _, disk_tok, _, _ = gathered(later, a)
    assert (n, disk_tok) == (0, 0)
    later.check_invariants()


@pytest.mark.parametrize(("writer", "reader"), [("int8", None), (None, "int8"), ("int8", "int4"), ("int4", "int8")])
def test_a_restart_with_another_kv_dtype_gets_counted_misses_not_errors(
    writer: str | None, reader: str | None, tmp_path: Path
) -> None:
    disk = {"disk_path": tmp_path, "disk_capacity_bytes": 1 << 20}
    c = cache(writer, capacity=16, **disk)
    a, b = list(range(16)), list(range(100, 116))
    c.insert(a, random_kv(a, 6))
    c.insert(b, random_kv(b, 7))
    assert c.tier_stats["disk"].demoted_tokens == 16
    with pytest.warns(TierWarning, match="another KV spec"):
        other = cache(reader, capacity=16, **disk)
    assert other._tiers.disk.snapshot().files_skipped == 1
    n, _, disk_tok, _, _ = gathered(other, a)
    assert (n, disk_tok) == (0, 0)
    assert (other.stats.lookups, other.stats.hit_tokens) == (1, 0)
    other.check_invariants()


def test_the_stored_dtype_names_the_kv_dtype_and_the_exact_header_is_unchanged() -> None:
    exact = SpecFingerprint.of(SPEC, BS)
    int8 = SpecFingerprint.of(SPEC, BS, KVQuantizer("int8", 8))
    int4 = SpecFingerprint.of(SPEC, BS, KVQuantizer("int4", 8))
    grouped = SpecFingerprint.of(SPEC, BS, KVQuantizer("int4", 8, group=4))
    assert exact.tag == "L2-H2-D8-float32-b4"  # as exact caches always wrote it
    assert (int8.tag, int4.tag, grouped.tag) == ("L2-H2-D8-float32-int8-b4", "L2-H2-D8-float32-int4-b4",
                                                 "L2-H2-D8-float32-int4g4-b4")  # fmt: skip
    assert exact.block_bytes(4) == 2 * 2 * 2 * BS * 8 * 4
    assert int8.block_bytes(4) == 2 * 2 * 2 * BS * (8 + 2)  # codes + one float16 scale
    assert int4.block_bytes(4) == 2 * 2 * 2 * BS * (4 + 4)  # packed codes + float16 scale and minimum
    header = encode_header(exact, exact.block_bytes(4), b"ns", 0, [1], list(range(BS)), [2])
    dlen = struct.unpack_from("<I", header, 24)[0]  # after magic, version, L, H, D, block size
    assert header[FIXED.size : FIXED.size + dlen] == b"float32"


# ----- Redis --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    yield srv
    srv.stop()


def shared_cache(url: str, kv_dtype: str | None) -> PrefixCache:
    return cache(kv_dtype, capacity=64, shared=RedisOptions(url, min_tokens=0), shared_model="model-q")


@pytest.mark.parametrize("kv_dtype", QUANT)
def test_a_block_written_to_redis_comes_back_bit_identical_and_only_to_its_kv_dtype(
    kv_dtype: str, server: RedisServer
) -> None:
    base = 3000 + 100 * QUANT.index(kv_dtype)  # each kv_dtype its own ids: the server is shared
    ids = list(range(base, base + 33))  # 8 blocks + 1 token
    a = shared_cache(server.url, kv_dtype)
    others = [shared_cache(server.url, d) for d in (None, *(q for q in QUANT if q != kv_dtype))]
    b = shared_cache(server.url, kv_dtype)
    try:
        a.insert(ids, random_kv(ids, 8))
        assert a.flush(10)
        _, _, _, _, before = gathered(a, ids)
        for o in others:
            with warnings.catch_warnings():
                warnings.simplefilter("error", TierWarning)  # another key: a plain miss, no value rejected
                n, _, _, shared, _ = gathered(o, ids)
            assert (n, shared) == (0, 0), o.kv_dtype
        n, _, _, shared, after = gathered(b, ids)
        assert (n, shared) == (32, 32)
        assert_identical(after, before)
        b.check_invariants()
    finally:
        for c in (a, b, *others):
            c.close()


def test_bad_tier_arguments_still_name_themselves_with_kv_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="host_capacity_tokens"):
        cache("int8", host_capacity_tokens=-1)
    with pytest.raises(ValueError, match="disk_path needs disk_capacity_bytes"):
        cache("int4", disk_path=tmp_path)
    with pytest.raises(ValueError, match="shared needs shared_model"):
        cache("int8", shared="redis://127.0.0.1:1/0")
