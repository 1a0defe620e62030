"""The registry of eviction policies: names to classes, the default, and `make_policy`.

Every policy implements `policy.EvictionPolicy` (the tree's one interface to them). To add
one, subclass it and list the class in POLICIES; nothing else imports a policy by name.
"""

from __future__ import annotations

from ..core.policy import EvictionPolicy
from .adaptive import Adaptive
from .eviction import FIFO, LFU, LRU, Priority
from .reuse_odds import ReuseOdds

__all__ = ["DEFAULT_EVICTION", "POLICIES", "make_policy"]

POLICIES: dict[str, type[EvictionPolicy]] = {p.name: p for p in (LRU, FIFO, LFU, Priority, ReuseOdds, Adaptive)}

DEFAULT_EVICTION = "adaptive"
"""The policy a cache gets unless told otherwise. "adaptive" is LRU, switching to the learned
"reuse" order only while a sampled miniature replay of both shows that order winning: in the
generalization suite (benchmarks/generalize.py: nine families of generated traces, several
seeds, 1-100% of the working set) it kept at least 98% of LRU's hits at every point, and on
the production conversation trace 1.44x LRU's hits at 2,560,000 tokens (where "reuse" alone
gets 1.50x, and loses up to 39% of LRU's hits on traffic it was not tuned on). Where neither
order clearly wins it is LRU. "lru" is the textbook rule."""


def make_policy(eviction: str | EvictionPolicy) -> EvictionPolicy:
    """A fresh policy for one cache, by registered name or a given instance."""
    if isinstance(eviction, EvictionPolicy):
        return eviction
    if not isinstance(eviction, str):
        raise TypeError(f"eviction must be a policy name or an EvictionPolicy, got {type(eviction).__name__}")
    try:
        return POLICIES[eviction]()
    except KeyError:
        raise ValueError(f"eviction={eviction!r} is unknown; choose one of {sorted(POLICIES)}") from None
