"""KV tensors between the prefix cache and a transformers `DynamicCache`.

Three steps, all per layer and never per token: `probe_model_kv` reads the model's KV shape
from one real forward pass; `build_past` lays gathered prefixes out as a pre-filled
`DynamicCache` (suffix-aligned, see `_hf_layout`); `row_kv` reads one row's KV back after
`generate` for insertion.

The pre-filled cache is a config-less `DynamicCache`, so every layer is a `DynamicLayer` that
keeps all tokens, sliding-window layers included: masks still apply each layer's window (by
column, which is exact for left-padded rows), and after `generate` the whole prompt and output
KV can be read back. The price is O(T) rather than O(window) cache memory on sliding layers
during the call.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, GenerationMixin
from transformers.cache_utils import DynamicLayer

from radixkv.core.pool import LayerKV
from radixkv.core.spec import KVSpec

from ._hf_layout import BatchLayout

__all__ = [
    "CACHE_KWARG",
    "LayerKV",
    "ModelKV",
    "UnsupportedKV",
    "build_past",
    "probe_model_kv",
    "row_kv",
    "weights_dtype_device",
]


def _cache_kwarg() -> str:
    """The keyword under which the installed transformers takes a cache in `generate` and `forward`.

    transformers 5.24 renamed `past_key_values` to `cache` (the old name still works there, with a
    deprecation warning, until 5.40 in `forward` and 6.0 in `generate`). Reading the generation
    API's own signature follows the installed version without comparing version strings.
    """
    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


# Detected once, at import: the name this process passes a pre-filled cache under.
CACHE_KWARG = _cache_kwarg()


class UnsupportedKV(Exception):
    """The model's cache is not one uniform per-layer [B, H, T, D] K/V; the message says why."""


@dataclass(frozen=True)
class ModelKV:
    """The pool's KVSpec plus the device of each layer's KV (they differ under device_map sharding)."""

    spec: KVSpec
    layer_devices: tuple[torch.device, ...]


def probe_model_kv(model: Any) -> ModelKV:
    """Run one 1-token forward pass and read the KV shape, dtype and devices it stores.

    Reading real tensors (not the config) catches models whose K and V differ in shape (MLA),
    whose layers differ, or whose KV dtype is not the parameters' dtype. Raises UnsupportedKV,
    also when the forward pass itself fails (e.g. a model that needs more inputs than token ids).
    Cost: one forward pass of one token.
    """
    cache = DynamicCache()
    try:
        ids = torch.zeros((1, 1), dtype=torch.long, device=model.device)
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{CACHE_KWARG: cache})
    except Exception as exc:  # e.g. a model that needs more inputs than token ids
        raise UnsupportedKV(f"a 1-token forward pass with a DynamicCache failed ({type(exc).__name__}: {exc})") from exc
    layers = cache.layers
    if not layers:
        raise UnsupportedKV("the model stored nothing in a DynamicCache")
    shapes = set()
    for i, layer in enumerate(layers):
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            raise UnsupportedKV(f"cache layer {i} is a {type(layer).__name__}, not a plain KV layer")
        k, v = layer.keys, layer.values
        if k.shape != v.shape or k.dim() != 4 or k.shape[0] != 1 or k.shape[2] != 1:
            raise UnsupportedKV(f"layer {i} stores K {tuple(k.shape)} and V {tuple(v.shape)}, not [1, H, 1, D] each")
        shapes.add((k.shape[1], k.shape[3], k.dtype, v.dtype))
    if len(shapes) != 1:
        raise UnsupportedKV(f"layers store KV of different shapes or dtypes: {sorted(map(str, shapes))}")
    ((heads, head_dim, dtype, _),) = shapes
    devices = tuple(layer.keys.device for layer in layers)
    spec = KVSpec(num_layers=len(layers), num_kv_heads=heads, head_dim=head_dim, dtype=dtype, device=devices[0])
    return ModelKV(spec=spec, layer_devices=devices)


def build_past(
    layout: BatchLayout,
    gathered: Sequence[Sequence[LayerKV] | None],
    model_kv: ModelKV,
    expand: int,
) -> DynamicCache:
    """A fresh `DynamicCache` holding columns [0, T - S) of the batch, repeated `expand` times per row.

    `gathered[i]`: per layer (K, V) `[1, H, >= reused_i, D]` from `PrefixCache.gather`, or None
    when row i reuses nothing. Row i's first `reused_i` tokens go to columns [T - S - reused_i, T - S);
    other columns are zeros (masked padding; zeros, not garbage, because 0 * NaN would leak
    through the attention product). Empty cache when T - S == 0. Cost: one copy of the reused
    KV (none for a single unpadded row, whose gathered tensors are used as they are).
    """
    past = DynamicCache()
    width = layout.past_width
    if width == 0:
        return past
    spec = model_kv.spec
    rows = len(layout.reused)
    direct = rows == 1 and expand == 1 and layout.reused[0] == width and gathered[0] is not None
    for layer, device in enumerate(model_kv.layer_devices):
        if direct:
            k, v = gathered[0][layer]  # type: ignore[index]
            k, v = k[:, :, :width].to(device), v[:, :, :width].to(device)
        else:
            k = torch.zeros((rows, spec.num_kv_heads, width, spec.head_dim), dtype=spec.dtype, device=device)
            v = torch.zeros_like(k)
            for row, (n, kv) in enumerate(zip(layout.reused, gathered, strict=True)):
                if n == 0 or kv is None:
                    continue
                src_k, src_v = kv[layer]  # [1, H, >= n, D]
                k[row, :, width - n :].copy_(src_k[0, :, :n])
                v[row, :, width - n :].copy_(src_v[0, :, :n])
            if expand > 1:
                # generate repeats input rows (beams / return sequences) with repeat_interleave; match it.
                k, v = k.repeat_interleave(expand, dim=0), v.repeat_interleave(expand, dim=0)
        past.layers.append(_dynamic_layer(k, v))
    return past


def _dynamic_layer(keys: torch.Tensor, values: torch.Tensor) -> DynamicLayer:
    """A DynamicLayer holding `keys` / `values` without copying them; generate only concatenates onto them."""
    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


def row_kv(past: DynamicCache, row: int, start: int, stop: int, spec: KVSpec) -> list[LayerKV]:
    """Per layer (K, V) `[1, H, stop - start, D]` of cache row `row`, columns [start, stop), on `spec.device`.

    Views when the layer already lives on the spec's device (the cache copies what it stores).
    A cache whose rows hold a shared prefix once composes the row (`SharedPrefixCache.row_kv`).
    """
    composed = getattr(past, "row_kv", None)
    if composed is not None:
        return composed(row, start, stop, spec)
    out: list[LayerKV] = []
    for layer in past.layers:
        k = layer.keys[row : row + 1, :, start:stop].to(spec.device)
        v = layer.values[row : row + 1, :, start:stop].to(spec.device)
        out.append((k, v))
    return out


def weights_dtype_device(model: Any) -> tuple[torch.dtype, torch.device] | None:
    """(dtype, device) of the model's first parameter, None for a model without parameters: what
    cached KV was computed with, checked before each cached call."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return None if param is None else (param.dtype, param.device)


def past_length(past: DynamicCache) -> int:
    """Columns held by every layer of `past` (as `generate` counts them); raises UnsupportedKV if layers disagree."""
    lengths = {layer.get_seq_length() if layer.keys is not None else 0 for layer in past.layers}
    if len(lengths) != 1:
        raise UnsupportedKV(f"cache layers hold different lengths after generate: {sorted(lengths)}")
    return lengths.pop()
