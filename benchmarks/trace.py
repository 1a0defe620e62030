"""The production conversation trace replayed through `PrefixCache` alone (no model).

Each trace request lists one hash id per 512-token block of its prompt; hash id `h` expands to the
token ids `[h * 512, (h + 1) * 512)` (equal ids give equal tokens, different ids never collide),
cut to `input_length`. Per request, `replay` matches the prompt (at most len - 1 tokens, as a
server computes the last one), releases, and inserts the prompt's KV.

The bounds work on hash ids alone (`block_chains`: block b of a prompt is its parent block, its
trace block's hash id and its index inside it, so equal ids mean equal prefixes).
`unlimited_hit_tokens` is an unlimited cache fed prompts only; `optimum_hit_tokens` the offline
optimum, evicting the block whose next use is farthest ahead (Belady). A parent's next use is never
later than its child's, so with ties broken deepest first the victim is always a leaf: this is also
the best leaf-only eviction, and the cache stays prefix-closed. The blocks of the request being
stored are locked, as in `PrefixCache`. `bypass=True` may also decline to store a block needed
later than every cached one (a slightly higher bound). Neither is proved optimal for
prefix-weighted token hits, but no policy in the cache has come near them. Cost: O(blocks x log
blocks) time, O(blocks) memory: the full trace (288,500 blocks of 512 tokens, 9 million of 16)
takes ~1 s per capacity at 512-token blocks; at 16, ~20 s to prepare, then ~30 s per capacity, in
~1.4 GB.

Figures (full trace, 16-token blocks; 512-token blocks within 0.001):

    capacity (tokens)   500,000   1,000,000   2,560,000   5,000,000   10,000,000
    optimum              0.1803      0.2517      0.3464      0.3736       0.3736
    optimum, bypass      0.1924      0.2577      0.3480      0.3736       0.3736

Commands (every one takes --trace, --limit and --block-size, 512 by default: the trace's own
granularity, where the reference figures of shared/traces/README.md apply: unlimited 0.3736, LRU
about 0.11 at 2,560,000 tokens and about 0.29 at 10,240,000):

    radixkv bench trace --out DIR          # hit rate vs capacity per policy, the optimum, the bound
    python -m radixkv.benchmarks.trace replay --capacity-tokens 2560000 --eviction lru
    python -m radixkv.benchmarks.trace optimum --capacity-tokens 2560000 --bypass
    python -m radixkv.benchmarks.trace quant --limit 2000    # float16 vs int8 vs int4 at one byte budget

`replay` replays one cache, lower tiers optional. `quant` gives each kv_dtype the byte budget of
2,560,000 float16 tokens of one layer and KV head of head_dim 64 (SmolLM2's: the ratios depend
only on head_dim); quantised blocks fit more tokens, scales included. The sweep costs one replay
per (policy, capacity), ~2 M tokens/s here (~75 s for the full trace): the default sweep of the
full trace takes tens of minutes on 2 cores; use --limit.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from radixkv import DEFAULT_EVICTION, POLICIES, KVSpec, PrefixCache

from .report import plot_hit_rate_curves
from .workloads import chain_ids, leading_run

TRACE_NAME = "mooncake_conversation_trace.jsonl"
TRACE_BLOCK = 512
# The trace benchmark's spec: 1 layer, 1 KV head, head_dim 8, float16 (32 bytes/token).
TINY_SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float16, device="cpu")
# `quant`'s spec: SmolLM2's head (the int8 / int4 scales' share depends on head_dim).
QUANT_SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=64, dtype=torch.float16, device="cpu")
FLOAT16_TOKENS = 2_560_000
OPTIMUM = "offline optimum"
DEFAULT_CAPACITIES = (500_000, 1_000_000, 2_560_000, 5_000_000, 10_000_000)
# `priority` equals its tie-break here (the trace has no priorities); the default policy is always shown beside LRU.
DEFAULT_POLICIES = tuple(dict.fromkeys(("lru", DEFAULT_EVICTION, "fifo", "lfu", "reuse")))
NEVER = math.inf
_Entry = tuple[float, int, int]  # a heap entry of the optimum: (-next use, -depth, block)


@dataclass(frozen=True)
class TraceRequest:
    """One request: its prompt as hash ids of `block`-token blocks, cut to `input_length` tokens.

    `namespace` (None for the production trace) keeps generated traces' tenants apart."""

    timestamp: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    namespace: Hashable = None
    block: int = TRACE_BLOCK

    def prompt(self) -> list[int]:
        """The prompt's token ids: each hash id expanded to its `block` tokens, cut to input_length."""
        ids: list[int] = []
        for h in self.hash_ids:
            ids += range(h * self.block, (h + 1) * self.block)
            if len(ids) >= self.input_length:
                break
        return ids[: self.input_length]


@dataclass(frozen=True)
class ReplayResult:
    requests: int
    prompt_tokens: int
    hit_tokens: int
    hit_rate: float
    seconds: float  # wall time inside the cache (match + release + insert), not expansion
    cpu_seconds: float  # CPU time of the same calls: steadier than wall time on a shared machine
    us_per_request: float
    cpu_us_per_request: float
    tokens_per_second: float


def find_trace(start: Path | None = None) -> Path:
    """The trace in `shared/traces/` beside the repository (or any parent of the cwd)."""
    here = Path(__file__).resolve()
    candidates = [*(Path(start or Path.cwd()).resolve().parents), Path(start or Path.cwd()).resolve()]
    candidates += list(here.parents)
    for base in candidates:
        for sub in ("shared/traces", "../shared/traces"):
            path = (base / sub / TRACE_NAME).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(f"{TRACE_NAME} not found under shared/traces/ beside the repository; pass --trace PATH")


def load_trace(path: Path | str | None, limit: int | None = None) -> list[TraceRequest]:
    """Parse the JSON-lines trace (None: `find_trace()`), at most `limit` requests.
    Raises FileNotFoundError naming --trace when the file is missing."""
    path = Path(path) if path is not None else find_trace()
    if not path.is_file():
        raise FileNotFoundError(f"--trace {str(path)!r} does not exist")
    out: list[TraceRequest] = []
    with open(path) as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            if line.strip():
                r = json.loads(line)
                out.append(TraceRequest(r["timestamp"], r["input_length"], r["output_length"], tuple(r["hash_ids"])))
    return out


def replay(
    cache: PrefixCache, requests: Sequence[TraceRequest], progress: Callable[[int], Any] | None = None
) -> ReplayResult:
    """Match, release and insert every request's prompt (in its namespace); time only the cache calls.
    `progress`, when given, is called with 100 once per 100 requests (a progress bar's `update`)."""
    spec = cache.spec
    longest = max((r.input_length for r in requests), default=1)
    # One KV source for every request: inserts copy slices of it ([1, H, T, D] per layer).
    source = torch.randn(spec.num_layers, 2, 1, spec.num_kv_heads, longest, spec.head_dim).to(spec.dtype)
    total = hits = 0
    seconds = cpu = 0.0
    for i, req in enumerate(requests):
        ids = req.prompt()
        kv = [
            (source[layer, 0, :, :, : len(ids)], source[layer, 1, :, :, : len(ids)]) for layer in range(spec.num_layers)
        ]
        t0, c0 = time.perf_counter(), time.process_time()
        m = cache.match(ids[:-1], namespace=req.namespace)
        hit = m.num_tokens
        cache.release(m)
        cache.insert(ids, kv, namespace=req.namespace)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        hits += hit
        total += len(ids)
        if progress is not None and i % 100 == 0:
            progress(100)
    n = len(requests)
    return ReplayResult(
        requests=n,
        prompt_tokens=total,
        hit_tokens=hits,
        hit_rate=hits / total if total else 0.0,
        seconds=seconds,
        cpu_seconds=cpu,
        us_per_request=seconds / n * 1e6 if n else 0.0,
        cpu_us_per_request=cpu / n * 1e6 if n else 0.0,
        tokens_per_second=total / seconds if seconds else 0.0,
    )


# ----- bounds on hash ids ----------------------------------------------------------------------------


def block_chains(requests: Sequence[TraceRequest], block_size: int) -> tuple[list[list[int]], list[int]]:
    """Each request's whole blocks as dense ids (`workloads.chain_ids` over (hash id, offset inside
    its trace block)), and how many of them a match may use ((len - 1) // block_size). Raises ValueError naming
    --block-size when it does not divide a request's hash-id block."""
    table: dict[Any, int] = {}
    chains: list[list[int]] = []
    limits: list[int] = []
    for req in requests:
        if block_size <= 0 or req.block % block_size:
            raise ValueError(f"--block-size must divide {req.block}, got {block_size}")
        per = req.block // block_size
        blocks = ((req.hash_ids[b // per], b % per) for b in range(req.input_length // block_size))
        chains.append(chain_ids(table, blocks, req.namespace))
        limits.append((req.input_length - 1) // block_size)
    return chains, limits


def unlimited_hit_tokens(requests: Sequence[TraceRequest], block_size: int) -> tuple[int, int]:
    """(hit tokens, prompt tokens) of an unlimited whole-block cache fed prompts only, in order: a
    prompt hits its longest run of leading blocks stored before, capped at (len - 1) // block_size
    blocks; it then stores len // block_size blocks."""
    chains, limits = block_chains(requests, block_size)
    stored: set[int] = set()
    hit = 0
    for chain, limit in zip(chains, limits, strict=True):
        hit += leading_run(chain, limit, stored) * block_size
        stored.update(chain)
    return hit, sum(r.input_length for r in requests)


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
    return _optimum(chains, limits, _next_uses(chains), capacity_tokens // block_size, block_size, requests, bypass)


def _optimum(
    chains: list[list[int]],
    limits: list[int],
    next_use: list[list[float]],
    capacity: int,
    block_size: int,
    requests: Sequence[TraceRequest],
    bypass: bool,
) -> OptimumResult:
    cached: dict[int, float] = {}  # block -> its next use (its current heap key)
    heap: list[_Entry] = []  # stale entries skipped
    hit = total = 0
    for i, chain in enumerate(chains):
        total += requests[i].input_length
        hit += leading_run(chain, limits[i], cached) * block_size
        uses = next_use[i]
        # The request's cached blocks are used now: their next use moves on. They stay locked
        # (never victims) while this request stores its new blocks.
        for j, b in enumerate(chain):
            if b not in cached:
                break
            cached[b] = uses[j]
            heapq.heappush(heap, (-uses[j], -j, b))
        locked = set(chain)
        set_aside: list[_Entry] = []  # locked heap entries, listed again after
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


def _farthest(heap: list[_Entry], cached: dict[int, float], locked: set[int], set_aside: list[_Entry]) -> _Entry | None:
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


# ----- the sweep: `radixkv bench trace` ------------------------------------------------------------


def run_trace_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """`radixkv bench trace` (the flags of `add_sweep_flags`): hit rate vs capacity for each policy,
    beside the offline optimum and the unlimited bound; print a markdown table, write results.json,
    table.md and hit_rate_vs_capacity.png to `--out`.

    No `--trace` finds shared/traces/ beside the repository. Raises ValueError naming a bad
    policy, capacity or block size, FileNotFoundError for a missing trace.
    """
    out, block_size = args.out, args.block_size
    # LRU and the default are always replayed, side by side, first.
    chosen = args.policies.split(",") if args.policies else DEFAULT_POLICIES
    policies = list(dict.fromkeys(["lru", DEFAULT_EVICTION, *chosen]))
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ValueError(f"--policies: unknown {', '.join(bad)}; choose from {', '.join(POLICIES)}")
    capacities = sorted([int(float(c)) for c in args.capacities.split(",")] if args.capacities else DEFAULT_CAPACITIES)
    if any(c <= 0 for c in capacities):
        raise ValueError(f"--capacities must be positive token counts, got {capacities}")
    path = (args.trace if args.trace is not None else find_trace()).resolve()
    requests = load_trace(path, args.limit)
    hit, total = unlimited_hit_tokens(requests, block_size)
    bound = hit / total if total else 0.0
    curves: dict[str, list[float]] = {p: [] for p in policies}
    runs: list[dict[str, Any]] = []
    bar = tqdm(total=len(policies) * len(capacities) * len(requests), unit="req", disable=args.no_progress)
    for policy in policies:
        for capacity in capacities:
            bar.set_description(f"{policy} @ {capacity:,}")
            cache = PrefixCache(TINY_SPEC, capacity_tokens=capacity, block_size=block_size, eviction=policy)
            result = replay(cache, requests, bar.update)
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


# ----- the command line ----------------------------------------------------------------------------


def _add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trace", type=Path, default=None, help="JSONL trace (default: shared/traces/ beside the repository)"
    )
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument(
        "--block-size", type=int, default=TRACE_BLOCK, help=f"cache block size in tokens (default: {TRACE_BLOCK})"
    )


def add_sweep_flags(p: argparse.ArgumentParser) -> None:
    """The flags of `radixkv bench trace`."""
    _add_common_flags(p)
    p.add_argument("--capacities", default=None, help="comma-separated capacities in tokens (default: a log sweep)")
    p.add_argument("--policies", default=None, help="comma-separated eviction policies (default: all)")
    p.add_argument("--out", type=Path, default=Path("radixkv-results") / "trace", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _replay_one(args: argparse.Namespace, reqs: list[TraceRequest]) -> None:
    cache = PrefixCache(
        TINY_SPEC,
        capacity_tokens=args.capacity_tokens,
        block_size=args.block_size,
        eviction=args.eviction,
        host_capacity_tokens=args.host_capacity_tokens,
        disk_path=args.disk_path,
        disk_capacity_bytes=args.disk_capacity_bytes,
    )
    result = replay(cache, reqs)
    cache.check_invariants()
    tiers = {name: s.as_dict() for name, s in cache.tier_stats.items()}
    if args.json:
        doc = {"eviction": args.eviction, "capacity_tokens": args.capacity_tokens, **asdict(result), "tiers": tiers}
        print(json.dumps(doc))
    else:
        r = result
        print(f"{args.eviction:>8} @ {args.capacity_tokens:,} tokens: hit rate {r.hit_rate:.4f} | "
              f"{r.us_per_request:8.1f} us/request ({r.cpu_us_per_request:.1f} us CPU) | "
              f"{r.tokens_per_second / 1e6:6.2f} M tokens/s | {r.requests} requests")  # fmt: skip
        for name, st in tiers.items():
            print(f"    {name}: {st}")


def _optimum_rows(args: argparse.Namespace, reqs: list[TraceRequest]) -> None:
    chains, limits = block_chains(reqs, args.block_size)
    uses = _next_uses(chains)
    for cap in args.capacity_tokens:
        r = _optimum(chains, limits, uses, cap // args.block_size, args.block_size, reqs, args.bypass)
        print(
            f"optimum{' (bypass)' if args.bypass else ''} @ {cap:,} tokens, {args.block_size}-token blocks: "
            f"hit rate {r.hit_rate:.4f}"
        )


def _quant(args: argparse.Namespace, reqs: list[TraceRequest]) -> None:
    budget = args.float16_tokens * QUANT_SPEC.bytes_per_token
    rows = []
    print(f"budget {budget:,} B (= {args.float16_tokens:,} float16 tokens of head_dim 64), {len(reqs):,} requests")
    print(
        "| policy | kv_dtype | bytes/token | capacity tokens | x float16 | hit rate | replay s |\n" + "|---" * 7 + "|"
    )
    for policy in args.policies.split(","):
        base = None
        for kv_dtype in (None, "int8", "int4"):
            cache = PrefixCache(
                QUANT_SPEC, capacity_bytes=budget, block_size=args.block_size, eviction=policy, kv_dtype=kv_dtype
            )
            s = cache.stats
            base = base or s.capacity_tokens
            t0 = time.perf_counter()
            result = replay(cache, reqs)
            cache.check_invariants()
            row = {
                "policy": policy,
                "kv_dtype": kv_dtype or "float16",
                **{k: getattr(s, k) for k in ("bytes_per_token", "capacity_tokens", "capacity_bytes")},
                "token_ratio": s.capacity_tokens / base,
                **{k: getattr(result, k) for k in ("hit_rate", "hit_tokens", "prompt_tokens")},
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(
                f"| {policy} | {row['kv_dtype']} | {row['bytes_per_token']} | {row['capacity_tokens']:,} "
                f"| {row['token_ratio']:.3f} | {row['hit_rate']:.4f} | {row['seconds']:.0f} |",
                flush=True,
            )
            del cache
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {"budget_bytes": budget, "block_size": args.block_size, "requests": len(reqs), "rows": rows}
        (args.out / "quant_trace.json").write_text(json.dumps(doc, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m radixkv.benchmarks.trace replay|optimum|quant` (see the module docstring)."""
    ap = argparse.ArgumentParser(
        prog="python -m radixkv.benchmarks.trace",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    one = sub.add_parser("replay", help="one cache over the trace: hit rate, time per request, tier figures")
    one.add_argument("--capacity-tokens", type=int, default=2_560_000, help="device pool (default: 2,560,000)")
    one.add_argument("--eviction", default=DEFAULT_EVICTION, choices=list(POLICIES))
    one.add_argument("--json", action="store_true", help="print the result as JSON")
    one.add_argument("--host-capacity-tokens", type=int, default=None, help="host-memory tier under the pool")
    one.add_argument("--disk-path", type=Path, default=None, help="disk tier directory (needs --disk-capacity-bytes)")
    one.add_argument("--disk-capacity-bytes", type=int, default=None)
    opt = sub.add_parser("optimum", help="the offline optimum (farthest next use) at each capacity")
    opt.add_argument(
        "--capacity-tokens", type=int, nargs="+", default=[2_560_000], help="one or more (default: 2,560,000)"
    )
    opt.add_argument("--bypass", action="store_true", help="may decline to store blocks (a higher bound)")
    quant = sub.add_parser("quant", help="float16 vs int8 vs int4 blocks at one byte budget")
    quant.add_argument("--float16-tokens", type=int, default=FLOAT16_TOKENS, help="budget, in float16 tokens")
    quant.add_argument("--policies", default=f"lru,{DEFAULT_EVICTION}")
    quant.add_argument("--out", type=Path, default=None, help="write quant_trace.json here")
    for p in (one, opt, quant):
        _add_common_flags(p)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the copies are small; extra intra-op threads only add scheduling noise
    try:
        reqs = load_trace(args.trace, args.limit)
        {"replay": _replay_one, "optimum": _optimum_rows, "quant": _quant}[args.command](args, reqs)
    except (ValueError, FileNotFoundError) as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
