"""PrefixCache: the public facade over the tree, the block allocator and the KV pool."""

from __future__ import annotations

import math
import os
import threading
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from .core.blocks import BlockAllocator
from .core.hashing import chain_hashes, namespace_key, pack_tokens, root_hash
from .core.policy import EvictionPolicy
from .core.pool import KVPool, LayerKV
from .core.quant import KVQuantizer, kv_bytes_per_token, make_quantizer
from .core.spec import KVSpec
from .core.tokens import TokenIds, as_token_list
from .core.tree import Hold, Node, RadixTree, Tenant
from .eviction.policies import DEFAULT_EVICTION, make_policy
from .tiers.tiers import CacheSide, Tiers, TierStats

if TYPE_CHECKING:
    from .tiers.redis import RedisOptions, RedisStats, RedisTier


class CacheOptions(TypedDict, total=False):
    """PrefixCache's keyword arguments, for wrappers that pass them through (radixkv.wrap); each
    is documented on PrefixCache."""

    capacity_tokens: int | None
    capacity_bytes: int | None
    block_size: int
    eviction: str | EvictionPolicy
    host_capacity_tokens: int | None
    disk_path: str | os.PathLike[str] | None
    disk_capacity_bytes: int | None
    shared: str | RedisOptions | None
    shared_model: str | bytes | None
    shares: Mapping[object, float] | None
    kv_dtype: str | None
    exact_pool: bool


@dataclass(frozen=True)
class NamespaceStats:
    """One tenant's counters: tokens it has in the tree, looked up, and hit; `share_tokens` is
    its guaranteed capacity (None when it has no share of its own)."""

    cached_tokens: int
    query_tokens: int
    hit_tokens: int
    share_tokens: int | None

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of counters. Token counts are multiples of the block size except query_tokens.

    cached_tokens: in the tree. locked_tokens: held by live matches (a subset of cached, plus
    blocks of matches that outlived a `clear`). free_tokens: in no one's hands.
    free_tokens + cached_tokens + (locked tokens no longer in the tree) + (tokens that inserts
    in other threads are copying right now) == capacity_tokens.
    """

    lookups: int
    query_tokens: int
    hit_tokens: int
    inserted_tokens: int
    evicted_tokens: int
    dropped_tokens: int  # whole-block tokens inserts could not store: pool full of locked blocks
    cached_tokens: int
    locked_tokens: int
    free_tokens: int
    capacity_tokens: int
    capacity_bytes: int
    num_nodes: int
    live_matches: int
    bytes_per_token: int = 0  # pool bytes per cached token (codes and scales when the pool is quantised)
    kv_dtype: str | None = None  # None: stored exactly in the spec's dtype
    exact_pool: bool = False  # True: kv_dtype applies only to the lower and shared tiers
    namespaces: dict[object, NamespaceStats] = field(default_factory=dict)  # per tenant (its namespace by default)

    @property
    def hit_rate(self) -> float:
        """hit_tokens / query_tokens (0.0 before any lookup)."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def as_dict(self) -> dict[str, object]:
        """Plain values (namespaces keyed by their repr), ready for JSON."""
        out: dict[str, object] = dict(self.__dict__)
        out["hit_rate"] = self.hit_rate
        out["namespaces"] = {repr(k): {**asdict(v), "hit_rate": v.hit_rate} for k, v in self.namespaces.items()}
        return out


class PrefixMatch:
    """The longest cached prefix of a query, locked until released.

    `num_tokens` (a multiple of the block size), `block_ids` and `block_hashes` (one per
    block, xxh3-64 chained from the namespace). Use as a context manager to release on exit.
    With lower tiers, `host_tokens`, `disk_tokens` and `shared_tokens` (Redis) say how many of
    the tokens were promoted from each for this match (`device_tokens` the rest); all of them
    are in the pool now.
    """

    __slots__ = (
        "num_tokens", "block_ids", "block_hashes", "namespace", "host_tokens", "disk_tokens",
        "shared_tokens", "_cache", "_node", "_released", "_id",
    )  # fmt: skip

    def __init__(
        self,
        cache: PrefixCache,
        node: Node | None,
        block_ids: tuple[int, ...],
        block_hashes: tuple[int, ...],
        num_tokens: int,
        namespace: object,
        match_id: int,
        host_tokens: int = 0,
        disk_tokens: int = 0,
    ) -> None:
        self.num_tokens = num_tokens
        self.host_tokens = host_tokens
        self.disk_tokens = disk_tokens
        self.shared_tokens = 0
        self.block_ids = block_ids
        self.block_hashes = block_hashes
        self.namespace = namespace
        self._cache = cache
        self._node = node
        self._released = False
        self._id = match_id

    @property
    def released(self) -> bool:
        return self._released

    @property
    def device_tokens(self) -> int:
        """Matched tokens that were in the device pool already."""
        return self.num_tokens - self.host_tokens - self.disk_tokens - self.shared_tokens

    def __enter__(self) -> PrefixMatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._released:
            self._cache.release(self)

    def __repr__(self) -> str:
        state = "released" if self._released else "locked"
        return f"PrefixMatch(num_tokens={self.num_tokens}, blocks={len(self.block_ids)}, {state})"


class PrefixCache:
    """A radix-tree prefix cache over token ids with a preallocated, paged KV pool.

    Contract:
      - Token ids (`token_ids` of match and insert): a list or tuple of ints, or a 1-D integer
        tensor or ndarray.
      - `match(ids)` returns the longest cached whole-block prefix and locks it; locked blocks
        are never evicted or rewritten until `release(match)` (or the match's `with` exits);
        releasing twice raises ValueError.
      - `gather(match)` copies the matched KV out: per layer (K, V) `[1, H, num_tokens, D]`.
      - `insert(ids, kv)` stores the whole blocks not yet cached, reusing cached ones untouched;
        under memory pressure it evicts unlocked leaves by the policy, and when nothing more can
        go it stores the prefix that fits and returns that count (never raises for lack of room).
      - `kv_dtype` None (default) stores KV exactly: gather returns the inserted values bit for bit.
        "int8" / "int4" store it quantised (radixkv.core.quant.KVQuantizer: per token and head,
        scales included, about 1.9x / 3.6x the float16 tokens in the same bytes); gather then
        returns approximations in the spec's dtype, and models reusing them give slightly
        different outputs than without the cache. The lower and shared tiers then keep the
        quantised blocks as stored (bit for bit) under a fingerprint naming the kv_dtype.
        `exact_pool=True` (with kv_dtype and a lower or shared tier) keeps the pool exact and
        quantises only what is kept below it: blocks are quantised when they first leave the
        pool (or are stored below directly) and dequantised when a match promotes them. Pool
        hits are then exact and pay no dequantisation; promoted blocks are approximations, and
        are never quantised again (that would compound their error): the host tier keeps its
        stored copy of what it promotes, and a promoted block whose stored copy is gone is
        dropped when evicted, not demoted. Disk files and Redis keys are the same as kv_dtype's
        alone, so a restart may switch between the two.
      - `eviction` orders the evictable leaves: a name in POLICIES or an EvictionPolicy instance.
        The default, DEFAULT_EVICTION ("adaptive"), is LRU, taking the learned reuse order only
        while a sampled miniature replay shows it winning (radixkv.eviction.adaptive.Adaptive).
      - Entries in different namespaces never share nodes or blocks.
      - `shares={tenant: fraction}` guarantees each listed tenant that fraction of the blocks;
        unlisted tenants share the rest. Under pressure, blocks go first from tenants above their
        share (never more than the excess); a tenant within its share loses blocks only to its
        own inserts (an insert that finds only other tenants' guaranteed blocks stores what
        fits). A call's tenant is its `tenant=` argument, or else its namespace. Without
        `shares`, one order over all leaves, as the policy says. `stats.namespaces` has each
        tenant's cached, query and hit tokens.
      - Bad arguments raise ValueError/TypeError naming the argument; nothing changes then.
      - All methods are thread-safe: one lock around bookkeeping, and no KV copy of `match`,
        `insert` or `gather` under it (gather reads locked blocks; insert writes blocks no one
        can reach yet), so lookups never wait behind a copy. `clear()` empties the tree; blocks
        of live matches stay valid until released.
      - Lower tiers (optional; without them nothing changes): `host_capacity_tokens` keeps
        evicted blocks in host memory, `disk_path` + `disk_capacity_bytes` keeps what leaves
        the host (or the pool, without a host tier) in files that later processes reuse.
        `match` promotes the longest lower-tier continuation into the pool before it returns
        (`PrefixMatch.host_tokens` / `disk_tokens`); disk files are read and written without
        the cache lock. `clear()` also empties the host tier; disk files stay. See `Tiers`.
      - Shared tier (optional): `shared="redis://[:password@]host:port/db"` (or RedisOptions)
        with `shared_model`, a fingerprint of the model and its weights (wrap computes it), is
        the lowest tier. A match still short of the query after the local tiers fetches the
        longest verified continuation from Redis (one round trip per batch of blocks, without
        the cache lock) and promotes it (`PrefixMatch.shared_tokens`). `insert` queues the
        blocks it newly stores for a background writer. `flush()` waits for queued writes;
        `close()` stops the writer; `clear()` leaves Redis as it is. Server trouble never raises
        from match or insert (it is counted in `shared_stats`); a refused password raises at
        construction. See RedisTier.
    Costs: match O(matched tokens) in C plus O(depth) Python steps, under the lock, plus the
    policy's hit hook per matched node (the default "adaptive" replays sampled blocks in Python:
    a few steps per matched block in caches up to 2,048 blocks, per sampled block above: a
    fraction 2,048 / capacity, at least 1%). insert takes
    the lock twice: first O(depth + matched tokens) to find what is new, O(new blocks) hashing,
    the evictions it needs and the allocation (the path it extends stays locked); then, without
    the lock, one copy per layer for K and V into the new blocks (and the Redis write-through's
    copy); then O(depth + new tokens) to attach them, where blocks another thread stored in the
    meantime keep that thread's copy and this one's go back to the free list. Until then the
    new blocks are neither free nor cached, and not matchable. An insert with nothing new (or
    no room) takes the lock once. Eviction O(log leaves) per leaf touched; promotions from the
    lower tiers copy under the lock (disk and Redis reads do not).
    Edge cases: `evict(0)` and inserts shorter than one block do nothing; a match never
    exceeds the query, so callers that must compute one token pass `ids[:-1]`.
    """

    def __init__(
        self,
        spec: KVSpec,
        *,
        capacity_tokens: int | None = None,
        capacity_bytes: int | None = None,
        block_size: int = 16,
        eviction: str | EvictionPolicy = DEFAULT_EVICTION,
        host_capacity_tokens: int | None = None,
        disk_path: str | os.PathLike[str] | None = None,
        disk_capacity_bytes: int | None = None,
        shared: str | RedisOptions | None = None,
        shared_model: str | bytes | None = None,
        shares: Mapping[object, float] | None = None,
        kv_dtype: str | None = None,
        exact_pool: bool = False,
    ) -> None:
        if not isinstance(spec, KVSpec):
            raise TypeError(f"spec must be a radixkv.KVSpec, got {type(spec).__name__}")
        _check_int("block_size", block_size, minimum=1)
        quantizer = make_quantizer(kv_dtype, spec)
        if not isinstance(exact_pool, bool):
            raise TypeError(f"exact_pool must be a bool, got {type(exact_pool).__name__}")
        if exact_pool and quantizer is None:
            raise ValueError("exact_pool=True keeps the pool exact and quantises the lower tiers: it needs a kv_dtype")
        if exact_pool and host_capacity_tokens is None and disk_path is None and shared is None:
            raise ValueError(
                "exact_pool=True quantises only blocks kept below the pool: give host_capacity_tokens, "
                "disk_path or shared (without them the cache is simply exact: drop kv_dtype)"
            )
        per_token = kv_bytes_per_token(spec, None if exact_pool else quantizer)
        tier_per_token = kv_bytes_per_token(spec, quantizer)
        if (capacity_tokens is None) == (capacity_bytes is None):
            raise ValueError("give exactly one of capacity_tokens or capacity_bytes")
        if capacity_tokens is not None:
            _check_int("capacity_tokens", capacity_tokens, minimum=1)
            which, tokens = "capacity_tokens", capacity_tokens
        else:
            _check_int("capacity_bytes", capacity_bytes, minimum=1)
            which, tokens = "capacity_bytes", capacity_bytes // per_token  # type: ignore[operator]
        num_blocks = tokens // block_size
        if num_blocks < 1:
            raise ValueError(
                f"{which}={capacity_tokens if capacity_tokens is not None else capacity_bytes} is smaller "
                f"than one block ({block_size} tokens x {per_token} bytes)"
            )
        _check_fits(which, num_blocks * block_size * per_token, spec.device)
        host_blocks = _check_tiers(
            spec, block_size, host_capacity_tokens, disk_path, disk_capacity_bytes, tier_per_token
        )
        self.spec = spec
        self.block_size = block_size
        self.kv_dtype = kv_dtype
        self.exact_pool = exact_pool
        self.bytes_per_token = per_token
        share_blocks = _share_blocks(shares, num_blocks)
        self.policy = make_policy(eviction)
        self.policy.bind(num_blocks)
        self._pool = KVPool(spec, num_blocks, block_size, quantizer, quantize_below=exact_pool)
        self._blocks = BlockAllocator(num_blocks)
        rest = num_blocks - sum(share_blocks.values())
        self._tree = RadixTree(block_size, self.policy, share_blocks or None, rest)
        self._lock = threading.RLock()
        self._live: dict[int, PrefixMatch] = {}
        self._writes: dict[int, _Write] = {}  # inserts copying KV outside the lock, by id
        self._next_match = 0
        self._tiers: Tiers[PrefixMatch] | None = None
        if host_blocks or disk_path is not None:
            side = CacheSide(self._lock, self._pool, self._tree.peek, self._promote, self._take_match)
            self._tiers = Tiers(side, host_blocks, disk_path, disk_capacity_bytes)
            self._tree.on_evict = self._tiers.demote
        self._shared: RedisTier | None = None
        if shared is not None:
            self._shared = _make_shared(shared, shared_model, spec, block_size, self._pool.tier_quantizer)
        elif shared_model is not None:
            raise ValueError("shared_model is only used with shared (a redis:// URL)")
        self.reset_stats()

    # ----- properties ------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self._blocks.num_blocks * self.block_size

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            bs = self.block_size
            return CacheStats(
                lookups=self._lookups,
                query_tokens=self._query_tokens,
                hit_tokens=self._hit_tokens,
                inserted_tokens=self._inserted_tokens,
                evicted_tokens=self._evicted_tokens,
                dropped_tokens=self._dropped_tokens,
                cached_tokens=self._tree.num_blocks * bs,
                locked_tokens=self._tree.num_locked_blocks * bs,
                free_tokens=self._blocks.num_free * bs,
                capacity_tokens=self.capacity_tokens,
                capacity_bytes=self._pool.nbytes,
                num_nodes=self._tree.num_nodes,
                live_matches=len(self._live),
                bytes_per_token=self.bytes_per_token,
                kv_dtype=self.kv_dtype,
                exact_pool=self.exact_pool,
                namespaces={
                    t.name: NamespaceStats(
                        t.blocks * bs,
                        t.query_tokens,
                        t.hit_tokens,
                        None if t.group.share is None or t.group is self._tree.groups[-1] else t.group.share * bs,
                    )
                    for t in self._tree.tenants.values()
                },
            )

    def reset_stats(self) -> None:
        """Zero the traffic counters (lookups, query/hit/inserted/evicted/dropped tokens)."""
        with self._lock:
            self._lookups = self._query_tokens = self._hit_tokens = 0
            self._inserted_tokens = self._evicted_tokens = self._dropped_tokens = 0
            for t in self._tree.tenants.values():
                t.query_tokens = t.hit_tokens = 0
            if self._tiers is not None:
                self._tiers.reset_stats()
        if self._shared is not None:
            self._shared.reset_stats()

    @property
    def shared_stats(self) -> RedisStats | None:
        """Counters of the shared (Redis) tier; None without one."""
        return self._shared.snapshot() if self._shared is not None else None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the writes queued for the shared tier are stored or dropped (False if
        `timeout` seconds ran out first). Without a shared tier, returns True at once."""
        return self._shared.flush(timeout) if self._shared is not None else True

    def close(self, timeout: float | None = None) -> None:
        """Flush and stop using the shared tier (local tiers keep serving). Idempotent."""
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.close(timeout)

    @property
    def tier_stats(self) -> dict[str, TierStats]:
        """Counters of the lower tiers by name ("host", "disk"); empty without tiers."""
        with self._lock:
            return self._tiers.stats() if self._tiers is not None else {}

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"PrefixCache(policy={self.policy.name!r}, block_size={self.block_size}, "
            f"cached={s.cached_tokens}/{s.capacity_tokens} tokens, locked={s.locked_tokens})"
        )

    # ----- lookup ----------------------------------------------------------------------
    def match(self, token_ids: TokenIds, namespace: object = None, *, tenant: object = None) -> PrefixMatch:
        """Longest cached whole-block prefix of `token_ids`, locked until `release`.
        `tenant` (default: the namespace) is whose counters the lookup feeds; see `insert`."""
        ids, packed = as_token_list(token_ids, "token_ids")
        ns_key, tenant_key, tenant_name = _keys(namespace, tenant)
        with self._lock:
            self._tree.tenant(tenant_key, tenant_name, ns_key)  # the namespace's owner, for the counters
            if self._tiers is None:  # one lock round trip on the common path
                m = self._take_match(ids, ns_key, namespace)
        if self._tiers is not None:  # takes the lock itself, and not across disk reads
            m = self._tiers.match(ids, packed, ns_key, namespace)
        if self._shared is not None and m.num_tokens < len(ids) // self.block_size * self.block_size:
            # (_extend_from_shared reads self._shared again: close() may have dropped it.)
            try:
                m = self._extend_from_shared(m, ids, packed, ns_key, namespace)
            except BaseException:
                if not m.released:
                    self.release(m)
                raise
        return m

    def _extend_from_shared(
        self, m: PrefixMatch, ids: list[int], packed: array, ns_key: bytes, namespace: object
    ) -> PrefixMatch:
        """Fetch the continuation of `m` (live, locked) from the shared tier and promote it;
        returns the longer match that replaces `m` (released then), or `m` itself."""
        shared, bs = self._shared, self.block_size
        if shared is None or not shared.up:
            return m
        start, stop = m.num_tokens // bs, len(ids) // bs
        if (stop - start) * bs < max(shared.options.min_tokens, 1):
            return m
        prev = m.block_hashes[-1] if m.block_hashes else root_hash(ns_key)
        hashes = chain_hashes(prev, memoryview(packed)[start * bs : stop * bs], bs)
        # Without the cache lock: a round trip per batch. m's lock keeps its path in the tree.
        kv = shared.read(ns_key, prev, hashes, ids[start * bs : stop * bs])  # [k, L, 2, H, bs, D]
        k = kv.shape[0]
        if k == 0:
            return m
        with self._lock:
            promoted, missed = self._promote(ids, ns_key, start, hashes[:k], kv)
            self._dropped_tokens += missed * bs
            longer = self._take_match(ids, ns_key, namespace, m.host_tokens, m.disk_tokens, replaces=m)
            longer.shared_tokens = min(promoted * bs, longer.num_tokens - m.num_tokens)
            self.release(m)
        if self._tiers is not None:
            self._tiers.flush()  # disk writes of what the promotion demoted, without the lock
        return longer

    def _promote(
        self, ids: list[int], ns_key: bytes, start: int, hashes: list[int], blocks: torch.Tensor
    ) -> tuple[int, int]:
        """Attach blocks [start, start + len(hashes)) of `ids`, their KV `blocks` in the pool's
        stored form `[n, L, 2, H, bs, D or W]`, past whatever the tree holds of them by now (lock
        held). Evicts for the namespace's tenant; returns (blocks attached, blocks that did not
        fit). The promotion of every lower tier (host, disk, Redis) goes through here."""
        tree, bs, n = self._tree, self.block_size, len(hashes)
        skip = tree.peek(ns_key, ids, start + n)[1] - start  # blocks another thread stored meanwhile
        if skip >= n or skip < 0:  # skip < 0: a clear() detached the path; nothing to extend
            return 0, 0
        held = tree.hold(ns_key, ids, start + n)  # the same node: nothing changed since the peek
        try:
            want = n - skip
            short = want - self._blocks.num_free
            if short > 0:
                self._evict_blocks(short, held.root.owner)
            take = min(want, self._blocks.num_free)
            if take == 0:
                return 0, want
            block_ids = self._blocks.allocate(take)
            try:
                self._pool.write_blocks(block_ids, blocks[skip : skip + take])
            except BaseException:
                self._blocks.free(block_ids)  # never linked: nothing half-written is reachable
                raise
            new_tokens = ids[held.matched * bs : (held.matched + take) * bs]
            tree.attach(held.node, new_tokens, block_ids, hashes[skip : skip + take], 0)
            return take, want - take
        finally:
            self._blocks.free(tree.unhold(held))

    def _take_match(
        self,
        ids: list[int],
        ns_key: bytes,
        namespace: object,
        host_tokens: int = 0,
        disk_tokens: int = 0,
        replaces: PrefixMatch | None = None,
    ) -> PrefixMatch:
        """The device match (lock held), counted as a lookup; the tiers pass what they promoted
        for it. `replaces`: an earlier match of the same lookup that this one supersedes (the
        lookup stays counted once; only the hit tokens it adds are counted)."""
        owner = self._tree.owner_of(ns_key)
        found = self._tree.lookup(ns_key, ids, len(ids) // self.block_size)
        num_tokens = len(found.block_ids) * self.block_size
        if replaces is None:
            self._lookups += 1
            self._query_tokens += len(ids)
            owner.query_tokens += len(ids)
            hit = num_tokens
        else:
            hit = num_tokens - replaces.num_tokens
        self._hit_tokens += hit
        owner.hit_tokens += hit
        self._next_match += 1
        m = PrefixMatch(
            self, found.node, tuple(found.block_ids), tuple(found.block_hashes), num_tokens, namespace,
            self._next_match, host_tokens, disk_tokens,
        )  # fmt: skip
        self._live[m._id] = m
        return m

    def release(self, match: PrefixMatch) -> None:
        """Unlock a match's blocks. Releasing twice, or a match of another cache, raises ValueError."""
        with self._lock:
            self._check_match(match)
            match._released = True
            del self._live[match._id]
            if match._node is not None:
                self._blocks.free(self._tree.release(match._node))

    def gather(self, match: PrefixMatch, *, start: int = 0, stop: int | None = None) -> list[LayerKV]:
        """Per layer (K, V) of matched tokens [start, stop), each `[1, num_kv_heads, stop - start, head_dim]`.

        `start` and `stop` (default: all matched tokens) are multiples of the block size with
        0 <= start <= stop <= num_tokens; a part of a match is gathered without copying the
        rest (e.g. rows that hold a shared prefix once gather only their own tokens). Fresh
        tensors: callers may modify them. The match must be live (not released).
        """
        with self._lock:
            self._check_match(match)
        n, bs = match.num_tokens, self.block_size
        stop = n if stop is None else stop
        for name, value in (("start", start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, int) or value % bs or not 0 <= value <= n:
                raise ValueError(f"{name} must be a multiple of block_size={bs} in [0, {n}], got {value!r}")
        if start > stop:
            raise ValueError(f"start must be <= stop, got start={start}, stop={stop}")
        # Locked blocks are never rewritten, so the copy needs no lock.
        return self._pool.gather(match.block_ids[start // bs : stop // bs])

    def _check_match(self, match: object) -> None:
        if not isinstance(match, PrefixMatch):
            raise TypeError(f"match must be a PrefixMatch, got {type(match).__name__}")
        if match._cache is not self:
            raise ValueError("match belongs to another PrefixCache")
        if match._released:
            raise ValueError("match was already released")

    # ----- insertion -------------------------------------------------------------------
    def insert(
        self,
        token_ids: TokenIds,
        kv: Sequence[LayerKV],
        namespace: object = None,
        *,
        priority: int = 0,
        tenant: object = None,
    ) -> int:
        """Store the KV of `token_ids`; returns the number of newly stored tokens.

        `kv`: per layer (K, V), each `[1, num_kv_heads, len(token_ids), head_dim]` with the
        spec's dtype and device. Only whole blocks are stored; cached blocks are not rewritten.
        `priority` is used by the "priority" policy (lower is evicted first). `tenant` (default:
        the namespace itself) is whose share the blocks count against; a namespace used with a
        tenant is a namespace of its own (its entries are apart from the same namespace's
        entries without that tenant).
        """
        ids, packed = as_token_list(token_ids, "token_ids")
        ns_key, tenant_key, tenant_name = _keys(namespace, tenant)
        _check_int("priority", priority, minimum=None)
        self._check_kv(kv, len(ids))
        bs = self.block_size
        n_full = len(ids) // bs
        if n_full == 0:
            return 0
        w: _Write | None = None
        copied = False
        stored = 0
        try:
            with self._lock:
                w = self._reserve(ids, packed, kv, n_full, ns_key, tenant_key, tenant_name, priority)
            if w is not None:
                # Outside the lock: the reserved blocks are unreachable until attached and the
                # path they extend is locked, so no other thread reads, evicts or reuses them.
                self._pool.write(w.block_ids, kv, w.held.matched * bs)
                shared = self._shared  # read once: close() may drop it from another thread
                if shared is not None:
                    # Write-through, taken from the blocks just written, only if the queue has
                    # room; the writer thread serialises and sends it.
                    pool, block_ids = self._pool, w.block_ids
                    read = lambda: pool.read_blocks(block_ids).to("cpu")  # noqa: E731
                    shared.write(ns_key, w.parent_hash, w.hashes, w.tokens, read)
                copied = True
        finally:
            if w is not None:
                with self._lock:
                    stored = self._attach(w, copied)
        if self._tiers is not None:
            self._tiers.flush()  # disk writes of what the insert demoted, without the lock
        return stored * bs

    def _reserve(
        self,
        ids: list[int],
        packed: array,
        kv: Sequence[LayerKV],
        n_full: int,
        ns_key: bytes,
        tenant_key: bytes,
        tenant_name: object,
        priority: int,
    ) -> _Write | None:
        """An insert's first step (lock held): find what is new, evict room for it, allocate the
        blocks and lock the path they extend. None when there is nothing to copy."""
        tree, bs = self._tree, self.block_size
        owner = tree.tenant(tenant_key, tenant_name, ns_key)
        # The hold pins the root and locks the path, so that the eviction this insert may
        # trigger (or any other thread's) cannot remove the node it extends.
        held = tree.hold(ns_key, ids, n_full, owner, priority, tick=True)
        try:
            node, matched = held.node, held.matched
            if matched == n_full:
                self._blocks.free(tree.unhold(held))
                return None
            new_tokens = ids[matched * bs : n_full * bs]
            hashes = chain_hashes(node.last_hash, memoryview(packed)[matched * bs : n_full * bs], bs)
            want = len(hashes)
            short = want - self._blocks.num_free
            if short > 0:
                self._evict_blocks(short, node.owner)
            take = min(want, self._blocks.num_free)
            self._dropped_tokens += (want - take) * bs
            if take < want and self._tiers is not None:  # no room in the pool: keep the rest below
                prev = hashes[take - 1] if take else node.last_hash
                self._tiers.store_below(
                    node, prev, hashes[take:want], new_tokens[take * bs : want * bs], kv, matched + take
                )
            if take == 0:
                self._blocks.free(tree.unhold(held))
                return None
            block_ids = self._blocks.allocate(take)
        except BaseException:
            self._blocks.free(tree.unhold(held))
            raise
        self._next_match += 1
        w = _Write(self._next_match, held, block_ids, hashes[:take], new_tokens[: take * bs], priority, node.last_hash)
        self._writes[w.id] = w
        return w

    def _attach(self, w: _Write, copied: bool) -> int:
        """An insert's last step (lock held): link the copied blocks under the held node, or give
        them back when the copy failed. Blocks another thread stored meanwhile (an insert of the
        same prefix) are kept as that thread linked them and this insert's copies go back, as do
        all of them when a `clear` detached the path. Returns the blocks newly stored."""
        tree, bs = self._tree, self.block_size
        del self._writes[w.id]
        block_ids, stored = w.block_ids, 0
        try:
            node = w.held.node
            if copied and not node.detached:
                n = len(block_ids)
                parent, dup = tree.descend(node, w.tokens, n)
                if dup < n:
                    tree.attach(parent, w.tokens[dup * bs :], block_ids[dup:], w.hashes[dup:], w.priority)
                block_ids, stored = block_ids[:dup], n - dup
                self._inserted_tokens += stored * bs
        finally:
            self._blocks.free(block_ids)
            self._blocks.free(tree.unhold(w.held))
        return stored

    def _check_kv(self, kv: object, num_tokens: int) -> None:
        spec = self.spec
        if not isinstance(kv, (list, tuple)):
            raise TypeError(f"kv must be a list of (K, V) tensor pairs per layer, got {type(kv).__name__}")
        if len(kv) != spec.num_layers:
            raise ValueError(f"kv has {len(kv)} layers, the spec has num_layers={spec.num_layers}")
        want = (1, spec.num_kv_heads, num_tokens, spec.head_dim)
        for layer, pair in enumerate(kv):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise TypeError(f"kv[{layer}] must be a (K, V) pair of tensors")
            for name, t in zip("KV", pair, strict=True):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"kv[{layer}] {name} must be a torch.Tensor, got {type(t).__name__}")
                if tuple(t.shape) != want:
                    raise ValueError(
                        f"kv[{layer}] {name} has shape {tuple(t.shape)}, expected {want} "
                        "[1, num_kv_heads, len(token_ids), head_dim]"
                    )
                if t.dtype != spec.dtype:
                    raise ValueError(f"kv[{layer}] {name} has dtype {t.dtype}, the spec has {spec.dtype}")
                if t.device != spec.device:
                    raise ValueError(f"kv[{layer}] {name} is on {t.device}, the spec has {spec.device}")

    # ----- eviction --------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Evict at least `num_tokens` (rounded up to whole blocks) from unlocked leaves, if
        there are that many; returns the number of tokens evicted. `evict(0)` does nothing."""
        _check_int("num_tokens", num_tokens, minimum=0)
        with self._lock:
            blocks = -(-num_tokens // self.block_size)
            evicted = self._evict_blocks(blocks) * self.block_size
        if self._tiers is not None:
            self._tiers.flush()
        return evicted

    def _evict_blocks(self, num_blocks: int, requester: Tenant | None = None) -> int:
        freed = self._tree.evict(num_blocks, requester)
        self._blocks.free(freed)
        self._evicted_tokens += len(freed) * self.block_size
        return len(freed)

    def clear(self) -> None:
        """Drop every entry. Blocks of live matches stay readable until those are released."""
        with self._lock:
            self._blocks.free(self._tree.clear())
            if self._tiers is not None:
                self._tiers.clear()

    # ----- integrity -------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError describing the first broken invariant.

        Cost: O(cached tokens) hashing (every cached block's hash is recomputed from its tokens)
        plus O(blocks + nodes + total path length of the live matches), plus the policy's and
        the tiers' own checks. Meant for tests, not for a serving loop.
        """
        with self._lock:
            tree = self._tree
            tree.check()
            ends: list[Node] = []
            for m in self._live.values():
                assert not m._released, f"{m} is released but still registered"
                if m._node is None:
                    assert m.num_tokens == 0 and not m.block_ids, f"{m} has blocks but no node"
                    continue
                block_ids, _ = tree.blocks_along(m._node)
                assert list(m.block_ids) == block_ids, f"{m} no longer matches its path's blocks"
                assert len(m.block_ids) * self.block_size == m.num_tokens, f"{m} counts tokens wrongly"
                ends.append(m._node)
            ends += [w.held.node for w in self._writes.values() if w.held.node.parent is not None]
            # Locks: each node's lock_ref is the live matches and in-flight inserts through it.
            held = tree.check_locks(ends, [w.held.root for w in self._writes.values()])
            # Accounting: free + in the tree + held only by matches that outlived a clear + being
            # written by inserts in flight == all.
            held += [b for n in tree.iter_nodes() for b in n.block_ids]
            held += [b for w in self._writes.values() for b in w.block_ids]
            self._blocks.check(held)
            # Hash chain: recompute every block's hash from its parent and its tokens.
            for node in tree.iter_nodes():
                assert node.parent is not None
                want_h = chain_hashes(node.parent.last_hash, pack_tokens(node.tokens), self.block_size)
                assert want_h == node.block_hashes, f"{node} has block hashes that do not match its tokens"
            self.policy.check()
            if self._tiers is not None:
                self._tiers.check()

    def refcount(self, block_id: int) -> int:
        """Holders of a block: 1 for the tree (if cached) + live matches and in-flight inserts whose
        path covers it. O(nodes)."""
        with self._lock:
            ends = [m._node for m in self._live.values() if m._node is not None]
            ends += [w.held.node for w in self._writes.values()]
            nodes = list(self._tree.iter_nodes())
            nodes += [n for end in ends for n in RadixTree.path(end)]
            for node in {n.uid: n for n in nodes}.values():
                if block_id in node.block_ids:
                    return (0 if node.detached else 1) + node.lock_ref
            return 0


@dataclass(frozen=True)
class _Write:
    """An insert between reserving its blocks and attaching them: `held` pins its namespace
    and locks the path the run extends; `block_ids` (allocated, unreachable) receive the KV of
    `tokens`, whose chain `hashes` starts from `parent_hash`."""

    id: int
    held: Hold
    block_ids: list[int]
    hashes: list[int]
    tokens: list[int]
    priority: int
    parent_hash: int


def _keys(namespace: object, tenant: object) -> tuple[bytes, bytes, object]:
    """(tree namespace key, tenant key, tenant name) of a call. Without a tenant the namespace is
    its own; with one, the tree key is tagged "G" (a tag no namespace encoding starts with), so
    that (namespace, tenant) pairs never collide with plain namespaces or each other."""
    ns_key = namespace_key(namespace)
    if tenant is None:
        return ns_key, ns_key, namespace
    tenant_key = namespace_key(tenant, "tenant")
    return b"G" + len(tenant_key).to_bytes(4, "little") + tenant_key + ns_key, tenant_key, tenant


def _share_blocks(shares: object, num_blocks: int) -> dict[bytes, int]:
    """Validate `shares` ({tenant: fraction of the capacity}) and convert it to guaranteed blocks."""
    if shares is None:
        return {}
    if not isinstance(shares, Mapping):
        raise TypeError(f"shares must be a mapping {{namespace: fraction}}, got {type(shares).__name__}")
    out: dict[bytes, int] = {}
    total = 0.0
    for name, frac in shares.items():
        key = namespace_key(name, "shares key")
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1 or math.isnan(frac):
            raise ValueError(f"shares[{name!r}] must be a fraction in (0, 1], got {frac!r}")
        total += frac
        out[key] = int(frac * num_blocks)
    if total > 1 + 1e-9:
        raise ValueError(f"shares add up to {total:g}, more than the whole capacity (1)")
    return out


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _make_shared(
    shared: object, shared_model: object, spec: KVSpec, block_size: int, quantizer: KVQuantizer | None
) -> RedisTier:
    """Validate the shared-tier arguments and connect (SharedTierError on a refused password)."""
    from .tiers.redis import RedisOptions, RedisTier

    if isinstance(shared, str):
        options = RedisOptions(shared)
    elif isinstance(shared, RedisOptions):
        options = shared
    else:
        raise TypeError(f"shared must be a redis:// URL or RedisOptions, got {type(shared).__name__}")
    if shared_model is None:
        raise ValueError(
            "shared needs shared_model: a fingerprint of the model and its weights (radixkv.wrap computes "
            "one), so that replicas of other models never read each other's KV"
        )
    if not isinstance(shared_model, (str, bytes)) or not shared_model:
        raise TypeError(f"shared_model must be a non-empty str or bytes, got {shared_model!r:.60}")
    return RedisTier(options, spec, block_size, shared_model, quantizer)


def _check_tiers(
    spec: KVSpec,
    block_size: int,
    host_capacity_tokens: int | None,
    disk_path: object,
    disk_capacity_bytes: int | None,
    bytes_per_token: int,
) -> int:
    """Validate the lower-tier arguments; returns the host tier's size in blocks."""
    host_blocks = 0
    if host_capacity_tokens is not None:
        _check_int("host_capacity_tokens", host_capacity_tokens, minimum=0)
        host_blocks = host_capacity_tokens // block_size
        _check_fits("host_capacity_tokens", host_blocks * block_size * bytes_per_token, "cpu")
    if disk_capacity_bytes is not None:
        _check_int("disk_capacity_bytes", disk_capacity_bytes, minimum=0)
        if disk_path is None:
            raise ValueError("disk_capacity_bytes needs disk_path (the directory of the disk tier)")
    if disk_path is not None:
        if not isinstance(disk_path, (str, os.PathLike)):
            raise TypeError(f"disk_path must be a str or os.PathLike, got {type(disk_path).__name__}")
        if disk_capacity_bytes is None:
            raise ValueError("disk_path needs disk_capacity_bytes (the most bytes the disk tier may use)")
        if os.path.exists(disk_path) and not os.path.isdir(disk_path):
            raise ValueError(f"disk_path={os.fspath(disk_path)!r} exists and is not a directory")
    return host_blocks


def _check_fits(which: str, nbytes: int, device: torch.device | Any) -> None:
    """Refuse a pool larger than the device's memory instead of failing or thrashing later."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        limit, what = free, "free CUDA memory"
    elif device.type == "cpu":
        limit, what = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    else:
        return
    if nbytes > limit:
        raise ValueError(
            f"{which} asks for a {nbytes / 2**30:.1f} GiB pool, more than the {limit / 2**30:.1f} GiB of {what}"
        )
