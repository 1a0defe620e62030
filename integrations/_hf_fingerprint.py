"""A model's identity for KV kept beyond one process: config, dtype and a checksum of the weights."""

from __future__ import annotations

import ctypes
from typing import Any

import xxhash


def model_fingerprint(model: Any) -> bytes:
    """16 bytes (xxh3-128) over the model class, its config (as JSON), and every parameter's and
    buffer's name, shape, dtype and bytes. Equal only for the same architecture with the same
    weights, so KV stored by one model (or by the same model before its weights changed) is never
    served to another, also from a disk tier after a restart. Cost: one pass over the weights
    (~10 GB/s on the CPU; CUDA tensors are copied to the host one at a time first).
    """
    h = xxhash.xxh3_128()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\0".encode())
    config = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    h.update((to_json(use_diff=False) if callable(to_json) else repr(config)).encode())
    named = [*model.named_parameters(), *model.named_buffers()] if hasattr(model, "named_parameters") else []
    for name, t in named:
        t = t.detach()
        h.update(f"\0{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes:
            # A zero-copy view of the tensor's bytes for the hash (no numpy needed).
            h.update((ctypes.c_char * nbytes).from_address(t.data_ptr()))
    return h.digest()
