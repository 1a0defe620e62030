"""The "reuse" eviction policy: evict the leaf least likely to be used again soon, as learned
from the traffic the cache has seen.

Model. After its f-th use a block is used again with probability p_f, after a gap that is
roughly exponential with mean D. A block of age a (ticks since its last use) that has not
been used again yet then still has reuse odds odds(p_f) * exp(-a / D), and expects
sigmoid(logit(p_f) - a / D) / D hits per tick kept. Evicting the block with the fewest
expected hits per tick is therefore evicting the smallest

    key = last_access + D * logit(p_f)

a key fixed when the leaf enters the evictable list, as the tree requires. (The exponential
is the one gap model whose ranking never changes as blocks age, which is what a fixed key can
express.) Where one-off prompts are common, p_1 is small: a block used once gets a key well
below its last use and goes first, so long one-off prompts cannot flush prefixes that many
requests share. Where reuse does not depend on use counts, every p_f is alike and the policy
is LRU; before it has seen any reuse it is exactly LRU.

Learning, O(1) per event:
  - p_f = R[f + 1] / R[f], where R[f] counts the blocks that reached f uses; use counts at or
    above `max_count` share one class. Uses too recent for their next use to have come yet
    are left out of R[f], so a young cache does not underrate reuse.
  - D = the mean gap between uses of a block, fitted as an exponential seen only since the
    policy started (a young cache sees only short gaps and would learn too small a D).
  - Both decay with a time constant of `window` mean gaps, so they follow changing traffic.
  - A block's use count survives its eviction in a bounded memory of evicted runs
    (`EvictedRuns`, keyed by block hashes): a prompt that stores the run again resumes the
    count, on a node of its own (`segments` cuts the new blocks where remembered runs end).

Memory: at most `ghost_entries` remembered runs (~0.3 KB each, ~10 MB at the default; runs
unused for 8 D are forgotten first); three arrays of `max_count` + 2 floats; one int per node
(`Node.policy_state`: uses remembered from before the node's blocks were stored).
Costs: `key` O(1); `on_hit` O(1) per node of a matched path; `segments` and `on_evict`
O(log run) per run; an O(max_count) refresh every `update_every` ticks. No rebuild over the
leaves, ever. Replaying the production trace, this bookkeeping adds ~3-4% to LRU's CPU time
per request, and the whole replay (more, smaller nodes; other evictions) ~10%.

The tree's clock ticks once per `match` and once per `insert`, so D is in those ticks.
`insert(..., priority=)` is ignored here (the "priority" policy uses it).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from ..core.policy import EvictionPolicy, NodeView
from .ghost import EvictedRun, EvictedRuns


class ReuseOdds(EvictionPolicy):
    """Evict the smallest `last_access + D * logit(p_f)`: learned reuse odds by use count.

    Args:
      ghost_entries: most evicted runs remembered.
      max_count: use counts at or above this share one class.
      update_every: ticks between refreshes of the per-class offsets (and decay steps).
      window: the statistics' time constant, in mean reuse gaps; finite and above 1, since p_f's correction
        for reaches too recent to have been reused divides by (window - 1).
    """

    name: ClassVar[str] = "reuse"

    P_MIN = 0.01  # p_f is clamped to [P_MIN, 1 - P_MIN]: offsets stay within +-4.6 D
    FORGET_AFTER = 8.0  # mean gaps after its last use: the reuse odds have fallen by e^-8

    def __init__(
        self, *, ghost_entries: int = 1 << 15, max_count: int = 16, update_every: int = 64, window: float = 16.0
    ) -> None:
        for arg, value in (("ghost_entries", ghost_entries), ("max_count", max_count), ("update_every", update_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not 1 < window < math.inf:
            raise ValueError(f"window must be a finite number > 1 (mean reuse gaps), got {window!r}")
        self.ghost = EvictedRuns(ghost_entries)
        self.max_count = max_count
        self.update_every = update_every
        self.window = window
        # reached[f]: decayed count of blocks that reached f uses (f = 1..max_count); the last
        # slot counts reaching any count above max_count. Index 0 is unused.
        self.reached = [0.0] * (max_count + 2)
        # recent[f]: the same counts decayed with a time constant of D: reaches too recent for
        # their next use to have come yet, taken out of p_f's denominator.
        self.recent = [0.0] * (max_count + 2)
        self.gap_sum = 0.0  # decayed, weighted sum of observed gaps between uses (ticks)
        self.gap_weight = 0.0
        self.mean_gap = 0.0  # D; 0 until a reuse is seen, so all offsets are 0: LRU
        self.offsets = [0.0] * (max_count + 1)  # offsets[f] = D * logit(p_f)
        self._pending: dict[int, EvictedRun] = {}  # runs `segments` matched, for `on_attach`
        self._start: int | None = None  # first tick seen: gaps longer than the age are unseen
        self._next_update = 0

    # ----- the ordering ------------------------------------------------------------------
    def uses(self, node: NodeView) -> int:
        """Uses of the node's blocks: the insert, its matches, and uses remembered from before."""
        return node.hits + 1 + node.policy_state  # type: ignore[operator]

    def key(self, node: NodeView) -> Any:
        return node.last_access + self.offsets[min(self.uses(node), self.max_count)]

    # ----- events ------------------------------------------------------------------------
    def segments(self, new_hashes: list[int]) -> list[int]:
        """One node per remembered run the new blocks verifiably repeat, then one for the rest."""
        self._pending.clear()
        sizes: list[int] = []
        i, n = 0, len(new_hashes)
        while i < n:
            found = self.ghost.shared(new_hashes, i)
            if found is None:
                break
            length, k = found
            self._pending[new_hashes[i]] = self.ghost.take(new_hashes[i])  # type: ignore[assignment]
            sizes.append(k)
            i += k
            if k < length:
                break  # the prompt leaves the run here: what follows is new
        if i < n:
            sizes.append(n - i)
        return sizes

    def on_attach(self, node: NodeView, now: int) -> None:
        nblocks = len(node.block_ids)
        run = self._pending.pop(node.block_hashes[0], None)
        extra = 0
        if run is not None:
            extra = run.uses
            self._observe_gap(now - run.last_use, nblocks, now)
        node.policy_state = extra
        self._reached(1 + extra, nblocks)
        self._maybe_update(now)

    def on_hit(self, node: NodeView, now: int) -> None:
        # Runs for every node of every matched path: inlined `_reached` and `_observe_gap`.
        nblocks = len(node.block_ids)
        f = min(node.hits + 2 + node.policy_state, self.max_count + 1)  # type: ignore[operator]
        self.reached[f] += nblocks  # the tree counts this hit after the call: hits + 1 + 1 uses
        self.recent[f] += nblocks
        gap = now - node.last_access
        if gap > 0:
            self.gap_sum += nblocks * gap
            self.gap_weight += nblocks

    def on_evict(self, node: NodeView, block_hashes: list[int], now: int) -> None:
        self.ghost.remember(block_hashes, self.uses(node), node.last_access, now)
        self._maybe_update(now)

    def on_clear(self) -> None:
        """Forget the evicted runs; keep what was learned about the traffic."""
        self.ghost.clear()
        self._pending.clear()

    # ----- learning ----------------------------------------------------------------------
    def _reached(self, uses: int, nblocks: int) -> None:
        f = min(uses, self.max_count + 1)
        self.reached[f] += nblocks
        self.recent[f] += nblocks

    def _observe_gap(self, gap: int, nblocks: int, now: int) -> None:
        if gap > 0:
            self.gap_sum += nblocks * gap
            self.gap_weight += nblocks

    def _maybe_update(self, now: int) -> None:
        if self._start is None:
            self._start = now
        if now < self._next_update:
            return
        self._next_update = now + self.update_every
        d = _exponential_mean(self.gap_sum / self.gap_weight, now - self._start) if self.gap_weight else 0.0
        self.mean_gap = d
        r, q, top = self.reached, self.recent, self.max_count
        # A block that reached f uses a ticks ago has had its next use (if any) by now with
        # probability 1 - exp(-a / D). With the window's decay (time constant W = window * D)
        # on both, E[reached[f + 1]] = p_f * W / (W - D) * (reached[f] - recent[f]): dividing
        # by that exposure keeps p_f unbiased while the cache is young, not only in the long run.
        d_eff = max(d, self.update_every)
        span = self.window * d_eff
        scale = self.window / (self.window - 1.0)  # W / (W - D) with W = window * D
        for f in range(1, top + 1):
            # p_f = P(one more use | f uses); the last class pools every count >= max_count.
            if f < top:
                more, exposed = r[f + 1], r[f] - q[f]
            else:
                more, exposed = r[top + 1], r[top] + r[top + 1] - q[top] - q[top + 1]
            p = (more + 1.0) / (scale * max(exposed, 0.0) + 2.0)  # Beta(1, 1) prior: 1/2 (LRU) before data
            p = min(max(p, self.P_MIN), 1.0 - self.P_MIN)
            self.offsets[f] = d * math.log(p / (1.0 - p))
        decay = math.exp(-self.update_every / span)
        fast = math.exp(-self.update_every / d_eff)
        for f in range(len(r)):
            r[f] *= decay
            q[f] *= fast
        self.gap_sum *= decay
        self.gap_weight *= decay
        if d > 0:
            self.ghost.expire(now - int(self.FORGET_AFTER * d))

    # ----- integrity ---------------------------------------------------------------------
    def check(self) -> None:
        assert len(self.ghost) <= self.ghost.max_entries, "the ghost holds more runs than its bound"
        for run in self.ghost.entries():
            assert run.uses >= 1 and run.length >= 1 and run.last_use <= run.evicted_at, f"bad ghost entry {run}"
        assert all(x >= 0.0 for x in self.reached), "a use count went negative"
        assert self.gap_sum >= 0.0 and self.gap_weight >= 0.0, "gap statistics went negative"
        bound = 4.6 * self.mean_gap + 1e-9  # |logit p| <= log(99) for p in [0.01, 0.99]
        assert all(abs(x) <= bound for x in self.offsets), "an offset exceeds the clamp"
        assert not self._pending, "runs matched by `segments` were never attached"


def _observed_mean(d: float, span: float) -> float:
    """Mean of the gaps seen within `span` ticks of the start when gaps are exponential with
    mean `d` and start steadily: density ~ exp(-g / d) * (span - g) on [0, span]."""
    x = span / d
    if x > 50.0:  # exp(-x) is negligible
        return d - d * d / (span - d)
    ex = math.exp(-x)
    num = span * d * d * (1.0 - ex * (1.0 + x)) - d**3 * (2.0 - ex * (x * x + 2.0 * x + 2.0))
    return num / (d * (span - d * (1.0 - ex)))


def _exponential_mean(observed: float, span: float) -> float:
    """The mean gap d whose gaps, seen only within `span` ticks of the start, average
    `observed` (bisection on log d; at most 4 * span). A young cache sees only short gaps;
    this undoes that bias instead of learning too small a mean."""
    if span <= 0:
        return observed
    if observed >= _observed_mean(4.0 * span, span):
        return 4.0 * span
    lo, hi = math.log(max(observed, 1e-9)), math.log(4.0 * span)
    for _ in range(24):  # the interval is < 2^-20 of its log width: far below the noise
        mid = 0.5 * (lo + hi)
        if _observed_mean(math.exp(mid), span) < observed:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))
