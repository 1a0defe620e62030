"""What every method shares: settings, the per-method result, and the interleaved request loop.

A method serves a whole `Workload` on one model and yields a `MethodRun`: the tokens it
generated for every request (to compare methods), timing, and how many prompt tokens it read
from a cache instead of computing them. Sequential methods (one request at a time) are
`SequentialMethod`s run together by `run_interleaved`; batch methods run the workload alone.
A method that does not apply raises `NotApplicable` with the reason; the table shows the reason
instead of numbers.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter, process_time
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from radixkv import DEFAULT_EVICTION

from .timing import FirstTokenTimer
from .workload import Request, Tokens, Workload

__all__ = [
    "BenchSettings",
    "MethodRun",
    "NotApplicable",
    "RequestResult",
    "SequentialMethod",
    "greedy_config",
    "run_interleaved",
]


class NotApplicable(Exception):
    """The method does not apply to this workload or model; the message says why."""


@dataclass(frozen=True)
class BenchSettings:
    """Settings shared by every method of one bench run."""

    capacity_tokens: int
    block_size: int
    eviction: str = DEFAULT_EVICTION
    progress: bool = True


@dataclass(frozen=True)
class RequestResult:
    """One request as a method served it.

    `cached_tokens`: prompt tokens read from a cache; `computed_tokens`: prompt tokens the
    model ran for this request, including a prefix it precomputed on this request's behalf.
    """

    key: str
    prompt: Tokens
    generated: Tokens
    ttft_s: float
    cached_tokens: int
    computed_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)


@dataclass
class MethodRun:
    """Everything measured for one method on one workload."""

    name: str
    requests: list[RequestResult]
    total_s: float
    ttft_note: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)

    @property
    def generated_tokens(self) -> int:
        return sum(len(r.generated) for r in self.requests)

    @property
    def hit_tokens(self) -> int:
        return sum(r.cached_tokens for r in self.requests)

    @property
    def hit_rate(self) -> float:
        """Prompt tokens read from a cache / prompt tokens."""
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def prefill_saved(self) -> int:
        """Prompt tokens not computed (prompt tokens - computed tokens, precomputed prefixes included)."""
        return self.prompt_tokens - sum(r.computed_tokens for r in self.requests)

    @property
    def ttft_mean_s(self) -> float:
        return statistics.fmean(r.ttft_s for r in self.requests)

    @property
    def ttft_p50_s(self) -> float:
        return statistics.median(r.ttft_s for r in self.requests)

    @property
    def throughput(self) -> float:
        """Generated tokens per second of total time."""
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def outputs(self) -> dict[str, Tokens]:
        return {r.key: r.generated for r in self.requests}


def greedy_config(max_new_tokens: int, stop_token_id: int | None = None) -> GenerationConfig:
    """A fresh greedy config generating `max_new_tokens`, or fewer when `stop_token_id` comes
    (None: no stop, exactly `max_new_tokens`); pad id 0.

    Fresh per call because some callers (continuous batching) mutate the config they get.
    """
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_token_id, pad_token_id=0)


def generate_streamed(
    generate: Callable[..., Any],
    prompt: Tokens,
    device: Any,
    max_new_tokens: int,
    timer: FirstTokenTimer | None = None,
    stop_token_id: int | None = None,
    **extra: Any,
) -> tuple[Tokens, float]:
    """One greedy request of batch 1 through `generate` (a model's or a wrapper's), TTFT from a
    streamer: (generated tokens, seconds from `timer`'s creation, now when None, to the first).
    Generation stops early at `stop_token_id` (included) when given."""
    timer = timer or FirstTokenTimer()
    ids = torch.tensor([list(prompt)], device=device)  # [1, T]
    out = generate(
        ids,
        attention_mask=torch.ones_like(ids),
        generation_config=greedy_config(max_new_tokens, stop_token_id),
        streamer=timer,
        **extra,
    )
    return tuple(out[0, ids.shape[1] :].tolist()), timer.ttft_s or 0.0


@dataclass
class SequentialMethod:
    """A method that serves one request at a time: `serve(request)` generates for one request.

    `finish()` (optional) returns extra figures for results.json once every request is served.
    """

    name: str
    serve: Callable[[Request], RequestResult]
    ttft_note: str
    finish: Callable[[], dict[str, Any]] | None = None


@dataclass
class _Progress:
    method: SequentialMethod
    history: dict[str, Tokens] = field(default_factory=dict)
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    error: BaseException | None = None


def run_interleaved(
    methods: list[SequentialMethod], workload: Workload, *, progress: bool
) -> list[MethodRun | BaseException]:
    """Serve the workload with every method, interleaved request by request, round-major.

    Request i goes to method A, then B, then C, before request i+1: all methods share the
    machine's noise (other processes, frequency changes) instead of one method getting a quiet
    minute and another a busy one. Each method threads its own answers into its conversations'
    history. A method's total time is the sum of its own `serve` wall times (its CPU time is
    recorded too). A method whose `serve` raises stops there; its slot in the returned list (same
    order as `methods`) holds the exception, the others go on. KeyboardInterrupt propagates.
    """
    states = [_Progress(m) for m in methods]
    bar = tqdm(
        total=workload.num_requests * len(methods),
        desc=", ".join(m.name for m in methods),
        unit="req",
        disable=not progress,
        leave=False,
    )
    for r in range(workload.num_rounds):
        queues = [workload.round_requests(r, st.history) if st.error is None else [] for st in states]
        for i in range(max(map(len, queues), default=0)):
            for st, queue in zip(states, queues, strict=True):
                if st.error is not None or i >= len(queue):
                    continue
                req = queue[i]
                cpu, wall = process_time(), perf_counter()
                try:
                    res = st.method.serve(req)
                except Exception as exc:
                    st.error = exc
                    continue
                finally:
                    st.wall_s += perf_counter() - wall
                    st.cpu_s += process_time() - cpu
                st.results.append(res)
                st.history[req.conversation_id] = req.prompt + res.generated
                bar.update(1)
    bar.close()
    out: list[MethodRun | BaseException] = []
    for st in states:
        if st.error is not None:
            out.append(st.error)
            continue
        run = MethodRun(st.method.name, st.results, st.wall_s, st.method.ttft_note)
        run.extra["cpu_s"] = st.cpu_s
        if st.method.finish is not None:
            try:
                run.extra.update(st.method.finish())
            except Exception as exc:
                out.append(exc)
                continue
        out.append(run)
    return out
