"""The methods a bench compares, the settings of a run, and the loop that serves a workload.

A method serves a whole `Workload` on one model and yields a `MethodRun`: the tokens it generated
per request (to compare methods), timing, and the prompt tokens it read from a cache. Sequential
methods (`make(model, workload, settings) -> SequentialMethod`) serve one request at a time and run
together, interleaved request by request (`run_interleaved`); batch methods (`make(...) ->
MethodRun`) run the workload alone. A method that does not apply raises `NotApplicable`, whose
reason the table shows. `METHODS` is in table order; `generate`, first, is the token reference.

- `generate`: plain `model.generate`, one request at a time, no reuse (the baseline).
- `prompt-reuse`: transformers' documented recipe: a `DynamicCache` of each conversation's
  `known_prefix`, computed inside the first request that needs it and kept, deep-copied into every
  request. Nothing else is reused: a later round's history is recomputed past that prefix.
- `radixkv`, `radixkv-reuse-generated`: the model wrapped by `radixkv.wrap`, with the default
  `reuse_generated` and with True (they differ in half precision only); the prompt tokens read
  from the cache come from the adapter's statistics before and after each request.
  `radixkv-private`: `share_prefixes=False` (rows, beams and samples of one call each compute and
  hold their own copy of a shared prefix; the same as `radixkv` for one-row requests).
- `continuous-batching`: transformers' `model.generate_batch` with block sharing, one call per
  round holding every conversation's request, the manager kept across rounds. Its paged cache
  (pages of `block_size`, `allow_block_sharing=True`) gets radixkv's `capacity_tokens` plus room
  for a whole round in flight, since its one pool holds both. TTFT is a request's first-token
  timestamp minus its submission (queueing included); total time is the calls' wall time. Hits are
  counted by wrapping the cache's `search_prefix_match` (transformers internals: if it is gone,
  hits read as 0 and the run notes it).

Sequential methods' TTFT comes from a streamer (`FirstTokenTimer`): `generate` puts the prompt,
then each generated token, so the second `put` marks the first token; TTFT is that moment minus
the call's start, including any lookup, KV gather and prefill (batch size 1 only).

The `rag-batch` workload's methods send padded batches instead: `benchmarks.batched`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter, process_time
from typing import Any

import torch
from radixkv.integrations.hf import CACHE_KWARG
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationConfig, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from radixkv import DEFAULT_EVICTION

from .workloads import Request, Tokens, Workload


class FirstTokenTimer(BaseStreamer):
    """A streamer that records when the first generated token arrives: create it right before the
    generate call (the start time is taken then), pass it as `streamer=`, then read `ttft_s`, the
    seconds to the first generated token (None if none came). generate puts the prompt first."""

    def __init__(self) -> None:
        self.start = perf_counter()
        self.ttft_s: float | None = None
        self._puts = 0

    def put(self, value: object) -> None:
        self._puts += 1
        if self._puts == 2:
            self.ttft_s = perf_counter() - self.start

    def end(self) -> None:
        """Called by generate when it finishes; nothing to do."""


class NotApplicable(Exception):
    """The method does not apply to this workload or model; the message says why."""


@dataclass(frozen=True)
class BenchSettings:
    """Everything one `radixkv bench` / `radixkv demo` run was asked for: the command line fills
    it from flags, the methods read the cache fields, results.json records the cache fields.

    `capacity_tokens` None (the demo's default) means 8,192 on a chat model, 32,768 on a preset
    (`with_capacity` settles it). `new_tokens` is the demo's answer length (the bench workloads
    carry their own). Raises ValueError naming the flag for a non-positive size or an unknown method.
    """

    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    capacity_tokens: int | None = 32768
    block_size: int = 16
    eviction: str = DEFAULT_EVICTION
    seed: int = 0
    methods: tuple[str, ...] = field(default_factory=lambda: DEFAULT_METHODS)
    out: Path | None = None
    progress: bool = True
    new_tokens: int = 24
    threads: int | None = None  # torch CPU threads; None: 1 on CPU, torch's choice on CUDA

    def __post_init__(self) -> None:
        for flag, value in (("capacity-tokens", self.capacity_tokens), ("block-size", self.block_size),
                            ("new-tokens", self.new_tokens), ("threads", self.threads)):  # fmt: skip
            if value is not None and value <= 0:
                raise ValueError(f"--{flag} must be positive, got {value}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"--methods: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(METHODS)}")

    def set_threads(self) -> None:
        """Set torch's CPU threads: `threads`, else 1 on CPU (steady per-core timings even when other
        jobs share the cores, where torch's default can run 20x slower), else torch's choice."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        elif not self.device.startswith(("cuda", "auto")) or (self.device == "auto" and not torch.cuda.is_available()):
            torch.set_num_threads(1)

    def with_capacity(self, default: int) -> BenchSettings:
        """These settings with `capacity_tokens` set to `default` when it was left None."""
        return self if self.capacity_tokens is not None else dataclasses.replace(self, capacity_tokens=default)

    def wrap(self, model: PreTrainedModel, **options: Any) -> Any:
        """`radixkv.wrap(model, ...)` with this run's capacity, block size and eviction (plus `options`)."""
        import radixkv

        return radixkv.wrap(
            model,
            capacity_tokens=self.capacity_tokens,
            block_size=self.block_size,
            eviction=self.eviction,
            **options,
        )

    def cache_fields(self) -> dict[str, Any]:
        """What results.json records under "settings"."""
        return {"capacity_tokens": self.capacity_tokens, "block_size": self.block_size, "eviction": self.eviction,
                "progress": self.progress}  # fmt: skip


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
    call_s: float = 0.0  # wall time of the whole call (sequential methods; set by run_interleaved)

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
    """A fresh greedy config (continuous batching mutates it) generating `max_new_tokens`, or fewer
    when `stop_token_id` comes (None: exactly `max_new_tokens`); pad id 0."""
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
    """Serve the workload with every method, round-major, interleaved request by request: request
    i goes to method A, then B, then C, before request i+1, so all methods share the machine's noise.
    Each method threads its own answers into its conversations' history; its total time is the sum
    of its `serve` wall times (CPU time recorded too). A method whose `serve` raises stops there: its
    slot in the returned list (same order as `methods`) holds the exception, the others go on.
    KeyboardInterrupt propagates."""
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
                    took = perf_counter() - wall
                    st.wall_s += took
                    st.cpu_s += process_time() - cpu
                st.results.append(dataclasses.replace(res, call_s=took))
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


# ----- the methods ---------------------------------------------------------------------------------


def make_generate(model: PreTrainedModel, workload: Workload, settings: BenchSettings) -> SequentialMethod:
    """Every prompt computed in full; TTFT from a streamer."""

    def serve(req: Request) -> RequestResult:
        generated, ttft = generate_streamed(
            model.generate, req.prompt, model.device, workload.max_new_tokens, stop_token_id=workload.stop_token_id
        )
        return RequestResult(req.key, req.prompt, generated, ttft, 0, len(req.prompt))

    return SequentialMethod("generate", serve, ttft_note="streamer, per request")


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


def make_radixkv(
    model: PreTrainedModel,
    workload: Workload,
    settings: BenchSettings,
    *,
    reuse_generated: bool | None = None,
    share_prefixes: bool | None = None,
    name: str = "radixkv",
) -> SequentialMethod:
    """Serve the workload through `radixkv.wrap(model, ...)`; the prompt tokens a request reused are
    the adapter's count of prompt tokens whose prefill it skipped."""
    wrapped = settings.wrap(model, reuse_generated=reuse_generated, share_prefixes=share_prefixes)
    cache = wrapped.cache

    def serve(req: Request) -> RequestResult:
        hits_before = wrapped.stats.reused_tokens
        generated, ttft = generate_streamed(
            wrapped.generate, req.prompt, model.device, workload.max_new_tokens, stop_token_id=workload.stop_token_id
        )
        cached = wrapped.stats.reused_tokens - hits_before
        return RequestResult(req.key, req.prompt, generated, ttft, cached, len(req.prompt) - cached)

    def finish() -> dict[str, Any]:
        cache.check_invariants()
        return {"cache_stats": dataclasses.asdict(cache.stats), "reuse_generated": wrapped.reuse_generated}

    return SequentialMethod(name, serve, ttft_note="streamer, per request", finish=finish)


@contextlib.contextmanager
def count_prefix_hits(hits: dict[str, int]) -> Iterator[bool]:
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


def continuous_batching_config(model: PreTrainedModel, workload: Workload, settings: BenchSettings) -> Any:
    """The `ContinuousBatchingConfig` the benches give `generate_batch`: pages of `block_size`,
    block sharing on, and radixkv's `capacity_tokens` plus room for the whole workload in flight.
    NotApplicable when this transformers version has no `generate_batch`."""
    if not hasattr(model, "generate_batch"):
        raise NotApplicable("this transformers version has no model.generate_batch")
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    # Its pool holds the requests in flight as well as the cached blocks; the other methods keep
    # in-flight KV outside the cache. So: the cache budget + room for a whole round or batch in
    # flight (bounded by every conversation's turns and answers).
    in_flight = sum(sum(map(len, c.turns)) + len(c.turns) * workload.max_new_tokens for c in workload.conversations)
    assert settings.capacity_tokens is not None
    num_pages = math.ceil((settings.capacity_tokens + in_flight) / settings.block_size)
    longest = max(len(c.turns[0]) for c in workload.conversations)
    return ContinuousBatchingConfig(
        page_size=settings.block_size,
        num_blocks=num_pages,
        max_batch_tokens=max(512, min(longest, 4096)),
        allow_block_sharing=True,
    )


def run_continuous_batching(model: PreTrainedModel, workload: Workload, settings: BenchSettings) -> MethodRun:
    """Run the workload round by round through `generate_batch`; raises on failed requests."""
    cb_config = continuous_batching_config(model, workload, settings)
    num_pages = cb_config.num_blocks
    history: dict[str, Tokens] = {}
    results: list[RequestResult] = []
    hits: dict[str, int] = {}
    total = 0.0
    cb_logger = logging.getLogger("ContinuousBatchingLogger")
    level = cb_logger.level
    cb_logger.setLevel(logging.ERROR)  # it warns about the disabled EOS on every call
    try:
        with count_prefix_hits(hits) as counted:
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


@dataclass(frozen=True)
class MethodSpec:
    """A method's name and constructor, sequential or batch by what `make` returns (see the module
    docstring); `default`: run when `--methods` is not given."""

    name: str
    make: Callable[..., SequentialMethod | MethodRun]
    default: bool = True


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("generate", make_generate),
        MethodSpec("prompt-reuse", make_prompt_reuse),
        MethodSpec("continuous-batching", run_continuous_batching),
        MethodSpec("radixkv", make_radixkv),
        MethodSpec(
            "radixkv-reuse-generated",
            functools.partial(make_radixkv, reuse_generated=True, name="radixkv-reuse-generated"),
            default=False,
        ),
        MethodSpec(
            "radixkv-private",
            functools.partial(make_radixkv, share_prefixes=False, name="radixkv-private"),
            default=False,
        ),
    )
}
DEFAULT_METHODS: tuple[str, ...] = tuple(name for name, spec in METHODS.items() if spec.default)
DEFAULT_BATCH_METHODS: tuple[str, ...] = ("generate", "radixkv", "continuous-batching")
"""The methods `radixkv bench rag-batch` runs by default (see `benchmarks.batched`)."""
