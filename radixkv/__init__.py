"""radixkv: a radix-tree prefix cache for transformer KV, with a paged, preallocated pool.

The core (this package) depends on torch, sortedcontainers and xxhash only. Framework
adapters live in `radixkv.integrations` and are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cache import CacheStats, NamespaceStats, PrefixCache, PrefixMatch
from .policies import DEFAULT_EVICTION, POLICIES
from .policy import EvictionPolicy
from .redis_tier import RedisOptions, RedisStats, SharedTierError
from .spec import KVSpec

if TYPE_CHECKING:
    from .integrations.hf import CachedModel

__all__ = [
    "DEFAULT_EVICTION",
    "POLICIES",
    "CacheStats",
    "EvictionPolicy",
    "KVSpec",
    "NamespaceStats",
    "PrefixCache",
    "PrefixMatch",
    "RedisOptions",
    "RedisStats",
    "SharedTierError",
    "wrap",
]
__version__ = "0.1.0"


def wrap(model: Any, **kwargs: Any) -> CachedModel:
    """Wrap a Hugging Face causal LM so that `generate` reuses cached prefixes.

    See `radixkv.integrations.hf.wrap` for the arguments (capacity_tokens, capacity_bytes,
    block_size, eviction, shares, kv_dtype, exact_pool, reuse_generated, shared, shared_model). Needs the `hf`
    extra (transformers).
    """
    from .integrations.hf import wrap as _wrap

    return _wrap(model, **kwargs)
