"""Replay the production conversation trace through PrefixCache alone (no model).

Each trace request lists one hash id per 512-token block of its prompt. Hash id `h` expands
to the token ids `[h * 512, (h + 1) * 512)`, so equal ids give equal tokens and different ids
never collide; the prompt is cut to `input_length`. Per request: match the prompt (at most
len - 1 tokens, as a server must compute the last one), release, insert the prompt's KV.

    python -m radixkv.benchmarks.trace --capacity-tokens 2560000 --eviction lru
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from radixkv import DEFAULT_EVICTION, POLICIES, KVSpec, PrefixCache

TRACE_NAME = "mooncake_conversation_trace.jsonl"
TRACE_BLOCK = 512
# The trace benchmark's spec: 1 layer, 1 KV head, head_dim 8, float16 (32 bytes/token).
TINY_SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float16, device="cpu")


@dataclass(frozen=True)
class TraceRequest:
    timestamp: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def prompt(self) -> list[int]:
        """The prompt's token ids: each hash id expanded to its 512 tokens, cut to input_length."""
        ids: list[int] = []
        for h in self.hash_ids:
            ids += range(h * TRACE_BLOCK, (h + 1) * TRACE_BLOCK)
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

    def row(self) -> str:
        return (
            f"hit rate {self.hit_rate:.4f} | {self.us_per_request:8.1f} us/request "
            f"({self.cpu_us_per_request:.1f} us CPU) | "
            f"{self.tokens_per_second / 1e6:6.2f} M tokens/s | {self.requests} requests"
        )


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


def load_trace(path: Path | str, limit: int | None = None) -> list[TraceRequest]:
    """Parse the JSON-lines trace (at most `limit` requests)."""
    out: list[TraceRequest] = []
    with open(path) as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            if line.strip():
                r = json.loads(line)
                out.append(TraceRequest(r["timestamp"], r["input_length"], r["output_length"], tuple(r["hash_ids"])))
    return out


def replay(cache: PrefixCache, requests: Iterable[TraceRequest], progress: Iterator | None = None) -> ReplayResult:
    """Match, release and insert every request's prompt; time only the cache calls."""
    spec = cache.spec
    reqs = list(requests)
    longest = max((r.input_length for r in reqs), default=1)
    # One KV source for every request: inserts copy slices of it ([1, H, T, D] per layer).
    source = torch.randn(spec.num_layers, 2, 1, spec.num_kv_heads, longest, spec.head_dim).to(spec.dtype)
    total = hits = 0
    seconds = cpu = 0.0
    for i, req in enumerate(reqs):
        ids = req.prompt()
        kv = [
            (source[layer, 0, :, :, : len(ids)], source[layer, 1, :, :, : len(ids)]) for layer in range(spec.num_layers)
        ]
        t0, c0 = time.perf_counter(), time.process_time()
        m = cache.match(ids[:-1])
        hit = m.num_tokens
        cache.release(m)
        cache.insert(ids, kv)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        hits += hit
        total += len(ids)
        if progress is not None and i % 100 == 0:
            next(progress, None)
    n = len(reqs)
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=None, help="trace path (default: shared/traces/ beside the repo)")
    p.add_argument("--capacity-tokens", type=int, default=2_560_000)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--eviction", default=DEFAULT_EVICTION, choices=list(POLICIES))
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--host-capacity-tokens", type=int, default=None, help="host-memory tier under the pool")
    p.add_argument("--disk-path", type=Path, default=None, help="disk tier directory (needs --disk-capacity-bytes)")
    p.add_argument("--disk-capacity-bytes", type=int, default=None)
    args = p.parse_args(argv)
    # The copies are small; extra intra-op threads only add scheduling noise.
    torch.set_num_threads(1)
    reqs = load_trace(args.trace or find_trace(), args.limit)
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
        print(
            json.dumps(
                {"eviction": args.eviction, "capacity_tokens": args.capacity_tokens, **asdict(result), "tiers": tiers}
            )
        )
    else:
        print(f"{args.eviction:>8} @ {args.capacity_tokens:,} tokens: {result.row()}")
        for name, st in tiers.items():
            print(f"    {name}: {st}")


if __name__ == "__main__":
    main()
