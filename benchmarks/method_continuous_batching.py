"""Method `continuous-batching`: transformers' `model.generate_batch` with block sharing.

Each round of the workload is one `generate_batch` call holding every conversation's request
of that round (all submitted at once, then scheduled by transformers); the manager persists
across rounds so cached blocks can serve the next round. Its paged cache (pages of `block_size`
tokens, `allow_block_sharing=True`: chained block hashes, every cached block dropped at once
under memory pressure) gets radixkv's `capacity_tokens` plus room for all the requests of a
round in flight, since its one pool holds both.

Measurements: TTFT is a request's first-token timestamp minus its submission time (so it
includes queueing behind the rest of the batch); total time is the wall time of the
`generate_batch` calls. Prefix hits are counted by wrapping the cache's
`search_prefix_match` (transformers internals: if that method is gone, hits read as 0 and the
run notes it).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from time import perf_counter
from typing import Any

from transformers import PreTrainedModel

from .method_base import BenchSettings, MethodRun, NotApplicable, RequestResult, greedy_config
from .workload import Tokens, Workload

__all__ = ["run_continuous_batching"]


@contextlib.contextmanager
def _count_prefix_hits(hits: dict[str, int]) -> Iterator[bool]:
    """Record `search_prefix_match`'s result per request id into `hits` while active.

    Yields False (and counts nothing) when the transformers internals are not where expected.
    The last search of a request wins: a request sent back to pending searches again.
    """
    try:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
    except ImportError:
        yield False
        return
    original = getattr(PagedAttentionCache, "search_prefix_match", None)
    if original is None:
        yield False
        return

    def counting(self: Any, request_id: str, prompt_ids: list[int]) -> int:
        matched = original(self, request_id, prompt_ids)
        hits[request_id] = matched
        return matched

    PagedAttentionCache.search_prefix_match = counting  # type: ignore[method-assign]
    try:
        yield True
    finally:
        PagedAttentionCache.search_prefix_match = original  # type: ignore[method-assign]


def run_continuous_batching(model: PreTrainedModel, workload: Workload, settings: BenchSettings) -> MethodRun:
    """Run the workload round by round through `generate_batch`; raises on failed requests."""
    if not hasattr(model, "generate_batch"):
        raise NotApplicable("this transformers version has no model.generate_batch")
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    # Its pool holds the requests in flight as well as the cached blocks; the sequential methods
    # keep in-flight KV outside the cache. So: the cache budget + room for a whole round in flight
    # (bounded by every conversation's turns and answers).
    in_flight = sum(sum(map(len, c.turns)) + len(c.turns) * workload.max_new_tokens for c in workload.conversations)
    num_pages = math.ceil((settings.capacity_tokens + in_flight) / settings.block_size)
    longest = max(len(c.turns[0]) for c in workload.conversations)
    cb_config = ContinuousBatchingConfig(
        page_size=settings.block_size,
        num_blocks=num_pages,
        max_batch_tokens=max(512, min(longest, 4096)),
        allow_block_sharing=True,
    )
    history: dict[str, Tokens] = {}
    results: list[RequestResult] = []
    hits: dict[str, int] = {}
    total = 0.0
    cb_logger = logging.getLogger("ContinuousBatchingLogger")
    level = cb_logger.level
    cb_logger.setLevel(logging.ERROR)  # it warns about the disabled EOS on every call
    try:
        with _count_prefix_hits(hits) as counted:
            for r in range(workload.num_rounds):
                requests = workload.round_requests(r, history)
                start = perf_counter()
                outputs = model.generate_batch(
                    [list(q.prompt) for q in requests],
                    generation_config=greedy_config(workload.max_new_tokens, workload.stop_token_id),
                    continuous_batching_config=cb_config,
                    record_timestamps=True,
                    progress_bar=settings.progress,
                    persistent_manager=True,
                    warmup=False,
                )
                total += perf_counter() - start
                if len(outputs) != len(requests):
                    raise RuntimeError(f"generate_batch returned {len(outputs)} of {len(requests)} results")
                for req, (req_id, out) in zip(requests, outputs.items(), strict=True):
                    if out.error is not None:
                        raise RuntimeError(f"generate_batch request {req_id} failed: {out.error}")
                    ttft = out.timestamps[0] - out.created_time if out.timestamps else float("nan")
                    cached = hits.get(req_id, 0)
                    generated = tuple(out.generated_tokens)
                    results.append(
                        RequestResult(req.key, req.prompt, generated, ttft, cached, len(req.prompt) - cached)
                    )
                    history[req.conversation_id] = req.prompt + generated
    finally:
        cb_logger.setLevel(level)
        destroy = getattr(model, "destroy_cached_continuous_batching_manager", None)
        if destroy is not None:
            destroy()
    run = MethodRun(
        name="continuous-batching",
        requests=results,
        total_s=total,
        ttft_note="first-token timestamp - submission, whole round submitted at once",
    )
    run.extra.update(page_size=settings.block_size, num_blocks=num_pages, hits_counted=counted)
    return run
