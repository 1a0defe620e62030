"""The wrapper where the model stood: `pipeline("text-generation")`, streaming, lm-evaluation-harness's
`HFLM`, attribute and forward access, `to` / `eval`, and the pass-throughs these entry points bring.

Tiny random-weight Llama models with a character-level tokenizer built here (no download). Every
claim compares against the same pipeline / harness over the plain model, and hits are counted as
the tokens the model's forward pass actually computed.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from radixkv.integrations.hf import CachedModel, UncachedWarning  # noqa: E402
from tiny import tiny_llama  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

import radixkv  # noqa: E402

BLOCK = 4
CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
SYSTEM = "You are a careful assistant. Answer in one short line.\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def char_tokenizer(padding_side: str = "left") -> Any:
    """One token per character; specials first, so that pad = 0, bos = 1, eos = 2."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.padding_side = padding_side
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(seed: int = 0) -> Any:
    """The shared tiny Llama over the character vocabulary (pad 0, bos 1, eos 2)."""
    vocab = len(SPECIALS) + len(CHARS)
    return tiny_llama(seed=seed, vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@contextmanager
def computed_tokens(model: Any) -> Iterator[list[int]]:
    """Counts the token columns that each forward pass of `model` computes (prefill and decode)."""
    counts: list[int] = []

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        counts.append(int(ids.shape[1]))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


@contextmanager
def no_uncached_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncachedWarning)
        yield


def pipes(**kwargs: Any) -> tuple[Any, Any, CachedModel]:
    """A plain pipeline and one over the wrapper, both on the same model and tokenizer."""
    model, tok = tiny_model(), char_tokenizer()
    cached = radixkv.wrap(model, capacity_tokens=1024, block_size=BLOCK)
    settings = {"max_new_tokens": 6, "do_sample": False, **kwargs}
    plain = transformers.pipeline("text-generation", model=model, tokenizer=tok, **settings)
    wrapped = transformers.pipeline("text-generation", model=cached, tokenizer=tok, **settings)
    return plain, wrapped, cached


# ----- the model's attributes and methods -------------------------------------------------
def test_the_wrapper_answers_as_the_model_does() -> None:
    model = tiny_model()
    cached = radixkv.wrap(model, capacity_tokens=256, block_size=BLOCK)
    assert cached.device == model.device and cached.dtype == model.dtype == torch.float32
    assert cached.config is model.config and cached.generation_config is model.generation_config
    assert cached.can_generate() and cached.get_input_embeddings() is model.get_input_embeddings()
    assert isinstance(cached, transformers.PreTrainedModel) and isinstance(cached, CachedModel)
    assert cached.__class__ is type(model) and type(cached) is CachedModel
    ids = torch.tensor([[1, 10, 11, 12, 13]])
    torch.testing.assert_close(cached(ids).logits, model(ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(cached(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert cached.to("cpu") is cached and cached.cpu() is cached and cached.eval() is cached
    assert cached.train() is cached and model.training
    assert cached.train(False) is cached and not model.training
    with pytest.raises(AttributeError, match="no_such_attribute"):
        _ = cached.no_such_attribute


def test_to_another_dtype_starts_a_fresh_cache_that_matches_plain() -> None:
    model = tiny_model()
    cached = radixkv.wrap(model, capacity_tokens=256, block_size=BLOCK)
    ids = torch.tensor([[1, *range(10, 30)]])
    cached.generate(ids, max_new_tokens=4, do_sample=False)
    old_cache = cached.cache
    assert cached.to(torch.float64) is cached and model.dtype == torch.float64
    assert cached.cache is not old_cache and cached.cache is not None and cached.cache.stats.cached_tokens == 0
    assert cached.cache.spec.dtype == torch.float64
    want = model.generate(ids, max_new_tokens=4, do_sample=False)
    for _ in range(2):  # a miss, then a hit, both equal to plain generate in float64
        torch.testing.assert_close(cached.generate(ids, max_new_tokens=4, do_sample=False), want, rtol=0, atol=0)
    assert cached.stats.reused_tokens > 0


# ----- pipeline("text-generation") --------------------------------------------------------
def test_pipeline_text_matches_plain_and_a_shared_system_prompt_hits() -> None:
    plain, wrapped, cached = pipes()
    model = cached.model
    first, second = SYSTEM + "What is the time?", SYSTEM + "Where is the sea?"
    with no_uncached_warning():
        assert wrapped(first) == plain(first)
        with computed_tokens(model) as plain_counts:
            want = plain(second)
        reused_before = cached.stats.reused_tokens
        with computed_tokens(model) as cached_counts:
            got = wrapped(second)
    assert got == want
    reused = cached.stats.reused_tokens - reused_before
    # The second call computes only what the cache did not hold: at least the system prompt's blocks.
    assert reused >= (len(SYSTEM) // BLOCK) * BLOCK
    assert sum(cached_counts) == sum(plain_counts) - reused
    assert cached_counts[0] == plain_counts[0] - reused  # the prefill; decode steps are the same


def test_pipeline_chat_messages_match_plain_and_the_second_conversation_hits() -> None:
    plain, wrapped, cached = pipes()
    system = {"role": "system", "content": SYSTEM}
    chats = [[system, {"role": "user", "content": q}] for q in ("Name a colour.", "Name a fruit.")]
    with no_uncached_warning():
        for chat in chats:
            assert wrapped(chat) == plain(chat)
    assert cached.stats.calls == 2 and cached.stats.reused_tokens >= (len(SYSTEM) // BLOCK) * BLOCK


def test_batched_pipeline_calls_match_plain_without_passthrough() -> None:
    plain, wrapped, cached = pipes()
    prompts = [SYSTEM + q for q in ("One?", "Two, three?", "Four, five, six?", "Seven?")]
    with no_uncached_warning():
        got = wrapped(prompts, batch_size=2)
    assert got == plain(prompts, batch_size=2)
    assert cached.stats.uncached_calls == 0 and cached.stats.reused_tokens > 0


def test_streaming_from_a_thread_matches_plain() -> None:
    plain, wrapped, cached = pipes()
    prompt = SYSTEM + "Stream it."

    def streamed(pipe: Any) -> tuple[str, Any]:
        streamer = transformers.TextIteratorStreamer(pipe.tokenizer, skip_prompt=True)
        result: list[Any] = []
        thread = threading.Thread(target=lambda: result.append(pipe(prompt, streamer=streamer)))
        thread.start()
        text = "".join(streamer)
        thread.join()
        return text, result[0]

    want_text, want = streamed(plain)
    wrapped(prompt)  # fills the cache, so that the streamed call below is a hit
    with no_uncached_warning():
        got_text, got = streamed(wrapped)
    assert (got_text, got) == (want_text, want)
    assert want[0]["generated_text"] == prompt + want_text
    assert cached.stats.reused_tokens > 0


def test_a_pipeline_prefix_is_part_of_the_prompt_and_is_served() -> None:
    prefix = "Context: the answer is always short.\n"
    plain, wrapped, cached = pipes(prefix=prefix)
    with no_uncached_warning():
        for q in ("First?", "Second?"):
            assert wrapped(q) == plain(q)
    # The second call hit on the prefix the pipeline put in front of both prompts.
    assert cached.stats.reused_tokens >= (len(prefix) // BLOCK) * BLOCK


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"use_cache": False}, "use_cache=False"),
        ({"output_attentions": True, "return_dict_in_generate": True}, "output_attentions"),
        ({"cache_implementation": "static"}, "cache_implementation"),
    ],
)
def test_pipeline_generation_settings_the_cache_cannot_serve_pass_through_with_one_warning(
    settings: dict[str, Any], reason: str
) -> None:
    plain, wrapped, cached = pipes(**settings)
    prompt = SYSTEM + "Pass me through."
    with pytest.warns(UncachedWarning, match=reason) as caught:
        got = wrapped(prompt)
    assert len([w for w in caught if issubclass(w.category, UncachedWarning)]) == 1
    assert got == plain(prompt)
    assert cached.stats.uncached_calls == 1 and cached.cache is not None and cached.cache.stats.cached_tokens == 0


def test_a_right_padding_tokenizer_is_left_padded_by_the_pipeline_and_served() -> None:
    """The text-generation pipeline switches the tokenizer to left padding, so batches stay cacheable."""
    model, tok = tiny_model(), char_tokenizer(padding_side="right")
    cached = radixkv.wrap(model, capacity_tokens=256, block_size=BLOCK)
    settings = {"max_new_tokens": 4, "do_sample": False}
    plain = transformers.pipeline("text-generation", model=model, tokenizer=tok, **settings)
    wrapped = transformers.pipeline("text-generation", model=cached, tokenizer=tok, **settings)
    prompts = [SYSTEM + "Short?", SYSTEM + "A longer question?"]
    want = plain(prompts, batch_size=2)
    with no_uncached_warning():
        assert wrapped(prompts, batch_size=2) == want
        assert wrapped(prompts, batch_size=2) == want
    assert cached.stats.uncached_calls == 0 and cached.stats.reused_tokens > 0


# ----- lm-evaluation-harness --------------------------------------------------------------
def _generate_until(model: Any, tokenizer: Any, contexts: list[str], batch_size: int) -> list[str]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    gen = {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}
    reqs = [
        Instance(request_type="generate_until", doc={}, arguments=(c, dict(gen)), idx=i) for i, c in enumerate(contexts)
    ]
    return lm.generate_until(reqs, disable_tqdm=True)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_hflm_generate_until_matches_plain_and_hits_on_the_few_shot_prefix(batch_size: int) -> None:
    model, tok = tiny_model(), char_tokenizer()
    cached = radixkv.wrap(model, capacity_tokens=2048, block_size=BLOCK)
    shots = "".join(f"Q: {a} + {a}?\nA: {2 * a}\n\n" for a in range(11, 17))
    contexts = [f"{shots}Q: {a} + {a}?\nA:" for a in (21, 22, 23, 24, 25, 26)]
    want = _generate_until(model, tok, contexts, batch_size)
    with no_uncached_warning(), computed_tokens(model) as counts:
        got = _generate_until(cached, tok, contexts, batch_size)
    assert got == want and len(got) == len(contexts)
    stats = cached.stats
    assert stats.calls == -(-len(contexts) // batch_size) and stats.uncached_calls == 0
    # Every call after the first reuses the few-shot prefix's whole blocks for each of its rows.
    later_rows = len(contexts) - batch_size
    assert stats.reused_tokens >= later_rows * (len(shots) // BLOCK) * BLOCK
    assert counts  # the harness ran the model's own forward passes through the wrapper
