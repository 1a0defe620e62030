"""Sharing inside one `generate` call: the figures of docs/guide/sharing.md.

    python -m radixkv.benchmarks.sharing cold-batch            # 8 questions over one new document
    python -m radixkv.benchmarks.sharing decode                # SmolLM2, 16 rows x 2,048 shared tokens
    python -m radixkv.benchmarks.sharing beams                 # num_beams=4 over a 2,048-token prompt
    python -m radixkv.benchmarks.sharing break-even            # decode step time by prefix and rows
    python -m radixkv.benchmarks.sharing half                  # SmolLM2 bfloat16: outputs vs plain
    python -m radixkv.benchmarks.sharing rates --device cuda   # gather / insert GB/s vs a device copy

Every figure runs plain `model.generate` and the cached model on the same batch in the same
process (except `decode`'s memory, which takes a fresh process per method) and checks that the
tokens are identical before it prints a timing. Forward tokens are counted at the input
embedding (every row and column a forward pass computes, padding included). Times are wall
clock with one torch thread unless `--threads` says otherwise; read them as ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from radixkv.integrations.models import load
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.generation.streamers import BaseStreamer

import radixkv

from .batched import left_padded


class StepTimer(BaseStreamer):
    """Records when each step's tokens arrive: `generate` puts the prompt first, then one token per
    row each step. decode_s: from the first generated token to the last (the decode phase)."""

    def __init__(self) -> None:
        self.start = perf_counter()
        self.times: list[float] = []

    def put(self, value: object) -> None:
        self.times.append(perf_counter())

    def end(self) -> None:
        """Called by generate when it finishes; nothing to do."""

    @property
    def decode_s(self) -> float:
        return self.times[-1] - self.times[1]


@contextmanager
def count_forward_tokens(model: Any) -> Iterator[list[int]]:
    """Count the token positions the model's forward passes compute (rows x columns at the input
    embedding), in `counter[0]`."""
    counter = [0]

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        counter[0] += args[0].numel()

    handle = model.get_input_embeddings().register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


def random_tokens(n: int, seed: int, vocab: int, low: int = 3) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (n,), generator=g).tolist()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = perf_counter()
    out = fn()
    return out, perf_counter() - start


def _tiny_llama() -> Any:
    """The issue's new-user model: random-weight Llama, 4 layers, 256 wide."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32_000,
        max_position_embeddings=4096,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def cold_batch(args: argparse.Namespace) -> dict[str, Any]:
    """8 questions of 12 tokens over one new 1,500-token document, one batch, 4 new tokens."""
    model = _tiny_llama().to(args.device)
    vocab = model.config.vocab_size
    doc = random_tokens(args.document, 1, vocab)
    rows = [doc + random_tokens(args.question, 100 + i, vocab) for i in range(args.rows)]
    ids, mask = (t.to(args.device) for t in left_padded(rows))
    gen = {"max_new_tokens": args.new, "do_sample": False}
    out: dict[str, Any] = {"document": args.document, "rows": args.rows, "question": args.question, "new": args.new}
    for rep in range(args.repeats):
        with count_forward_tokens(model) as n_plain:
            plain, t_plain = timed(lambda: model.generate(ids, attention_mask=mask, **gen))
        cached = radixkv.wrap(model, capacity_tokens=4 * (args.document + args.question) * 2)
        with count_forward_tokens(model) as n_cached:
            ours, t_cached = timed(lambda c=cached: c.generate(ids, attention_mask=mask, **gen))
        if not torch.equal(plain, ours):
            raise SystemExit("cold-batch: radixkv's tokens differ from plain generate")
        out.setdefault("plain_s", []).append(round(t_plain, 4))
        out.setdefault("radixkv_s", []).append(round(t_cached, 4))
        out["plain_forward_tokens"], out["radixkv_forward_tokens"] = n_plain[0], n_cached[0]
        out["computed_once_tokens"] = cached.stats.computed_once_tokens
        print(f"round {rep + 1}: plain {t_plain:.3f} s, radixkv {t_cached:.3f} s", file=sys.stderr)
    ideal = args.document + args.rows * args.question + args.rows * (args.new - 1)
    out["ideal_forward_tokens"] = ideal
    out["forward_tokens_vs_ideal"] = round(out["radixkv_forward_tokens"] / ideal, 3)
    ratios = sorted(p / c for p, c in zip(out["plain_s"], out["radixkv_s"], strict=True))
    out["speedup_median"] = round(ratios[args.repeats // 2], 2)
    out["tokens_identical"] = True
    return out


def _decode_batch(model: Any, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = model.config.vocab_size
    prefix = random_tokens(args.prefix, 7, vocab, low=100)
    rows = [prefix + random_tokens(args.question, 200 + i, vocab, low=100) for i in range(args.rows)]
    ids, mask = left_padded(rows)
    return ids.to(args.device), mask.to(args.device)


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def decode_one(args: argparse.Namespace) -> dict[str, Any]:
    """One method in this process: decode tokens/s, the call's extra peak memory, the tokens."""
    model = load(args.model, device=args.device, dtype="float32").model
    model.generation_config.eos_token_id = None
    ids, mask = _decode_batch(model, args)
    cuda = torch.device(args.device).type == "cuda"
    gen = {"max_new_tokens": args.new, "do_sample": False}
    runner: Any = model
    if args.method == "radixkv":
        runner = radixkv.wrap(model, capacity_tokens=args.prefix + 4 * args.question + 1024)
    if cuda:  # the device's allocator, not the process's RSS
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() // 1024
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _vm_kb("VmRSS")
    timer = StepTimer()
    with count_forward_tokens(model) as counted:
        out, total = timed(lambda: runner.generate(ids, attention_mask=mask, streamer=timer, **gen))
    peak = torch.cuda.max_memory_allocated() // 1024 if cuda else _vm_kb("VmHWM")
    steps = args.new - 1
    return {
        "method": args.method,
        "total_s": round(total, 3),
        "first_token_s": round(timer.times[1] - timer.start, 3),
        "decode_s": round(timer.decode_s, 3),
        "decode_tokens_per_s": round(args.rows * steps / timer.decode_s, 1),
        "extra_peak_mib": round((peak - before) / 1024, 1),
        "forward_tokens": counted[0],
        "sequences": out.tolist(),
    }


def decode(args: argparse.Namespace) -> dict[str, Any]:
    """Both methods, each in a fresh process (so each one's peak memory is its own)."""
    results: dict[str, Any] = {"model": args.model, "rows": args.rows, "prefix": args.prefix, "new": args.new}
    for method in ("generate", "radixkv"):
        cmd = [sys.executable, "-m", "radixkv.benchmarks.sharing", "decode-one", "--method", method]
        cmd += ["--model", args.model, "--rows", str(args.rows), "--prefix", str(args.prefix)]
        cmd += ["--question", str(args.question), "--new", str(args.new), "--threads", str(args.threads)]
        cmd += ["--device", args.device]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[method] = json.loads(done.stdout)
        print(f"{method}: {results[method]['decode_tokens_per_s']} tokens/s", file=sys.stderr)
    if results["generate"].pop("sequences") != results["radixkv"].pop("sequences"):
        raise SystemExit("decode: radixkv's tokens differ from plain generate")
    plain, ours = results["generate"], results["radixkv"]
    results["decode_speedup"] = round(ours["decode_tokens_per_s"] / plain["decode_tokens_per_s"], 2)
    results["extra_peak_ratio"] = round(ours["extra_peak_mib"] / plain["extra_peak_mib"], 3)
    results["tokens_identical"] = True
    return results


def beams(args: argparse.Namespace) -> dict[str, Any]:
    """num_beams over one long prompt: forward tokens of the prefill, plain vs radixkv (cold)."""
    model = _model(args)
    prompt = random_tokens(args.prefix, 11, model.config.vocab_size, low=100)
    ids = torch.tensor([prompt], device=args.device)
    gen = {"max_new_tokens": args.new, "do_sample": False, "num_beams": args.beams}
    with count_forward_tokens(model) as n_plain:
        plain, t_plain = timed(lambda: model.generate(ids, **gen))
    cached = radixkv.wrap(model, capacity_tokens=2 * args.prefix + 1024)
    with count_forward_tokens(model) as n_cached:
        ours, t_cached = timed(lambda: cached.generate(ids, **gen))
    if not torch.equal(plain, ours):
        raise SystemExit("beams: radixkv's tokens differ from plain generate")
    decode_tokens = args.beams * (args.new - 1)
    return {
        "model": args.model,
        "prompt": args.prefix,
        "beams": args.beams,
        "new": args.new,
        "plain_prefill_tokens": n_plain[0] - decode_tokens,
        "radixkv_prefill_tokens": n_cached[0] - decode_tokens,
        "prefill_work_vs_prompt": round((n_cached[0] - decode_tokens) / args.prefix, 3),
        "plain_s": round(t_plain, 3),
        "radixkv_s": round(t_cached, 3),
        "tokens_identical": True,
    }


def _model(args: argparse.Namespace) -> Any:
    """`--model` on `--device` in float32: a preset / GGUF / checkpoint, or the issue's tiny Llama."""
    model = _tiny_llama() if args.model == "tiny-llama" else load(args.model, dtype="float32").model
    model.generation_config.eos_token_id = None
    return model.to(args.device)


def break_even(args: argparse.Namespace) -> dict[str, Any]:
    """Decode time per step with and without holding the prefix once, warm cache, by prefix and rows.

    Both runs use the cache (the prefix is cached already and computed once either way); only the
    holding differs (the thresholds set to hold any prefix, or none), so the ratio is the
    decode-time effect of the shared attention alone.
    """
    import radixkv.integrations.hf as hf

    model = _model(args)
    vocab = model.config.vocab_size
    table = []
    original = hf.SHARE_MIN_TOKENS, hf.SHARE_MIN_SAVED_TOKENS
    try:
        for prefix in args.prefixes:
            for rows in args.rows_list:
                p = random_tokens(prefix, prefix, vocab, low=100)
                batch = [p + random_tokens(args.question, 300 + i, vocab, low=100) for i in range(rows)]
                ids, mask = (t.to(args.device) for t in left_padded(batch))
                gen = {"max_new_tokens": args.new, "do_sample": False}
                times: dict[str, list[float]] = {"private": [], "held": []}
                outs = {}
                cached = radixkv.wrap(model, capacity_tokens=prefix + rows * (args.question + args.new) + 1024)
                cached.generate(ids, attention_mask=mask, **gen)  # warm: the prefix is cached
                for _ in range(args.repeats):
                    for mode in ("private", "held"):
                        hf.SHARE_MIN_TOKENS = 1 if mode == "held" else 10**9
                        hf.SHARE_MIN_SAVED_TOKENS = 0
                        timer = StepTimer()
                        outs[mode] = cached.generate(ids, attention_mask=mask, streamer=timer, **gen)
                        times[mode].append(timer.decode_s / (args.new - 1))
                if not torch.equal(outs["private"], outs["held"]):
                    raise SystemExit(f"break-even: outputs differ at prefix {prefix}, rows {rows}")
                private, held = min(times["private"]), min(times["held"])
                row = {"prefix": prefix, "rows": rows, "private_ms": round(1e3 * private, 2)}
                row |= {"held_ms": round(1e3 * held, 2), "speedup": round(private / held, 2)}
                print(row, file=sys.stderr)
                table.append(row)
    finally:
        hf.SHARE_MIN_TOKENS, hf.SHARE_MIN_SAVED_TOKENS = original
    return {"model": args.model, "new": args.new, "question": args.question, "table": table}


QUESTIONS = [
    "Summarise the document in two sentences.",
    "What is the most surprising fact in it?",
    "Explain the main idea to a child.",
    "List three key terms from the document.",
    "What question does the document leave open?",
    "Write a title for the document.",
    "Which part would you cut, and why?",
    "Give one example that illustrates the document.",
]


def half(args: argparse.Namespace) -> dict[str, Any]:
    """The trained model in half precision: rows sharing real documents (the system message), each
    with its own question (chat template), cold then warm, per attention and setting (default, and
    share_prefixes=True): rows whose tokens differ from plain `generate`, the largest score
    difference, and what was shared."""
    from .workloads import read_text

    loaded = load(args.model, dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise SystemExit(f"half: --model {args.model} has no tokenizer (use smollm2)")
    document = "\n\n".join(read_text(f"documents/{name}.md") for name in args.documents.split(","))
    rows = []
    for question in QUESTIONS[: args.rows]:
        messages = [{"role": "system", "content": document}, {"role": "user", "content": question}]
        rows.append(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    ids, mask = left_padded([list(r) for r in rows], pad=tok.pad_token_id or 0)
    gen = {"max_new_tokens": args.new, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    table = []
    for attention in ("eager", "sdpa"):
        model.config._attn_implementation = attention
        plain = model.generate(ids, attention_mask=mask, **gen)
        for setting in (None, True):
            cached = radixkv.wrap(model, capacity_tokens=8 * ids.shape[1] + 4096, share_prefixes=setting)
            for call in ("cold", "warm"):
                ours = cached.generate(ids, attention_mask=mask, **gen)
                differ = sum(not torch.equal(a, b) for a, b in zip(ours.sequences, plain.sequences, strict=True))
                steps = min(len(ours.scores), len(plain.scores))
                diff = max((ours.scores[i] - plain.scores[i]).abs().max().item() for i in range(steps))
                row = {"attention": attention, "share_prefixes": setting, "call": call, "rows_differ": differ}
                stats = cached.stats
                row |= {"max_score_diff": round(diff, 4), "shared": cached.share_prefixes}
                row |= {"computed_once": stats.computed_once_tokens, "held_once": stats.held_once_tokens}
                print(row, file=sys.stderr)
                table.append(row)
    return {"model": args.model, "dtype": args.dtype, "rows": args.rows, "prompt_width": ids.shape[1], "table": table}


def rates(args: argparse.Namespace) -> dict[str, Any]:
    """The pool's gather and insert in GB/s beside a plain copy of the same bytes on the device
    (SmolLM2's KV shape: 30 layers, 3 KV heads of 64), each timed to the end of its queued work."""
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spec = radixkv.KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    kv = [tuple(torch.randn(1, 3, args.tokens, 64, generator=g).to(device, dtype) for _ in range(2)) for _ in range(30)]
    nbytes = sum(t.numel() * t.element_size() for pair in kv for t in pair)
    ids = list(range(args.tokens))
    results: dict[str, Any] = {"device": str(device), "dtype": args.dtype, "tokens": args.tokens, "bytes": nbytes}

    def best(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(args.repeats):
            sync()
            start = perf_counter()
            fn()
            sync()
            times.append(perf_counter() - start)
        return min(times)

    copy_s = best(lambda: [t.clone() for pair in kv for t in pair])

    def insert() -> None:
        cache = radixkv.PrefixCache(spec, capacity_tokens=args.tokens + 64, block_size=16)
        sync()
        start = perf_counter()
        cache.insert(ids, kv)
        sync()
        insert_times.append(perf_counter() - start)

    insert_times: list[float] = []
    for _ in range(args.repeats):
        insert()
    cache = radixkv.PrefixCache(spec, capacity_tokens=args.tokens + 64, block_size=16)
    cache.insert(ids, kv)
    with cache.match(ids) as m:
        gathered = cache.gather(m)
        if not all(
            torch.equal(a[:, :, : m.num_tokens], b[:, :, : m.num_tokens])
            for x, y in zip(gathered, kv, strict=True)
            for a, b in zip(x, y, strict=True)
        ):
            raise SystemExit("rates: the gathered KV differs from what was inserted")
        gather_s = best(lambda: cache.gather(m))
    insert_s = min(insert_times)
    for name, seconds in (("copy", copy_s), ("gather", gather_s), ("insert", insert_s)):
        results[f"{name}_gb_per_s"] = round(nbytes / seconds / 1e9, 2)
    results["gather_vs_copy"] = round(copy_s / gather_s, 3)
    results["insert_vs_copy"] = round(copy_s / insert_s, 3)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m radixkv.benchmarks.sharing", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="figure", required=True)
    p = sub.add_parser("cold-batch")
    p.add_argument("--document", type=int, default=1500)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--question", type=int, default=12)
    p.add_argument("--new", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    for name in ("decode", "decode-one"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="smollm2")
        p.add_argument("--rows", type=int, default=16)
        p.add_argument("--prefix", type=int, default=2048)
        p.add_argument("--question", type=int, default=16)
        p.add_argument("--new", type=int, default=64)
        if name == "decode-one":
            p.add_argument("--method", choices=["generate", "radixkv"], required=True)
    p = sub.add_parser("beams")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prefix", type=int, default=2048)
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--new", type=int, default=8)
    p = sub.add_parser("rates")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeats", type=int, default=10)
    p = sub.add_parser("half")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--documents", default="honeybees,moon", help="documents of benchmarks/texts, comma-separated")
    p.add_argument("--new", type=int, default=32)
    p = sub.add_parser("break-even")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prefixes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--rows-list", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--question", type=int, default=16)
    p.add_argument("--new", type=int, default=17)
    p.add_argument("--repeats", type=int, default=2)
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
        p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1")
        p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    for name in ("rows", "prefix", "document", "question", "new", "beams", "repeats", "threads", "tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    torch.set_num_threads(args.threads)
    figures: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
        "cold-batch": cold_batch,
        "decode": decode,
        "decode-one": decode_one,
        "beams": beams,
        "break-even": break_even,
        "half": half,
        "rates": rates,
    }
    result = figures[args.figure](args)
    text = json.dumps(result, indent=None if args.figure == "decode-one" else 2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
