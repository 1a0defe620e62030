"""Time to first token on a prefix-cache hit, side by side with the two baselines, in one run.

    python -m radixkv.benchmarks.ttft                       # llama-100m, float32, CPU
    python benchmarks/ttft.py --repeats 3 --threads 2

One shared prefix (2,048 random tokens by default) and a fresh 32-token suffix per request;
every request generates one token. Methods, interleaved request by request so that they share
the machine's noise:
  - plain:   `model.generate(prompt)`, the whole prompt prefilled;
  - recipe:  transformers' prompt-reuse recipe: a `DynamicCache` of the prefix computed once
             (not timed), `copy.deepcopy` of it per request (timed), passed as the cache argument;
  - radixkv: `radixkv.wrap(model).generate(prompt)` after one warm-up request stored the prefix
             (not timed); the timed call includes the lookup, KV gather and cache build.
TTFT is measured by a streamer (see timing.py): call start to the first generated token.
"call" also includes what happens after that token (radixkv inserts the new suffix blocks).
The first generated token of all three methods must agree (printed).

Results (llama-100m, float32, CPU container with 2 cores shared with other jobs, load average
~5, `--threads 1 --repeats 9`; two OpenMP threads on an oversubscribed machine made every
figure erratic). TTFT medians:

    gather into one tensor for all      plain 9,395 ms   recipe 359 ms   radixkv 405 ms
    layers                              radixkv: 23.2x faster than plain, 1.13x the recipe
    gather with one index_select        plain 9,725 ms   recipe 385 ms   radixkv 377 ms
    per layer and K/V (KVPool.gather)   radixkv: 25.8x faster than plain, 0.98x the recipe

The gap in the first row is the pool gather: one fresh 50 MB tensor for all layers is above
glibc's mmap threshold, so every request faults in new pages (~40 ms), while per-layer tensors
(2 MB here) are recycled from the heap, like the recipe's deepcopy.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable, Sequence
from time import perf_counter

import torch
from radixkv.benchmarks.presets import load_model
from radixkv.benchmarks.timing import FirstTokenTimer
from radixkv.integrations.hf import CACHE_KWARG
from transformers import DynamicCache, GenerationConfig

import radixkv

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m radixkv.benchmarks.ttft", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-100m", help="preset or local path (default: llama-100m)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--prefix", type=int, default=2048, help="shared prefix tokens (default: 2048)")
    p.add_argument("--suffix", type=int, default=32, help="new tokens per request (default: 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed requests per method (default: 5)")
    p.add_argument("--block-size", type=int, default=16, help="radixkv block size (default: 16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and tokens (default: 0)")
    return p


def _timed(call: Callable[[FirstTokenTimer], torch.Tensor]) -> tuple[float, float, int]:
    """(TTFT s, call s, first generated token) of one request."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    timer = FirstTokenTimer()
    out = call(timer)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    total = perf_counter() - timer.start
    assert timer.ttft_s is not None, "no token generated"
    return timer.ttft_s, total, int(out[0, -1])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("prefix", "suffix", "repeats", "block_size"):
        if getattr(args, name) < 1:
            _parser().error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    vocab = model.config.get_text_config().vocab_size
    device = model.device
    g = torch.Generator().manual_seed(args.seed)
    prefix = torch.randint(0, vocab, (1, args.prefix), generator=g).to(device)  # [1, P]
    suffixes = [torch.randint(0, vocab, (1, args.suffix), generator=g).to(device) for _ in range(args.repeats + 2)]
    # Explicit all-ones masks below: random prompts may contain the pad id, from which generate
    # would otherwise infer padding.
    config = GenerationConfig(max_new_tokens=1, do_sample=False, pad_token_id=0, eos_token_id=None)
    params = sum(p.numel() for p in model.parameters())

    # Setup, not timed: the recipe's prefix cache, and radixkv's store of the prefix.
    recipe_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prefix, use_cache=True, **{CACHE_KWARG: recipe_cache})
    cached = radixkv.wrap(model, capacity_tokens=args.prefix + (args.repeats + 4) * (args.suffix + 16),
                          block_size=args.block_size)  # fmt: skip
    warm = torch.cat([prefix, suffixes[-1]], dim=1)
    cached.generate(warm, attention_mask=torch.ones_like(warm), generation_config=config)

    def plain(ids: torch.Tensor) -> Callable[[FirstTokenTimer], torch.Tensor]:
        return lambda t: model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=t)

    def recipe(ids: torch.Tensor) -> Callable[[FirstTokenTimer], torch.Tensor]:
        return lambda t: model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            streamer=t,
            **{CACHE_KWARG: copy.deepcopy(recipe_cache)},
        )

    def hit(ids: torch.Tensor) -> Callable[[FirstTokenTimer], torch.Tensor]:
        return lambda t: cached.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=t)

    methods = {"plain generate": plain, "deepcopy recipe": recipe, "radixkv hit": hit}
    ttft: dict[str, list[float]] = {name: [] for name in methods}
    calls: dict[str, list[float]] = {name: [] for name in methods}
    agree = True
    reused_before = cached.stats.reused_tokens
    # Request 0 warms every method up (allocator, kernels) and is not recorded.
    for i, suffix in enumerate(suffixes[: args.repeats + 1]):
        ids = torch.cat([prefix, suffix], dim=1)  # [1, P + S]
        firsts = set()
        for name, make in methods.items():
            t_first, t_call, token = _timed(make(ids))
            firsts.add(token)
            if i > 0:
                ttft[name].append(t_first)
                calls[name].append(t_call)
        agree &= len(firsts) == 1
    reused = (cached.stats.reused_tokens - reused_before) // (args.repeats + 1)

    print(f"model {args.model} ({params / 1e6:.0f}M params), {args.dtype} on {device}, "
          f"{torch.get_num_threads()} threads; prompt = {args.prefix}-token shared prefix + {args.suffix} new tokens; "
          f"{args.repeats} timed requests per method, interleaved")  # fmt: skip
    print(f"radixkv reused {reused} prompt tokens per request; first generated token equal across methods: {agree}")
    base, recipe_ms = statistics.median(ttft["plain generate"]), statistics.median(ttft["deepcopy recipe"])
    print(f"{'method':<17}{'TTFT median ms':>16}{'TTFT min ms':>13}{'call median ms':>16}"
          f"{'speedup vs plain':>18}{'TTFT / recipe':>15}")  # fmt: skip
    for name in methods:
        med = statistics.median(ttft[name])
        print(f"{name:<17}{med * 1e3:>16.1f}{min(ttft[name]) * 1e3:>13.1f}{statistics.median(calls[name]) * 1e3:>16.1f}"
              f"{base / med:>17.1f}x{med / recipe_ms:>15.3f}")  # fmt: skip
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
