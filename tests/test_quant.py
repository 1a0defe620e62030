"""Quantised KV blocks (kv_dtype "int8" / "int4"): error bounds, capacity arithmetic, the exact default."""

from __future__ import annotations

import pytest
import torch
from kvutil import SPEC, kv_for

from radixkv import KVSpec, PrefixCache
from radixkv.core.quant import KVQuantizer, kv_bytes_per_token, make_quantizer

# A realistic head (SmolLM2 / Llama-3.2-1B: head_dim 64), small enough for milliseconds.
REAL = KVSpec(num_layers=3, num_kv_heads=3, head_dim=64, dtype=torch.float32)
QMAX = {"int8": 127, "int4": 15}


def _random_kv(spec: KVSpec, num_tokens: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV with the features that hurt quantisation: per-channel offsets (keys), outlier tokens, a
    scale that differs per head and layer, and an all-constant token (zero range)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(spec.num_layers):
        pair = []
        for _ in range(2):
            x = torch.randn(1, spec.num_kv_heads, num_tokens, spec.head_dim, generator=g)
            x = x * torch.rand(1, spec.num_kv_heads, 1, 1, generator=g) * (layer + 1) * 4
            x = x + torch.randn(1, 1, 1, spec.head_dim, generator=g) * 3  # channel offsets
            x[:, :, 5] *= 40  # an outlier token
            x[:, :, 7] = 0.25  # a constant token: range 0
            pair.append(x.to(spec.dtype))
        out.append((pair[0], pair[1]))
    return out


def _group_scale(q: KVQuantizer, x: torch.Tensor) -> torch.Tensor:
    """The step size of each element's group, from the data: range / levels. [..., head_dim]"""
    g = x.float().reshape(*x.shape[:-1], q.num_groups, q.group)
    if q.symmetric:
        step = g.abs().amax(-1, keepdim=True) / 127
    else:
        lo, hi = g.aminmax(dim=-1, keepdim=True)
        # The minimum is stored in float16, rounded down: the grid may start up to |lo| * 1.5 * 2**-10 lower.
        step = (hi - lo + lo.abs() * 2**-9) / 15
    return step.expand_as(g).reshape(x.shape)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_gathered_block_is_within_half_a_step_of_what_was_inserted(kv_dtype: str, dtype: torch.dtype) -> None:
    """Round trip through the pool: |x - gathered| <= step/2 per element, the step being the
    element's own (token, head) group range / levels, plus the output dtype's rounding."""
    spec = KVSpec(REAL.num_layers, REAL.num_kv_heads, REAL.head_dim, dtype=dtype)
    cache = PrefixCache(spec, capacity_tokens=256, block_size=8, kv_dtype=kv_dtype)
    ids = list(range(64))
    kv = _random_kv(spec, len(ids))
    assert cache.insert(ids, kv) == 64
    q = make_quantizer(kv_dtype, spec)
    assert q is not None
    with cache.match(ids) as m:
        got = cache.gather(m)
    assert m.num_tokens == 64
    eps = torch.finfo(dtype).eps
    for (gk, gv), (k, v) in zip(got, kv, strict=True):
        for out, x in ((gk, k), (gv, v)):
            assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
            step = _group_scale(q, x)
            # step widened by float16 scale rounding (2**-10); output rounding: eps of |x| (scale
            # and product each rounded once in dtype).
            bound = 0.5 * step * (1 + 2**-9) + 2 * eps * x.float().abs().amax(-1, keepdim=True) + 1e-6
            err = (out.float() - x.float()).abs()
            assert (err <= bound).all(), f"{kv_dtype} {dtype}: worst error/step {(err / step.clamp_min(1e-12)).max()}"
            # Not exact: the bound is doing work (a quantiser that stored x exactly would pass trivially).
            if dtype == torch.float32:
                assert err.max() > 0
    # The constant token comes back (to within float16 rounding of its value).
    assert torch.allclose(got[0][0][:, :, 7].float(), torch.full_like(got[0][0][:, :, 7].float(), 0.25), atol=1e-3)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_quantizer_error_bound_holds_for_finer_groups_and_every_code_is_in_range(kv_dtype: str) -> None:
    """Group-wise scales (several per token-head) keep the same half-step bound; codes stay in range."""
    q = KVQuantizer(kv_dtype, 64, group=16)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 5, 16, 64, generator=g) * torch.logspace(-3, 3, 64)  # channels of very different sizes
    x[0] += 1000.0  # groups far from zero: the float16 minimum's rounding matters there
    codes, scales = q.quantize(x)
    assert codes.shape == (8, 5, 16, q.code_dim) and scales.shape == (8, 5, 16, q.scale_dim)
    assert scales.dtype == torch.float16
    if kv_dtype == "int8":
        assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    else:
        assert codes.dtype == torch.uint8 and q.code_dim == 32  # two codes a byte
    out = q.dequantize(codes, scales, torch.float32)
    step = _group_scale(q, x)
    eps = torch.finfo(torch.float32).eps
    assert ((out - x).abs() <= 0.5 * step * (1 + 2**-9) + 2 * eps * x.abs().amax(-1, keepdim=True) + 1e-7).all()


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_blocks_quantise_independently_of_their_neighbours(kv_dtype: str) -> None:
    """A block's stored values depend only on its own tokens: inserting it alone or inside a longer
    prompt gives the same gathered values (blocks are shared between prefixes)."""
    ids = list(range(32))
    kv = _random_kv(REAL, 32, seed=3)
    alone = PrefixCache(REAL, capacity_tokens=64, block_size=8, kv_dtype=kv_dtype)
    alone.insert(ids[:8], [(k[:, :, :8], v[:, :, :8]) for k, v in kv])
    full = PrefixCache(REAL, capacity_tokens=64, block_size=8, kv_dtype=kv_dtype)
    full.insert(ids, kv)
    with alone.match(ids[:8]) as a, full.match(ids[:8]) as b:
        for (ka, va), (kb, vb) in zip(alone.gather(a), full.gather(b), strict=True):
            assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_capacity_at_the_same_bytes_int8_and_int4_hold_1_9x_and_3_5x_the_float16_tokens() -> None:
    """Scales included, for head_dim 64 and 128 (SmolLM2, Llama): int8 >= 1.9x, int4 >= 3.5x float16."""
    budget = 64 * 2**20
    for head_dim in (64, 128):
        f16 = KVSpec(4, 2, head_dim, dtype=torch.float16)
        exact = PrefixCache(f16, capacity_bytes=budget, block_size=16)
        i8 = PrefixCache(f16, capacity_bytes=budget, block_size=16, kv_dtype="int8")
        i4 = PrefixCache(f16, capacity_bytes=budget, block_size=16, kv_dtype="int4")
        base = exact.stats.capacity_tokens
        assert i8.stats.capacity_tokens >= 1.9 * base, (head_dim, i8.stats.capacity_tokens / base)
        assert i4.stats.capacity_tokens >= 3.5 * base, (head_dim, i4.stats.capacity_tokens / base)
        for c in (exact, i8, i4):
            s = c.stats
            assert s.capacity_bytes <= budget  # the pool's real tensors, codes and scales together
            assert s.capacity_bytes == s.capacity_tokens * s.bytes_per_token
    # The per-token arithmetic, spelled out for head_dim 64: codes + float16 scale(s) per token-head.
    f16 = KVSpec(30, 3, 64, dtype=torch.float16)
    per_head_kv = 2 * 30 * 3
    assert kv_bytes_per_token(f16, None) == per_head_kv * 64 * 2 == 23_040
    assert kv_bytes_per_token(f16, make_quantizer("int8", f16)) == per_head_kv * (64 + 2) == 11_880
    assert kv_bytes_per_token(f16, make_quantizer("int4", f16)) == per_head_kv * (32 + 4) == 6_480


def test_stats_report_bytes_per_token_and_kv_dtype() -> None:
    """stats.bytes_per_token is the pool's cost of one token; kv_dtype says how it is stored."""
    exact = PrefixCache(REAL, capacity_tokens=64)
    assert exact.stats.bytes_per_token == REAL.bytes_per_token and exact.stats.kv_dtype is None
    i4 = PrefixCache(REAL, capacity_tokens=64, kv_dtype="int4")
    assert i4.stats.bytes_per_token == 2 * 3 * 3 * (32 + 4) and i4.stats.kv_dtype == "int4"
    assert i4.stats.as_dict()["bytes_per_token"] == i4.stats.bytes_per_token


def test_the_default_stays_exact_bit_for_bit() -> None:
    """No kv_dtype: gathered KV equals the inserted KV exactly (float32, float16 and bfloat16)."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        spec = KVSpec(REAL.num_layers, REAL.num_kv_heads, REAL.head_dim, dtype=dtype)
        cache = PrefixCache(spec, capacity_tokens=128, block_size=8)
        ids = list(range(40))
        kv = _random_kv(spec, 40, seed=1)
        cache.insert(ids, kv)
        with cache.match(ids) as m:
            for (gk, gv), (k, v) in zip(cache.gather(m), kv, strict=True):
                assert torch.equal(gk, k[:, :, :40]) and torch.equal(gv, v[:, :, :40])
        assert cache.kv_dtype is None and cache.stats.capacity_bytes == 128 * spec.bytes_per_token


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_quantised_cache_keeps_every_invariant_through_splits_evictions_and_clear(kv_dtype: str) -> None:
    """Tree, locks and accounting do not depend on how blocks are stored."""
    cache = PrefixCache(SPEC, capacity_tokens=32, block_size=4, kv_dtype=kv_dtype)
    for i in range(12):
        ids = [i % 3, *range(100 * i, 100 * i + 10)]
        cache.insert(ids, kv_for(ids))
        cache.check_invariants()
        with cache.match(ids) as m:
            got = cache.gather(m)
            assert got[0][0].shape == (1, SPEC.num_kv_heads, m.num_tokens, SPEC.head_dim)
        cache.check_invariants()
    assert cache.stats.evicted_tokens > 0
    cache.clear()
    cache.check_invariants()
    assert cache.stats.free_tokens == cache.stats.capacity_tokens


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"kv_dtype": "int2"}, ValueError, "kv_dtype"),
        ({"kv_dtype": "INT8"}, ValueError, "kv_dtype"),
        ({"kv_dtype": "float16"}, ValueError, "kv_dtype"),
        ({"kv_dtype": 8}, TypeError, "kv_dtype"),
        ({"kv_dtype": torch.int8}, TypeError, "kv_dtype"),
    ],
)
def test_bad_kv_dtype_raises_a_named_error(kwargs: dict, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        PrefixCache(REAL, capacity_tokens=64, **kwargs)


def test_kv_dtype_needs_float_kv_and_int4_an_even_head_dim() -> None:
    with pytest.raises(ValueError, match="kv_dtype='int8' quantises floating point KV"):
        PrefixCache(KVSpec(2, 2, 4, dtype=torch.int8), capacity_tokens=64, kv_dtype="int8")
    with pytest.raises(ValueError, match="even head_dim"):
        PrefixCache(KVSpec(2, 2, 5), capacity_tokens=64, kv_dtype="int4")
    with pytest.raises(ValueError, match="group"):
        KVQuantizer("int8", 64, group=24)
