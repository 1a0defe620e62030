"""Run the methods side by side on one model and workload, compare them, write the outputs; the demo.

All methods run in one process on the same model, prompts and greedy settings, after one untimed
warm-up generate; the one-request-at-a-time methods are interleaved request by request. Every
method's tokens are compared with the reference's, `generate`, request by request.

`radixkv bench WORKLOAD` is `run_model_bench`; `radixkv demo` is `run_demo`: on a model with a
chat template (the default, SmolLM2-135M-Instruct) it runs the three chat scenarios (assistant,
chat, RAG) through every method and prints a few answers of plain `generate` (with the prompt
tokens radixkv reused) above each table; on one without (the presets), the synthetic
system-prompt workload, as `radixkv bench system-prompt` does.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import transformers
from radixkv.integrations.models import PRESETS, load, load_model
from transformers import PreTrainedModel

from .methods import METHODS, BenchSettings, MethodRun, NotApplicable, SequentialMethod, greedy_config, run_interleaved
from .outcomes import BenchResult, MethodOutcome
from .report import format_table, plot_methods, to_json
from .workloads import (
    WORKLOADS,
    ChatWorkload,
    Workload,
    assistant_workload,
    best_hit_tokens,
    chat_workload,
    rag_workload,
)

_EXCERPT = 110  # characters of each answer printed


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _describe(exc: BaseException) -> str:
    """'Type: message' of an exception, cut to 300 characters, for the table."""
    return traceback.format_exception_only(type(exc), exc)[-1].strip()[:300]


def run_methods(
    model: PreTrainedModel, workload: Workload, settings: BenchSettings, model_info: dict[str, Any]
) -> BenchResult:
    """Run `settings.methods` on `workload` and compare their tokens: batch methods alone, in order,
    then the sequential ones interleaved (`run_interleaved`); rows keep the order of `methods`. A
    method raising `NotApplicable` becomes an "n/a" row, any other exception a "failed" row with its
    type and message (the run goes on). The best hit rate comes from the reference's prompts and
    answers (`best_hit_tokens`)."""
    methods = settings.methods
    # One short untimed generate so no method pays first-call costs (allocator, kernels).
    ids = torch.arange(3, 35, device=model.device).unsqueeze(0) % model.config.get_text_config().vocab_size
    model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy_config(2))
    outcomes: dict[str, MethodOutcome] = {}
    sequential: list[SequentialMethod] = []
    with torch.no_grad():
        for name in methods:  # build the sequential ones, run the batch ones alone
            spec = METHODS[name]
            cpu_start = time.process_time()
            try:
                made = spec.make(model, workload, settings)
            except NotApplicable as exc:
                outcomes[name] = MethodOutcome(name, "n/a", str(exc))
                continue
            except Exception as exc:
                outcomes[name] = MethodOutcome(name, "failed", _describe(exc))
                continue
            if isinstance(made, SequentialMethod):
                sequential.append(made)
            else:
                made.extra["cpu_s"] = time.process_time() - cpu_start  # all threads of the process
                outcomes[name] = MethodOutcome(name, "ok", run=made)
        for method, run in zip(
            sequential, run_interleaved(sequential, workload, progress=settings.progress), strict=True
        ):
            if isinstance(run, MethodRun):
                outcomes[method.name] = MethodOutcome(method.name, "ok", run=run)
            else:
                outcomes[method.name] = MethodOutcome(method.name, "failed", _describe(run))
    ordered = [outcomes[name] for name in methods]
    result = BenchResult(workload, model_info, settings, ordered, None, machine_info(str(model.device)))
    ref = result.reference
    if ref is not None and ref.run is not None:
        expected = ref.run.outputs
        for o in ordered:
            if o.run is None or o is ref:
                continue
            got = o.run.outputs
            o.mismatches = [k for k in expected if got.get(k) != expected[k]]
            o.same_tokens = not o.mismatches
        hit, total = best_hit_tokens(((r.prompt, r.generated) for r in ref.run.requests), settings.block_size)
        result.best_hit_rate = hit / total if total else math.nan
    return result


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available else cpu; anything else is passed to torch as is."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a device ({exc})") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available here; use cpu or auto")
    return device


def _model_info(settings: BenchSettings, model: PreTrainedModel, device: str, description: str) -> dict[str, Any]:
    return {
        "name": settings.model,
        "description": description,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": settings.dtype,
        "device": device,
        "seed": settings.seed,
    }


def _run_and_write(
    model: PreTrainedModel,
    workload: Workload,
    settings: BenchSettings,
    model_info: dict[str, Any],
    *,
    title: str,
    out: Path | None,
    answers: bool = False,
) -> BenchResult:
    """Run the methods on `workload`, print the table (and sample answers), write the outputs to `out`."""
    result = run_methods(model, workload, settings, model_info)
    table = format_table(result)
    print(f"\n## {title}\n")
    if answers and isinstance(workload, ChatWorkload):
        print("\n".join(_answers(workload, result)))
        print()
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(to_json(result), indent=1))
        (out / "table.md").write_text(f"## {workload.name}\n\n{table}\n")
        plot_methods(result, out / "methods.png")
    return result


def bench_model(
    settings: BenchSettings, model: PreTrainedModel | None = None
) -> tuple[BenchSettings, PreTrainedModel, dict[str, Any]]:
    """What every `radixkv bench` workload starts with: torch threads set, the default capacity
    (32,768 tokens) filled in, the model `settings.model` names built on its device unless given,
    and the model's description for results.json."""
    settings.set_threads()
    settings = settings.with_capacity(32768)
    device = resolve_device(settings.device)
    if model is None:
        if settings.progress:
            print(f"building model {settings.model!r} on {device} ({settings.dtype})...", file=sys.stderr)
        model = load_model(settings.model, device=device, dtype=settings.dtype, seed=settings.seed)
    preset = PRESETS.get(settings.model)
    return settings, model, _model_info(settings, model, device, preset.description if preset else settings.model)


def run_model_bench(
    workload: str, params: Any, settings: BenchSettings, model: PreTrainedModel | None = None
) -> BenchResult:
    """`radixkv bench WORKLOAD`: load the model (unless `model`, the one `settings.model` names, is
    given), build the workload from `params` (its params dataclass), run the methods, print the
    table; with `settings.out`, write ``results.json``, ``table.md`` and ``methods.png`` there."""
    spec = WORKLOADS[workload]
    settings, model, info = bench_model(settings, model)
    vocab = model.config.get_text_config().vocab_size
    built = spec.build(params, vocab_size=vocab, seed=settings.seed, block_size=settings.block_size)
    result = _run_and_write(model, built, settings, info, title=built.name, out=settings.out)
    if (out := settings.out) is not None:
        print(f"\nwrote {out / 'results.json'}, {out / 'table.md'} and {out / 'methods.png'}")
    return result


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXCERPT else flat[: _EXCERPT - 3].rstrip() + "..."


def _answers(workload: ChatWorkload, result: BenchResult) -> list[str]:
    """Lines showing each request's user message, the reference answer and radixkv's reuse."""
    ref = result.reference
    if ref is None or ref.run is None or workload.renderer is None:
        return []
    radix = next((o.run for o in result.outcomes if o.name == "radixkv" and o.run is not None), None)
    reused = {r.key: r.cached_tokens for r in radix.requests} if radix else {}
    lines = []
    for r in ref.run.requests:
        conv, rnd = r.key.rsplit("/r", 1)
        user = workload.user_turns[conv][int(rnd)].rsplit("Question: ", 1)[-1]
        hit = f"  [radixkv reused {reused[r.key]:,} of {r.prompt_tokens:,} prompt tokens]" if r.key in reused else ""
        lines.append(f"  user: {_excerpt(user)}{hit}")
        lines.append(textwrap.indent(f"model: {_excerpt(workload.renderer.answer_text(r.generated))}", "  "))
    return lines


def run_demo(settings: BenchSettings) -> list[BenchResult]:
    """`radixkv demo` (see the module docstring); returns one result per scenario."""
    settings.set_threads()
    device = resolve_device(settings.device)
    if settings.progress:
        print(f"loading model {settings.model!r} on {device} ({settings.dtype})...", file=sys.stderr)
    loaded = load(settings.model, device=device, dtype=settings.dtype, seed=settings.seed)
    tokenizer = loaded.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        spec = WORKLOADS["system-prompt"]
        return [run_model_bench(spec.name, spec.params_cls(), settings, model=loaded.model)]

    settings = settings.with_capacity(8192)
    model = loaded.model
    stop = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
    kw: dict[str, Any] = {"max_new_tokens": settings.new_tokens, "stop_token_id": stop}
    scenarios = [
        (
            "an assistant with a ~1,000-token system prompt, 3 questions",
            assistant_workload(tokenizer, questions=3, **kw),
        ),
        ("a 4-turn chat; each prompt is the chat template over the history", chat_workload(tokenizer, **kw)),
        ("RAG: 2 of 4 documents per question, in retrieval order", rag_workload(tokenizer, requests=4, **kw)),
    ]
    description = f"{settings.model} ({loaded.path})" if loaded.path else settings.model
    info = _model_info(settings, model, device, description)
    results = []
    for title, workload in scenarios:
        if settings.progress:
            print(f"running {workload.name}: {title}...", file=sys.stderr)
        out = settings.out / workload.name if settings.out is not None else None
        title = f"{workload.name}: {title}"
        results.append(_run_and_write(model, workload, settings, info, title=title, out=out, answers=True))
    if settings.out is not None:
        print(f"\nwrote results.json, table.md and methods.png for each scenario under {settings.out}")
    return results
