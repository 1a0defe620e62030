"""Registry of the model workloads: name -> parameters class, builder and a small smoke size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import wl_multi_turn, wl_rag, wl_system_prompt
from .workload import Workload

__all__ = ["WORKLOADS", "WorkloadSpec", "get_workload"]


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
            wl_system_prompt.SystemPromptParams,
            wl_system_prompt.build,
            wl_system_prompt.SystemPromptParams(
                groups=2, prompts_per_group=3, system_tokens=128, question_tokens=16, new_tokens=4
            ),
        ),
        WorkloadSpec(
            "rag",
            "k documents from a shared pool, in varying order, before a question",
            wl_rag.RagParams,
            wl_rag.build,
            wl_rag.RagParams(requests=6, docs=4, doc_tokens=32, docs_per_request=2, header_tokens=32, new_tokens=4),
        ),
        WorkloadSpec(
            "multi-turn",
            "conversations whose every round resends history + generated answers",
            wl_multi_turn.MultiTurnParams,
            wl_multi_turn.build,
            wl_multi_turn.MultiTurnParams(conversations=2, rounds=3, system_tokens=60, turn_tokens=9, new_tokens=12),
        ),
    )
}


def get_workload(name: str) -> WorkloadSpec:
    """The spec named `name`; ValueError listing the valid names otherwise."""
    if name not in WORKLOADS:
        raise ValueError(f"workload {name!r} is unknown; choose one of: {', '.join(WORKLOADS)}, trace")
    return WORKLOADS[name]
