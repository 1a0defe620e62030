"""The shape of one token's KV: what the pool is sized and validated against."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVSpec:
    """Shape, dtype and device of the KV of one token across all layers.

    K and V of every layer are `[num_kv_heads, head_dim]` per token. Models whose K and V
    differ in shape, or whose cache holds non-KV state, are not described by a KVSpec.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float16
    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVSpec.{name} must be a positive int, got {value!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"KVSpec.dtype must be a torch.dtype, got {self.dtype!r}")
        if not (self.dtype.is_floating_point or self.dtype in (torch.int8, torch.uint8)):
            raise ValueError(f"KVSpec.dtype must be a floating point or 8-bit dtype, got {self.dtype}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"KVSpec.device is not a valid torch device: {self.device!r}") from exc
        # Normalise "cuda" to "cuda:0" so that tensors compare equal by device.
        if device.type != "cpu" and device.index is None:
            device = torch.device(device.type, torch.device(device.type, 0).index or 0)
        object.__setattr__(self, "device", device)

    @property
    def element_size(self) -> int:
        """Bytes per element of `dtype`."""
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        """2 (K and V) x layers x kv_heads x head_dim x element size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_size
