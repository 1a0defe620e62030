"""radixkv: a radix-tree prefix cache for transformer KV, with a paged, preallocated pool.

The public API is what this module exports. The package is layered, dependencies pointing one
way: `radixkv.core` (KV layout, hashing, block pool, quantisation, radix tree, the policy
interface) imports nothing else of radixkv; `radixkv.eviction` (the policies) and
`radixkv.tiers` (host, disk and Redis tiers) import only the core; `radixkv.cache`
(PrefixCache, the facade) brings the three together. `radixkv.planner` is the memory planner.
The library depends on torch, sortedcontainers and xxhash only. Framework adapters live in
`radixkv.integrations` and are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cache import CacheOptions, CacheStats, NamespaceStats, PrefixCache, PrefixMatch
from .core.policy import EvictionPolicy
from .core.quant import KV_DTYPES, KVQuantizer, kv_bytes_per_token, make_quantizer
from .core.spec import KVSpec
from .eviction.policies import DEFAULT_EVICTION, POLICIES
from .tiers.disk import TierWarning
from .tiers.redis import RedisOptions, RedisStats, SharedTierError
from .tiers.tiers import TierStats

if TYPE_CHECKING:
    from .integrations.hf import CachedModel

__all__ = [
    "DEFAULT_EVICTION",
    "KV_DTYPES",
    "POLICIES",
    "CacheOptions",
    "CacheStats",
    "EvictionPolicy",
    "KVQuantizer",
    "KVSpec",
    "NamespaceStats",
    "PrefixCache",
    "PrefixMatch",
    "RedisOptions",
    "RedisStats",
    "SharedTierError",
    "TierStats",
    "TierWarning",
    "kv_bytes_per_token",
    "make_quantizer",
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
