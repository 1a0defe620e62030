"""Generalization suite for eviction policies: cache-only replays of generated hash-id traces.

A policy tuned on one trace can lose on traffic it has never seen. This suite generates traces of
nine families, each with its parameters drawn per seed from wide ranges, and replays them through
`PrefixCache` alone with `trace.replay`. Each hash id is one block (`BLOCK` tokens: id h expands to
`[h * BLOCK, (h + 1) * BLOCK)`), so equal ids at equal positions share a prefix, nothing else.

Families (the shapes prefix caches meet; parameter ranges in each generator):
  chat         multi-turn sessions: Zipf session lengths, exponential think times, a few system prompts
  rag          system prompt + k documents by Zipf popularity, in canonical or shuffled order
  agents       many independent system prompts (no common root), Zipf popularity, unique suffixes
  tool_loops   agent loops whose context grows by appending tool output, many loops interleaved
  scan         a reused hot set beside one-off floods and cyclic scans larger than the cache
  shifting     Zipf popularity whose ranking is reshuffled every phase
  bursts       prefixes used in a burst of requests, then never again
  tenants      chat, RAG, agents and floods from four tenants (namespaces) interleaved
  longdoc      long prompts from thousands of different first blocks, most used once, some continued

Capacities are fractions of the working set (distinct blocks the trace stores), 1% to 100%; the
figure of merit is each policy's token hit rate over LRU's at the same point.

    python -m radixkv.benchmarks.generalize                 # 9 families x 3 seeds x 5 capacities
    python -m radixkv.benchmarks.generalize --requests 500 --seeds 0 --families chat,rag

Writes `table.md` and `results.json` to `--out` (default benchmarks/results/generalize/); a few
minutes on one core by default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from radixkv import DEFAULT_EVICTION, POLICIES, KVSpec, PrefixCache

from .trace import TraceRequest, block_chains
from .trace import replay as replay_trace

BLOCK = 4  # tokens per hash id, and the cache's block size
SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float16, device="cpu")
CAPACITIES = (0.01, 0.03, 0.1, 0.3, 1.0)  # fractions of the working set

Request = tuple[object, tuple[int, ...]]  # (namespace, hash ids: one per block)


@dataclass(frozen=True)
class Trace:
    """A generated trace: its family, seed, the parameters drawn, and its requests in order."""

    family: str
    seed: int
    params: dict[str, float]
    requests: list[Request]


_Ids = Callable[[int], tuple[int, ...]]  # ids(n): n fresh hash ids, none given by an earlier call


def _fresh_ids() -> _Ids:
    counter = itertools.count(1)
    return lambda n: tuple(itertools.islice(counter, n))


def _draw_params(rng: random.Random, **ranges: Any) -> dict[str, Any]:
    """A family's parameters, drawn in the order given: from a list, one of its items; from a pair
    of ints, `randint` (both ends included); from a pair of floats, `uniform`."""
    return {
        k: rng.choice(v) if isinstance(v, list) else rng.randint(*v) if isinstance(v[0], int) else rng.uniform(*v)
        for k, v in ranges.items()
    }


def _zipf_cum(n: int, a: float) -> list[float]:
    """Cumulative weights of ranks 1..n under Zipf exponent `a` (for `random.choices`)."""
    return list(itertools.accumulate(r**-a for r in range(1, n + 1)))


def _zipf(rng: random.Random, cum: list[float]) -> int:
    return rng.choices(range(len(cum)), cum_weights=cum)[0]


# ----- families --------------------------------------------------------------------------------
# Each takes (rng, number of requests, fresh ids) and returns (params, requests).


def _chat(rng: random.Random, n: int, ids: _Ids) -> tuple[dict, list[Request]]:
    # think: mean requests between a session's turns
    p = _draw_params(
        rng,
        system_prompts=[1, 2, 4, 8],
        system_blocks=(2, 32),
        turns_zipf=(1.2, 2.5),
        think=[2.0, 10.0, 50.0, 200.0],
        answer_blocks=(2, 16),
    )
    systems = [ids(p["system_blocks"]) for _ in range(p["system_prompts"])]
    turns_cum = _zipf_cum(64, p["turns_zipf"])
    events: list[tuple[float, int, tuple[int, ...]]] = []
    t, sid = 0.0, 0
    while len(events) < n:
        t += rng.expovariate(1.0)
        history = systems[rng.randrange(len(systems))]
        when = t
        for _ in range(_zipf(rng, turns_cum) + 1):
            history = history + ids(rng.randint(1, 4))  # the user's message
            events.append((when, sid, history))
            history = history + ids(rng.randint(1, p["answer_blocks"]))  # the answer, seen next turn
            when += rng.expovariate(1.0 / p["think"])
        sid += 1
    events.sort(key=lambda e: (e[0], e[1]))
    return p, [(None, e[2]) for e in events[:n]]


def _rag(rng: random.Random, n: int, ids: _Ids) -> tuple[dict, list[Request]]:
    p = _draw_params(
        rng,
        documents=[50, 200, 1000],
        doc_blocks=(4, 24),
        zipf=(0.6, 1.4),
        k=(1, 5),
        p_sorted=[0.0, 0.5, 1.0],
        system_blocks=(1, 8),
    )
    system = ids(p["system_blocks"])
    docs = [ids(rng.randint(max(1, p["doc_blocks"] // 2), p["doc_blocks"] * 2)) for _ in range(p["documents"])]
    cum = _zipf_cum(p["documents"], p["zipf"])
    out: list[Request] = []
    for _ in range(n):
        chosen = list({_zipf(rng, cum) for _ in range(p["k"])})
        if rng.random() < p["p_sorted"]:
            chosen.sort()
        else:
            rng.shuffle(chosen)
        prompt = system + sum((docs[d] for d in chosen), ()) + ids(rng.randint(1, 3))
        out.append((None, prompt))
    return p, out


def _agents(rng: random.Random, n: int, ids: _Ids) -> tuple[dict, list[Request]]:
    p = _draw_params(rng, prompts=[100, 500, 2000], prompt_blocks=(8, 64), zipf=(0.5, 1.3))
    prompts = [ids(rng.randint(p["prompt_blocks"] // 2, p["prompt_blocks"])) for _ in range(p["prompts"])]
    cum = _zipf_cum(p["prompts"], p["zipf"])
    return p, [(None, prompts[_zipf(rng, cum)] + ids(rng.randint(1, 8))) for _ in range(n)]


def _tool_loops(rng: random.Random, n: int, ids: _Ids) -> tuple[dict, list[Request]]:
    p = _draw_params(rng, concurrent=[4, 16, 64], mean_steps=(3.0, 20.0), output_blocks=(1, 16), system_prompts=[1, 4])
    systems = [ids(rng.randint(4, 32)) for _ in range(p["system_prompts"])]

    def new_loop() -> list:
        steps = 1 + int(rng.expovariate(1.0 / p["mean_steps"]))
        return [systems[rng.randrange(len(systems))] + ids(rng.randint(2, 8)), steps]

    loops = [new_loop() for _ in range(p["concurrent"])]
    out: list[Request] = []
    for _ in range(n):
        i = rng.randrange(len(loops))
        context, left = loops[i]
        out.append((None, context))
        context = context + ids(rng.randint(1, p["output_blocks"]))  # the model's call and the tool's output
        loops[i] = new_loop() if left <= 1 else [context, left - 1]
    return p, out


def _scan(rng: random.Random, n: int, ids: _Ids) -> tuple[dict, list[Request]]:
    p = _draw_params(
        rng,
        hot=[20, 100, 400],
        hot_blocks=(8, 32),
        zipf=(0.7, 1.2),
        p_flood=(0.05, 0.5),
        p_scan=[0.0, 0.1, 0.3],
        scan_prompts=[200, 1000],
    )
    hot = [ids(rng.randint(p["hot_blocks"] // 2, p["hot_blocks"])) for _ in range(p["hot"])]
    scan = [ids(rng.randint(8, 32)) for _ in range(p["scan_prompts"])]
    cum = _zipf_cum(p["hot"], p["zipf"])
    out: list[Request] = []
    at = 0
    for _ in range(n):
        u = rng.random()
        if u < p["p_flood"]:
            out.append((None, ids(rng.randint(32, 256))))  # a long one-off prompt
        elif u < p["p_flood"] + p["p_scan"]:
            out.append((None, scan[at % len(scan)] + ids(1)))  # a cyclic scan over many prompts
            at += 1
        else:
            out.append((None, hot[_zipf(rng, cum)] + ids(rng.randint(1, 4))))
    return p, out


def _shifting(rng: random.Random, n: int, ids: _Ids) -> tuple[dict, list[Request]]:
    p = _draw_params(rng, prefixes=[50, 300, 1000], prefix_blocks=(4, 32), zipf=(0.8, 1.4), phase=[100, 400, 1500])
    prefixes = [ids(rng.randint(p["prefix_blocks"] // 2, p["prefix_blocks"])) for _ in range(p["prefixes"])]
    cum = _zipf_cum(p["prefixes"], p["zipf"])
    order = list(range(p["prefixes"]))
    out: list[Request] = []
    for i in range(n):
        if i % p["phase"] == 0:
            rng.shuffle(order)  # a new ranking: yesterday's favourites go cold
        out.append((None, prefixes[order[_zipf(rng, cum)]] + ids(rng.randint(1, 4))))
    return p, out


def _bursts(rng: random.Random, n: int, ids: _Ids) -> tuple[dict, list[Request]]:
    # window: requests a burst spans
    p = _draw_params(
        rng, mean_burst=(2.0, 30.0), window=[10.0, 50.0, 200.0], prefix_blocks=(8, 64), p_background=(0.0, 0.4)
    )
    events: list[tuple[float, tuple[int, ...]]] = []
    t = 0.0
    while len(events) < n:
        t += rng.expovariate(1.0 / (p["mean_burst"] * 0.5))
        prefix = ids(rng.randint(p["prefix_blocks"] // 2, p["prefix_blocks"]))
        for _ in range(1 + int(rng.expovariate(1.0 / p["mean_burst"]))):
            events.append((t + rng.uniform(0.0, p["window"]), prefix))
        if rng.random() < p["p_background"]:
            events.append((t, ()))  # a one-off request
    events.sort(key=lambda e: e[0])
    return p, [(None, e[1] + ids(rng.randint(1, 4))) for e in events[:n]]


def _longdoc(rng: random.Random, n: int, ids: _Ids) -> tuple[dict, list[Request]]:
    p = _draw_params(
        rng,
        roots=[200, 1000, 3000],
        root_zipf=(0.3, 1.1),
        root_blocks=(2, 16),
        doc_blocks=(32, 192),
        p_continue=(0.05, 0.4),
    )
    roots = [ids(rng.randint(1, p["root_blocks"])) for _ in range(p["roots"])]
    cum = _zipf_cum(p["roots"], p["root_zipf"])
    recent: list[tuple[int, ...]] = []
    out: list[Request] = []
    for _ in range(n):
        if recent and rng.random() < p["p_continue"]:
            j = len(recent) - 1 - min(int(rng.expovariate(0.1)), len(recent) - 1)  # recent ones likelier
            prompt = recent[j] + ids(rng.randint(1, 16))
            recent[j] = prompt
        else:
            prompt = roots[_zipf(rng, cum)] + ids(rng.randint(p["doc_blocks"] // 2, p["doc_blocks"]))
            recent.append(prompt)
            del recent[:-200]
        out.append((None, prompt))
    return p, out


def _tenants(rng: random.Random, n: int, ids: _Ids) -> tuple[dict, list[Request]]:
    kinds = [_chat, _rag, _agents, _scan]
    weights = [rng.uniform(0.1, 1.0) for _ in kinds]
    p: dict = {"weights": [round(w / sum(weights), 3) for w in weights]}
    streams = []
    for t, kind in enumerate(kinds):
        sub, reqs = kind(rng, n, ids)
        p[kind.__name__[1:]] = sub
        streams.append([(f"tenant{t}", r) for _, r in reqs])
    at = [0] * len(kinds)
    out: list[Request] = []
    for _ in range(n):
        t = rng.choices(range(len(kinds)), weights=weights)[0]
        out.append(streams[t][at[t]])
        at[t] += 1
    return p, out


FAMILIES: dict[str, Callable[[random.Random, int, _Ids], tuple[dict, list[Request]]]] = {
    "chat": _chat,
    "rag": _rag,
    "agents": _agents,
    "tool_loops": _tool_loops,
    "scan": _scan,
    "shifting": _shifting,
    "bursts": _bursts,
    "tenants": _tenants,
    "longdoc": _longdoc,
}


def generate(family: str, seed: int, requests: int) -> Trace:
    """The trace of `family` for `seed` (deterministic), `requests` long."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is unknown; choose from {', '.join(FAMILIES)}")
    rng = random.Random(f"{family}/{seed}")
    params, reqs = FAMILIES[family](rng, requests, _fresh_ids())
    return Trace(family, seed, params, reqs)


def _as_trace(trace: Trace) -> list[TraceRequest]:
    return [TraceRequest(i, len(h) * BLOCK, 0, h, ns, BLOCK) for i, (ns, h) in enumerate(trace.requests)]


def working_set_blocks(trace: Trace) -> int:
    """Distinct blocks the trace stores: what an unlimited cache would hold at the end."""
    chains, _ = block_chains(_as_trace(trace), BLOCK)
    return len({b for chain in chains for b in chain})


def replay(trace: Trace, capacity_blocks: int, eviction: str) -> tuple[int, int]:
    """(hit tokens, prompt tokens) of `trace` through a PrefixCache of `capacity_blocks` blocks."""
    cache = PrefixCache(SPEC, capacity_tokens=capacity_blocks * BLOCK, block_size=BLOCK, eviction=eviction)
    result = replay_trace(cache, _as_trace(trace))
    return result.hit_tokens, result.prompt_tokens


@dataclass(frozen=True)
class Point:
    """One (family, seed, capacity) point: every policy's token hit rate there."""

    family: str
    seed: int
    capacity_fraction: float
    capacity_blocks: int
    hit_rate: dict[str, float]

    def ratio(self, policy: str, base: str = "lru") -> float:
        """policy's hit rate over `base`'s (1.0 where both are 0)."""
        a, b = self.hit_rate[policy], self.hit_rate[base]
        return 1.0 if a == b else (a / b if b else math.inf)


def run_suite(
    families: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    capacities: Sequence[float] = CAPACITIES,
    policies: Sequence[str] = ("lru", "reuse", DEFAULT_EVICTION),
    requests: int = 2000,
    progress: Callable[[str], None] | None = None,
) -> list[Point]:
    """Replay every (family, seed, capacity, policy); one Point per (family, seed, capacity)."""
    policies = list(dict.fromkeys(policies))
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ValueError(f"policies: unknown {', '.join(bad)}; choose from {', '.join(POLICIES)}")
    if any(not 0 < c <= 1 for c in capacities):
        raise ValueError(f"capacities must be fractions in (0, 1], got {list(capacities)}")
    points: list[Point] = []
    for family in families or list(FAMILIES):
        for seed in seeds:
            trace = generate(family, seed, requests)
            ws = working_set_blocks(trace)
            for frac in capacities:
                cap = max(1, round(ws * frac))
                rates: dict[str, float] = {}
                for policy in policies:
                    hit, total = replay(trace, cap, policy)
                    rates[policy] = hit / total if total else 0.0
                points.append(Point(family, seed, frac, cap, rates))
                if progress is not None:
                    progress(
                        f"{family} seed {seed} @ {frac:.0%}: " + ", ".join(f"{k} {v:.4f}" for k, v in rates.items())
                    )
    return points


def format_table(points: Sequence[Point], policies: Sequence[str]) -> str:
    """Markdown: per family and capacity, each policy's hit rate (mean over seeds) and its
    worst and mean ratio to LRU over the seeds."""
    others = [p for p in policies if p != "lru"]
    head = "| family | capacity | lru | " + " | ".join(f"{p} | {p}/lru min | {p}/lru mean" for p in others) + " |"
    lines = [head, "|---" * (3 + 3 * len(others)) + "|"]
    keys = sorted(
        {(pt.family, pt.capacity_fraction) for pt in points}, key=lambda k: (list(FAMILIES).index(k[0]), k[1])
    )
    for family, frac in keys:
        group = [pt for pt in points if pt.family == family and pt.capacity_fraction == frac]
        row = [family, f"{frac:.0%}", f"{sum(pt.hit_rate['lru'] for pt in group) / len(group):.4f}"]
        for p in others:
            ratios = [pt.ratio(p) for pt in group]
            row += [
                f"{sum(pt.hit_rate[p] for pt in group) / len(group):.4f}",
                f"{min(ratios):.3f}",
                f"{sum(ratios) / len(ratios):.3f}",
            ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for p in others:
        ratios = [pt.ratio(p) for pt in points]
        worst = min(points, key=lambda pt: pt.ratio(p))
        lines.append(
            f"- {p}: worst {min(ratios):.3f}x LRU ({worst.family}, seed {worst.seed}, {worst.capacity_fraction:.0%}); "
            f"{sum(r >= 0.98 for r in ratios)}/{len(ratios)} points >= 0.98x; geometric mean "
            f"{math.exp(sum(math.log(max(r, 1e-9)) for r in ratios) / len(ratios)):.3f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated families (default: all)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--capacities", default=",".join(str(c) for c in CAPACITIES), help="fractions of the working set")
    ap.add_argument("--policies", default=f"lru,reuse,{DEFAULT_EVICTION}", help="comma-separated policies")
    ap.add_argument("--requests", type=int, default=2000, help="requests per trace")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generalize")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    policies = list(dict.fromkeys(args.policies.split(",")))
    if "lru" not in policies:
        policies.insert(0, "lru")
    t0 = time.perf_counter()
    points = run_suite(
        families=args.families.split(","),
        seeds=[int(s) for s in args.seeds.split(",")],
        capacities=[float(c) for c in args.capacities.split(",")],
        policies=policies,
        requests=args.requests,
        progress=print,
    )
    table = format_table(points, policies)
    took = time.perf_counter() - t0
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    header = (
        f"## Generalization suite (default: {DEFAULT_EVICTION})\n\n{args.requests} requests per trace, "
        f"seeds {args.seeds}, block {BLOCK} tokens; hit rates are means over seeds, ratios per seed. "
        f"{took:.0f} s.\n\n"
    )
    (args.out / "table.md").write_text(header + table + "\n")
    doc = {"default": DEFAULT_EVICTION, "requests": args.requests, "block": BLOCK, "points": list(map(asdict, points))}
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {args.out / 'table.md'} and {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
