"""What a bench run measured: per method an `Outcome`, per run a result the report formats.

Plain data, shared by the runners that fill it (`runner`, `batched`) and the report that prints,
plots and serialises it (`report`): both import this module, neither imports the other's types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .methods import BenchSettings, MethodRun
from .workloads import RagBatchWorkload, Tokens, Workload

__all__ = ["BatchBenchResult", "BatchOutcome", "BatchResult", "BatchRun", "BenchResult", "MethodOutcome", "Outcome"]

R = TypeVar("R")


@dataclass
class Outcome(Generic[R]):
    """A method's row: `run` when it ran, else `status` ("n/a" or "failed") and `reason`.

    `same_tokens` is None for the reference itself or when there is nothing to compare;
    `mismatches` lists the keys (requests or batch rows) whose tokens differ from the reference.
    """

    name: str
    status: str
    reason: str = ""
    run: R | None = None
    same_tokens: bool | None = None
    mismatches: list[str] = field(default_factory=list)


class _Compared(Generic[R]):
    """The reference and token agreement of a run's outcomes (`outcomes` set by the dataclass)."""

    outcomes: list[Outcome[R]]

    @property
    def reference(self) -> Outcome[R] | None:
        """The first method that ran (normally `generate`)."""
        return next((o for o in self.outcomes if o.run is not None), None)

    @property
    def all_same_tokens(self) -> bool | None:
        """True when every method that ran produced the reference's tokens; None if fewer than two ran."""
        checked = [o.same_tokens for o in self.outcomes if o.same_tokens is not None]
        return all(checked) if checked else None


@dataclass
class BenchResult(_Compared[MethodRun]):
    """Everything one `radixkv bench` / `radixkv demo` run measured, ready for JSON and the table."""

    workload: Workload
    model: dict[str, Any]
    settings: BenchSettings
    outcomes: list[Outcome[MethodRun]]
    best_hit_rate: float | None
    machine: dict[str, Any]


@dataclass(frozen=True)
class BatchResult:
    """One batch as a method served it (see the module docstring for how each figure is counted).

    `width` is the padded prompt width (0 for continuous batching, which packs its requests);
    `ttft_s` None where the method gives no time to the batch's first token.
    """

    name: str
    keys: tuple[str, ...]
    prompts: tuple[Tokens, ...]
    generated: tuple[Tokens, ...]
    width: int
    wall_s: float
    ttft_s: float | None
    prefill_positions: int
    reused_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def computed_tokens(self) -> int:
        """Real prompt tokens computed: prompt tokens - reused."""
        return self.prompt_tokens - self.reused_tokens


@dataclass
class BatchRun:
    """Everything measured for one method on the batched workload."""

    name: str
    batches: list[BatchResult]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return sum(b.wall_s for b in self.batches)

    @property
    def prompt_tokens(self) -> int:
        return sum(b.prompt_tokens for b in self.batches)

    @property
    def prefill_positions(self) -> int:
        return sum(b.prefill_positions for b in self.batches)

    @property
    def computed_tokens(self) -> int:
        return sum(b.computed_tokens for b in self.batches)

    @property
    def reused_tokens(self) -> int:
        return sum(b.reused_tokens for b in self.batches)

    @property
    def hit_rate(self) -> float:
        """Prompt tokens read from a cache / prompt tokens."""
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def outputs(self) -> dict[str, Tokens]:
        return {k: g for b in self.batches for k, g in zip(b.keys, b.generated, strict=True)}


@dataclass
class BatchBenchResult(_Compared[BatchRun]):
    """Everything one `radixkv bench rag-batch` run measured."""

    workload: RagBatchWorkload
    model: dict[str, Any]
    settings: BenchSettings
    outcomes: list[Outcome[BatchRun]]
    machine: dict[str, Any]


MethodOutcome = Outcome[MethodRun]
"""A per-request bench method's row."""
BatchOutcome = Outcome[BatchRun]
"""A batched bench method's row."""
