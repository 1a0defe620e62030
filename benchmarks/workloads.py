"""The workloads a bench runs: conversations of token-id turns, the synthetic ones, the chat ones.

A model workload is a list of conversations, each a list of user turns (token ids). Round r of a
conversation sends ``turn_0 + answer_0 + ... + turn_r``, ``answer_i`` being what the method
generated for round i (a single-shot workload has one turn per conversation). Methods run it
round-major: round 0 of every conversation in order, then round 1, and so on.

Synthetic workloads (random token ids, any model; `WORKLOADS` names them for `radixkv bench`):

- `system-prompt`: SGLang's generated-shared-prefix workload, scaled to CPU: `groups` x
  `prompts_per_group` prompts, each its group's random system prompt (`system_tokens`) + a random
  question (`question_tokens`). Every prompt but a group's first reuses the system prompt in whole
  blocks, so the best token hit rate is ``(P - 1) * floor(S / B) * B / (P * (S + Q))``
  (SGLang's defaults, 16 prompts, S=2048, Q=128, B=1: 15*2048 / (16*2176) = 0.882).
- `rag`: a shared header (`header_tokens`), `docs_per_request` documents drawn without replacement
  from a pool of `docs` (weight 1/(i+1)**`skew`) in a random ranked order, then a question. A prefix
  cache reuses the header and the longest run of leading documents an earlier prompt had in the
  same order; the workload also records the share of tokens a position-independent cache could reuse.
- `multi-turn`: `conversations` x `rounds` sharing one system prompt; each round resends the whole
  history (prompts and the method's answers) + a new turn: a cache hits it only if it stored answers.
- `rag-batch` (`RagBatchWorkload`, run by `benchmarks.batched`, not by the per-request methods):
  `questions` over each of `docs` documents, sent `batch_size` at a time as one left-padded
  `generate` call; a question is its leading document + a question, or (one in
  `second_doc_every`) the leading document + another + a question, so rows share only their
  leading document. A document's first batch can share it inside the batch only; its later
  batches also find it in a prefix cache.

Chat workloads on a real model (`radixkv demo`) render the tokenizer's chat template over the
texts in ``benchmarks/texts/``: `assistant` (a ~1,000-token help-desk system prompt, one request per
question), `chat` (several turns, each prompt re-rendering the history with the model's decoded
answers) and `rag` (a header, retrieved documents in ranked order, a question). Since a later chat
prompt is a fresh rendering (end-of-turn markers, answers re-tokenised from text), it may share a
little less than the whole history with what the cache stored: that moves the hit point, never what
is generated. Generation stops at the tokenizer's end-of-turn token.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
                if round_index and conv.id not in history:
                    raise KeyError(f"history for conversation {conv.id!r} is missing at round {round_index}")
                before = history[conv.id] if round_index else ()
                out.append(Request(conv.id, round_index, self._prompt(conv, round_index, before)))
        return out

    def _prompt(self, conv: Conversation, round_index: int, history: Tokens) -> Tokens:
        """Round `round_index`'s prompt of `conv`: its history so far (empty at round 0), then the turn."""
        return history + conv.turns[round_index]


def chain_ids(table: dict[Any, int], blocks: Iterable[Hashable], namespace: Hashable = None) -> list[int]:
    """Dense ids of a prompt's successive blocks, numbered in `table` (shared by every prompt of a
    run): equal id = equal prefix (same namespace, equal blocks up to here). A block is anything
    hashable that names its content (its token ids, or a trace's hash id and offset). The one
    block-chain builder of the benchmarks: the bounds here and in `trace` build on it."""
    parent = table.setdefault(("root", namespace), len(table))
    out = []
    for block in blocks:
        parent = table.setdefault((parent, block), len(table))
        out.append(parent)
    return out


def leading_run(chain: Sequence[int], limit: int, stored: Container[int]) -> int:
    """How many leading blocks of `chain`, at most `limit`, are in `stored` (a prefix match)."""
    k = 0
    while k < limit and chain[k] in stored:
        k += 1
    return k


def best_hit_tokens(requests: Iterable[tuple[Sequence[int], Sequence[int]]], block_size: int) -> tuple[int, int]:
    """Best (cached prompt tokens, prompt tokens) for an unlimited whole-block prefix cache.

    `requests` yields (prompt, generated) in arrival order. After a request, the cache may hold
    ``prompt + generated[:-1]`` (the last generated token never has KV), in whole blocks. A
    prompt can reuse the longest whole-block prefix it shares with anything stored before,
    capped at ``len(prompt) - 1`` so that one prompt token is always computed.
    Cost: O(total tokens).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size!r}")

    def blocks(seq: Tokens) -> Iterator[Tokens]:
        return (seq[b * block_size : (b + 1) * block_size] for b in range(len(seq) // block_size))

    table: dict[Any, int] = {}
    stored: set[int] = set()
    hit = total = 0
    for prompt, generated in requests:
        prompt = tuple(prompt)
        total += len(prompt)
        hit += leading_run(chain_ids(table, blocks(prompt)), (len(prompt) - 1) // block_size, stored) * block_size
        stored.update(chain_ids(table, blocks(prompt + tuple(generated)[:-1] if generated else prompt)))
    return hit, total


def _drawer(rng: random.Random, vocab_size: int) -> Callable[[int], Tokens]:
    """`draw(n)`: n uniform random token ids in [3, vocab_size) from `rng` (0-2 are left to special tokens)."""
    return lambda n: tuple(rng.randrange(3, vocab_size) for _ in range(n))


# ----- synthetic workloads ------------------------------------------------------------------------


@dataclass(frozen=True)
class SystemPromptParams:
    """Sizes of the system-prompt workload (all in tokens except the counts)."""

    groups: int = field(default=4, metadata={"help": "distinct system prompts"})
    prompts_per_group: int = field(default=8, metadata={"help": "requests sharing each system prompt"})
    system_tokens: int = field(default=2048, metadata={"help": "system prompt length"})
    question_tokens: int = field(default=128, metadata={"help": "random question length"})
    new_tokens: int = field(default=16, metadata={"help": "tokens generated per request"})


def closed_form_hit_rate(p: SystemPromptParams, block_size: int) -> float:
    """Best token hit rate of a whole-block prefix cache on this workload (formula above)."""
    reusable = (p.system_tokens // block_size) * block_size
    per_group = p.prompts_per_group * (p.system_tokens + p.question_tokens)
    return (p.prompts_per_group - 1) * reusable / per_group


def build_system_prompt(p: SystemPromptParams, *, vocab_size: int, seed: int, block_size: int) -> Workload:
    """Draw the prompts (uniform random ids in [3, vocab_size), seeded); groups run one after another."""
    rng = random.Random(seed)
    draw = _drawer(rng, vocab_size)
    convs = []
    for g in range(p.groups):
        system = draw(p.system_tokens)
        for i in range(p.prompts_per_group):
            convs.append(Conversation(f"g{g}p{i}", (system + draw(p.question_tokens),), known_prefix=system))
    best = closed_form_hit_rate(p, block_size)
    return Workload(
        name="system-prompt",
        conversations=tuple(convs),
        max_new_tokens=p.new_tokens,
        params=vars(p).copy(),
        closed_form_hit_rate=best,
        notes=(
            f"closed-form best hit rate (P-1)*floor(S/B)*B/(P*(S+Q)) = "
            f"{p.prompts_per_group - 1}*{(p.system_tokens // block_size) * block_size}/"
            f"({p.prompts_per_group}*{p.system_tokens + p.question_tokens}) = {best:.4f}",
        ),
    )


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


def build_rag(p: RagParams, *, vocab_size: int, seed: int, block_size: int) -> Workload:
    """Draw header, pool, per-request document lists and questions (seeded)."""
    if p.docs_per_request > p.docs:
        raise ValueError(f"docs_per_request ({p.docs_per_request}) must be <= docs ({p.docs})")
    rng = random.Random(seed)
    draw = _drawer(rng, vocab_size)
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


@dataclass(frozen=True)
class MultiTurnParams:
    """Sizes of the multi-turn workload (tokens and counts)."""

    conversations: int = field(default=8, metadata={"help": "concurrent conversations"})
    rounds: int = field(default=4, metadata={"help": "rounds per conversation"})
    system_tokens: int = field(default=1024, metadata={"help": "shared system prompt length"})
    turn_tokens: int = field(default=64, metadata={"help": "user tokens added each round"})
    new_tokens: int = field(default=32, metadata={"help": "tokens generated per round"})


def build_multi_turn(p: MultiTurnParams, *, vocab_size: int, seed: int, block_size: int) -> Workload:
    """Draw the system prompt and every user turn (seeded); answers come from the methods."""
    del block_size  # the best hit rate depends on the answers: computed after the run
    rng = random.Random(seed)
    draw = _drawer(rng, vocab_size)
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


@dataclass(frozen=True)
class RagBatchParams:
    """Sizes of the rag-batch workload (tokens and counts)."""

    docs: int = field(default=2, metadata={"help": "documents; each leads the prompts of its own batches"})
    questions: int = field(default=8, metadata={"help": "questions over each leading document"})
    batch_size: int = field(default=4, metadata={"help": "rows per generate call (a document's last may be smaller)"})
    doc_tokens: int = field(default=256, metadata={"help": "length of each document"})
    question_tokens: int = field(default=16, metadata={"help": "random question length"})
    second_doc_every: int = field(
        default=2, metadata={"help": "every Nth question also has a second document after the leading one (0: none)"}
    )
    new_tokens: int = field(default=8, metadata={"help": "tokens generated per row"})

    def __post_init__(self) -> None:
        """Raise ValueError naming the flag of a size out of range (before any model is loaded)."""
        sizes = (("docs", self.docs), ("questions", self.questions), ("batch-size", self.batch_size),
                 ("doc-tokens", self.doc_tokens), ("question-tokens", self.question_tokens),
                 ("new-tokens", self.new_tokens))  # fmt: skip
        for flag, value in sizes:
            if value <= 0:
                raise ValueError(f"--{flag} must be positive, got {value}")
        if self.second_doc_every < 0:
            raise ValueError(f"--second-doc-every must be >= 0, got {self.second_doc_every}")
        if self.second_doc_every and self.docs < 2:
            raise ValueError(f"--second-doc-every {self.second_doc_every} needs --docs >= 2, got {self.docs}")


@dataclass(frozen=True)
class RagBatchWorkload(Workload):
    """A `Workload` sent in padded batches: `batches[k]` names the conversations (one prompt each)
    of the k-th generate call, in row order; `batch_names[k]` labels it in the results."""

    batches: tuple[tuple[str, ...], ...] = ()
    batch_names: tuple[str, ...] = ()
    batch_floors: tuple[int, ...] = ()  # per batch: its tokens ending a prefix no earlier row had

    def batch_prompts(self, k: int) -> list[tuple[str, Tokens]]:
        """(conversation id, prompt) of batch `k`'s rows, in order."""
        prompts = {c.id: c.turns[0] for c in self.conversations}
        return [(cid, prompts[cid]) for cid in self.batches[k]]


def distinct_prefix_tokens(prompts: Iterable[Sequence[int]]) -> list[int]:
    """For each prompt in order, how many of its tokens end a prefix no earlier prompt had (nor it before).

    Their sum is the fewest prompt tokens a method computing every distinct prefix once could
    compute (token granularity, unlimited memory, each batch's common prefixes shared too);
    a whole-block cache computes at least this. Cost: O(total tokens).
    """
    root: dict[int, dict] = {}
    out = []
    for prompt in prompts:
        node, new = root, 0
        for t in prompt:
            if t not in node:
                node[t] = {}
                new += 1
            node = node[t]
        out.append(new)
    return out


def build_rag_batch(p: RagBatchParams, *, vocab_size: int, seed: int, block_size: int) -> RagBatchWorkload:
    """Draw the documents and questions (seeded) and cut each document's questions into batches.

    Question j over leading document d is ``doc_d + q`` or, when ``(j + 1) % second_doc_every == 0``,
    ``doc_d + doc_e + q`` with e a random other document: rows of a batch share their leading
    document only, and rows with a second document are longer (left padding). Batches run
    document by document, so a document's second batch finds it in a prefix cache.
    """
    del block_size  # the bound is computed at token granularity
    rng = random.Random(seed)
    draw = _drawer(rng, vocab_size)
    pool = [draw(p.doc_tokens) for _ in range(p.docs)]
    convs: list[Conversation] = []
    batches: list[tuple[str, ...]] = []
    names: list[str] = []
    for d in range(p.docs):
        rows: list[str] = []
        for j in range(p.questions):
            docs = [d]
            if p.second_doc_every and (j + 1) % p.second_doc_every == 0:
                docs.append(rng.choice([e for e in range(p.docs) if e != d]))
            cid = f"d{d}q{j}[{','.join(map(str, docs))}]"
            convs.append(Conversation(cid, (sum((pool[e] for e in docs), ()) + draw(p.question_tokens),)))
            rows.append(cid)
        for k in range(0, p.questions, p.batch_size):
            batches.append(tuple(rows[k : k + p.batch_size]))
            names.append(f"d{d}b{k // p.batch_size}")
    prompts = {c.id: c.turns[0] for c in convs}
    order = [prompts[cid] for batch in batches for cid in batch]
    new_per_row = iter(distinct_prefix_tokens(order))
    floors = tuple(sum(next(new_per_row) for _ in batch) for batch in batches)
    floor = sum(floors)
    total = sum(map(len, order))
    params = vars(p).copy()
    params["distinct_prefix_tokens"] = floor
    return RagBatchWorkload(
        name="rag-batch",
        conversations=tuple(convs),
        max_new_tokens=p.new_tokens,
        params=params,
        notes=(
            f"{len(batches)} padded batches of up to {p.batch_size} rows (left padding), {len(convs)} questions; "
            "rows of a batch share their leading document; "
            + (f"one question in {p.second_doc_every} adds a second" if p.second_doc_every else "one document each"),
            f"fewest prompt tokens any method could compute, every distinct prefix once (token granularity, "
            f"in-batch sharing, unlimited memory): {floor:,} of {total:,}",
        ),
        batches=tuple(batches),
        batch_names=tuple(names),
        batch_floors=floors,
    )


RAG_BATCH_SMOKE = RagBatchParams(docs=2, questions=4, batch_size=2, doc_tokens=48, question_tokens=8, new_tokens=4)
"""A rag-batch size that runs in seconds on the tiny preset (tests): 4 batches of 2 rows."""


@dataclass(frozen=True)
class WorkloadSpec:
    """A model workload: its parameters dataclass (defaults = the documented size), the builder
    ``build(params, vocab_size=, seed=, block_size=)``, and `smoke`, a size that runs in a few
    seconds on the tiny preset (used by tests)."""

    name: str
    summary: str
    params_cls: type
    build: Callable[..., Workload]
    smoke: Any


WORKLOADS: dict[str, WorkloadSpec] = {
    s.name: s
    for s in (
        WorkloadSpec(
            "system-prompt",
            "groups of prompts sharing a system prompt (SGLang generated-shared-prefix)",
            SystemPromptParams,
            build_system_prompt,
            SystemPromptParams(groups=2, prompts_per_group=3, system_tokens=128, question_tokens=16, new_tokens=4),
        ),
        WorkloadSpec(
            "rag",
            "k documents from a shared pool, in varying order, before a question",
            RagParams,
            build_rag,
            RagParams(requests=6, docs=4, doc_tokens=32, docs_per_request=2, header_tokens=32, new_tokens=4),
        ),
        WorkloadSpec(
            "multi-turn",
            "conversations whose every round resends history + generated answers",
            MultiTurnParams,
            build_multi_turn,
            MultiTurnParams(conversations=2, rounds=3, system_tokens=60, turn_tokens=9, new_tokens=12),
        ),
    )
}


# ----- chat workloads on a real model ---------------------------------------------------------------

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

    def _prompt(self, conv: Conversation, round_index: int, history: Tokens) -> Tokens:
        if round_index == 0 or self.renderer is None:
            return super()._prompt(conv, round_index, history)
        return self.renderer.next_prompt(conv.id, round_index, history, self.user_turns[conv.id][round_index])


def _system_prefix(renderer: ChatRenderer, system: str, prompt: Tokens) -> Tokens | None:
    """The system message's tokens, when they are a strict prefix of `prompt` (the recipe's known prefix)."""
    prefix = renderer.render([{"role": "system", "content": system}], generation_prompt=False)
    return prefix if len(prefix) < len(prompt) and prompt[: len(prefix)] == prefix else None


def _single_turns(
    name: str, renderer: ChatRenderer, system: str, requests: Sequence[tuple[str, str]], max_new_tokens: int, note: str
) -> ChatWorkload:
    """One single-turn conversation per (id, user message) of `requests`, under the system message `system`."""
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
        notes=(note,),
        stop_token_id=renderer.stop_token_id,
        renderer=renderer,
        user_turns={c: (u,) for c, u in requests},
    )


def assistant_workload(
    tokenizer: Any, *, questions: int = 4, max_new_tokens: int = 40, stop_token_id: int | None = None
) -> ChatWorkload:
    """The help-desk assistant: the long system prompt, then `questions` single-turn questions."""
    renderer = ChatRenderer(tokenizer, stop_token_id)
    asked = [(f"q{i}", q) for i, q in enumerate(ASSISTANT_QUESTIONS[:questions])]
    system = read_text("assistant_system_prompt.md")
    note = "one long system prompt (benchmarks/texts/assistant_system_prompt.md), one request per question"
    return _single_turns("assistant", renderer, system, asked, max_new_tokens, note)


def rag_workload(
    tokenizer: Any, *, requests: int = 6, max_new_tokens: int = 40, stop_token_id: int | None = None
) -> ChatWorkload:
    """Retrieval-augmented questions: the documents of ``RAG_REQUESTS`` in ranked order, then the question."""
    renderer = ChatRenderer(tokenizer, stop_token_id)
    rows = []
    for i, (docs, question) in enumerate(RAG_REQUESTS[:requests]):
        body = "\n\n".join(f"Document {k + 1}:\n{read_text(f'documents/{d}.md')}" for k, d in enumerate(docs))
        rows.append((f"q{i}[{','.join(docs)}]", f"{body}\n\nQuestion: {question}"))
    note = (
        "documents from benchmarks/texts/documents/ in retrieval order; a prefix cache reuses the header "
        "and a leading document an earlier prompt had first, not one seen at another position"
    )
    return _single_turns("rag", renderer, RAG_SYSTEM, rows, max_new_tokens, note)


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
