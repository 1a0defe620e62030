"""`CachedModel.score`: continuation log-likelihoods over cached context prefixes.

Every claim compares against the plain forward pass of the same model over context +
continuation (one unpadded row, as an evaluation harness computes it): float32 log-probabilities
within 1e-4 and the same argmax flags. Work is counted as the token columns the model's forward
passes actually computed (a forward pre-hook), hits as the cache's own counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from radixkv.integrations.hf import CachedModel, ContinuationScore, UncachedWarning  # noqa: E402
from test_hf_generate import BLOCK, FAMILIES, SLIDING, _llama_in_training_mode, _mamba, model_for, no_locks, tokens  # noqa: E402
from tiny import tiny_llama  # noqa: E402

import radixkv  # noqa: E402

TOL = 1e-4


def plain_score(model: Any, context: list[int], continuation: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities and argmax flags from the plain forward pass, float32."""
    ids = torch.tensor([context + continuation[:-1]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -len(continuation) :].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(continuation)
    return logprobs[torch.arange(len(continuation)), target], logprobs.argmax(dim=-1) == target


def assert_matches_plain(model: Any, got: list[ContinuationScore], contexts: list[list[int]], conts: list[list[int]]):
    assert len(got) == len(contexts)
    for score, context, cont in zip(got, contexts, conts, strict=True):
        want_lp, want_greedy = plain_score(model, context, cont)
        assert score.token_logprobs.dtype == torch.float32 and score.token_logprobs.shape == (len(cont),)
        diff = float((score.token_logprobs - want_lp).abs().max())
        assert diff <= TOL, f"log-probabilities differ by {diff}"
        assert torch.equal(score.greedy, want_greedy)
        assert abs(score.logprob - float(want_lp.sum())) <= TOL * len(cont)
        assert score.is_greedy == bool(want_greedy.all())


def questions(
    prefix: list[int], n_questions: int, n_choices: int, seed: int
) -> tuple[list[list[int]], list[list[int]]]:
    """A multiple-choice set: each question after the shared `prefix`, each choice a continuation."""
    contexts, conts = [], []
    for q in range(n_questions):
        question = tokens(5 + q % 3, seed * 1000 + q)
        for c in range(n_choices):
            contexts.append(prefix + question)
            conts.append(tokens(1 + (q + c) % 4, seed * 1000 + 100 + q * 10 + c))
    return contexts, conts


@contextmanager
def computed_columns(model: Any) -> Iterator[list[tuple[int, int]]]:
    """(rows, columns) of the input of every forward pass of `model`."""
    shapes: list[tuple[int, int]] = []

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        shapes.append((int(ids.shape[0]), int(ids.shape[1])))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield shapes
    finally:
        handle.remove()


# ----- exactness ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_size", [None, 3, 1])
def test_scores_equal_the_plain_forward_on_a_miss_and_on_a_hit(family: str, batch_size: int | None) -> None:
    model = model_for(family)
    cached = radixkv.wrap(model, capacity_tokens=2048, block_size=BLOCK)
    contexts, conts = questions(tokens(30, 1), 3, 4, seed=2)
    first = cached.score(contexts, conts, batch_size=batch_size)  # misses (shared parts computed once)
    assert_matches_plain(model, first, contexts, conts)
    reused_before = cached.score_stats.reused_tokens
    again = cached.score(contexts, conts, batch_size=batch_size)  # every context hits
    assert_matches_plain(model, again, contexts, conts)
    reused = cached.score_stats.reused_tokens - reused_before
    # Each row reuses its whole context but the last token (whole blocks): hits are real.
    assert reused >= sum((len(c) - 1) // BLOCK * BLOCK for c in contexts) - BLOCK * len(contexts)
    no_locks(cached)


@pytest.mark.parametrize("family", SLIDING)
def test_contexts_longer_than_the_sliding_window_score_as_plain(family: str) -> None:
    model = model_for(family)  # window 8: contexts of 40+ tokens, hits far beyond the window
    cached = radixkv.wrap(model, capacity_tokens=2048, block_size=BLOCK)
    contexts, conts = questions(tokens(40, 3), 2, 3, seed=4)
    for _ in range(2):
        assert_matches_plain(model, cached.score(contexts, conts, batch_size=4), contexts, conts)
    assert cached.score_stats.reused_tokens > 0


def test_rows_of_different_lengths_in_one_batch_get_their_own_hits() -> None:
    """A row whose context is cached computes only its suffix even beside a long uncached row:
    the batch computes S = max(len_i - hit_i) columns, not the longest row."""
    model = model_for("llama")
    cached = radixkv.wrap(model, capacity_tokens=2048, block_size=BLOCK)
    long_ctx, short_cont = tokens(60, 5), tokens(2, 6)
    cached.score([long_ctx], [short_cont])
    fresh_ctx, fresh_cont = tokens(9, 7), tokens(3, 8)
    contexts, conts = [long_ctx + tokens(3, 9), fresh_ctx], [short_cont, fresh_cont]
    with computed_columns(model) as shapes:
        got = cached.score(contexts, conts)
    assert_matches_plain(model, got, contexts, conts)
    input_lengths = [len(c) + len(k) - 1 for c, k in zip(contexts, conts, strict=True)]
    assert shapes == [(2, max(input_lengths[0] - 60, input_lengths[1]))]


# ----- sharing and storing -----------------------------------------------------------------
def test_choices_of_one_question_compute_their_context_once_and_later_questions_hit_the_prefix() -> None:
    model = model_for("llama")
    cached = radixkv.wrap(model, capacity_tokens=4096, block_size=BLOCK)
    prefix = tokens(64, 10)
    contexts, conts = questions(prefix, 1, 4, seed=11)
    context = contexts[0]
    with computed_columns(model) as shapes:
        got = cached.score(contexts, conts)
    assert_matches_plain(model, got, contexts, conts)
    shared = (len(context) - 1) // BLOCK * BLOCK
    # One single-row pass over the shared whole blocks, then one 4-row pass over the rest only.
    assert shapes[0] == (1, shared)
    assert shapes[1][0] == 4 and shapes[1][1] == max(len(context) + len(k) - 1 for k in conts) - shared
    assert len(shapes) == 2

    later, later_conts = questions(prefix, 2, 4, seed=12)
    reused_before = cached.score_stats.reused_tokens
    got = cached.score(later, later_conts, batch_size=4)
    assert_matches_plain(model, got, later, later_conts)
    # Every later row reuses at least the few-shot prefix's blocks.
    assert cached.score_stats.reused_tokens - reused_before >= len(later) * (len(prefix) // BLOCK * BLOCK)


def test_contexts_are_stored_and_continuations_are_not() -> None:
    model = model_for("llama")
    cached = radixkv.wrap(model, capacity_tokens=2048, block_size=BLOCK)
    context, cont = tokens(21, 13), tokens(12, 14)
    cached.score([context], [cont])
    assert cached.cache is not None
    with cached.cache.match(context + cont) as m:
        assert m.num_tokens == len(context) // BLOCK * BLOCK


def test_memory_stays_within_capacity_over_many_questions_and_scores_stay_exact() -> None:
    """Thousands of context tokens through a 96-token pool: the cache evicts, never grows, and
    every score still equals the plain forward's."""
    model = model_for("llama")
    cached = radixkv.wrap(model, capacity_tokens=96, block_size=BLOCK)
    assert cached.cache is not None
    for round_ in range(6):
        contexts, conts = questions(tokens(40, 100 + round_), 4, 2, seed=200 + round_)
        assert_matches_plain(model, cached.score(contexts, conts, batch_size=4), contexts, conts)
        stats = cached.cache.stats
        assert stats.cached_tokens <= stats.capacity_tokens == 96
    assert cached.cache.stats.evicted_tokens > 0
    no_locks(cached)


# ----- what the cache does not serve ---------------------------------------------------------
@pytest.mark.parametrize(("build", "reason"), [(_mamba, "linear_attention"), (_llama_in_training_mode, "training")])
def test_models_the_cache_cannot_serve_score_with_the_plain_forward_and_one_warning(build: Any, reason: str) -> None:
    model = build()
    cached = radixkv.wrap(model, capacity_tokens=256, block_size=BLOCK)
    contexts, conts = questions(tokens(10, 20), 1, 3, seed=21)
    with pytest.warns(UncachedWarning, match=f"score ran uncached: .*{reason}") as caught:
        got = cached.score(contexts, conts)
    assert len([w for w in caught if issubclass(w.category, UncachedWarning)]) == 1
    assert_matches_plain(model, got, contexts, conts)
    assert cached.score_stats.uncached_rows == 3


def test_a_weight_update_drops_the_cache_and_scores_follow_the_new_weights() -> None:
    model = tiny_llama()
    cached = radixkv.wrap(model, capacity_tokens=1024, block_size=BLOCK)
    contexts, conts = questions(tokens(24, 30), 1, 2, seed=31)
    cached.score(contexts, conts)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.05)
    got = cached.score(contexts, conts)
    assert_matches_plain(model, got, contexts, conts)
    assert cached.stats.weight_changes == 1


# ----- bad input and failures ----------------------------------------------------------------
BAD: dict[str, tuple[Any, Any, dict[str, Any], type[Exception], str]] = {
    "empty context": ([[]], [[5]], {}, ValueError, r"contexts\[1\] is empty"),
    "empty continuation": ([[5, 6]], [[]], {}, ValueError, r"continuations\[1\] is empty"),
    "token outside the vocabulary": ([[5, 128]], [[5]], {}, ValueError, r"contexts\[1\].*128"),
    "negative token": ([[5]], [[-1]], {}, ValueError, r"continuations\[1\].*-1"),
    "text, not ids": (["hello"], [[5]], {}, TypeError, r"contexts\[1\]"),
    "float tokens": ([[5.0]], [[5]], {}, TypeError, r"contexts\[1\]"),
    "unequal lengths": ([[5], [6]], [[5]], {}, ValueError, "same length"),
    "batch_size 0": ([[5]], [[5]], {"batch_size": 0}, ValueError, "batch_size"),
    "bad namespace": ([[5]], [[5]], {"namespace": 1.5}, TypeError, "namespace"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_naming_the_argument_and_leaves_the_cache_as_it_was(case: str) -> None:
    model = model_for("llama")
    cached = radixkv.wrap(model, capacity_tokens=512, block_size=BLOCK)
    good = tokens(20, 40)
    # A good row first, in the same call: validation runs before any row is looked up.
    contexts, conts, kwargs, error, message = BAD[case]
    cached.score([good], [tokens(2, 41)])
    assert cached.cache is not None
    before = cached.cache.stats
    with pytest.raises(error, match=message):
        cached.score([good, *contexts], [tokens(2, 41), *conts], **kwargs)
    assert cached.cache.stats == before
    no_locks(cached)


def test_an_exception_in_the_forward_pass_leaves_no_lock_and_stores_nothing() -> None:
    model = model_for("llama")
    cached = radixkv.wrap(model, capacity_tokens=512, block_size=BLOCK)
    context = tokens(30, 50)
    cached.score([context[:12]], [tokens(2, 51)])
    assert cached.cache is not None
    cached_before = cached.cache.stats.cached_tokens

    def fail(*_: Any) -> None:
        raise RuntimeError("forward failed")

    handle = model.model.layers[1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="forward failed"):
            cached.score([context, context], [tokens(2, 52), tokens(3, 53)])
    finally:
        handle.remove()
    assert cached.cache.stats.cached_tokens == cached_before
    no_locks(cached)


def test_a_model_moved_to_another_dtype_behind_the_wrapper_raises() -> None:
    model = tiny_llama()
    cached = radixkv.wrap(model, capacity_tokens=256, block_size=BLOCK)
    model.to(torch.float64)
    with pytest.raises(RuntimeError, match="moved"):
        cached.score([tokens(8, 60)], [tokens(2, 61)])


def test_an_empty_call_returns_nothing_and_tensors_are_accepted() -> None:
    model = model_for("llama")
    cached = radixkv.wrap(model, capacity_tokens=256, block_size=BLOCK)
    assert cached.score([], []) == []
    context, cont = tokens(10, 70), tokens(3, 71)
    got = cached.score([torch.tensor(context)], [torch.tensor(cont)])
    assert_matches_plain(model, got, [context], [cont])
    assert isinstance(cached, CachedModel)


def test_threads_scoring_overlapping_questions_get_plain_results_and_leave_no_lock() -> None:
    import threading

    model = model_for("llama")
    cached = radixkv.wrap(model, capacity_tokens=160, block_size=BLOCK)  # small: inserts evict meanwhile
    sets = [questions(tokens(36, 80), 3, 3, seed=81 + t) for t in range(3)]
    results: dict[int, list[ContinuationScore]] = {}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for _ in range(2):
                results[t] = cached.score(*sets[t], batch_size=3)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for t, (contexts, conts) in enumerate(sets):
        assert_matches_plain(model, results[t], contexts, conts)
    no_locks(cached)
