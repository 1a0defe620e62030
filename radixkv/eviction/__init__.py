"""radixkv.eviction: the eviction policies and their registry.

Owns the simple policies (`eviction`: FIFO, LFU, LRU, Priority), the learned one (`reuse_odds`,
with its record of evicted runs in `ghost`), the default that picks between them (`adaptive`)
and the name -> class registry (`policies`: POLICIES, DEFAULT_EVICTION, make_policy). Every
policy subclasses `radixkv.core.policy.EvictionPolicy` and sees nodes as `NodeView`s. May
import: the standard library and `radixkv.core` only; never `radixkv.tiers` or `radixkv.cache`.
"""

from .adaptive import Adaptive
from .eviction import FIFO, LFU, LRU, Priority
from .ghost import EvictedRun, EvictedRuns
from .policies import DEFAULT_EVICTION, POLICIES, make_policy
from .reuse_odds import ReuseOdds

__all__ = [
    "DEFAULT_EVICTION",
    "FIFO",
    "LFU",
    "LRU",
    "POLICIES",
    "Adaptive",
    "EvictedRun",
    "EvictedRuns",
    "Priority",
    "ReuseOdds",
    "make_policy",
]
