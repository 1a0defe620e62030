"""radixkv.tiers: the storage under the device pool, where evicted blocks go and come back from.

Owns the host (CPU memory) tier (`host`), the disk tier (`disk`), the shared Redis tier
(`redis`), the stored-KV format both disk and Redis use (`codec`), and `tiers`, the demotion and
promotion between them and the pool (`Tiers`, reaching the cache only through `CacheSide`,
generic in the cache's match type). May import: the standard library, torch, xxhash, redis
(lazily) and `radixkv.core` only; never `radixkv.eviction` or `radixkv.cache`.
"""

from .codec import SpecFingerprint
from .disk import DiskTier, TierWarning
from .host import HostTier
from .redis import RedisOptions, RedisStats, RedisTier, SharedTierError
from .tiers import CacheSide, Tiers, TierStats

__all__ = [
    "CacheSide",
    "DiskTier",
    "HostTier",
    "RedisOptions",
    "RedisStats",
    "RedisTier",
    "SharedTierError",
    "SpecFingerprint",
    "TierStats",
    "TierWarning",
    "Tiers",
]
