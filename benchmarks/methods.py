"""The methods compared in one bench run, in table order.

Sequential methods (`make(model, workload, settings) -> SequentialMethod`) serve one request
at a time and are run interleaved; batch methods (`make(...) -> MethodRun`) run the whole
workload alone. Either raises `NotApplicable` when the method does not apply. `generate` comes
first: it is the reference for the token comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .method_base import BenchSettings, MethodRun, NotApplicable, SequentialMethod
from .method_continuous_batching import run_continuous_batching
from .method_generate import make_generate
from .method_prompt_reuse import make_prompt_reuse
from .method_radixkv import make_radixkv, make_radixkv_reuse_generated

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "BenchSettings",
    "MethodRun",
    "MethodSpec",
    "NotApplicable",
    "SequentialMethod",
]


@dataclass(frozen=True)
class MethodSpec:
    """A method's name, kind and constructor (see the module docstring); `default`: run when
    `--methods` is not given."""

    name: str
    kind: Literal["sequential", "batch"]
    make: Callable[..., SequentialMethod | MethodRun]
    default: bool = True


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("generate", "sequential", make_generate),
        MethodSpec("prompt-reuse", "sequential", make_prompt_reuse),
        MethodSpec("continuous-batching", "batch", run_continuous_batching),
        MethodSpec("radixkv", "sequential", make_radixkv),
        MethodSpec("radixkv-reuse-generated", "sequential", make_radixkv_reuse_generated, default=False),
    )
}
DEFAULT_METHODS: tuple[str, ...] = tuple(name for name, spec in METHODS.items() if spec.default)
