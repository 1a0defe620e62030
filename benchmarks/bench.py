"""`radixkv bench WORKLOAD` / `radixkv demo`: run a model workload and write its outputs."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from radixkv import DEFAULT_EVICTION

from .compare import BenchResult, run_methods
from .methods import DEFAULT_METHODS, BenchSettings
from .plots import plot_methods
from .presets import PRESETS, load_model
from .report import format_table, to_json
from .workloads import get_workload

__all__ = ["ModelBenchArgs", "run_model_bench"]


@dataclass(frozen=True)
class ModelBenchArgs:
    """Everything `run_model_bench` needs (the CLI fills it from flags)."""

    workload: str
    params: Any  # the workload's params dataclass instance
    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    capacity_tokens: int = 32768
    block_size: int = 16
    eviction: str = DEFAULT_EVICTION
    seed: int = 0
    methods: tuple[str, ...] = DEFAULT_METHODS
    out: Path | None = None
    progress: bool = True


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


def run_model_bench(args: ModelBenchArgs, model: PreTrainedModel | None = None) -> BenchResult:
    """Load the model (unless `model` is the one `args.model` names, already loaded), build the
    workload, run the methods, print the table, write outputs.

    With `args.out`, writes ``results.json``, ``table.md`` and ``methods.png`` there. Returns the result.
    """
    spec = get_workload(args.workload)
    if args.capacity_tokens <= 0 or args.block_size <= 0:
        raise ValueError(
            f"--capacity-tokens and --block-size must be positive, got {args.capacity_tokens} and {args.block_size}"
        )
    device = resolve_device(args.device)
    if model is None:
        if args.progress:
            print(f"building model {args.model!r} on {device} ({args.dtype})...", file=sys.stderr)
        model = load_model(args.model, device=device, dtype=args.dtype, seed=args.seed)
    vocab = model.config.get_text_config().vocab_size
    workload = spec.build(args.params, vocab_size=vocab, seed=args.seed, block_size=args.block_size)
    settings = BenchSettings(args.capacity_tokens, args.block_size, args.eviction, args.progress)
    model_info = {
        "name": args.model,
        "description": PRESETS[args.model].description if args.model in PRESETS else args.model,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": args.dtype,
        "device": device,
        "seed": args.seed,
    }
    result = run_methods(model, workload, settings, methods=list(args.methods), model_info=model_info)
    table = format_table(result)
    print(f"\n## {workload.name}\n")
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(to_json(result), indent=1))
        (args.out / "table.md").write_text(f"## {workload.name}\n\n{table}\n")
        plot = plot_methods(result, args.out / "methods.png")
        print(f"\nwrote {args.out / 'results.json'}, {args.out / 'table.md'} and {plot}")
    return result
