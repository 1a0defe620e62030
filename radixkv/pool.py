"""The KV pool: one preallocated tensor for every cached block, the only place tensors live."""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch

from .quant import KVQuantizer
from .spec import KVSpec

LayerKV = tuple[torch.Tensor, torch.Tensor]


class KVPool:
    """Fixed-size KV blocks for all layers in one tensor on `spec.device`.

    Layout `[num_layers, 2 (K, V), num_kv_heads, num_blocks, block_size, head_dim]`: selecting
    blocks along dim 3 yields `[L, 2, H, n, block_size, D]`, which is already the contiguous
    `[L, 2, H, T, D]` that per-layer `[1, H, T, D]` views need, so a gather is one copy.
    Allocated once at construction; never resized. Thread safety comes from the cache: writes
    go only to blocks that no one else can reach yet, reads only to locked blocks.

    With a `quantizer` (kv_dtype "int8" / "int4") the same layout holds codes instead,
    `codes` `[L, 2, H, num_blocks, block_size, code_dim]` and float16 `scales`
    `[L, 2, H, num_blocks, block_size, scale_dim]`: `write` quantises and `gather` dequantises
    back to `spec.dtype`, a few tensor ops per layer each (K and V of a layer together).
    """

    def __init__(self, spec: KVSpec, num_blocks: int, block_size: int, quantizer: KVQuantizer | None = None) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.quantizer = quantizer
        # zeros, not empty: commit every page now, so no request pays for first-touch faults
        # and resident memory does not grow after construction.
        lead = (spec.num_layers, 2, spec.num_kv_heads, num_blocks, block_size)
        if quantizer is None:
            self.data = torch.zeros((*lead, spec.head_dim), dtype=spec.dtype, device=spec.device)
            self._tensors = (self.data,)
        else:
            self.codes = torch.zeros((*lead, quantizer.code_dim), dtype=quantizer.code_dtype, device=spec.device)
            self.scales = torch.zeros((*lead, quantizer.scale_dim), dtype=torch.float16, device=spec.device)
            self._tensors = (self.codes, self.scales)

    @property
    def nbytes(self) -> int:
        """Bytes of the pool's tensors (codes and scales when quantised)."""
        return sum(t.numel() * t.element_size() for t in self._tensors)

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
        quant = self.quantizer
        # Quantising: one float32 temporary [H, n, bs, D] that every layer and K/V reuse.
        shape = (spec.num_kv_heads, n, bs, spec.head_dim)
        scratch = None if quant is None else torch.empty(shape, dtype=torch.float32, device=spec.device)
        for layer, (k, v) in enumerate(kv):
            # [1, H, T, D] -> [H, n, bs, D]; a view when the token dim is contiguous in blocks.
            src_k = k[0, :, start:end].reshape(spec.num_kv_heads, n, bs, spec.head_dim)
            src_v = v[0, :, start:end].reshape(spec.num_kv_heads, n, bs, spec.head_dim)
            if quant is None:
                self.data[layer, 0].index_copy_(1, idx, src_k)
                self.data[layer, 1].index_copy_(1, idx, src_v)
                continue
            for which, src in ((0, src_k), (1, src_v)):
                codes, scales = quant.quantize(src, scratch)  # [H, n, bs, code_dim], [H, n, bs, scale_dim]
                self.codes[layer, which].index_copy_(1, idx, codes)
                self.scales[layer, which].index_copy_(1, idx, scales)

    def gather(self, block_ids: Sequence[int]) -> list[LayerKV]:
        """Per layer (K, V) of `block_ids` in order, each `[1, H, n * block_size, D]`, fresh memory.

        One `index_select` per layer and K/V over a `[H, num_blocks, block_size * D]` view, each
        result a separate allocation. On CUDA the caching allocator reuses them between requests;
        on a CPU glibc returns freed blocks of this size to the system by default, so every gather
        faults its output pages in again (see the README for the malloc settings that avoid it).
        """
        n = len(block_ids)
        spec, bs = self.spec, self.block_size
        if n == 0:
            empty = torch.empty((1, spec.num_kv_heads, 0, spec.head_dim), dtype=spec.dtype, device=spec.device)
            return [(empty.clone(), empty.clone()) for _ in range(spec.num_layers)]
        idx = self._index(block_ids)
        if self.quantizer is not None:
            return self._gather_quantized(idx, n)
        per_block = self.data.view(spec.num_layers, 2, spec.num_kv_heads, self.num_blocks, bs * spec.head_dim)
        out: list[LayerKV] = []
        for layer in range(spec.num_layers):
            k = per_block[layer, 0].index_select(1, idx).view(1, spec.num_kv_heads, n * bs, spec.head_dim)
            v = per_block[layer, 1].index_select(1, idx).view(1, spec.num_kv_heads, n * bs, spec.head_dim)
            out.append((k, v))
        return out

    def _gather_quantized(self, idx: torch.Tensor, n: int) -> list[LayerKV]:
        """Dequantising gather: every layer's scales in one select and one float32 conversion;
        per layer, one select of K and V codes together and one dequantise into `[2, H, n * bs, D]`
        whose halves are the layer's K and V. Half precision outputs on CPU are computed in one
        float32 scratch that all layers reuse (see `KVQuantizer.dequantize`)."""
        spec, bs, quant = self.spec, self.block_size, self.quantizer
        assert quant is not None
        lead = (spec.num_layers, 2, spec.num_kv_heads, self.num_blocks)
        codes = self.codes.view(*lead, bs * quant.code_dim)
        shape = (2, spec.num_kv_heads, n * bs)
        work = torch.float32 if self.codes.device.type == "cpu" else spec.dtype
        scales = self.scales.view(*lead, bs * quant.scale_dim).index_select(3, idx)
        scales = scales.view(spec.num_layers, *shape, quant.scale_dim).to(work)  # [L, 2, H, n * bs, scale_dim]
        scratch = None
        if work != spec.dtype:
            scratch = torch.empty((*shape, spec.head_dim), dtype=work, device=self.codes.device)
        out: list[LayerKV] = []
        for layer in range(spec.num_layers):
            c = codes[layer].index_select(2, idx).view(*shape, quant.code_dim)  # [2, H, n * bs, code_dim]
            kv = quant.dequantize(c, scales[layer], spec.dtype, scratch)  # [2, H, n * bs, D], fresh
            out.append((kv[0:1], kv[1:2]))
        return out

    @property
    def stored_block(self) -> tuple[tuple[int, int, int, int, int], torch.dtype]:
        """Shape and dtype of one block as `read_blocks` gives it and the lower tiers keep it:
        `[L, 2, H, block_size, D]` in `spec.dtype` exact; quantised, `[L, 2, H, block_size, W]`
        uint8 with W = code bytes + scale bytes of one token-head (codes first)."""
        spec = self.spec
        lead = (spec.num_layers, 2, spec.num_kv_heads, self.block_size)
        if self.quantizer is None:
            return (*lead, spec.head_dim), spec.dtype
        return (*lead, self.quantizer.code_dim + 2 * self.quantizer.scale_dim), torch.uint8

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Blocks `block_ids` as `[n, L, 2, H, block_size, D]` (a fresh copy, on the pool's device):
        the one layout the host and disk tiers keep, block after block. Quantised pools give
        their stored bits, `[n, L, 2, H, block_size, W]` uint8 (see `stored_block`), so a block
        written back with `write_blocks` dequantises to exactly what it did before."""
        idx = self._index(block_ids)
        if self.quantizer is None:
            return self.data.index_select(3, idx).permute(3, 0, 1, 2, 4, 5)
        codes = self.codes.index_select(3, idx).view(torch.uint8)  # [L, 2, H, n, bs, code_dim]
        scales = self.scales.index_select(3, idx).view(torch.uint8)  # [L, 2, H, n, bs, 2 * scale_dim]
        return torch.cat((codes, scales), dim=-1).permute(3, 0, 1, 2, 4, 5)

    def write_blocks(self, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
        """Copy `blocks` (`read_blocks`'s layout, any device) into `block_ids`; one copy (two quantised)."""
        if not block_ids:
            return
        src = blocks.to(self.codes.device if self.quantizer else self.data.device, non_blocking=True)
        src = src.permute(1, 2, 3, 0, 4, 5)  # [L, 2, H, n, bs, D or W]
        idx = self._index(block_ids)
        quant = self.quantizer
        if quant is None:
            self.data.index_copy_(3, idx, src)
            return
        # Reinterpreting bytes as float16 needs a contiguous last dim: copy the scale bytes out.
        self.codes.index_copy_(3, idx, src[..., : quant.code_dim].view(quant.code_dtype))
        self.scales.index_copy_(3, idx, src[..., quant.code_dim :].contiguous().view(torch.float16))

    def encode_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """KV blocks `[n, L, 2, H, block_size, D]` in the model dtype -> `read_blocks`'s layout:
        unchanged exact, quantised exactly as `write` would store them otherwise."""
        quant = self.quantizer
        if quant is None:
            return blocks
        codes, scales = quant.quantize(blocks)  # [n, L, 2, H, bs, code_dim], [..., scale_dim]
        return torch.cat((codes.view(torch.uint8), scales.view(torch.uint8)), dim=-1)

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        # frombuffer over an int64 array is ~6x faster than torch.tensor(list) for long lists.
        return torch.frombuffer(array("q", block_ids), dtype=torch.int64).to(self.spec.device)
