"""`radixkv.wrap(model, kv_dtype=...)`: quantised reuse through generate, over a tiny random Llama."""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import radixkv  # noqa: E402

GREEDY: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "output_scores": True,
                          "return_dict_in_generate": True}  # fmt: skip


def _model() -> Any:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=128,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("kv_dtype", [None, "int8", "int4"])
def test_wrap_passes_kv_dtype_and_a_hit_reuses_quantised_kv_close_to_exact(kv_dtype: str | None) -> None:
    """The second call reuses 32 cached tokens; exact reuse gives identical scores, quantised
    reuse scores that differ, but by less than int4's coarse bound (5% of the largest score)."""
    model = _model()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), **GREEDY)
    cached = radixkv.wrap(model, capacity_tokens=512, block_size=4, kv_dtype=kv_dtype)
    assert cached.cache is not None and cached.cache.kv_dtype == kv_dtype
    cached.generate(ids[:, :32], attention_mask=torch.ones_like(ids[:, :32]), max_new_tokens=1, do_sample=False)
    out = cached.generate(ids, attention_mask=torch.ones_like(ids), **GREEDY)
    assert cached.stats.reused_tokens == 32
    diff = max((a - b).abs().max().item() for a, b in zip(out.scores, ref.scores, strict=True))
    top = max(s.abs().max().item() for s in ref.scores)
    if kv_dtype is None:
        assert diff == 0.0 and torch.equal(out.sequences, ref.sequences)
    else:
        assert 0.0 < diff < 0.05 * top


def test_wrap_rejects_a_bad_kv_dtype_by_name() -> None:
    with pytest.raises(ValueError, match="kv_dtype"):
        radixkv.wrap(_model(), capacity_tokens=512, kv_dtype="int3")


def test_exact_pool_reuses_exact_kv_from_the_pool_and_quantised_kv_from_the_host() -> None:
    """`exact_pool=True`: a hit served by the device pool is exact (scores equal plain generate);
    once the prefix was pushed down to the host tier (quantised) and promoted back, the scores
    differ, within int8's bound."""
    model = _model()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    other = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), **GREEDY)
    cached = radixkv.wrap(
        model, capacity_tokens=48, block_size=4, kv_dtype="int8", exact_pool=True, host_capacity_tokens=256
    )
    assert cached.cache is not None and cached.cache.stats.exact_pool
    one = {"max_new_tokens": 1, "do_sample": False}
    cached.generate(ids[:, :32], attention_mask=torch.ones_like(ids[:, :32]), **one)
    out = cached.generate(ids, attention_mask=torch.ones_like(ids), **GREEDY)
    assert cached.stats.reused_tokens == 32
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores, strict=True))
    cached.generate(other, attention_mask=torch.ones_like(other), **one)  # pushes ids' blocks to the host
    before = cached.stats.reused_tokens
    out = cached.generate(ids, attention_mask=torch.ones_like(ids), **GREEDY)
    assert cached.stats.reused_tokens - before >= 32
    assert cached.cache.tier_stats["host"].promoted_tokens > 0
    diff = max((a - b).abs().max().item() for a, b in zip(out.scores, ref.scores, strict=True))
    top = max(s.abs().max().item() for s in ref.scores)
    assert 0.0 < diff < 0.05 * top
