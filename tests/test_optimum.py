"""The offline optimum the trace benchmark compares against (benchmarks/trace.py)."""

from __future__ import annotations

import random

from radixkv.benchmarks.trace import TINY_SPEC, TraceRequest, optimum_hit_tokens, replay, unlimited_hit_tokens
from radixkv.benchmarks.workloads import best_hit_tokens

from radixkv import POLICIES, PrefixCache


def test_the_offline_optimum_bounds_every_policy_and_the_unlimited_cache_bounds_it() -> None:
    """benchmarks/trace.py's optimum on a small seeded trace: farthest-next-use eviction hits at least as
    much as every policy replayed through PrefixCache at the same capacity, declining to store
    (bypass) at least as much again, and with room for everything it equals the unlimited cache."""
    rng = random.Random("optimum")
    docs = [[rng.randrange(10**6) for _ in range(rng.randrange(1, 6))] for _ in range(12)]
    reqs = []
    for t in range(150):
        ids = (rng.choice(docs) if rng.random() < 0.6 else []) + [10**6 + t * 8 + i for i in range(rng.randrange(1, 4))]
        reqs.append(TraceRequest(t, len(ids) * 512 - rng.randrange(512), 1, tuple(ids)))
    bs, cap = 128, 40 * 128
    best = optimum_hit_tokens(reqs, cap, bs)
    assert optimum_hit_tokens(reqs, cap, bs, bypass=True).hit_tokens >= best.hit_tokens
    for policy in sorted(POLICIES):
        got = replay(PrefixCache(TINY_SPEC, capacity_tokens=cap, block_size=bs, eviction=policy), reqs)
        assert got.hit_tokens <= best.hit_tokens, policy
    roomy = optimum_hit_tokens(reqs, 10**7, bs)
    assert (roomy.hit_tokens, roomy.prompt_tokens) == unlimited_hit_tokens(reqs, bs)


def test_the_trace_bound_equals_the_model_workload_bound_on_the_expanded_tokens() -> None:
    """The unlimited-cache bound on hash ids (trace) and on token ids (model workloads) share one
    block-chain builder; on the same prompts, expanded to tokens, they count the same hits at
    every block size that divides the trace's block."""
    rng = random.Random("bounds")
    roots = [[rng.randrange(10**6) for _ in range(rng.randrange(1, 4))] for _ in range(6)]
    reqs = []
    for t in range(80):
        ids = rng.choice(roots) + [10**6 + t * 4 + i for i in range(rng.randrange(0, 3))]
        reqs.append(TraceRequest(t, len(ids) * 512 - rng.randrange(512), 1, tuple(ids)))
    for bs in (16, 128, 512):
        want = best_hit_tokens(((r.prompt(), ()) for r in reqs), bs)
        assert unlimited_hit_tokens(reqs, bs) == want
        assert want[0] > 0
