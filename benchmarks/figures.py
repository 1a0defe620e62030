"""Single-figure model benchmarks, each one command comparing methods side by side in one run.

    python -m radixkv.benchmarks.figures real-model --out benchmarks/results/smollm2-bench
    python -m radixkv.benchmarks.figures ttft                  # llama-100m, float32, CPU
    python -m radixkv.benchmarks.figures ttft-tiers --repeats 3 --restart
    python -m radixkv.benchmarks.figures quant-quality [--segment 1024] [--new-tokens 32] [--json out.json]
    python -m radixkv.benchmarks.figures quant-speed [--tokens 1024] [--repeats 30] [--ttft]

`real-model` (SmolLM2, chat-template prompts) and `ttft` (a preset, random tokens) measure TTFT on
a prefix-cache hit beside the two baselines with one function, `ttft_side_by_side`. `FIGURE --help`
gives a figure's flags; the many-request workloads of `radixkv bench` / `demo` live in `runner`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from radixkv.integrations.models import SMOLLM2, load, load_model
from transformers import DynamicCache

import radixkv
from radixkv import KVSpec, PrefixCache

from .batched import left_padded
from .methods import METHODS, BenchSettings, MethodRun, run_interleaved
from .report import plot_real_model
from .workloads import (
    ASSISTANT_QUESTIONS,
    CHAT_TURNS,
    ChatRenderer,
    Conversation,
    Tokens,
    Workload,
    chat_workload,
    read_text,
)

_TTFT_LABELS = {"generate": "plain generate", "prompt-reuse": "deepcopy recipe", "radixkv": "radixkv hit"}

_PROG = "python -m radixkv.benchmarks.figures"
KV_DTYPES: tuple[str | None, ...] = (None, "int8", "int4")
TEXT = Path(__file__).parent / "data" / "public_domain.txt"

REAL_MODEL_DOC = """The trained chat model: TTFT under a ~1,000-token system prompt, and a 4-turn chat end to end.

Part 1: the chat template over the help-desk system prompt and one question each, through
`ttft_side_by_side`. Part 2: the 4-turn chat of `workloads.CHAT_TURNS` (the history re-rendered
with the model's decoded answers) through plain `generate` and radixkv: wall time and tokens
reused per turn. The exit status is 1 when the methods' tokens differ in either part.
"""
TTFT_DOC = """Time to first token on a prefix-cache hit, a preset with random tokens: one shared prefix
(2,048 tokens by default) and a fresh 32-token suffix per request, through `ttft_side_by_side`.
The exit status is 1 when the methods' first generated tokens differ.
"""
TTFT_TIERS_DOC = """Time to first token when the shared prefix comes from each tier, side by side in one run.

One shared prefix (2,048 random tokens), a fresh 32-token suffix per request, one token generated,
timed call to return (the insert after it included), the methods interleaved request by request:
device (the prefix in the pool), host (evicted to the host tier just before, promoted by the
match), disk (a disk-only cache, evicted to its files just before: a hot file in the OS page
cache, not a cold read) and recompute (`model.generate`). `--restart` adds a second process's
first request on the disk directory the first filled (indexing included) against a cold start's.
"""
QUANT_QUALITY_DOC = """Quality of quantised reuse (kv_dtype int8 / int4) on SmolLM2, against exact reuse.

Text: benchmarks/data/public_domain.txt. 1. Perplexity: the text is cut into segments of
`--segment` tokens; per segment the first half's KV is computed, inserted into a
PrefixCache(kv_dtype), matched and gathered back, and the second half is scored on top of the
gathered KV. Exact (kv_dtype None) equals no cache. 2. Greedy agreement: 50 chat prompts
sharing one document as system message; the document's KV is cached by a first call, then all
50 run in one batched `generate` through `radixkv.wrap(model, kv_dtype=...)` and are compared
token by token with plain `model.generate`: the share identical, and where the others diverge.
"""
QUANT_SPEED_DOC = """Cost of quantised reuse, as ratios to exact measured side by side (round robin, medians).

1. gather: `PrefixCache.gather` of `--tokens` tokens with dequantisation (int8, int4) vs the
   exact copy, for SmolLM2-135M's KV shape (30 layers, 3 KV heads, head_dim 64) in float32,
   float16 and bfloat16, on `--device` (default cpu; cuda for a GPU). Also insert (which
   quantises) for information.
   Then promotion: a prefix promoted from the host tier and gathered, and a pool hit on it,
   with exact tiers, kv_dtype, and kv_dtype with exact_pool (see `promotion_ratios`).
2. TTFT of a hit (`--ttft`, loads SmolLM2): `generate(max_new_tokens=1)` on a prompt whose
   first ~1,100 tokens are cached, through radixkv.wrap with each kv_dtype; the model in
   `--ttft-dtype` (float32 by default).
"""


# ----- TTFT on a hit: plain generate, the deepcopy recipe, radixkv -----------------------------------


def _serve(model: Any, workload: Workload, settings: BenchSettings, names: Sequence[str]) -> list[MethodRun]:
    """The bench's sequential methods `names` over `workload`, interleaved; raises what a method raised."""
    runs = run_interleaved([METHODS[n].make(model, workload, settings) for n in names], workload, progress=False)
    for run in runs:
        if isinstance(run, BaseException):
            raise run
    return runs  # type: ignore[return-value]


def ttft_side_by_side(
    model: Any, prefix: Tokens, warm: Tokens, prompts: Sequence[Tokens], settings: BenchSettings
) -> dict[str, Any]:
    """TTFT of each prompt (each starting with `prefix`) through the bench's methods `generate`,
    `prompt-reuse` and `radixkv`, interleaved by `run_interleaved`, one new token each. `warm` goes
    first and prompts[0] second, neither recorded, so every recorded request is a hit (radixkv's
    timed call includes the lookup, KV gather and cache build; the recipe's, the deepcopy). Returns
    TTFT lists and medians per method ("plain generate", "deepcopy recipe", "radixkv hit"), the
    tokens radixkv reused per request after `warm`, and whether every method generated the same
    token on every request. Raises what a method raised.
    """
    convs = tuple(Conversation(f"q{i}", (p,), known_prefix=prefix) for i, p in enumerate((warm, *prompts)))
    workload = Workload("ttft", convs, max_new_tokens=1, params={})
    runs = _serve(model, workload, settings, tuple(_TTFT_LABELS))
    ttft = {_TTFT_LABELS[run.name]: [r.ttft_s for r in run.requests[2:]] for run in runs}
    medians = {m: statistics.median(v) for m, v in ttft.items()}
    return {
        "reused_per_request": statistics.fmean(r.cached_tokens for r in runs[-1].requests[1:]),
        "ttft_s": ttft,
        "call_s": {_TTFT_LABELS[run.name]: [r.call_s for r in run.requests[2:]] for run in runs},
        "ttft_median_s": medians,
        "speedup_vs_plain": {m: medians["plain generate"] / v for m, v in medians.items()},
        "same_first_token": all(run.outputs == runs[0].outputs for run in runs),
    }


def _print_ttft(r: dict[str, Any]) -> None:
    """The rows of `ttft_side_by_side`'s result: medians, minimum, call time, ratios."""
    med = r["ttft_median_s"]
    print(f"{'method':<17}{'TTFT median ms':>16}{'TTFT min ms':>13}{'call median ms':>16}"
          f"{'speedup vs plain':>18}{'TTFT / recipe':>15}")  # fmt: skip
    for name, m in med.items():
        print(f"{name:<17}{m * 1e3:>16.1f}{min(r['ttft_s'][name]) * 1e3:>13.1f}"
              f"{statistics.median(r['call_s'][name]) * 1e3:>16.1f}{r['speedup_vs_plain'][name]:>17.1f}x"
              f"{m / med['deepcopy recipe']:>15.3f}")  # fmt: skip


def ttft_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"{_PROG} ttft", description=TTFT_DOC.split("\n\n")[0])
    p.add_argument("--model", default="llama-100m", help="preset or local path (default: llama-100m)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--prefix", type=int, default=2048, help="shared prefix tokens (default: 2048)")
    p.add_argument("--suffix", type=int, default=32, help="new tokens per request (default: 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed requests per method (default: 5)")
    p.add_argument("--block-size", type=int, default=16, help="radixkv block size (default: 16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and tokens (default: 0)")
    args = p.parse_args(argv)
    for name in ("prefix", "suffix", "repeats", "block_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    vocab = model.config.get_text_config().vocab_size
    device = model.device
    g = torch.Generator().manual_seed(args.seed)
    prefix = torch.randint(0, vocab, (1, args.prefix), generator=g).to(device)  # [1, P]
    suffixes = [torch.randint(0, vocab, (1, args.suffix), generator=g).to(device) for _ in range(args.repeats + 2)]
    settings = BenchSettings(
        capacity_tokens=args.prefix + (args.repeats + 4) * (args.suffix + 16), block_size=args.block_size
    )
    as_tokens = [tuple(torch.cat([prefix, s], dim=1)[0].tolist()) for s in suffixes]  # [P + S] each
    r = ttft_side_by_side(model, as_tokens[-1][: args.prefix], as_tokens[-1], as_tokens[: args.repeats + 1], settings)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} ({params / 1e6:.0f}M params), {args.dtype} on {device}, "
          f"{torch.get_num_threads()} threads; prompt = {args.prefix}-token shared prefix + {args.suffix} new tokens; "
          f"{args.repeats} timed requests per method, interleaved")  # fmt: skip
    print(f"radixkv reused {int(r['reused_per_request'])} prompt tokens per request; first generated token equal "
          f"across methods: {r['same_first_token']}")  # fmt: skip
    _print_ttft(r)
    return 0 if r["same_first_token"] else 1


# ----- the trained chat model: TTFT under a long system prompt, and a 4-turn chat ---------------------


def _real_ttft(model: Any, tokenizer: Any, repeats: int) -> dict[str, Any]:
    system = {"role": "system", "content": read_text("assistant_system_prompt.md")}
    render = ChatRenderer(tokenizer, None).render
    prefix = render([system], generation_prompt=False)
    prompts = [render([system, {"role": "user", "content": q}]) for q in ASSISTANT_QUESTIONS]
    r = ttft_side_by_side(model, prefix, prompts[-1], prompts[: repeats + 1], BenchSettings(capacity_tokens=4096))
    return {
        "system_prompt_tokens": len(prefix),
        "prompt_tokens": [len(p) for p in prompts[1 : repeats + 1]],
        "radixkv_reused_per_request": r["reused_per_request"],
        **{k: r[k] for k in ("ttft_s", "call_s", "ttft_median_s", "speedup_vs_plain", "same_first_token")},
    }


def _real_chat(model: Any, tokenizer: Any, new_tokens: int) -> dict[str, Any]:
    stop = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    workload = chat_workload(tokenizer, turns=len(CHAT_TURNS), max_new_tokens=new_tokens, stop_token_id=stop)
    plain, radix = _serve(model, workload, BenchSettings(capacity_tokens=4096), ("generate", "radixkv"))
    seconds = {"plain generate": [r.call_s for r in plain.requests], "radixkv": [r.call_s for r in radix.requests]}
    totals = {m: sum(v) for m, v in seconds.items()}
    assert workload.renderer is not None
    return {
        "turns": len(CHAT_TURNS),
        "max_new_tokens": new_tokens,
        "prompt_tokens": [r.prompt_tokens for r in plain.requests],
        "radixkv_reused": [r.cached_tokens for r in radix.requests],
        "seconds_per_turn": seconds,
        "total_s": totals,
        "speedup": totals["plain generate"] / totals["radixkv"],
        "same_tokens": plain.outputs == radix.outputs,
        "answers": [workload.renderer.answer_text(r.generated) for r in radix.requests],
    }


def real_model_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"{_PROG} real-model", description=REAL_MODEL_DOC.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, a GGUF file or folder, or a local HF directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed TTFT requests per method (default: 5, at most 5)")
    parser.add_argument("--new-tokens", type=int, default=32, help="most tokens per chat answer (default: 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--out", type=Path, default=None, help="write results.json and real_model.png here")
    args = parser.parse_args(argv)
    if not 1 <= args.repeats <= len(ASSISTANT_QUESTIONS) - 1:
        parser.error(f"--repeats must be in 1..{len(ASSISTANT_QUESTIONS) - 1}")
    if args.new_tokens < 1 or args.threads < 1:
        parser.error("--new-tokens and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    lm = load(args.model, dtype=args.dtype)
    if lm.tokenizer is None or not lm.tokenizer.chat_template:
        parser.error(f"--model {args.model!r} has no tokenizer with a chat template")
    with torch.no_grad():
        doc = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads()}
        doc["ttft"] = _real_ttft(lm.model, lm.tokenizer, args.repeats)
        doc["chat"] = _real_chat(lm.model, lm.tokenizer, args.new_tokens)
    t, c = doc["ttft"], doc["chat"]
    print(f"{args.model}, {args.dtype}, {doc['threads']} torch thread(s); TTFT over {args.repeats} requests, "
          f"{t['system_prompt_tokens']}-token system prompt; radixkv reused {t['radixkv_reused_per_request']:.0f} "
          f"tokens per request; same first token: {t['same_first_token']}")  # fmt: skip
    _print_ttft(t)
    print(
        f"\n{c['turns']}-turn chat, up to {c['max_new_tokens']} new tokens per answer; same tokens: {c['same_tokens']}"
    )
    print(f"{'turn':<6}{'prompt tokens':>14}{'radixkv reused':>16}{'plain s':>10}{'radixkv s':>11}")
    per_turn = c["seconds_per_turn"]
    for i in range(c["turns"]):
        print(f"{i + 1:<6}{c['prompt_tokens'][i]:>14,}{c['radixkv_reused'][i]:>16,}"
              f"{per_turn['plain generate'][i]:>10.2f}{per_turn['radixkv'][i]:>11.2f}")  # fmt: skip
    print(f"total: plain {c['total_s']['plain generate']:.2f} s, radixkv {c['total_s']['radixkv']:.2f} s "
          f"({c['speedup']:.2f}x)")  # fmt: skip
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(doc, indent=1))
        plot_real_model(doc, args.out / "real_model.png")
        print(f"wrote {args.out / 'results.json'} and {args.out / 'real_model.png'}")
    return 0 if t["same_first_token"] and c["same_tokens"] else 1


# ----- lower tiers: TTFT with the prefix in the device pool, host memory, disk --------------------------


def _request(prefix: list[int], suffix_seed: int, suffix: int, vocab: int) -> torch.Tensor:
    """`prefix` + `suffix` seeded random tokens, as a [1, T] batch."""
    return torch.tensor([prefix + _tokens(10_000 + suffix_seed, suffix, vocab)])


def _timed_call(fn: Any, ids: torch.Tensor) -> tuple[float, int]:
    t0 = perf_counter()
    out = fn(ids, max_new_tokens=1, do_sample=False)
    return perf_counter() - t0, int(out[0, -1])


def _tokens(seed: int, n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _child(args: argparse.Namespace) -> None:
    """One process's first request: with the disk tier at `args.child` or, when empty, none."""
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype)
    vocab = model.config.vocab_size
    prefix = _tokens(7, args.prefix, vocab)
    t0 = perf_counter()
    if args.child == "-":
        fn, setup = model.generate, 0.0
    else:
        cached = radixkv.wrap(
            model, capacity_tokens=4 * args.prefix, block_size=args.block_size,
            disk_path=args.child, disk_capacity_bytes=1 << 32,
        )  # fmt: skip
        fn, setup = cached.generate, perf_counter() - t0
    seconds, token = _timed_call(fn, _request(prefix, 999, args.suffix, vocab))
    print(json.dumps({"seconds": seconds, "setup_seconds": setup, "token": token}))


def ttft_tiers_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=f"{_PROG} ttft-tiers", description=TTFT_TIERS_DOC.split("\n\n")[0])
    p.add_argument("--model", default="llama-100m")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--prefix", type=int, default=2048)
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--restart", action="store_true", help="also time a second process's first request")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        _child(args)
        return
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype)
    vocab = model.config.vocab_size
    prefix = _tokens(7, args.prefix, vocab)
    cap = 4 * args.prefix
    tmp = tempfile.TemporaryDirectory(prefix="radixkv-ttft-")
    host = radixkv.wrap(model, capacity_tokens=cap, block_size=args.block_size, host_capacity_tokens=4 * cap)
    disk = radixkv.wrap(
        model, capacity_tokens=cap, block_size=args.block_size, disk_path=tmp.name, disk_capacity_bytes=1 << 32
    )
    for w in (host, disk):  # warm-up: store the prefix (not timed)
        w.generate(_request(prefix, 0, args.suffix, vocab), max_new_tokens=1, do_sample=False)
    assert host.cache is not None and disk.cache is not None
    # source -> (the cache evicted to its lower tier just before, the generate that serves the request)
    sources = {
        "device": (None, host.generate),
        "host": (host.cache, host.generate),
        "disk": (disk.cache, disk.generate),
        "recompute": (None, model.generate),
    }
    times: dict[str, list[float]] = {name: [] for name in sources}
    for r in range(1, args.repeats + 1):
        tokens = set()
        ids = _request(prefix, r, args.suffix, vocab)
        for name, (evicted, generate) in sources.items():
            if evicted is not None:
                evicted.evict(cap)
            s, t = _timed_call(generate, ids)
            times[name].append(s)
            tokens.add(t)
        assert len(tokens) == 1, f"methods disagree on the first token: {tokens}"
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model} {args.dtype}, prefix {args.prefix} + {args.suffix}, {args.repeats} repeats, median seconds:")
    for k, v in med.items():
        print(f"  {k:>9}: {v * 1000:9.1f} ms   recompute / this = {med['recompute'] / v:6.1f}x")
    print(f"  host tier: {host.cache.tier_stats['host']}\n  disk tier: {disk.cache.tier_stats['disk']}")
    if args.restart:
        base = [sys.executable, "-m", "radixkv.benchmarks.figures", "ttft-tiers", "--model", args.model,
                "--dtype", args.dtype, "--prefix", str(args.prefix), "--suffix", str(args.suffix),
                "--threads", str(args.threads), "--block-size", str(args.block_size)]  # fmt: skip
        runs = {}
        for name, child in (("restart on the disk directory", tmp.name), ("cold start", "-")):
            out = subprocess.run([*base, "--child", child], capture_output=True, text=True, check=True)
            runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
        warm, cold = runs["restart on the disk directory"], runs["cold start"]
        print(
            f"  restart: first request {warm['seconds'] * 1000:.1f} ms (wrap incl. indexing "
            f"{warm['setup_seconds'] * 1000:.1f} ms) vs cold start {cold['seconds'] * 1000:.1f} ms: "
            f"{cold['seconds'] / warm['seconds']:.1f}x; same token: {warm['token'] == cold['token']}"
        )
    tmp.cleanup()


# ----- quantised reuse: quality and cost on SmolLM2 --------------------------------------------------

TOPICS = (
    "the right to alter or abolish a government", "laws for the public good", "Governors and laws",
    "representation in the legislature", "legislative bodies meeting in unusual places",
    "dissolving representative houses", "naturalization of foreigners", "the administration of justice",
    "judges and their salaries", "new offices and officers", "standing armies", "military power",
    "quartering troops", "trade with all parts of the world", "taxes without consent", "trial by jury",
    "being transported beyond seas", "charters", "suspending legislatures", "the plunder of the seas",
    "foreign mercenaries", "captives on the high seas", "petitions for redress", "the British brethren",
    "the Supreme Judge of the world", "free and independent states", "allegiance to the British Crown",
    "the power to levy war", "the pledge of lives, fortunes and honor", "unalienable rights",
    "the consent of the governed", "prudence", "a long train of abuses", "absolute despotism",
    "the patient sufferance of the colonies", "the King of Great Britain", "a candid world",
    "the causes of the separation", "the laws of nature", "the opinions of mankind",
    "life, liberty and the pursuit of happiness", "safety and happiness", "the history of injuries",
    "tyranny", "the depository of public records", "the population of the states",
    "invasions on the rights of the people", "swarms of officers", "the civil power", "the signers",
)  # fmt: skip


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, kv_dtype: str | None, segment: int) -> tuple[float, int]:
    """Perplexity of each segment's second half, its first half's KV reused through a PrefixCache."""

    half = segment // 2
    nll, count = 0.0, 0
    for start in range(0, len(ids) - segment + 1, segment):
        seg = ids[start : start + segment].unsqueeze(0)  # [1, segment]
        past = model(seg[:, :half], use_cache=True).past_key_values
        kv = [(layer.keys, layer.values) for layer in past.layers]  # [1, H, half, D] each
        k = kv[0][0]
        spec = KVSpec(len(kv), k.shape[1], k.shape[3], dtype=k.dtype, device=k.device)
        cache = PrefixCache(spec, capacity_tokens=segment, block_size=16, kv_dtype=kv_dtype)
        prefix = seg[0, :half].tolist()
        cache.insert(prefix, kv)
        with cache.match(prefix) as m:
            assert m.num_tokens == half, "segment / 2 must be a multiple of the block size"
            gathered = cache.gather(m)
        reused = DynamicCache()
        for i, (k, v) in enumerate(gathered):
            reused.update(k, v, i)
        logits = model(seg[:, half:], past_key_values=reused, use_cache=True).logits[0, :-1]
        # Tokens half+1 .. segment-1 (token `half` is predicted by the prefix pass alone).
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = seg[0, half + 1 :]
        nll -= logp.gather(1, target[:, None]).sum().item()
        count += len(target)
    return math.exp(nll / count), count


def chat_prompts(tok: Any, document: str) -> list[list[int]]:
    """50 chat prompts: the document as system message, one question per topic."""
    render = ChatRenderer(tok, None).render
    system = {"role": "system", "content": f"Answer from this document.\n\n{document}"}
    return [
        list(render([system, {"role": "user", "content": f"What does the document say about {t}?"}])) for t in TOPICS
    ]


@torch.no_grad()
def greedy_agreement(model: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Per kv_dtype: share of prompts whose greedy output equals plain generate's, first divergences."""
    pad = 2
    ids, mask = left_padded(prompts, pad=pad)
    greedy = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": pad}
    ref = model.generate(ids, attention_mask=mask, **greedy)[:, ids.shape[1] :]
    common = 0
    while all(len(p) > common and p[common] == prompts[0][common] for p in prompts):
        common += 1
    out: dict[str, Any] = {"prompts": len(prompts), "shared_prefix_tokens": common, "new_tokens": new_tokens}
    for kv_dtype in KV_DTYPES:
        cached = radixkv.wrap(model, capacity_tokens=65_536, block_size=16, kv_dtype=kv_dtype)
        warm = torch.tensor([prompts[0][:common]])
        cached.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=1, do_sample=False, pad_token_id=pad)
        got = cached.generate(ids, attention_mask=mask, **greedy)[:, ids.shape[1] :]
        diverge = []
        for r in range(len(prompts)):
            differ = (got[r] != ref[r]).nonzero()
            diverge.append(int(differ[0, 0]) if len(differ) else None)
        firsts = sorted(d for d in diverge if d is not None)
        out[kv_dtype or "exact"] = {
            "identical": sum(d is None for d in diverge) / len(prompts),
            "reused_tokens": cached.stats.reused_tokens,
            "first_divergence": firsts,
            "median_first_divergence": firsts[len(firsts) // 2] if firsts else None,
        }
    return out


def quant_quality_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog=f"{_PROG} quant-quality",
        description=QUANT_QUALITY_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--segment", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--document-tokens", type=int, default=384, help="tokens of the text used as the shared document")
    p.add_argument("--skip-greedy", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(SMOLLM2)
    model, tok = lm.model, lm.tokenizer
    text = TEXT.read_text()
    ids = torch.tensor(tok(text)["input_ids"])
    print(f"model loaded in {time.perf_counter() - t0:.0f} s; text {len(ids):,} tokens", flush=True)
    doc: dict[str, Any] = {"text_tokens": len(ids), "segment": args.segment, "perplexity": {}}
    base = None
    print("| kv_dtype | perplexity | vs exact | scored tokens |\n|---|---|---|---|", flush=True)
    for kv_dtype in KV_DTYPES:
        ppl, n = perplexity(model, ids, kv_dtype, args.segment)
        base = base or ppl
        doc["perplexity"][kv_dtype or "exact"] = {"ppl": ppl, "delta": ppl / base - 1, "tokens": n}
        print(f"| {kv_dtype or 'exact'} | {ppl:.4f} | {100 * (ppl / base - 1):+.3f}% | {n:,} |", flush=True)
    if not args.skip_greedy:
        document = tok.decode(ids[: args.document_tokens])
        agree = greedy_agreement(model, chat_prompts(tok, document), args.new_tokens)
        doc["greedy"] = agree
        print(
            f"\ngreedy, {agree['prompts']} prompts, {agree['new_tokens']} new tokens, shared prefix "
            f"{agree['shared_prefix_tokens']} tokens\n| kv_dtype | identical | reused tokens | median first divergence "
            "| first divergences |\n|---|---|---|---|---|"
        )
        for name in ("exact", "int8", "int4"):
            a = agree[name]
            print(
                f"| {name} | {a['identical']:.0%} | {a['reused_tokens']:,} | {a['median_first_divergence']} "
                f"| {a['first_divergence']} |"
            )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=1))


def _round_robin(calls: dict[str, Callable[[], Any]], repeats: int, device: str = "cpu") -> dict[str, float]:
    """Median seconds per call, the calls interleaved so that machine noise hits all alike (on a
    CUDA `device`, each call is timed up to the end of the work it queued)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()  # warm up
    for _ in range(repeats):
        for name, fn in calls.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _smollm2_kv(tokens: int, dtype: torch.dtype, device: str, g: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """Random KV of `tokens` tokens in SmolLM2-135M's shape: 30 layers of (K, V) `[1, 3, tokens, 64]`."""
    return [tuple(torch.randn(1, 3, tokens, 64, generator=g).to(device, dtype) for _ in range(2)) for _ in range(30)]


def gather_ratios(tokens: int, repeats: int, dtype: torch.dtype, device: str = "cpu") -> dict[str, dict[str, float]]:
    spec = KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype=dtype, device=torch.device(device))
    ids = list(range(tokens))
    kv = _smollm2_kv(tokens, dtype, device, torch.Generator().manual_seed(0))
    caches = {kd or "exact": PrefixCache(spec, capacity_tokens=2 * tokens, kv_dtype=kd) for kd in KV_DTYPES}
    matches = {}
    for name, cache in caches.items():
        cache.insert(ids, kv)
        matches[name] = cache.match(ids)
    gather = _round_robin({n: (lambda c=c, m=matches[n]: c.gather(m)) for n, c in caches.items()}, repeats, device)

    def reinsert(cache: PrefixCache) -> None:
        cache.clear()
        cache.insert(ids, kv)

    for name, cache in caches.items():
        cache.release(matches[name])
    insert = _round_robin({n: (lambda c=c: reinsert(c)) for n, c in caches.items()}, max(3, repeats // 3), device)
    return {
        n: {
            "gather_ms": gather[n] * 1e3,
            "gather_ratio": gather[n] / gather["exact"],
            "insert_ms": insert[n] * 1e3,
            "insert_ratio": insert[n] / insert["exact"],
        }
        for n in caches
    }


PROMOTION_MODES: dict[str, dict[str, Any]] = {
    "exact": {},
    "int8": {"kv_dtype": "int8"},
    "int8 exact_pool": {"kv_dtype": "int8", "exact_pool": True},
    "int4": {"kv_dtype": "int4"},
    "int4 exact_pool": {"kv_dtype": "int4", "exact_pool": True},
}


def promotion_ratios(tokens: int, repeats: int, dtype: torch.dtype, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Two prefixes of `tokens` take turns in a pool that holds one, over a host tier: each turn
    promotes one from the host and gathers it (`promote`), then matches and gathers it again
    from the pool (`pool_hit`). Per mode of PROMOTION_MODES, in ms and as ratios to exact:
    the pool hit's median, and the promotion's as the median of both minus the hit's."""
    spec = KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype=dtype, device=torch.device(device))
    g = torch.Generator().manual_seed(0)
    prefixes = [list(range(k * 100_000, k * 100_000 + tokens)) for k in range(2)]
    kvs = [_smollm2_kv(tokens, dtype, device, g) for _ in prefixes]
    caches = {
        name: PrefixCache(spec, capacity_tokens=tokens, host_capacity_tokens=4 * tokens, eviction="lru", **kw)
        for name, kw in PROMOTION_MODES.items()
    }
    for c in caches.values():
        for ids, kv in zip(prefixes, kvs, strict=True):
            c.insert(ids, kv)
    turn = {name: 0 for name in caches}

    def promote(name: str) -> None:
        c, ids = caches[name], prefixes[turn[name] % 2]
        turn[name] += 1
        with c.match(ids) as m:
            assert m.host_tokens == tokens, (name, m.host_tokens)
            c.gather(m)

    def pool_hit(name: str) -> None:
        c, ids = caches[name], prefixes[(turn[name] - 1) % 2]
        with c.match(ids) as m:
            assert m.num_tokens == tokens and m.host_tokens == 0, name
            c.gather(m)

    # One call per mode: promote then hit, so each hit finds what its promote brought up.
    both = _round_robin({n: functools.partial(lambda n: (promote(n), pool_hit(n)), n) for n in caches}, repeats, device)
    hits = _round_robin({n: functools.partial(pool_hit, n) for n in caches}, repeats, device)
    return {
        n: {
            "promote_ms": (both[n] - hits[n]) * 1e3,
            "promote_ratio": (both[n] - hits[n]) / (both["exact"] - hits["exact"]),
            "pool_hit_ms": hits[n] * 1e3,
            "pool_hit_ratio": hits[n] / hits["exact"],
        }
        for n in caches
    }


@torch.no_grad()
def ttft_ratios(repeats: int, dtype: torch.dtype = torch.float32) -> dict[str, dict[str, float]]:
    lm = load(SMOLLM2)
    lm.model.to(dtype)  # the weights load in float32; half precision to see the gather's share there
    ids = lm.tokenizer(TEXT.read_text())["input_ids"][:1_136]
    cached_part = torch.tensor([ids[:1_120]])
    prompt = torch.tensor([ids])
    wrapped = {kd or "exact": radixkv.wrap(lm.model, capacity_tokens=4_096, kv_dtype=kd) for kd in KV_DTYPES}
    for w in wrapped.values():
        w.generate(cached_part, attention_mask=torch.ones_like(cached_part), max_new_tokens=1, do_sample=False)
    one = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 1, "do_sample": False}
    calls = {n: functools.partial(w.generate, prompt, **one) for n, w in wrapped.items()}
    calls["no cache"] = functools.partial(lm.model.generate, prompt, **one)
    med = _round_robin(calls, repeats)
    for w in wrapped.values():
        assert w.stats.reused_tokens >= 1_120, w.stats
    return {n: {"ttft_ms": med[n] * 1e3, "ttft_ratio": med[n] / med["exact"]} for n in calls}


def quant_speed_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog=f"{_PROG} quant-speed", description=QUANT_SPEED_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--ttft", action="store_true", help="also TTFT of a hit on SmolLM2-135M (loads the model)")
    p.add_argument("--ttft-repeats", type=int, default=7)
    p.add_argument(
        "--ttft-dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype for --ttft"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="device of the gather and insert part (e.g. cuda); TTFT runs on CPU")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch threads {torch.get_num_threads()}; gather of {args.tokens:,} tokens, 30 layers x 3 heads x 64, "
        f"on {args.device}"
    )
    print("| dtype | kv_dtype | gather ms | gather vs exact | insert ms | insert vs exact |\n|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for name, r in gather_ratios(args.tokens, args.repeats, dtype, args.device).items():
            print(
                f"| {str(dtype).removeprefix('torch.')} | {name} | {r['gather_ms']:.2f} | {r['gather_ratio']:.2f}x "
                f"| {r['insert_ms']:.2f} | {r['insert_ratio']:.2f}x |",
                flush=True,
            )
    print(f"\npromotion of {args.tokens:,} tokens from the host tier and its gather, then a pool hit on them")
    print(
        "| dtype | mode | promote ms | promote vs exact | pool hit ms | pool hit vs exact |\n|---|---|---|---|---|---|"
    )
    for dtype in (torch.float32, torch.float16):
        for name, r in promotion_ratios(args.tokens, max(3, args.repeats // 2), dtype, args.device).items():
            print(
                f"| {str(dtype).removeprefix('torch.')} | {name} | {r['promote_ms']:.2f} | {r['promote_ratio']:.2f}x "
                f"| {r['pool_hit_ms']:.2f} | {r['pool_hit_ratio']:.2f}x |",
                flush=True,
            )
    if args.ttft:
        print(f"\nTTFT, 1,136-token prompt, 1,120 cached ({args.ttft_dtype} model)")
        print("| path | TTFT ms | vs exact hit |\n|---|---|---|")
        for name, r in ttft_ratios(args.ttft_repeats, getattr(torch, args.ttft_dtype)).items():
            print(f"| {name} | {r['ttft_ms']:.0f} | {r['ttft_ratio']:.3f}x |", flush=True)


FIGURES: dict[str, Callable[[Any], Any]] = {
    "real-model": real_model_main,
    "ttft": ttft_main,
    "ttft-tiers": ttft_tiers_main,
    "quant-quality": quant_quality_main,
    "quant-speed": quant_speed_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m radixkv.benchmarks.figures FIGURE [flags]`: run one figure (`FIGURE --help` for its flags)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in FIGURES:
        print(f"usage: {_PROG} {{{','.join(FIGURES)}}} [flags]\n\n{__doc__}", file=sys.stderr)
        return 2
    return FIGURES[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
