"""The pool on the suite's `--device` (cpu by default; `python -m pytest tests/test_device_pool.py
--device cuda` on a GPU): insert, match and gather in every dtype, exact and quantised."""

from __future__ import annotations

import pytest
import torch

import radixkv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _kv(spec: radixkv.KVSpec, tokens: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shape = (1, spec.num_kv_heads, tokens, spec.head_dim)
    return [
        (torch.randn(shape, generator=g).to(device, spec.dtype), torch.randn(shape, generator=g).to(device, spec.dtype))
        for _ in range(spec.num_layers)
    ]


def _round_trip(device: torch.device, dtype: torch.dtype, kv_dtype: str | None) -> list[tuple[torch.Tensor, ...]]:
    spec = radixkv.KVSpec(num_layers=3, num_kv_heads=2, head_dim=64, dtype=dtype, device=device)
    cache = radixkv.PrefixCache(spec, capacity_tokens=256, block_size=16, kv_dtype=kv_dtype)
    ids = list(range(100))
    kv = _kv(spec, len(ids), device)
    assert cache.insert(ids, kv) == 96
    with cache.match(ids) as m:
        assert m.num_tokens == 96
        gathered = cache.gather(m)
        part = cache.gather(m, start=32, stop=64)
    for (k, v), (gk, gv), (pk, pv) in zip(kv, gathered, part, strict=True):
        assert gk.device == torch.device(device) and gk.dtype == dtype
        assert torch.equal(pk, gk[:, :, 32:64]) and torch.equal(pv, gv[:, :, 32:64])
        if kv_dtype is None:
            assert torch.equal(gk, k[:, :, :96]) and torch.equal(gv, v[:, :, :96])
        else:
            # Each element within half a quantisation step of what was stored (per token and head).
            for got, want in ((gk, k[:, :, :96]), (gv, v[:, :, :96])):
                want32 = want.float()
                span = want32.amax(-1, keepdim=True) - want32.amin(-1, keepdim=True)
                levels = 255 if kv_dtype == "int8" else 15
                step = span / levels
                slack = 0.02 * want32.abs().amax(-1, keepdim=True)  # storing the scales in float16
                assert ((got.float() - want32).abs() <= step + slack).all()
    cache.check_invariants()
    return [tuple(t.cpu() for t in pair) for pair in gathered]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", [None, "int8", "int4"])
def test_pool_round_trip_on_the_device(device: torch.device, dtype: torch.dtype, kv_dtype: str | None) -> None:
    """Exact pools give back the inserted bits; quantised ones stay within a step, and off the CPU
    give the CPU pool's bits (disk and Redis tiers are shared between machines)."""
    on_device = _round_trip(device, dtype, kv_dtype)
    if device.type != "cpu":
        on_cpu = _round_trip(torch.device("cpu"), dtype, kv_dtype)
        for a, b in zip(on_device, on_cpu, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
