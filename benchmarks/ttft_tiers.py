"""Time to first token when the shared prefix comes from each tier, side by side in one run.

    python -m radixkv.benchmarks.ttft_tiers                 # llama-100m, float32, CPU
    python -m radixkv.benchmarks.ttft_tiers --repeats 3 --restart

One shared prefix (2,048 random tokens) and a fresh 32-token suffix per request; each request
generates one token, timed from the call to its return (this includes the insert after the
token). Methods, interleaved request by request so that they share the machine's noise:
  - device:    the prefix is in the device pool;
  - host:      the prefix was evicted to the host tier just before (`cache.evict`), and is
               promoted by the request's match;
  - disk:      a cache with a disk tier only: the prefix was evicted to its files just before
               (the OS page cache is warm: this is a hot file, not a cold disk read);
  - recompute: `model.generate` without radixkv, the whole prompt prefilled.
`--restart` adds: a second process starts on the disk directory the first one filled; its
first request (KV from disk, after indexing the directory at start) against a cold start's
first request (a fresh process without tiers: the whole prompt prefilled).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from time import perf_counter
from typing import Any

import torch
from radixkv.benchmarks.presets import load_model

import radixkv

__all__ = ["main"]


def _request(model: Any, prefix: list[int], suffix_seed: int, suffix: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + suffix_seed)
    tail = torch.randint(3, vocab, (suffix,), generator=g).tolist()
    return torch.tensor([prefix + tail])


def _timed(fn: Any, ids: torch.Tensor) -> tuple[float, int]:
    t0 = perf_counter()
    out = fn(ids, max_new_tokens=1, do_sample=False)
    return perf_counter() - t0, int(out[0, -1])


def _prefix(n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _child(args: argparse.Namespace) -> None:
    """One process's first request: with the disk tier at `args.child` or, when empty, none."""
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype)
    vocab = model.config.vocab_size
    prefix = _prefix(args.prefix, vocab)
    t0 = perf_counter()
    if args.child == "-":
        fn, setup = model.generate, 0.0
    else:
        cached = radixkv.wrap(
            model, capacity_tokens=4 * args.prefix, block_size=args.block_size,
            disk_path=args.child, disk_capacity_bytes=1 << 32,
        )  # fmt: skip
        fn, setup = cached.generate, perf_counter() - t0
    seconds, token = _timed(fn, _request(model, prefix, 999, args.suffix, vocab))
    print(json.dumps({"seconds": seconds, "setup_seconds": setup, "token": token}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m radixkv.benchmarks.ttft_tiers", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-100m")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--prefix", type=int, default=2048)
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--restart", action="store_true", help="also time a second process's first request")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        _child(args)
        return
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype)
    vocab = model.config.vocab_size
    prefix = _prefix(args.prefix, vocab)
    cap = 4 * args.prefix
    tmp = tempfile.TemporaryDirectory(prefix="radixkv-ttft-")
    host = radixkv.wrap(model, capacity_tokens=cap, block_size=args.block_size, host_capacity_tokens=4 * cap)
    disk = radixkv.wrap(
        model, capacity_tokens=cap, block_size=args.block_size, disk_path=tmp.name, disk_capacity_bytes=1 << 32
    )
    for w in (host, disk):  # warm-up: store the prefix (not timed)
        w.generate(_request(model, prefix, 0, args.suffix, vocab), max_new_tokens=1, do_sample=False)
    times: dict[str, list[float]] = {"device": [], "host": [], "disk": [], "recompute": []}
    for r in range(1, args.repeats + 1):
        tokens = set()
        ids = _request(model, prefix, r, args.suffix, vocab)
        s, t = _timed(host.generate, ids)
        times["device"].append(s)
        tokens.add(t)
        assert host.cache is not None and disk.cache is not None
        host.cache.evict(cap)
        s, t = _timed(host.generate, ids)
        times["host"].append(s)
        tokens.add(t)
        disk.cache.evict(cap)
        s, t = _timed(disk.generate, ids)
        times["disk"].append(s)
        tokens.add(t)
        s, t = _timed(model.generate, ids)
        times["recompute"].append(s)
        tokens.add(t)
        assert len(tokens) == 1, f"methods disagree on the first token: {tokens}"
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model} {args.dtype}, prefix {args.prefix} + {args.suffix}, {args.repeats} repeats, median seconds:")
    for k, v in med.items():
        print(f"  {k:>9}: {v * 1000:9.1f} ms   recompute / this = {med['recompute'] / v:6.1f}x")
    hs = host.cache.tier_stats["host"] if host.cache else None
    ds = disk.cache.tier_stats["disk"] if disk.cache else None
    print(f"  host tier: {hs}\n  disk tier: {ds}")
    if args.restart:
        base = [sys.executable, "-m", "radixkv.benchmarks.ttft_tiers", "--model", args.model, "--dtype", args.dtype]
        base += ["--prefix", str(args.prefix), "--suffix", str(args.suffix), "--threads", str(args.threads)]
        base += ["--block-size", str(args.block_size)]
        runs = {}
        for name, child in (("restart on the disk directory", tmp.name), ("cold start", "-")):
            out = subprocess.run([*base, "--child", child], capture_output=True, text=True, check=True)
            runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
        warm, cold = runs["restart on the disk directory"], runs["cold start"]
        print(
            f"  restart: first request {warm['seconds'] * 1000:.1f} ms (wrap incl. indexing "
            f"{warm['setup_seconds'] * 1000:.1f} ms) vs cold start {cold['seconds'] * 1000:.1f} ms: "
            f"{cold['seconds'] / warm['seconds']:.1f}x; same token: {warm['token'] == cold['token']}"
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()
