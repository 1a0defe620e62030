"""The self-describing header of a run of KV blocks, shared by the disk and Redis tiers.

Layout (little endian): a fixed part (magic, format version, the spec fingerprint: layers, KV
heads, head_dim, block size, dtype length; namespace length, block count, token width, the
chain hash before the run, bytes per block), then the stored dtype name (the model dtype, with
the kv_dtype appended for quantised KV: `float16-int8`), the namespace key, the token
ids (uint32 when they all fit, else uint64), the block hashes, one xxh3-64 checksum per block's
payload, and an xxh3-64 checksum of everything before it. The payload follows: one
`[L, 2, H, block_size, D]` block after another (quantised KV: `[L, 2, H, block_size, W]` bytes,
each token-head's codes then its float16 scales: KVQuantizer.encode). A disk file is one such run; a Redis value is
a run of one block.

Decoding checks only what the bytes say about themselves (magic, version, sizes, the header
checksum, the spec); the caller compares namespace, hashes and tokens with its query, since
only it knows them.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from typing import NamedTuple

import torch
import xxhash

from ..core.quant import KVQuantizer
from ..core.spec import KVSpec

MAGIC = b"RKVD"
# 2: int4 codes pack channels 2j and 2j + 1 into byte j (1 packed j and j + head_dim / 2).
FORMAT_VERSION = 2
# magic, version, num_layers, num_kv_heads, head_dim, block_size, dtype length, namespace length,
# blocks, token width (4 or 8 bytes), parent hash, bytes per block.
FIXED = struct.Struct("<4sIIIIIIIIIQQ")
_MAX_DTYPE_LEN = 64


@dataclass(frozen=True)
class SpecFingerprint:
    """What stored KV must agree with to be served: the KV shape, dtype, block size and, for a
    quantised pool, its kv_dtype and group (the stored codes mean nothing under another one).

    `stored_dtype` is the name written into headers and keys: the model dtype alone for exact
    KV (`bfloat16`, as always), `bfloat16-int8` / `bfloat16-int4` (plus `g<group>` for groups
    narrower than head_dim) for quantised KV, so exact and quantised runs never match.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    kv_dtype: str | None = None
    group: int | None = None

    @classmethod
    def of(cls, spec: KVSpec, block_size: int, quantizer: KVQuantizer | None = None) -> SpecFingerprint:
        dtype = str(spec.dtype).removeprefix("torch.")
        if quantizer is None:
            return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, dtype, block_size)
        return cls(
            spec.num_layers, spec.num_kv_heads, spec.head_dim, dtype, block_size, quantizer.kv_dtype, quantizer.group
        )

    @property
    def stored_dtype(self) -> str:
        if self.kv_dtype is None:
            return self.dtype
        group = "" if self.group in (None, self.head_dim) else f"g{self.group}"
        return f"{self.dtype}-{self.kv_dtype}{group}"

    @property
    def block_width(self) -> int:
        """Elements of the last block dim: head_dim exact; quantised, the bytes of one token-head's
        codes followed by its float16 scales (see KVPool.read_blocks)."""
        if self.kv_dtype is None:
            return self.head_dim
        q = KVQuantizer(self.kv_dtype, self.head_dim, self.group)
        return q.code_dim + 2 * q.scale_dim

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """One block of KV: `[L, 2 (K, V), H, block_size, D]` exact, `[..., block_width]` bytes quantised."""
        return (self.num_layers, 2, self.num_kv_heads, self.block_size, self.block_width)

    def block_bytes(self, element_size: int) -> int:
        """Bytes of one stored block (`element_size`: of the model dtype; quantised blocks are bytes)."""
        n = 2 * self.num_layers * self.num_kv_heads * self.block_size * self.block_width
        return n if self.kv_dtype is not None else n * element_size

    @property
    def tag(self) -> str:
        """A short, stable text form for keys: `L12-H4-D64-bfloat16-b16` (`-bfloat16-int8-` quantised)."""
        return f"L{self.num_layers}-H{self.num_kv_heads}-D{self.head_dim}-{self.stored_dtype}-b{self.block_size}"


class BlockFormat(NamedTuple):
    """How the disk and Redis tiers store one pool's blocks: the fingerprint their headers and
    keys carry, the dtype of a block tensor, and one block's payload bytes."""

    fingerprint: SpecFingerprint
    dtype: torch.dtype
    block_bytes: int

    @classmethod
    def of(cls, spec: KVSpec, block_size: int, quantizer: KVQuantizer | None = None) -> BlockFormat:
        """`quantizer`: the pool's (None: exact); blocks are then stored as its codes and scales,
        in bytes, and the fingerprint names its kv_dtype so exact and quantised runs never meet."""
        fp = SpecFingerprint.of(spec, block_size, quantizer)
        return cls(fp, spec.dtype if quantizer is None else torch.uint8, fp.block_bytes(spec.element_size))


@dataclass(frozen=True)
class Header:
    """A decoded header: namespace key, chain hash before the run, block hashes, token ids,
    payload checksums, and where the payload starts."""

    ns_key: bytes
    parent_hash: int
    hashes: list[int]
    tokens: list[int]
    sums: list[int]
    payload_offset: int


def encode_header(
    fp: SpecFingerprint,
    block_bytes: int,
    ns_key: bytes,
    parent_hash: int,
    hashes: list[int],
    tokens: list[int],
    sums: list[int],
) -> bytes:
    """The header bytes of a run of `len(hashes)` blocks. Cost: O(tokens) in C."""
    width = 4 if not tokens or max(tokens) < 2**32 else 8
    dtype = fp.stored_dtype.encode()
    fixed = FIXED.pack(
        MAGIC, FORMAT_VERSION, fp.num_layers, fp.num_kv_heads, fp.head_dim, fp.block_size,
        len(dtype), len(ns_key), len(hashes), width, parent_hash, block_bytes,
    )  # fmt: skip
    body = b"".join(
        (
            fixed,
            dtype,
            ns_key,
            array("I" if width == 4 else "Q", tokens).tobytes(),
            array("Q", hashes).tobytes(),
            array("Q", sums).tobytes(),
        )
    )
    return body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")


def rest_length(fixed: bytes) -> int | str:
    """Bytes of the header after its fixed part, from the fixed part alone, or why it is unusable."""
    if len(fixed) < FIXED.size:
        return "truncated header"
    magic, version, _, _, _, bs, dlen, nlen, nblocks, width, _, _ = FIXED.unpack(fixed[: FIXED.size])
    if magic != MAGIC:
        return "not a radixkv KV run"
    if version != FORMAT_VERSION:
        return f"format version {version}, this build reads {FORMAT_VERSION}"
    if width not in (4, 8) or nblocks == 0 or dlen > _MAX_DTYPE_LEN:
        return "corrupt header"
    return dlen + nlen + nblocks * bs * width + 16 * nblocks + 8


def decode_header(data: bytes | memoryview, fp: SpecFingerprint, block_bytes: int, total_size: int) -> Header | str:
    """Parse and check a header at the start of `data` (it may hold more, e.g. the payload).

    `total_size`: the size of the whole run (file or value), checked against the header.
    Returns the Header, or a string saying why the run cannot serve (never raises on bad bytes).
    """
    rest = rest_length(bytes(data[: FIXED.size]))
    if isinstance(rest, str):
        return rest
    if len(data) < FIXED.size + rest:
        return "truncated header"
    fixed = bytes(data[: FIXED.size])
    _, _, layers, heads, dim, bs, dlen, nlen, nblocks, width, parent, run_block_bytes = FIXED.unpack(fixed)
    body = bytes(data[FIXED.size : FIXED.size + rest])
    if xxhash.xxh3_64_intdigest(fixed + body[:-8]) != int.from_bytes(body[-8:], "little"):
        return "header checksum mismatch"
    dtype = body[:dlen].decode("ascii", "replace")
    if (layers, heads, dim, bs, dtype) != (fp.num_layers, fp.num_kv_heads, fp.head_dim, fp.block_size, fp.stored_dtype):
        return f"written for another KV spec ({layers} layers, {heads} heads, dim {dim}, block {bs}, {dtype})"
    if run_block_bytes != block_bytes:
        return "block size in bytes differs"
    offset = FIXED.size + rest
    if total_size != offset + nblocks * block_bytes:
        return f"size {total_size} bytes, the header says {offset + nblocks * block_bytes}"
    pos = dlen
    ns_key = body[pos : pos + nlen]
    pos += nlen
    tokens = array("I" if width == 4 else "Q")
    tokens.frombytes(body[pos : pos + nblocks * bs * width])
    pos += nblocks * bs * width
    hashes = array("Q")
    hashes.frombytes(body[pos : pos + 8 * nblocks])
    sums = array("Q")
    sums.frombytes(body[pos + 8 * nblocks : pos + 16 * nblocks])
    return Header(ns_key, parent, hashes.tolist(), tokens.tolist(), sums.tolist(), offset)
