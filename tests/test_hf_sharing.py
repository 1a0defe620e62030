"""Sharing inside one `generate` call (integrations/_hf_share.py, _hf_shared_kv.py, hf.py).

Computed once: a prefix several rows (or beams, or samples) of a call share is prefilled once.
Held once: rows attend to one copy of a shared cached prefix (log-sum-exp merge). Every output
is compared with plain `model.generate` on the same batch: greedy tokens identical, float32
scores within 1e-4. Forward work is counted at the input embedding (rows x columns).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import radixkv.integrations.hf as hf  # noqa: E402
from radixkv.integrations import _hf_shared_kv as shared_kv  # noqa: E402
from radixkv.integrations._hf_kv import ModelKV  # noqa: E402
from radixkv.integrations._hf_share import BlockTrie, prefill_saved, prefixes_to_compute, share_groups  # noqa: E402
from radixkv.integrations._hf_shared_kv import ATTENTION_NAME, build_shared_past, shared_attention  # noqa: E402
from test_hf_generate import FAMILIES, SLIDING, left_pad, model_for, no_locks, tokens  # noqa: E402
from tiny import tiny_llama  # noqa: E402

import radixkv  # noqa: E402

BLOCK = 4
HOLDING = [f for f in FAMILIES if f not in SLIDING]


@pytest.fixture(autouse=True)
def _short_shared_prefixes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny test prompts are tens of tokens: let them share from one block on (the shipped
    break-even rule has its own tests)."""
    monkeypatch.setattr(hf, "SHARE_MIN_TOKENS", BLOCK)
    monkeypatch.setattr(hf, "SHARE_MIN_SAVED_TOKENS", 0)


@contextmanager
def forward_tokens(model: Any) -> Iterator[list[int]]:
    counter = [0]
    handle = model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: counter.__setitem__(0, counter[0] + args[0].numel())
    )
    try:
        yield counter
    finally:
        handle.remove()


def rag_batch(doc_len: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Three questions over one document, two over the document and a second one, one unrelated
    row: shared prefixes of two depths, rows of different lengths, left padding."""
    doc, other = tokens(doc_len, 1), tokens(12, 2)
    rows = [
        doc + tokens(3, 10),
        doc + tokens(7, 11),
        doc + other + tokens(5, 12),
        doc + tokens(11, 13),
        doc + other + tokens(2, 14),
        tokens(9, 99),
    ]
    return left_pad(rows)


def assert_same(ours: Any, plain: Any) -> None:
    assert torch.equal(ours.sequences, plain.sequences)
    for a, b in zip(ours.scores, plain.scores, strict=True):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a))
        assert (a[finite] - b[finite]).abs().max().item() < 1e-4


def run(model: Any, cached: Any, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> tuple[Any, Any]:
    kwargs = {"max_new_tokens": 5, "output_scores": True, "return_dict_in_generate": True, **kwargs}
    torch.manual_seed(3)
    plain = model.generate(ids, attention_mask=mask, **kwargs)
    torch.manual_seed(3)
    ours = cached.generate(ids, attention_mask=mask, **kwargs)
    return ours, plain


# ----- planning (integers only) --------------------------------------------------------------
def test_trie_counts_each_sequence_and_stops_before_the_last_token() -> None:
    a, b = list(range(9)), [*range(8), 50, 51]
    trie = BlockTrie([a, b, [7, 7, 7, 7, 7]], block_size=4)
    assert [len(p) for p in trie.paths] == [2, 2, 1]  # (9 - 1) // 4, (10 - 1) // 4, (5 - 1) // 4
    assert trie.paths[0] == trie.paths[1]
    assert trie.shared_depth(0) == 2 and trie.shared_depth(2) == 0
    assert trie.common_depth([0, 1]) == 2 and trie.common_depth([0, 2]) == 0
    beams = BlockTrie([a], block_size=4, expand=4)
    assert beams.shared_depth(0) == 2  # one row with 4 beams: 4 sequences share its prompt


def test_prefixes_to_compute_once_each_shortest_first_and_only_beyond_the_hits() -> None:
    doc = list(range(100, 116))
    rows = [[*doc, 1, 2, 3, 4, 5], [*doc, 1, 2, 3, 4, 6], [*doc, 9, 9, 9, 9, 9], [5] * 12]
    trie = BlockTrie(rows, block_size=4)
    assert prefixes_to_compute(trie, [0, 0, 0, 0]) == [(2, 16), (0, 20)]
    assert prefixes_to_compute(trie, [16, 16, 16, 0]) == [(0, 20)]  # the document is cached
    assert prefixes_to_compute(trie, [20, 20, 16, 0]) == []


def test_prefixes_are_computed_once_only_where_they_shorten_the_batch_prefill() -> None:
    doc = list(range(100, 116))
    rows = [[*doc, 1, 2, 3, 4, 5], [*doc, 1, 2, 3, 4, 6], [*doc, 9, 9, 9, 9, 9]]
    lengths = [len(r) for r in rows]
    trie = BlockTrie(rows, block_size=4)
    todo = prefixes_to_compute(trie, [0, 0, 0])
    # 3 rows x 21 columns before; after: 16 + 4 tokens computed once, 3 rows x 5 columns.
    assert prefill_saved(trie, lengths, [0, 0, 0], todo, 1) == 3 * 21 - (20 + 3 * 5)
    # A long row that shares nothing keeps the batch's prefill as wide: computing saves nothing.
    long_rows = [*rows, [7] * 40]
    trie = BlockTrie(long_rows, block_size=4)
    todo = prefixes_to_compute(trie, [0, 0, 0, 0])
    assert todo and prefill_saved(trie, [len(r) for r in long_rows], [0, 0, 0, 0], todo, 1) < 0
    # Beams count: one row of 4 beams saves 3 copies of its 20 whole-block tokens.
    trie = BlockTrie(rows[:1], block_size=4, expand=4)
    todo = prefixes_to_compute(trie, [0])
    assert todo == [(0, 20)] and prefill_saved(trie, [21], [0], todo, 4) == 4 * 21 - (20 + 4 * 1)


def test_a_shared_prefix_that_would_not_shorten_the_prefill_is_not_computed_once() -> None:
    model = model_for("llama")
    rows = [tokens(8, 1) + tokens(3, 2), tokens(8, 1) + tokens(4, 3), tokens(30, 4)]
    ids, mask = left_pad(rows)
    cached = hf.wrap(model, capacity_tokens=4096, block_size=BLOCK)
    ours, plain = run(model, cached, ids, mask)
    assert_same(ours, plain)
    assert cached.stats.computed_once_tokens == 0


def test_share_groups_cap_by_what_every_member_reuses() -> None:
    doc = list(range(100, 124))
    rows = [[*doc, 1, 2], [*doc, 3, 4], [*doc, 5, 6], [7] * 30]
    trie = BlockTrie(rows, block_size=4)
    groups = share_groups(trie, [24, 22, 6, 0], 2, min_tokens=8, min_rows=2)
    # Row 2 reuses too little and leaves; rows 0 and 1 share 20 tokens (22 rounded down), with beams.
    assert [(g.source, g.rows, g.tokens) for g in groups] == [(0, (0, 1, 2, 3), 20)]
    assert share_groups(trie, [24, 22, 6, 0], 1, min_tokens=8, min_rows=3) == []
    assert share_groups(trie, [24, 22, 6, 0], 1, min_tokens=24, min_rows=2) == []
    # The break-even rule: one copy must save (sequences - 1) x prefix >= min_saved tokens.
    assert share_groups(trie, [24, 22, 6, 0], 2, min_tokens=8, min_rows=2, min_saved=60) != []
    assert share_groups(trie, [24, 22, 6, 0], 2, min_tokens=8, min_rows=2, min_saved=61) == []


# ----- the attention merge against a reference -------------------------------------------------
def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax attention in float64 for one row: q [Hq, n, D], k/v [Hkv, T, D], allowed [n, T]."""
    grp = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(grp, 0), v.repeat_interleave(grp, 0)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v  # [Hq, n, D]


@pytest.mark.parametrize("queries", [1, 3])
def test_merge_equals_attention_over_the_whole_row(queries: int) -> None:
    """Two groups with interleaved members, an ungrouped row, rows of other own lengths, GQA.
    A wrong merge, a prefix attended twice or a row reading another row's tokens all fail."""
    torch.manual_seed(0)
    heads, q_heads, dim, dtype = 2, 4, 8, torch.float64
    spec = radixkv.KVSpec(num_layers=1, num_kv_heads=heads, head_dim=dim, dtype=dtype)
    own_tokens, prefixes = [3, 0, 5, 2, 4], [6, 9]
    groups = [((0, 2, 4), 6), ((1, 3), 9)]  # cache rows, prefix length (row 4 expands into two rows below)
    rows = 5

    def kv(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.randn(1, heads, n, dim, dtype=dtype), torch.randn(1, heads, n, dim, dtype=dtype))]

    own = [kv(n) if n else None for n in own_tokens]
    shared = [kv(p) for p in prefixes]
    suffix_valid = torch.ones(rows, queries, dtype=torch.bool)
    suffix_valid[3, 0] = queries == 1  # row 3's first prefilled column is padding
    past = build_shared_past(
        own=own,
        own_tokens=own_tokens,
        shared=shared,
        groups=[(g, p) for g, p in groups],
        expand=1,
        past_width=20,
        row_start=[0] * rows,
        suffix_valid=suffix_valid,
        model_kv=ModelKV(spec, (torch.device("cpu"),)),
    )
    new_k, new_v = (
        torch.randn(rows, heads, queries, dim, dtype=dtype),
        torch.randn(rows, heads, queries, dim, dtype=dtype),
    )
    token = shared_kv._ACTIVE.set(past)  # what `shared_attention` sets for the call it serves
    try:
        k_own, v_own = past.layers[0].update(new_k, new_v)
    finally:
        shared_kv._ACTIVE.reset(token)
    q = torch.randn(rows, q_heads, queries, dim, dtype=dtype)
    out = past.attend(0, q, k_own, v_own, None)  # [R, n, Hq, D]
    assert out.shape == (rows, queries, q_heads, dim)
    width = max(own_tokens)
    for r in range(rows):
        group = next((g for g, (members, _) in enumerate(groups) if r in members), None)
        parts_k = [own[r][0][0][0] if own[r] else torch.zeros(heads, 0, dim, dtype=dtype), new_k[r]]
        parts_v = [own[r][0][1][0] if own[r] else torch.zeros(heads, 0, dim, dtype=dtype), new_v[r]]
        valid = [True] * own_tokens[r] + suffix_valid[r].tolist()
        if group is not None:
            parts_k.insert(0, shared[group][0][0][0])
            parts_v.insert(0, shared[group][0][1][0])
            valid = [True] * prefixes[group] + valid
        k_row, v_row = torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1)
        total = k_row.shape[1]
        allowed = torch.tensor(valid).unsqueeze(0) & (
            torch.arange(total).unsqueeze(0) <= torch.arange(total - queries, total).unsqueeze(1)
        )
        if r == 3 and queries > 1:
            allowed[0] = False  # a padding query attends to nothing here; its output is unused
        expect = _reference(q[r], k_row, v_row, allowed)
        got = out[r].transpose(0, 1)
        rows_ok = allowed.any(dim=1)
        assert torch.allclose(got[:, rows_ok], expect[:, rows_ok], atol=1e-12), f"row {r}"
        assert torch.isfinite(got).all()
    assert width == 5 and past.get_seq_length() == 20 + queries


# ----- generate: computed once, held once, exact -------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_cold_batch_computes_each_shared_prefix_once_and_matches_plain(family: str) -> None:
    model = model_for(family)
    ids, mask = rag_batch()
    cached = hf.wrap(model, capacity_tokens=4096, block_size=BLOCK)
    gen = {"max_new_tokens": 5, "output_scores": True, "return_dict_in_generate": True}
    with forward_tokens(model) as plain_count:
        plain = model.generate(ids, attention_mask=mask, **gen)
    with forward_tokens(model) as ours_count:
        ours = cached.generate(ids, attention_mask=mask, **gen)
    assert_same(ours, plain)
    stats = cached.stats
    # The document (40 tokens) once, then document + other (52) on top of it: 52 tokens, not 5 x 40.
    assert stats.computed_once_tokens == 52
    decode = ids.shape[0] * 4  # 4 decode steps of every row
    assert plain_count[0] == ids.numel() + decode
    # Then every row hits 40 or 52 tokens (the unrelated row 0) and the batch prefills the longest
    # uncached suffix, row 3's 51 - 40 = 11 columns, for all 6 rows.
    assert ours_count[0] == 52 + 6 * 11 + decode
    held = family in HOLDING
    assert (stats.held_once_tokens > 0) == held
    assert type(ours.past_key_values).__name__ == ("SharedPrefixCache" if held else "DynamicCache")
    assert model.config._attn_implementation == ("eager" if family == "gemma2" else "sdpa")  # restored
    no_locks(cached)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "mode",
    [
        {"num_beams": 3, "do_sample": False, "num_return_sequences": 2},
        {"do_sample": True, "num_return_sequences": 3, "top_k": 20},
        {"num_beams": 2, "do_sample": True},
    ],
    ids=["beams", "samples", "beam-sample"],
)
def test_beams_and_samples_hold_the_prompt_once_and_match_plain(family: str, mode: dict[str, Any]) -> None:
    model = model_for(family)
    ids, mask = rag_batch()
    cached = hf.wrap(model, capacity_tokens=4096, block_size=BLOCK)
    for _ in range(2):  # cold, then warm
        ours, plain = run(model, cached, ids, mask, **mode)
        assert_same(ours, plain)
        held = family in HOLDING  # sliding-window families compute once and keep private copies
        assert type(ours.past_key_values).__name__ == ("SharedPrefixCache" if held else "DynamicCache")
    assert cached.stats.computed_once_tokens > 0
    no_locks(cached)


def test_one_beam_search_prompt_is_prefilled_once_not_per_beam() -> None:
    model = model_for("llama")
    prompt = tokens(64, 5)
    ids = torch.tensor([prompt])
    cached = hf.wrap(model, capacity_tokens=4096, block_size=BLOCK)
    gen = {"max_new_tokens": 1, "num_beams": 4, "do_sample": False}
    with forward_tokens(model) as n_plain:
        plain = model.generate(ids, **gen)
    with forward_tokens(model) as n_ours:
        ours = cached.generate(ids, **gen)
    assert torch.equal(plain, ours)
    assert n_plain[0] == 4 * 64
    assert cached.stats.computed_once_tokens == 60  # (64 - 1) // 4 whole blocks
    assert n_ours[0] == 60 + 4 * 4  # the prefix once, then the last 4 prompt tokens per beam


def test_warm_rows_hold_the_shared_prefix_once_and_own_only_their_tokens() -> None:
    model = model_for("qwen2")
    ids, mask = rag_batch()
    cached = hf.wrap(model, capacity_tokens=4096, block_size=BLOCK)
    run(model, cached, ids, mask)
    ours, plain = run(model, cached, ids, mask)
    assert_same(ours, plain)
    past = ours.past_key_values
    (members, tokens_held), *_ = past.groups
    assert members.tolist() == [0, 1, 2, 3, 4] and tokens_held == 40  # one level: the document
    # Each row's own part is its tokens past the 40 shared ones (+ generated), never the document.
    own_width = past.layers[0].keys.shape[2]
    assert own_width < ids.shape[1] - 40 + 5
    assert past.layers[0].shared[0][0].shape[1] == 40


def test_default_break_even_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the shipped thresholds, rows over a 40-token document are not held once (saving 160
    tokens of KV is under SHARE_MIN_SAVED_TOKENS); lowering the thresholds to that call holds them."""
    monkeypatch.undo()
    assert hf.SHARE_MIN_TOKENS == 256 and hf.SHARE_MIN_SAVED_TOKENS == 2048 and hf.SHARE_MIN_ROWS == 2
    model = model_for("llama")
    ids, mask = rag_batch()
    cached = hf.wrap(model, capacity_tokens=4096, block_size=BLOCK)
    run(model, cached, ids, mask)
    assert type(run(model, cached, ids, mask)[0].past_key_values).__name__ == "DynamicCache"
    assert cached.stats.held_once_tokens == 0 and cached.stats.computed_once_tokens == 52
    monkeypatch.setattr(hf, "SHARE_MIN_TOKENS", 40)
    monkeypatch.setattr(hf, "SHARE_MIN_SAVED_TOKENS", 4 * 40)  # 5 rows share the 40-token document
    ours, plain = run(model, cached, ids, mask)
    assert_same(ours, plain)
    assert cached.stats.held_once_tokens == 160
    monkeypatch.setattr(hf, "SHARE_MIN_SAVED_TOKENS", 4 * 40 + 1)
    assert type(run(model, cached, ids, mask)[0].past_key_values).__name__ == "DynamicCache"


def test_tenants_share_only_within_their_namespace() -> None:
    model = model_for("llama")
    ids, mask = rag_batch()
    cached = hf.wrap(model, capacity_tokens=4096, block_size=BLOCK)
    for tenant in ("alice", "bob"):
        torch.manual_seed(3)
        ours = cached.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, namespace=tenant)
        assert torch.equal(ours, model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False))
    assert cached.stats.computed_once_tokens == 2 * 52  # bob does not reuse alice's prefixes


def test_share_prefixes_false_keeps_every_row_private() -> None:
    model = model_for("llama")
    ids, mask = rag_batch()
    cached = hf.wrap(model, capacity_tokens=4096, block_size=BLOCK, share_prefixes=False)
    ours, plain = run(model, cached, ids, mask)
    assert_same(ours, plain)
    assert cached.stats.computed_once_tokens == 0 and cached.stats.held_once_tokens == 0
    assert type(ours.past_key_values).__name__ == "DynamicCache"
    with pytest.raises(TypeError, match="share_prefixes"):
        hf.wrap(model, share_prefixes="yes")
    cached.to(torch.float64)  # a move starts a new cache with the same options
    try:
        assert cached.share_prefixes == (False, False) and cached.stats.calls == 0
    finally:
        model.to(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_shares_only_when_asked(dtype: torch.dtype) -> None:
    """In half precision the default shares nothing (a prefix prefilled alone rounds differently
    from the same prefix in a padded batch), so a cold batch is plain `generate` bit for bit;
    share_prefixes=True computes and holds once."""
    model = tiny_llama(dtype=dtype, attention="eager")
    ids, mask = rag_batch()
    cached = hf.wrap(model, capacity_tokens=4096, block_size=BLOCK)
    assert cached.share_prefixes == (False, False)
    ours, plain = run(model, cached, ids, mask)
    assert torch.equal(ours.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.scores, plain.scores, strict=True))
    assert cached.stats.computed_once_tokens == 0 and cached.stats.held_once_tokens == 0
    forced = hf.wrap(model, capacity_tokens=4096, block_size=BLOCK, share_prefixes=True)
    assert forced.share_prefixes == (True, True)
    for _ in range(2):
        out = forced.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert out.shape == (ids.shape[0], ids.shape[1] + 3)
    assert forced.stats.computed_once_tokens == 52 and forced.stats.held_once_tokens > 0
    no_locks(forced)


# ----- reliability -----------------------------------------------------------------------------
class _Boom(Exception):
    pass


class _RaiseAtStep(transformers.StoppingCriteria):
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        raise _Boom


def test_an_exception_inside_a_shared_call_leaves_no_lock_no_switch_and_nothing_wrong() -> None:
    model = model_for("llama")
    ids, mask = rag_batch()
    cached = hf.wrap(model, capacity_tokens=4096, block_size=BLOCK)
    run(model, cached, ids, mask)  # warm: the next call holds the document once
    stopping = transformers.StoppingCriteriaList([_RaiseAtStep()])
    with pytest.raises(_Boom):
        cached.generate(ids, attention_mask=mask, max_new_tokens=5, stopping_criteria=stopping)
    no_locks(cached)
    assert model.config._attn_implementation == "sdpa"
    ours, plain = run(model, cached, ids, mask)
    assert_same(ours, plain)


def test_a_direct_call_of_the_model_during_a_shared_call_gets_its_own_attention() -> None:
    """While one thread's shared call has the model switched, another thread calling the model
    directly computes exactly what it computes unswitched."""
    model = model_for("llama")
    ids, mask = rag_batch()
    expect = model(ids, attention_mask=mask).logits
    cached = hf.wrap(model, capacity_tokens=4096, block_size=BLOCK)
    run(model, cached, ids, mask)
    ours = cached.generate(ids, attention_mask=mask, max_new_tokens=1, return_dict_in_generate=True)
    seen: list[torch.Tensor] = []
    with shared_attention(model, ours.past_key_values):
        assert model.config._attn_implementation == ATTENTION_NAME
        worker = threading.Thread(target=lambda: seen.append(model(ids, attention_mask=mask).logits))
        worker.start()
        worker.join()
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(seen[0], expect)


def test_a_shared_cache_handed_back_to_generate_raises_instead_of_reading_half_a_row() -> None:
    model = model_for("llama")
    ids, mask = rag_batch()
    cached = hf.wrap(model, capacity_tokens=4096, block_size=BLOCK)
    run(model, cached, ids, mask)
    ours = run(model, cached, ids, mask)[0]
    past = ours.past_key_values
    assert type(past).__name__ == "SharedPrefixCache"
    longer = torch.cat([ours.sequences, ours.sequences[:, -1:]], dim=1)
    longer_mask = torch.cat([mask, torch.ones_like(ours.sequences[:, mask.shape[1] :]), mask[:, -1:]], dim=1)
    with pytest.raises(RuntimeError, match="cannot be passed to another call"):
        model.generate(longer, attention_mask=longer_mask, max_new_tokens=1, **{hf.CACHE_KWARG: past})


def test_eight_threads_sending_shared_batches_stay_correct() -> None:
    model = model_for("phi3")
    cached = hf.wrap(model, capacity_tokens=8192, block_size=BLOCK)
    batches = []
    for t in range(8):
        doc = tokens(24 + 4 * (t % 3), 50 + t % 3)  # three documents, several threads per document
        batches.append(left_pad([doc + tokens(3 + i, 100 * t + i) for i in range(3)]))
    expected = [model.generate(i, attention_mask=m, max_new_tokens=4, do_sample=False) for i, m in batches]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for _ in range(2):
                ids, mask = batches[t]
                out = cached.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
                assert torch.equal(out, expected[t]), f"thread {t}"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert model.config._attn_implementation == "sdpa"
    no_locks(cached)
    assert cached.stats.held_once_tokens > 0


def test_gather_part_of_a_match_and_bad_bounds() -> None:
    spec = radixkv.KVSpec(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32)
    cache = radixkv.PrefixCache(spec, capacity_tokens=64, block_size=4)
    ids = list(range(12))
    k = torch.arange(12, dtype=torch.float32).view(1, 1, 12, 1).expand(1, 1, 12, 2).contiguous()
    cache.insert(ids, [(k, k + 100)])
    with cache.match(ids) as m:
        ((pk, pv),) = cache.gather(m, start=4, stop=8)
        assert pk[0, 0, :, 0].tolist() == [4, 5, 6, 7] and pv[0, 0, 0, 0].item() == 104
        for bad in ({"start": 2}, {"stop": 16}, {"start": 8, "stop": 4}, {"start": -4}):
            with pytest.raises(ValueError, match=r"start|stop"):
                cache.gather(m, **bad)


# ----- on the chosen device (python -m pytest tests/test_hf_sharing.py --device cuda) ------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_shared_calls_on_the_device(device: torch.device, dtype: torch.dtype, attention: str) -> None:
    """Cold and warm shared batches and beams on `--device`: float32 matches plain `generate`
    (tokens, scores within 1e-4) with both parts of sharing; half precision with the defaults
    (nothing shared) gives plain `generate`'s tokens and scores bit for bit on a cold call, and
    so does a warm call with eager attention."""
    model = tiny_llama(dtype=dtype, attention=attention, device=device)
    ids, mask = (t.to(device) for t in rag_batch())
    cached = hf.wrap(model, capacity_tokens=4096, block_size=BLOCK)
    assert cached.cache is not None and cached.cache.spec.device == torch.device(device)
    exact = dtype == torch.float32
    assert cached.share_prefixes == (exact, exact)
    # Half precision over sdpa: a warm hit may round 1 ulp differently (docs/guide/exactness.md: the known limit of
    # every cached call, not of sharing), so only the cold call is compared bit for bit there.
    rounds = 1 if not exact and attention == "sdpa" else 2
    for mode in ({}, {"num_beams": 3, "do_sample": False}):
        cached.cache.clear()
        for _ in range(rounds):
            ours, plain = run(model, cached, ids, mask, **mode)
            if exact:
                assert_same(ours, plain)
            else:
                assert torch.equal(ours.sequences, plain.sequences)
                assert all(torch.equal(a, b) for a, b in zip(ours.scores, plain.scores, strict=True))
    assert (cached.stats.computed_once_tokens > 0) == exact
    assert (cached.stats.held_once_tokens > 0) == exact
    no_locks(cached)
