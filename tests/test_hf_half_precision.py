"""Half precision (float16, bfloat16): which KV the adapter stores, and greedy output equal to plain `generate`.

In half precision the KV of a token computed by a decode step (one token at a time) can differ
from the KV a prefill computes for the same token by 1 ulp, and plain `generate` recomputes an
answer's KV by prefill on the next turn. So by default (`reuse_generated=None`) the adapter
stores only prefill-computed KV in half precision, and the generated tokens' KV in float32.

Models: the tiny families of test_hf_generate cast to each dtype, with eager attention for the
exactness tests. torch's fused CPU attention (sdpa) is not exact across prefill lengths in half
precision: the KV of the first P tokens prefilled alone differs by up to 1 ulp from the same
rows of a longer prefill (its vectorised softmax sums in a length-dependent order), so plain
`generate`'s own KV of a prefix depends on what follows it and no prefix cache can match it bit
for bit; docs/guide/exactness.md states this.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_generate import BLOCK, CACHE_KWARG, FAMILIES, SLIDING, _config, floor_block, model_for, tokens  # noqa: E402

import radixkv  # noqa: E402

HALF = [torch.float16, torch.bfloat16]
NEW = 8
_MODELS: dict[tuple[str, torch.dtype, str], Any] = {}


def half_model(family: str, dtype: torch.dtype, attention: str = "eager") -> Any:
    """The family's seeded tiny model in `dtype` with `attention` ("sdpa": the family's default there)."""
    key = (family, dtype, attention)
    if key not in _MODELS:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(family))
        default = "eager" if family == "gemma2" else "sdpa"
        model.config._attn_implementation = default if attention == "sdpa" else attention
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None
        _MODELS[key] = model.to(dtype).eval()
    return _MODELS[key]


def greedy(generate: Any, ids: list[int]) -> Any:
    row = torch.tensor([ids])
    return generate(
        row,
        attention_mask=torch.ones_like(row),
        max_new_tokens=NEW,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("setting", [None, True, False])
def test_reuse_generated_decides_whether_the_answer_kv_is_stored(dtype: torch.dtype, setting: bool | None) -> None:
    """None stores the answer's KV in float32 only; True always; False never. The prompt's KV is always stored."""
    model = model_for("llama") if dtype == torch.float32 else half_model("llama", dtype, "sdpa")
    cached = radixkv.wrap(model, capacity_tokens=256, block_size=BLOCK, reuse_generated=setting)
    assert cached.cache is not None
    stores_answer = dtype == torch.float32 if setting is None else setting
    assert cached.reuse_generated is stores_answer
    prompt = tokens(18, seed=51)
    out = greedy(cached.generate, prompt)
    history = prompt + out.sequences[0, 18:].tolist()
    with cached.cache.match(history) as m:
        # The last generated token has no KV yet; the prompt's whole blocks are always there.
        assert m.num_tokens == (floor_block(len(history) - 1) if stores_answer else floor_block(18))


def test_float32_with_reduced_precision_matmuls_counts_as_half_precision() -> None:
    """TF32 / bfloat16 float32 matmuls round like half precision: the default then stores prompts only."""
    cached = radixkv.wrap(model_for("llama"), capacity_tokens=256, block_size=BLOCK)
    before = torch.get_float32_matmul_precision()
    assert before == "highest" and cached.reuse_generated
    try:
        torch.set_float32_matmul_precision("high")
        assert not cached.reuse_generated
        assert radixkv.wrap(model_for("llama"), capacity_tokens=256, reuse_generated=True).reuse_generated
    finally:
        torch.set_float32_matmul_precision(before)
    assert cached.reuse_generated


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_in_half_precision_matches_plain_generate(family: str, dtype: torch.dtype) -> None:
    """A conversation of four turns, each sending the whole history: under the default every turn's
    tokens equal plain generate's and so do its scores, bit for bit, and each turn hits exactly the
    previous prompt (whole blocks), not the previous answer, which its own prefill computes and stores."""
    model = half_model(family, dtype)
    cached = radixkv.wrap(model, capacity_tokens=1024, block_size=BLOCK)
    assert cached.cache is not None and not cached.reuse_generated
    # Sliding-window layers: plain generate's cache keeps the last window, the adapter's keeps every
    # token under a window mask, so float16 attention sums over different lengths (~1 ulp).
    tolerance = 1e-3 if family in SLIDING and dtype == torch.float16 else 0.0
    for conv in range(1):
        history, previous = tokens(12, seed=60 + HALF.index(dtype)), 0
        for turn in range(4):
            before = cached.stats.reused_tokens
            ours, plain = greedy(cached.generate, history), greedy(model.generate, history)
            assert torch.equal(ours.sequences, plain.sequences), f"conversation {conv}, turn {turn}"
            diff = max(float((a - b).abs().max()) for a, b in zip(ours.scores, plain.scores, strict=True))
            assert diff <= tolerance, f"conversation {conv}, turn {turn}: scores differ by {diff}"
            assert cached.stats.reused_tokens - before == floor_block(previous)
            previous = len(history)
            history = history + plain.sequences[0, len(history) :].tolist() + tokens(5, seed=70 + 10 * conv + turn)
    assert cached.cache.stats.live_matches == 0
    cached.cache.check_invariants()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_prefill_over_cached_prompt_kv_equals_a_full_prefill(family: str, dtype: torch.dtype) -> None:
    """A hit: the prompt's cached KV plus a prefill of the new suffix gives the full prefill's first
    scores and tokens, and the KV it stores for the suffix equals the full prefill's bit for bit."""
    model = half_model(family, dtype)
    cached = radixkv.wrap(model, capacity_tokens=512, block_size=BLOCK)
    assert cached.cache is not None
    first = tokens(21, seed=80)
    cached.generate(torch.tensor([first]), max_new_tokens=1, do_sample=False)
    prompt = first + tokens(16, seed=81)  # 37 tokens: 20 cached (whole blocks), 17 prefilled
    ours, plain = greedy(cached.generate, prompt), greedy(model.generate, prompt)
    assert cached.stats.reused_tokens == 20
    assert torch.equal(ours.sequences, plain.sequences)
    assert torch.equal(ours.scores[0], plain.scores[0])  # the suffix prefill's last logits
    full = transformers.DynamicCache()  # config-less: sliding layers keep every token
    with torch.no_grad():
        model(torch.tensor([prompt]), use_cache=True, **{CACHE_KWARG: full})
    with cached.cache.match(prompt) as m:
        assert m.num_tokens == floor_block(37)
        stored = cached.cache.gather(m)
    for (k, v), layer in zip(stored, full.layers, strict=True):
        assert torch.equal(k, layer.keys[:, :, :36]) and torch.equal(v, layer.values[:, :, :36])
