"""A model's fingerprint for the shared tier: what every replica with the same KV computes alike."""

from __future__ import annotations

import json
from typing import Any

import torch
import xxhash

# Config fields that name where a model came from or which library wrote it, not what it computes.
_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset"}


def model_fingerprint(model: Any) -> str:
    """`radixkv-hf:<xxh3-128 hex>` over the model class, its config (minus path and library
    version), and every parameter and buffer: name, dtype, shape and bytes, in name order.

    Equal in every process and on every machine that loaded the same weights in the same dtype;
    any changed weight, dtype, config value or adapter layer (PEFT weights are parameters too)
    gives another. Cost: one pass over the weights (copied to the CPU a tensor at a time):
    about a second per few GB.
    """
    h = xxhash.xxh3_128()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\n".encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        fields = {k: v for k, v in config.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
        h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update({f"buffer:{n}": b for n, b in model.named_buffers(remove_duplicate=False)})
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"\n{name}|{t.dtype!s}|{tuple(t.shape)}|".encode())
        if t.numel():
            flat = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
            h.update(memoryview(flat.numpy()))
    return f"radixkv-hf:{h.hexdigest()}"
