"""Method `generate`: plain `model.generate`, one request at a time, no reuse (the baseline)."""

from __future__ import annotations

from transformers import PreTrainedModel

from .method_base import BenchSettings, RequestResult, SequentialMethod, generate_streamed
from .workload import Request, Workload

__all__ = ["make_generate"]


def make_generate(model: PreTrainedModel, workload: Workload, settings: BenchSettings) -> SequentialMethod:
    """Every prompt computed in full; TTFT from a streamer."""

    def serve(req: Request) -> RequestResult:
        generated, ttft = generate_streamed(
            model.generate, req.prompt, model.device, workload.max_new_tokens, stop_token_id=workload.stop_token_id
        )
        return RequestResult(req.key, req.prompt, generated, ttft, 0, len(req.prompt))

    return SequentialMethod("generate", serve, ttft_note="streamer, per request")
