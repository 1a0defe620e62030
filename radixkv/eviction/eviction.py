"""The simple eviction policies: orders computed from the statistics the tree keeps.

Each keys a leaf by counters of the tree's logical clock (see `policy.py` for the interface);
O(1) per key, no state of their own.
"""

from __future__ import annotations

from typing import Any

from ..core.policy import EvictionPolicy, NodeView


class LRU(EvictionPolicy):
    """Least recently used leaf first (what most prefix caches do)."""

    name = "lru"

    def key(self, node: NodeView) -> Any:
        return node.last_access


class FIFO(EvictionPolicy):
    """Oldest inserted leaf first, whatever its use since."""

    name = "fifo"

    def key(self, node: NodeView) -> Any:
        return node.created


class LFU(EvictionPolicy):
    """Fewest matches first; least recently used among equals."""

    name = "lfu"

    def key(self, node: NodeView) -> Any:
        return (node.hits, node.last_access)


class Priority(EvictionPolicy):
    """Lowest insert priority first (`insert(..., priority=p)`); least recently used among equals."""

    name = "priority"

    def key(self, node: NodeView) -> Any:
        return (node.priority, node.last_access)
