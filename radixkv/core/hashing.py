"""Structured namespace keys and the xxh3 block-hash chain.

A block's hash is `xxh3_64(tokens of the block, seed=hash of the parent block)`; the chain
starts from the hash of the namespace key. It is a stable identifier for later tiers and event
streams, never a substitute for comparing token ids.
"""

from __future__ import annotations

from array import array

import xxhash


def namespace_key(namespace: object, name: str = "namespace") -> bytes:
    """Encode a namespace as tagged, length-prefixed bytes; distinct namespaces never collide.

    `("a", "b")`, `"a|b"`, `1`, `True` and `"1"` all give different keys.
    """
    out = bytearray()
    _encode(namespace, out, name)
    return bytes(out)


def _encode(value: object, out: bytearray, name: str) -> None:
    if value is None:
        out += b"N"
    elif isinstance(value, bool):
        out += b"T" if value else b"F"
    elif isinstance(value, int):
        text = str(value).encode()
        out += b"I" + len(text).to_bytes(4, "little") + text
    elif isinstance(value, str):
        data = value.encode("utf-8")
        out += b"S" + len(data).to_bytes(4, "little") + data
    elif isinstance(value, bytes):
        out += b"B" + len(value).to_bytes(4, "little") + value
    elif isinstance(value, tuple):
        out += b"U" + len(value).to_bytes(4, "little")
        for item in value:
            _encode(item, out, name)
    else:
        raise TypeError(f"{name} must be None, str, bytes, int or a tuple of those, got {type(value).__name__}")


def root_hash(ns_key: bytes) -> int:
    """The seed of a namespace's hash chain."""
    return xxhash.xxh3_64_intdigest(ns_key)


def chain_hashes(parent_hash: int, packed: bytes | memoryview, block_size: int) -> list[int]:
    """Hashes of the whole blocks in `packed` (token ids as uint64 bytes), each seeded by the
    hash before it. Cost: one xxh3 call per block (the chain makes it sequential)."""
    step = 8 * block_size
    data = bytes(packed)
    digest = xxhash.xxh3_64_intdigest
    hashes: list[int] = []
    h = parent_hash
    for start in range(0, len(data) - step + 1, step):
        h = digest(data[start : start + step], h)
        hashes.append(h)
    return hashes


def pack_tokens(tokens: list[int]) -> bytes:
    """Token ids as the uint64 bytes that block hashes are taken over."""
    return array("Q", tokens).tobytes()
