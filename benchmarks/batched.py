"""`radixkv bench rag-batch`: questions sent in left-padded batches, one `generate` call per batch.

Methods, side by side on one model, the same batches and greedy settings:

- `generate`: plain `model.generate` on each padded batch (the token reference).
- `radixkv`, `radixkv-reuse-generated`, `radixkv-private`: `radixkv.wrap(model, ...)`,
  `cached.generate` on the same padded batches (the defaults; `reuse_generated=True`;
  `share_prefixes=False`, every row computing and holding its own copy of a shared prefix, as
  before sharing inside a call).
- `continuous-batching`: transformers' `generate_batch` with block sharing, one call per batch
  (its requests packed, no padding), the manager kept across batches; sized as in the per-request
  benches (`methods.continuous_batching_config`).

`generate` and the radixkv methods run interleaved batch by batch (the order alternating between
batches), so they share the machine's noise; continuous batching runs alone first, as in the
other benches. Per batch and method the bench records:

- prefill positions: rows x columns the model embedded before the batch's first token, counted
  at the model's input embeddings (`PositionCounter`), whatever path called the model. Plain
  `generate` embeds rows x padded width; radixkv rows x the columns it did not read from its
  cache (so sharing a prefix inside a batch shows here as cross-batch reuse does). Continuous
  batching packs its requests without padding and mixes prefill and decode steps: its figure is
  the positions embedded during the call minus one per generated token after a request's first.
- prompt tokens computed: real prompt tokens (padding excluded) minus those read from a cache:
  radixkv's `cached.stats.reused_tokens` less its `computed_once_tokens` (prefixes it computed
  once for several rows of the batch; before and after the call), continuous batching's
  prefix-match hits; plain `generate` computes them all. Hit rate = reused / prompt tokens.
- wall time of the call, and for the padded methods the time to the batch's first token.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from .methods import (
    BenchSettings,
    NotApplicable,
    continuous_batching_config,
    count_prefix_hits,
    greedy_config,
)
from .outcomes import BatchBenchResult, BatchOutcome, BatchResult, BatchRun
from .report import batch_to_json, format_batch_table, plot_batch_methods
from .runner import _describe, bench_model, machine_info
from .workloads import RagBatchParams, RagBatchWorkload, Tokens, build_rag_batch

PAD_ID = 0  # greedy_config's pad id; the workload draws tokens from 3 up


class PositionCounter:
    """Counts the token positions (rows x columns) every forward pass feeds the model, at its input
    embeddings; use as a context manager (the hook is removed on exit)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.positions = 0
        self._embeddings = model.get_input_embeddings()
        self._handle: Any = None

    def _hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs["input"]
        self.positions += ids.numel()

    def __enter__(self) -> PositionCounter:
        self._handle = self._embeddings.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


class PrefillMark(BaseStreamer):
    """A streamer noting, when the first generated token arrives (generate's second `put`; the
    prompt is the first), the seconds since its creation and the positions `counter` saw since."""

    def __init__(self, counter: PositionCounter) -> None:
        self.counter = counter
        self.start = perf_counter()
        self.base = counter.positions
        self.ttft_s: float | None = None
        self.prefill_positions: int | None = None
        self._puts = 0

    def put(self, value: object) -> None:
        self._puts += 1
        if self._puts == 2:
            self.ttft_s = perf_counter() - self.start
            self.prefill_positions = self.counter.positions - self.base

    def end(self) -> None:
        """Called by generate when it finishes; nothing to do."""


def left_padded(prompts: Sequence[Tokens], device: Any = None, pad: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `prompts` as one left-padded batch, [B, longest]."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


# A padded method: serve(batch index) -> BatchResult, and finish() -> extra figures for results.json.
Serve = Callable[[int], BatchResult]


@dataclass
class PaddedMethod:
    name: str
    serve: Serve
    finish: Callable[[], dict[str, Any]] | None = None


def _serve_padded(
    generate: Callable[..., Any],
    model: PreTrainedModel,
    workload: RagBatchWorkload,
    k: int,
    counter: PositionCounter,
    reused: Callable[[], int],
) -> BatchResult:
    """Batch `k` through `generate` (the model's or the wrapper's); `reused()` reads the running
    count of prompt tokens read from a cache (taken before and after the call)."""
    rows = workload.batch_prompts(k)
    prompts = tuple(p for _, p in rows)
    ids, mask = left_padded(prompts, model.device)
    before = reused()
    mark = PrefillMark(counter)
    out = generate(ids, attention_mask=mask, generation_config=greedy_config(workload.max_new_tokens), streamer=mark)
    wall = perf_counter() - mark.start
    width = ids.shape[1]
    if mark.prefill_positions is None:
        raise RuntimeError("generate produced no token: the prefill could not be measured")
    return BatchResult(
        name=workload.batch_names[k],
        keys=tuple(cid for cid, _ in rows),
        prompts=prompts,
        generated=tuple(tuple(r) for r in out[:, width:].tolist()),
        width=width,
        wall_s=wall,
        ttft_s=mark.ttft_s,
        prefill_positions=mark.prefill_positions,
        reused_tokens=reused() - before,
    )


def make_generate(
    model: PreTrainedModel, workload: RagBatchWorkload, settings: BenchSettings, counter: PositionCounter
) -> PaddedMethod:
    """Plain `model.generate` on each padded batch: every column of every row is computed."""
    return PaddedMethod("generate", lambda k: _serve_padded(model.generate, model, workload, k, counter, lambda: 0))


def make_radixkv(
    model: PreTrainedModel,
    workload: RagBatchWorkload,
    settings: BenchSettings,
    counter: PositionCounter,
    *,
    reuse_generated: bool | None = None,
    share_prefixes: bool | None = None,
    name: str = "radixkv",
) -> PaddedMethod:
    """`radixkv.wrap(model, ...)` on the same padded batches; reuse read from `cached.stats` (reused
    tokens less those computed once for several rows of the batch)."""
    cached = settings.wrap(model, reuse_generated=reuse_generated, share_prefixes=share_prefixes)
    cache = cached.cache

    def finish() -> dict[str, Any]:
        cache.check_invariants()
        stats = cached.stats
        if stats.uncached_calls:  # a batch passed through uncached would be no measurement of radixkv
            raise RuntimeError(f"{stats.uncached_calls} batch(es) ran uncached")
        return {"cache_stats": dataclasses.asdict(cache.stats), "reuse_generated": cached.reuse_generated}

    def serve(k: int) -> BatchResult:
        def read_from_cache() -> int:
            stats = cached.stats
            return stats.reused_tokens - stats.computed_once_tokens

        return _serve_padded(cached.generate, model, workload, k, counter, read_from_cache)

    return PaddedMethod(name, serve, finish)


def run_continuous_batching(
    model: PreTrainedModel, workload: RagBatchWorkload, settings: BenchSettings, counter: PositionCounter
) -> BatchRun:
    """Each batch as one `generate_batch` call, the manager (and its shared blocks) kept across calls."""
    cb_config = continuous_batching_config(model, workload, settings)
    hits: dict[str, int] = {}
    batches: list[BatchResult] = []
    cb_logger = logging.getLogger("ContinuousBatchingLogger")
    level = cb_logger.level
    cb_logger.setLevel(logging.ERROR)  # it warns about the disabled EOS and the kept manager on every call
    try:
        with count_prefix_hits(hits) as counted:
            for k in range(len(workload.batches)):
                rows = workload.batch_prompts(k)
                before, start = counter.positions, perf_counter()
                outputs = model.generate_batch(
                    [list(p) for _, p in rows],
                    generation_config=greedy_config(workload.max_new_tokens),
                    continuous_batching_config=cb_config,
                    progress_bar=False,
                    persistent_manager=True,
                    warmup=False,
                )
                wall = perf_counter() - start
                if len(outputs) != len(rows):
                    raise RuntimeError(f"generate_batch returned {len(outputs)} of {len(rows)} results")
                generated, reused = [], 0
                for req_id, out in outputs.items():
                    if out.error is not None:
                        raise RuntimeError(f"generate_batch request {req_id} failed: {out.error}")
                    generated.append(tuple(out.generated_tokens))
                    reused += hits.get(req_id, 0)
                # Every generated token after a request's first is one decode position.
                decode = sum(max(0, len(g) - 1) for g in generated)
                batches.append(
                    BatchResult(
                        name=workload.batch_names[k],
                        keys=tuple(cid for cid, _ in rows),
                        prompts=tuple(p for _, p in rows),
                        generated=tuple(generated),
                        width=0,
                        wall_s=wall,
                        ttft_s=None,
                        prefill_positions=counter.positions - before - decode,
                        reused_tokens=reused,
                    )
                )
    finally:
        cb_logger.setLevel(level)
        destroy = getattr(model, "destroy_cached_continuous_batching_manager", None)
        if destroy is not None:
            destroy()
    return BatchRun(
        "continuous-batching",
        batches,
        {"page_size": settings.block_size, "num_blocks": cb_config.num_blocks, "hits_counted": counted},
    )


# name -> constructor of a padded method, or the runner of a method that runs alone
PADDED: dict[str, Callable[..., PaddedMethod]] = {
    "generate": make_generate,
    "radixkv": make_radixkv,
    "radixkv-reuse-generated": functools.partial(make_radixkv, reuse_generated=True, name="radixkv-reuse-generated"),
    "radixkv-private": functools.partial(make_radixkv, share_prefixes=False, name="radixkv-private"),
}
ALONE: dict[str, Callable[..., BatchRun]] = {"continuous-batching": run_continuous_batching}


def run_batched(
    model: PreTrainedModel, workload: RagBatchWorkload, settings: BenchSettings, model_info: dict[str, Any]
) -> BatchBenchResult:
    """Run `settings.methods` on the batched workload and compare every row's tokens with the first
    method's: the methods that run alone first, then the padded ones interleaved batch by batch. A
    method that does not apply is an "n/a" row, one that raises a "failed" row (the run goes on)."""
    # One short untimed padded generate so no method pays first-call costs (allocator, kernels).
    vocab = model.config.get_text_config().vocab_size
    warm = [tuple(3 + (i % (vocab - 3)) for i in range(n)) for n in (24, 32)]
    ids, mask = left_padded(warm, model.device)
    outcomes: dict[str, BatchOutcome] = {}
    padded: list[PaddedMethod] = []
    with torch.no_grad(), PositionCounter(model) as counter:
        model.generate(ids, attention_mask=mask, generation_config=greedy_config(2))
        for name in settings.methods:
            try:
                if name in ALONE:
                    outcomes[name] = BatchOutcome(name, "ok", run=ALONE[name](model, workload, settings, counter))
                elif name in PADDED:
                    padded.append(PADDED[name](model, workload, settings, counter))
                else:
                    raise NotApplicable("a per-request method; this workload sends padded batches")
            except NotApplicable as exc:
                outcomes[name] = BatchOutcome(name, "n/a", str(exc))
            except Exception as exc:
                outcomes[name] = BatchOutcome(name, "failed", _describe(exc))
        runs = {m.name: BatchRun(m.name, []) for m in padded}
        failed: dict[str, BaseException] = {}
        for k in range(len(workload.batches)):
            # Alternate the order between batches, so that no method always runs right after another.
            for m in padded if k % 2 == 0 else padded[::-1]:
                if m.name in failed:
                    continue
                try:
                    runs[m.name].batches.append(m.serve(k))
                except Exception as exc:
                    failed[m.name] = exc
        for m in padded:
            if m.name not in failed and m.finish is not None:
                try:
                    runs[m.name].extra.update(m.finish())
                except Exception as exc:
                    failed[m.name] = exc
            if m.name in failed:
                outcomes[m.name] = BatchOutcome(m.name, "failed", _describe(failed[m.name]))
            else:
                outcomes[m.name] = BatchOutcome(m.name, "ok", run=runs[m.name])
    ordered = [outcomes[name] for name in settings.methods]
    result = BatchBenchResult(workload, model_info, settings, ordered, machine_info(str(model.device)))
    ref = result.reference
    if ref is not None and ref.run is not None:
        expected = ref.run.outputs
        for o in ordered:
            if o.run is not None and o is not ref:
                got = o.run.outputs
                o.mismatches = [key for key in expected if got.get(key) != expected[key]]
                o.same_tokens = not o.mismatches
    return result


def run_rag_batch(
    params: RagBatchParams, settings: BenchSettings, model: PreTrainedModel | None = None
) -> BatchBenchResult:
    """`radixkv bench rag-batch`: load the model (unless given), build the workload, run the methods,
    print the tables; with `settings.out`, write ``results.json``, ``table.md`` and ``methods.png``."""
    settings, model, info = bench_model(settings, model)
    vocab = model.config.get_text_config().vocab_size
    workload = build_rag_batch(params, vocab_size=vocab, seed=settings.seed, block_size=settings.block_size)
    result = run_batched(model, workload, settings, info)
    table = format_batch_table(result)
    print(f"\n## {workload.name}\n")
    print(table)
    if (out := settings.out) is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(batch_to_json(result), indent=1))
        (out / "table.md").write_text(f"## {workload.name}\n\n{table}\n")
        plot_batch_methods(result, out / "methods.png")
        print(f"\nwrote {out / 'results.json'}, {out / 'table.md'} and {out / 'methods.png'}")
    return result
