"""`radixkv bench trace`: hit rate vs capacity for each eviction policy on the Mooncake trace.

Replays the trace through `PrefixCache` alone (no model) with `benchmarks.trace.replay` (match
at most len - 1 tokens, release, insert the prompt), for every (policy, capacity) pair, and
draws one curve per policy beside the unlimited-cache bound. With `block_size` 512 (the
trace's own granularity, the default) the reference figures of shared/traces/README.md apply:
unlimited 0.3736, LRU about 0.11 at 2,560,000 tokens and about 0.29 at 10,240,000.
Cost: one replay per pair, each O(prompt tokens) (~2 M tokens/s here: ~75 s for the full
trace), so the default sweep of the full trace takes tens of minutes on 2 cores; use `limit`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from radixkv import DEFAULT_EVICTION, POLICIES, PrefixCache

from .optimum import optimum_hit_tokens
from .plots import plot_hit_rate_curves
from .trace import TINY_SPEC, TRACE_BLOCK, TraceRequest, find_trace, load_trace, replay

__all__ = ["DEFAULT_CAPACITIES", "run_trace_sweep", "unlimited_hit_tokens"]

OPTIMUM = "offline optimum"
DEFAULT_CAPACITIES = (500_000, 1_000_000, 2_560_000, 5_000_000, 10_000_000)
# `priority` equals its tie-break here (the trace has no priorities); the default policy is always shown beside LRU.
DEFAULT_POLICIES = tuple(dict.fromkeys(("lru", DEFAULT_EVICTION, "fifo", "lfu", "reuse")))


def unlimited_hit_tokens(requests: Sequence[TraceRequest], block_size: int) -> tuple[int, int]:
    """(hit tokens, prompt tokens) of an unlimited whole-block cache fed prompts only, in order.

    Works on hash ids, never expanding tokens: block b of a prompt is (hash id of its 512-token
    trace block, index inside it); a prompt hits its longest run of leading blocks stored
    before, capped at (len - 1) // block_size blocks; it then stores len // block_size blocks.
    Raises ValueError when `block_size` does not divide 512.
    """
    if block_size <= 0 or TRACE_BLOCK % block_size:
        raise ValueError(f"--block-size must divide {TRACE_BLOCK}, got {block_size}")
    per = TRACE_BLOCK // block_size
    ids: dict[tuple[int, int, int], int] = {}  # (parent id, hash id, sub-block) -> id
    hit = total = 0
    for req in requests:
        n = req.input_length
        total += n
        parent, matched = 0, True
        for b in range(n // block_size):
            key = (parent, req.hash_ids[b // per], b % per)
            if matched and b < (n - 1) // block_size and key in ids:
                hit += block_size
            else:
                matched = False
            parent = ids.setdefault(key, len(ids) + 1)
    return hit, total


def _ticks(bar: tqdm) -> Iterator[None]:
    """An endless iterator that advances `bar` by 100 requests per `next` (replay's progress hook)."""
    while True:
        bar.update(100)
        yield None


def run_trace_sweep(
    trace: Path | None,
    *,
    out: Path | None,
    block_size: int = TRACE_BLOCK,
    capacities: Sequence[int] | None = None,
    policies: Sequence[str] | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the sweep, print a markdown table, write results.json, table.md and hit_rate_vs_capacity.png to `out`.

    `trace` None finds shared/traces/ beside the repository. Raises ValueError naming a bad
    policy, capacity or block size, FileNotFoundError for a missing trace.
    """
    # LRU and the default are always replayed, side by side, first.
    policies = list(dict.fromkeys(["lru", DEFAULT_EVICTION, *(policies or DEFAULT_POLICIES)]))
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ValueError(f"--policies: unknown {', '.join(bad)}; choose from {', '.join(POLICIES)}")
    capacities = sorted(capacities or DEFAULT_CAPACITIES)
    if any(c <= 0 for c in capacities):
        raise ValueError(f"--capacities must be positive token counts, got {capacities}")
    path = (trace if trace is not None else find_trace()).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"--trace {str(path)!r} does not exist")
    requests = load_trace(path, limit)
    hit, total = unlimited_hit_tokens(requests, block_size)
    bound = hit / total if total else 0.0
    curves: dict[str, list[float]] = {p: [] for p in policies}
    runs: list[dict[str, Any]] = []
    bar = tqdm(total=len(policies) * len(capacities) * len(requests), unit="req", disable=not progress)
    for policy in policies:
        for capacity in capacities:
            bar.set_description(f"{policy} @ {capacity:,}")
            cache = PrefixCache(TINY_SPEC, capacity_tokens=capacity, block_size=block_size, eviction=policy)
            result = replay(cache, requests, _ticks(bar))
            cache.check_invariants()
            curves[policy].append(result.hit_rate)
            runs.append({"policy": policy, "capacity_tokens": capacity, **asdict(result)})
            del cache
    bar.close()
    # The offline optimum (farthest next use, knows the future): the ceiling any policy is judged against.
    curves[OPTIMUM] = [
        optimum_hit_tokens(requests, c, block_size).hit_tokens / total if total else 0.0 for c in capacities
    ]
    doc = {
        "trace": str(path),
        "requests": len(requests),
        "prompt_tokens": total,
        "block_size": block_size,
        "capacities": capacities,
        "unlimited_hit_rate": bound,
        "hit_rate": curves,
        "runs": runs,
    }
    table = format_trace_table(doc)
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(doc, indent=1))
        (out / "table.md").write_text(f"## trace\n\n{table}\n")
        png = plot_hit_rate_curves(
            capacities,
            curves,
            out / "hit_rate_vs_capacity.png",
            bound=bound,
            title=f"Mooncake conversation trace ({len(requests):,} requests), block {block_size}",
        )
        print(f"\nwrote {out / 'results.json'}, {out / 'table.md'} and {png}")
    return doc


def format_trace_table(doc: dict[str, Any]) -> str:
    """Markdown table: one row per capacity, one column per policy (the default marked), then the unlimited bound."""
    policies = list(doc["hit_rate"])
    names = [f"{p} (default)" if p == DEFAULT_EVICTION else p for p in policies]
    lines = [
        "| capacity (tokens) | " + " | ".join(f"{p} hit rate" for p in names) + " |",
        "|---|" + "---|" * len(policies),
    ]
    for i, c in enumerate(doc["capacities"]):
        lines.append(f"| {c:,} | " + " | ".join(f"{doc['hit_rate'][p][i]:.4f}" for p in policies) + " |")
    lines.append("")
    lines.append(
        f"- unlimited cache: {doc['unlimited_hit_rate']:.4f}; {doc['requests']:,} requests, "
        f"{doc['prompt_tokens']:,} prompt tokens, block {doc['block_size']}, prompts only, last token recomputed"
    )
    return "\n".join(lines)
