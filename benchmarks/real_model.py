"""Real-model benchmark: TTFT under a ~1,000-token system prompt, and a 4-turn chat end to end.

    python -m radixkv.benchmarks.real_model --out benchmarks/results/smollm2-bench
    python benchmarks/real_model.py --model path/to/model.gguf --repeats 3

Part 1, time to first token. Prompts are the chat template over the help-desk system prompt
(``texts/assistant_system_prompt.md``) and one question each; every request generates one token.
Methods, interleaved request by request so they share the machine's noise:
  - plain:   `model.generate(prompt)`, the whole prompt prefilled;
  - recipe:  transformers' prompt-reuse recipe: a `DynamicCache` of the system message computed
             once (not timed), `copy.deepcopy` of it per request (timed);
  - radixkv: `radixkv.wrap(model).generate(prompt)` after one warm-up request stored the system
             prompt (not timed); the timed call includes the lookup, gather and cache build.
Part 2, a 4-turn chat (``wl_chat.CHAT_TURNS``), each prompt the chat template over the history
with the model's decoded answers, up to `--new-tokens` per answer (stopping at end of turn):
plain `generate` and radixkv, turn by turn, wall time per turn and tokens reused.
Both parts check that the methods produced the same tokens (the exit status is 1 otherwise).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from radixkv.integrations.hf import CACHE_KWARG
from transformers import DynamicCache

import radixkv

from .loader import load
from .timing import FirstTokenTimer
from .wl_chat import ASSISTANT_QUESTIONS, CHAT_SYSTEM, CHAT_TURNS, read_text

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m radixkv.benchmarks.real_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, a GGUF file or folder, or a local HF directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5, help="timed TTFT requests per method (default: 5, at most 5)")
    p.add_argument("--new-tokens", type=int, default=32, help="most tokens per chat answer (default: 32)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--out", type=Path, default=None, help="write results.json and real_model.png here")
    return p


def _ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = True) -> torch.Tensor:
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, return_tensors="pt",
                                        return_dict=True)  # fmt: skip
    return enc["input_ids"]  # [1, T]


def _ttft(model: Any, tokenizer: Any, repeats: int) -> dict[str, Any]:
    system = {"role": "system", "content": read_text("assistant_system_prompt.md")}
    prefix = _ids(tokenizer, [system], generation_prompt=False)
    prompts = [_ids(tokenizer, [system, {"role": "user", "content": q}]) for q in ASSISTANT_QUESTIONS]
    kw = {"max_new_tokens": 1, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    recipe_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prefix, use_cache=True, **{CACHE_KWARG: recipe_cache})
    cached = radixkv.wrap(model, capacity_tokens=4096)
    warm = prompts[-1]
    cached.generate(warm, attention_mask=torch.ones_like(warm), **kw)

    def plain(ids: torch.Tensor, t: FirstTokenTimer) -> torch.Tensor:
        return model.generate(ids, attention_mask=torch.ones_like(ids), streamer=t, **kw)

    def recipe(ids: torch.Tensor, t: FirstTokenTimer) -> torch.Tensor:
        return model.generate(ids, attention_mask=torch.ones_like(ids), streamer=t,
                              **{CACHE_KWARG: copy.deepcopy(recipe_cache)}, **kw)  # fmt: skip

    def hit(ids: torch.Tensor, t: FirstTokenTimer) -> torch.Tensor:
        return cached.generate(ids, attention_mask=torch.ones_like(ids), streamer=t, **kw)

    methods: dict[str, Callable[[torch.Tensor, FirstTokenTimer], torch.Tensor]] = {
        "plain generate": plain,
        "deepcopy recipe": recipe,
        "radixkv hit": hit,
    }
    ttft: dict[str, list[float]] = {m: [] for m in methods}
    agree = True
    reused_before = cached.stats.reused_tokens
    for i, ids in enumerate(prompts[: repeats + 1]):  # request 0 warms every method up, not recorded
        firsts = set()
        for name, call in methods.items():
            timer = FirstTokenTimer()
            out = call(ids, timer)
            firsts.add(int(out[0, -1]))
            if i > 0:
                assert timer.ttft_s is not None
                ttft[name].append(timer.ttft_s)
        agree &= len(firsts) == 1
    medians = {m: statistics.median(v) for m, v in ttft.items()}
    return {
        "system_prompt_tokens": prefix.shape[1],
        "prompt_tokens": [p.shape[1] for p in prompts[1 : repeats + 1]],
        "radixkv_reused_per_request": (cached.stats.reused_tokens - reused_before) / (repeats + 1),
        "ttft_s": ttft,
        "ttft_median_s": medians,
        "speedup_vs_plain": {m: medians["plain generate"] / v for m, v in medians.items()},
        "same_first_token": agree,
    }


def _chat(model: Any, tokenizer: Any, new_tokens: int) -> dict[str, Any]:
    stop = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    kw = {
        "max_new_tokens": new_tokens,
        "do_sample": False,
        "eos_token_id": stop,
        "pad_token_id": tokenizer.pad_token_id,
    }
    cached = radixkv.wrap(model, capacity_tokens=4096)
    runs = {"plain generate": model.generate, "radixkv": cached.generate}
    history = {m: [{"role": "system", "content": CHAT_SYSTEM}] for m in runs}
    seconds: dict[str, list[float]] = {m: [] for m in runs}
    prompt_tokens: list[int] = []
    reused: list[int] = []
    same = True
    for user in CHAT_TURNS:
        outs = {}
        for name, generate in runs.items():
            history[name].append({"role": "user", "content": user})
            ids = _ids(tokenizer, history[name])
            before = cached.stats.reused_tokens
            start = perf_counter()
            out = generate(ids, attention_mask=torch.ones_like(ids), **kw)
            seconds[name].append(perf_counter() - start)
            if name == "radixkv":
                reused.append(cached.stats.reused_tokens - before)
            else:
                prompt_tokens.append(ids.shape[1])
            answer = out[0, ids.shape[1] :].tolist()
            outs[name] = answer
            text = tokenizer.decode(answer, skip_special_tokens=True).strip()
            history[name].append({"role": "assistant", "content": text})
        same &= outs["plain generate"] == outs["radixkv"]
    totals = {m: sum(v) for m, v in seconds.items()}
    return {
        "turns": len(CHAT_TURNS),
        "max_new_tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
        "radixkv_reused": reused,
        "seconds_per_turn": seconds,
        "total_s": totals,
        "speedup": totals["plain generate"] / totals["radixkv"],
        "same_tokens": same,
        "answers": [m["content"] for m in history["radixkv"] if m["role"] == "assistant"],
    }


def _plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    t = doc["ttft"]
    names = list(t["ttft_median_s"])
    a.bar(names, [t["ttft_median_s"][n] * 1e3 for n in names], color=["#888888", "#c98b2b", "#2a9d54"])
    a.set_ylabel("TTFT median (ms)")
    a.set_title(f"TTFT, {t['system_prompt_tokens']}-token system prompt + question")
    c = doc["chat"]
    turns = range(1, c["turns"] + 1)
    for name, color in (("plain generate", "#888888"), ("radixkv", "#2a9d54")):
        cumulative, total = [], 0.0
        for s in c["seconds_per_turn"][name]:
            total += s
            cumulative.append(total)
        b.plot(turns, cumulative, marker="o", color=color, label=name)
    b.set_xticks(list(turns))
    b.set_xlabel("turn")
    b.set_ylabel("cumulative wall time (s)")
    b.set_title(f"{c['turns']}-turn chat, up to {c['max_new_tokens']} new tokens per answer")
    b.legend()
    fig.suptitle(f"{doc['model']} ({doc['dtype']}, {doc['threads']} torch thread(s), CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 1 <= args.repeats <= len(ASSISTANT_QUESTIONS) - 1:
        _parser().error(f"--repeats must be in 1..{len(ASSISTANT_QUESTIONS) - 1}")
    if args.new_tokens < 1 or args.threads < 1:
        _parser().error("--new-tokens and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    lm = load(args.model, dtype=args.dtype)
    if lm.tokenizer is None or not lm.tokenizer.chat_template:
        _parser().error(f"--model {args.model!r} has no tokenizer with a chat template")
    with torch.no_grad():
        doc = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads()}
        doc["ttft"] = _ttft(lm.model, lm.tokenizer, args.repeats)
        doc["chat"] = _chat(lm.model, lm.tokenizer, args.new_tokens)
    t, c = doc["ttft"], doc["chat"]
    print(f"{args.model}, {args.dtype}, {doc['threads']} torch thread(s); TTFT over {args.repeats} requests, "
          f"{t['system_prompt_tokens']}-token system prompt; radixkv reused {t['radixkv_reused_per_request']:.0f} "
          f"tokens per request; same first token: {t['same_first_token']}")  # fmt: skip
    print(f"{'method':<17}{'TTFT median ms':>16}{'TTFT min ms':>13}{'speedup vs plain':>18}")
    for name, med in t["ttft_median_s"].items():
        print(f"{name:<17}{med * 1e3:>16.1f}{min(t['ttft_s'][name]) * 1e3:>13.1f}{t['speedup_vs_plain'][name]:>17.1f}x")
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
        _plot(doc, args.out / "real_model.png")
        print(f"wrote {args.out / 'results.json'} and {args.out / 'real_model.png'}")
    return 0 if t["same_first_token"] and c["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
