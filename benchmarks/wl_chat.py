"""Chat workloads on a real model: prompts are the tokenizer's chat template over text messages.

Three scenarios over the texts in ``benchmarks/texts/`` (written for this project):

- `assistant`: one long system prompt (the help-desk assistant, ~1,000 tokens), several user
  questions, each its own single-turn request;
- `chat`: a conversation of several turns; round r's prompt is the chat template over the
  system prompt, every earlier user turn and the model's own earlier answers (decoded text, as
  a chat application keeps them), then the new user turn;
- `rag`: an instruction header, then retrieved documents in ranked order, then a question.

Unlike the token workloads, a later round's prompt is not ``history + turn`` but a fresh
rendering of the messages: the template closes each answer with its end-of-turn marker and the
answer is re-tokenised from its text, so the prompt may share a little less than the whole
history with what the cache stored. The cache matches token ids, so that only moves the hit
point; it never changes what is generated. Generation stops at the tokenizer's end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .workload import Conversation, Request, Tokens, Workload

__all__ = [
    "TEXTS",
    "ChatRenderer",
    "ChatWorkload",
    "assistant_workload",
    "chat_workload",
    "rag_workload",
    "read_text",
]

TEXTS = Path(__file__).resolve().parent / "texts"

ASSISTANT_QUESTIONS = (
    "What time does the main library open on Saturday?",
    "How much is the late fee for an adult book, and is there a maximum?",
    "Can I bring my dog to the library?",
    "I want to use the laser cutter. What do I need to do first?",
    "What is the Wi-Fi network called, and do I need a password?",
    "How many items can I borrow at once, and for how long can I keep a film?",
)

CHAT_SYSTEM = "You are a friendly, practical gardening assistant. Keep answers short."
CHAT_TURNS = (
    "I have a small sunny balcony. Which vegetables could I grow there in pots?",
    "Good ideas. How often should I water tomatoes in pots during the summer?",
    "And what can I do if the leaves start turning yellow?",
    "Thanks! Can you summarise your advice in three short points?",
)

RAG_SYSTEM = (
    "You answer questions using only the documents the user provides. Quote figures exactly as the "
    "documents give them, and say so if the documents do not contain the answer."
)
# (documents in retrieval order, question): some requests share a leading document, some reorder it.
RAG_REQUESTS = (
    (("honeybees", "water_cycle"), "How long does a worker bee born in summer live?"),
    (("honeybees", "moon"), "What does the waggle dance tell other bees?"),
    (("moon", "lighthouses"), "How long does the Moon take to orbit Earth?"),
    (("honeybees", "water_cycle"), "How much of the fresh water on Earth do glaciers hold?"),
    (("lighthouses", "moon"), "What is the character of a lighthouse?"),
    (("moon", "honeybees"), "How many astronauts walked on the Moon?"),
)


def read_text(name: str) -> str:
    """A text of ``benchmarks/texts/`` (``documents/<name>`` for a document), without trailing space."""
    return (TEXTS / name).read_text(encoding="utf-8").strip()


def _ids(encoded: Any) -> Tokens:
    """Token ids from apply_chat_template's result (a BatchEncoding in transformers 5, a list before)."""
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return tuple(int(t) for t in ids)


@dataclass
class ChatRenderer:
    """Turns text messages into prompt token ids with `tokenizer`'s chat template, and recovers the
    model's answer from a method's history.

    `remember` records each prompt it rendered with its messages, so that `next_prompt` can cut
    a history (prompt + generated ids) into the prompt it came from and the answer. Different
    methods may have generated different answers: each prompt is remembered separately.
    """

    tokenizer: Any
    stop_token_id: int | None
    _seen: dict[tuple[str, int], dict[Tokens, list[dict[str, str]]]] = field(default_factory=dict)

    def render(self, messages: list[dict[str, str]], *, generation_prompt: bool = True) -> Tokens:
        return _ids(self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt))

    def answer_text(self, generated: Sequence[int]) -> str:
        """The decoded answer, cut at the first stop token."""
        ids = list(generated)
        if self.stop_token_id is not None and self.stop_token_id in ids:
            ids = ids[: ids.index(self.stop_token_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def remember(self, conv_id: str, round_index: int, prompt: Tokens, messages: list[dict[str, str]]) -> None:
        self._seen.setdefault((conv_id, round_index), {})[prompt] = messages

    def next_prompt(self, conv_id: str, round_index: int, history: Tokens, user: str) -> Tokens:
        """Round `round_index`'s prompt: the previous messages, the answer found in `history`, `user`."""
        candidates = self._seen.get((conv_id, round_index - 1), {}).items()
        for prompt, messages in sorted(candidates, key=lambda item: -len(item[0])):  # longest first
            if history[: len(prompt)] == prompt:
                answer = self.answer_text(history[len(prompt) :])
                following = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": user}]
                ids = self.render(following)
                self.remember(conv_id, round_index, ids, following)
                return ids
        raise KeyError(f"conversation {conv_id!r}: round {round_index - 1}'s prompt is not a prefix of the history")


@dataclass(frozen=True)
class ChatWorkload(Workload):
    """A `Workload` whose later rounds re-render the conversation with the chat template.

    `user_turns[conv_id]` are the user messages (text) of each conversation; `turns` keep the
    token ids of round 0's prompt and of each later user message alone (sizes for planning).
    """

    renderer: ChatRenderer | None = None
    user_turns: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def round_requests(self, round_index: int, history: dict[str, Tokens]) -> list[Request]:
        if round_index == 0 or self.renderer is None:
            return super().round_requests(round_index, history)
        out = []
        for conv in self.conversations:
            if round_index < len(conv.turns):
                if conv.id not in history:
                    raise KeyError(f"history for conversation {conv.id!r} is missing at round {round_index}")
                user = self.user_turns[conv.id][round_index]
                out.append(
                    Request(
                        conv.id, round_index, self.renderer.next_prompt(conv.id, round_index, history[conv.id], user)
                    )
                )
        return out


def _system_prefix(renderer: ChatRenderer, system: str, prompt: Tokens) -> Tokens | None:
    """The system message's tokens, when they are a strict prefix of `prompt` (the recipe's known prefix)."""
    prefix = renderer.render([{"role": "system", "content": system}], generation_prompt=False)
    return prefix if len(prefix) < len(prompt) and prompt[: len(prefix)] == prefix else None


def _single_turns(
    name: str,
    renderer: ChatRenderer,
    system: str,
    requests: Sequence[tuple[str, str]],
    max_new_tokens: int,
    notes: tuple[str, ...] = (),
) -> ChatWorkload:
    convs = []
    for conv_id, user in requests:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        prompt = renderer.render(messages)
        renderer.remember(conv_id, 0, prompt, messages)
        convs.append(Conversation(conv_id, (prompt,), known_prefix=_system_prefix(renderer, system, prompt)))
    return ChatWorkload(
        name=name,
        conversations=tuple(convs),
        max_new_tokens=max_new_tokens,
        params={"requests": len(convs), "new_tokens": max_new_tokens},
        notes=notes,
        stop_token_id=renderer.stop_token_id,
        renderer=renderer,
        user_turns={c: (u,) for c, u in requests},
    )


def assistant_workload(
    tokenizer: Any, *, questions: int = 4, max_new_tokens: int = 40, stop_token_id: int | None = None
) -> ChatWorkload:
    """The help-desk assistant: the long system prompt, then `questions` single-turn questions."""
    renderer = ChatRenderer(tokenizer, stop_token_id)
    asked = ASSISTANT_QUESTIONS[:questions]
    return _single_turns(
        "assistant",
        renderer,
        read_text("assistant_system_prompt.md"),
        [(f"q{i}", q) for i, q in enumerate(asked)],
        max_new_tokens,
        notes=("one long system prompt (benchmarks/texts/assistant_system_prompt.md), one request per question",),
    )


def rag_workload(
    tokenizer: Any, *, requests: int = 6, max_new_tokens: int = 40, stop_token_id: int | None = None
) -> ChatWorkload:
    """Retrieval-augmented questions: the documents of ``RAG_REQUESTS`` in ranked order, then the question."""
    renderer = ChatRenderer(tokenizer, stop_token_id)
    rows = []
    for i, (docs, question) in enumerate(RAG_REQUESTS[:requests]):
        body = "\n\n".join(f"Document {k + 1}:\n{read_text(f'documents/{d}.md')}" for k, d in enumerate(docs))
        rows.append((f"q{i}[{','.join(docs)}]", f"{body}\n\nQuestion: {question}"))
    return _single_turns(
        "rag",
        renderer,
        RAG_SYSTEM,
        rows,
        max_new_tokens,
        notes=(
            "documents from benchmarks/texts/documents/ in retrieval order; a prefix cache reuses the header "
            "and a leading document an earlier prompt had first, not one seen at another position",
        ),
    )


def chat_workload(
    tokenizer: Any, *, turns: int = 4, max_new_tokens: int = 40, stop_token_id: int | None = None
) -> ChatWorkload:
    """One conversation of `turns` user turns; each round's prompt includes the model's earlier answers."""
    renderer = ChatRenderer(tokenizer, stop_token_id)
    users = CHAT_TURNS[:turns]
    messages = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": users[0]}]
    first = renderer.render(messages)
    renderer.remember("chat", 0, first, messages)
    later = tuple(tuple(tokenizer(u, add_special_tokens=False)["input_ids"]) for u in users[1:])
    conv = Conversation("chat", (first, *later), known_prefix=_system_prefix(renderer, CHAT_SYSTEM, first))
    return ChatWorkload(
        name="chat",
        conversations=(conv,),
        max_new_tokens=max_new_tokens,
        params={"turns": len(users), "new_tokens": max_new_tokens},
        notes=("each prompt is the chat template over the whole history, the model's earlier answers included",),
        stop_token_id=stop_token_id,
        renderer=renderer,
        user_turns={"chat": users},
    )
