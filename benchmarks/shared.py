"""The shared Redis tier: local redis-server processes, and its figures.

`RedisServer` / `RedisCluster` start Redis on free 127.0.0.1 ports, each with its own temporary
directory and no persistence, stopped by whoever started it (the tests use them too; this module
imports neither matplotlib nor transformers). Debian's `redis-server` (Redis 7) must be
installed (`.ci/run` installs it).

Figures, each against a redis-server this module starts on localhost:

    python -m radixkv.benchmarks.shared throughput   # put/get GB/s, llama-100m blocks
    python -m radixkv.benchmarks.shared ttft         # TTFT: Redis hit vs recompute vs local hit
    python -m radixkv.benchmarks.shared replicas     # 2 processes: the second hits on the first
    python -m radixkv.benchmarks.shared trace        # 4 replicas, round robin, local vs shared

Rows print with units; the figure prints as one JSON object. Timings are medians of interleaved
repeats on whatever machine runs this (report them as ratios).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import torch

from radixkv import KVSpec, PrefixCache, RedisOptions
from radixkv.core.hashing import chain_hashes, namespace_key, pack_tokens, root_hash
from radixkv.tiers.redis import RedisTier

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def free_port(with_bus: bool = False) -> int:
    """A free localhost port; with_bus: port + 10000 (a cluster node's bus) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not with_bus:
            return port
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port found")


class RedisServer:
    """One redis-server process. `url` has the password when there is one."""

    def __init__(
        self, password: str | None = None, cluster: bool = False, port: int | None = None, maxmemory: str = "16mb"
    ) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.password = password
        self.cluster = cluster
        self.maxmemory = maxmemory
        self.port = port or free_port(with_bus=cluster)
        self.dir = Path(tempfile.mkdtemp(prefix="radixkv-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "no", "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru",
            "--io-threads", "1", "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.dir / "nodes.conf")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client().ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=10)

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash (no shutdown, nothing saved)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """Three master nodes, no replicas, all 16384 slots assigned."""

    def __init__(self, nodes: int = 3) -> None:
        self.nodes = [RedisServer(cluster=True) for _ in range(nodes)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisCluster:
        for n in self.nodes:
            n.start()
        assert REDIS_CLI is not None
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not all(b"cluster_state:ok" in n.client().execute_command("CLUSTER", "INFO") for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


# ----- figures -----------------------------------------------------------------------------------


def throughput(url: str, blocks: int, repeats: int) -> dict[str, float]:
    """Write `blocks` llama-100m blocks (float32, 16 tokens: 393 KB each) and read them back."""
    spec = KVSpec(num_layers=12, num_kv_heads=4, head_dim=64, dtype=torch.float32)
    bs = 16
    tier = RedisTier(RedisOptions(url, timeout_seconds=5.0, queue_bytes=blocks * 393_216), spec, bs, "bench-throughput")
    puts: list[float] = []
    gets: list[float] = []
    copies: list[float] = []
    nbytes = blocks * tier.block_bytes
    try:
        for r in range(repeats):
            ns = namespace_key(("throughput", r))
            tokens = list(range(r * 10**6, r * 10**6 + blocks * bs))
            parent = root_hash(ns)
            hashes = chain_hashes(parent, pack_tokens(tokens), bs)
            kv = torch.randn(blocks, *tier.fingerprint.block_shape)
            t0 = time.perf_counter()
            tier.write(ns, parent, hashes, tokens, kv)
            tier.flush()
            puts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = tier.read(ns, parent, hashes, tokens)
            gets.append(time.perf_counter() - t0)
            assert torch.equal(out, kv), "read back differs"
            t0 = time.perf_counter()
            kv.clone()  # the machine's memory-copy speed, side by side, to read the GB/s against
            copies.append(time.perf_counter() - t0)
        s = tier.snapshot()
        assert s.written == blocks * repeats and s.dropped_full == 0 and s.rejected_total == 0
    finally:
        tier.close()
    return {
        "block_bytes": tier.block_bytes,
        "blocks": blocks,
        "MB_per_run": nbytes / 1e6,
        "put_GBps": nbytes / statistics.median(puts) / 1e9,
        "get_GBps": nbytes / statistics.median(gets) / 1e9,
        "memcpy_GBps": nbytes / statistics.median(copies) / 1e9,
        "put_s_median": statistics.median(puts),
        "get_s_median": statistics.median(gets),
    }


def ttft(url: str, model_name: str, prompt_tokens: int, repeats: int) -> dict[str, float]:
    """Time to first token (generate with max_new_tokens=1) on `model_name`: recompute, a hit
    fetched from Redis into an empty local cache, and a local hit; interleaved repeats."""
    from radixkv.integrations.models import load_model

    import radixkv

    model = load_model(model_name)
    cached = radixkv.wrap(model, capacity_tokens=4 * prompt_tokens, shared=url)
    assert cached.cache is not None
    prompt = torch.randint(100, 30_000, (1, prompt_tokens), generator=torch.Generator().manual_seed(11))
    gen = {"max_new_tokens": 1, "do_sample": False}
    with torch.inference_mode():
        reference = model.generate(prompt, **gen)
        cached.generate(prompt, **gen)  # computes and writes the prefix
    cached.flush()
    times: dict[str, list[float]] = {"recompute": [], "redis_hit": [], "local_hit": []}
    for _ in range(repeats):
        for kind in times:
            if kind == "redis_hit":
                cached.cache.clear()  # the local tiers forget; Redis keeps the prefix
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(prompt, **gen) if kind == "recompute" else cached.generate(prompt, **gen)
            times[kind].append(time.perf_counter() - t0)
            assert torch.equal(out, reference), f"{kind} changed the output"
    s = cached.cache.shared_stats
    assert s is not None and s.hits >= repeats
    med = {k: statistics.median(v) for k, v in times.items()}
    cached.cache.close()
    return {
        "model": model_name,
        "prompt_tokens": prompt_tokens,
        "fetched_MB": (prompt_tokens - 1) // 16 * 16 * cached.cache.spec.bytes_per_token / 1e6,
        **{f"{k}_ms": v * 1e3 for k, v in med.items()},
        "recompute_over_redis_hit": med["recompute"] / med["redis_hit"],
        "redis_hit_over_local_hit": med["redis_hit"] / med["local_hit"],
    }


_REPLICA = """
import json, time, torch, radixkv
from radixkv.integrations.models import load_model
model = load_model({model!r})
cached = radixkv.wrap(model, capacity_tokens=8192, shared={url!r})
prompt = torch.randint(100, 30_000, (1, {n}), generator=torch.Generator().manual_seed(5))
t0 = time.perf_counter()
with torch.inference_mode():
    ours = cached.generate(prompt, max_new_tokens=16, do_sample=False)
seconds = time.perf_counter() - t0
with torch.inference_mode():
    plain = model.generate(prompt, max_new_tokens=16, do_sample=False)
print(json.dumps({{"identical": torch.equal(ours, plain), "reused_tokens": cached.stats.reused_tokens,
                   "prompt_tokens": {n}, "first_request_s": seconds,
                   "shared_hits": cached.cache.shared_stats.hits}}))
"""


def replicas(url: str, model_name: str, prompt_tokens: int) -> dict[str, Any]:
    """Two separate processes load the same model; each sends one request with the same prompt."""
    out = {}
    for name in ("first", "second"):
        code = _REPLICA.format(model=model_name, url=url, n=prompt_tokens)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[name] = json.loads(run.stdout.strip().splitlines()[-1])
    return {"model": model_name, **out}


def trace(url: str | None, replicas_n: int, pool_tokens: int, limit: int | None, block_size: int) -> dict[str, Any]:
    """Replay the conversation trace over `replicas_n` caches, round robin, each with its own
    local pool (and its own Redis connection when `url` is given); requests run in trace order,
    each replica's writes flushed before the next request (the trace's gaps are ~0.3 s)."""
    from .trace import load_trace

    reqs = load_trace(None, limit)
    spec = KVSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float16)  # 4 bytes/token: hit rate only
    shared = RedisOptions(url, queue_bytes=2**30, timeout_seconds=5.0) if url else None
    caches = [
        PrefixCache(
            spec, capacity_tokens=pool_tokens, block_size=block_size, eviction="lru",
            shared=shared, shared_model="trace-replay" if shared else None,
        )
        for _ in range(replicas_n)
    ]  # fmt: skip
    longest = max(r.input_length for r in reqs)
    source = torch.zeros(1, 2, 1, 1, longest, 1, dtype=spec.dtype)
    total = hits = shared_hits = 0
    t0 = time.perf_counter()
    for i, req in enumerate(reqs):
        cache = caches[i % replicas_n]
        ids = req.prompt()
        with cache.match(ids[:-1]) as m:
            hits += m.num_tokens
            shared_hits += m.shared_tokens
        cache.insert(ids, [(source[0, 0, :, :, : len(ids)], source[0, 1, :, :, : len(ids)])])
        cache.flush()
        total += len(ids)
    seconds = time.perf_counter() - t0
    stats = [c.shared_stats for c in caches]
    for c in caches:
        c.check_invariants()
        c.close()
    return {
        "replicas": replicas_n,
        "pool_tokens_each": pool_tokens,
        "block_size": block_size,
        "requests": len(reqs),
        "prompt_tokens": total,
        "hit_rate": hits / total,
        "hit_rate_from_redis": shared_hits / total,
        "blocks_written": sum(s.written for s in stats if s is not None),
        "bytes_written": sum(s.bytes_written for s in stats if s is not None),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("figure", choices=["throughput", "ttft", "replicas", "trace"])
    p.add_argument("--url", default=None, help="an existing server (default: start one on localhost)")
    p.add_argument("--model", default="llama-100m")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--pool-tokens", type=int, default=640_000)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="trace: replay only the first N requests")
    p.add_argument("--maxmemory", default="2gb")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    server = None if args.url else RedisServer(maxmemory=args.maxmemory).start()
    url = args.url or server.url  # type: ignore[union-attr]
    try:
        if args.figure == "throughput":
            result: dict[str, Any] = throughput(url, args.blocks, args.repeats)
        elif args.figure == "ttft":
            result = ttft(url, args.model, args.prompt_tokens, args.repeats)
        elif args.figure == "replicas":
            result = replicas(url, args.model, args.prompt_tokens)
        else:
            local = trace(None, args.replicas, args.pool_tokens, args.limit, args.block_size)
            with_shared = trace(url, args.replicas, args.pool_tokens, args.limit, args.block_size)
            result = {"local_only": local, "with_shared": with_shared}
            if server is not None:
                info = server.client().info("memory")
                result["redis_used_memory_MB"] = info["used_memory"] / 1e6
    finally:
        if server is not None:
            server.stop()
    print(json.dumps({"figure": args.figure, **result}, indent=1))


if __name__ == "__main__":
    main()
