"""The KV pool: one preallocated tensor for every cached block, the only place tensors live."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence

import torch

from .quant import KVQuantizer
from .spec import KVSpec

LayerKV = tuple[torch.Tensor, torch.Tensor]

# Quantised gathers and writes handle layers in groups whose float32 values fit in this many
# bytes: short requests then pay each op's fixed cost once per group instead of once per layer,
# long ones keep one layer per step (larger steps spill out of the CPU caches and measured slower).
GATHER_GROUP_BYTES = 4 << 20


def index_copy_rows(dst: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor, dims: int = 2) -> None:
    """`dst.index_copy_(dim, index, src)`, bit for bit, moving the last `dims` dims of both as
    one row of the widest integer words (8, 4 or 2 bytes) that their sizes, strides and offsets
    allow. On CPU index_copy_ costs per element: a uint8 row copies ~5x faster as int64 words."""
    size = src.element_size()
    row = src.shape[-dims:].numel() * size
    # 4-byte elements gained nothing measurable as int64: bytes and half precision do.
    for word in (torch.int64, torch.int32, torch.int16) if size < 4 else ():
        if word.itemsize <= size or row % word.itemsize:
            continue
        try:  # views only (view, never reshape: a copy of dst would swallow the writes)
            d = dst.view(*dst.shape[:-dims], -1).view(torch.uint8).view(word)
            s = src.view(*src.shape[:-dims], -1).view(torch.uint8).view(word)
        except RuntimeError:  # a stride or offset these words do not divide
            continue
        d.index_copy_(dim, index, s)
        return
    dst.index_copy_(dim, index, src)


class KVPool:
    """Fixed-size KV blocks for all layers in one tensor on `spec.device`.

    Layout `[num_layers, 2 (K, V), num_kv_heads, num_blocks, block_size, head_dim]`: selecting
    blocks along dim 3 yields `[L, 2, H, n, block_size, D]`, which is already the contiguous
    `[L, 2, H, T, D]` that per-layer `[1, H, T, D]` views need, so a gather is one copy.
    Allocated once at construction; never resized. Thread safety comes from the cache: writes
    go only to blocks that no one else can reach yet, reads only to locked blocks.

    With a `quantizer` (kv_dtype "int8" / "int4") the same layout holds codes and float16 scales
    instead of the D values: uint8 `[L, 2, H, num_blocks, block_size, row_bytes]`, each block of a
    head in `KVQuantizer.encode`'s form, which is also the form the lower tiers keep. `write`
    quantises and `gather` dequantises back to `spec.dtype`, a few tensor ops per layer; on CPU,
    int4 rows are selected and dequantised by one fused kernel per layer. With `quantize_below`
    the pool stays exact and only blocks leaving it for the lower tiers are quantised
    (`read_blocks`), and dequantised when they come back (`write_blocks`).
    """

    def __init__(
        self,
        spec: KVSpec,
        num_blocks: int,
        block_size: int,
        quantizer: KVQuantizer | None = None,
        *,
        quantize_below: bool = False,
    ) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        # quantize_below: the pool itself stays exact and only the form the lower tiers keep
        # (read_blocks, write_blocks, encode_blocks, stored_block) is the quantizer's.
        self.quantize_below = quantize_below and quantizer is not None
        self.quantizer = None if quantize_below else quantizer
        self.tier_quantizer = quantizer
        # quantize_below: blocks holding dequantised KV (promoted from a tier). They are never
        # quantised again: their stored form stays below, and re-quantising an approximation
        # would compound its error (the scale creeps up a step per round trip).
        self.approximate: set[int] = set()
        # zeros, not empty: commit every page now, so no request pays for first-touch faults
        # and resident memory does not grow after construction.
        lead = (spec.num_layers, 2, spec.num_kv_heads, num_blocks, block_size)
        if self.quantizer is None:
            self.data = torch.zeros((*lead, spec.head_dim), dtype=spec.dtype, device=spec.device)
        else:
            self.data = torch.zeros((*lead, self.quantizer.row_bytes), dtype=torch.uint8, device=spec.device)

    @property
    def nbytes(self) -> int:
        """Bytes of the pool's tensor (codes and scales when quantised)."""
        return self.data.numel() * self.data.element_size()

    def write(self, block_ids: list[int], kv: Sequence[LayerKV], start: int) -> None:
        """Copy tokens `[start, start + len(block_ids) * block_size)` of `kv` into `block_ids`.

        `kv`: per layer (K, V), each `[1, H, T, D]`, already validated. One index_copy per
        layer and K/V (quantised short runs: per layer group, see `_write_groups`); a failure part-way
        leaves only the (still unreachable) target blocks partly written.
        """
        n = len(block_ids)
        if n == 0:
            return
        if self.approximate:
            self.approximate.difference_update(block_ids)  # exact KV from here on
        spec, bs = self.spec, self.block_size
        end = start + n * bs
        idx = self._index(block_ids)
        quant = self.quantizer
        if quant is not None and self._layer_bytes(end - start) <= GATHER_GROUP_BYTES:
            self._write_groups(quant, idx, kv, start, end)
            return
        # One layer and K/V at a time: exact, or quantised through one float32 scratch [H, n, bs, D]
        # when one layer's K and V alone exceed GATHER_GROUP_BYTES (no op cost left to save there).
        shape = (spec.num_kv_heads, n, bs, spec.head_dim)
        scratch = None if quant is None else torch.empty(shape, dtype=torch.float32, device=spec.device)
        for layer, (k, v) in enumerate(kv):
            for which, x in ((0, k), (1, v)):
                # [1, H, T, D] -> [H, n, bs, D]; a view when the token dim is contiguous in blocks.
                src = x[0, :, start:end].reshape(shape)
                if quant is not None:
                    src = quant.encode(src, scratch)  # [H, n, bs, row_bytes]
                index_copy_rows(self.data[layer, which], 1, idx, src)

    def _write_groups(self, quant: KVQuantizer, idx: torch.Tensor, kv: Sequence[LayerKV], start: int, end: int) -> None:
        """Quantising `write` of a short run, layers in groups (`layer_group`): each group's K and V
        are copied into one float32 buffer `[g, 2, H, n, bs, D]` (every group reuses it), quantised
        there in one `encode` and stored with one copy, so the run pays each op's fixed cost once
        per group instead of once per layer and K/V."""
        spec, bs, n = self.spec, self.block_size, idx.numel()
        heads, d = spec.num_kv_heads, spec.head_dim
        size = self.layer_group(end - start)
        work = torch.empty((size, 2, heads, n, bs, d), dtype=torch.float32, device=spec.device)
        for first in range(0, spec.num_layers, size):
            g = min(size, spec.num_layers - first)
            group = work[:g]
            for i in range(g):
                for which, x in enumerate(kv[first + i]):
                    group[i, which].view(heads, n * bs, d).copy_(x[0, :, start:end])
            # The group's float32 copy is its own scratch: encode overwrites it in place.
            stored = quant.encode(group, group)  # [g, 2, H, n, bs, row_bytes]
            index_copy_rows(self.data[first : first + g], 3, idx, stored)

    def gather(self, block_ids: Sequence[int]) -> list[LayerKV]:
        """Per layer (K, V) of `block_ids` in order, each `[1, H, n * block_size, D]`, fresh memory.

        One `index_select` per layer and K/V over a `[H, num_blocks, block_size * D]` view, each
        result a separate allocation. On CUDA the caching allocator reuses them between requests;
        on a CPU glibc returns freed blocks of this size to the system by default, so every gather
        faults its output pages in again (docs/guide/generate.md gives the malloc settings that avoid it).
        Quantised: see `_gather_quantized`.
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
        """Dequantising gather, per layer one `[2, H, n * bs, D]` result whose halves are K and V.

        Layers go in groups (`layer_group`): each step below covers a group's layers at once, so
        a short gather pays each op's fixed cost a few times instead of once per layer; the
        layers of a group share one allocation (disjoint views of it).
        int4 on CPU with one group per head: torch's fused 4-bit embedding-bag kernel reads each
        selected token-head row and writes `q * s + m` in float32, one pass and one call per
        layer group (bags of one row each). Otherwise: every layer's scales in one select, then
        per layer group one select of its codes into a buffer all groups reuse and one
        `KVQuantizer.dequantize`.
        """
        spec, bs, quant = self.spec, self.block_size, self.quantizer
        assert quant is not None
        dev, heads, t, layers, d = self.data.device, spec.num_kv_heads, n * bs, spec.num_layers, spec.head_dim
        size = self.layer_group(t)
        step: Callable[[int, int], torch.Tensor]  # (first layer, layers) -> [g, 2, H, n, bs, D], fresh
        if quant.fused_on(dev):
            # Row of (layer, K/V, head, block, token) in the pool's [L * 2H * num_blocks * bs,
            # row_bytes] view, in output order: ([2H, 1] * num_blocks + [n]) * bs + [bs] -> [2H * T]
            # rows of one layer, then + [size, 1] * (rows per layer) -> [size * 2H * T].
            blocks = torch.arange(2 * heads, device=dev)[:, None] * self.num_blocks + idx
            rows = (blocks.reshape(-1, 1) * bs + torch.arange(bs, device=dev)).reshape(-1)
            per_layer = 2 * heads * self.num_blocks * bs
            rows = (torch.arange(size, device=dev)[:, None] * per_layer + rows).reshape(-1)
            flat = self.data.view(-1, quant.row_bytes)

            def step(first: int, g: int) -> torch.Tensor:
                return quant.dequantize_rows(flat, rows[: g * 2 * heads * t] + first * per_layer, spec.dtype)

        else:
            codes, scale_bytes = quant.split(self.data)  # [L, 2, H, num_blocks, bs, code_dim / 2 * scale_dim]
            # Every layer's scales in one select: [L, 2, H, n, bs, scale_dim] float16 -> float32 (exact).
            scales = scale_bytes.index_select(3, idx).view(torch.float16).to(torch.float32)
            selected = torch.empty((size, 2, heads, n, bs, quant.code_dim), dtype=quant.code_dtype, device=dev)
            scratch = None
            if quant.staged_on(dev) and spec.dtype != torch.float32:
                scratch = torch.empty((size, 2, heads, n, bs, d), dtype=torch.float32, device=dev)

            def step(first: int, g: int) -> torch.Tensor:
                torch.index_select(codes[first : first + g], 3, idx, out=selected[:g])
                work = None if scratch is None else scratch[:g]
                return quant.dequantize(selected[:g], scales[first : first + g], spec.dtype, work)

        out: list[LayerKV] = []
        for first in range(0, layers, size):
            g = min(size, layers - first)
            kv = step(first, g).view(g, 2, heads, t, d)
            out += [(kv[i, 0:1], kv[i, 1:2]) for i in range(g)]
        return out

    def layer_group(self, tokens: int) -> int:
        """Layers a quantised gather or write of `tokens` tokens handles per step: as many as keep
        the step's float32 values within GATHER_GROUP_BYTES (at least one)."""
        return max(1, min(self.spec.num_layers, GATHER_GROUP_BYTES // max(self._layer_bytes(tokens), 1)))

    def _layer_bytes(self, tokens: int) -> int:
        """Bytes of one layer's K and V for `tokens` tokens in float32."""
        return 2 * self.spec.num_kv_heads * tokens * self.spec.head_dim * 4

    @property
    def stored_block(self) -> tuple[tuple[int, int, int, int, int], torch.dtype]:
        """Shape and dtype of one block as `read_blocks` gives it and the lower tiers keep it:
        `[L, 2, H, block_size, D]` in `spec.dtype` exact; quantised (the pool's or, with
        `quantize_below`, the tiers' quantizer), `[L, 2, H, block_size, W]` uint8 with W =
        `row_bytes`, code bytes + scale bytes of one token-head (`KVQuantizer.encode`)."""
        spec, quant = self.spec, self.tier_quantizer
        lead = (spec.num_layers, 2, spec.num_kv_heads, self.block_size)
        if quant is None:
            return (*lead, spec.head_dim), spec.dtype
        return (*lead, quant.row_bytes), torch.uint8

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Blocks `block_ids` in the lower tiers' form, `[n, L, 2, H, block_size, D]` (see
        `stored_block`; a fresh copy, on the pool's device). Quantised pools give their stored
        bits, so a block written back with `write_blocks` dequantises to exactly what it did
        before; with `quantize_below`, the exact blocks are quantised here."""
        blocks = self.data.index_select(3, self._index(block_ids)).permute(3, 0, 1, 2, 4, 5)
        return self.encode_blocks(blocks) if self.quantize_below else blocks

    def write_blocks(self, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
        """Copy `blocks` (`read_blocks`'s form, any device) into `block_ids`: one copy, plus the
        dequantisation with `quantize_below` (the blocks then count as `approximate`)."""
        if not block_ids:
            return
        src = blocks.to(self.data.device, non_blocking=True)
        if self.quantize_below:
            assert self.tier_quantizer is not None
            src = self.tier_quantizer.decode(src, self.spec.dtype)  # [n, L, 2, H, bs, D]
            self.approximate.update(block_ids)
        index_copy_rows(self.data, 3, self._index(block_ids), src.permute(1, 2, 3, 0, 4, 5))

    def encode_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """KV blocks `[n, L, 2, H, block_size, D]` in the model dtype -> `read_blocks`'s form:
        unchanged exact, quantised exactly as `write` (or the demotion) would store them otherwise."""
        return blocks if self.tier_quantizer is None else self.tier_quantizer.encode(blocks)

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        # frombuffer over an int64 array is ~6x faster than torch.tensor(list) for long lists.
        return torch.frombuffer(array("q", block_ids), dtype=torch.int64).to(self.spec.device)
