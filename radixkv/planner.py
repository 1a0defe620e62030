"""KV cache memory planner: pure arithmetic on plain numbers (no torch, no transformers).

The one formula everything here rests on::

    bytes per token = 2 (K and V) x layers x kv_heads x head_dim x bytes per element

Examples (checked in tests/test_plan.py against published figures):

- Llama-2-7B (32 layers, 32 KV heads, head_dim 128), float16: 524,288 B per token,
  exactly 2 GiB (2,048 MiB) for one 4,096-token sequence.
- 80 layers x 64 KV heads x head_dim 128, float16: 2,621,440 B (~2.6 MB) per token,
  ~262 GB for 100,000 tokens; with 8 KV heads (GQA, as Llama-2-70B has) 8x less:
  327,680 B per token, ~43 GB for 131,072 (128K) tokens.

A prefix every sequence starts with (a system prompt, a document a batch of questions share) can
be held once: n sequences of C tokens whose first P are shared take P + n x (C - P) tokens of KV
instead of n x C (`shared_prefix_plan`).

Units: "GB"/"MB" are decimal (10**9, 10**6), "GiB"/"MiB" binary (2**30, 2**20); `parse_bytes`
accepts both and `format_bytes` prints both, so nobody has to guess which one a figure uses.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

__all__ = [
    "DTYPE_BYTES",
    "KVPlan",
    "ModelShape",
    "Scenario",
    "SharedPrefixPlan",
    "dtype_bytes",
    "format_bytes",
    "kv_bytes_per_token",
    "parse_bytes",
    "plan",
    "plan_scenarios",
    "quantized_bytes_per_token",
    "scenarios",
    "shared_prefix_plan",
]

DTYPE_BYTES: dict[str, float] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8": 1,
    "fp8": 1,
    "int8": 1,
    "int4": 0.5,
}
"""Bytes per element for the dtype names the planner understands (torch spellings, no prefix)."""

_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp64": "float64"}

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def dtype_bytes(name: str) -> float:
    """Bytes per element of dtype `name` ("float16", "bf16", "torch.int8", ...).

    Raises ValueError naming the argument and listing the known dtypes when `name` is unknown.
    """
    key = name.strip().lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise ValueError(f"dtype {name!r} is unknown; known dtypes: {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[key]


def parse_bytes(text: str | int | float) -> int:
    """Parse a memory size such as "80GiB", "24 GB", "512MiB" or a plain number of bytes.

    Decimal units (KB, MB, GB, TB) are powers of 10; binary ones (KiB, MiB, GiB, TiB) powers of 2.
    Raises ValueError naming the bad value when it cannot be parsed or is negative.
    """
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"memory must be >= 0, got {text!r}")
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"memory {text!r} is not a size; use a number with one of the units "
            "B, KB, MB, GB, TB (decimal) or KiB, MiB, GiB, TiB (binary), e.g. '80GiB'"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(num_bytes: float) -> str:
    """Human form giving both conventions, e.g. ``2.15 GB (2.00 GiB)``; below 1 MB, plain bytes."""
    if num_bytes < 10**6:
        return f"{num_bytes:,.0f} B"
    for dec, dec_name, binary, bin_name in (
        (10**12, "TB", 2**40, "TiB"),
        (10**9, "GB", 2**30, "GiB"),
        (10**6, "MB", 2**20, "MiB"),
    ):
        if num_bytes >= dec:
            return f"{num_bytes / dec:,.2f} {dec_name} ({num_bytes / binary:,.2f} {bin_name})"
    raise AssertionError("unreachable")  # pragma: no cover


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_element: float) -> int:
    """KV cache bytes one token occupies: 2 x layers x kv_heads x head_dim x bytes per element.

    Raises ValueError naming the argument when a size is not a positive number.
    """
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if bytes_per_element <= 0:
        raise ValueError(f"bytes_per_element must be > 0, got {bytes_per_element!r}")
    return math.ceil(2 * num_layers * num_kv_heads * head_dim * bytes_per_element)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model; plain numbers only.

    `num_params` is the weight count (None when unknown: weights are then left out of the budget).
    `num_attention_heads` is only used to describe GQA (query heads per KV head).
    """

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_attention_heads: int | None = None
    num_params: int | None = None

    def __post_init__(self) -> None:
        kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, 1)  # validates the sizes
        if self.num_params is not None and self.num_params < 0:
            raise ValueError(f"num_params must be >= 0 or None, got {self.num_params!r}")


@dataclass(frozen=True)
class KVPlan:
    """Memory figures for one model shape, cache dtype, context length and memory budget.

    `max_sequences` is how many sequences of `context` tokens fit in the KV budget
    (`memory_bytes - weight_bytes`, at least 0); `max_tokens` the total cached tokens that fit.
    """

    label: str
    num_kv_heads: int
    kv_bytes_per_element: float
    bytes_per_token: int
    context: int
    bytes_per_sequence: int
    memory_bytes: int
    weight_bytes: int
    kv_budget_bytes: int
    max_tokens: int
    max_sequences: int


def plan(
    shape: ModelShape,
    *,
    weight_bytes_per_element: float,
    kv_bytes_per_element: float | None = None,
    context: int,
    memory_bytes: int,
    label: str = "as configured",
) -> KVPlan:
    """Plan the KV memory of `shape` at `context` tokens per sequence within `memory_bytes`.

    Weights take `num_params x weight_bytes_per_element` first (0 when `num_params` is None);
    the KV cache uses `kv_bytes_per_element` (defaults to the weights' element size).
    Raises ValueError naming the argument when `context` or `memory_bytes` is not positive.
    """
    if not isinstance(context, int) or context <= 0:
        raise ValueError(f"context must be a positive int, got {context!r}")
    if memory_bytes <= 0:
        raise ValueError(f"memory_bytes must be > 0, got {memory_bytes!r}")
    kv_elem = weight_bytes_per_element if kv_bytes_per_element is None else kv_bytes_per_element
    per_token = kv_bytes_per_token(shape.num_layers, shape.num_kv_heads, shape.head_dim, kv_elem)
    weights = math.ceil((shape.num_params or 0) * weight_bytes_per_element)
    budget = max(0, memory_bytes - weights)
    per_sequence = per_token * context
    return KVPlan(
        label=label,
        num_kv_heads=shape.num_kv_heads,
        kv_bytes_per_element=kv_elem,
        bytes_per_token=per_token,
        context=context,
        bytes_per_sequence=per_sequence,
        memory_bytes=memory_bytes,
        weight_bytes=weights,
        kv_budget_bytes=budget,
        max_tokens=budget // per_token,
        max_sequences=budget // per_sequence,
    )


@dataclass(frozen=True)
class Scenario:
    """A what-if: the KV heads and the cache element size to plan with instead of the model's."""

    label: str
    num_kv_heads: int
    kv_bytes_per_element: float


def quantized_bytes_per_token(shape: ModelShape, kv_dtype: str) -> int:
    """Bytes per token of radixkv's quantised pool (`PrefixCache(kv_dtype=...)`), scales included.

    Per token, layer, K/V and KV head: "int8" stores head_dim codes of 1 byte and one float16
    scale; "int4" head_dim / 2 bytes of packed codes and two float16 numbers (scale and minimum).
    (The format is radixkv.core.quant's; tests check that the two agree.)
    """
    per_head = {"int8": shape.head_dim + 2, "int4": shape.head_dim // 2 + 4}
    if kv_dtype not in per_head:
        raise ValueError(f"kv_dtype must be 'int8' or 'int4', got {kv_dtype!r}")
    return 2 * shape.num_layers * shape.num_kv_heads * per_head[kv_dtype]


def scenarios(shape: ModelShape, kv_bytes_per_element: float) -> list[Scenario]:
    """The what-ifs `radixkv plan` prints: as configured, an int8 and an int4 cache, GQA with 8
    KV heads (only when the model has more than 8; also combined with int8), and for a GQA model
    the same model without GQA (one KV head per query head: what GQA saves).

    int8 / int4 caches are counted at 1 / 0.5 byte per element; their scales are left out here
    (`quantized_bytes_per_token` gives radixkv's real sizes, which `radixkv plan` prints too).
    """
    out = [Scenario("as configured", shape.num_kv_heads, kv_bytes_per_element)]
    if kv_bytes_per_element > 1:
        out.append(Scenario("int8 KV cache", shape.num_kv_heads, 1))
    if kv_bytes_per_element > 0.5:
        out.append(Scenario("int4 KV cache", shape.num_kv_heads, 0.5))
    if shape.num_kv_heads > 8:
        out.append(Scenario("GQA, 8 KV heads", 8, kv_bytes_per_element))
        if kv_bytes_per_element > 1:
            out.append(Scenario("GQA 8 + int8", 8, 1))
    heads = shape.num_attention_heads
    if heads is not None and heads > shape.num_kv_heads:
        out.append(Scenario(f"without GQA ({heads} KV heads)", heads, kv_bytes_per_element))
    return out


def plan_scenarios(
    shape: ModelShape,
    *,
    weight_bytes_per_element: float,
    kv_bytes_per_element: float | None = None,
    context: int,
    memory_bytes: int,
) -> list[KVPlan]:
    """`plan` for each of `scenarios(shape, ...)`, in that order (the first is the model as configured)."""
    kv_elem = weight_bytes_per_element if kv_bytes_per_element is None else kv_bytes_per_element
    return [
        plan(
            replace(shape, num_kv_heads=s.num_kv_heads),
            weight_bytes_per_element=weight_bytes_per_element,
            kv_bytes_per_element=s.kv_bytes_per_element,
            context=context,
            memory_bytes=memory_bytes,
            label=s.label,
        )
        for s in scenarios(shape, kv_elem)
    ]


@dataclass(frozen=True)
class SharedPrefixPlan:
    """How many sequences of `context` tokens fit when their first `shared_prefix` tokens are the
    same in every sequence and their KV is held once, against one copy per sequence.

    Held once, n sequences take ``shared_prefix + n x (context - shared_prefix)`` tokens of KV; per
    sequence, ``n x context``. `max_sequences_shared` >= `max_sequences_unshared`, equal when
    `shared_prefix` is 0 or when not even one sequence fits (one sequence costs `context` tokens either way).
    """

    shared_prefix: int
    context: int
    bytes_per_token: int
    kv_budget_bytes: int
    shared_bytes: int
    private_bytes_per_sequence: int
    max_sequences_unshared: int
    max_sequences_shared: int


def shared_prefix_plan(base: KVPlan, shared_prefix: int) -> SharedPrefixPlan:
    """The shared-prefix figures for the model, cache dtype, context and budget of `base` (a `plan`).

    Raises ValueError naming `shared_prefix` unless 0 <= shared_prefix < base.context (every
    sequence keeps at least one token of its own, so the per-sequence cost is never 0).
    """
    if not isinstance(shared_prefix, int) or isinstance(shared_prefix, bool) or shared_prefix < 0:
        raise ValueError(f"shared_prefix must be an int >= 0, got {shared_prefix!r}")
    if shared_prefix >= base.context:
        raise ValueError(
            f"shared_prefix ({shared_prefix:,}) must be less than context ({base.context:,}): "
            "each sequence needs at least one token of its own"
        )
    shared = shared_prefix * base.bytes_per_token
    private = (base.context - shared_prefix) * base.bytes_per_token
    budget = base.kv_budget_bytes
    # The one shared copy is paid first; with less than that, nothing fits (0, not a negative count).
    fit = (budget - shared) // private if budget >= shared else 0
    return SharedPrefixPlan(
        shared_prefix=shared_prefix,
        context=base.context,
        bytes_per_token=base.bytes_per_token,
        kv_budget_bytes=budget,
        shared_bytes=shared,
        private_bytes_per_sequence=private,
        max_sequences_unshared=base.max_sequences,
        max_sequences_shared=fit,
    )
