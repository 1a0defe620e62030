"""`radixkv plan`: print the KV memory plan of a model (figures from radixkv.planner)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

from radixkv.integrations.models import model_shape

from radixkv.planner import (
    KVPlan,
    ModelShape,
    SharedPrefixPlan,
    dtype_bytes,
    format_bytes,
    parse_bytes,
    plan_scenarios,
    quantized_bytes_per_token,
    shared_prefix_plan,
)


def plan_report(
    model: str,
    *,
    dtype: str = "float16",
    kv_dtype: str | None = None,
    memory: str = "80GiB",
    context: int = 4096,
    params: float | None = None,
    shared_prefix: int | None = None,
    as_json: bool = False,
) -> str:
    """The text (or JSON) `radixkv plan` prints for `model` (preset, config path or hub id).

    `params` overrides the weight count (e.g. 7e9); `kv_dtype` defaults to `dtype`;
    `shared_prefix` (tokens) adds the row where every sequence's first `shared_prefix` tokens
    are held once. Raises ValueError naming the bad argument.
    """
    if shared_prefix is not None and not 0 <= shared_prefix < context:
        raise ValueError(
            f"--shared-prefix must be >= 0 and less than --context ({context:,}), got {shared_prefix:,}: "
            "each sequence needs at least one token of its own"
        )
    shape = model_shape(model)
    if params is not None:
        if params < 0:
            raise ValueError(f"--params must be >= 0, got {params!r}")
        shape = replace(shape, num_params=int(params))
    kv_dtype = kv_dtype or dtype
    plans = plan_scenarios(
        shape,
        weight_bytes_per_element=dtype_bytes(dtype),
        kv_bytes_per_element=dtype_bytes(kv_dtype),
        context=context,
        memory_bytes=parse_bytes(memory),
    )
    # The model as configured (plans[0]): the same model, dtype and kv_dtype as the first row.
    shared = shared_prefix_plan(plans[0], shared_prefix) if shared_prefix is not None else None
    if as_json:
        doc = {
            "model": asdict(shape),
            "dtype": dtype,
            "kv_dtype": kv_dtype,
            "plans": [asdict(p) for p in plans],
            "shared_prefix": asdict(shared) if shared is not None else None,
        }
        return json.dumps(doc, indent=1)
    return _text(shape, dtype, kv_dtype, plans, shared)


def _text(shape: ModelShape, dtype: str, kv_dtype: str, plans: list[KVPlan], shared: SharedPrefixPlan | None) -> str:
    base = plans[0]
    gqa = ""
    if shape.num_attention_heads and shape.num_attention_heads != shape.num_kv_heads:
        gqa = f" (GQA: {shape.num_attention_heads // shape.num_kv_heads} query heads per KV head)"
    weights = (
        f"{shape.num_params:,} params x {dtype} = {format_bytes(base.weight_bytes)}"
        if shape.num_params is not None
        else "unknown (pass --params to count them)"
    )
    lines = [
        f"model {shape.name}: {shape.num_layers} layers, {shape.num_kv_heads} KV heads{gqa}, head_dim {shape.head_dim}",
        f"weights: {weights}",
        f"KV cache ({kv_dtype}): 2 x {shape.num_layers} layers x {shape.num_kv_heads} KV heads x "
        f"{shape.head_dim} head_dim x {base.kv_bytes_per_element:g} B = {base.bytes_per_token:,} B per token",
        f"one sequence of {base.context:,} tokens: {format_bytes(base.bytes_per_sequence)}",
        f"memory {format_bytes(base.memory_bytes)} - weights = {format_bytes(base.kv_budget_bytes)} for KV",
        "",
        f"| scenario | KV heads | B/elem | bytes per token | per {base.context:,}-token sequence "
        "| tokens that fit | sequences that fit |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in plans:
        lines.append(
            f"| {p.label} | {p.num_kv_heads} | {p.kv_bytes_per_element:g} | {p.bytes_per_token:,} "
            f"| {format_bytes(p.bytes_per_sequence)} | {p.max_tokens:,} | {p.max_sequences:,} |"
        )
    if shared is not None:
        lines.append(
            f"| as configured, first {shared.shared_prefix:,} tokens held once | {base.num_kv_heads} "
            f"| {base.kv_bytes_per_element:g} | {base.bytes_per_token:,} "
            f"| {format_bytes(shared.private_bytes_per_sequence)} + {format_bytes(shared.shared_bytes)} once "
            f"| {base.max_tokens:,} | {shared.max_sequences_shared:,} |"
        )
    if shared is not None:
        lines.append("")
        lines.append(
            f"shared prefix: {shared.shared_prefix:,} of the {base.context:,} tokens are the same in every sequence; "
            f"held once, n sequences take {shared.shared_prefix:,} + n x {base.context - shared.shared_prefix:,} "
            f"tokens of KV instead of n x {base.context:,}: {shared.max_sequences_shared:,} sequences fit "
            f"instead of {shared.max_sequences_unshared:,}."
        )
    if len(plans) > 1:
        lines.append("")
        lines.append(
            "int8 / int4 count 1 / 0.5 byte per element, scales left out; GQA changes the model, "
            "not just the cache (it needs a model trained or converted for it)."
        )
        lines.append(
            "radixkv's PrefixCache(kv_dtype=...) with its float16 scales: "
            f"int8 {quantized_bytes_per_token(shape, 'int8'):,} B per token, "
            f"int4 {quantized_bytes_per_token(shape, 'int4'):,} B per token "
            "(quantised reuse: outputs differ slightly from exact)."
        )
    return "\n".join(lines)
