"""The precision settings users make never make a cached call fail, and decide what is stored as
documented (`CachedModel.reuse_generated`): a float32 model stores its generated tokens' KV only
where float32 matmuls on its device run at full ("ieee") precision.

Each test sets one of torch's settings (the legacy API: `set_float32_matmul_precision`,
`allow_tf32`; the newer per-backend `fp32_precision` attributes; autocast) and restores every
one of them afterwards, so that the legacy getter works again for the rest of the suite.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from radixkv.integrations.hf import UncachedWarning, _float32_matmul_precision  # noqa: E402
from tiny import tiny_llama  # noqa: E402

import radixkv  # noqa: E402

BLOCK = 4
NEW = 6


def _holders() -> list[Any]:
    """Every object that carries an `fp32_precision` in this torch build, parents first."""
    b = torch.backends
    candidates = [b, b.cuda.matmul, b.mkldnn, b.cudnn]
    candidates += [getattr(b.mkldnn, n, None) for n in ("matmul", "conv", "rnn")]
    candidates += [getattr(b.cudnn, n, None) for n in ("conv", "rnn")]
    return [h for h in candidates if h is not None and isinstance(getattr(h, "fp32_precision", None), str)]


@contextmanager
def precision_setting(apply: Callable[[], None]) -> Iterator[None]:
    saved = [(h, h.fp32_precision) for h in _holders()]
    legacy_cudnn = torch.backends.cudnn.allow_tf32
    legacy = torch.get_float32_matmul_precision()
    try:
        # From torch's defaults: a value left explicit by an earlier test (the legacy setter writes
        # "ieee" into the matmul attributes) would override the parent value a case sets.
        torch.set_float32_matmul_precision("highest")
        for holder, _ in saved:
            holder.fp32_precision = "none"
        apply()
        yield
    finally:
        # The legacy setter keeps a value of its own and writes the new attributes: it goes first.
        torch.set_float32_matmul_precision(legacy)
        for holder, value in saved:
            holder.fp32_precision = value
        torch.backends.cudnn.allow_tf32 = legacy_cudnn
        assert torch.get_float32_matmul_precision() == "highest"  # the legacy getter works again


def _set(holder: Any, value: str) -> Callable[[], None]:
    return lambda: setattr(holder, "fp32_precision", value)


def _set_cuda_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True


def _cudnn_tf32_off() -> None:
    torch.backends.cudnn.allow_tf32 = False


# name, setting, the float32 matmul precision it leaves on the CPU and on CUDA, as torch's own
# per-backend attributes read back (see `_float32_matmul_precision`).
SETTINGS: list[tuple[str, Callable[[], None], str, str]] = [
    ("default", lambda: None, "ieee", "ieee"),
    ("legacy-highest", lambda: torch.set_float32_matmul_precision("highest"), "ieee", "ieee"),
    ("legacy-high", lambda: torch.set_float32_matmul_precision("high"), "tf32", "tf32"),
    ("legacy-medium", lambda: torch.set_float32_matmul_precision("medium"), "bf16", "tf32"),
    ("legacy-cuda-allow-tf32", _set_cuda_tf32, "ieee", "tf32"),
    ("legacy-cudnn-tf32-off", _cudnn_tf32_off, "ieee", "ieee"),
    ("cuda-matmul-tf32", _set(torch.backends.cuda.matmul, "tf32"), "ieee", "tf32"),
    ("cuda-matmul-ieee", _set(torch.backends.cuda.matmul, "ieee"), "ieee", "ieee"),
    ("cpu-matmul-bf16", _set(torch.backends.mkldnn.matmul, "bf16"), "bf16", "ieee"),
    ("cpu-matmul-tf32", _set(torch.backends.mkldnn.matmul, "tf32"), "tf32", "ieee"),
    # torch reports a CPU backend-wide value as the generic one too, which CUDA falls back to.
    ("cpu-backend-bf16", _set(torch.backends.mkldnn, "bf16"), "bf16", "bf16"),
    ("all-tf32", _set(torch.backends, "tf32"), "tf32", "tf32"),
    ("all-ieee", _set(torch.backends, "ieee"), "ieee", "ieee"),
    # cudnn's value is CUDA's backend-wide one: torch reports CUDA matmuls as tf32 then.
    ("cudnn-tf32", _set(torch.backends.cudnn, "tf32"), "ieee", "tf32"),
]
IDS = [s[0] for s in SETTINGS]

_MODEL: list[Any] = []


def model() -> Any:
    if not _MODEL:
        _MODEL.append(tiny_llama())
    return _MODEL[0]


def greedy(generate: Callable[..., Any], ids: list[int]) -> Any:
    return generate(
        torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, output_scores=True, return_dict_in_generate=True
    )


def same(got: Any, want: Any) -> None:
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("name", "apply", "cpu", "cuda"), SETTINGS, ids=IDS)
def test_each_setting_gives_the_documented_precision_per_backend(
    name: str, apply: Callable[[], None], cpu: str, cuda: str
) -> None:
    with precision_setting(apply):
        assert (_float32_matmul_precision("cpu"), _float32_matmul_precision("cuda")) == (cpu, cuda)


@pytest.mark.parametrize(("name", "apply", "cpu", "cuda"), SETTINGS, ids=IDS)
def test_cached_calls_never_fail_and_store_generated_kv_only_at_full_precision(
    name: str, apply: Callable[[], None], cpu: str, cuda: str
) -> None:
    m = model()
    prompt = list(range(3, 21))  # 18 tokens
    with precision_setting(apply):
        cached = radixkv.wrap(m, capacity_tokens=512, block_size=BLOCK)
        assert cached.reuse_generated == (cpu == "ieee")  # a CPU model: the CPU's setting decides
        with warnings.catch_warnings():
            warnings.simplefilter("error", UncachedWarning)
            out = greedy(cached.generate, prompt)
            same(out, greedy(m.generate, prompt))
            history = out.sequences[0].tolist()
            with cached.cache.match(history) as match:
                stored = match.num_tokens
            # The answer's KV (all but the last token's) only where decode-step KV is exact.
            expect = (len(history) - 1) if cached.reuse_generated else len(prompt)
            assert stored == expect // BLOCK * BLOCK
            follow = [*history, 30, 31, 32]
            same(greedy(cached.generate, follow), greedy(m.generate, follow))
        assert cached.stats.reused_tokens == stored and cached.stats.uncached_calls == 0


def test_autocast_calls_pass_through_with_one_warning_and_store_nothing() -> None:
    m = model()
    prompt = list(range(3, 21))
    cached = radixkv.wrap(m, capacity_tokens=512, block_size=BLOCK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = greedy(m.generate, prompt)
        with pytest.warns(UncachedWarning, match="autocast") as caught:
            got = greedy(cached.generate, prompt)
    assert len([w for w in caught if issubclass(w.category, UncachedWarning)]) == 1
    same(got, want)
    assert cached.cache is not None and cached.cache.stats.cached_tokens == 0
    # Outside autocast the same wrapper serves and stores as usual.
    same(greedy(cached.generate, prompt), greedy(m.generate, prompt))
    assert cached.cache.stats.cached_tokens > 0
