"""`radixkv demo` on a real chat model: an assistant, a 4-turn chat and RAG, against the peers.

With a model that has a tokenizer and a chat template (the default, SmolLM2-135M-Instruct), the
demo runs the three scenarios of `wl_chat` (assistant with a long system prompt, a conversation
that resends its history, RAG over the documents in ``benchmarks/texts/documents/``) through every
method: plain `generate`, the deep-copy prompt-reuse recipe, continuous batching
(`generate_batch`) and radixkv. For each it prints a few answers (from plain `generate`, with
the prompt tokens radixkv reused for that request) and the table: same tokens as plain
`generate`, TTFT, totals. A model without a chat template (the random-weight presets) runs the
synthetic system-prompt workload instead, as `radixkv bench system-prompt` does.
"""

from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bench import ModelBenchArgs, resolve_device, run_model_bench
from .compare import BenchResult, run_methods
from .loader import load
from .methods import BenchSettings
from .plots import plot_methods
from .report import format_table, to_json
from .wl_chat import ChatWorkload, assistant_workload, chat_workload, rag_workload
from .workloads import WORKLOADS

__all__ = ["DemoArgs", "run_demo"]

_EXCERPT = 110  # characters of each answer printed


@dataclass(frozen=True)
class DemoArgs:
    """What `radixkv demo` was asked for (the CLI fills it from flags)."""

    model: str
    device: str
    dtype: str
    capacity_tokens: int | None  # None: 8,192 on a chat model, 32,768 on a preset
    block_size: int
    eviction: str
    seed: int
    methods: tuple[str, ...]
    out: Path | None
    progress: bool
    new_tokens: int = 24


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


def _write(result: BenchResult, table: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(to_json(result), indent=1))
    (out / "table.md").write_text(f"## {result.workload.name}\n\n{table}\n")
    plot_methods(result, out / "methods.png")


def run_demo(args: DemoArgs) -> list[BenchResult]:
    """Run the demo (see the module docstring); returns one result per scenario."""
    device = resolve_device(args.device)
    if args.progress:
        print(f"loading model {args.model!r} on {device} ({args.dtype})...", file=sys.stderr)
    loaded = load(args.model, device=device, dtype=args.dtype, seed=args.seed)
    tokenizer = loaded.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        spec = WORKLOADS["system-prompt"]
        bench = ModelBenchArgs(
            workload=spec.name,
            params=spec.params_cls(),
            model=args.model,
            device=device,
            dtype=args.dtype,
            capacity_tokens=args.capacity_tokens or 32768,
            block_size=args.block_size,
            eviction=args.eviction,
            seed=args.seed,
            methods=args.methods,
            out=args.out,
            progress=args.progress,
        )
        return [run_model_bench(bench, model=loaded.model)]

    model = loaded.model
    stop = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
    kw: dict[str, Any] = {"max_new_tokens": args.new_tokens, "stop_token_id": stop}
    scenarios = [
        (
            "an assistant with a ~1,000-token system prompt, 3 questions",
            assistant_workload(tokenizer, questions=3, **kw),
        ),
        ("a 4-turn chat; each prompt is the chat template over the history", chat_workload(tokenizer, **kw)),
        ("RAG: 2 of 4 documents per question, in retrieval order", rag_workload(tokenizer, requests=4, **kw)),
    ]
    settings = BenchSettings(args.capacity_tokens or 8192, args.block_size, args.eviction, args.progress)
    model_info = {
        "name": args.model,
        "description": f"{args.model} ({loaded.path})" if loaded.path else args.model,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": args.dtype,
        "device": device,
        "seed": args.seed,
    }
    results = []
    for title, workload in scenarios:
        if args.progress:
            print(f"running {workload.name}: {title}...", file=sys.stderr)
        result = run_methods(model, workload, settings, methods=list(args.methods), model_info=model_info)
        table = format_table(result)
        print(f"\n## {workload.name}: {title}\n")
        print("\n".join(_answers(workload, result)))
        print()
        print(table)
        if args.out is not None:
            _write(result, table, args.out / workload.name)
        results.append(result)
    if args.out is not None:
        print(f"\nwrote results.json, table.md and methods.png for each scenario under {args.out}")
    return results
