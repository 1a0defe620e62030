"""Cost of quantised reuse, as ratios to exact measured side by side (round robin, medians).

1. gather: `PrefixCache.gather` of `--tokens` tokens with dequantisation (int8, int4) vs the
   exact copy, for SmolLM2-135M's KV shape (30 layers, 3 KV heads, head_dim 64) in float32 and
   float16. Also insert (which quantises) for information.
2. TTFT of a hit (`--ttft`, needs the model, see quant_quality.py): `generate(max_new_tokens=1)`
   on a prompt whose first ~1,100 tokens are cached, through radixkv.wrap with each kv_dtype.

    python -m radixkv.benchmarks.quant_speed [--tokens 1024] [--repeats 30] [--ttft]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from radixkv import KVSpec, PrefixCache

KV_DTYPES: tuple[str | None, ...] = (None, "int8", "int4")


def _round_robin(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call, the calls interleaved so that machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()  # warm up
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def gather_ratios(tokens: int, repeats: int, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    spec = KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype=dtype)
    ids = list(range(tokens))
    g = torch.Generator().manual_seed(0)
    kv = [
        (torch.randn(1, 3, tokens, 64, generator=g).to(dtype), torch.randn(1, 3, tokens, 64, generator=g).to(dtype))
        for _ in range(spec.num_layers)
    ]
    caches = {kd or "exact": PrefixCache(spec, capacity_tokens=2 * tokens, kv_dtype=kd) for kd in KV_DTYPES}
    matches = {}
    for name, cache in caches.items():
        cache.insert(ids, kv)
        matches[name] = cache.match(ids)
    gather = _round_robin({n: (lambda c=c, m=matches[n]: c.gather(m)) for n, c in caches.items()}, repeats)

    def reinsert(cache: PrefixCache) -> None:
        cache.clear()
        cache.insert(ids, kv)

    for name, cache in caches.items():
        cache.release(matches[name])
    insert = _round_robin({n: (lambda c=c: reinsert(c)) for n, c in caches.items()}, max(3, repeats // 3))
    return {
        n: {
            "gather_ms": gather[n] * 1e3,
            "gather_ratio": gather[n] / gather["exact"],
            "insert_ms": insert[n] * 1e3,
            "insert_ratio": insert[n] / insert["exact"],
        }
        for n in caches
    }


@torch.no_grad()
def ttft_ratios(repeats: int) -> dict[str, dict[str, float]]:
    import radixkv

    from .quant_quality import TEXT, load_smollm2

    model, tok = load_smollm2()
    ids = tok(TEXT.read_text())["input_ids"][:1_136]
    cached_part = torch.tensor([ids[:1_120]])
    prompt = torch.tensor([ids])
    wrapped = {kd or "exact": radixkv.wrap(model, capacity_tokens=4_096, kv_dtype=kd) for kd in KV_DTYPES}
    for w in wrapped.values():
        w.generate(cached_part, attention_mask=torch.ones_like(cached_part), max_new_tokens=1, do_sample=False)

    def hit(w: Any) -> None:
        w.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False)

    def miss() -> None:
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False)

    calls: dict[str, Callable[[], Any]] = {n: (lambda w=w: hit(w)) for n, w in wrapped.items()}
    calls["no cache"] = miss
    med = _round_robin(calls, repeats)
    for w in wrapped.values():
        assert w.stats.reused_tokens >= 1_120, w.stats
    return {n: {"ttft_ms": med[n] * 1e3, "ttft_ratio": med[n] / med["exact"]} for n in calls}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--ttft", action="store_true", help="also TTFT of a hit on SmolLM2-135M (loads the model)")
    p.add_argument("--ttft-repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}; gather of {args.tokens:,} tokens, 30 layers x 3 heads x 64")
    print("| dtype | kv_dtype | gather ms | gather vs exact | insert ms | insert vs exact |\n|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float16):
        for name, r in gather_ratios(args.tokens, args.repeats, dtype).items():
            print(
                f"| {str(dtype).removeprefix('torch.')} | {name} | {r['gather_ms']:.2f} | {r['gather_ratio']:.2f}x "
                f"| {r['insert_ms']:.2f} | {r['insert_ratio']:.2f}x |",
                flush=True,
            )
    if args.ttft:
        print("\nTTFT, 1,136-token prompt, 1,120 cached (float32 model)")
        print("| path | TTFT ms | vs exact hit |\n|---|---|---|")
        for name, r in ttft_ratios(args.ttft_repeats).items():
            print(f"| {name} | {r['ttft_ms']:.0f} | {r['ttft_ratio']:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
