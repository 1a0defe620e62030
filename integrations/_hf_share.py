"""Which prefixes the rows of one `generate` call share: integers only, no tensors.

Two plans per call, both over whole blocks of the rows' real tokens (padding excluded):

- `prefixes_to_compute`: the uncached prefixes that two or more sequences would otherwise each
  prefill. A row of input with `expand` sequences (beams, `num_return_sequences`) counts
  `expand` times, so even one beam-search row has its prompt computed once, not once per beam.
  The adapter computes each such prefix once (shortest first, so a longer one builds on the
  shorter) and stores it; the rows then hit it like any cached prefix. It does so only when
  that lowers the call's prefill positions (`prefill_saved` > 0): a dense batch prefills its
  longest uncached suffix in every row, so a prefix that leaves that suffix as long saves nothing
  (e.g. a chat template's first block, shared by every row beside one long uncached row).
- `share_groups`: the cache rows (input row i -> rows i * expand ... i * expand + expand - 1)
  that may attend to one copy of a common prefix while decoding, and how long it is. A group's
  prefix is never longer than what every member reuses from the cache (`BatchLayout.reused`):
  the prefill computes the rest for each row, so its KV is the row's own.

Both walk a trie of the rows' blocks: O(total blocks) tuple hashes, no per-token Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BlockTrie", "ShareGroup", "prefill_saved", "prefixes_to_compute", "share_groups"]


class BlockTrie:
    """The rows' whole blocks as a trie: `paths[i][k]` is the node of row i's first k + 1 blocks.

    Only blocks wholly inside the first `len - 1` tokens count (the last prompt token is always
    computed by `generate`). `weight[node]`: sequences through the node (a row counts `expand`
    times). Cost O(total blocks).
    """

    def __init__(self, prompts: Sequence[Sequence[int]], block_size: int, expand: int = 1) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if expand < 1:
            raise ValueError(f"expand must be >= 1, got {expand}")
        self.block_size = block_size
        children: dict[tuple[int, tuple[int, ...]], int] = {}
        self.weight: list[int] = [0]  # node 0 is the root (the empty prefix)
        self.paths: list[list[int]] = []
        for prompt in prompts:
            node, path = 0, []
            for k in range((len(prompt) - 1) // block_size):
                key = (node, tuple(prompt[k * block_size : (k + 1) * block_size]))
                nxt = children.get(key)
                if nxt is None:
                    nxt = children[key] = len(self.weight)
                    self.weight.append(0)
                self.weight[nxt] += expand
                node = nxt
                path.append(node)
            self.paths.append(path)

    def shared_depth(self, row: int) -> int:
        """Blocks of row `row`'s deepest prefix that two or more sequences go through."""
        depth = 0
        for k, node in enumerate(self.paths[row]):
            if self.weight[node] < 2:
                break
            depth = k + 1
        return depth

    def common_depth(self, rows: Sequence[int]) -> int:
        """Blocks that all `rows` have in common (0 for an empty list)."""
        if not rows:
            return 0
        paths = [self.paths[r] for r in rows]
        depth = min(len(p) for p in paths)
        first = paths[0]
        for k in range(depth):
            node = first[k]
            if any(p[k] != node for p in paths):
                return k
        return depth


def prefixes_to_compute(trie: BlockTrie, hits: Sequence[int]) -> list[tuple[int, int]]:
    """(row, tokens): each distinct shared prefix longer than the rows' cached `hits`, once.

    `hits[i]`: tokens of row i the cache holds already. Sorted by length, shortest first, so a
    prefix that extends another is computed on top of it. The row named is one row that has
    the prefix (its tokens are `prompts[row][:tokens]`).
    """
    bs = trie.block_size
    best: dict[int, tuple[int, int]] = {}  # deepest shared node -> (row, tokens)
    for row, hit in enumerate(hits):
        depth = trie.shared_depth(row)
        if depth * bs > hit:
            best.setdefault(trie.paths[row][depth - 1], (row, depth * bs))
    return sorted(best.values(), key=lambda rt: (rt[1], rt[0]))


def prefill_saved(
    trie: BlockTrie, lengths: Sequence[int], hits: Sequence[int], todo: Sequence[tuple[int, int]], expand: int
) -> int:
    """Prefill positions saved by computing `todo` (from `prefixes_to_compute`) first; may be <= 0.

    A dense batch prefills S = max(len_i - hit_i) columns in every one of its B x expand rows, so
    a prefix computed once pays only where it lowers S: before, B x expand x S; after, the tokens
    computed once (each prefix on top of the longest cached or earlier-computed prefix of it) plus
    B x expand x S'. Rows take the deepest computed prefix they have. Cost O(rows x todo).
    """
    bs = trie.block_size
    new_hits = list(hits)
    computed = 0
    done: list[tuple[int, int]] = []
    for row, n in todo:
        node = trie.paths[row][n // bs - 1]
        base = hits[row]
        for prev_row, prev_n in done:  # an earlier prefix of this one is cached by then
            if prev_n <= n and trie.paths[row][prev_n // bs - 1] == trie.paths[prev_row][prev_n // bs - 1]:
                base = max(base, prev_n)
        computed += n - min(base, n)
        done.append((row, n))
        for r, path in enumerate(trie.paths):
            if len(path) * bs >= n and path[n // bs - 1] == node:
                new_hits[r] = max(new_hits[r], n)
    rows = len(lengths) * expand
    before = max(n - h for n, h in zip(lengths, hits, strict=True))
    after = max(n - h for n, h in zip(lengths, new_hits, strict=True))
    return rows * (before - after) - computed


@dataclass(frozen=True)
class ShareGroup:
    """Cache rows (beams and sampled sequences included) that attend to one copy of the first
    `tokens` real tokens of input row `source` (every member's first `tokens` tokens are equal)."""

    source: int
    rows: tuple[int, ...]
    tokens: int


def share_groups(
    trie: BlockTrie,
    reused: Sequence[int],
    expand: int,
    *,
    min_tokens: int,
    min_rows: int,
    min_saved: int = 0,
) -> list[ShareGroup]:
    """Groups of cache rows sharing a prefix of >= `min_tokens` tokens, >= `min_rows` rows each,
    and whose one copy saves >= `min_saved` tokens of KV ((rows - 1) x prefix).

    Input rows are grouped by their first block; a group's prefix is the whole blocks they all
    have in common, capped by the least any member reuses (`reused[i]`, rounded down to a
    block). Members reusing less than `min_tokens` leave the group first, so that one short
    row does not cancel sharing for the others. Cost O(total blocks).
    """
    bs = trie.block_size
    by_first: dict[int, list[int]] = {}
    for row, path in enumerate(trie.paths):
        if path and reused[row] >= max(min_tokens, bs):
            by_first.setdefault(path[0], []).append(row)
    groups: list[ShareGroup] = []
    for rows in by_first.values():
        if len(rows) * expand < min_rows:
            continue
        tokens = min(trie.common_depth(rows) * bs, min(reused[r] for r in rows) // bs * bs)
        if tokens < max(min_tokens, 1) or (len(rows) * expand - 1) * tokens < min_saved:
            continue
        cache_rows = tuple(r * expand + e for r in rows for e in range(expand))
        groups.append(ShareGroup(source=rows[0], rows=cache_rows, tokens=tokens))
    return groups
