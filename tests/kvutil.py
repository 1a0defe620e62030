"""Shared helpers for the core tests: deterministic KV, a tree fingerprint, threads and seeded
random traffic."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import torch

from radixkv import EvictionPolicy, KVSpec, PrefixCache, PrefixMatch
from radixkv.core.hashing import namespace_key

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32)


def serve(cache: PrefixCache, ids: list[int]) -> int:
    """One request as a server makes it: match all but the last token, release, store the prompt;
    returns the tokens hit."""
    with cache.match(ids[:-1]) as m:
        hit = m.num_tokens
    cache.insert(ids, kv_for(ids))
    return hit


def make_cache(
    capacity_tokens: int = 256, block_size: int = 4, eviction: str | EvictionPolicy = "lru", spec: KVSpec = SPEC
) -> PrefixCache:
    return PrefixCache(spec, capacity_tokens=capacity_tokens, block_size=block_size, eviction=eviction)


def blocks_cache(capacity_blocks: int, eviction: str | EvictionPolicy, block_size: int = 4) -> PrefixCache:
    """A cache of `capacity_blocks` blocks of `block_size` tokens ordered by `eviction`."""
    return make_cache(capacity_blocks * block_size, block_size, eviction)


def cache_holding(num_tokens: int) -> tuple[PrefixCache, list[int]]:
    """A `make_cache()` cache that holds tokens 0 .. num_tokens - 1, and those tokens."""
    cache = make_cache()
    ids = list(range(num_tokens))
    cache.insert(ids, kv_for(ids))
    return cache, ids


def kv_for(ids: list[int], namespace: object = None, spec: KVSpec = SPEC) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV that depends on the whole prefix up to each token (as real attention KV does), so the
    same prefix always gives the same values and a wrong block shows up as a wrong value."""
    ns = namespace_key(namespace)
    values = []
    h = hash(ns) & 0xFFFF
    for t in ids:
        h = (h * 1_000_003 + t + 1) % 65_521
        values.append(float(h))
    base = torch.tensor(values, dtype=torch.float32)  # [T]
    out = []
    for layer in range(spec.num_layers):
        # [1, H, T, D]: distinct per layer, K/V, head and dim, all exact in float32.
        offs = torch.arange(spec.num_kv_heads * spec.head_dim, dtype=torch.float32).view(1, spec.num_kv_heads, 1, -1)
        k = (base.view(1, 1, -1, 1) * 4 + offs + layer * 100_000).to(spec.dtype)
        v = (-base.view(1, 1, -1, 1) * 4 - offs - layer * 100_000).to(spec.dtype)
        out.append((k.contiguous(), v.contiguous()))
    return out


def fingerprint(cache: PrefixCache) -> tuple:
    """Everything observable about a cache's state: stats and the tree's shape and contents."""
    nodes = sorted(
        (n.parent.uid if n.parent else -1, n.uid, tuple(n.tokens), tuple(n.block_ids), n.lock_ref)
        for n in cache._tree.iter_nodes()
    )
    return (cache.stats, tuple(sorted(cache._tree.roots)), tuple(nodes), cache._blocks.num_free)


def cached_prefixes(cache: PrefixCache) -> set[tuple[bytes, tuple[int, ...]]]:
    """Every (namespace key, whole-block prefix) the tree holds."""
    bs = cache.block_size
    out: set[tuple[bytes, tuple[int, ...]]] = set()
    stack = [(root, ns, ()) for ns, root in cache._tree.roots.items()]
    while stack:
        node, ns, prefix = stack.pop()
        for child in node.children.values():
            path = prefix
            for b in range(len(child.block_ids)):
                path = path + tuple(child.tokens[b * bs : (b + 1) * bs])
                out.add((ns, path))
            stack.append((child, ns, path))
    return out


def run_threads(worker: Callable[[int], None], n: int, timeout: float = 120.0) -> None:
    """Run worker(0) .. worker(n - 1) in n threads at once; fail if one is stuck, and re-raise
    the first exception any of them raised (assertions included) in the calling thread."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            worker(i)
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
    if errors:
        raise errors[0]


def prefixes_of(
    bases: list[list[int]], namespaces: list[object], tail_max: int, vocab: int = 5
) -> Callable[[random.Random], tuple[list[int], object]]:
    """A `draw` for `random_operations`: a namespace from `namespaces`, then a random prefix of a
    random base followed by 0..tail_max - 1 random tokens below `vocab`."""

    def draw(rng: random.Random) -> tuple[list[int], object]:
        ns = rng.choice(namespaces)
        base = rng.choice(bases)
        head = base[: rng.randrange(0, len(base) + 1)]
        return head + [rng.randrange(vocab) for _ in range(rng.randrange(0, tail_max))], ns

    return draw


def random_operations(
    cache: PrefixCache,
    rng: random.Random,
    steps: int,
    draw: Callable[[random.Random], tuple[list[int], object]],
    *,
    evict_max: int,
    insert_below: float = 0.45,
    around_insert: Callable[[list[int], object, Callable[[], None]], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """Seeded random traffic: each step draws `(ids, namespace)` from `draw(rng)` and then
    inserts them (probability `insert_below`), matches them (up to 0.8; 30% of matches are held,
    at most 4 at once), releases a held match (up to 0.9), evicts 0..evict_max - 1 tokens (up to
    0.995) or clears the cache; `check_invariants` runs after every step, then `after_step(step)`.
    `around_insert(ids, namespace, insert)` wraps each insert (it must call `insert()`), for
    checks before and after it. Held matches are released at the end and the invariants rechecked."""
    live: list[PrefixMatch] = []
    for step in range(steps):
        ids, ns = draw(rng)
        op = rng.random()
        if op < insert_below:

            def insert(ids: list[int] = ids, ns: object = ns) -> None:
                cache.insert(ids, kv_for(ids, ns), namespace=ns)

            if around_insert is None:
                insert()
            else:
                around_insert(ids, ns, insert)
        elif op < 0.8:
            m = cache.match(ids, namespace=ns)
            if rng.random() < 0.3 and len(live) < 4:
                live.append(m)
            else:
                cache.release(m)
        elif op < 0.9 and live:
            cache.release(live.pop(rng.randrange(len(live))))
        elif op < 0.995:
            cache.evict(rng.randrange(0, evict_max))
        else:
            cache.clear()
        cache.check_invariants()
        if after_step is not None:
            after_step(step)
    for m in live:
        cache.release(m)
    cache.check_invariants()
