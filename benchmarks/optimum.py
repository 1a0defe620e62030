"""The offline optimum of the trace benchmark: evict the block whose next use is farthest ahead.

Replays the trace on hash ids alone, like `trace_sweep.unlimited_hit_tokens` (never expanding
tokens): block b of a prompt is (its parent block, the hash id of its 512-token trace block,
its index inside it); a prompt hits its longest run of leading cached blocks, capped at
(len - 1) // block_size blocks, and then stores its len // block_size whole blocks, evicting
while the cache is full. Belady's rule picks the victim: the block used again farthest in the
future (never, first). A parent is used whenever its child is, so a parent's next use is never
later than its child's; breaking ties deepest first, the farthest block is always a leaf, so
this is also the best leaf-only eviction and the cache stays prefix-closed. The blocks of the
request being stored are locked, as in `PrefixCache`.

`bypass=False` (the default) stores every block as the cache does (the reference
figure, 0.346 at 2,560,000 tokens with 512-token blocks). `bypass=True` may also decline to
store a block whose next use is later than every cached block's, which an insert that always
stores cannot do: a slightly higher bound. Neither is proved optimal for prefix-weighted
token hits, but no eviction policy in the cache has come near them.

Cost: O(blocks x log blocks) time and O(blocks) memory. The full trace (288,500 blocks of 512
tokens, 9 million of 16) takes ~1 s per capacity at 512-token blocks; at 16-token blocks ~20 s
to prepare, then ~30 s per capacity, in ~1.4 GB.

Figures (full trace, 16-token blocks; 512-token blocks within 0.001):

    capacity (tokens)   500,000   1,000,000   2,560,000   5,000,000   10,000,000
    optimum              0.1803      0.2517      0.3464      0.3736       0.3736
    optimum, bypass      0.1924      0.2577      0.3480      0.3736       0.3736

    python -m radixkv.benchmarks.optimum --capacity-tokens 2560000 --block-size 512
"""

from __future__ import annotations

import argparse
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .trace import TRACE_BLOCK, TraceRequest, find_trace, load_trace

__all__ = ["OptimumResult", "block_chains", "optimum_hit_tokens"]

NEVER = math.inf


@dataclass(frozen=True)
class OptimumResult:
    """Token hits of the offline optimum at one capacity (whole blocks, like the cache)."""

    capacity_tokens: int
    block_size: int
    hit_tokens: int
    prompt_tokens: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def block_chains(requests: Sequence[TraceRequest], block_size: int) -> tuple[list[list[int]], list[int]]:
    """Each request's whole blocks as dense ids (equal id = equal prefix), and how many of them a
    match may use ((len - 1) // block_size). Raises ValueError when block_size does not divide 512."""
    if block_size <= 0 or TRACE_BLOCK % block_size:
        raise ValueError(f"block_size must divide {TRACE_BLOCK}, got {block_size}")
    per = TRACE_BLOCK // block_size
    ids: dict[tuple[int, int, int], int] = {}  # (parent id, hash id, sub-block) -> id
    chains: list[list[int]] = []
    limits: list[int] = []
    for req in requests:
        chain: list[int] = []
        parent = -1
        for b in range(req.input_length // block_size):
            parent = ids.setdefault((parent, req.hash_ids[b // per], b % per), len(ids))
            chain.append(parent)
        chains.append(chain)
        limits.append((req.input_length - 1) // block_size)
    return chains, limits


def _next_uses(chains: list[list[int]]) -> list[list[float]]:
    """next_use[i][j]: the index of the next request after i holding chains[i][j] (NEVER if none)."""
    last: dict[int, int] = {}
    out: list[list[float]] = [[] for _ in chains]
    for i in range(len(chains) - 1, -1, -1):
        row: list[float] = []
        for b in chains[i]:
            row.append(last.get(b, NEVER))
            last[b] = i
        out[i] = row
    return out


def optimum_hit_tokens(
    requests: Sequence[TraceRequest], capacity_tokens: int, block_size: int = TRACE_BLOCK, *, bypass: bool = False
) -> OptimumResult:
    """Hit tokens of farthest-next-use eviction over `requests` with `capacity_tokens` of
    `block_size`-token blocks (see the module docstring). Raises ValueError on a bad size."""
    if capacity_tokens < block_size:
        raise ValueError(f"capacity_tokens must hold at least one block of {block_size}, got {capacity_tokens}")
    chains, limits = block_chains(requests, block_size)
    return _replay(chains, limits, _next_uses(chains), capacity_tokens // block_size, block_size, requests, bypass)


def _replay(
    chains: list[list[int]],
    limits: list[int],
    next_use: list[list[float]],
    capacity: int,
    block_size: int,
    requests: Sequence[TraceRequest],
    bypass: bool,
) -> OptimumResult:
    cached: dict[int, float] = {}  # block -> its next use (its current heap key)
    heap: list[tuple[float, int, int]] = []  # (-next use, -depth, block); stale entries skipped
    hit = total = 0
    for i, chain in enumerate(chains):
        total += requests[i].input_length
        k = 0
        while k < limits[i] and chain[k] in cached:
            k += 1
        hit += k * block_size
        uses = next_use[i]
        # The request's cached blocks are used now: their next use moves on. They stay locked
        # (never victims) while this request stores its new blocks.
        for j, b in enumerate(chain):
            if b not in cached:
                break
            cached[b] = uses[j]
            heapq.heappush(heap, (-uses[j], -j, b))
        locked = set(chain)
        set_aside: list[tuple[float, int, int]] = []  # locked heap entries, listed again after
        for j in range(len(chain)):
            b = chain[j]
            if b in cached:
                continue
            if len(cached) >= capacity:
                entry = _farthest(heap, cached, locked, set_aside)
                if entry is None:
                    break  # everything cached is locked: store no more (as the cache does)
                victim = entry[2]
                if bypass and cached[victim] <= uses[j]:
                    heapq.heappush(heap, entry)  # it stays
                    break  # the new block is needed later than anything cached: do not store it
                del cached[victim]
            cached[b] = uses[j]
            heapq.heappush(heap, (-uses[j], -j, b))
        for entry in set_aside:
            heapq.heappush(heap, entry)
    return OptimumResult(capacity * block_size, block_size, hit, total)


def _farthest(
    heap: list[tuple[float, int, int]],
    cached: dict[int, float],
    locked: set[int],
    set_aside: list[tuple[float, int, int]],
) -> tuple[float, int, int] | None:
    """Pop the heap entry of the unlocked cached block with the farthest next use (deepest on
    ties), or None; entries of locked blocks go to `set_aside`, stale ones are dropped."""
    while heap:
        entry = heapq.heappop(heap)
        b = entry[2]
        if cached.get(b) != -entry[0]:  # evicted, or used again since this entry was pushed
            continue
        if b in locked:
            set_aside.append(entry)
            continue
        return entry
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=None, help="trace path (default: shared/traces/ beside the repo)")
    p.add_argument("--capacity-tokens", type=int, nargs="+", default=[2_560_000])
    p.add_argument("--block-size", type=int, default=TRACE_BLOCK)
    p.add_argument("--bypass", action="store_true", help="may decline to store blocks (a higher bound)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    args = p.parse_args(argv)
    reqs = load_trace(args.trace or find_trace(), args.limit)
    chains, limits = block_chains(reqs, args.block_size)
    uses = _next_uses(chains)
    for cap in args.capacity_tokens:
        r = _replay(chains, limits, uses, cap // args.block_size, args.block_size, reqs, args.bypass)
        print(
            f"optimum{' (bypass)' if args.bypass else ''} @ {cap:,} tokens, {args.block_size}-token blocks: "
            f"hit rate {r.hit_rate:.4f}"
        )


if __name__ == "__main__":
    main()
