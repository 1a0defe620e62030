"""`multi-turn`: chat conversations of several rounds sharing one system prompt.

`conversations` conversations of `rounds` rounds; round 0 sends the shared system prompt
(`system_tokens`) + a user turn (`turn_tokens`), round r sends the whole history (every
previous prompt and the answer the method generated, `new_tokens` each) + a new user turn.
Conversations are interleaved round by round. A prefix cache hits the history only if it
stored the generated answers too, not just the prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .workload import Conversation, Workload

__all__ = ["MultiTurnParams", "build"]


@dataclass(frozen=True)
class MultiTurnParams:
    """Sizes of the multi-turn workload (tokens and counts)."""

    conversations: int = field(default=8, metadata={"help": "concurrent conversations"})
    rounds: int = field(default=4, metadata={"help": "rounds per conversation"})
    system_tokens: int = field(default=1024, metadata={"help": "shared system prompt length"})
    turn_tokens: int = field(default=64, metadata={"help": "user tokens added each round"})
    new_tokens: int = field(default=32, metadata={"help": "tokens generated per round"})


def build(p: MultiTurnParams, *, vocab_size: int, seed: int, block_size: int) -> Workload:
    """Draw the system prompt and every user turn (seeded); answers come from the methods."""
    del block_size  # the best hit rate depends on the answers: computed after the run
    rng = random.Random(seed)

    def draw(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(3, vocab_size) for _ in range(n))

    system = draw(p.system_tokens)
    convs = tuple(
        Conversation(
            f"c{c}",
            (system + draw(p.turn_tokens), *(draw(p.turn_tokens) for _ in range(p.rounds - 1))),
            known_prefix=system or None,
        )
        for c in range(p.conversations)
    )
    return Workload(name="multi-turn", conversations=convs, max_new_tokens=p.new_tokens, params=vars(p).copy())
