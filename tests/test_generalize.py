"""The generalization suite (benchmarks/generalize.py): generated traces, and the default
eviction policy against LRU at every family, seed and capacity."""

from __future__ import annotations

import pytest
from radixkv.benchmarks.generalize import FAMILIES, generate, replay, run_suite, working_set_blocks

from radixkv import DEFAULT_EVICTION

SMALL = {"seeds": (0, 1), "capacities": (0.01, 0.03, 0.1), "requests": 200}


@pytest.fixture(scope="module")
def points() -> list:
    return run_suite(policies=("lru", DEFAULT_EVICTION), **SMALL)


def test_there_are_at_least_eight_families_and_traces_are_deterministic_per_seed() -> None:
    assert len(FAMILIES) >= 8
    for family in FAMILIES:
        a, b, c = generate(family, 0, 120), generate(family, 0, 120), generate(family, 1, 120)
        assert a.requests == b.requests and len(a.requests) == 120, family
        assert a.requests != c.requests and a.params != c.params, f"{family}: seeds draw the same trace"
        assert all(len(h) >= 1 for _, h in a.requests), f"{family} has an empty prompt"


def test_independent_system_prompts_have_no_common_root_and_tenants_use_namespaces() -> None:
    agents = generate("agents", 0, 300)
    assert len({h[0] for _, h in agents.requests}) > 20
    tenants = generate("tenants", 0, 300)
    assert len({ns for ns, _ in tenants.requests}) == 4


def test_an_unlimited_cache_hits_what_the_working_set_allows() -> None:
    """At 100% of the working set nothing is evicted: every policy gets the same hits."""
    trace = generate("chat", 0, 200)
    ws = working_set_blocks(trace)
    assert replay(trace, ws, "lru") == replay(trace, ws, "fifo") == replay(trace, ws, "reuse")


def test_the_default_keeps_98_percent_of_lru_hits_at_every_point(points: list) -> None:
    assert len(points) == len(FAMILIES) * 2 * 3
    low = [
        f"{p.family} seed {p.seed} @ {p.capacity_fraction:.0%}: {p.hit_rate[DEFAULT_EVICTION]:.4f} vs lru "
        f"{p.hit_rate['lru']:.4f}"
        for p in points
        if p.ratio(DEFAULT_EVICTION) < 0.98
    ]
    assert not low, "default below 0.98x LRU:\n" + "\n".join(low)


def test_the_suite_catches_policies_that_lose_to_lru() -> None:
    """Long one-off documents from many roots: the learned `reuse` order and LFU both lose hits
    LRU keeps, and the same check flags them."""
    pts = run_suite(families=("longdoc",), policies=("lru", "reuse", "lfu"), **SMALL)
    assert min(p.ratio("reuse") for p in pts) < 0.9
    assert min(p.ratio("lfu") for p in pts) < 0.9


def test_the_adaptive_policy_stays_with_lru_where_the_learned_order_loses() -> None:
    """Long one-off documents from many roots: the learned order alone loses a third or more of
    LRU's hits; the adaptive policy keeps at least 98% of them."""
    trace = generate("longdoc", 0, 250)
    cap = round(working_set_blocks(trace) * 0.03)
    lru, learned, adaptive = (replay(trace, cap, p)[0] for p in ("lru", "reuse", "adaptive"))
    assert learned < 0.8 * lru
    assert adaptive >= 0.98 * lru
