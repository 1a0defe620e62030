"""Block allocator: a free list and reference counts, in plain integers."""

from __future__ import annotations


class BlockAllocator:
    """Hands out block ids in [0, num_blocks) and frees a block when its count reaches zero.

    Holders of a block: the tree (one reference while the block is in it) and every live
    match that covers it. `allocate` returns blocks with one reference, owned by the caller.
    Costs: allocate O(n), incref/decref O(n) in the number of ids. Not thread-safe on its own:
    the cache serialises calls.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        # Popped from the end: low ids are handed out first, which keeps dumps readable.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref: list[int] = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block_id: int) -> int:
        return self._ref[block_id]

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (n <= num_free), each with one reference."""
        if n > len(self._free):
            raise RuntimeError(f"allocate({n}) with only {len(self._free)} free blocks")
        if n == 0:
            return []
        ids = self._free[-n:]
        del self._free[-n:]
        ref = self._ref
        for b in ids:
            ref[b] = 1
        return ids

    def incref(self, ids: list[int]) -> None:
        ref = self._ref
        for b in ids:
            ref[b] += 1

    def decref(self, ids: list[int]) -> int:
        """Drop one reference from each id; returns how many blocks became free."""
        ref = self._ref
        freed = 0
        for b in ids:
            count = ref[b] - 1
            if count < 0:
                raise RuntimeError(f"block {b} released more often than it was held")
            ref[b] = count
            if count == 0:
                self._free.append(b)
                freed += 1
        return freed

    def check(self) -> None:
        """Assert that free blocks have count 0, held ones count > 0, and no id repeats."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block id appears twice in the free list"
        for b, count in enumerate(self._ref):
            assert count >= 0, f"block {b} has a negative reference count {count}"
            assert (count == 0) == (b in free), (
                f"block {b} has reference count {count} but is {'' if b in free else 'not '}in the free list"
            )
