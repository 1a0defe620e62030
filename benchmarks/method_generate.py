"""Method `generate`: plain `model.generate`, one request at a time, no reuse (the baseline)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .method_base import BenchSettings, RequestResult, SequentialMethod, greedy_config
from .timing import FirstTokenTimer
from .workload import Request, Workload

__all__ = ["make_generate"]


def make_generate(model: PreTrainedModel, workload: Workload, settings: BenchSettings) -> SequentialMethod:
    """Every prompt computed in full; TTFT from a streamer."""

    def serve(req: Request) -> RequestResult:
        ids = torch.tensor([req.prompt], device=model.device)  # [1, T]
        timer = FirstTokenTimer()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=greedy_config(workload.max_new_tokens),
            streamer=timer,
        )
        generated = tuple(out[0, ids.shape[1] :].tolist())
        return RequestResult(req.key, req.prompt, generated, timer.ttft_s or 0.0, 0, len(req.prompt))

    return SequentialMethod("generate", serve, ttft_note="streamer, per request")
