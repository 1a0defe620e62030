"""Few-shot multiple-choice scoring through lm-evaluation-harness: HFLM over the plain model vs
`radixkv-hf` (RadixHFLM, `CachedModel.score`), side by side in one process.

    OMP_NUM_THREADS=1 python -m radixkv.benchmarks.scoring --out benchmarks/results/scoring
    OMP_NUM_THREADS=1 python -m radixkv.benchmarks.scoring --memory-requests 5000 --out benchmarks/results/scoring

The task is built here (no dataset download): passages from `benchmarks/texts/documents` with an
addition question and four numeric choices each; five worked examples form a shared few-shot
prefix of about `--prefix-tokens` tokens, then `--questions` new questions, each choice a separate
`loglikelihood` request (multi-token continuations, as in ARC or HellaSwag). The zero-shot set is
the same questions without the prefix. Both runs score the same requests; the script exits 1
unless every log-likelihood agrees within 1e-4 and the accuracy is the same.

`--memory-requests N` adds a long run on the random-weight `tiny` preset (no tokenizer: token ids
straight to `CachedModel.score`, so thousands of requests take seconds): N four-choice requests
with distinct 100-token contexts through a 4,096-token pool, the process's RSS every N/10
requests. Timings are wall-clock on whatever machine runs this; report them as ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from radixkv.integrations.models import load

import radixkv

SHOTS = 5
CHOICES = 4


def passages() -> list[str]:
    folder = resources.files("radixkv.benchmarks") / "texts" / "documents"
    return [folder.joinpath(name).read_text().strip() for name in sorted(p.name for p in folder.iterdir())]


def question(rng: random.Random) -> tuple[str, list[str], int]:
    """An addition question, four distinct numeric choices and the index of the right one."""
    a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
    right = a + b
    choices = {right}
    while len(choices) < CHOICES:
        choices.add(right + rng.choice([-100, -10, -1, 1, 10, 100]) * rng.randrange(1, 4))
    ordered = sorted(choices, key=lambda _: rng.random())
    text = f"Question: What is {a} + {b}?\nChoices: {', '.join(map(str, ordered))}\nAnswer:"
    return text, [str(c) for c in ordered], ordered.index(right)


def few_shot_prefix(tokenizer: Any, target_tokens: int, rng: random.Random) -> str:
    """Five worked examples, each after a passage cut to the word count that brings the prefix to
    at least `target_tokens` tokens."""
    docs = [p.split() for p in passages()]
    shots = [question(rng) for _ in range(SHOTS)]
    words = 10
    while True:
        text = "Read each passage, then answer the question.\n\n"
        for i, (q, choices, right) in enumerate(shots):
            passage = " ".join(docs[i % len(docs)][:words])
            text += f"Passage: {passage}\n{q} {choices[right]}\n\n"
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= target_tokens or words > 10_000:
            return text
        words += 5


def requests(prefix: str, questions: list[tuple[str, list[str], int]]) -> list[Any]:
    from lm_eval.api.instance import Instance

    out = []
    for q, choices, _ in questions:
        for choice in choices:
            pair = (prefix + q, " " + choice)
            out.append(Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=len(out)))
    return out


def accuracy(answers: list[tuple[float, bool]], questions: list[tuple[str, list[str], int]]) -> float:
    right = 0
    for i, (_, _, gold) in enumerate(questions):
        lls = [answers[i * CHOICES + j][0] for j in range(CHOICES)]
        right += int(max(range(CHOICES), key=lambda j: lls[j]) == gold)
    return right / len(questions)


def timed(lm: Any, reqs: list[Any]) -> tuple[list[tuple[float, bool]], float]:
    start = time.perf_counter()
    answers = lm.loglikelihood(reqs, disable_tqdm=True)
    return answers, time.perf_counter() - start


def compare(name: str, plain_lm: Any, make_cached: Any, reqs: list[Any], qs: list[Any], rounds: int) -> dict[str, Any]:
    """`rounds` pairs of runs (plain, then radixkv-hf on a fresh cache); the ratio of the medians."""
    plain_times, cached_times = [], []
    plain_answers: list[tuple[float, bool]] = []
    cached_answers: list[tuple[float, bool]] = []
    stats = None
    for _ in range(rounds):
        plain_answers, t = timed(plain_lm, reqs)
        plain_times.append(t)
        ours = make_cached()
        cached_answers, t = timed(ours, reqs)
        cached_times.append(t)
        stats = ours.cached_model.score_stats
        del ours
        gc.collect()
    diff = max(abs(a[0] - b[0]) for a, b in zip(plain_answers, cached_answers, strict=True))
    plain_s, cached_s = sorted(plain_times)[rounds // 2], sorted(cached_times)[rounds // 2]
    assert stats is not None
    return {
        "set": name,
        "requests": len(reqs),
        "rounds": rounds,
        "plain_s": round(plain_s, 2),
        "cached_s": round(cached_s, 2),
        "cached_over_plain": round(cached_s / plain_s, 3),
        "speedup": round(plain_s / cached_s, 2),
        "plain_times": [round(t, 2) for t in plain_times],
        "cached_times": [round(t, 2) for t in cached_times],
        "accuracy_plain": accuracy(plain_answers, qs),
        "accuracy_cached": accuracy(cached_answers, qs),
        "max_abs_loglikelihood_diff": diff,
        "same_greedy": all(a[1] == b[1] for a, b in zip(plain_answers, cached_answers, strict=True)),
        "context_tokens": stats.context_tokens,
        "reused_tokens": stats.reused_tokens,
    }


def memory_run(n: int) -> dict[str, Any]:
    """N requests of four choices with distinct contexts through a small pool; RSS along the way."""
    import psutil

    tiny = load("tiny")
    cached = radixkv.wrap(tiny.model, capacity_tokens=4096)
    vocab = tiny.model.config.vocab_size
    rng = random.Random(1)
    proc = psutil.Process()
    rss: list[tuple[int, float]] = []
    step = max(1, n // 10)
    start = time.perf_counter()
    for i in range(n):
        context = [rng.randrange(3, vocab) for _ in range(100)]
        conts = [[rng.randrange(3, vocab) for _ in range(3)] for _ in range(CHOICES)]
        cached.score([context] * CHOICES, conts)
        if (i + 1) % step == 0:
            gc.collect()
            rss.append((i + 1, round(proc.memory_info().rss / 2**20, 1)))
    assert cached.cache is not None
    stats = cached.cache.stats
    return {
        "model": "tiny (random weights)",
        "requests": n,
        "rows": n * CHOICES,
        "capacity_tokens": stats.capacity_tokens,
        "cached_tokens": stats.cached_tokens,
        "evicted_tokens": stats.evicted_tokens,
        "rss_mib": rss,
        "rss_growth_after_first_tenth_mib": round(rss[-1][1] - rss[0][1], 1),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--prefix-tokens", type=int, default=1000, help="few-shot prefix length (at least)")
    parser.add_argument("--batch-size", type=int, default=1, help="HFLM's batch_size, the same for both")
    parser.add_argument("--zero-shot-rounds", type=int, default=3, help="timed pairs for the zero-shot set")
    parser.add_argument("--memory-requests", type=int, default=0, help="also run the long memory run")
    parser.add_argument("--skip-few-shot", action="store_true", help="only the zero-shot set (and memory)")
    parser.add_argument("--out", type=Path, default=None, help="directory for results.json and table.md")
    args = parser.parse_args(argv)
    if args.questions < 1 or args.prefix_tokens < 1 or args.batch_size < 1 or args.zero_shot_rounds < 1:
        parser.error("--questions, --prefix-tokens, --batch-size and --zero-shot-rounds must be >= 1")

    from lm_eval.models.huggingface import HFLM
    from radixkv.integrations.lmeval import RadixHFLM

    lm = load("smollm2")
    rng = random.Random(0)
    prefix = few_shot_prefix(lm.tokenizer, args.prefix_tokens, rng)
    prefix_tokens = len(lm.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    qs = [question(rng) for _ in range(args.questions)]
    plain_lm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=args.batch_size)

    def make_cached() -> Any:
        return RadixHFLM(pretrained=radixkv.wrap(lm.model), tokenizer=lm.tokenizer, batch_size=args.batch_size)

    with torch.inference_mode():  # one short pass each, so neither run pays first-call costs
        warm = requests("", qs[:1])
        timed(plain_lm, warm)
        timed(make_cached(), warm)
    results: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (float32)",
        "questions": args.questions,
        "choices": CHOICES,
        "prefix_tokens": prefix_tokens,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "sets": [],
    }
    if not args.skip_few_shot:
        results["sets"].append(compare("5-shot", plain_lm, make_cached, requests(prefix, qs), qs, 1))
    results["sets"].append(compare("zero-shot", plain_lm, make_cached, requests("", qs), qs, args.zero_shot_rounds))
    if args.memory_requests:
        results["memory"] = memory_run(args.memory_requests)

    table = (
        "| set | requests | HFLM plain | radixkv-hf | speed-up | accuracy (plain / radixkv) | max abs log-lik diff "
        "| reused / context tokens |\n|---|---|---|---|---|---|---|---|\n"
    )
    for s in results["sets"]:
        table += (
            f"| {s['set']} | {s['requests']} | {s['plain_s']:.1f} s | {s['cached_s']:.1f} s | {s['speedup']:.2f}x "
            f"| {s['accuracy_plain']:.2f} / {s['accuracy_cached']:.2f} | {s['max_abs_loglikelihood_diff']:.1e} "
            f"| {s['reused_tokens']:,} / {s['context_tokens']:,} |\n"
        )
    print(table)
    print(json.dumps(results))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "table.md").write_text(table)
    ok = all(
        s["max_abs_loglikelihood_diff"] <= 1e-4 and s["same_greedy"] and s["accuracy_plain"] == s["accuracy_cached"]
        for s in results["sets"]
    )
    if not ok:
        print("radixkv-hf and HFLM disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
