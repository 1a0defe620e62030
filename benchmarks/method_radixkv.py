"""Methods `radixkv` (the default `reuse_generated`) and `radixkv-reuse-generated` (True): the model
wrapped by `radixkv.wrap`, one request at a time. They differ only in half precision, where the
default stores prompts only and the other also stores each answer's decode-step KV.

Same loop and TTFT streamer as plain `generate`; the prompt tokens read from the prefix cache
come from the adapter's statistics (`stats.reused_tokens`, or the cache's `stats.hit_tokens`)
before and after each request.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedModel

from .method_base import BenchSettings, NotApplicable, RequestResult, SequentialMethod, generate_streamed
from .workload import Request, Workload

__all__ = ["make_radixkv", "make_radixkv_reuse_generated"]


def make_radixkv_reuse_generated(
    model: PreTrainedModel, workload: Workload, settings: BenchSettings
) -> SequentialMethod:
    """`make_radixkv` with `reuse_generated=True`."""
    return make_radixkv(model, workload, settings, reuse_generated=True, name="radixkv-reuse-generated")


def make_radixkv(
    model: PreTrainedModel,
    workload: Workload,
    settings: BenchSettings,
    *,
    reuse_generated: bool | None = None,
    name: str = "radixkv",
) -> SequentialMethod:
    """Serve the workload through `radixkv.wrap(model, ...)`; NotApplicable if it is not installed."""
    try:
        import radixkv

        wrapped = radixkv.wrap(
            model,
            capacity_tokens=settings.capacity_tokens,
            block_size=settings.block_size,
            eviction=settings.eviction,
            reuse_generated=reuse_generated,
        )
    except (ImportError, AttributeError) as exc:
        raise NotApplicable(f"radixkv.wrap is not available ({exc})") from exc
    cache = wrapped.cache

    def reused() -> int:
        # The adapter's own count of prompt tokens whose prefill it skipped, where it has one;
        # else the cache's matched tokens (the same thing for one row per call).
        stats = getattr(wrapped, "stats", None)
        return stats.reused_tokens if hasattr(stats, "reused_tokens") else cache.stats.hit_tokens

    def serve(req: Request) -> RequestResult:
        hits_before = reused()
        generated, ttft = generate_streamed(
            wrapped.generate, req.prompt, model.device, workload.max_new_tokens, stop_token_id=workload.stop_token_id
        )
        cached = reused() - hits_before
        return RequestResult(req.key, req.prompt, generated, ttft, cached, len(req.prompt) - cached)

    def finish() -> dict[str, Any]:
        cache.check_invariants()
        stats = cache.stats
        return {
            "cache_stats": dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else {"repr": repr(stats)},
            "reuse_generated": wrapped.reuse_generated,
        }

    return SequentialMethod(name, serve, ttft_note="streamer, per request", finish=finish)
