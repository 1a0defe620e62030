"""`rag`: retrieval-augmented prompts, k documents from a shared pool before each question.

Each prompt is an instruction header (`header_tokens`, the same for all), then
`docs_per_request` documents drawn without replacement from a pool of `docs` (popularity
skewed: document i is drawn with weight 1/(i+1)**`skew`), in the order retrieval ranked them
(random per request), then a random question. A prefix cache reuses the header and the longest
run of leading documents that an earlier prompt had in the same order; a document seen before
at another position, or after a different document, is recomputed. The workload records both
figures: the share of prompt tokens that were header or already-seen documents (what a
position-independent cache could reuse) and, after the run, the best prefix hit rate.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .workload import Conversation, Workload

__all__ = ["RagParams", "build"]


@dataclass(frozen=True)
class RagParams:
    """Sizes of the rag workload (tokens, counts and the popularity skew)."""

    requests: int = field(default=32, metadata={"help": "number of requests"})
    docs: int = field(default=8, metadata={"help": "documents in the pool"})
    doc_tokens: int = field(default=512, metadata={"help": "length of each document"})
    docs_per_request: int = field(default=3, metadata={"help": "documents per prompt (k)"})
    header_tokens: int = field(default=64, metadata={"help": "shared instruction header length"})
    question_tokens: int = field(default=32, metadata={"help": "random question length"})
    new_tokens: int = field(default=16, metadata={"help": "tokens generated per request"})
    skew: float = field(default=1.0, metadata={"help": "Zipf exponent of document popularity"})


def build(p: RagParams, *, vocab_size: int, seed: int, block_size: int) -> Workload:
    """Draw header, pool, per-request document lists and questions (seeded)."""
    if p.docs_per_request > p.docs:
        raise ValueError(f"docs_per_request ({p.docs_per_request}) must be <= docs ({p.docs})")
    rng = random.Random(seed)

    def draw(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(3, vocab_size) for _ in range(n))

    header = draw(p.header_tokens)
    pool = [draw(p.doc_tokens) for _ in range(p.docs)]
    weights = [1 / (i + 1) ** p.skew for i in range(p.docs)]
    convs, seen, reusable, total = [], set(), 0, 0
    for r in range(p.requests):
        chosen: list[int] = []
        while len(chosen) < p.docs_per_request:
            d = rng.choices(range(p.docs), weights)[0]
            if d not in chosen:
                chosen.append(d)
        prompt = header + sum((pool[d] for d in chosen), ()) + draw(p.question_tokens)
        reusable += (len(header) if r else 0) + sum(p.doc_tokens for d in chosen if d in seen)
        total += len(prompt)
        seen.update(chosen)
        convs.append(Conversation(f"q{r}[{','.join(map(str, chosen))}]", (prompt,), known_prefix=header or None))
    seen_rate = reusable / total
    params = vars(p).copy()
    params["seen_before_token_rate"] = seen_rate
    return Workload(
        name="rag",
        conversations=tuple(convs),
        max_new_tokens=p.new_tokens,
        params=params,
        notes=(
            f"{seen_rate:.1%} of prompt tokens are the header or a document an earlier prompt already had "
            "(reusable only by a position-independent cache); a prefix cache reuses the leading run "
            "in the same order only",
        ),
    )
