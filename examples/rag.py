"""Retrieval-augmented answers through radixkv, over the documents kept in benchmarks/texts/documents/.

    python examples/rag.py                                   # a few example questions
    python examples/rag.py "How far away is the Moon?" "Why do bees dance?"

A toy retriever ranks the documents by the words they share with the question and puts the best
two, in that order, after a fixed instruction header. Prompts that start with the same document
reuse the header and that document's KV from the cache; each answer reports how many prompt
tokens came from the cache. The output is the same as plain `generate` (greedy).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from radixkv.benchmarks.models import load
from radixkv.benchmarks.workloads import RAG_SYSTEM, TEXTS

import radixkv

QUESTIONS = (
    "How long does a worker bee born in summer live?",
    "How do bees turn nectar into honey?",
    "How long does the Moon take to orbit Earth?",
    "How far away can a Fresnel lens be seen?",
    "What share of the water on Earth is salt water?",
)


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 3}


def retrieve(question: str, docs: dict[str, str], k: int = 2) -> list[str]:
    """The `k` document names sharing the most words with `question` (ties by name)."""
    q = _words(question)
    return sorted(docs, key=lambda name: (-len(q & _words(docs[name])), name))[:k]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("questions", nargs="*", help="questions (default: a few examples)")
    p.add_argument("--model", default="smollm2", help="smollm2, a GGUF file or folder, or a local HF directory")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    docs = {f.stem: f.read_text(encoding="utf-8").strip() for f in sorted(Path(TEXTS, "documents").glob("*.md"))}
    lm = load(args.model)
    if lm.tokenizer is None or not lm.tokenizer.chat_template:
        p.error(f"--model {args.model!r} has no tokenizer with a chat template")
    tok = lm.tokenizer
    cached = radixkv.wrap(lm.model, capacity_tokens=8192)
    for question in args.questions or QUESTIONS:
        ranked = retrieve(question, docs)
        body = "\n\n".join(f"Document {i + 1}:\n{docs[name]}" for i, name in enumerate(ranked))
        messages = [
            {"role": "system", "content": RAG_SYSTEM},
            {"role": "user", "content": f"{body}\n\nQuestion: {question}"},
        ]
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        before = cached.stats.reused_tokens
        start = time.perf_counter()
        out = cached.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
        prompt_len = enc["input_ids"].shape[1]
        answer = tok.decode(out[0, prompt_len:], skip_special_tokens=True).strip()
        print(f"Q: {question}\n   documents: {', '.join(ranked)}")
        print(f"A: {answer}")
        print(f"   [reused {cached.stats.reused_tokens - before:,} of {prompt_len:,} prompt tokens; {seconds:.1f} s]\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
