"""Block allocator: the free list of the pool's block ids, in plain integers."""

from __future__ import annotations


class BlockAllocator:
    """Hands out block ids in [0, num_blocks) and takes them back.

    Who holds a block is tracked per tree node, not per block: every block of a node has the
    same holders (the tree while the node is attached, plus each live match whose path
    includes the node), so a block's reference count is `attached + node.lock_ref`, and a
    block returns here exactly when that reaches zero. Costs: allocate and free O(n) in C.
    Not thread-safe on its own: the cache serialises calls.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        # Popped from the end: low ids are handed out first, which keeps dumps readable.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (n <= num_free)."""
        if n > len(self._free):
            raise RuntimeError(f"allocate({n}) with only {len(self._free)} free blocks")
        if n == 0:
            return []
        ids = self._free[-n:]
        del self._free[-n:]
        return ids

    def free(self, ids: list[int]) -> None:
        """Return blocks that no one holds any more."""
        self._free += ids

    def check(self, held: list[int]) -> None:
        """Assert that `held` (every block someone holds) and the free list partition the pool."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block id appears twice in the free list"
        held_set = set(held)
        assert len(held_set) == len(held), "a block is held in two places"
        assert not (free & held_set), f"blocks {sorted(free & held_set)[:5]} are both free and held"
        assert len(free) + len(held_set) == self.num_blocks, (
            f"{len(free)} free + {len(held_set)} held != {self.num_blocks} blocks: "
            f"{self.num_blocks - len(free) - len(held_set)} leaked"
        )
        assert all(0 <= b < self.num_blocks for b in held_set | free), "a block id is out of range"
