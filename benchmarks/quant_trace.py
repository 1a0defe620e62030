"""Token hit rate on the conversation trace at one byte budget: float16 vs int8 vs int4 blocks.

The budget is that of 2,560,000 float16 tokens. Quantised blocks fit more tokens into it
(scales included), and this replays the trace (`benchmarks.trace.replay`: match at most
len - 1 tokens, release, insert the prompt) through a real quantised PrefixCache for each
(kv_dtype, policy). The spec is one layer and one KV head of head_dim 64 (SmolLM2's head): the
token ratios depend only on head_dim, not on layers or heads.

    python -m radixkv.benchmarks.quant_trace [--limit N] [--block-size 512]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from radixkv import DEFAULT_EVICTION, KVSpec, PrefixCache

from .trace import TRACE_BLOCK, find_trace, load_trace, replay

SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=64, dtype=torch.float16, device="cpu")
FLOAT16_TOKENS = 2_560_000


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=None)
    p.add_argument("--float16-tokens", type=int, default=FLOAT16_TOKENS, help="budget, in float16 tokens")
    p.add_argument("--block-size", type=int, default=TRACE_BLOCK)
    p.add_argument("--policies", default=f"lru,{DEFAULT_EVICTION}")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    reqs = load_trace(args.trace or find_trace(), args.limit)
    budget = args.float16_tokens * SPEC.bytes_per_token
    rows = []
    print(f"budget {budget:,} B (= {args.float16_tokens:,} float16 tokens of head_dim 64), {len(reqs):,} requests")
    print("| policy | kv_dtype | bytes/token | capacity tokens | x float16 | hit rate | replay s |")
    print("|---|---|---|---|---|---|---|")
    for policy in args.policies.split(","):
        base = None
        for kv_dtype in (None, "int8", "int4"):
            cache = PrefixCache(
                SPEC, capacity_bytes=budget, block_size=args.block_size, eviction=policy, kv_dtype=kv_dtype
            )
            s = cache.stats
            base = base or s.capacity_tokens
            t0 = time.perf_counter()
            result = replay(cache, reqs)
            cache.check_invariants()
            row = {
                "policy": policy,
                "kv_dtype": kv_dtype or "float16",
                "bytes_per_token": s.bytes_per_token,
                "capacity_tokens": s.capacity_tokens,
                "capacity_bytes": s.capacity_bytes,
                "token_ratio": s.capacity_tokens / base,
                "hit_rate": result.hit_rate,
                "hit_tokens": result.hit_tokens,
                "prompt_tokens": result.prompt_tokens,
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


if __name__ == "__main__":
    main()
