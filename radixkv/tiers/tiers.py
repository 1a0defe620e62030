"""Lower tiers under the device pool: demotion on eviction, promotion on match."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import TYPE_CHECKING, Generic, TypeVar

import torch
import xxhash

from ..core.pool import KVPool, LayerKV
from .disk import DiskTier
from .host import HostTier, Run

if TYPE_CHECKING:
    from ..core.tree import Node

MIN_HOST_LOAD_TOKENS = 1
"""A host hit of at least this many tokens is promoted (a memory copy beats any recompute)."""
MIN_DISK_LOAD_TOKENS = 16
"""A disk hit shorter than this is recomputed instead. Loading even 16 tokens beat recomputing
them on the 100M-parameter models measured on a CPU (1.26x; 2-4x from 48 tokens); only a model
whose forward takes a few ms (the tiny test preset) recomputed 16 tokens faster (0.78x)."""
M = TypeVar("M")
"""The cache's match type (PrefixCache's PrefixMatch); the tiers pass it through untouched."""
_WAIT_SECONDS = 60.0  # a thread waiting on another's load of the same prefix gives up after this


@dataclass(frozen=True)
class TierStats:
    """Counters of one lower tier ("host" or "disk"). Tokens are multiples of the block size.

    hits: matches that promoted at least one block from the tier. promoted_tokens: tokens
    copied from it into the device pool. demoted_tokens: tokens stored into it on eviction.
    bytes_read / bytes_written: KV bytes moved out of / into it. load_seconds: time spent
    reading it for promotions. files_skipped: disk files that could not serve (truncated,
    corrupt, mismatched, vanished). cached_tokens / capacity: what it holds now and at most
    (disk capacity in bytes). enabled: False once a disk tier turned itself off.
    """

    hits: int
    promoted_tokens: int
    demoted_tokens: int
    bytes_read: int
    bytes_written: int
    load_seconds: float
    files_skipped: int
    cached_tokens: int
    capacity: int
    enabled: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CacheSide(Generic[M]):
    """The part of a PrefixCache that its Tiers use, and nothing more (the cache builds it).

    `lock`: the cache lock; the three calls below need it held. `pool`: the device pool, read
    (`read_blocks`) and encoded for (`encode_blocks`) on demotion.
    `peek(ns_key, ids, max_blocks) -> (prev, matched)`: the device prefix of `ids` in blocks
    and the hash its continuation chains from; locks, counts and ticks nothing.
    `promote(ids, ns_key, start, hashes, blocks) -> (attached, missed)`: attach blocks
    `[start, start + len(hashes))` of `ids` with KV `blocks` (`read_blocks`'s layout) past what
    the device holds of them, evicting for the namespace's tenant; `missed`: blocks that did
    not fit (the pool full of locked blocks).
    `take_match(ids, ns_key, namespace, host_tokens, disk_tokens) -> M`: the device match
    (`M`: the cache's match type, PrefixMatch, which this package never imports), counted as the
    lookup, with the tokens the tiers promoted for it.
    """

    lock: threading.RLock
    pool: KVPool
    peek: Callable[[bytes, list[int], int], tuple[int, int]]
    promote: Callable[[list[int], bytes, int, list[int], torch.Tensor], tuple[int, int]]
    take_match: Callable[[list[int], bytes, object, int, int], M]


class Tiers(Generic[M]):
    """The host and disk tiers of one PrefixCache, and the moves between them and the pool.

    Demotion (`demote`, called by the tree under the cache lock as blocks are evicted): the
    blocks' KV goes to the host tier; runs the host tier evicts, or every run when there is no
    host tier, are queued for the disk and written by `flush` after the cache lock is released.
    Promotion (`match`): the longest prefix over device, then host, then disk (a host run
    followed by a disk run) is copied into the pool before the match is taken, so the caller
    sees one ordinary device match. Disk files are read with the cache lock released; threads
    asking for the same disk prefix at once wait for the first one's load instead of repeating
    it. A promotion that does not fit in the pool (locked blocks) stores the prefix that does.
    Every tier keeps blocks in the pool's stored form (KVPool.read_blocks): a quantised pool's
    codes and scales move down and back up bit for bit, never re-quantised. The cache is
    reached only through `CacheSide`; attaching promoted blocks is the cache's own `promote`,
    the same one the Redis tier's promotions use.
    """

    def __init__(
        self,
        cache: CacheSide[M],
        host_blocks: int,
        disk_path: str | PathLike[str] | None,
        disk_capacity_bytes: int | None,
    ) -> None:
        self.cache = cache
        pool = cache.pool
        spec, bs = pool.spec, pool.block_size
        pin = torch.device(spec.device).type == "cuda"
        self.host = HostTier(spec, bs, host_blocks, pin=pin, stored_block=pool.stored_block) if host_blocks else None
        self.disk = (
            DiskTier(disk_path, disk_capacity_bytes or 0, spec, bs, quantizer=pool.tier_quantizer)
            if disk_path is not None
            else None
        )
        if self.host is not None:
            self.host.spill = self.disk is not None
        self.min_host_tokens = MIN_HOST_LOAD_TOKENS
        self.min_disk_tokens = MIN_DISK_LOAD_TOKENS
        self._pending: list[tuple[Run, torch.Tensor]] = []
        self._pending_lock = threading.Lock()
        self._loading: dict[tuple[bytes, int], threading.Event] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        self._hits = {"host": 0, "disk": 0}
        self._promoted = {"host": 0, "disk": 0}
        self._demoted = {"host": 0, "disk": 0}
        self._load_s = {"host": 0.0, "disk": 0.0}
        self._disk_base = self.disk.snapshot() if self.disk is not None else None
        self._host_base = (self.host.stats.bytes_in, self.host.stats.bytes_out) if self.host is not None else (0, 0)

    def stats(self) -> dict[str, TierStats]:
        out: dict[str, TierStats] = {}
        bs = self.cache.pool.block_size
        if self.host is not None:
            h = self.host.stats
            out["host"] = TierStats(
                hits=self._hits["host"],
                promoted_tokens=self._promoted["host"],
                demoted_tokens=self._demoted["host"],
                bytes_read=h.bytes_out - self._host_base[1],
                bytes_written=h.bytes_in - self._host_base[0],
                load_seconds=self._load_s["host"],
                files_skipped=0,
                cached_tokens=self.host.num_held * bs,
                capacity=self.host.num_blocks * bs,
                enabled=True,
            )
        if self.disk is not None:
            d, b = self.disk.snapshot(), self._disk_base
            assert b is not None
            out["disk"] = TierStats(
                hits=self._hits["disk"],
                promoted_tokens=self._promoted["disk"],
                demoted_tokens=(d.blocks_written - b.blocks_written) * bs,
                bytes_read=d.bytes_read - b.bytes_read,
                bytes_written=d.bytes_written - b.bytes_written,
                load_seconds=d.load_seconds - b.load_seconds,
                files_skipped=d.files_skipped - b.files_skipped,
                cached_tokens=self.disk.held_blocks() * bs,
                capacity=self.disk.capacity_bytes,
                enabled=d.enabled,
            )
        return out

    # ----- demotion --------------------------------------------------------------------
    def demote(self, node: Node, first: int) -> None:
        """Blocks [first:] of `node` are being evicted (cache lock held): keep their KV below."""
        pool = self.cache.pool
        parent = node.parent
        assert parent is not None
        prev = node.block_hashes[first - 1] if first else parent.last_hash
        root = parent
        while root.parent is not None:
            root = root.parent
        ids = node.block_ids
        approximate = pool.approximate  # empty unless the pool is exact over quantised tiers
        i, n = first, len(ids)
        while i < n:
            # Blocks an exact pool got by promotion hold dequantised KV whose stored form is
            # still below (or was dropped there): they are not quantised again, only freed.
            while i < n and ids[i] in approximate:
                approximate.discard(ids[i])
                i += 1
            j = i
            while j < n and ids[j] not in approximate:
                j += 1
            if j > i:
                self._keep_below(root.ns_key, node.block_hashes[i - 1] if i else prev, node, i, j)
            i = j

    def _keep_below(self, ns_key: bytes, prev: int, node: Node, i: int, j: int) -> None:
        """Blocks [i, j) of `node` (chained from `prev`) into the host tier, or the disk's queue."""
        bs = self.cache.pool.block_size
        hashes = node.block_hashes[i:j]
        tokens = node.tokens[i * bs : j * bs]
        blocks = self.cache.pool.read_blocks(node.block_ids[i:j])  # [n, L, 2, H, bs, D]
        if self.host is not None:
            self._demoted["host"] += len(hashes) * bs
            self._queue(self.host.put(ns_key, prev, hashes, tokens, blocks))
        else:
            self._queue([(Run(ns_key, prev, hashes, tokens, []), blocks.to("cpu"))])

    def store_below(
        self, node: Node, prev: int, hashes: list[int], tokens: list[int], kv: Sequence[LayerKV], first_block: int
    ) -> None:
        """An insert found no room in the pool for blocks `hashes` (chained from `prev`, in
        `node`'s namespace; block i's KV starts at token `(first_block + i) * block_size` of
        `kv`): they go to the lower tiers directly instead of being dropped (cache lock held)."""
        pool = self.cache.pool
        bs, spec = pool.block_size, pool.spec
        n = len(hashes)
        start, stop = first_block * bs, (first_block + n) * bs
        # per layer (K, V) [1, H, T, D] -> [L, 2, H, n * bs, D] -> [n, L, 2, H, bs, D]
        stacked = torch.stack([torch.stack((k[0, :, start:stop], v[0, :, start:stop])) for k, v in kv])
        blocks = stacked.view(spec.num_layers, 2, spec.num_kv_heads, n, bs, spec.head_dim).permute(3, 0, 1, 2, 4, 5)
        blocks = pool.encode_blocks(blocks)  # what the pool would store: quantised if it is
        root = node
        while root.parent is not None:
            root = root.parent
        if self.host is not None:
            self._demoted["host"] += n * bs
            self._queue(self.host.put(root.ns_key, prev, hashes, tokens, blocks))
        else:
            self._queue([(Run(root.ns_key, prev, hashes, tokens, []), blocks.to("cpu"))])

    def _queue(self, runs: list[tuple[Run, torch.Tensor]]) -> None:
        if runs and self.disk is not None and self.disk.enabled:
            with self._pending_lock:
                self._pending += runs

    def flush(self) -> None:
        """Write the runs queued for the disk (call without the cache lock held)."""
        if not self._pending:
            return
        with self._pending_lock:
            runs, self._pending = self._pending, []
        disk = self.disk
        assert disk is not None
        for run, kv in runs:
            disk.write(run.ns_key, run.parent_hash, run.hashes, run.tokens, kv)

    def clear(self) -> None:
        """Drop the host tier's blocks (cache lock held); the disk keeps its files."""
        if self.host is not None:
            self.host.evict_all()

    # ----- promotion -------------------------------------------------------------------
    def match(self, ids: list[int], packed: object, ns_key: bytes, namespace: object) -> M:
        """The cache's `match` with lower tiers: promote, then take the device match."""
        cache = self.cache
        bs = cache.pool.block_size
        n_q = len(ids) // bs
        raw = memoryview(packed).cast("B")  # type: ignore[arg-type]
        loaded: tuple[int, list[int], torch.Tensor] | None = None  # (first block, hashes, KV)
        tried_disk = waited = False
        event: threading.Event | None = None
        key: tuple[bytes, int] | None = None
        try:
            while True:
                wait_on: threading.Event | None = None
                read_plan: tuple[int, int, list[int]] | None = None
                with cache.lock:
                    prev, m = cache.peek(ns_key, ids, n_q)
                    hashes = self._lower_chain(prev, raw, m, n_q)
                    host_n = 0
                    if self.host is not None and hashes:
                        host_n = self.host.count(ns_key, prev, hashes, ids[m * bs : (m + len(hashes)) * bs])
                        if host_n * bs < self.min_host_tokens:
                            host_n = 0
                    disk_n = 0
                    if self.disk is not None and not tried_disk and host_n < len(hashes):
                        disk_n = self.disk.count(hashes[host_n:])
                    if disk_n and disk_n * bs >= self.min_disk_tokens:
                        k = (ns_key, hashes[host_n])
                        other = self._loading.get(k)
                        if other is not None and not waited:
                            wait_on = other
                        else:
                            if other is None:
                                event, key = threading.Event(), k
                                self._loading[k] = event
                            disk_prev = hashes[host_n - 1] if host_n else prev
                            read_plan = (m + host_n, disk_prev, hashes[host_n : host_n + disk_n])
                    else:
                        host_tok, disk_tok = self._promote(m, prev, hashes, host_n, loaded, ids, ns_key)
                        return cache.take_match(ids, ns_key, namespace, host_tok, disk_tok)
                # Outside the cache lock: wait for another thread's load, or read the files.
                if wait_on is not None:
                    wait_on.wait(_WAIT_SECONDS)
                    waited = True
                    continue
                assert read_plan is not None and self.disk is not None
                tried_disk = True
                start, disk_prev, want = read_plan
                t0 = time.perf_counter()
                kv = self.disk.read(ns_key, disk_prev, want, ids[start * bs : (start + len(want)) * bs])
                self._load_s["disk"] += time.perf_counter() - t0
                if kv.shape[0]:
                    loaded = (start, want[: kv.shape[0]], kv)
        finally:
            if event is not None:
                with cache.lock:
                    del self._loading[key]  # type: ignore[arg-type]
                event.set()
            self.flush()

    def _lower_chain(self, prev: int, raw: memoryview, start: int, stop: int) -> list[int]:
        """Chain hashes of blocks [start, stop) of the query, as long as a lower tier holds them:
        one xxh3 call and two dict lookups per block, and just one of each on a miss."""
        step = 8 * self.cache.pool.block_size
        host, disk = self.host, self.disk
        digest = xxhash.xxh3_64_intdigest
        out: list[int] = []
        h = prev
        for b in range(start, stop):
            h = digest(raw[b * step : (b + 1) * step], h)
            if not ((host is not None and h in host) or (disk is not None and h in disk)):
                break
            out.append(h)
        return out

    def _promote(
        self,
        m: int,
        prev: int,
        hashes: list[int],
        host_n: int,
        loaded: tuple[int, list[int], torch.Tensor] | None,
        ids: list[int],
        ns_key: bytes,
    ) -> tuple[int, int]:
        """Copy the host run and the loaded disk run (where it still follows the device match of
        `m` blocks) into the pool (cache lock held). Returns tokens promoted from each tier."""
        cache, bs = self.cache, self.cache.pool.block_size
        disk_n = 0
        if loaded is not None and loaded[0] == m + host_n:
            disk_n = len(loaded[1])
            if hashes[host_n : host_n + disk_n] != loaded[1]:
                disk_n = 0  # the tree changed meanwhile; the next match will find its way
        n = host_n + disk_n
        if n == 0:
            return 0, 0
        t0 = time.perf_counter()
        device = cache.pool.spec.device
        parts = []
        if host_n:
            assert self.host is not None
            # An exact pool keeps the host's stored copy: the pool gets a dequantised one.
            parts.append(self.host.take(hashes[:host_n], keep=cache.pool.quantize_below))
        if disk_n:
            assert loaded is not None
            parts.append(loaded[2][:disk_n].to(device))
        blocks = parts[0] if len(parts) == 1 else torch.cat([p.to(device) for p in parts])
        take = 0
        try:
            take, _ = cache.promote(ids, ns_key, m, hashes[:n], blocks)  # a disk miss stays on disk
        finally:
            if take < host_n:  # what did not fit (or failed to copy) goes back where it was
                assert self.host is not None
                back_prev = hashes[take - 1] if take else prev
                tokens = ids[(m + take) * bs : (m + host_n) * bs]
                self._queue(self.host.put(ns_key, back_prev, hashes[take:host_n], tokens, blocks[take:host_n]))
        host_tok = min(take, host_n) * bs
        disk_tok = max(0, take - host_n) * bs
        if host_tok:
            self._hits["host"] += 1
            self._promoted["host"] += host_tok
            self._load_s["host"] += time.perf_counter() - t0
        if disk_tok:
            self._hits["disk"] += 1
            self._promoted["disk"] += disk_tok
        return host_tok, disk_tok

    def check(self) -> None:
        if self.host is not None:
            self.host.check()
        if self.disk is not None:
            self.disk.check()
