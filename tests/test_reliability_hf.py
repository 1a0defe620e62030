"""The Hugging Face adapter under threads, injected faults, memory pressure and bad input.

One tiny seeded random Llama (no download) is shared by every test; each test wraps it in a
fresh `CachedModel`. Greedy outputs must be token-identical to plain `model.generate`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pytest
import torch
from kvutil import cached_prefixes, fingerprint, run_threads

transformers = pytest.importorskip("transformers")

from radixkv.integrations.hf import CachedModel  # noqa: E402

import radixkv  # noqa: E402

BLOCK = 4
VOCAB = 128
GREEDY: dict[str, Any] = {"max_new_tokens": 4, "do_sample": False}
Generate = Callable[..., Any]
_MODEL: list[Any] = []


def tiny_model() -> Any:
    """One seeded tiny Llama, built once and never mutated (tests only add and remove hooks)."""
    if not _MODEL:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=VOCAB,
        )
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.config._attn_implementation = "sdpa"
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None  # fixed-length outputs
        _MODEL.append(model.eval())
    return _MODEL[0]


def fresh(capacity_tokens: int = 2048) -> tuple[Any, CachedModel]:
    model = tiny_model()
    return model, radixkv.wrap(model, capacity_tokens=capacity_tokens, block_size=BLOCK)


def cache_of(cached: CachedModel) -> radixkv.PrefixCache:
    assert cached.cache is not None, cached.unsupported_reason
    return cached.cache


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def row(ids: list[int]) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long)


def assert_no_lock(cache: radixkv.PrefixCache) -> None:
    cache.check_invariants()
    s = cache.stats
    assert s.locked_tokens == 0, f"{s.locked_tokens} tokens still locked"
    assert s.live_matches == 0, f"{s.live_matches} matches still live"


# ----- 1. concurrency ---------------------------------------------------------------------
THREADS = 8
REQUESTS = 50


def test_eight_threads_sharing_one_cached_model_get_the_uncached_outputs_and_leave_no_lock() -> None:
    """Rule: concurrent generate calls on one CachedModel each return exactly the uncached output."""
    model, cached = fresh(capacity_tokens=256)  # small enough that threads also evict
    cache = cache_of(cached)
    shared = [tokens(8, 1), tokens(12, 2), tokens(16, 3)]
    prompts = [p + tokens(1 + (7 * i) % 9, 100 + i) for i, p in enumerate(shared * 6)]
    prompts += [tokens(3 + (5 * i) % 20, 200 + i) for i in range(10)]  # distinct ones, 3..22 tokens
    references = [model.generate(row(p), **GREEDY) for p in prompts]
    done = [0] * THREADS

    def worker(t: int) -> None:
        rng = random.Random(t)
        for _ in range(REQUESTS):
            i = rng.randrange(len(prompts))
            out = cached.generate(row(prompts[i]), **GREEDY)
            assert torch.equal(out, references[i]), f"thread {t}: prompt {i} gave {out} != {references[i]}"
            done[t] += 1

    run_threads(worker, THREADS)
    assert done == [REQUESTS] * THREADS
    assert_no_lock(cache)
    s = cache.stats
    assert s.lookups == THREADS * REQUESTS and s.hit_tokens > 0 and s.evicted_tokens > 0
    assert cached.stats.calls == THREADS * REQUESTS and cached.stats.reused_tokens > 0


# ----- 2. faults at every step of a cached generate -----------------------------------------
SHARED = tokens(12, 7)
WARM = SHARED + tokens(4, 8)  # caches SHARED (and more) before each fault
BATCH = [SHARED + tokens(5, 9), SHARED + tokens(5, 10)]  # same length: no padding; 12 tokens reused each
NEXT = SHARED + tokens(6, 11)


class _RaisingCriterion(transformers.StoppingCriteria):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        raise self.exc


class _RaisingStreamer(transformers.generation.streamers.BaseStreamer):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def put(self, value: torch.Tensor) -> None:
        raise self.exc

    def end(self) -> None:
        pass


def _raise_from(exc: BaseException) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fail


# Each arms one fault on (monkeypatch, cached, stack, exception) and returns extra generate kwargs.
Arm = Callable[[pytest.MonkeyPatch, CachedModel, ExitStack, BaseException], dict[str, Any]]


def _arm_match(mp: pytest.MonkeyPatch, cached: CachedModel, stack: ExitStack, exc: BaseException) -> dict[str, Any]:
    mp.setattr(cache_of(cached), "match", _raise_from(exc))
    return {}


def _arm_gather(mp: pytest.MonkeyPatch, cached: CachedModel, stack: ExitStack, exc: BaseException) -> dict[str, Any]:
    mp.setattr(cache_of(cached), "gather", _raise_from(exc))
    return {}


def _arm_forward(mp: pytest.MonkeyPatch, cached: CachedModel, stack: ExitStack, exc: BaseException) -> dict[str, Any]:
    def hook(module: Any, args: Any) -> None:  # raises on the first forward: the prefill
        raise exc

    stack.callback(cached.model.register_forward_pre_hook(hook).remove)
    return {}


def _arm_criterion(mp: pytest.MonkeyPatch, cached: CachedModel, stack: ExitStack, exc: BaseException) -> dict[str, Any]:
    return {"stopping_criteria": transformers.StoppingCriteriaList([_RaisingCriterion(exc)])}


def _arm_streamer(mp: pytest.MonkeyPatch, cached: CachedModel, stack: ExitStack, exc: BaseException) -> dict[str, Any]:
    return {"streamer": _RaisingStreamer(exc)}


def _arm_insert(mp: pytest.MonkeyPatch, cached: CachedModel, stack: ExitStack, exc: BaseException) -> dict[str, Any]:
    cache = cache_of(cached)
    real = cache.insert
    calls = [0]

    def insert_then_fail(*args: Any, **kwargs: Any) -> int:
        calls[0] += 1
        if calls[0] == 1:  # row 0 is stored completely, row 1's insert fails
            return real(*args, **kwargs)
        raise exc

    mp.setattr(cache, "insert", insert_then_fail)
    return {}


FAULTS: list[tuple[str, Arm, Callable[[], BaseException]]] = [
    ("lookup", _arm_match, lambda: RuntimeError("injected: match failed")),
    ("gather", _arm_gather, lambda: MemoryError("injected: gather copy failed")),
    ("prefill forward", _arm_forward, lambda: RuntimeError("injected: CUDA error in prefill")),
    ("stopping criterion", _arm_criterion, lambda: ValueError("injected: criterion failed")),
    ("streamer put", _arm_streamer, lambda: OSError("injected: client went away")),
    ("KeyboardInterrupt", _arm_criterion, lambda: KeyboardInterrupt()),
    ("insert", _arm_insert, lambda: RuntimeError("injected: insert failed")),
]


@pytest.mark.parametrize(("point", "arm", "make_exc"), FAULTS, ids=[f[0] for f in FAULTS])
def test_a_fault_anywhere_in_generate_reaches_the_caller_and_leaves_no_lock_nor_half_written_block(
    monkeypatch: pytest.MonkeyPatch, point: str, arm: Arm, make_exc: Callable[[], BaseException]
) -> None:
    """Rule: an exception at any step propagates unchanged, leaks no lock and stores only completed inserts."""
    model, cached = fresh()
    cache = cache_of(cached)
    batch = torch.tensor(BATCH)
    reference = model.generate(batch, **GREEDY)
    cached.generate(row(WARM), **GREEDY)
    before = cached_prefixes(cache)
    lookups = cache.stats.lookups
    exc = make_exc()

    with monkeypatch.context() as mp, ExitStack() as stack:
        extra = arm(mp, cached, stack, exc)
        with pytest.raises(type(exc)) as info:
            cached.generate(batch, **GREEDY, **extra)
    assert info.value is exc, f"{point}: the caller got {info.value!r}, not the injected exception"
    if point != "lookup":
        assert cache.stats.lookups == lookups + 2, "the fault did not happen inside a cached generate"
    assert_no_lock(cache)

    after = cached_prefixes(cache)
    if point == "insert":
        new = after - before
        full = tuple(reference[0].tolist())
        assert before <= after and new, "row 0's completed insert should have stored its new blocks"
        assert all(full[: len(path)] == path for _, path in new), "a block of the failed row 1 is reachable"
    else:
        assert after == before, f"{point}: the cached content changed: {after ^ before}"

    # The next requests work and equal the uncached reference (the failed batch too).
    assert torch.equal(cached.generate(row(NEXT), **GREEDY), model.generate(row(NEXT), **GREEDY))
    assert torch.equal(cached.generate(batch, **GREEDY), reference)
    assert_no_lock(cache)


# ----- 3. memory pressure ---------------------------------------------------------------------
def test_generate_answers_correctly_and_stores_nothing_when_every_block_is_locked() -> None:
    """Rule: with the whole pool locked by live matches, generate still returns the uncached output."""
    model, cached = fresh(capacity_tokens=8 * BLOCK)
    cache = cache_of(cached)
    a, b = tokens(20, 21), tokens(12, 22)
    cached.generate(row(a), **GREEDY)  # 23 tokens: 5 blocks
    cached.generate(row(b), **GREEDY)  # 15 tokens: 3 blocks
    held = [cache.match(a + tokens(8, 23)), cache.match(b + tokens(8, 24))]
    s = cache.stats
    assert s.free_tokens == 0 and s.locked_tokens == s.capacity_tokens == 8 * BLOCK, s
    snapshot = cached_prefixes(cache)

    for prompt in (tokens(16, 25), a + tokens(3, 26)):  # a miss, and a hit on locked blocks
        inserted, dropped = cache.stats.inserted_tokens, cache.stats.dropped_tokens
        out = cached.generate(row(prompt), **GREEDY)
        assert torch.equal(out, model.generate(row(prompt), **GREEDY))
        assert cache.stats.inserted_tokens == inserted, "an insert stored blocks into a fully locked pool"
        assert cache.stats.dropped_tokens > dropped
    assert cached_prefixes(cache) == snapshot
    assert cache.stats.locked_tokens == 8 * BLOCK  # the caller's matches are still intact

    for m in held:
        cache.release(m)
    assert_no_lock(cache)
    prompt = tokens(16, 27)
    inserted = cache.stats.inserted_tokens
    assert torch.equal(cached.generate(row(prompt), **GREEDY), model.generate(row(prompt), **GREEDY))
    assert cache.stats.inserted_tokens > inserted, "after release, inserts should evict and store again"
    assert_no_lock(cache)


# ----- 4. bad input ---------------------------------------------------------------------------
P = tokens(20, 31)
MEANINGFUL = (ValueError, TypeError, IndexError, RuntimeError)


def _ids(*shape: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(32))


# (name, call on a generate function, exception type required, word its message must contain)
GENERATE_CASES: list[tuple[str, Callable[[Generate], object], type[Exception], str]] = [
    ("float input_ids", lambda g: g(row(P).float(), **GREEDY), RuntimeError, "Long"),
    ("3-D input_ids", lambda g: g(_ids(1, 1, 20), **GREEDY), RuntimeError, "size"),
    ("1-D input_ids", lambda g: g(torch.tensor(P), **GREEDY), IndexError, "index"),
    ("negative token id", lambda g: g(row([5, 6, -3, 7, 8, 9]), **GREEDY), IndexError, "index out of range"),
    ("token id == vocab_size", lambda g: g(row([5, 6, VOCAB, 7, 8, 9]), **GREEDY), IndexError, "index out of range"),
    ("token id 2**40", lambda g: g(row([5, 2**40, 7]), **GREEDY), IndexError, "index out of range"),
    ("empty prompt [1, 0]", lambda g: g(torch.zeros((1, 0), dtype=torch.long), **GREEDY), RuntimeError, "0 elements"),
    (
        "mask shorter than ids",
        lambda g: g(row(P), attention_mask=torch.ones(1, 5, dtype=torch.long), **GREEDY),
        RuntimeError,
        "size",
    ),
    (
        "mask of another batch size",
        lambda g: g(row(P), attention_mask=torch.ones(2, 20, dtype=torch.long), **GREEDY),
        RuntimeError,
        "shapes",
    ),
    ("unknown generate kwarg", lambda g: g(row(P), foo_bar=3, **GREEDY), ValueError, "foo_bar"),
    ("max_new_tokens=-1", lambda g: g(row(P), max_new_tokens=-1, do_sample=False), ValueError, "max_new_tokens"),
    ("max_new_tokens as str", lambda g: g(row(P), max_new_tokens="4", do_sample=False), TypeError, "not supported"),
    (
        "negative temperature",
        lambda g: g(row(P), max_new_tokens=4, do_sample=True, temperature=-1.0),
        ValueError,
        "temperature",
    ),
    ("num_beams=0", lambda g: g(row(P), num_beams=0, **GREEDY), ValueError, "num_beams"),
    ("input_ids as a list", lambda g: g([P], **GREEDY), TypeError, "input_ids"),
]
# Only generate's decoding setup finds these: contract rule 7 allows one counted lookup.
_LOOKED_UP = {"negative temperature"}
# Plain generate's error is obscure here; the adapter raises a clearer one naming the argument.
_CLEARER = {"num_beams=0": ZeroDivisionError, "input_ids as a list": AttributeError}


@pytest.mark.parametrize(("name", "call", "expected", "word"), GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_bad_generate_input_raises_an_error_naming_the_problem_and_leaves_the_cache_unchanged(
    name: str, call: Callable[[Generate], object], expected: type[Exception], word: str
) -> None:
    """Rule: bad generate input raises a meaningful, named error and changes nothing in the cache."""
    _, cached = fresh()
    cache = cache_of(cached)
    cached.generate(row(P), **GREEDY)  # populated
    before, prefixes = fingerprint(cache), cached_prefixes(cache)
    with pytest.raises(BaseException) as info:
        call(cached.generate)
    if name in _LOOKED_UP:  # documented: one counted lookup (a match may split a node), nothing stored
        assert cached_prefixes(cache) == prefixes, f"{name}: the cached content changed"
        s, s0 = cache.stats, before[0]
        assert (s.lookups, s.inserted_tokens, s.evicted_tokens) == (s0.lookups + 1, s0.inserted_tokens, 0)
    else:
        assert fingerprint(cache) == before, f"{name}: the cache changed"
    assert_no_lock(cache)
    assert isinstance(info.value, MEANINGFUL), f"{name}: obscure {type(info.value).__name__}: {info.value}"
    assert isinstance(info.value, expected), f"{name}: got {type(info.value).__name__}: {info.value}"
    assert word.lower() in str(info.value).lower(), f"{name}: {info.value}"


@pytest.mark.parametrize(("name", "call"), [(c[0], c[1]) for c in GENERATE_CASES], ids=[c[0] for c in GENERATE_CASES])
def test_bad_generate_input_raises_exactly_what_plain_generate_raises(
    name: str, call: Callable[[Generate], object]
) -> None:
    """Rule: the adapter is a drop-in: bad input gets plain `model.generate`'s error type and
    message, or, where that error is obscure, a clearer one."""
    model, cached = fresh()
    with pytest.raises(BaseException) as plain:
        call(model.generate)
    with pytest.raises(BaseException) as ours:
        call(cached.generate)
    if name in _CLEARER:
        assert type(plain.value) is _CLEARER[name], f"transformers changed its error for {name}: {plain.value!r}"
        assert isinstance(ours.value, MEANINGFUL) and not isinstance(ours.value, type(plain.value))
    else:
        assert type(ours.value) is type(plain.value) and str(ours.value) == str(plain.value)
    lookups = cache_of(cached).stats.lookups
    assert lookups == (1 if name in _LOOKED_UP else 0), f"{name}: bad input was looked up {lookups} times"


WRAP_CASES: list[tuple[str, Callable[[Any, CachedModel], object], type[Exception], str]] = [
    ("capacity_tokens=0", lambda m, c: radixkv.wrap(m, capacity_tokens=0), ValueError, "capacity_tokens"),
    ("capacity_tokens=-5", lambda m, c: radixkv.wrap(m, capacity_tokens=-5), ValueError, "capacity_tokens"),
    ("unknown eviction", lambda m, c: radixkv.wrap(m, capacity_tokens=64, eviction="bogus"), ValueError, "eviction"),
    ("block_size=0", lambda m, c: radixkv.wrap(m, capacity_tokens=64, block_size=0), ValueError, "block_size"),
    ("both capacities", lambda m, c: radixkv.wrap(m, capacity_tokens=64, capacity_bytes=4096), ValueError, "capacity"),
    ("a non-model object", lambda m, c: radixkv.wrap(object(), capacity_tokens=64), TypeError, "generate"),
    ("a CachedModel", lambda m, c: radixkv.wrap(c, capacity_tokens=64), TypeError, "already"),
    ("reuse_generated='yes'", lambda m, c: radixkv.wrap(m, capacity_tokens=64, reuse_generated="yes"), TypeError,
     "reuse_generated"),
    ("reuse_generated=1", lambda m, c: radixkv.wrap(m, capacity_tokens=64, reuse_generated=1), TypeError,
     "reuse_generated"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "call", "expected", "word"), WRAP_CASES, ids=[c[0] for c in WRAP_CASES])
def test_bad_wrap_arguments_raise_an_error_naming_the_problem(
    name: str, call: Callable[[Any, CachedModel], object], expected: type[Exception], word: str
) -> None:
    """Rule: wrap rejects bad arguments with a named ValueError/TypeError and leaves other caches alone."""
    model, cached = fresh()
    cached.generate(row(P), **GREEDY)
    before = fingerprint(cache_of(cached))
    with pytest.raises(expected) as info:
        call(model, cached)
    assert word in str(info.value), f"{name}: {info.value}"
    assert fingerprint(cache_of(cached)) == before


ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("float mask", {"attention_mask": torch.ones(1, 20)}),
    ("bool mask", {"attention_mask": torch.ones(1, 20, dtype=torch.bool)}),
    ("mask of 2s", {"attention_mask": torch.full((1, 20), 2)}),
    ("all-zero mask", {"attention_mask": torch.zeros(1, 20, dtype=torch.long)}),
    ("num_return_sequences=0", {"num_return_sequences": 0}),
]


@pytest.mark.filterwarnings("ignore::radixkv.integrations.hf.UncachedWarning")  # the all-zero mask
@pytest.mark.parametrize(("name", "extra"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_odd_input_that_plain_generate_accepts_gives_the_plain_output(name: str, extra: dict[str, Any]) -> None:
    """Rule: input plain generate accepts (odd masks, odd options) returns the same tokens through the adapter."""
    model, cached = fresh()
    cache = cache_of(cached)
    cached.generate(row(P), **GREEDY)
    for ids in (row(P).int(), row(P)):  # int32 ids too
        out = cached.generate(ids, **extra, **GREEDY)
        assert torch.equal(out, model.generate(ids, **extra, **GREEDY)), name
    assert_no_lock(cache)
