"""Method `prompt-reuse`: transformers' documented recipe for one known prefix.

The recipe (transformers docs, "prefill a cache"): compute a `DynamicCache` for a prefix known
in advance once, then give every request a `copy.deepcopy` of it. Here the known prefix of
each conversation is the workload's `known_prefix` (the system prompt or instruction header);
it is computed lazily when the first request that needs it arrives, inside that request's
timing, and each distinct prefix is kept for the rest of the run. Nothing else is reused: a
later round's history is recomputed past the known prefix.
"""

from __future__ import annotations

import copy

import torch
from radixkv.integrations.hf import CACHE_KWARG
from transformers import DynamicCache, PreTrainedModel

from .method_base import BenchSettings, NotApplicable, RequestResult, SequentialMethod, generate_streamed
from .timing import FirstTokenTimer
from .workload import Request, Tokens, Workload

__all__ = ["make_prompt_reuse"]


def make_prompt_reuse(model: PreTrainedModel, workload: Workload, settings: BenchSettings) -> SequentialMethod:
    """Deep-copy a precomputed prefix cache per request; NotApplicable without a known prefix."""
    prefixes = {c.id: c.known_prefix for c in workload.conversations}
    if any(p is None for p in prefixes.values()):
        raise NotApplicable("the workload has no known prefix to precompute")
    if model.config.is_encoder_decoder:
        raise NotApplicable("encoder-decoder model")
    stored: dict[Tokens, DynamicCache] = {}

    def serve(req: Request) -> RequestResult:
        prefix = prefixes[req.conversation_id]
        assert prefix is not None
        timer = FirstTokenTimer()
        computed = len(req.prompt) - len(prefix)
        if prefix not in stored:
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(torch.tensor([prefix], device=model.device), use_cache=True, **{CACHE_KWARG: cache})
            stored[prefix] = cache
            computed += len(prefix)
        generated, ttft = generate_streamed(
            model.generate,
            req.prompt,
            model.device,
            workload.max_new_tokens,
            timer,  # started before the prefix was computed: its first request's TTFT includes that
            stop_token_id=workload.stop_token_id,
            **{CACHE_KWARG: copy.deepcopy(stored[prefix])},
        )
        return RequestResult(req.key, req.prompt, generated, ttft, len(prefix), computed)

    return SequentialMethod(
        "prompt-reuse",
        serve,
        ttft_note="streamer, per request (first request of a prefix includes computing it)",
        finish=lambda: {"prefixes_precomputed": len(stored)},
    )
