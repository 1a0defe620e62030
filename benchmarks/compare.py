"""One model bench: build the workload, run every method side by side on one model, compare.

All methods run in one process on the same model object, same prompts, same greedy settings,
after one untimed warm-up generate; the one-request-at-a-time methods are interleaved request
by request so they share the machine's noise. `generate` is the reference: every other
method's tokens are compared with it request by request.
"""

from __future__ import annotations

import math
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from .method_base import greedy_config, run_interleaved
from .methods import METHODS, BenchSettings, MethodRun, NotApplicable, SequentialMethod
from .workload import Workload, best_hit_tokens

__all__ = ["BenchResult", "MethodOutcome", "machine_info", "run_methods"]


@dataclass
class MethodOutcome:
    """A method's row: `run` when it ran, else `status` ("n/a" or "failed") and `reason`.

    `same_tokens` is None for the reference itself or when there is nothing to compare;
    `mismatches` lists the request keys whose tokens differ from the reference.
    """

    name: str
    status: str
    reason: str = ""
    run: MethodRun | None = None
    same_tokens: bool | None = None
    mismatches: list[str] = field(default_factory=list)


@dataclass
class BenchResult:
    """Everything one `radixkv bench` / `radixkv demo` run measured, ready for JSON and the table."""

    workload: Workload
    model: dict[str, Any]
    settings: BenchSettings
    outcomes: list[MethodOutcome]
    best_hit_rate: float | None
    machine: dict[str, Any]

    @property
    def reference(self) -> MethodOutcome | None:
        """The first method that ran (normally `generate`)."""
        return next((o for o in self.outcomes if o.run is not None), None)

    @property
    def all_same_tokens(self) -> bool | None:
        """True when every method that ran produced the reference's tokens; None if fewer than two ran."""
        checked = [o.same_tokens for o in self.outcomes if o.same_tokens is not None]
        return all(checked) if checked else None


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _describe(exc: BaseException) -> str:
    """'Type: message' of an exception, cut to 300 characters, for the table."""
    return traceback.format_exception_only(type(exc), exc)[-1].strip()[:300]


def _warm_up(model: PreTrainedModel) -> None:
    """One short untimed generate so no method pays first-call costs (allocator, kernels)."""
    ids = torch.arange(3, 35, device=model.device).unsqueeze(0) % model.config.get_text_config().vocab_size
    model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy_config(2))


def run_methods(
    model: PreTrainedModel,
    workload: Workload,
    settings: BenchSettings,
    *,
    methods: list[str],
    model_info: dict[str, Any],
) -> BenchResult:
    """Run `methods` (names in `METHODS`) on `workload` and compare their tokens.

    Batch methods run alone, in order; the sequential ones then run interleaved request by
    request (`run_interleaved`). Rows keep the order of `methods`. A method raising
    `NotApplicable` becomes an "n/a" row; any other exception a "failed" row with the
    exception's type and message (the run goes on). The best hit rate is computed from the
    reference's prompts and answers (see `best_hit_tokens`).
    Raises ValueError naming an unknown method.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    _warm_up(model)
    outcomes: dict[str, MethodOutcome] = {}
    sequential: list[SequentialMethod] = []
    with torch.no_grad():
        for name in methods:  # build the sequential ones, run the batch ones alone
            spec = METHODS[name]
            cpu_start = time.process_time()
            try:
                made = spec.make(model, workload, settings)
            except NotApplicable as exc:
                outcomes[name] = MethodOutcome(name, "n/a", str(exc))
                continue
            except Exception as exc:
                outcomes[name] = MethodOutcome(name, "failed", _describe(exc))
                continue
            if isinstance(made, SequentialMethod):
                sequential.append(made)
            else:
                made.extra["cpu_s"] = time.process_time() - cpu_start  # all threads of the process
                outcomes[name] = MethodOutcome(name, "ok", run=made)
        for method, run in zip(
            sequential, run_interleaved(sequential, workload, progress=settings.progress), strict=True
        ):
            if isinstance(run, MethodRun):
                outcomes[method.name] = MethodOutcome(method.name, "ok", run=run)
            else:
                outcomes[method.name] = MethodOutcome(method.name, "failed", _describe(run))
    ordered = [outcomes[name] for name in methods]
    result = BenchResult(workload, model_info, settings, ordered, None, machine_info(str(model.device)))
    ref = result.reference
    if ref is not None and ref.run is not None:
        expected = ref.run.outputs
        for o in ordered:
            if o.run is None or o is ref:
                continue
            got = o.run.outputs
            o.mismatches = [k for k in expected if got.get(k) != expected[k]]
            o.same_tokens = not o.mismatches
        hit, total = best_hit_tokens(((r.prompt, r.generated) for r in ref.run.requests), settings.block_size)
        result.best_hit_rate = hit / total if total else math.nan
    return result
