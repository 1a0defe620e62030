"""What a model workload is: conversations of token-id turns, and the best hit rate a prefix cache can get.

Every model workload is a list of conversations; each conversation is a list of user turns
(token ids). Round r of a conversation sends ``turn_0 + answer_0 + ... + turn_r`` where
``answer_i`` is what the method generated for round i, so a single-shot workload is simply one
turn per conversation. Methods run the workload round-major: round 0 of every conversation in
order, then round 1, and so on (how interleaved chat traffic arrives).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Conversation", "Request", "Tokens", "Workload", "best_hit_tokens"]

Tokens = tuple[int, ...]


@dataclass(frozen=True)
class Conversation:
    """One conversation: its user turns, and the prefix the prompt-reuse recipe may precompute.

    `known_prefix` (None when the recipe does not apply) must be a strict prefix of ``turns[0]``,
    hence of every round's prompt, so at least one prompt token is always computed.
    """

    id: str
    turns: tuple[Tokens, ...]
    known_prefix: Tokens | None = None

    def __post_init__(self) -> None:
        if not self.turns or any(len(t) == 0 for t in self.turns):
            raise ValueError(f"conversation {self.id!r}: turns must be non-empty token sequences")
        p = self.known_prefix
        if p is not None and (len(p) >= len(self.turns[0]) or self.turns[0][: len(p)] != p):
            raise ValueError(f"conversation {self.id!r}: known_prefix must be a strict prefix of turns[0]")


@dataclass(frozen=True)
class Request:
    """One generate call: conversation `conversation_id`, round `round`, full prompt token ids."""

    conversation_id: str
    round: int
    prompt: Tokens

    @property
    def key(self) -> str:
        """Stable id used in results and to compare outputs across methods."""
        return f"{self.conversation_id}/r{self.round}"


@dataclass(frozen=True)
class Workload:
    """A model workload: conversations, generation length, and figures known before any run.

    `closed_form_hit_rate` is the best token hit rate derived analytically (None when the
    workload has no closed form); `params` records how it was built, for results.json;
    `notes` are lines printed under the table. `stop_token_id` ends a generation early (a chat
    model's end-of-turn token); None generates exactly `max_new_tokens` every time.
    """

    name: str
    conversations: tuple[Conversation, ...]
    max_new_tokens: int
    params: dict[str, Any]
    closed_form_hit_rate: float | None = None
    notes: tuple[str, ...] = field(default=())
    stop_token_id: int | None = None

    @property
    def num_rounds(self) -> int:
        """The largest number of turns of any conversation."""
        return max(len(c.turns) for c in self.conversations)

    @property
    def num_requests(self) -> int:
        """Total generate calls (sum of turns over conversations)."""
        return sum(len(c.turns) for c in self.conversations)

    def round_requests(self, round_index: int, history: dict[str, Tokens]) -> list[Request]:
        """Requests of round `round_index`, in conversation order.

        `history[conversation_id]` is what the conversation sent and received so far
        (previous prompt + previous answer); it is required from round 1 on.
        """
        out = []
        for conv in self.conversations:
            if round_index < len(conv.turns):
                before = history.get(conv.id, ()) if round_index else ()
                if round_index and conv.id not in history:
                    raise KeyError(f"history for conversation {conv.id!r} is missing at round {round_index}")
                out.append(Request(conv.id, round_index, before + conv.turns[round_index]))
        return out


def best_hit_tokens(requests: Iterable[tuple[Sequence[int], Sequence[int]]], block_size: int) -> tuple[int, int]:
    """Best (cached prompt tokens, prompt tokens) for an unlimited whole-block prefix cache.

    `requests` yields (prompt, generated) in arrival order. After a request, the cache may hold
    ``prompt + generated[:-1]`` (the last generated token never has KV), in whole blocks. A
    prompt can reuse the longest whole-block prefix it shares with anything stored before,
    capped at ``len(prompt) - 1`` so that one prompt token is always computed.
    Cost: O(total tokens) with a set of block-chain keys.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size!r}")
    ids: dict[tuple[int, Tokens], int] = {}  # (parent block's id, block tokens) -> this block's id
    hit = total = 0
    for prompt, generated in requests:
        prompt = tuple(prompt)
        total += len(prompt)
        limit = (len(prompt) - 1) // block_size
        parent = 0
        for b in range(limit):
            key = (parent, prompt[b * block_size : (b + 1) * block_size])
            if key not in ids:
                break
            hit += block_size
            parent = ids[key]
        seq = prompt + tuple(generated)[:-1] if generated else prompt
        parent = 0
        for b in range(len(seq) // block_size):
            key = (parent, seq[b * block_size : (b + 1) * block_size])
            if key not in ids:
                ids[key] = len(ids) + 1
            parent = ids[key]
    return hit, total
