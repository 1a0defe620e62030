"""The adapter with lower tiers: entries keyed by the model's fingerprint, reused after a restart."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from radixkv.integrations._hf_fingerprint import model_fingerprint  # noqa: E402

import radixkv  # noqa: E402

BLOCK = 4
GREEDY: dict[str, Any] = {
    "max_new_tokens": 4,
    "do_sample": False,
    "return_dict_in_generate": True,
    "output_scores": True,
}
_SMALL = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "vocab_size": 128,
}  # fmt: skip


def llama(seed: int = 3, **config: Any) -> Any:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**_SMALL, **config}))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


def prompt(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, n), generator=g)


def wrap(model: Any, path: Path) -> radixkv.integrations.hf.CachedModel:
    return radixkv.wrap(model, capacity_tokens=256, block_size=BLOCK, disk_path=path, disk_capacity_bytes=1 << 24)


def check_same(ours: Any, plain: Any) -> None:
    assert torch.equal(ours.sequences, plain.sequences)
    diff = max(float((a - b).abs().max()) for a, b in zip(ours.scores, plain.scores, strict=True))
    assert diff <= 1e-4, f"scores differ by {diff}"


def test_a_restarted_wrapper_reuses_disk_entries_and_matches_plain(tmp_path: Path) -> None:
    """A second wrapper of the same weights (as after a restart) hits the first one's files;
    its output equals the uncached output."""
    model, ids = llama(), prompt(100, 1)
    first = wrap(model, tmp_path)
    first.generate(ids, **GREEDY)
    assert first.cache is not None
    first.cache.evict(256)  # everything to disk, as a process that exits would leave it
    assert first.cache.tier_stats["disk"].demoted_tokens >= 100
    again = wrap(model, tmp_path)
    ours, plain = again.generate(ids, **GREEDY), model.generate(ids, **GREEDY)
    check_same(ours, plain)
    assert again.cache is not None
    assert again.cache.tier_stats["disk"].promoted_tokens >= 64
    assert again.stats.reused_tokens >= 64


@pytest.mark.parametrize("change", ["weights", "config"])
def test_other_weights_or_model_never_hit(tmp_path: Path, change: str) -> None:
    """Changed weights (same architecture) or another config on the same directory: no hit."""
    model, ids = llama(), prompt(100, 2)
    first = wrap(model, tmp_path)
    first.generate(ids, **GREEDY)
    assert first.cache is not None and first.cache.evict(256) >= 100
    if change == "weights":
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    else:
        other = llama(rope_theta=5000.0)
        other.load_state_dict(model.state_dict())  # same weights, another config
    assert model_fingerprint(other) != model_fingerprint(model)
    cached = wrap(other, tmp_path)
    ours, plain = cached.generate(ids, **GREEDY), other.generate(ids, **GREEDY)
    check_same(ours, plain)
    assert cached.cache is not None and cached.cache.tier_stats["disk"].promoted_tokens == 0
    assert cached.stats.reused_tokens == 0


def test_fingerprint_is_stable_and_follows_weight_changes() -> None:
    model = llama()
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(llama()) and len(fp) == 16
    with torch.no_grad():
        model.lm_head.weight[3, 3] += 1.0
    assert model_fingerprint(model) != fp


def test_a_weight_update_keys_new_entries_by_the_new_fingerprint(tmp_path: Path) -> None:
    """An optimizer step in the same process: the next call recomputes the fingerprint, misses
    the old entries, and matches the uncached output."""
    model, ids = llama(), prompt(100, 4)
    cached = wrap(model, tmp_path)
    cached.generate(ids, **GREEDY)
    assert cached.cache is not None and cached.cache.evict(256) >= 100
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    ours, plain = cached.generate(ids, **GREEDY), model.generate(ids, **GREEDY)
    check_same(ours, plain)
    assert cached.stats.weight_changes == 1 and cached.stats.reused_tokens == 0
