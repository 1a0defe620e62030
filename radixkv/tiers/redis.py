"""The shared tier: KV blocks in Redis (or a Redis Cluster), so that replicas reuse each other's prefixes."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import torch
import xxhash

from ..core.hashing import chain_hashes, namespace_key, pack_tokens
from ..core.quant import KVQuantizer
from ..core.spec import KVSpec
from .codec import BlockFormat, SpecFingerprint, decode_header, encode_header
from .disk import warn_once

KEY_PREFIX = "rkv1"
"""Start of every key; bumped with the value format, so two formats never read each other."""
MIN_SHARED_LOAD_TOKENS = 16
"""A Redis continuation shorter than this is recomputed instead of fetched (one round trip).
Fetching 16 tokens from a localhost server beat recomputing them 1.46x / 1.56x on SmolLM2-135M
and llama-100m on a CPU; a toy model whose forward takes a few ms tied at 16 tokens."""
_BACKOFF_START_S = 0.1
_BACKOFF_MAX_S = 5.0
_PIPELINE_BYTES = 32 * 2**20  # one write round trip carries at most about this much


@dataclass(frozen=True)
class RedisOptions:
    """Where and how the shared tier talks to Redis.

    url: `redis://[:password@]host:port/db` (`rediss://` for TLS); a Redis Cluster is detected
    from the server itself (any node's address will do). ttl_seconds: expiry of written blocks
    (None: none; let the server's maxmemory policy evict). timeout_seconds: bound on every call
    (connect, read, write); a slower server counts as down. queue_bytes: the most KV bytes
    waiting to be written (host memory); more are dropped and counted. batch_blocks: keys per read round
    trip. max_value_bytes: the largest value written or accepted (a block larger than this
    turns the tier off at construction). min_tokens: shorter continuations are recomputed.
    """

    url: str
    ttl_seconds: int | None = None
    timeout_seconds: float = 0.25
    queue_bytes: int = 256 * 2**20
    batch_blocks: int = 64
    max_value_bytes: int = 64 * 2**20
    min_tokens: int = MIN_SHARED_LOAD_TOKENS

    def __post_init__(self) -> None:
        if not isinstance(self.url, str):
            raise TypeError(f"shared must be a redis:// URL or RedisOptions, got {type(self.url).__name__}")
        scheme = urlsplit(self.url).scheme
        if scheme not in ("redis", "rediss"):
            raise ValueError(f"shared={redact(self.url)!r} must be a redis:// or rediss:// URL")
        if self.ttl_seconds is not None:
            _check_int("ttl_seconds", self.ttl_seconds, 1)
        if isinstance(self.timeout_seconds, bool) or not isinstance(self.timeout_seconds, (int, float)):
            raise TypeError(f"timeout_seconds must be a number, got {type(self.timeout_seconds).__name__}")
        if not 0 < self.timeout_seconds < 3600:
            raise ValueError(f"timeout_seconds must be in (0, 3600), got {self.timeout_seconds}")
        _check_int("queue_bytes", self.queue_bytes, 0)
        _check_int("batch_blocks", self.batch_blocks, 1)
        _check_int("max_value_bytes", self.max_value_bytes, 1)
        _check_int("min_tokens", self.min_tokens, 0)


@dataclass
class RedisStats:
    """Counters of the shared tier (blocks are whole blocks; bytes include headers).

    lookups: reads that reached the server. hits: reads that returned at least one block.
    rejected: values that were present but could not serve, by reason (collision, other model
    or spec, truncated, corrupt): each is a miss. skipped_down: reads not tried because the
    server was down. queued / written: blocks accepted for writing / stored. dropped_full:
    blocks dropped because the queue was full; dropped_down: dropped because the server was
    down or a write failed. errors / timeouts: failed calls. reconnects: times it came back.
    """

    lookups: int = 0
    hits: int = 0
    blocks_read: int = 0
    bytes_read: int = 0
    load_seconds: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)
    skipped_down: int = 0
    queued: int = 0
    written: int = 0
    bytes_written: int = 0
    write_seconds: float = 0.0
    dropped_full: int = 0
    dropped_down: int = 0
    errors: int = 0
    timeouts: int = 0
    reconnects: int = 0
    up: bool = False
    cluster: bool = False

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


class SharedTierError(ValueError):
    """The shared tier's server refused the connection's settings (password, database)."""


class RedisTier:
    """KV blocks in Redis, one key per block, readable by every process with the same model.

    Keys: `rkv1:<model>:<spec>:<namespace>:<chain hash>`, where model is an xxh3-128 of the
    caller's model fingerprint (config, dtype, weights), spec names layers, KV heads, head_dim,
    dtype (with the kv_dtype of a quantised pool: `float16-int8`) and block size, namespace
    is an xxh3-128 of the structured namespace key and the chain
    hash is the block's xxh3-64 chain hash. All are content hashes, equal in every process and
    machine (never Python's `hash`). No key needs another in the same slot, so on a Cluster they
    spread over all slots by their CRC16.
    Values: a `radixkv.tiers.codec` run of one block whose namespace field is the (model,
    namespace) scope, then the block's `[L, 2, H, block_size, D]` payload.

    Contract:
      - `read` returns the KV of the longest verified prefix of the blocks asked for, fetched
        with one pipelined round trip per `batch_blocks` keys (per node on a Cluster). Each
        value is checked in full: header checksum, format, spec, scope (model and namespace),
        parent and chain hash recomputed from its tokens, tokens against the query, payload
        size and checksum. A value that fails is a counted miss (`rejected`), never KV.
      - `write` copies nothing and blocks on nothing: it queues the run (`[n, L, 2, H, bs, D]`
        on the CPU, owned by the tier from then on) for a background thread; a full queue
        drops the run and counts it. `flush()` waits until what was queued is written or
        dropped; a normal interpreter exit flushes (bounded by a few timeouts).
      - Every call to the server has `timeout_seconds`. A server that fails or times out is
        marked down: reads return nothing at once and writes are dropped (counted) while a
        background thread reconnects with exponential backoff (0.1 s to 5 s). No exception
        from the server reaches the caller after construction.
      - Construction: a server that cannot be reached gives one TierWarning and starts down;
        one that refuses the password (wrong or missing) raises SharedTierError saying so.
      - Thread-safe: the client's connection pool serves concurrent readers; one writer thread.
    Costs: a read O(blocks) checksums and one copy of the payload; a write one copy into
    bytes plus one checksum per block, in the writer thread.
    """

    def __init__(
        self,
        options: RedisOptions,
        spec: KVSpec,
        block_size: int,
        model_fingerprint: str | bytes,
        quantizer: KVQuantizer | None = None,
    ) -> None:
        if not isinstance(options, RedisOptions):
            raise TypeError(f"options must be RedisOptions, got {type(options).__name__}")
        if not isinstance(model_fingerprint, (str, bytes)) or not model_fingerprint:
            raise ValueError("shared_model must be a non-empty str or bytes identifying the model and its weights")
        self.options = options
        self.fingerprint, self.dtype, self.block_bytes = BlockFormat.of(spec, block_size, quantizer)
        self.block_size = block_size
        self.model_id = model_id(model_fingerprint)
        self._key_head = shared_key(self.model_id, self.fingerprint, b"", 0).rsplit(":", 2)[0] + ":"
        worst_header = len(encode_header(self.fingerprint, self.block_bytes, b"", 0, [0], [2**63] * block_size, [0]))
        if worst_header + 200 + self.block_bytes > options.max_value_bytes:
            raise ValueError(
                f"one block is {self.block_bytes} bytes, more than max_value_bytes={options.max_value_bytes}; "
                "use a smaller block_size or raise max_value_bytes"
            )
        self.stats = RedisStats()
        self._stats_lock = threading.Lock()
        self._client: Any = None
        self._state_lock = threading.Lock()
        self._backoff = _BACKOFF_START_S
        self._retry_at = 0.0
        self._warned: set[str] = set()
        self._queue: deque[tuple[bytes, int, list[int], list[int], torch.Tensor]] = deque()
        self._queued_blocks = 0
        self._busy = False  # the writer holds items taken off the queue
        self._cv = threading.Condition()
        self._closed = False
        self._connect(at_start=True)
        self._writer = threading.Thread(target=self._run_writer, name="radixkv-redis-writer", daemon=True)
        self._writer.start()
        ref = weakref.ref(self)
        self._atexit = lambda: _flush_at_exit(ref)
        atexit.register(self._atexit)

    # ----- public ----------------------------------------------------------------------
    @property
    def up(self) -> bool:
        return self._client is not None

    def key(self, ns_key: bytes, block_hash: int) -> str:
        """The Redis key of one block (see `shared_key`)."""
        return shared_key(self.model_id, self.fingerprint, ns_key, block_hash)

    def scope(self, ns_key: bytes) -> bytes:
        """The namespace field of a value: model and namespace together."""
        return namespace_key(("radixkv-shared", self.model_id, ns_key))

    def read(self, ns_key: bytes, parent_hash: int, hashes: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """KV of the longest verified prefix of the blocks `hashes` (chained from `parent_hash`,
        token ids `tokens`): `[k, L, 2, H, block_size, D]` on the CPU, k <= len(hashes)."""
        client = self._client
        if client is None or not hashes:
            if hashes:
                self._count(skipped_down=1)
            return self._empty()
        t0 = time.perf_counter()
        bs, bb = self.block_size, self.block_bytes
        scope = self.scope(ns_key)
        ns_hex = xxhash.xxh3_128_hexdigest(ns_key)
        head = self._key_head
        out = bytearray()
        got = 0
        prev = parent_hash
        reasons: dict[str, int] = {}
        try:
            while got < len(hashes):
                batch = hashes[got : got + self.options.batch_blocks]
                pipe = client.pipeline(transaction=False)
                for h in batch:
                    pipe.get(f"{head}{ns_hex}:{h:016x}")
                values = pipe.execute()
                for i, value in enumerate(values):
                    b = got + i
                    why = (
                        "absent"
                        if value is None
                        else self._check(value, scope, prev, hashes[b], tokens[b * bs : (b + 1) * bs])
                    )
                    if why is not None:
                        if why != "absent":
                            reasons[why] = reasons.get(why, 0) + 1
                        break
                    out += memoryview(value)[len(value) - bb :]
                    prev = hashes[b]
                else:
                    got += len(batch)
                    continue
                got += i
                break
        except Exception as exc:  # redis errors, socket errors: the caller recomputes
            self._fail(exc)
        n = len(out) // bb
        with self._stats_lock:
            s = self.stats
            s.lookups += 1
            s.load_seconds += time.perf_counter() - t0
            for why, c in reasons.items():
                s.rejected[why] = s.rejected.get(why, 0) + c
            if n:
                s.hits += 1
                s.blocks_read += n
                s.bytes_read += n * bb
        if reasons:
            self._warn_once("reject", f"radixkv shared tier: a value could not serve ({next(iter(reasons))}); a miss")
        if n == 0:
            return self._empty()
        flat = torch.frombuffer(out, dtype=torch.uint8).view(self.dtype)  # out holds exactly n payloads
        return flat.view(n, *self.fingerprint.block_shape)

    def write(self, ns_key: bytes, parent_hash: int, hashes: Sequence[int], tokens: Sequence[int], blocks: Any) -> int:
        """Queue the run `blocks` (`[n, L, 2, H, bs, D]` on the CPU, or a callable returning it,
        called only when the run is accepted); returns the blocks queued (0 when dropped)."""
        n = len(hashes)
        if n == 0 or self._closed:
            return 0
        if self._client is None:
            self._count(dropped_down=n)
            return 0
        with self._cv:
            full = (self._queued_blocks + n) * self.block_bytes > self.options.queue_bytes
            if not full:
                self._queued_blocks += n
        if full:
            self._count(dropped_full=n)
            return 0
        try:
            kv = blocks() if callable(blocks) else blocks
        except BaseException:
            with self._cv:
                self._queued_blocks -= n
            raise
        with self._cv:
            self._queue.append((ns_key, parent_hash, list(hashes), list(tokens), kv))
            self._cv.notify_all()
        self._count(queued=n)
        return n

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is stored or dropped; False if `timeout` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left if left is not None else 1.0)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Flush (up to `timeout`), stop the writer and disconnect. Idempotent."""
        if self._closed:
            return
        self.flush(timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._writer.join(timeout=max(1.0, 4 * self.options.timeout_seconds))
        atexit.unregister(self._atexit)
        self._drop_client()

    def snapshot(self) -> RedisStats:
        with self._stats_lock:
            s = self.stats
            return RedisStats(**{**s.__dict__, "rejected": dict(s.rejected), "up": self.up})

    def reset_stats(self) -> None:
        with self._stats_lock:
            up, cluster = self.stats.up, self.stats.cluster
            self.stats = RedisStats(up=up, cluster=cluster)

    # ----- values ------------------------------------------------------------------------
    def encode(self, ns_key: bytes, parent_hash: int, block_hash: int, tokens: list[int], payload: bytes) -> bytes:
        """The value of one block: its header, then its payload bytes."""
        header = encode_header(
            self.fingerprint, self.block_bytes, self.scope(ns_key), parent_hash, [block_hash], tokens,
            [xxhash.xxh3_64_intdigest(payload)],
        )  # fmt: skip
        return header + payload

    def _check(self, value: bytes, scope: bytes, prev: int, block_hash: int, tokens: Sequence[int]) -> str | None:
        """Why `value` cannot serve as the block `block_hash` after `prev` with `tokens`, or None."""
        if not isinstance(value, bytes):
            return "not a byte string"
        if len(value) > self.options.max_value_bytes:
            return "larger than max_value_bytes"
        head = decode_header(value, self.fingerprint, self.block_bytes, len(value))
        if isinstance(head, str):
            return head
        if len(head.hashes) != 1:
            return "not a single block"
        if head.ns_key != scope:
            return "another model or namespace"
        if head.parent_hash != prev or head.hashes[0] != block_hash:
            return "hash chain differs from the query's"
        if head.tokens != list(tokens):
            return "token ids differ from the query's (hash collision)"
        if chain_hashes(prev, pack_tokens(head.tokens), self.block_size) != head.hashes:
            return "block hash does not follow from its tokens"
        payload = memoryview(value)[head.payload_offset :]
        if xxhash.xxh3_64_intdigest(payload) != head.sums[0]:
            return "payload checksum mismatch"
        return None

    def _empty(self) -> torch.Tensor:
        return torch.empty((0, *self.fingerprint.block_shape), dtype=self.dtype)

    # ----- connection --------------------------------------------------------------------
    def _connect(self, at_start: bool = False) -> bool:
        """Open a client and PING; on success the tier is up. Raises SharedTierError on a
        refused password at start; otherwise failures leave it down."""
        try:
            import redis
        except ImportError as exc:
            raise ImportError("the shared tier needs the redis client: pip install 'radixkv[redis]'") from exc
        opts = self.options
        common: dict[str, Any] = {
            "socket_timeout": opts.timeout_seconds,
            "socket_connect_timeout": opts.timeout_seconds,
            "retry": None,  # no retries: a failed call is a miss now, not a wait
            "health_check_interval": 0,
        }
        client: Any = None
        try:
            client = redis.Redis.from_url(opts.url, **common)
            cluster = int(client.info("cluster").get("cluster_enabled", 0)) == 1
            if cluster:
                client.close()
                from redis.backoff import NoBackoff
                from redis.cluster import RedisCluster
                from redis.retry import Retry

                client = RedisCluster.from_url(
                    opts.url,
                    socket_timeout=opts.timeout_seconds,
                    socket_connect_timeout=opts.timeout_seconds,
                    retry=Retry(NoBackoff(), 0),  # a failed call is a miss, not a wait
                )
            client.ping()
        except redis.AuthenticationError as exc:
            _close_quietly(client)
            message = (
                f"shared={redact(opts.url)!r}: the Redis server refused the password "
                f"({'wrong password' if urlsplit(opts.url).password else 'the server requires one'}: {exc})"
            )
            if at_start:
                raise SharedTierError(message) from None
            self._warn_once("auth", f"radixkv shared tier: {message}; staying down")
            return False
        except redis.ResponseError as exc:
            _close_quietly(client)
            if at_start:
                raise SharedTierError(f"shared={redact(opts.url)!r}: the Redis server refused: {exc}") from None
            return False
        except Exception as exc:
            _close_quietly(client)
            if at_start:
                self._warn_once(
                    "down",
                    f"radixkv shared tier: cannot reach {redact(opts.url)} ({type(exc).__name__}: {exc}); "
                    "serving from the local tiers and retrying in the background",
                )
            return False
        with self._state_lock:
            self._client = client
            self._backoff = _BACKOFF_START_S
        with self._stats_lock:
            self.stats.up = True
            self.stats.cluster = cluster
            if not at_start:
                self.stats.reconnects += 1
        return True

    def _fail(self, exc: BaseException) -> None:
        """A call failed: mark the tier down (reads skip it) and schedule a reconnect."""
        import redis

        timeout = isinstance(exc, (redis.TimeoutError, TimeoutError))
        self._count(timeouts=int(timeout), errors=int(not timeout))
        self._warn_once("fail", f"radixkv shared tier: {type(exc).__name__}: {exc}; reconnecting in the background")
        self._drop_client()

    def _drop_client(self) -> None:
        with self._state_lock:
            client, self._client = self._client, None
            if client is not None:
                self._retry_at = time.monotonic() + self._backoff
        with self._stats_lock:
            self.stats.up = False
        _close_quietly(client)

    def _maybe_reconnect(self) -> None:
        if self._client is not None or time.monotonic() < self._retry_at:
            return
        if not self._connect():
            with self._state_lock:
                self._backoff = min(_BACKOFF_MAX_S, self._backoff * 2)
                self._retry_at = time.monotonic() + self._backoff

    # ----- writer ------------------------------------------------------------------------
    def _run_writer(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    wait = 1.0 if self._client is not None else max(0.01, self._retry_at - time.monotonic())
                    self._cv.wait(wait)
                    if self._client is None:
                        break
                if self._closed and not self._queue:
                    return
                items = list(self._queue)
                self._queue.clear()
                self._busy = bool(items)
            try:
                self._maybe_reconnect()
                if items:
                    self._write_items(items)
            except Exception as exc:  # never let the writer die
                self._warn_once("writer", f"radixkv shared tier: writer error {type(exc).__name__}: {exc}")
            finally:
                with self._cv:
                    self._queued_blocks -= sum(len(it[2]) for it in items)
                    self._busy = False
                    self._cv.notify_all()

    def _write_items(self, items: list[tuple[bytes, int, list[int], list[int], torch.Tensor]]) -> None:
        client = self._client
        if client is None:
            self._count(dropped_down=sum(len(it[2]) for it in items))
            return
        t0 = time.perf_counter()
        bs, bb = self.block_size, self.block_bytes
        ttl = self.options.ttl_seconds
        pipe = client.pipeline(transaction=False)
        pending_bytes = pending_blocks = 0
        written = nbytes = 0
        try:
            for ns_key, parent, hashes, tokens, blocks in items:
                n = len(hashes)
                flat = blocks.contiguous()
                payload = ctypes.string_at(flat.data_ptr(), n * bb)  # [n, L, 2, H, bs, D], block after block
                prev = parent
                for i, h in enumerate(hashes):
                    value = self.encode(ns_key, prev, h, tokens[i * bs : (i + 1) * bs], payload[i * bb : (i + 1) * bb])
                    pipe.set(self.key(ns_key, h), value, ex=ttl)
                    pending_bytes += len(value)
                    pending_blocks += 1
                    prev = h
                    if pending_bytes >= _PIPELINE_BYTES:
                        pipe.execute()
                        written, nbytes = written + pending_blocks, nbytes + pending_bytes
                        pending_bytes = pending_blocks = 0
                        pipe = client.pipeline(transaction=False)
            if pending_blocks:
                pipe.execute()
                written, nbytes = written + pending_blocks, nbytes + pending_bytes
        except Exception as exc:
            self._fail(exc)
            lost = sum(len(it[2]) for it in items) - written
            self._count(dropped_down=max(0, lost))
        with self._stats_lock:
            self.stats.written += written
            self.stats.bytes_written += nbytes
            self.stats.write_seconds += time.perf_counter() - t0

    # ----- misc --------------------------------------------------------------------------
    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, d in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + d)

    def _warn_once(self, kind: str, message: str) -> None:
        warn_once(self._warned, self._stats_lock, kind, message, stacklevel=3)


def model_id(model_fingerprint: str | bytes) -> str:
    """The model part of keys: xxh3-128 (hex) of the caller's model fingerprint."""
    raw = model_fingerprint.encode() if isinstance(model_fingerprint, str) else model_fingerprint
    return xxhash.xxh3_128_hexdigest(raw)


def shared_key(model: str, fp: SpecFingerprint, ns_key: bytes, block_hash: int) -> str:
    """`rkv1:<model id>:<spec tag>:<xxh3-128 of the namespace key>:<chain hash>`: content hashes
    only, so every process and machine names a block alike (Python's `hash` never enters)."""
    return f"{KEY_PREFIX}:{model}:{fp.tag}:{xxhash.xxh3_128_hexdigest(ns_key)}:{block_hash:016x}"


def redact(url: str) -> str:
    """`url` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _flush_at_exit(ref: weakref.ref[RedisTier]) -> None:
    tier = ref()
    if tier is not None:
        with contextlib.suppress(Exception):
            tier.close(timeout=10 * tier.options.timeout_seconds + 5.0)


def _close_quietly(client: Any) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
