"""radixkv.core: the prefix cache's machinery, with no policy and no storage below the device pool.

Owns the KV layout (`spec`), token and hash handling (`tokens`, `hashing`), the block allocator
and the paged device pool (`blocks`, `pool`), int8/int4 quantisation (`quant`), the radix tree
(`tree`) and the interface an eviction policy implements (`policy`: `EvictionPolicy`, and
`NodeView`, what a policy may read of a node). May import: the standard library, torch,
sortedcontainers and xxhash, and its own modules; never `radixkv.eviction`, `radixkv.tiers`,
`radixkv.cache`, the integrations or transformers.
"""

from .blocks import BlockAllocator
from .hashing import chain_hashes, namespace_key, pack_tokens, root_hash
from .policy import EvictionPolicy, NodeView
from .pool import KVPool, LayerKV, index_copy_rows
from .quant import KV_DTYPES, KVQuantizer, kv_bytes_per_token, make_quantizer
from .spec import KVSpec
from .tokens import TokenIds, as_token_list
from .tree import Hold, Node, RadixTree, Tenant

__all__ = [
    "KV_DTYPES",
    "BlockAllocator",
    "EvictionPolicy",
    "Hold",
    "KVPool",
    "KVQuantizer",
    "KVSpec",
    "LayerKV",
    "Node",
    "NodeView",
    "RadixTree",
    "Tenant",
    "TokenIds",
    "as_token_list",
    "chain_hashes",
    "index_copy_rows",
    "kv_bytes_per_token",
    "make_quantizer",
    "namespace_key",
    "pack_tokens",
    "root_hash",
]
