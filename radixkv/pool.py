"""The KV pool: one preallocated tensor for every cached block, the only place tensors live."""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch

from .spec import KVSpec

LayerKV = tuple[torch.Tensor, torch.Tensor]


class KVPool:
    """Fixed-size KV blocks for all layers in one tensor on `spec.device`.

    Layout `[num_layers, 2 (K, V), num_kv_heads, num_blocks, block_size, head_dim]`: selecting
    blocks along dim 3 yields `[L, 2, H, n, block_size, D]`, which is already the contiguous
    `[L, 2, H, T, D]` that per-layer `[1, H, T, D]` views need, so a gather is one copy.
    Allocated once at construction; never resized. Thread safety comes from the cache: writes
    go only to blocks that no one else can reach yet, reads only to locked blocks.
    """

    def __init__(self, spec: KVSpec, num_blocks: int, block_size: int) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        # zeros, not empty: commit every page now, so no request pays for first-touch faults
        # and resident memory does not grow after construction.
        self.data = torch.zeros(
            (spec.num_layers, 2, spec.num_kv_heads, num_blocks, block_size, spec.head_dim),
            dtype=spec.dtype,
            device=spec.device,
        )

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def write(self, block_ids: list[int], kv: Sequence[LayerKV], start: int) -> None:
        """Copy tokens `[start, start + len(block_ids) * block_size)` of `kv` into `block_ids`.

        `kv`: per layer (K, V), each `[1, H, T, D]`, already validated. One index_copy per
        layer and K/V; a failure part-way leaves only the (still unreachable) target blocks
        partly written.
        """
        n = len(block_ids)
        if n == 0:
            return
        spec, bs = self.spec, self.block_size
        end = start + n * bs
        idx = self._index(block_ids)
        for layer, (k, v) in enumerate(kv):
            # [1, H, T, D] -> [H, n, bs, D]; a view when the token dim is contiguous in blocks.
            src_k = k[0, :, start:end].reshape(spec.num_kv_heads, n, bs, spec.head_dim)
            src_v = v[0, :, start:end].reshape(spec.num_kv_heads, n, bs, spec.head_dim)
            self.data[layer, 0].index_copy_(1, idx, src_k)
            self.data[layer, 1].index_copy_(1, idx, src_v)

    def gather(self, block_ids: Sequence[int]) -> list[LayerKV]:
        """Per layer (K, V) of `block_ids` in order, each `[1, H, n * block_size, D]`, fresh memory.

        One `index_select` per layer and K/V over a `[H, num_blocks, block_size * D]` view: each
        result is a separate, modest allocation that the allocator can reuse between requests
        (one tensor for all layers would exceed the mmap threshold and fault fresh pages every time).
        """
        n = len(block_ids)
        spec, bs = self.spec, self.block_size
        if n == 0:
            empty = self.data.new_empty((1, spec.num_kv_heads, 0, spec.head_dim))
            return [(empty.clone(), empty.clone()) for _ in range(spec.num_layers)]
        idx = self._index(block_ids)
        per_block = self.data.view(spec.num_layers, 2, spec.num_kv_heads, self.num_blocks, bs * spec.head_dim)
        out: list[LayerKV] = []
        for layer in range(spec.num_layers):
            k = per_block[layer, 0].index_select(1, idx).view(1, spec.num_kv_heads, n * bs, spec.head_dim)
            v = per_block[layer, 1].index_select(1, idx).view(1, spec.num_kv_heads, n * bs, spec.head_dim)
            out.append((k, v))
        return out

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Blocks `block_ids` as `[n, L, 2, H, block_size, D]` (a fresh copy, on the pool's device):
        the one layout the host and disk tiers keep, block after block."""
        return self.data.index_select(3, self._index(block_ids)).permute(3, 0, 1, 2, 4, 5)

    def write_blocks(self, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
        """Copy `blocks` (`[n, L, 2, H, block_size, D]`, any device) into `block_ids`; one copy."""
        if not block_ids:
            return
        src = blocks.to(self.data.device, non_blocking=True).permute(1, 2, 3, 0, 4, 5)  # [L, 2, H, n, bs, D]
        self.data.index_copy_(3, self._index(block_ids), src)

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        # frombuffer over an int64 array is ~6x faster than torch.tensor(list) for long lists.
        return torch.frombuffer(array("q", block_ids), dtype=torch.int64).to(self.data.device)
