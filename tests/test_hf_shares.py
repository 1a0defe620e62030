"""Tenants through the Hugging Face adapter: wrap(model, shares=...) and generate(..., namespace=...)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_generate import GREEDY, assert_same_output, floor_block, fresh, no_locks, prefill_widths, tokens


def test_a_calls_namespace_picks_its_tenant_with_exact_output() -> None:
    """A tenant's second call hits its own first call's prefix; another tenant's call, and a call
    without a namespace, do not; every output equals plain generate's."""
    model, cached = fresh("llama", shares={"A": 0.5})
    assert cached.cache is not None
    ids = torch.tensor([tokens(24, seed=3)])
    out = {"return_dict_in_generate": True, "output_scores": True}
    cases = [("A", 0), ("A", floor_block(23)), ("B", 0), (None, 0), ("B", floor_block(23))]
    for ns, hit in cases:
        with prefill_widths(model) as widths:
            ours = cached.generate(ids, **GREEDY, **out, namespace=ns)
        assert_same_output(ours, model.generate(ids, **GREEDY, **out))
        assert widths[0] == ids.shape[1] - hit, f"{ns}: prefill of {widths[0]} tokens"
    stats = cached.cache.stats.namespaces
    assert stats["A"].hit_tokens == stats["B"].hit_tokens == floor_block(23)
    assert stats["A"].share_tokens == cached.cache.capacity_tokens // 2
    assert stats["A"].cached_tokens > 0 and stats["B"].share_tokens is None
    no_locks(cached)


def test_a_bad_namespace_raises_before_any_work() -> None:
    _, cached = fresh("llama")
    assert cached.cache is not None
    with pytest.raises(TypeError, match="namespace must be"):
        cached.generate(torch.tensor([tokens(10, seed=4)]), **GREEDY, namespace=[1])
    assert cached.stats.calls == 0 and cached.cache.stats.lookups == 0


def test_bad_shares_raise_from_wrap() -> None:
    with pytest.raises(ValueError, match="shares add up to"):
        fresh("llama", shares={"A": 0.7, "B": 0.7})
