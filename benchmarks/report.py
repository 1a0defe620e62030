"""A bench result as results.json, a markdown table (terminal and README) and PNG plots.

matplotlib is imported only when a plot is drawn (Agg backend: no display needed), so importing
this module, or the runner, costs nothing a test of the cache would notice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .outcomes import BatchBenchResult, BatchOutcome, BenchResult, MethodOutcome

# method -> (label in the table, colour in the plots)
_STYLE = {
    "generate": ("generate (no reuse)", "#888888"),
    "prompt-reuse": ("prompt-reuse recipe (deepcopy)", "#c98b2b"),
    "continuous-batching": ("continuous batching (generate_batch)", "#4c72b0"),
    "radixkv": ("radixkv", "#2a9d54"),
    "radixkv-reuse-generated": ("radixkv, reuse_generated=True", "#8fd19e"),
    "radixkv-private": ("radixkv, share_prefixes=False", "#b5e3c4"),
}


_PER_REQUEST = ("key", "prompt_tokens", "cached_tokens", "computed_tokens", "ttft_s")  # + "generated"


def _method_json(o: MethodOutcome) -> dict[str, Any]:
    row: dict[str, Any] = {"method": o.name, "status": o.status, "reason": o.reason or None}
    if o.run is None:
        return row
    run = o.run
    row.update(
        requests=len(run.requests),
        ttft_mean_s=run.ttft_mean_s,
        ttft_p50_s=run.ttft_p50_s,
        ttft_note=run.ttft_note,
        total_s=run.total_s,
        throughput_tok_s=run.throughput,
        prompt_tokens=run.prompt_tokens,
        generated_tokens=run.generated_tokens,
        hit_tokens=run.hit_tokens,
        hit_rate=run.hit_rate,
        prefill_saved_tokens=run.prefill_saved,
        same_tokens=o.same_tokens,
        mismatched_requests=o.mismatches,
        extra=run.extra,
        per_request=[
            {**{k: getattr(r, k) for k in _PER_REQUEST}, "generated": list(r.generated)} for r in run.requests
        ],
    )
    return row


def to_json(result: BenchResult) -> dict[str, Any]:
    """The results.json document (plain JSON types only; NaN written as null)."""
    w = result.workload
    doc = {
        "workload": {
            "name": w.name,
            "params": w.params,
            "requests": w.num_requests,
            "max_new_tokens": w.max_new_tokens,
            "closed_form_hit_rate": w.closed_form_hit_rate,
            "best_hit_rate": result.best_hit_rate,
            "notes": list(w.notes),
        },
        "model": result.model,
        "settings": result.settings.cache_fields(),
        "machine": result.machine,
        "all_same_tokens": result.all_same_tokens,
        "methods": [_method_json(o) for o in result.outcomes],
    }
    return _clean(doc)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _same(o: MethodOutcome) -> str:
    if o.same_tokens is None:
        return "reference"
    if o.same_tokens:
        return "yes"
    return f"no ({len(o.mismatches)} of {len(o.run.requests) if o.run else '?'} differ)"


def format_table(result: BenchResult) -> str:
    """A markdown table, one row per method, then the notes (bounds, TTFT method, n/a reasons)."""
    head = (
        "| method | TTFT mean (ms) | total (s) | CPU (s) | throughput (tok/s) | token hit rate "
        "| prefill tokens saved | same tokens |"
    )
    lines = [head, "|" + "---|" * 8]
    for o in result.outcomes:
        label = _STYLE.get(o.name, (o.name,))[0]
        if o.run is None:
            lines.append(f"| {label} | {o.status}: {o.reason} | | | | | | |")
            continue
        r = o.run
        lines.append(
            f"| {label} | {r.ttft_mean_s * 1e3:,.1f} | {r.total_s:,.2f} | {r.extra.get('cpu_s', math.nan):,.2f} "
            f"| {r.throughput:,.1f} "
            f"| {r.hit_rate:.3f} | {r.prefill_saved:,} | {_same(o)} |"
        )
    w = result.workload
    ref = result.reference
    notes = []
    if ref is not None and ref.run is not None:
        each = f"{w.max_new_tokens} new tokens each (greedy)"
        if w.stop_token_id is not None:
            each = f"up to {w.max_new_tokens} new tokens each (greedy, stopping at end of turn)"
        notes.append(f"{w.num_requests} requests, {ref.run.prompt_tokens:,} prompt tokens, {each}")
    if result.best_hit_rate is not None:
        notes.append(f"best possible token hit rate (unlimited whole-block cache): {result.best_hit_rate:.4f}")
    notes.extend(w.notes)
    verdict = result.all_same_tokens
    if verdict is not None:
        notes.append("all methods produced the same tokens" if verdict else "token mismatch: see the table")
    for o in result.outcomes:
        if o.run is not None and o.run.ttft_note:
            notes.append(f"TTFT of {o.name}: {o.run.ttft_note}")
    notes.append(
        "total = wall time of the method's own calls (one-request-at-a-time methods interleaved request by "
        "request); CPU = process CPU time over them, all threads; throughput = generated tokens / total"
    )
    if any(o.name == "prompt-reuse" and o.run is not None for o in result.outcomes):
        notes.append(
            "prompt-reuse's hit rate counts its precomputed prefix as cached; its prefill tokens saved "
            "subtract computing that prefix once"
        )
    notes.append(_setup_note(result))
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def _setup_note(result: BenchResult | BatchBenchResult) -> str:
    """The table's last note: the cache, the model and the machine a run measured."""
    s = result.settings
    return (
        f"cache: {s.capacity_tokens:,} tokens, block {s.block_size}, eviction {s.eviction}; "
        f"model {result.model.get('name')} ({result.model.get('params', 0):,} params, "
        f"{result.model.get('dtype')}, {result.model.get('device')}, "
        f"{result.machine.get('torch_threads')} torch threads, {result.machine.get('cpu_count')} CPU cores)"
    )


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Lay out `fig`, write it to `path` (creating the folder) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_methods(result: BenchResult, path: Path) -> Path:
    """Bar charts of mean TTFT, total time and the share of prompt tokens not computed, per method
    that ran, with the best possible share (unlimited cache) as a dashed line; writes `path`."""
    plt = _pyplot()
    ran = [o for o in result.outcomes if o.run is not None]
    names = [o.name for o in ran]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (
        ("mean time to first token (ms)", [o.run.ttft_mean_s * 1e3 for o in ran if o.run]),
        ("total time (s)", [o.run.total_s for o in ran if o.run]),
        ("prefill tokens saved / prompt tokens", [o.run.prefill_saved / o.run.prompt_tokens for o in ran if o.run]),
    )
    for ax, (title, values) in zip(axes, panels, strict=True):
        bars = ax.bar(names, values, color=[_STYLE.get(n, ("", "#777777"))[1] for n in names])
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
    return _save(fig, path)


# ----- the batched workload (rag-batch) ---------------------------------------------------------------


def _batch_method_json(o: BatchOutcome, reference_s: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {"method": o.name, "status": o.status, "reason": o.reason or None}
    if o.run is None:
        return row
    run = o.run
    row.update(
        total_s=run.total_s,
        time_vs_reference=run.total_s / reference_s if reference_s else None,
        prompt_tokens=run.prompt_tokens,
        prefill_positions=run.prefill_positions,
        computed_tokens=run.computed_tokens,
        reused_tokens=run.reused_tokens,
        hit_rate=run.hit_rate,
        same_tokens=o.same_tokens,
        mismatched_rows=o.mismatches,
        extra=run.extra,
        per_batch=[
            {
                "name": b.name,
                "rows": len(b.keys),
                "width": b.width,
                "wall_s": b.wall_s,
                "ttft_s": b.ttft_s,
                "prompt_tokens": b.prompt_tokens,
                "prefill_positions": b.prefill_positions,
                "computed_tokens": b.computed_tokens,
                "reused_tokens": b.reused_tokens,
                "generated": {k: list(g) for k, g in zip(b.keys, b.generated, strict=True)},
            }
            for b in run.batches
        ],
    )
    return row


def batch_to_json(result: BatchBenchResult) -> dict[str, Any]:
    """The results.json document of a batched run (plain JSON types only; NaN written as null)."""
    w = result.workload
    ref = result.reference
    reference_s = ref.run.total_s if ref is not None and ref.run is not None else None
    doc = {
        "workload": {
            "name": w.name,
            "params": w.params,
            "requests": w.num_requests,
            "max_new_tokens": w.max_new_tokens,
            "batches": [
                {"name": n, "rows": list(b), "distinct_prefix_tokens": f}
                for n, b, f in zip(w.batch_names, w.batches, w.batch_floors, strict=True)
            ],
            "notes": list(w.notes),
        },
        "model": result.model,
        "settings": result.settings.cache_fields(),
        "machine": result.machine,
        "reference": ref.name if ref is not None else None,
        "all_same_tokens": result.all_same_tokens,
        "methods": [_batch_method_json(o, reference_s) for o in result.outcomes],
    }
    return _clean(doc)


def _batch_same(o: BatchOutcome) -> str:
    if o.same_tokens is None:
        return "reference"
    if o.same_tokens:
        return "yes"
    rows = sum(len(b.keys) for b in o.run.batches) if o.run else "?"
    return f"no ({len(o.mismatches)} of {rows} rows differ)"


def format_batch_table(result: BatchBenchResult) -> str:
    """Two markdown tables (per method, then per batch: prompt tokens computed / prefill positions
    per method) and the notes saying how each figure is counted."""
    ran = [o for o in result.outcomes if o.run is not None]
    ref = result.reference
    reference_s = ref.run.total_s if ref is not None and ref.run is not None else None
    lines = [
        "| method | total (s) | time / reference | prefill positions | prompt tokens computed | token hit rate "
        "| same tokens |",
        "|" + "---|" * 7,
    ]
    for o in result.outcomes:
        label = _STYLE.get(o.name, (o.name,))[0]
        if o.run is None:
            lines.append(f"| {label} | {o.status}: {o.reason} | | | | | |")
            continue
        r = o.run
        ratio = f"{r.total_s / reference_s:.2f}" if reference_s else "n/a"
        lines.append(
            f"| {label} | {r.total_s:,.2f} | {ratio} | {r.prefill_positions:,} | {r.computed_tokens:,} "
            f"| {r.hit_rate:.3f} | {_batch_same(o)} |"
        )
    w = result.workload
    lines += ["", "| batch | rows | prompt tokens | fewest | " + " | ".join(o.name for o in ran) + " |"]
    lines.append("|" + "---|" * (4 + len(ran)))
    for k, name in enumerate(w.batch_names):
        prompts = w.batch_prompts(k)
        cells = []
        for o in ran:
            assert o.run is not None
            b = o.run.batches[k]
            cells.append(f"{b.computed_tokens:,} / {b.prefill_positions:,}")
        total = sum(len(p) for _, p in prompts)
        lines.append(f"| {name} | {len(prompts)} | {total:,} | {w.batch_floors[k]:,} | " + " | ".join(cells) + " |")
    notes = []
    if ref is not None and ref.run is not None:
        notes.append(
            f"{w.num_requests} rows in {len(w.batches)} batches, {ref.run.prompt_tokens:,} prompt tokens, "
            f"{w.max_new_tokens} new tokens each (greedy); the reference is {ref.name}"
        )
    notes.extend(w.notes)
    verdict = result.all_same_tokens
    if verdict is not None:
        notes.append("all methods produced the same tokens" if verdict else "token mismatch: see the table")
    notes += [
        "per batch: prompt tokens computed / prefill positions; fewest = the batch's tokens that end a prefix "
        "no earlier row had (what computing each distinct prefix once would leave)",
        "prefill positions = rows x columns the model embedded before a batch's first token, counted at its "
        "input embeddings, padding included (plain generate: rows x padded width; radixkv: rows x the columns "
        "it did not read from its cache); continuous batching packs requests unpadded: positions embedded "
        "during its call minus one per generated token after a request's first",
        "prompt tokens computed = real prompt tokens - tokens read from a cache (radixkv: cached.stats."
        "reused_tokens less computed_once_tokens, the prefixes it computed once for several rows of a batch; "
        "continuous batching: its prefix-match hits); hit rate = read / prompt tokens",
        "total = wall time of the method's generate calls; generate and radixkv interleaved batch by batch, "
        "continuous batching run alone before them; time / reference = total / the reference's total",
    ]
    notes.append(_setup_note(result))
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def plot_batch_methods(result: BatchBenchResult, path: Path) -> Path:
    """Total time and prefill positions per method (the distinct-prefix floor dashed), and prompt
    tokens computed per batch, one line per method; writes `path`."""
    plt = _pyplot()
    ran = [o for o in result.outcomes if o.run is not None]
    names = [o.name for o in ran]
    colours = [_STYLE.get(n, ("", "#777777"))[1] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (title, values) in zip(
        axes[:2],
        (
            ("total time (s)", [o.run.total_s for o in ran if o.run]),
            ("prefill positions (rows x columns)", [o.run.prefill_positions for o in ran if o.run]),
        ),
        strict=True,
    ):
        bars = ax.bar(names, values, color=colours)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        positive = [v for v in values if v > 0]
        if positive and max(positive) > 20 * min(positive):  # e.g. a manager's start-up beside generate calls
            ax.set_yscale("log")
            ax.set_title(title + ", log scale")
    floor = result.workload.params.get("distinct_prefix_tokens")
    if floor is not None:
        axes[1].axhline(floor, color="black", linestyle="--", linewidth=1, label="fewest: each distinct prefix once")
        axes[1].legend(fontsize=8)
    w = result.workload
    ax = axes[2]
    # Grouped bars, not lines: methods with equal figures would hide each other.
    step = 0.8 / max(1, len(ran))
    for i, (o, colour) in enumerate(zip(ran, colours, strict=True)):
        assert o.run is not None
        xs = [k + (i - (len(ran) - 1) / 2) * step for k in range(len(w.batch_names))]
        ax.bar(xs, [b.computed_tokens for b in o.run.batches], width=step, color=colour, label=o.name)
    ax.set_xticks(range(len(w.batch_names)), w.batch_names)
    ax.set_title("prompt tokens computed per batch")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.legend(fontsize=8)
    m = result.model
    fig.suptitle(
        f"{w.name}: {w.num_requests} rows in {len(w.batches)} padded batches, model {m.get('name')} "
        f"on {m.get('device')} ({result.machine.get('cpu_count')} CPU cores, "
        f"{result.machine.get('torch_threads')} torch threads)"
    )
    return _save(fig, path)


def plot_hit_rate_curves(
    capacities: Sequence[int], curves: Mapping[str, Sequence[float]], path: Path, *, bound: float | None, title: str
) -> Path:
    """Token hit rate vs cache capacity (tokens, log x), one line per policy, plus the
    unlimited-cache bound as a dashed line; writes `path`."""
    plt = _pyplot()
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
    return _save(fig, path)


def plot_real_model(doc: dict[str, Any], path: Path) -> Path:
    """`figures real-model`'s two panels: TTFT medians per method, cumulative chat time per turn."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    t = doc["ttft"]
    names = list(t["ttft_median_s"])
    a.bar(
        names,
        [t["ttft_median_s"][n] * 1e3 for n in names],
        color=[_STYLE[m][1] for m in ("generate", "prompt-reuse", "radixkv")],
    )
    a.set_ylabel("TTFT median (ms)")
    a.set_title(f"TTFT, {t['system_prompt_tokens']}-token system prompt + question")
    c = doc["chat"]
    turns = range(1, c["turns"] + 1)
    for name, color in (("plain generate", _STYLE["generate"][1]), ("radixkv", _STYLE["radixkv"][1])):
        cumulative, total = [], 0.0
        for s in c["seconds_per_turn"][name]:
            total += s
            cumulative.append(total)
        b.plot(turns, cumulative, marker="o", color=color, label=name)
    b.set_xticks(list(turns))
    b.set_xlabel("turn")
    b.set_ylabel("cumulative wall time (s)")
    b.set_title(f"{c['turns']}-turn chat, up to {c['max_new_tokens']} new tokens per answer")
    b.legend()
    fig.suptitle(f"{doc['model']} ({doc['dtype']}, {doc['threads']} torch thread(s), CPU)")
    return _save(fig, path)
