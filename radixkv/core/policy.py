"""The interface between the radix tree and an eviction policy: the one place its hooks are defined.

The tree keeps every evictable leaf (unlocked, no children) in a sorted list keyed by
`policy.key(node)`, computed when the leaf enters the list (on becoming a leaf or being
unlocked); the smallest key is evicted first, tail blocks before head blocks. Keys are fixed
from then on: a policy expresses time in the tree's logical clock (ticks once per `match` and
once per `insert`), never wall time that would need a rebuild. When a policy changes its order
as a whole, it bumps `generation` and the tree re-keys every evictable leaf before its next
eviction (O(leaves log leaves)), so such changes must be rare.

Node statistics the tree maintains, readable by every hook: `last_access` and `created` (clock
ticks), `hits` (matches that used the node), `priority` (the highest any insert gave it) and
`block_hashes`; `policy_state` is the policy's own per-node slot (None until it sets it; both
halves of a split keep it).

Policies are registered by name in `radixkv/eviction/policies.py`; the simple ones are in
`eviction.py`, the learned one in `reuse_odds.py`, the default in `adaptive.py` (all in
`radixkv/eviction/`). This module imports none of them, nor the tree.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol


class NodeView(Protocol):
    """What a policy may see of a tree node (`core.tree.Node` has these and more): the statistics
    above, the node's blocks, and `policy_state`, the one field a policy writes. Policies are typed
    against this, not against `Node`, so that this module never imports the tree."""

    block_ids: list[int]
    block_hashes: list[int]
    last_access: int
    created: int
    hits: int
    priority: int
    policy_state: object


class EvictionPolicy:
    """Base class: subclasses give `name` and `key`, and override the hooks they need.

    Every hook runs under the cache's lock. A policy instance serves one cache only.
    """

    name: ClassVar[str] = ""
    generation: int = 0
    """Bumped when the order changes as a whole; the tree then re-keys every evictable leaf."""

    def bind(self, capacity_blocks: int) -> None:
        """Called once by the cache, before any other hook, with its capacity in blocks. O(1)."""

    def key(self, node: NodeView) -> Any:
        """The leaf's eviction key, taken when it becomes evictable; smallest goes first. Keys of
        one policy must be mutually comparable. Called once per leaf entering the list: O(1)."""
        raise NotImplementedError

    def segments(self, new_hashes: list[int]) -> list[int]:
        """How an insert's new blocks are cut into nodes (a chain, sizes in blocks, summing to
        `len(new_hashes)`), so that blocks with different histories get separate keys. Called
        once per insert that stores blocks, before their `on_attach`. Default: one node."""
        return [len(new_hashes)]

    def on_attach(self, node: NodeView, now: int) -> None:
        """Called for each node an insert adds (parents first), before the leaf's key is taken."""

    def on_hit(self, node: NodeView, now: int) -> None:
        """Called for each node of a matched path, before its `hits` and `last_access` change."""

    def on_evict(self, node: NodeView, block_hashes: list[int], now: int) -> None:
        """Called when blocks (`block_hashes`, the tail of `node`, or all of it) leave the tree by
        eviction (not by `clear`)."""

    def on_clear(self) -> None:
        """Called when the cache is cleared."""

    def check(self) -> None:
        """Assert the policy's own invariants (memory bounds); called by check_invariants."""
