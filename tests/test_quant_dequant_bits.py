"""Dequantisation is exact arithmetic rounded once, on every path: the per-call reference
(`KVQuantizer.dequantize` without scratch), the float32 scratch the pool reuses for half precision
outputs, and the pool's gather (all layers' scales converted at once). Checked bit for bit against
an independent float64 oracle over every int8 code and every packed int4 byte."""

from __future__ import annotations

import itertools

import pytest
import torch

from radixkv import KVSpec
from radixkv.core import pool as pool_module
from radixkv.core import quant as quant_module
from radixkv.core.pool import KVPool
from radixkv.core.quant import KVQuantizer

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIM = 64


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Same-width integers of a float tensor: compares -0.0 and 0.0, and NaN payloads, as different."""
    return x.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[x.dtype])


def _random_scales(rows: int, seed: int) -> torch.Tensor:
    """[rows] positive float16 scales over the whole range quantize produces (2**-24 .. 65504)."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp2(torch.rand(rows, generator=g) * 39.9 - 24).half()


def _int8_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [rows, 64] holding every code -127..127 several times, scales [rows, 1] float16,
    and the oracle's exact float64 products [rows, 64]."""
    g = torch.Generator().manual_seed(seed)
    all_codes = torch.arange(-127, 128, dtype=torch.int8)
    codes = torch.cat([all_codes[torch.randperm(255, generator=g)] for _ in range(8)])[: 31 * HEAD_DIM]
    codes = codes.view(31, HEAD_DIM)
    scales = _random_scales(31, seed).view(31, 1)
    return codes, scales, codes.double() * scales.double()


def _int4_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """packed codes [rows, 32] holding every byte 0..255 (every pair of 4-bit codes), scales
    [rows, 2] float16 (step s, minimum m), and the oracle: q * s + m rounded once to float32."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.cat([torch.randperm(256, generator=g) for _ in range(4)]).to(torch.uint8).view(32, 32)
    s = _random_scales(32, seed).view(32, 1)
    m = (torch.randn(32, 1, generator=g) * torch.exp2(torch.randint(-10, 14, (32, 1), generator=g))).half()
    q = torch.empty(32, HEAD_DIM, dtype=torch.float64)  # channel 2j in byte j's low nibble, 2j + 1 high
    q[:, 0::2], q[:, 1::2] = packed & 15, packed >> 4
    exact = (q * s.double() + m.double()).float().double()  # q * s and the sum are exact in float64
    return packed, torch.cat((s, m), dim=-1), exact


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "direct"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_dequantize_equals_the_exact_value_rounded_once_with_and_without_scratch(
    kv_dtype: str, dtype: torch.dtype, staged: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`staged`: the CPU's float32 buffer and one cast; `direct`: the GPUs' one mixed-dtype kernel
    per step (run here on the CPU through the module switch): both must give the oracle's bits."""
    if not staged:
        monkeypatch.setattr(quant_module, "STAGED_DEVICE_TYPES", frozenset())
    q = KVQuantizer(kv_dtype, HEAD_DIM)
    assert q.staged_on(torch.device("cpu")) is staged
    for seed in range(3):
        codes, scales, exact = (_int8_case if kv_dtype == "int8" else _int4_case)(seed)
        want = exact.to(dtype)  # float64 -> dtype: one rounding of the exact value
        plain = q.dequantize(codes, scales, dtype)
        scratch = torch.full((codes.shape[0], HEAD_DIM), float("nan"))  # stale contents must not matter
        reused = q.dequantize(codes, scales, dtype, scratch)
        from_f32_scales = q.dequantize(codes, scales.float(), dtype, scratch)
        for got in (plain, reused, from_f32_scales):
            assert got.dtype == dtype and got.shape == want.shape
            assert torch.equal(_bits(got), _bits(want)), (seed, (got.double() - want.double()).abs().max())
        # The result is fresh memory: never the scratch, never the codes.
        assert reused.data_ptr() != scratch.data_ptr() or dtype == torch.float32
        if dtype == torch.float32 or not staged:  # no float32 intermediate to reuse: scratch left alone
            assert scratch.isnan().all()


@pytest.mark.parametrize("group_bytes", [None, 2 * 16384, 1], ids=["all-layers", "groups-of-2", "per-layer"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kv_dtype", "fused", "chunk_bytes", "staged"), [
    ("int8", False, None, True), ("int4", False, None, True), ("int4", True, None, True),
    ("int4", True, 5 * 256, True), ("int8", False, None, False), ("int4", False, None, False),
])  # fmt: skip
def test_pool_gather_equals_the_oracle_bit_for_bit_and_layers_do_not_share_memory(
    kv_dtype: str,
    fused: bool,
    chunk_bytes: int | None,
    staged: bool,
    dtype: torch.dtype,
    group_bytes: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stored bits written straight into a pool (every code in every layer, K and V), gathered in a
    scrambled block order: each layer's K and V are the oracle's values, in fresh memory, and a
    second gather (which reuses no buffer of the first) leaves the first result unchanged. int4
    on CPU goes through the fused kernel or the plain ops (both must give the oracle's bits), the
    fused one's half precision cast in one chunk or in chunks of 5 rows (the last one short); the
    plain ops staged in float32 (CPU) or direct (the GPUs' arithmetic, run here on the CPU); the
    3 layers dequantised in one step, in steps of 2 then 1 (a layer's float32 values are 16,384
    bytes here), or one at a time. Layers of a step share an allocation, never memory."""
    monkeypatch.setattr(quant_module, "FUSED_INT4", fused)
    if group_bytes is not None:
        monkeypatch.setattr(pool_module, "GATHER_GROUP_BYTES", group_bytes)
    if not staged:
        monkeypatch.setattr(quant_module, "STAGED_DEVICE_TYPES", frozenset())
    if chunk_bytes is not None:
        monkeypatch.setattr(quant_module, "FUSED_CHUNK_BYTES", chunk_bytes)
    spec = KVSpec(num_layers=3, num_kv_heads=2, head_dim=HEAD_DIM, dtype=dtype)
    q = KVQuantizer(kv_dtype, HEAD_DIM)
    bs, n = 4, 6
    pool = KVPool(spec, num_blocks=8, block_size=bs, quantizer=q)
    assert pool.layer_group(4 * bs) == {None: 3, 2 * 16384: 2, 1: 1}[group_bytes]  # 4 blocks gathered below
    lead = (n, spec.num_layers, 2, spec.num_kv_heads, bs)
    rows = n * spec.num_layers * 2 * spec.num_kv_heads * bs
    codes, scales, exact = [], [], []
    seed = 0
    while sum(c.shape[0] for c in codes) < rows:
        c, s, e = (_int8_case if kv_dtype == "int8" else _int4_case)(seed)
        codes.append(c), scales.append(s), exact.append(e)
        seed += 1
    c = torch.cat(codes)[:rows].view(*lead, q.code_dim)
    s = torch.cat(scales)[:rows].view(*lead, q.scale_dim)
    e = torch.cat(exact)[:rows].view(*lead, HEAD_DIM)
    c, s = c.view(torch.uint8), s.view(torch.uint8)
    if kv_dtype == "int4":  # read_blocks' layout: per token its codes, then its (s, m)
        blocks = torch.cat((c, s), dim=-1)
    else:  # per block of a head: its tokens' codes, then their scales
        blocks = torch.cat((c.flatten(-2), s.flatten(-2)), dim=-1).view(*lead, q.row_bytes)
    block_ids = [5, 0, 7, 2, 1, 6]
    pool.write_blocks(block_ids, blocks)
    order = [2, 0, 5, 1]  # gather a subset, out of order
    first = pool.gather([block_ids[i] for i in order])
    want = e[order].to(dtype)  # [4, L, 2, H, bs, D]
    want = want.permute(1, 2, 3, 0, 4, 5).reshape(spec.num_layers, 2, spec.num_kv_heads, len(order) * bs, HEAD_DIM)
    kept = [(k.clone(), v.clone()) for k, v in first]
    second = pool.gather([block_ids[i] for i in order])
    spans = []  # [first byte, past the last) of every result of both gathers
    for layer, ((k, v), (k2, v2)) in enumerate(zip(first, second, strict=True)):
        for which, out in ((0, k), (1, v)):
            assert out.shape == (1, spec.num_kv_heads, len(order) * bs, HEAD_DIM) and out.dtype == dtype
            assert out.is_contiguous()
            assert torch.equal(_bits(out[0]), _bits(want[layer, which])), (layer, which)
        assert torch.equal(_bits(k), _bits(kept[layer][0])) and torch.equal(_bits(v), _bits(kept[layer][1]))
        assert torch.equal(_bits(k2), _bits(k)) and torch.equal(_bits(v2), _bits(v))
        spans += [(x.data_ptr(), x.data_ptr() + x.numel() * x.element_size()) for x in (k, v, k2, v2)]
    spans.sort()
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))  # no shared bytes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
@pytest.mark.parametrize("group", [None, 16])
def test_quantize_with_scratch_gives_the_same_bits_and_leaves_the_input_alone(
    kv_dtype: str, dtype: torch.dtype, group: int | None
) -> None:
    """The pool's write passes a reused float32 scratch; codes and scales must not depend on it
    (stale contents included), and a non-contiguous input view must not be written."""
    q = KVQuantizer(kv_dtype, HEAD_DIM, group)
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(3, 40, HEAD_DIM, generator=g) * torch.logspace(-4, 4, HEAD_DIM)).to(dtype)
    base[:, 0] = 0.0  # a zero token: range 0
    base[:, 1] = -base[:, 1].abs()  # an all-negative token: the int8 scale comes from the minimum
    x = base[:, 4:36].reshape(3, 2, 16, HEAD_DIM)  # the pool's [H, n, bs, D] view of a token range
    before = x.clone()
    codes, scales = q.quantize(x)
    scratch = torch.full((3, 2, 16, HEAD_DIM), float("nan"))
    codes2, scales2 = q.quantize(x, scratch)
    assert torch.equal(codes, codes2) and torch.equal(_bits(scales), _bits(scales2))
    assert torch.equal(_bits(x), _bits(before))
    # And the codes are what they claim: the reference dequantisation is within half a step.
    out = q.dequantize(codes2, scales2, torch.float32)
    err = (out - x.float()).abs().view(3, 2, 16, q.num_groups, q.group).amax(-1)
    step = scales2.float().view(3, 2, 16, q.num_groups, -1)[..., 0]
    assert (err <= 0.5 * step * (1 + 2**-9) + 1e-30).all()


def test_a_wrong_scratch_is_refused_by_name() -> None:
    """A scratch of another dtype or shape would silently change the codes (float64 division) or
    fail deep inside a kernel: both entry points refuse it, naming it."""
    q = KVQuantizer("int8", HEAD_DIM)
    x = torch.randn(2, 5, HEAD_DIM)
    codes, scales = q.quantize(x)
    for bad in (
        torch.empty(2, 5, HEAD_DIM, dtype=torch.float64),
        torch.empty(2, 6, HEAD_DIM),
        torch.empty(HEAD_DIM, 5, 2).permute(2, 1, 0),
    ):
        with pytest.raises(ValueError, match="scratch"):
            q.quantize(x, bad)
        with pytest.raises(ValueError, match="scratch"):
            q.dequantize(codes, scales, torch.float16, bad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_quantize_may_take_its_input_as_scratch(kv_dtype: str, dtype: torch.dtype) -> None:
    """The pool quantises a float32 copy of the KV in place (`scratch` is `x`): same bits as with
    a separate scratch, whatever the dtype the copy was made from."""
    q = KVQuantizer(kv_dtype, HEAD_DIM)
    x = (torch.randn(3, 5, HEAD_DIM, generator=torch.Generator().manual_seed(1)) * 7).to(dtype).float()
    want = q.quantize(x, torch.empty_like(x))
    got = q.quantize(x.clone(), None)
    own = x.clone()
    in_place = q.quantize(own, own)
    for a, b in ((want, got), (want, in_place)):
        assert torch.equal(a[0], b[0]) and torch.equal(_bits(a[1]), _bits(b[1]))


@pytest.mark.parametrize(
    "group_bytes", [None, 2 * 12288, 12288, 1], ids=["all-layers", "groups-of-2", "groups-of-1", "k-then-v"]
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_pool_write_in_layer_groups_stores_each_layers_own_encoding(
    kv_dtype: str, dtype: torch.dtype, group_bytes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quantising write handles layers in groups (one float32 buffer, one encode per group), or
    K then V of each layer when one layer's float32 K and V exceed the budget: each written block
    holds exactly `encode` of its own layer's K / V, partial last group included, tokens taken
    from `start` on, and blocks not written stay zero."""
    if group_bytes is not None:
        monkeypatch.setattr(pool_module, "GATHER_GROUP_BYTES", group_bytes)
    spec = KVSpec(num_layers=3, num_kv_heads=2, head_dim=HEAD_DIM, dtype=dtype)
    q = KVQuantizer(kv_dtype, HEAD_DIM)
    bs, start, block_ids = 4, 4, [6, 1, 3]  # 12 tokens of float32 per layer: 12,288 bytes
    pool = KVPool(spec, num_blocks=8, block_size=bs, quantizer=q)
    assert pool.layer_group(len(block_ids) * bs) == {None: 3, 2 * 12288: 2, 12288: 1, 1: 1}[group_bytes]
    g = torch.Generator().manual_seed(2)
    t = start + len(block_ids) * bs + 3  # tokens before `start` and after the last block are not stored
    kv = [tuple((torch.randn(1, 2, t, HEAD_DIM, generator=g) * 5).to(dtype) for _ in range(2)) for _ in range(3)]
    pool.write(block_ids, kv, start)
    stored = pool.read_blocks(list(range(8)))  # [8, L, 2, H, bs, row_bytes]
    for layer in range(3):
        for which in range(2):
            x = kv[layer][which][0, :, start : start + len(block_ids) * bs]  # [H, n * bs, D]
            want = q.encode(x.reshape(2, len(block_ids), bs, HEAD_DIM))  # [H, n, bs, W]
            for i, b in enumerate(block_ids):
                assert torch.equal(stored[b, layer, which], want[:, i]), (layer, which, b)
    untouched = [b for b in range(8) if b not in block_ids]
    assert not stored[untouched].any()
