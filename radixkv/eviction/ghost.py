"""A bounded memory of evicted runs of blocks, keyed by the hash of each run's first block.

Eviction removes a leaf's tail blocks as one run; remembering each run (how often its blocks
were used, when last) lets a policy recognise them when a later prompt stores them again.
Block hashes are chained (each is seeded by the one before), so two chains that agree on one
block agree on every block before it: a new prompt that shares a run's first block and its
k-th block shares the whole first k blocks. Each entry keeps the hashes at a few checkpoint
offsets (powers of two from the start, and from the end: where prompts that continue a
conversation diverge from a run that ended in a partly filled prompt) to find how much of a
run a new prompt shares in O(log run) comparisons, without storing every hash.

Memory: at most `max_entries` entries of O(log run) 8-byte hashes each (about 0.3 KB per
entry in CPython, so ~10 MB at 32,768 entries); the oldest entries go first.
"""

from __future__ import annotations

import struct
from typing import NamedTuple


class EvictedRun(NamedTuple):
    """One remembered run, as `EvictedRuns.take` and `entries` give it: its blocks' use count
    and last use (clock ticks), its length in blocks, and when it was evicted."""

    uses: int
    last_use: int
    length: int
    evicted_at: int


# Each entry is one bytes object: a header (uses, last use, length, evicted at; four uint64)
# then the checkpoint hashes. Bytes are not tracked by the garbage collector: a container
# object per eviction would trigger extra collections, each of which walks the token lists of
# young nodes (measured: ~10% of the trace replay).
_HEADER = struct.Struct("<4Q")


def checkpoints(length: int) -> list[int]:
    """Sorted 1-based block offsets whose hashes are kept for a run of `length` blocks:
    1, 2, 4, ... and length, length - 1, length - 3, length - 7, ... (O(log length) of them)."""
    head = [1 << j for j in range(length.bit_length())]  # 1, 2, 4, ... <= length
    tail = [length - (1 << j) + 1 for j in range(length.bit_length())]  # length, length - 1, ...
    return sorted(set(head + tail))


class EvictedRuns:
    """Runs evicted from the tree, oldest first, at most `max_entries` of them.

    `remember` is O(log run); `shared` O(log run) hash comparisons; `take` and `expire`
    amortised O(1) per entry removed.
    """

    def __init__(self, max_entries: int) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        self.max_entries = max_entries
        self._runs: dict[int, bytes] = {}  # first hash -> entry; insertion order = eviction order

    def __len__(self) -> int:
        return len(self._runs)

    def remember(self, hashes: list[int], uses: int, last_use: int, now: int) -> None:
        """Remember the evicted run `hashes` (its blocks' use count and last use)."""
        runs = self._runs
        runs.pop(hashes[0], None)  # a run evicted again moves to the young end
        offsets = checkpoints(len(hashes))
        runs[hashes[0]] = struct.pack(
            f"<{4 + len(offsets)}Q", uses, last_use, len(hashes), now, *[hashes[p - 1] for p in offsets]
        )
        if len(runs) > self.max_entries:
            del runs[next(iter(runs))]

    def expire(self, last_use_before: int) -> None:
        """Forget the oldest runs while their last use is before `last_use_before`."""
        runs = self._runs
        while runs:
            first = next(iter(runs))
            if _HEADER.unpack_from(runs[first])[1] >= last_use_before:
                break
            del runs[first]

    def shared(self, hashes: list[int], start: int) -> tuple[int, int] | None:
        """(length of the run that begins with block `hashes[start]`, how many of its first
        blocks `hashes[start:]` verifiably shares: at least 1, rounded down to a checkpoint);
        None when no remembered run begins there."""
        run = self._runs.get(hashes[start])
        if run is None:
            return None
        length = _HEADER.unpack_from(run)[2]
        offsets = checkpoints(length)
        base = _HEADER.size
        room = len(hashes) - start
        # The largest checkpoint whose hash agrees. Agreement is monotone along a hash chain,
        # so a binary search over the checkpoints within reach finds it; offset 1 always agrees.
        lo, hi = 0, len(offsets) - 1
        while hi > lo and offsets[hi] > room:
            hi -= 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            at = base + 8 * mid
            if hashes[start + offsets[mid] - 1] == int.from_bytes(run[at : at + 8], "little"):
                lo = mid
            else:
                hi = mid - 1
        return length, offsets[lo]

    def take(self, first_hash: int) -> EvictedRun | None:
        """Remove and return the run that begins with `first_hash`, if remembered."""
        run = self._runs.pop(first_hash, None)
        return None if run is None else EvictedRun(*_HEADER.unpack_from(run))

    def entries(self) -> list[EvictedRun]:
        """Every remembered run, oldest first (for checks and tests)."""
        return [EvictedRun(*_HEADER.unpack_from(run)) for run in self._runs.values()]

    def clear(self) -> None:
        self._runs.clear()
