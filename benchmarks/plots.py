"""PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .compare import BenchResult

__all__ = ["plot_hit_rate_curves", "plot_methods"]

_COLORS = {
    "generate": "#888888",
    "prompt-reuse": "#c98b2b",
    "continuous-batching": "#4c72b0",
    "radixkv": "#2a9d54",
    "radixkv-reuse-generated": "#8fd19e",
}


def plot_methods(result: BenchResult, path: Path) -> Path:
    """Bar charts of mean TTFT, total time and the share of prompt tokens not computed, per method
    that ran, with the best possible share (unlimited cache) as a dashed line; writes `path`."""
    ran = [o for o in result.outcomes if o.run is not None]
    names = [o.name for o in ran]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (
        ("mean time to first token (ms)", [o.run.ttft_mean_s * 1e3 for o in ran if o.run]),
        ("total time (s)", [o.run.total_s for o in ran if o.run]),
        ("prefill tokens saved / prompt tokens", [o.run.prefill_saved / o.run.prompt_tokens for o in ran if o.run]),
    )
    for ax, (title, values) in zip(axes, panels, strict=True):
        bars = ax.bar(names, values, color=[_COLORS.get(n, "#777777") for n in names])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        positive = [v for v in values if v > 0]
        if positive and max(positive) > 20 * min(positive):  # e.g. a batch TTFT beside per-request ones
            ax.set_yscale("log")
            ax.set_title(title + ", log scale")
    if result.best_hit_rate is not None:
        axes[2].axhline(result.best_hit_rate, color="black", linestyle="--", linewidth=1, label="best possible")
        axes[2].legend(fontsize=8)
    axes[2].set_ylim(0, 1)
    m = result.model
    fig.suptitle(
        f"{result.workload.name}: {result.workload.num_requests} requests, model {m.get('name')} "
        f"on {m.get('device')} ({result.machine.get('cpu_count')} CPU cores, "
        f"{result.machine.get('torch_threads')} torch threads)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_hit_rate_curves(
    capacities: Sequence[int],
    curves: Mapping[str, Sequence[float]],
    path: Path,
    *,
    bound: float | None,
    title: str,
) -> Path:
    """Token hit rate vs cache capacity (tokens, log x), one line per policy, plus the
    unlimited-cache bound as a dashed line; writes `path`."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in curves.items():
        ax.plot(capacities, values, marker="o", markersize=3, label=name)
    if bound is not None:
        ax.axhline(bound, color="black", linestyle="--", linewidth=1, label=f"unlimited cache ({bound:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("cache capacity (tokens)")
    ax.set_ylabel("token hit rate")
    top = max([bound or 0.0, *(v for values in curves.values() for v in values)])
    ax.set_ylim(0, top * 1.1 if top > 0 else 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
