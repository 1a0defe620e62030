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
from pathlib import Path

from chat import add_model_args, open_model, reply  # the sibling example (run as a script)
from radixkv.benchmarks.wl_chat import RAG_SYSTEM, TEXTS

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
    add_model_args(p, max_new_tokens=48)
    args = p.parse_args()
    docs = {f.stem: f.read_text(encoding="utf-8").strip() for f in sorted(Path(TEXTS, "documents").glob("*.md"))}
    cached, tok = open_model(p, args)
    for question in args.questions or QUESTIONS:
        ranked = retrieve(question, docs)
        body = "\n\n".join(f"Document {i + 1}:\n{docs[name]}" for i, name in enumerate(ranked))
        messages = [
            {"role": "system", "content": RAG_SYSTEM},
            {"role": "user", "content": f"{body}\n\nQuestion: {question}"},
        ]
        r = reply(cached, tok, messages, args.max_new_tokens)
        print(f"Q: {question}\n   documents: {', '.join(ranked)}")
        print(f"A: {r.text}")
        print(f"   [reused {r.reused_tokens:,} of {r.prompt_tokens:,} prompt tokens; {r.seconds:.1f} s]\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
