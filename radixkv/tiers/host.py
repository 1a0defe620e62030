"""The host tier: KV blocks evicted from the device pool, kept in host memory in LRU order."""

from __future__ import annotations

import collections
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.pool import index_copy_rows
from ..core.spec import KVSpec


@dataclass
class Run:
    """Consecutive blocks of one hash chain: `hashes[i]` follows `hashes[i - 1]` (`parent_hash`
    for the first), `tokens` holds their ids (`len(hashes) * block_size`)."""

    ns_key: bytes
    parent_hash: int
    hashes: list[int]
    tokens: list[int]
    slots: list[int]  # host block slots; empty for a run leaving the tier
    uid: int = 0


@dataclass
class HostStats:
    blocks: int = 0
    capacity_blocks: int = 0
    blocks_in: int = 0  # demoted into the tier
    blocks_out: int = 0  # promoted back to the device
    blocks_evicted: int = 0  # left for the disk tier (or dropped without one)
    bytes_in: int = 0
    bytes_out: int = 0


class HostTier:
    """A fixed number of KV blocks in host memory, grouped in runs, evicted least recently used.

    Storage: one tensor `[num_blocks, L, 2 (K, V), H, block_size, D]` (a quantised pool's
    blocks: `[num_blocks, L, 2, H, block_size, W]` bytes, codes and scales as the pool keeps
    them, see KVPool.stored_block) allocated at construction (pinned when the device pool is
    on CUDA, so copies to and from it can be asynchronous; plain memory otherwise);
    bookkeeping in plain integers.
    Contract:
      - `put` stores a run of blocks (skipping those already held), first evicting whole
        least recently used runs, which it returns with their KV for the next tier.
      - `count` says how many leading blocks of a query it holds, verified: same namespace,
        the same chain hash before each block, and equal token ids (a hash alone is never
        trusted). `take` copies those blocks out and removes them: the tiers are exclusive,
        so device + host capacity is what the two can hold together.
      - Not thread-safe: the cache calls it under its lock (copies are memory speed).
    Costs: count O(blocks) dict lookups and slice compares; put/take one tensor copy per run
    plus O(blocks of the runs touched) dict updates.
    """

    def __init__(
        self,
        spec: KVSpec,
        block_size: int,
        num_blocks: int,
        pin: bool,
        stored_block: tuple[tuple[int, ...], torch.dtype] | None = None,
    ) -> None:
        self.spec = spec
        self.block_size = block_size
        self.num_blocks = num_blocks
        # stored_block: (shape, dtype) of one block as the pool hands it out (KVPool.stored_block);
        # None: the exact layout [L, 2, H, bs, D] in spec.dtype.
        if stored_block is None:
            stored_block = ((spec.num_layers, 2, spec.num_kv_heads, block_size, spec.head_dim), spec.dtype)
        shape, dtype = stored_block
        self.data = torch.zeros((num_blocks, *shape), dtype=dtype, pin_memory=pin)
        self.block_bytes = self.data[0].numel() * self.data.element_size() if num_blocks else 0
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._runs: OrderedDict[int, Run] = OrderedDict()  # least recently used first
        self._index: dict[int, tuple[Run, int]] = {}  # block hash -> (run, position)
        self._uids = itertools.count(1)
        self.stats = HostStats(capacity_blocks=num_blocks)
        # False when nothing lies below (no disk tier): evicted runs then leave without a copy
        # of their KV (an empty tensor), since no one would read it.
        self.spill = True

    @property
    def num_held(self) -> int:
        return self.num_blocks - len(self._free)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._index

    # ----- lookup ----------------------------------------------------------------------
    def count(self, ns_key: bytes, prev_hash: int, hashes: Sequence[int], tokens: Sequence[int]) -> int:
        """Leading blocks of `hashes` (chained from `prev_hash`, ids `tokens`) held and verified."""
        bs = self.block_size
        n = 0
        for i, h in enumerate(hashes):
            hit = self._index.get(h)
            if hit is None:
                break
            run, pos = hit
            before = run.hashes[pos - 1] if pos else run.parent_hash
            if (
                run.ns_key != ns_key
                or before != prev_hash
                or run.tokens[pos * bs : (pos + 1) * bs] != tokens[i * bs : (i + 1) * bs]
            ):
                break
            prev_hash = h
            n += 1
        return n

    def take(self, hashes: Sequence[int], keep: bool = False) -> torch.Tensor:
        """Copy out and remove the blocks `hashes` (all held: `count` said so); `[n, L, 2, H, bs, D]`.
        `keep`: copy out only, the blocks stay held (their runs become the most recently used)."""
        slots: list[int] = []
        i = 0
        while i < len(hashes):
            run, pos = self._index[hashes[i]]
            k = 1
            while i + k < len(hashes) and pos + k < len(run.hashes) and run.hashes[pos + k] == hashes[i + k]:
                k += 1
            slots += run.slots[pos : pos + k]
            if keep:
                self._touch(run)
            else:
                self._cut(run, pos, k)
            i += k
        out = self.data.index_select(0, torch.tensor(slots, dtype=torch.int64))
        if not keep:
            self._free += slots
        self.stats.blocks_out += len(slots)
        self.stats.bytes_out += len(slots) * self.block_bytes
        self.stats.blocks = self.num_held
        return out

    # ----- storing ---------------------------------------------------------------------
    def put(
        self, ns_key: bytes, parent_hash: int, hashes: list[int], tokens: list[int], blocks: torch.Tensor
    ) -> list[tuple[Run, torch.Tensor]]:
        """Store the run `blocks` (`[n, L, 2, H, bs, D]`, any device); returns the evicted runs
        with their KV (`[m, L, 2, H, bs, D]` on the CPU): the part of a run larger than the whole
        tier first, then runs least recently used first."""
        bs = self.block_size
        evicted: list[tuple[Run, torch.Tensor]] = []
        if self.num_blocks == 0:
            return [(Run(ns_key, parent_hash, hashes, tokens, []), blocks.cpu())]
        start, n = 0, len(hashes)
        index = self._index
        fresh = index.keys().isdisjoint(hashes)  # the usual case, checked in C
        while start < n:
            while not fresh and start < n and hashes[start] in index:
                self._touch(self._index[hashes[start]][0])
                start += 1
            end = n if fresh else start
            while end < n and hashes[end] not in index:
                end += 1
            if end == start:
                break
            stop = end
            if end - start > self.num_blocks:  # a run larger than the tier: its head stays
                cut = start + self.num_blocks
                over = Run(ns_key, hashes[cut - 1], hashes[cut:end], tokens[cut * bs : end * bs], [])
                evicted.append((over, blocks[cut:end].to("cpu")))
                self.stats.blocks_evicted += end - cut
                end = cut
            need = end - start
            while len(self._free) < need:
                evicted.append(self._evict_lru())
            slots = self._free[-need:]
            del self._free[-need:]
            # [need, L, 2, H, bs, D] from any device into (pinned) host memory.
            # Contiguous first: index_copy_ from a permuted view is several times slower.
            src = blocks[start:end].to("cpu").contiguous()
            index_copy_rows(self.data, 0, torch.tensor(slots, dtype=torch.int64), src, dims=src.dim() - 1)
            parent = hashes[start - 1] if start else parent_hash
            self._add(Run(ns_key, parent, hashes[start:end], tokens[start * bs : end * bs], slots))
            self.stats.blocks_in += need
            self.stats.bytes_in += need * self.block_bytes
            start = stop
        self.stats.blocks = self.num_held
        return evicted

    def evict_all(self) -> list[tuple[Run, torch.Tensor]]:
        """Empty the tier, returning every run with its KV, least recently used first."""
        out = []
        while self._runs:
            out.append(self._evict_lru())
        self.stats.blocks = 0
        return out

    # ----- internals -------------------------------------------------------------------
    def _add(self, run: Run) -> None:
        run.uid = next(self._uids)
        self._runs[run.uid] = run
        # hash -> (run, position), built in C: runs hold hundreds of blocks.
        self._index.update(zip(run.hashes, zip(itertools.repeat(run), itertools.count()), strict=False))

    def _remove(self, run: Run) -> None:
        del self._runs[run.uid]
        # Each held hash belongs to exactly one run (`put` skips held ones, `_cut` removes
        # before it re-adds), so all of this run's entries are its own.
        collections.deque(map(self._index.__delitem__, run.hashes), maxlen=0)

    def _touch(self, run: Run) -> None:
        self._runs.move_to_end(run.uid)

    def _cut(self, run: Run, pos: int, k: int) -> None:
        """Remove blocks [pos, pos + k) from `run` (their slots are the caller's now); the head
        and tail that remain become runs of their own."""
        bs = self.block_size
        self._remove(run)
        if pos:
            self._add(Run(run.ns_key, run.parent_hash, run.hashes[:pos], run.tokens[: pos * bs], run.slots[:pos]))
        if pos + k < len(run.hashes):
            tail = Run(
                run.ns_key, run.hashes[pos + k - 1], run.hashes[pos + k :], run.tokens[(pos + k) * bs :],
                run.slots[pos + k :],
            )  # fmt: skip
            self._add(tail)

    def _evict_lru(self) -> tuple[Run, torch.Tensor]:
        _, run = next(iter(self._runs.items()))
        self._remove(run)
        # [m, L, 2, H, bs, D] for the tier below; nothing to copy when there is none.
        kv = self.data.index_select(0, torch.tensor(run.slots, dtype=torch.int64)) if self.spill else self.data[:0]
        self._free += run.slots
        run.slots = []
        self.stats.blocks_evicted += len(run.hashes)
        return run, kv

    def check(self) -> None:
        """Assert that runs, index and free list partition the tier's blocks."""
        held = [s for r in self._runs.values() for s in r.slots]
        assert len(set(held)) == len(held), "a host slot is held twice"
        assert not set(held) & set(self._free), "a host slot is both free and held"
        assert len(held) + len(self._free) == self.num_blocks, "host slots leaked"
        for h, (run, pos) in self._index.items():
            assert self._runs.get(run.uid) is run and run.hashes[pos] == h, f"host index entry {h:x} is stale"
        for run in self._runs.values():
            assert len(run.tokens) == len(run.hashes) * self.block_size == len(run.slots) * self.block_size
