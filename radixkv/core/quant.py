"""Quantised KV: how int8 / int4 codes and their scales represent K and V, and the math both ways."""

from __future__ import annotations

import torch

from .spec import KVSpec

__all__ = ["KV_DTYPES", "KVQuantizer", "kv_bytes_per_token", "make_quantizer"]

KV_DTYPES: tuple[str, ...] = ("int8", "int4")
"""The `kv_dtype` values that store blocks quantised; None (the default) stores them exactly."""

# torch's fused 4-bit embedding-bag kernel (FBGEMM on x86, a portable loop elsewhere): rows of
# `[packed codes, float16 scale, float16 bias]`, each selected row dequantised to float32 as
# `code * scale + bias` in one pass. A module switch so tests can compare it with the plain path.
_FUSED_OP = getattr(torch.ops.quantized, "embedding_bag_4bit_rowwise_offsets", None)
FUSED_INT4 = _FUSED_OP is not None
# Half precision outputs are cast from the kernel's float32 in chunks of this many bytes, so each
# chunk is still in cache when it is cast.
FUSED_CHUNK_BYTES = 2 << 20
# Devices whose dequantisation computes in float32 buffers and casts once at the end (CPU: there
# same-dtype in-place kernels are vectorised and mixed-dtype ones measured 3-15x slower); every
# other device (GPUs) runs one mixed-dtype kernel per step that computes in float32 and rounds once
# on store. Both give the same bits. A module switch so the CPU tests run the GPU arithmetic too.
STAGED_DEVICE_TYPES: frozenset[str] = frozenset({"cpu"})

SCALE_DTYPE = torch.float16
_FP16_MAX = 65504.0
# Scales are rounded up to float16 by at most one part in 2**11: widening them by 2**-10 first
# guarantees the stored scale still covers the group's range, so no code is ever clamped.
_WIDEN = 1.0 + 2.0**-10


class KVQuantizer:
    """Codes and float16 scales for one token's K (or V) of one head, in groups along head_dim.

    Each token, head and group of `group` channels (default: the whole head_dim) gets its own
    scale, so an outlier token or head costs only its own precision, and blocks stay independent
    (a block's codes never depend on another block: blocks are shared between prefixes).

    - "int8": symmetric. code q in [-127, 127], x ~ q * s, s = absmax / 127. One float16 per group.
    - "int4": asymmetric. code q in [0, 15], x ~ q * s + m, m = min, s = (max - min) / 15. Two
      float16 per group (s, m). Two codes per byte: byte j of a token-head holds channel 2j in its
      low nibble and channel 2j + 1 in its high nibble.
    Stored form (`encode` / `split`): `row_bytes` bytes per token-head, `[..., block_size,
    row_bytes]` uint8 for a block of one head, scales float16 little endian. int4: each token's
    row is its codes then its scales; with one group per head that is `[codes | s | m]`, the row
    layout torch's fused 4-bit embedding-bag kernel reads (a CPU gather selects and dequantises
    in one pass, see KVPool.gather). int8: the block's codes, all its tokens in order, then all
    its scales, so that a block's codes are one contiguous run for the conversion to float.
    Error bound per element: |x - dequantize(quantize(x))| <= s / 2 (+ rounding of the output
    dtype), s being the element's group step: absmax / 127 (int8), or for int4
    (max - min + |min| * 2**-9) / 15, the last term from storing the minimum in float16.
    Values beyond the float16 range (|x| > 65504 for int4, > 65504 * 127 for int8) are
    clipped; KV of trained models stays far inside it.
    Costs: quantize about ten elementwise tensor ops, dequantize two to five; no Python loop over
    blocks, tokens or heads.
    """

    def __init__(self, kv_dtype: str, head_dim: int, group: int | None = None) -> None:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be None or one of {', '.join(map(repr, KV_DTYPES))}, got {kv_dtype!r}")
        group = head_dim if group is None else group
        if kv_dtype == "int4" and head_dim % 2:
            raise ValueError(f"kv_dtype='int4' packs two channels per byte and needs an even head_dim, got {head_dim}")
        if isinstance(group, bool) or not isinstance(group, int) or group < 1 or head_dim % group:
            raise ValueError(f"group must be a positive int dividing head_dim {head_dim}, got {group!r}")
        self.kv_dtype = kv_dtype
        self.head_dim = head_dim
        self.group = group
        self.num_groups = head_dim // group
        self.bits = 8 if kv_dtype == "int8" else 4
        self.symmetric = kv_dtype == "int8"
        self.code_dtype = torch.int8 if self.symmetric else torch.uint8
        self.code_dim = head_dim if self.bits == 8 else head_dim // 2
        self.scale_dim = self.num_groups if self.symmetric else 2 * self.num_groups  # float16 per token-head

    @property
    def row_bytes(self) -> int:
        """Bytes of one token-head's stored row: codes, then float16 scales."""
        return self.code_dim + 2 * self.scale_dim

    @property
    def bytes_per_element(self) -> float:
        """Storage per K or V element, scales included."""
        return (self.code_dim + 2 * self.scale_dim) / self.head_dim

    def __repr__(self) -> str:
        return f"KVQuantizer({self.kv_dtype!r}, head_dim={self.head_dim}, group={self.group})"

    def quantize(self, x: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`x` [..., head_dim] (any float dtype) -> (codes [..., code_dim], scales [..., scale_dim] float16).

        `scratch`, a contiguous float32 tensor of x's shape, holds the one full-size float32
        temporary (the float32 copy of half precision input, then x / scale): reused across calls,
        it saves two allocations per call; its contents are overwritten. It may be `x` itself (a
        float32 copy the caller no longer needs), which is then divided in place.
        """
        shape = x.shape[:-1]
        _check_scratch(scratch, x.shape)
        # Half precision input: its float32 copy goes to scratch. float32 input: no copy, g aliases x
        # (never written, unless x is the scratch).
        in_scratch = scratch is not None and x.dtype != torch.float32
        g = scratch.view(x.shape).copy_(x) if in_scratch else x.float()
        g = g.reshape(*shape, self.num_groups, self.group)  # [..., G, group]
        # Separate amax / amin reductions: on CPU each is one vectorised pass, several times faster
        # than abs().amax() (a full-size temporary) or aminmax(); max |x| = max(max x, -min x) exactly.
        hi = g.amax(dim=-1, keepdim=True)  # [..., G, 1]
        lo = g.amin(dim=-1, keepdim=True)
        tmp = None if scratch is None else scratch.view(g.shape)
        if self.symmetric:
            absmax = torch.maximum(hi, lo.neg_())  # [..., G, 1]
            s = (absmax * (_WIDEN / 127)).clamp_(min=2.0**-24, max=_FP16_MAX).to(SCALE_DTYPE)
            q = torch.div(g, s.float(), out=tmp).round_().clamp_(-127, 127).to(torch.int8)
            return q.reshape(*shape, self.head_dim), s.reshape(*shape, self.num_groups)
        # Round the minimum down so that every code is >= 0 after float16 rounding.
        m = (lo - lo.abs() * 2.0**-10).clamp_(-_FP16_MAX, _FP16_MAX).to(SCALE_DTYPE)
        mf = m.float()
        s = ((hi - mf) * (_WIDEN / 15)).clamp_(min=2.0**-24, max=_FP16_MAX).to(SCALE_DTYPE)
        t = torch.sub(g, mf, out=tmp).div_(s.float()).round_().clamp_(0, 15)
        # Pairs of channels as one int16, channel 2j in the low byte (every torch device is little
        # endian): low | high << 4 is v | v >> 4 in the low byte, one pass instead of two strided.
        v = t.to(torch.uint8).reshape(*shape, self.head_dim).view(torch.int16)  # [..., head_dim / 2]
        packed = (v | (v >> 4)).bitwise_and_(255).to(torch.uint8)
        scales = torch.cat((s, m), dim=-1).reshape(*shape, 2 * self.num_groups)  # (s, m) per group
        return packed, scales

    def encode(self, x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """`x` [..., block_size, head_dim] -> its stored form, uint8 [..., block_size, row_bytes]
        (see the class docstring; `scratch` as in `quantize`)."""
        codes, scales = self.quantize(x, scratch)  # [..., bs, code_dim], [..., bs, scale_dim]
        codes, scales = codes.view(torch.uint8), scales.view(torch.uint8)
        if not self.symmetric:
            return torch.cat((codes, scales), dim=-1)
        lead = x.shape[:-1]  # [..., bs]
        return torch.cat((codes.flatten(-2), scales.flatten(-2)), dim=-1).view(*lead, self.row_bytes)

    def split(self, stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored form uint8 [..., block_size, row_bytes] (contiguous in its last two dims) -> views
        (codes [..., block_size, code_dim] in `code_dtype`, scale bytes [..., block_size, 2 * scale_dim]
        uint8). The scale bytes become float16 once copied out (`.contiguous().view(torch.float16)`):
        a float16 view needs them aligned."""
        if not self.symmetric:
            return stored[..., : self.code_dim].view(self.code_dtype), stored[..., self.code_dim :]
        bs = stored.shape[-2]
        flat = stored.flatten(-2)  # [..., bs * row_bytes], a view
        codes = flat[..., : bs * self.code_dim].unflatten(-1, (bs, self.code_dim))
        return codes.view(self.code_dtype), flat[..., bs * self.code_dim :].unflatten(-1, (bs, 2 * self.scale_dim))

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Stored form uint8 [..., block_size, row_bytes] -> [..., block_size, head_dim] in `dtype`,
        fresh memory: the values a gather of those blocks returns."""
        if self.fused_on(stored.device):
            rows = stored.reshape(-1, self.row_bytes)  # every token-head row, in order
            every = torch.arange(rows.shape[0], device=rows.device)
            return self.dequantize_rows(rows, every, dtype).view(*stored.shape[:-1], self.head_dim)
        codes, scale_bytes = self.split(stored)
        return self.dequantize(codes, scale_bytes.contiguous().view(SCALE_DTYPE), dtype)

    def fused_on(self, device: torch.device) -> bool:
        """Whether `dequantize_rows` serves this quantizer on `device` (int4, one group per head, CPU)."""
        return device.type == "cpu" and not self.symmetric and self.num_groups == 1 and FUSED_INT4

    def dequantize_rows(self, stored: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Fused select and dequantise (see `fused_on`): `stored` uint8 `[N, row_bytes]` int4 rows,
        `rows` `[R]` indices into it -> `[R, head_dim]` in `dtype`, fresh memory."""
        assert _FUSED_OP is not None
        r = rows.numel()
        offsets = torch.arange(r, device=rows.device)  # one row per bag: the bag's sum is the row
        if dtype == torch.float32:
            return _FUSED_OP(stored, rows, offsets)  # [R, head_dim] float32, fresh
        # The kernel writes float32: cast it chunk by chunk (FUSED_CHUNK_BYTES).
        out = torch.empty((r, self.head_dim), dtype=dtype, device=rows.device)
        chunk = max(1, FUSED_CHUNK_BYTES // (4 * self.head_dim))
        for a in range(0, r, chunk):
            b = min(r, a + chunk)
            out[a:b].copy_(_FUSED_OP(stored, rows[a:b], offsets[: b - a]))
        return out

    def dequantize(
        self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(codes [..., code_dim], scales [..., scale_dim]) -> [..., head_dim] in `dtype`, fresh memory.
        `codes` may be a strided view (of stored rows, say).

        `scales` may already be float32 (the pool converts every layer's at once). `scratch`, a
        float32 tensor of the output's shape, is where half precision outputs on CPU are computed
        before their one cast (reused across calls, it saves a float32 allocation per call); it is
        ignored where no float32 intermediate exists. The result never aliases `scratch`.
        """
        shape = codes.shape[:-1]
        _check_scratch(scratch, (*shape, self.head_dim))
        if not self.staged_on(codes.device):
            return self._dequantize_direct(codes, scales, dtype)
        # CPU. Convert first, then scale in place: same-dtype in-place kernels are vectorised on CPU,
        # mixed-dtype ones (int x float with promotion, addcmul with a broadcast input) measured
        # 3-15x slower. int -> float16 conversion and float16 arithmetic are slower than float32
        # there too, so half precision is computed in float32 and cast once at the end: every
        # product code * scale is exact in float32 (8 x 11 significant bits), so the result is the
        # code times the scale rounded once to `dtype` (int4: (q * s + m) rounded once to float32, then
        # to `dtype`).
        sc = scales.to(torch.float32)
        ints = self._unpacked(codes)  # [..., head_dim] integer codes, channels in order
        out = ints.to(torch.float32) if scratch is None or dtype == torch.float32 else scratch.copy_(ints)
        if self.symmetric:
            if self.num_groups == 1:
                out.mul_(sc)
            else:
                out.view(*shape, self.num_groups, self.group).mul_(sc.unsqueeze(-1))
            return out.to(dtype)
        sm = sc.view(*shape, self.num_groups, 2)
        s, m = sm[..., 0:1], sm[..., 1:2]  # [..., G, 1]
        if self.num_groups == 1:
            out.mul_(s.squeeze(-1)).add_(m.squeeze(-1))
        else:
            out.view(*shape, self.num_groups, self.group).mul_(s).add_(m)
        return out.to(dtype)

    def staged_on(self, device: torch.device) -> bool:
        """Whether `dequantize` computes in a float32 buffer on `device` (and so uses `scratch`),
        rather than in one mixed-dtype kernel per step (see STAGED_DEVICE_TYPES)."""
        return device.type in STAGED_DEVICE_TYPES

    def _unpacked(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., code_dim] -> [..., head_dim] integer codes, channels in order (int4: a fresh
        uint8 tensor of both nibbles; int8: `codes` itself)."""
        if self.symmetric:
            return codes
        return torch.stack((codes & 15, codes >> 4), dim=-1).view(*codes.shape[:-1], self.head_dim)

    def _dequantize_direct(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`dequantize` off the staged devices: one kernel that reads integer codes and float32
        scales, computes q * s (+ m) in float32 (exact product, one rounding of the sum) and
        rounds once more to `dtype` on store: the staged path's bits without a float32 buffer,
        and no float32 -> bfloat16 rounding of the scales."""
        shape, g = codes.shape[:-1], (self.num_groups, self.group)
        out = torch.empty((*shape, self.head_dim), dtype=dtype, device=codes.device)
        grouped = out.view(*shape, *g)  # [..., G, group]
        sc = scales.to(torch.float32).view(*shape, self.num_groups, self.scale_dim // self.num_groups)
        ints = self._unpacked(codes).unflatten(-1, g)  # [..., G, group]
        if self.symmetric:
            return torch.mul(ints, sc, out=grouped).view_as(out)
        return torch.addcmul(sc[..., 1:2], ints, sc[..., 0:1], out=grouped).view_as(out)


def _check_scratch(scratch: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if scratch is not None and (
        scratch.dtype != torch.float32 or scratch.shape != shape or not scratch.is_contiguous()
    ):
        raise ValueError(
            f"scratch must be a contiguous float32 tensor of shape {tuple(shape)}, "
            f"got {scratch.dtype} {tuple(scratch.shape)}{'' if scratch.is_contiguous() else ' (not contiguous)'}"
        )


def make_quantizer(kv_dtype: object, spec: KVSpec) -> KVQuantizer | None:
    """The quantizer for `kv_dtype` (None: exact storage). Raises TypeError / ValueError naming kv_dtype."""
    if kv_dtype is None:
        return None
    if not isinstance(kv_dtype, str):
        raise TypeError(f"kv_dtype must be None or a str ({', '.join(KV_DTYPES)}), got {type(kv_dtype).__name__}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be None or one of {', '.join(map(repr, KV_DTYPES))}, got {kv_dtype!r}")
    if not spec.dtype.is_floating_point:
        raise ValueError(f"kv_dtype={kv_dtype!r} quantises floating point KV; the spec's dtype is {spec.dtype}")
    return KVQuantizer(kv_dtype, spec.head_dim)


def kv_bytes_per_token(spec: KVSpec, quantizer: KVQuantizer | None) -> int:
    """Pool bytes one token takes: `spec.bytes_per_token` exact, codes + scales when quantised."""
    if quantizer is None:
        return spec.bytes_per_token
    return 2 * spec.num_layers * spec.num_kv_heads * (quantizer.code_dim + 2 * quantizer.scale_dim)
