"""Bad input to the core: the right exception, a message naming the problem, no state change."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from kvutil import SPEC, fingerprint, kv_for, make_cache

from radixkv import KVSpec, PrefixCache

IDS = list(range(8))


def _kv(**change: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    kv = kv_for(IDS)
    if "layers" in change:
        kv = kv[: int(change["layers"])]  # type: ignore[call-overload]
    if "dtype" in change:
        kv = [(k.to(change["dtype"]), v.to(change["dtype"])) for k, v in kv]  # type: ignore[arg-type]
    if "tokens" in change:
        kv = [(k[:, :, : int(change["tokens"])], v[:, :, : int(change["tokens"])]) for k, v in kv]  # type: ignore[call-overload]
    if "heads" in change:
        kv = [(k[:, :1], v[:, :1]) for k, v in kv]
    if "device" in change:
        kv = [(k.to("meta"), v.to("meta")) for k, v in kv]
    return kv


# (name, call on a populated cache, exception type, words the message must contain)
CASES: list[tuple[str, Callable[[PrefixCache], object], type[Exception], str]] = [
    ("float token ids", lambda c: c.match([1.5, 2.0]), TypeError, "token_ids"),
    ("string token ids", lambda c: c.match("hello"), TypeError, "token_ids"),
    ("negative token id", lambda c: c.match([1, -2, 3]), ValueError, "non-negative"),
    ("2-D tensor", lambda c: c.match(torch.zeros(2, 4, dtype=torch.long)), ValueError, "1-D"),
    ("float tensor", lambda c: c.match(torch.zeros(4)), TypeError, "integers"),
    ("bool tensor", lambda c: c.match(torch.zeros(4, dtype=torch.bool)), TypeError, "integers"),
    ("float ndarray", lambda c: c.match(np.zeros(4)), TypeError, "integers"),
    ("2-D ndarray", lambda c: c.match(np.zeros((2, 2), dtype=np.int64)), ValueError, "1-D"),
    ("None token ids", lambda c: c.match(None), TypeError, "token_ids"),
    ("unhashable namespace", lambda c: c.match(IDS, namespace=["a"]), TypeError, "namespace"),
    ("float namespace", lambda c: c.insert(IDS, kv_for(IDS), namespace=1.5), TypeError, "namespace"),
    ("kv with too few layers", lambda c: c.insert(IDS, _kv(layers=1)), ValueError, "layers"),
    ("kv of the wrong dtype", lambda c: c.insert(IDS, _kv(dtype=torch.float16)), ValueError, "dtype"),
    ("kv shorter than the ids", lambda c: c.insert(IDS, _kv(tokens=4)), ValueError, "shape"),
    ("kv with too few heads", lambda c: c.insert(IDS, _kv(heads=1)), ValueError, "shape"),
    ("kv on another device", lambda c: c.insert(IDS, _kv(device=True)), ValueError, "meta"),
    ("kv not a list", lambda c: c.insert(IDS, torch.zeros(1)), TypeError, "kv"),
    ("kv pair not a pair", lambda c: c.insert(IDS, [(kv_for(IDS)[0][0],)] * 2), TypeError, "pair"),
    ("kv element not a tensor", lambda c: c.insert(IDS, [(1, 2)] * 2), TypeError, "torch.Tensor"),
    ("insert with negative id", lambda c: c.insert([0, 1, 2, -1, 4, 5, 6, 7], kv_for(IDS)), ValueError, "non-negative"),
    ("priority not an int", lambda c: c.insert(IDS, kv_for(IDS), priority="high"), TypeError, "priority"),
    ("negative evict", lambda c: c.evict(-1), ValueError, "num_tokens"),
    ("float evict", lambda c: c.evict(2.5), TypeError, "num_tokens"),
    ("gather a non-match", lambda c: c.gather(object()), TypeError, "PrefixMatch"),
    ("release a foreign match", lambda c: c.release(make_cache().match(IDS)), ValueError, "another"),
]


@pytest.mark.parametrize(("name", "call", "exc", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_named_error_and_leaves_the_cache_unchanged(
    name: str, call: Callable[[PrefixCache], object], exc: type[Exception], words: str
) -> None:
    cache = make_cache()
    for ids in (IDS, [*IDS[:4], 9, 9, 9, 9, 9]):
        cache.insert(ids, kv_for(ids))
    live = cache.match(IDS)
    before = fingerprint(cache)
    with pytest.raises(exc, match=words):
        call(cache)
    assert fingerprint(cache) == before
    cache.check_invariants()
    cache.release(live)


def test_a_double_release_leaves_the_cache_unchanged() -> None:
    cache = make_cache()
    cache.insert(IDS, kv_for(IDS))
    m = cache.match(IDS)
    cache.release(m)
    before = fingerprint(cache)
    with pytest.raises(ValueError, match="already released"):
        cache.release(m)
    assert fingerprint(cache) == before


CONSTRUCTION: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("capacity below one block", lambda: PrefixCache(SPEC, capacity_tokens=3, block_size=4), ValueError, "one block"),
    ("bytes below one block", lambda: PrefixCache(SPEC, capacity_bytes=10), ValueError, "one block"),
    ("no capacity", lambda: PrefixCache(SPEC), ValueError, "capacity_tokens or capacity_bytes"),
    ("both capacities", lambda: PrefixCache(SPEC, capacity_tokens=64, capacity_bytes=10**6), ValueError, "exactly one"),
    ("absurd capacity", lambda: PrefixCache(SPEC, capacity_tokens=10**15), ValueError, "memory"),
    ("zero capacity", lambda: PrefixCache(SPEC, capacity_tokens=0), ValueError, "capacity_tokens"),
    ("float capacity", lambda: PrefixCache(SPEC, capacity_tokens=64.0), TypeError, "capacity_tokens"),
    ("block size 0", lambda: PrefixCache(SPEC, capacity_tokens=64, block_size=0), ValueError, "block_size"),
    ("block size bool", lambda: PrefixCache(SPEC, capacity_tokens=64, block_size=True), TypeError, "block_size"),
    ("unknown policy", lambda: PrefixCache(SPEC, capacity_tokens=64, eviction="mru"), ValueError, "lru"),
    ("policy not a name", lambda: PrefixCache(SPEC, capacity_tokens=64, eviction=3), TypeError, "eviction"),
    ("spec not a KVSpec", lambda: PrefixCache((2, 2, 4), capacity_tokens=64), TypeError, "KVSpec"),
    ("spec with zero layers", lambda: KVSpec(0, 2, 4), ValueError, "num_layers"),
    ("spec with int dtype", lambda: KVSpec(1, 1, 4, dtype=torch.int64), ValueError, "dtype"),
    ("spec with a bad device", lambda: KVSpec(1, 1, 4, device="gpu9"), ValueError, "device"),
]


@pytest.mark.parametrize(("name", "call", "exc", "words"), CONSTRUCTION, ids=[c[0] for c in CONSTRUCTION])
def test_bad_construction_arguments_raise_a_named_error(
    name: str, call: Callable[[], object], exc: type[Exception], words: str
) -> None:
    with pytest.raises(exc, match=words):
        call()


def test_kvspec_rejects_a_spec_tuple_of_the_wrong_type() -> None:
    with pytest.raises(ValueError, match="head_dim"):
        KVSpec(1, 1, "8")  # type: ignore[arg-type]
