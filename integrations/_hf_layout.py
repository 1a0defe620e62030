"""Where each row's cached prefix goes in a left-padded batch: integers only, no tensors.

The suffix-aligned layout. A left-padded batch of width T has row i's `len_i` real tokens in
columns [T - len_i, T). Given each row's cached prefix `hit_i` (< len_i), every row's
forward pass must cover the same last S columns (a dense batch computes all rows on the same
columns), so S = max_i(len_i - hit_i), and row i reuses

    reused_i = max(0, len_i - S)  tokens, in columns [T - len_i, T - S) of a [B, H, T - S, D] past.

The model then sees exactly the caller's input_ids and attention_mask: every row keeps its
real tokens contiguous and its padding on the left, so positions, sliding windows, logits
processors, stopping criteria and streamers behave as in plain `generate`.

Why not give every row its whole hit (rows laid out as [pad, cached_i, pad, new_i])? It prefills
the same S columns per row, so it saves no compute, and it breaks sliding-window attention:
windows count columns, so the padding in the middle of a row hides real tokens from the window
(measured on Mistral, Gemma2 and Gemma3: wrong greedy tokens). The suffix-aligned layout costs
nothing over it: reused_i < hit_i only where another row's longer uncached suffix forces those
columns to be computed anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchLayout:
    """The plan for one batch.

    width: T, the caller's padded prompt width. suffix: S, the columns the prefill computes.
    lengths: real tokens per row. reused: cached tokens each row takes from the prefix cache,
    right-aligned in the past columns [0, T - S).
    """

    width: int
    suffix: int
    lengths: tuple[int, ...]
    reused: tuple[int, ...]

    @property
    def past_width(self) -> int:
        """Columns held by the pre-filled cache: T - S (0 when nothing is reused)."""
        return self.width - self.suffix

    @property
    def reused_tokens(self) -> int:
        return sum(self.reused)


def plan_layout(width: int, lengths: Sequence[int], hits: Sequence[int]) -> BatchLayout:
    """Plan the suffix-aligned layout for rows of `lengths` real tokens with cached `hits`.

    Requires 1 <= lengths[i] <= width and 0 <= hits[i] < lengths[i] (at least one prompt token
    must be computed). Cost O(rows). Raises ValueError naming the argument otherwise.
    """
    if len(lengths) != len(hits) or not lengths:
        raise ValueError(f"lengths and hits must be non-empty and of equal length, got {len(lengths)} and {len(hits)}")
    for n, h in zip(lengths, hits, strict=True):
        if not 1 <= n <= width:
            raise ValueError(f"lengths must lie in [1, width={width}], got {n}")
        if not 0 <= h < n:
            raise ValueError(f"hits must lie in [0, length - 1], got hit {h} for a row of {n} tokens")
    suffix = max(n - h for n, h in zip(lengths, hits, strict=True))
    reused = tuple(max(0, n - suffix) for n in lengths)
    return BatchLayout(width=width, suffix=suffix, lengths=tuple(lengths), reused=reused)
