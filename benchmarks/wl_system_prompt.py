"""`system-prompt`: SGLang's generated-shared-prefix workload, scaled to CPU.

`groups` x `prompts_per_group` requests; every prompt of a group is the group's random system
prompt (`system_tokens`) followed by a random question (`question_tokens`); each request
generates `new_tokens`. The first prompt of a group can reuse nothing, every later one reuses
the system prompt (in whole blocks), so the best token hit rate has a closed form::

    (P - 1) * floor(S / B) * B / (P * (S + Q))

(SGLang's defaults, 16 prompts, S=2048, Q=128, B=1: 15*2048 / (16*2176) = 0.882).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .workload import Conversation, Workload

__all__ = ["SystemPromptParams", "build", "closed_form_hit_rate"]


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


def build(p: SystemPromptParams, *, vocab_size: int, seed: int, block_size: int) -> Workload:
    """Draw the prompts (uniform random ids in [3, vocab_size), seeded); groups run one after another."""
    rng = random.Random(seed)

    def draw(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(3, vocab_size) for _ in range(n))

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
