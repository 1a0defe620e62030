"""The "adaptive" eviction policy: LRU, switching to the learned "reuse" order only while a
miniature replay shows that order winning.

Why. The learned order (`reuse_odds.py`) keeps 1.5x LRU's hits on the production conversation
trace but loses up to ~40% of them on traffic where most blocks are used once and reuse does
not follow use counts. No fixed order wins everywhere, so this policy measures both on the
traffic it serves and uses the better one, falling back to LRU whenever the learned order does
not clearly win.

How. Every block that passes through the cache (matched, or newly stored) whose hash falls in a
fixed sample (a fraction `rate` of the hash space, as in miniature simulation for cache tuning)
is fed to two miniature block caches of `rate` times the real capacity: one evicts by LRU, one
by the learned key `last_use + offsets[uses]` with the offsets the real cache's learner keeps.
Each counts its hits with an exponential decay. The real cache uses the learned order while the
learned miniature's hits exceed the LRU miniature's by a margin above the sampling noise, and
LRU otherwise (and at the start). The learner runs in both modes, so its offsets are ready.

The miniatures see blocks, not a tree: a block hit there does not need its parent. Both orders
keep parents at least as long as their children (a parent is used whenever a child is), so the
prefix structure costs little; the comparison, not the absolute figure, is what is used.

Costs: per matched or stored node, one Python pass over its block hashes to pick the sampled
ones; per sampled block, O(1) for the LRU miniature and O(log m) for the learned one (a heap; m =
its capacity, about `target` blocks), also in Python. Caches of up to `target` blocks sample every
block, so there a hit costs a few Python steps per matched block (each miniature replays the
run in one loop with its lookups hoisted, and the learned one pushes to its heap only when a
key goes down): match + release of a cached 2,047-token query in a 512-block cache took 95-121
us against LRU's 55-71 us (1.7-1.9x), and 121-141 us (2.2-2.3x) when the learned miniature
pushed on every hit, side by side (one CPU thread).
A switch bumps `generation`, and the tree re-keys its evictable leaves (O(leaves log leaves));
switches are at least `capacity / 4` stored blocks apart, so that is amortised O(log n) per
stored block. Memory: the miniatures (~`target` entries each, plus a
memory of evicted use counts of 8x that) and the learner's (see `ReuseOdds`).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from typing import Any, ClassVar

from ..core.policy import EvictionPolicy, NodeView
from .reuse_odds import ReuseOdds

_SPACE = 1 << 16  # the sample is the hashes whose low 16 bits are below rate * _SPACE


class _MiniLRU:
    """Block-level LRU over sampled hashes: capacity `cap` blocks."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def run(self, hashes: list[int], decay: float, hits: float) -> float:
        """Access each of `hashes` in order (a hit moves it to the end; a miss adds it, dropping the
        oldest when over `cap`); returns `hits` decayed by `decay` per access, plus one per hit.
        One loop with its lookups hoisted: this runs per matched block on the hit path."""
        blocks, cap = self.blocks, self.cap
        move, drop = blocks.move_to_end, blocks.popitem
        for h in hashes:
            if h in blocks:
                move(h)
                hits = hits * decay + 1.0
            else:
                blocks[h] = None
                if len(blocks) > cap:
                    drop(last=False)
                hits = hits * decay
        return hits


class _MiniReuse:
    """Block-level cache over sampled hashes evicting the smallest `last_use + offsets[uses]`
    (ties: the smallest hash).

    A binary heap whose entries may lag their blocks' keys: each block records the key of its
    entry in the heap beside its current key. A hit raises the key almost always (time moves on;
    only a drop in the learned offsets lowers it), so it only updates the record, and pushes a
    new entry just when the key went down. When eviction pops an entry: a block that is gone, or
    whose record names another entry, makes it stale (skipped); a block whose key grew since is
    pushed again with its key; otherwise the block has the smallest key and is evicted. So the
    order is exactly that of a heap updated on every hit, without a push per hit (the hit path
    runs this per sampled block). The heap is rebuilt when it holds 4x the live blocks.
    """

    def __init__(self, cap: int, learner: ReuseOdds) -> None:
        self.cap = cap
        self.learner = learner
        self.heap: list[tuple[float, int]] = []  # (key, hash), stale entries included
        # hash -> (current key, uses, key of its entry in the heap <= current key)
        self.blocks: dict[int, tuple[float, int, float]] = {}
        self.evicted: OrderedDict[int, int] = OrderedDict()  # hash -> uses, for blocks stored again
        self.evicted_max = 8 * cap

    def run(self, hashes: list[int], now: int, decay: float, hits: float) -> float:
        """Access each of `hashes` in order at time `now`: its key becomes `now + offsets[uses]`;
        a miss over `cap` evicts the smallest live key and remembers its use count. Returns `hits`
        decayed by `decay` per access, plus one per hit."""
        blocks, evicted, heap, cap = self.blocks, self.evicted, self.heap, self.cap
        offsets, max_count, evicted_max = self.learner.offsets, self.learner.max_count, self.evicted_max
        push, pop, compact_at = heapq.heappush, heapq.heappop, 4 * cap + 16
        for h in hashes:
            entry = blocks.get(h)
            if entry is not None:
                uses = entry[1] + 1
                hits = hits * decay + 1.0
                key = now + offsets[uses if uses < max_count else max_count]
                if key >= entry[2]:  # the heap entry still lies at or below the key: no push
                    blocks[h] = (key, uses, entry[2])
                    continue
                blocks[h] = (key, uses, key)
                push(heap, (key, h))
            else:
                uses = evicted.pop(h, 0) + 1
                hits = hits * decay
                key = now + offsets[uses if uses < max_count else max_count]
                blocks[h] = (key, uses, key)
                push(heap, (key, h))
                if len(blocks) > cap:
                    while True:
                        k, gone = pop(heap)
                        cur = blocks.get(gone)
                        if cur is None or cur[2] != k:
                            continue  # stale: the block left, or has a newer entry
                        if cur[0] > k:  # its key grew since this entry: re-file it there
                            blocks[gone] = (cur[0], cur[1], cur[0])
                            push(heap, (cur[0], gone))
                            continue
                        break
                    evicted[gone] = blocks.pop(gone)[1]
                    if len(evicted) > evicted_max:
                        evicted.popitem(last=False)
            if len(heap) > compact_at:
                heap = [(e[2], g) for g, e in blocks.items()]
                heapq.heapify(heap)
                self.heap = heap
        return hits


class Adaptive(EvictionPolicy):
    """LRU, or the learned reuse order while a sampled miniature replay shows it winning.

    Args:
      target: sampled blocks the miniatures aim to hold (sets the sampling rate).
      min_rate: the smallest sampling rate (fraction of blocks), whatever the capacity.
      margin: the learned order is used only while its miniature hits exceed LRU's by this
        fraction plus `sigmas` standard deviations of the sampling noise.
      horizon: the hit counters' time constant, in miniature capacities of sampled accesses.
      learner: the ReuseOdds instance that learns the order (default: a fresh one).
    """

    name: ClassVar[str] = "adaptive"
    MIN_SPAN = 4096  # sampled accesses: the hit counters' shortest time constant

    def __init__(
        self,
        *,
        target: int = 2048,
        min_rate: float = 0.01,
        margin: float = 0.03,
        sigmas: float = 3.0,
        horizon: float = 4.0,
        learner: ReuseOdds | None = None,
    ) -> None:
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise ValueError(f"target must be a positive int, got {target!r}")
        for arg, value in (("min_rate", min_rate), ("margin", margin), ("sigmas", sigmas), ("horizon", horizon)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{arg} must be a finite number >= 0, got {value!r}")
        if not 0 < min_rate <= 1:
            raise ValueError(f"min_rate must be in (0, 1], got {min_rate!r}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon!r}")
        self.learner = learner if learner is not None else ReuseOdds()
        self.target = target
        self.min_rate = float(min_rate)
        self.margin = float(margin)
        self.sigmas = float(sigmas)
        self.horizon = float(horizon)
        self.learned = False  # the order in use: False = LRU, True = the learned order
        self.switches = 0
        self.lru_hits = 0.0  # decayed hits of each miniature
        self.learned_hits = 0.0
        self.bind(1 << 14)

    def bind(self, capacity_blocks: int) -> None:
        rate = min(1.0, max(self.min_rate, self.target / max(capacity_blocks, 1)))
        self.threshold = max(1, round(rate * _SPACE))
        self.rate = self.threshold / _SPACE
        mini = max(1, round(capacity_blocks * self.rate))
        self.mini_lru = _MiniLRU(mini)
        self.mini_learned = _MiniReuse(mini, self.learner)
        # Time constant: `horizon` miniature capacities of sampled accesses, and at least
        # MIN_SPAN of them, so that a small miniature still gathers enough hits to tell the
        # orders apart.
        self.decay = math.exp(-1.0 / max(self.horizon * mini, self.MIN_SPAN))
        self.dwell = max(1, capacity_blocks // 4)  # stored blocks between switches
        self._stored = 0

    # ----- the ordering ------------------------------------------------------------------
    def key(self, node: NodeView) -> Any:
        return self.learner.key(node) if self.learned else node.last_access

    # ----- events ------------------------------------------------------------------------
    def segments(self, new_hashes: list[int]) -> list[int]:
        return self.learner.segments(new_hashes)

    def on_attach(self, node: NodeView, now: int) -> None:
        self.learner.on_attach(node, now)
        self._stored += len(node.block_hashes)
        self._replay(node.block_hashes, now)

    def on_hit(self, node: NodeView, now: int) -> None:
        self.learner.on_hit(node, now)
        self._replay(node.block_hashes, now)

    def on_evict(self, node: NodeView, block_hashes: list[int], now: int) -> None:
        self.learner.on_evict(node, block_hashes, now)

    def on_clear(self) -> None:
        self.learner.on_clear()

    def _replay(self, hashes: list[int], now: int) -> None:
        t = self.threshold
        sampled = [h for h in hashes if h & 0xFFFF < t] if t < _SPACE else hashes
        if not sampled:
            return
        # The two miniatures share nothing, so each replays the whole run in turn.
        self.lru_hits = self.mini_lru.run(sampled, self.decay, self.lru_hits)
        self.learned_hits = self.mini_learned.run(sampled, now, self.decay, self.learned_hits)
        self._decide()

    def _decide(self) -> None:
        if self._stored < self.dwell:
            return
        a, b = self.lru_hits, self.learned_hits
        noise = self.sigmas * math.sqrt(a + b + 1.0)
        want = b - a > self.margin * a + noise if not self.learned else b - a > 0.5 * self.margin * a
        if want != self.learned:
            self.learned = want
            self.switches += 1
            self.generation += 1
            self._stored = 0

    def check(self) -> None:
        self.learner.check()
        assert len(self.mini_lru.blocks) <= self.mini_lru.cap, "the LRU miniature exceeds its capacity"
        m = self.mini_learned
        assert len(m.blocks) <= m.cap and len(m.heap) >= len(m.blocks), "the learned miniature is inconsistent"
        assert len(m.evicted) <= m.evicted_max, "the miniature's memory of evicted blocks exceeds its bound"
