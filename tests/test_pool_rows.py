"""`index_copy_rows` (the pool's and host tier's block copies) is `index_copy_` bit for bit,
whichever integer words the layouts allow, and falls back to the plain copy where none fit."""

from __future__ import annotations

import pytest
import torch

from radixkv.core.pool import index_copy_rows


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * torch.empty((), dtype=dtype).element_size()), generator=g)
    return raw.to(torch.uint8).view(dtype)  # every bit pattern, NaN payloads included


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("row", [(4, 66), (4, 36), (3, 11), (1, 1)])  # int64, int64, uint8-only, 1 byte
def test_rows_copy_bit_for_bit_into_selected_slots_and_nowhere_else(dtype: torch.dtype, row: tuple[int, int]) -> None:
    dst = _random((3, 7, *row), dtype, 0)
    src = _random((3, 4, *row), dtype, 1)
    index = torch.tensor([5, 0, 3, 6])
    want = dst.clone().index_copy_(1, index, src)
    index_copy_rows(dst, 1, index, src)
    assert torch.equal(dst.view(torch.uint8), want.view(torch.uint8))


def test_a_source_whose_offset_no_word_divides_still_copies_exactly() -> None:
    """A view starting one byte into its storage cannot be read as wider words: plain copy."""
    base = _random((2 * 4 * 8 * 64 + 1,), torch.uint8, 2)
    src = base[1:].view(2, 4, 8, 64)  # storage offset 1
    dst = torch.zeros(2, 6, 8, 64, dtype=torch.uint8)
    index = torch.tensor([4, 1, 0, 5])
    want = dst.clone().index_copy_(1, index, src)
    index_copy_rows(dst, 1, index, src)
    assert torch.equal(dst, want)


def test_permuted_sources_and_whole_block_rows_copy_exactly() -> None:
    """The pool's write_blocks passes a permuted source; the host tier copies whole blocks."""
    blocks = _random((3, 2, 2, 2, 4, 66), torch.uint8, 3)  # [n, L, 2, H, bs, W]
    pool = _random((2, 2, 2, 5, 4, 66), torch.uint8, 4)  # [L, 2, H, num_blocks, bs, W]
    index = torch.tensor([4, 0, 2])
    want = pool.clone().index_copy_(3, index, blocks.permute(1, 2, 3, 0, 4, 5))
    index_copy_rows(pool, 3, index, blocks.permute(1, 2, 3, 0, 4, 5))
    assert torch.equal(pool, want)
    host = torch.zeros(6, 2, 2, 2, 4, 66, dtype=torch.uint8)
    want = host.clone().index_copy_(0, index, blocks)
    index_copy_rows(host, 0, index, blocks, dims=blocks.dim() - 1)
    assert torch.equal(host, want)
