"""The Hugging Face adapter's rules (integrations/hf.py), one test per rule, over tiny random models.

Every model is built from its config class with seeded random weights (no download). Sliding
windows are 8 tokens so that prompts of 20-40 tokens exceed them. Greedy outputs must be
token-identical to plain `model.generate`; float32 scores within 1e-4.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from radixkv.integrations._hf_layout import plan_layout  # noqa: E402
from radixkv.integrations.hf import (  # noqa: E402
    CACHE_KWARG,
    DEFAULT_MIN_CAPACITY_TOKENS,
    CachedModel,
    UncachedWarning,
)

import radixkv  # noqa: E402

BLOCK = 4
NEW = 6  # max_new_tokens
GREEDY: dict[str, Any] = {"max_new_tokens": NEW, "do_sample": False}
FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt2", "phi3"]
SLIDING = ["mistral", "gemma2", "gemma3"]
_SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 128,
}
_MODELS: dict[str, Any] = {}


def _config(family: str) -> Any:
    t = transformers
    if family == "llama":
        return t.LlamaConfig(**_SMALL)
    if family == "mistral":  # every layer sliding
        return t.MistralConfig(**_SMALL, sliding_window=8)
    if family == "qwen2":
        return t.Qwen2Config(**_SMALL)
    if family == "gemma2":  # alternating sliding / global, logit soft-capping (eager attention)
        return t.Gemma2Config(**_SMALL, head_dim=16, sliding_window=8)
    if family == "gemma3":
        layers = ["sliding_attention", "full_attention", "sliding_attention"]
        small = {**_SMALL, "num_hidden_layers": 3}
        return t.Gemma3TextConfig(**small, head_dim=16, sliding_window=8, layer_types=layers)
    if family == "gpt2":  # absolute position embeddings
        return t.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256, bos_token_id=1, eos_token_id=2
        )
    if family == "phi3":
        return t.Phi3Config(**_SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise KeyError(family)


def model_for(family: str) -> Any:
    """One seeded tiny model per family, shared by the tests (never mutated by them)."""
    if family not in _MODELS:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(family))
        model.config._attn_implementation = "eager" if family == "gemma2" else "sdpa"
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None  # fixed-length outputs unless a test sets one
        _MODELS[family] = model.eval()
    return _MODELS[family]


def fresh(family: str, **kwargs: Any) -> tuple[Any, CachedModel]:
    model = model_for(family)
    return model, radixkv.wrap(model, capacity_tokens=kwargs.pop("capacity_tokens", 2048), block_size=BLOCK, **kwargs)


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n,), generator=g).tolist()


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def floor_block(n: int) -> int:
    return n // BLOCK * BLOCK


@contextmanager
def prefill_widths(model: Any) -> Iterator[list[int]]:
    """Record the input width of every forward pass (the first one of a generate call is the prefill)."""
    widths: list[int] = []

    def hook(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        widths.append(kwargs["input_ids"].shape[1])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield widths
    finally:
        handle.remove()


def assert_same_output(ours: Any, plain: Any) -> None:
    assert type(ours) is type(plain)
    assert torch.equal(ours.sequences, plain.sequences)
    assert len(ours.scores) == len(plain.scores)
    diff = max(float((a - b).abs().max()) for a, b in zip(ours.scores, plain.scores, strict=True))
    assert diff <= 1e-4, f"scores differ by {diff}"


def both(model: Any, cached: CachedModel, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    kwargs = {**GREEDY, "return_dict_in_generate": True, "output_scores": True, **kwargs}
    return cached.generate(*args, **kwargs), model.generate(*args, **kwargs)


def no_locks(cached: CachedModel) -> None:
    assert cached.cache is not None
    stats = cached.cache.stats
    assert stats.live_matches == 0 and stats.locked_tokens == 0, stats
    cached.cache.check_invariants()


# ----- rule 1: prefill only the uncached suffix ---------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_rule1_prefills_only_the_uncached_suffix(family: str) -> None:
    """Cold, warm and partly shared prompts give plain generate's output; the prefill covers only
    len - hit tokens and hit_tokens grows by the reused prefix (at most len - 1, whole blocks)."""
    model, cached = fresh(family)
    assert cached.cache is not None
    prompt = tokens(24, seed=1)
    ids = torch.tensor([prompt])
    cases = [
        ("cold", ids, 0),
        ("warm", ids, floor_block(23)),  # the same prompt again: at most len - 1 tokens
        ("partial", torch.tensor([prompt[:10] + tokens(14, seed=2)]), floor_block(10)),
    ]
    for name, query, hit in cases:
        before = cached.cache.stats.hit_tokens
        with prefill_widths(model) as widths:
            ours = cached.generate(query, **GREEDY, return_dict_in_generate=True, output_scores=True)
        plain = model.generate(query, **GREEDY, return_dict_in_generate=True, output_scores=True)
        assert_same_output(ours, plain)
        assert cached.cache.stats.hit_tokens - before == hit, name
        assert widths[0] == query.shape[1] - hit, f"{name}: prefill of {widths[0]} tokens"
    assert cached.stats.reused_tokens == floor_block(23) + floor_block(10)
    no_locks(cached)


# ----- rule 2: per-row hits in a left-padded batch ------------------------------------------
def test_rule2_layout_gives_each_row_its_own_hit() -> None:
    """Rows reuse max(0, len - S) with S the longest uncached suffix: per row, not the batch minimum."""
    layout = plan_layout(33, lengths=[32, 33, 7, 30], hits=[28, 24, 0, 8])
    assert layout.suffix == 22 and layout.reused == (10, 11, 0, 8) and layout.past_width == 11
    layout = plan_layout(31, lengths=[31, 23, 5], hits=[24, 16, 0])
    assert layout.suffix == 7 and layout.reused == (24, 16, 0)
    with pytest.raises(ValueError, match="hits"):
        plan_layout(8, lengths=[8], hits=[8])


@pytest.mark.parametrize("family", FAMILIES)
def test_rule2_batch_rows_get_their_own_hits(family: str) -> None:
    """A padded batch whose rows hit 24, 16 and 0 tokens returns plain generate's sequences and
    scores, prefills only the common 7-token suffix, and reuses 24 + 16 tokens; a row whose hit
    is capped by another row's longer suffix reuses part of it and still matches."""
    model, cached = fresh(family)
    # Warm two histories of different lengths (each returned sequence is prompt + 6 tokens).
    seq_a = cached.generate(torch.tensor([tokens(20, seed=3)]), **GREEDY)[0].tolist()  # 26 tokens, 25 with KV
    seq_b = cached.generate(torch.tensor([tokens(12, seed=4)]), **GREEDY)[0].tolist()  # 18 tokens, 17 with KV
    rows = [seq_a + tokens(5, seed=5), seq_b + tokens(5, seed=6), tokens(5, seed=7)]
    ids, mask = left_pad(rows)
    reused_before = cached.stats.reused_tokens
    with prefill_widths(model) as widths:
        ours, plain = both(model, cached, ids, attention_mask=mask)
    assert_same_output(ours, plain)
    assert cached.stats.reused_tokens - reused_before == floor_block(25) + floor_block(17)  # 24 + 16
    assert widths[0] == 7  # the prefill of the cached call (the plain call comes second)
    # A cold 20-token row forces 20 computed columns: row 0 then reuses 31 - 20 = 11 of its
    # 24 cached tokens (part of a block), right-aligned against the computed suffix.
    ids, mask = left_pad([seq_a + tokens(5, seed=25), tokens(20, seed=26)])
    reused_before = cached.stats.reused_tokens
    ours, plain = both(model, cached, ids, attention_mask=mask)
    assert_same_output(ours, plain)
    assert cached.stats.reused_tokens - reused_before == 11
    no_locks(cached)


# ----- rule 3: insert prompt + output, never padding ----------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_rule3_inserts_prompt_and_output_not_padding(family: str) -> None:
    """After a padded batch, each row's prompt + output KV is cached (equal to a fresh unpadded
    forward pass), and the next conversation turn hits on all of it."""
    model, cached = fresh(family)
    assert cached.cache is not None
    rows = [tokens(10, seed=8), tokens(17, seed=9)]
    ids, mask = left_pad(rows)
    seqs = cached.generate(ids, attention_mask=mask, **GREEDY)
    for i, row in enumerate(rows):
        history = row + seqs[i, ids.shape[1] :].tolist()  # prompt + 6 generated tokens
        with cached.cache.match(history) as m:
            assert m.num_tokens == floor_block(len(history) - 1)  # the last token has no KV yet
            stored = cached.cache.gather(m)
        fresh_kv = transformers.DynamicCache()  # config-less: sliding layers keep every token
        with torch.no_grad():
            model(torch.tensor([history]), use_cache=True, **{CACHE_KWARG: fresh_kv})
        for (k, v), layer in zip(stored, fresh_kv.layers, strict=True):
            torch.testing.assert_close(k, layer.keys[:, :, : m.num_tokens], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(v, layer.values[:, :, : m.num_tokens], atol=1e-4, rtol=1e-4)
        # Turn 2 of this conversation.
        turn2 = torch.tensor([history + tokens(5, seed=10 + i)])
        before = cached.stats.reused_tokens
        # An explicit mask: generated ids may include the pad id, from which generate would infer holes.
        ours, plain = both(model, cached, turn2, attention_mask=torch.ones_like(turn2))
        assert_same_output(ours, plain)
        assert cached.stats.reused_tokens - before == floor_block(len(history) - 1)
    no_locks(cached)


def test_rule3_output_is_inserted_up_to_eos_only() -> None:
    """A row that stops at EOS while another goes on is cached up to its EOS, not the padding after."""
    model, cached = fresh("llama")
    assert cached.cache is not None
    rows = [tokens(17, seed=41), tokens(13, seed=42)]
    ids, mask = left_pad(rows)
    free_run = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, ids.shape[1] :]
    # EOS: a token row 0 generates at step >= 2 that occurs nowhere earlier in row 0 nor in row 1.
    stop = next(k for k in range(2, 7) if int(free_run[0, k]) not in free_run[0, :k].tolist() + free_run[1].tolist())
    eos = int(free_run[0, stop])
    kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": eos, "pad_token_id": 0}
    ours = cached.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours, model.generate(ids, attention_mask=mask, **kwargs))
    row0 = rows[0] + ours[0, ids.shape[1] :].tolist()  # 17 + stop + 1 generated, then pad tokens
    assert row0[17 + stop] == eos and row0[17 + stop + 1 :] == [0] * (8 - stop - 1)
    with cached.cache.match(row0) as m:
        assert m.num_tokens == floor_block(17 + stop + 1)
    no_locks(cached)


# ----- rule 4: locks released on every path -------------------------------------------------
class _Boom(Exception):
    pass


class _RaisingCriteria(transformers.StoppingCriteria):
    def __init__(self, exc: type[BaseException]) -> None:
        self.exc = exc

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        raise self.exc()


class _RaisingStreamer(transformers.generation.streamers.BaseStreamer):
    def __init__(self) -> None:
        self.calls = 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:  # the first put is the prompt; raise on the first new token
            raise _Boom

    def end(self) -> None:
        pass


def _raise_in_forward(model: Any) -> Callable[[], None]:
    def hook(*_: Any, **__: Any) -> None:
        raise _Boom

    return model.register_forward_pre_hook(hook).remove


@pytest.mark.parametrize("where", ["stopping_criteria", "streamer", "model", "keyboard_interrupt", "gather"])
def test_rule4_locks_released_when_generate_raises(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception inside generate (or while gathering the matched KV) propagates, leaves no
    lock, and inserts nothing."""
    model, cached = fresh("llama")
    assert cached.cache is not None
    prompt = torch.tensor([tokens(22, seed=13)])
    cached.generate(prompt, **GREEDY)  # warm: the next call matches and locks blocks
    cached_tokens = cached.cache.stats.cached_tokens
    query = torch.cat([prompt, torch.tensor([tokens(9, seed=14)])], dim=1)
    kwargs: dict[str, Any] = dict(GREEDY)
    undo: Callable[[], None] | None = None
    expected: type[BaseException] = _Boom
    if where == "stopping_criteria":
        kwargs["stopping_criteria"] = transformers.StoppingCriteriaList([_RaisingCriteria(_Boom)])
    elif where == "streamer":
        kwargs["streamer"] = _RaisingStreamer()
    elif where == "model":
        undo = _raise_in_forward(model)
    elif where == "gather":

        def interrupted_gather(match: Any, **_part: Any) -> Any:
            raise KeyboardInterrupt

        monkeypatch.setattr(cached.cache, "gather", interrupted_gather)
        expected = KeyboardInterrupt
    else:
        kwargs["stopping_criteria"] = transformers.StoppingCriteriaList([_RaisingCriteria(KeyboardInterrupt)])
        expected = KeyboardInterrupt
    try:
        with pytest.raises(expected):
            cached.generate(query, **kwargs)
    finally:
        if undo is not None:
            undo()
    assert cached.cache.stats.hit_tokens > 0  # the failed call did match and lock a prefix
    assert cached.cache.stats.cached_tokens == cached_tokens
    no_locks(cached)
    monkeypatch.undo()
    assert torch.equal(cached.generate(query, **GREEDY), model.generate(query, **GREEDY))


# ----- rule 5: beams and several return sequences -------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_rule5_beams_and_return_sequences(family: str) -> None:
    """num_beams=3 with num_return_sequences=2 (greedy beams) and sampling with 2 return
    sequences match plain generate on a warm, padded batch; beam search caches the prompts."""
    model, cached = fresh(family)
    assert cached.cache is not None
    history = cached.generate(torch.tensor([tokens(14, seed=15)]), **GREEDY)[0].tolist()
    rows = [history + tokens(3, seed=16), tokens(9, seed=17)]
    ids, mask = left_pad(rows)
    beam = {"num_beams": 3, "num_return_sequences": 2}
    ours, plain = both(model, cached, ids, attention_mask=mask, **beam)
    assert_same_output(ours, plain)
    torch.testing.assert_close(ours.sequences_scores, plain.sequences_scores, atol=1e-4, rtol=1e-4)
    with cached.cache.match(rows[1]) as m:  # beam search inserted row 1's prompt
        assert m.num_tokens == floor_block(len(rows[1]))
    sample = {"do_sample": True, "num_return_sequences": 2, "top_k": 0}
    torch.manual_seed(123)
    ours = cached.generate(ids, attention_mask=mask, **{**GREEDY, **sample})
    torch.manual_seed(123)
    plain = model.generate(ids, attention_mask=mask, **{**GREEDY, **sample})
    assert torch.equal(ours, plain)
    assert cached.stats.reused_tokens > 0
    no_locks(cached)


# ----- rule 6: sliding windows; uncached passthrough ----------------------------------------
@pytest.mark.parametrize("family", SLIDING)
def test_rule6_sliding_window_prompts_longer_than_the_window(family: str) -> None:
    """Prompts of 5x the window, reused at different per-row depths, match plain generate."""
    model, cached = fresh(family)
    long_a = tokens(40, seed=18)
    cached.generate(torch.tensor([long_a]), **GREEDY)
    rows = [long_a[:37] + tokens(6, seed=19), long_a[:21] + tokens(20, seed=20), tokens(30, seed=21)]
    ids, mask = left_pad(rows)
    ours, plain = both(model, cached, ids, attention_mask=mask)
    assert_same_output(ours, plain)
    assert cached.stats.reused_tokens > 0
    no_locks(cached)


def _mamba() -> Any:
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=128, hidden_size=32, state_size=8, num_hidden_layers=2)
    model = transformers.MambaForCausalLM(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model


def _llama_in_training_mode() -> Any:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL)).train()  # dropout 0: deterministic
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model


def _t5() -> Any:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    return model


PASSTHROUGH: dict[str, tuple[Callable[[], Any], Callable[[Any, torch.Tensor], dict[str, Any]], str]] = {
    "past_key_values": (lambda: model_for("llama"), lambda m, ids: {"past_key_values": transformers.DynamicCache()},
                        "past_key_values"),
    # `cache` on transformers >= 5.24, `past_key_values` before (where `cache` is no generate argument).
    "cache_kwarg": (lambda: model_for("llama"), lambda m, ids: {CACHE_KWARG: transformers.DynamicCache()},
                    CACHE_KWARG),
    "use_cache_false": (lambda: model_for("llama"), lambda m, ids: {"use_cache": False}, "use_cache=False"),
    "inputs_embeds": (lambda: model_for("llama"), lambda m, ids: {"inputs_embeds": m.get_input_embeddings()(ids)},
                      "inputs_embeds"),
    "assistant_model": (lambda: model_for("llama"), lambda m, ids: {"assistant_model": m}, "assistant_model"),
    "right_padding": (lambda: model_for("llama"),
                      lambda m, ids: {"attention_mask": torch.tensor([[1] * 10 + [0] * 2])}, "left-padded"),
    "prompt_lookup": (lambda: model_for("llama"), lambda m, ids: {"prompt_lookup_num_tokens": 2}, "assisted"),
    "cache_implementation": (lambda: model_for("llama"), lambda m, ids: {"cache_implementation": "dynamic"},
                             "cache_implementation"),
    "position_ids": (lambda: model_for("llama"), lambda m, ids: {"position_ids": torch.arange(12)[None] + 3},
                     "position_ids"),
    "output_hidden_states": (lambda: model_for("llama"), lambda m, ids: {"output_hidden_states": True},
                             "output_hidden_states"),
    "training_mode": (lambda: _llama_in_training_mode(), lambda m, ids: {}, "training mode"),
    "recurrent_model": (_mamba, lambda m, ids: {}, "linear_attention"),
    "encoder_decoder": (_t5, lambda m, ids: {}, "encoder-decoder"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PASSTHROUGH))
def test_rule6_unsupported_calls_run_uncached_with_one_warning(case: str) -> None:
    """Calls the cache cannot serve give plain generate's output, one UncachedWarning naming why,
    and leave the cache untouched."""
    make_model, make_kwargs, why = PASSTHROUGH[case]
    model = make_model()
    cached = radixkv.wrap(model, capacity_tokens=256, block_size=BLOCK)
    ids = torch.tensor([tokens(12, seed=22)])
    kwargs = {**GREEDY, **make_kwargs(model, ids)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = cached.generate(ids if case != "inputs_embeds" else None, **kwargs)
    ours_warnings = [w for w in caught if issubclass(w.category, UncachedWarning)]
    assert len(ours_warnings) == 1 and why in str(ours_warnings[0].message), [str(w.message) for w in caught]
    kwargs = {**GREEDY, **make_kwargs(model, ids)}  # a fresh past_key_values for the plain call
    plain = model.generate(ids if case != "inputs_embeds" else None, **kwargs)
    assert torch.equal(ours, plain)
    assert cached.stats.uncached_calls == 1
    if cached.cache is not None:
        assert cached.cache.stats.lookups == 0 and cached.cache.stats.cached_tokens == 0
    else:
        assert cached.unsupported_reason is not None and why in cached.unsupported_reason


# ----- rule 7: bad input: the same error, cache unchanged -----------------------------------
# case -> (args and kwargs, whether the adapter catches it before any lookup)
BAD_INPUT: dict[str, tuple[Callable[[torch.Tensor], tuple[tuple[Any, ...], dict[str, Any]]], bool]] = {
    "inputs_and_input_ids": (lambda ids: ((ids,), {"input_ids": ids}), True),
    "token_out_of_vocab": (lambda ids: ((torch.full_like(ids, 128),), {}), True),
    "float_ids": (lambda ids: ((ids.float(),), {}), True),
    "mask_shape": (lambda ids: ((ids,), {"attention_mask": torch.ones(1, 3, dtype=torch.long)}), True),
    "unknown_kwarg": (lambda ids: ((ids,), {"not_an_argument": 1}), True),
    "streamer_with_beams": (lambda ids: ((ids,), {"num_beams": 2, "streamer": _RaisingStreamer()}), True),
    "too_many_positional": (lambda ids: ((ids, *[None] * 11), {}), True),
    # Only generate's own loop finds these: one lookup is counted, the contents stay unchanged.
    "negative_temperature": (lambda ids: ((ids,), {"do_sample": True, "temperature": -1.0}), False),
    "max_length_below_prompt": (lambda ids: ((ids,), {"max_new_tokens": None, "max_length": 5}), False),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_rule7_bad_input_raises_the_same_error_and_leaves_the_cache_unchanged(case: str) -> None:
    """Bad arguments raise exactly what model.generate raises, with no warning from radixkv, and
    change nothing in the cache (not even its lookup counters when the adapter can tell up front)."""
    model, cached = fresh("llama")
    assert cached.cache is not None
    ids = torch.tensor([tokens(12, seed=23)])
    cached.generate(ids, **GREEDY)  # something in the cache to leave untouched
    before = cached.cache.stats
    make_args, upfront = BAD_INPUT[case]
    args, kwargs = make_args(ids)
    kwargs = {**GREEDY, **kwargs}
    with pytest.raises(Exception) as plain_error:
        model.generate(*args, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(plain_error.type) as our_error:
            cached.generate(*args, **kwargs)
    assert str(our_error.value) == str(plain_error.value)
    assert not [w for w in caught if issubclass(w.category, UncachedWarning)]
    after = cached.cache.stats
    if upfront:
        assert after == before
    else:
        assert after.lookups == before.lookups + 1
    for field in ("cached_tokens", "inserted_tokens", "evicted_tokens", "free_tokens"):
        assert getattr(after, field) == getattr(before, field), field
    no_locks(cached)


def test_wrap_and_a_cached_generate_raise_no_deprecation_warning() -> None:
    """radixkv passes the cache under the name the installed transformers expects (`cache` from
    5.24 on), so neither the KV probe at wrap nor a cached generate (cold, then warm) warns."""
    model = model_for("llama")
    ids = torch.tensor([tokens(20, seed=5)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cached = radixkv.wrap(model, capacity_tokens=256, block_size=BLOCK)
        cached.generate(ids, **GREEDY)
        cached.generate(ids, **GREEDY)
    assert cached.stats.reused_tokens == floor_block(19)  # the second call really took the cached path
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == []


def test_rule7_wrap_rejects_bad_arguments() -> None:
    """wrap names the bad argument; with no capacity a tiny model gets the documented minimum."""
    model = model_for("llama")
    with pytest.raises(TypeError, match="model"):
        radixkv.wrap("not a model")
    with pytest.raises(ValueError, match="capacity_tokens"):
        radixkv.wrap(model, capacity_tokens=0)
    with pytest.raises(ValueError, match="capacity"):
        radixkv.wrap(model, capacity_tokens=64, capacity_bytes=1 << 20)
    with pytest.raises(TypeError, match="capacity_token"):  # a misspelt option is not ignored
        radixkv.wrap(model, capacity_token=64)
    cached = radixkv.wrap(model)
    assert cached.cache is not None and cached.cache.stats.capacity_tokens == DEFAULT_MIN_CAPACITY_TOKENS
    with pytest.raises(TypeError, match="already"):
        radixkv.wrap(cached)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_default_capacity_is_half_the_weights_bytes_capped_by_memory(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a capacity, the pool holds half the parameters' bytes (in whole blocks): the same
    tokens in every dtype; a machine cap below that wins."""
    from radixkv.integrations import hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**_SMALL, "vocab_size": 32_000})  # ~4.2M params, 512 B of KV a token (fp32)
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cached = radixkv.wrap(model)
    assert cached.cache is not None
    per_token = cached.cache.spec.bytes_per_token
    assert per_token == 2 * 2 * 2 * 16 * (4 if dtype == torch.float32 else 2)
    expected = weights // 2 // per_token // 16 * 16  # whole blocks of the default 16 tokens
    assert expected > DEFAULT_MIN_CAPACITY_TOKENS
    assert cached.cache.stats.capacity_tokens == expected
    assert cached.cache.stats.capacity_bytes <= weights // 2
    monkeypatch.setattr(hf, "DEFAULT_CPU_MEMORY_FRACTION", 64 * per_token / hf._physical_memory())
    assert radixkv.wrap(model).cache.stats.capacity_tokens == 64


def test_rule7_model_changed_after_wrap_raises() -> None:
    """A model whose weights changed dtype after wrap gets a clear error, not KV of the old weights."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL)).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    cached = radixkv.wrap(model, capacity_tokens=256, block_size=BLOCK)
    ids = torch.tensor([tokens(12, seed=24)])
    cached.generate(ids, **GREEDY)
    model.double()
    with pytest.raises(RuntimeError, match="wrap it again"):
        cached.generate(ids, **GREEDY)
    no_locks(cached)


def test_wrap_uses_the_default_policy_unless_told() -> None:
    _, default = fresh("llama")
    _, lru = fresh("llama", eviction="lru")
    assert default.cache is not None and lru.cache is not None
    assert default.cache.policy.name == radixkv.DEFAULT_EVICTION
    assert lru.cache.policy.name == "lru"


# ----- rule 8: KV computed by other weights is never reused ----------------------------------
def _own_llama() -> Any:
    """A llama of its own (these tests change its weights)."""
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(_config("llama"))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


def _nudge(model: Any) -> None:
    """One optimizer step: the in-place weight change of a training loop between generates."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.enable_grad():  # generate runs its callbacks under no_grad
        model(torch.tensor([tokens(12, 99)]), labels=torch.tensor([tokens(12, 99)])).loss.backward()
    opt.step()
    opt.zero_grad()


def test_rule8_a_weight_update_drops_the_cache_and_the_next_call_matches_plain() -> None:
    model = _own_llama()
    cached = radixkv.wrap(model, capacity_tokens=2048, block_size=BLOCK)
    ids = torch.tensor([tokens(30, 20)])
    before, _ = both(model, cached, ids)
    both(model, cached, ids)
    reused = cached.stats.reused_tokens
    assert reused > 0  # the cache works while the weights stay
    _nudge(model)
    ours, plain = both(model, cached, ids)
    assert_same_output(ours, plain)
    assert max(float((a - b).abs().max()) for a, b in zip(before.scores, plain.scores, strict=True)) > 1e-3
    assert cached.stats.weight_changes == 1 and cached.stats.reused_tokens == reused
    no_locks(cached)


def test_rule8_a_replaced_module_counts_as_a_weight_change() -> None:
    """E.g. adapter layers swapped in: the watch walks the modules again after any registration."""
    model = _own_llama()
    cached = radixkv.wrap(model, capacity_tokens=2048, block_size=BLOCK)
    ids = torch.tensor([tokens(30, 23)])
    both(model, cached, ids)
    old = model.model.layers[0].self_attn.k_proj
    torch.manual_seed(5)
    model.model.layers[0].self_attn.k_proj = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    ours, plain = both(model, cached, ids)
    assert_same_output(ours, plain)
    assert cached.stats.weight_changes == 1 and cached.stats.reused_tokens == 0
    no_locks(cached)


def _lora_llama() -> Any:
    """A llama with two LoRA adapters on q/k/v (random, non-zero), "a" active."""
    import peft
    from peft import LoraConfig

    model = _own_llama()
    for name in ("a", "b"):
        torch.manual_seed(len(name) + ord(name))
        lora = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
        with warnings.catch_warnings():  # peft warns that a second adapter makes several: intended
            warnings.simplefilter("ignore", UserWarning)
            try:
                model.add_adapter(lora, adapter_name=name)
            except ValueError as exc:
                if "PEFT" not in str(exc):
                    raise
                # Not a skip: an install where adapters cannot load is a broken install to fix.
                pytest.fail(
                    f"peft {peft.__version__} and transformers {transformers.__version__} refuse each other "
                    f"({exc}); install the versions pinned in constraints.txt"
                )
    model.set_adapter("a")
    return model


def test_rule8_each_lora_adapter_gets_its_own_entries_and_switching_back_hits() -> None:
    model = _lora_llama()
    cached = radixkv.wrap(model, capacity_tokens=4096, block_size=BLOCK)
    ids = torch.tensor([tokens(30, 24)])
    first_a, _ = both(model, cached, ids)
    model.set_adapter("b")
    ours, plain = both(model, cached, ids)  # without the adapter state in the key: a's KV, wrong
    assert_same_output(ours, plain)
    assert max(float((x - y).abs().max()) for x, y in zip(first_a.scores, plain.scores, strict=True)) > 1e-3
    assert cached.stats.reused_tokens == 0
    model.set_adapter("a")
    ours, plain = both(model, cached, ids)
    assert_same_output(ours, plain)
    assert cached.stats.reused_tokens == floor_block(29)  # a's entries survived b's turn
    model.disable_adapters()
    ours, plain = both(model, cached, ids)
    assert_same_output(ours, plain)
    assert cached.stats.reused_tokens == floor_block(29) and cached.stats.weight_changes == 0
    no_locks(cached)


class _NudgeOnce(transformers.StoppingCriteria):
    """Changes the weights at the first decoding step, then runs `during` (another generate)."""

    def __init__(self, model: Any, during: Callable[[], Any]) -> None:
        self.model, self.during, self.done = model, during, False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        if not self.done:
            self.done = True
            _nudge(self.model)
            self.during()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_rule8_a_call_that_outlives_a_weight_update_stores_where_no_later_call_looks() -> None:
    model = _own_llama()
    cached = radixkv.wrap(model, capacity_tokens=2048, block_size=BLOCK)
    ids, other = torch.tensor([tokens(30, 21)]), torch.tensor([tokens(30, 22)])
    # The first call prefills with the old weights; while it decodes, the weights change and a
    # second call starts (and drops the cache); the first then stores KV of the old weights.
    criteria = _NudgeOnce(model, lambda: cached.generate(other, **GREEDY))
    cached.generate(ids, stopping_criteria=transformers.StoppingCriteriaList([criteria]), **GREEDY)
    assert criteria.done and cached.stats.weight_changes == 1
    reused = cached.stats.reused_tokens
    ours, plain = both(model, cached, ids)
    assert_same_output(ours, plain)
    assert cached.stats.reused_tokens == reused  # the stale entries were not matched
    no_locks(cached)
