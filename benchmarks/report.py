"""Turn a `BenchResult` into results.json content and a markdown table (terminal and README)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .compare import BenchResult, MethodOutcome

__all__ = ["format_table", "to_json"]

_LABELS = {
    "generate": "generate (no reuse)",
    "prompt-reuse": "prompt-reuse recipe (deepcopy)",
    "continuous-batching": "continuous batching (generate_batch)",
    "radixkv": "radixkv",
    "radixkv-reuse-generated": "radixkv, reuse_generated=True",
}


def _method_json(o: MethodOutcome) -> dict[str, Any]:
    row: dict[str, Any] = {"method": o.name, "status": o.status, "reason": o.reason or None}
    if o.run is None:
        return row
    run = o.run
    row.update(
        requests=len(run.requests),
        ttft_mean_s=run.ttft_mean_s,
        ttft_p50_s=run.ttft_p50_s,
        ttft_note=run.ttft_note,
        total_s=run.total_s,
        throughput_tok_s=run.throughput,
        prompt_tokens=run.prompt_tokens,
        generated_tokens=run.generated_tokens,
        hit_tokens=run.hit_tokens,
        hit_rate=run.hit_rate,
        prefill_saved_tokens=run.prefill_saved,
        same_tokens=o.same_tokens,
        mismatched_requests=o.mismatches,
        extra=run.extra,
        per_request=[
            {
                "key": r.key,
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "computed_tokens": r.computed_tokens,
                "ttft_s": r.ttft_s,
                "generated": list(r.generated),
            }
            for r in run.requests
        ],
    )
    return row


def to_json(result: BenchResult) -> dict[str, Any]:
    """The results.json document (plain JSON types only; NaN written as null)."""
    w = result.workload
    doc = {
        "workload": {
            "name": w.name,
            "params": w.params,
            "requests": w.num_requests,
            "max_new_tokens": w.max_new_tokens,
            "closed_form_hit_rate": w.closed_form_hit_rate,
            "best_hit_rate": result.best_hit_rate,
            "notes": list(w.notes),
        },
        "model": result.model,
        "settings": dataclasses.asdict(result.settings),
        "machine": result.machine,
        "all_same_tokens": result.all_same_tokens,
        "methods": [_method_json(o) for o in result.outcomes],
    }
    return _clean(doc)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _same(o: MethodOutcome) -> str:
    if o.same_tokens is None:
        return "reference"
    if o.same_tokens:
        return "yes"
    return f"no ({len(o.mismatches)} of {len(o.run.requests) if o.run else '?'} differ)"


def format_table(result: BenchResult) -> str:
    """A markdown table, one row per method, then the notes (bounds, TTFT method, n/a reasons)."""
    head = (
        "| method | TTFT mean (ms) | total (s) | CPU (s) | throughput (tok/s) | token hit rate "
        "| prefill tokens saved | same tokens |"
    )
    lines = [head, "|" + "---|" * 8]
    for o in result.outcomes:
        label = _LABELS.get(o.name, o.name)
        if o.run is None:
            lines.append(f"| {label} | {o.status}: {o.reason} | | | | | | |")
            continue
        r = o.run
        lines.append(
            f"| {label} | {r.ttft_mean_s * 1e3:,.1f} | {r.total_s:,.2f} | {r.extra.get('cpu_s', math.nan):,.2f} "
            f"| {r.throughput:,.1f} "
            f"| {r.hit_rate:.3f} | {r.prefill_saved:,} | {_same(o)} |"
        )
    w = result.workload
    ref = result.reference
    notes = []
    if ref is not None and ref.run is not None:
        each = f"{w.max_new_tokens} new tokens each (greedy)"
        if w.stop_token_id is not None:
            each = f"up to {w.max_new_tokens} new tokens each (greedy, stopping at end of turn)"
        notes.append(f"{w.num_requests} requests, {ref.run.prompt_tokens:,} prompt tokens, {each}")
    if result.best_hit_rate is not None:
        notes.append(f"best possible token hit rate (unlimited whole-block cache): {result.best_hit_rate:.4f}")
    notes.extend(w.notes)
    verdict = result.all_same_tokens
    if verdict is not None:
        notes.append("all methods produced the same tokens" if verdict else "token mismatch: see the table")
    for o in result.outcomes:
        if o.run is not None and o.run.ttft_note:
            notes.append(f"TTFT of {o.name}: {o.run.ttft_note}")
    notes.append(
        "total = wall time of the method's own calls (one-request-at-a-time methods interleaved request by "
        "request); CPU = process CPU time over them, all threads; throughput = generated tokens / total"
    )
    if any(o.name == "prompt-reuse" and o.run is not None for o in result.outcomes):
        notes.append(
            "prompt-reuse's hit rate counts its precomputed prefix as cached; its prefill tokens saved "
            "subtract computing that prefix once"
        )
    s = result.settings
    notes.append(
        f"cache: {s.capacity_tokens:,} tokens, block {s.block_size}, eviction {s.eviction}; "
        f"model {result.model.get('name')} ({result.model.get('params', 0):,} params, "
        f"{result.model.get('dtype')}, {result.model.get('device')}, "
        f"{result.machine.get('torch_threads')} torch threads, {result.machine.get('cpu_count')} CPU cores)"
    )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)
