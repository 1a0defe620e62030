"""The disk tier: runs of KV blocks as self-describing, immutable files in one directory."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import threading
import time
import warnings
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from ..core.hashing import chain_hashes
from ..core.quant import KVQuantizer
from .codec import (
    FIXED,
    FORMAT_VERSION,
    MAGIC,
    BlockFormat,
    SpecFingerprint,
    decode_header,
    encode_header,
    rest_length,
)

__all__ = ["FORMAT_VERSION", "MAGIC", "SUFFIX", "DiskTier", "SpecFingerprint", "TierWarning"]
from ..core.spec import KVSpec

SUFFIX = ".rkv"
_TMP_PREFIX = ".tmp-"
# Errors after which writing cannot succeed until someone intervenes: the tier turns itself off.
_FATAL_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


class TierWarning(RuntimeWarning):
    """A lower tier skipped a file, or turned itself off; serving goes on without it."""


def warn_once(warned: set[str], lock: threading.Lock, kind: str, message: str, stacklevel: int) -> None:
    """A TierWarning of `kind`, unless `warned` (guarded by `lock`) says one was given already.
    `stacklevel` counts from the caller, as for `warnings.warn`."""
    with lock:
        if kind in warned:
            return
        warned.add(kind)
    warnings.warn(message, TierWarning, stacklevel=stacklevel + 1)


@dataclass
class _File:
    """One indexed file: its name, size, namespace and the chain of hashes it holds."""

    name: str
    size: int
    ns_key: bytes
    parent_hash: int
    hashes: list[int]
    uid: int = 0


@dataclass
class DiskStats:
    files: int = 0
    bytes_used: int = 0
    hits: int = 0  # reads that returned at least one block
    blocks_read: int = 0
    blocks_written: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    files_written: int = 0
    files_evicted: int = 0
    files_skipped: int = 0  # truncated, corrupt, mismatched or vanished files
    load_seconds: float = 0.0
    write_seconds: float = 0.0
    enabled: bool = True


class DiskTier:
    """KV blocks on disk, as files each holding a run of consecutive blocks of one hash chain.

    File format (`radixkv.tiers.codec`, shared with the Redis tier; little endian): a fixed
    header (magic, format version, the spec fingerprint: layers, KV heads, head_dim, block size,
    dtype; namespace key length, block count, token width, the chain hash before the run, bytes
    per block), then the dtype name, the namespace key, the token ids (uint32 when they fit,
    else uint64), the block hashes, one xxh3-64 checksum per block, an xxh3-64 checksum of
    everything before it; then the payload, one `[L, 2, H, block_size, D]`
    block after another, so a prefix of a run reads as one span.

    Contract:
      - `write` is atomic: a temporary file renamed into place, so a reader (this process or
        another) sees a whole file or none. Files are never modified after the rename; names
        derive from their content, so two processes writing the same run write the same bytes.
      - `read` verifies everything before returning KV: header checksum, format, spec,
        namespace, the chain hashes recomputed from the parent hash and the stored tokens, the
        stored tokens against the query's, and each block's payload checksum. A hash is never
        trusted alone. Any failure is a miss (counted in `files_skipped`, one TierWarning per
        tier), never an exception and never wrong KV.
      - Bounded by `capacity_bytes`: before a write, the least recently used files this tier
        indexed are deleted until the new one fits.
      - At construction the directory is indexed, so files written by an earlier process (also
        one killed mid-write: its temporary files are never indexed) are served.
      - A full or read-only disk turns the tier off (one TierWarning); every call is then a
        no-op miss. Bad arguments raise ValueError/TypeError naming them.
      - Thread-safe: a lock guards the index only; file reads and writes happen outside it.
        Processes sharing a directory never see each other's partial files; one deleting a
        file another indexed only makes the other miss.
    Costs: `count` O(blocks) dict lookups; `read`/`write` one file open per run touched plus
    the bytes; indexing at start reads every file's header.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity_bytes: int,
        spec: KVSpec,
        block_size: int,
        quantizer: KVQuantizer | None = None,
    ) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise TypeError(f"disk_capacity_bytes must be an int, got {type(capacity_bytes).__name__}")
        if capacity_bytes < 0:
            raise ValueError(f"disk_capacity_bytes must be >= 0, got {capacity_bytes}")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"disk_path must be a str or os.PathLike, got {type(path).__name__}")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"disk_path={str(self.path)!r} exists and is not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"disk_path={str(self.path)!r} cannot be created: {exc}") from exc
        self.capacity_bytes = capacity_bytes
        self.fingerprint, self.dtype, self.block_bytes = BlockFormat.of(spec, block_size, quantizer)
        self.block_size = block_size
        self.stats = DiskStats()
        self._lock = threading.Lock()
        self._files: OrderedDict[str, _File] = OrderedDict()  # least recently used first
        self._index: dict[int, tuple[_File, int]] = {}  # block hash -> (file, block position)
        self._warned: set[str] = set()
        self._tmp_counter = itertools.count()
        self._uids = itertools.count(1)
        self._scan()

    # ----- public ----------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.stats.enabled

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._index

    def count(self, hashes: Sequence[int]) -> int:
        """How many leading `hashes` the index holds (a candidate hit, not yet verified)."""
        if not self.stats.enabled:
            return 0
        index = self._index
        n = 0
        for h in hashes:
            if h not in index:
                break
            n += 1
        return n

    def read(self, ns_key: bytes, parent_hash: int, hashes: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """KV of the longest verified prefix of the blocks `hashes` (chained from `parent_hash`,
        whose token ids are `tokens`): `[k, L, 2, H, block_size, D]` on the CPU, k <= len(hashes)."""
        t0 = time.perf_counter()
        bs = self.block_size
        parts: list[torch.Tensor] = []
        got = 0
        prev = parent_hash
        while got < len(hashes) and self.stats.enabled:
            with self._lock:
                hit = self._index.get(hashes[got])
                if hit is not None:
                    self._files.move_to_end(hit[0].name)
            if hit is None:
                break
            f, pos = hit
            n = 1
            while got + n < len(hashes) and pos + n < len(f.hashes) and f.hashes[pos + n] == hashes[got + n]:
                n += 1
            blocks = self._read_file(f, pos, n, ns_key, prev, hashes[got : got + n], tokens[got * bs : (got + n) * bs])
            if blocks is None:
                break
            parts.append(blocks)
            got += n
            prev = hashes[got - 1]
        with self._lock:
            self.stats.load_seconds += time.perf_counter() - t0
            if got:
                self.stats.hits += 1
                self.stats.blocks_read += got
        if not parts:
            return torch.empty((0, *self.fingerprint.block_shape), dtype=self.dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def write(
        self, ns_key: bytes, parent_hash: int, hashes: Sequence[int], tokens: Sequence[int], blocks: torch.Tensor
    ) -> int:
        """Store the run `blocks` (`[n, L, 2, H, block_size, D]`, CPU); returns blocks written.

        Blocks already on disk are skipped (files are written once); a run larger than the
        capacity is cut to the prefix that fits.
        """
        if not self.stats.enabled or not hashes:
            return 0
        n = len(hashes)
        assert tuple(blocks.shape) == (n, *self.fingerprint.block_shape), (blocks.shape, n)
        bs = self.block_size
        written = 0
        start = 0
        # Only the blocks not yet indexed, as maximal consecutive sub-runs.
        while start < n:
            while start < n and hashes[start] in self._index:
                start += 1
            end = start
            while end < n and hashes[end] not in self._index:
                end += 1
            if end > start:
                parent = hashes[start - 1] if start else parent_hash
                written += self._write_run(
                    ns_key, parent, list(hashes[start:end]), list(tokens[start * bs : end * bs]), blocks[start:end]
                )
                if not self.stats.enabled:
                    break
            start = end
        return written

    def snapshot(self) -> DiskStats:
        with self._lock:
            s = self.stats
            return DiskStats(**{**s.__dict__, "files": len(self._files)})

    def held_blocks(self) -> int:
        """Blocks in the files this tier indexes (a block in two files counts twice)."""
        with self._lock:
            return sum(len(f.hashes) for f in self._files.values())

    def check(self) -> None:
        """Assert that the index, the file list and the byte count agree."""
        with self._lock:
            assert sum(f.size for f in self._files.values()) == self.stats.bytes_used, "disk bytes miscounted"
            assert self.stats.bytes_used <= max(self.capacity_bytes, 0), "disk tier over capacity"
            for h, (f, pos) in self._index.items():
                assert self._files.get(f.name) is f, f"hash {h:x} indexed to a file no longer listed"
                assert f.hashes[pos] == h, f"hash {h:x} indexed at the wrong position"

    # ----- files -----------------------------------------------------------------------
    def _header(self, ns_key: bytes, parent_hash: int, hashes: list[int], tokens: list[int], sums: list[int]) -> bytes:
        return encode_header(self.fingerprint, self.block_bytes, ns_key, parent_hash, hashes, tokens, sums)

    def _parse_header(self, fh, file_size: int) -> tuple[bytes, int, list[int], list[int], list[int], int] | str:
        """(namespace key, parent hash, hashes, tokens, block checksums, payload offset) or why not."""
        raw = fh.read(FIXED.size)
        rest_len = rest_length(raw)
        if isinstance(rest_len, str):
            return rest_len
        head = decode_header(raw + fh.read(rest_len), self.fingerprint, self.block_bytes, file_size)
        if isinstance(head, str):
            return head
        return head.ns_key, head.parent_hash, head.hashes, head.tokens, head.sums, head.payload_offset

    def _read_file(
        self, f: _File, pos: int, n: int, ns_key: bytes, prev: int, hashes: Sequence[int], tokens: Sequence[int]
    ) -> torch.Tensor | None:
        bs = self.block_size
        try:
            with open(self.path / f.name, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                parsed = self._parse_header(fh, size)
                if isinstance(parsed, str):
                    return self._skip(f, parsed, corrupt=True)
                f_ns, f_parent, f_hashes, f_tokens, sums, offset = parsed
                # The file must be the one indexed, and agree with the query in every respect.
                if f_ns != ns_key:
                    return self._skip(f, "namespace differs from the query's", corrupt=False)
                if chain_hashes(f_parent, array("Q", f_tokens).tobytes(), bs) != f_hashes:
                    return self._skip(f, "block hashes do not follow from its tokens", corrupt=True)
                if f_hashes[pos : pos + n] != list(hashes) or (f_hashes[pos - 1] if pos else f_parent) != prev:
                    return self._skip(f, "hash chain differs from the query's", corrupt=False)
                if f_tokens[pos * bs : (pos + n) * bs] != list(tokens):
                    return self._skip(f, "token ids differ from the query's", corrupt=False)
                fh.seek(offset + pos * self.block_bytes)
                data = bytearray(n * self.block_bytes)
                got = fh.readinto(data)
        except FileNotFoundError:
            return self._skip(f, "file vanished (deleted by another process?)", corrupt=False, warn=False)
        except OSError as exc:
            return self._skip(f, f"unreadable: {exc}", corrupt=False)
        if got != n * self.block_bytes:
            return self._skip(f, "truncated payload", corrupt=True)
        bb = self.block_bytes
        view = memoryview(data)
        digest = xxhash.xxh3_64_intdigest
        for i in range(n):
            if digest(view[i * bb : (i + 1) * bb]) != sums[pos + i]:
                return self._skip(f, f"payload checksum mismatch in block {pos + i}", corrupt=True)
        with self._lock:
            self.stats.bytes_read += len(data)
        out = torch.frombuffer(data, dtype=torch.uint8).view(self.dtype)
        return out.view(n, *self.fingerprint.block_shape)

    def _skip(self, f: _File, why: str, corrupt: bool, warn: bool = True) -> None:
        """Count a file that cannot serve, drop it from the index (and delete it if corrupt)."""
        with self._lock:
            self.stats.files_skipped += 1
            self._forget(f)
        if corrupt:
            _unlink_quietly(self.path / f.name)
        if warn:
            self._warn_once("skip", f"radixkv disk tier: skipping {f.name} ({why}); it counts as a miss")
        return None

    def _forget(self, f: _File) -> None:
        """Drop `f` from the index (lock held)."""
        if self._files.get(f.name) is not f:
            return
        del self._files[f.name]
        self.stats.bytes_used -= f.size
        for h in f.hashes:
            # Another file may hold the same block: its entry stays (only ours goes).
            if self._index.get(h, (None, 0))[0] is f:
                del self._index[h]

    def _write_run(self, ns_key: bytes, parent: int, hashes: list[int], tokens: list[int], blocks: torch.Tensor) -> int:
        t0 = time.perf_counter()
        bs = self.block_size
        room = (self.capacity_bytes - len(self._header(ns_key, parent, hashes[:1], tokens[:bs], [0]))) // (
            self.block_bytes + 8 * bs + 16
        )
        if room < 1:
            return 0
        if room < len(hashes):
            hashes, tokens, blocks = hashes[:room], tokens[: room * bs], blocks[:room]
        n = len(hashes)
        flat = blocks.contiguous()
        # One copy into bytes (no numpy dependency); [n, L, 2, H, bs, D] is block after block.
        payload = ctypes.string_at(flat.data_ptr(), n * self.block_bytes)
        view = memoryview(payload)
        bb = self.block_bytes
        digest = xxhash.xxh3_64_intdigest
        sums = [digest(view[i * bb : (i + 1) * bb]) for i in range(n)]
        header = self._header(ns_key, parent, hashes, tokens, sums)
        size = len(header) + n * self.block_bytes
        key = xxhash.xxh3_128_hexdigest(header)
        name = f"{key}{SUFFIX}"
        # Make room first, so the tier never exceeds its capacity, even briefly.
        with self._lock:
            while self._files and self.stats.bytes_used + size > self.capacity_bytes:
                self._evict_oldest()
        tmp = self.path / f"{_TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{next(self._tmp_counter)}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(header)
                fh.write(payload)
            os.replace(tmp, self.path / name)
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno in _FATAL_WRITE_ERRNOS:
                self.stats.enabled = False
                self._warn_once("off", f"radixkv disk tier turned off: cannot write to {self.path} ({exc})")
            else:
                self._warn_once("write", f"radixkv disk tier: a write failed ({exc}); the blocks are dropped")
            return 0
        f = _File(name, size, ns_key, parent, hashes, next(self._uids))
        with self._lock:
            self._add(f)
            self.stats.bytes_written += size
            self.stats.blocks_written += n
            self.stats.files_written += 1
            self.stats.write_seconds += time.perf_counter() - t0
            # Another thread may have filled the room meanwhile: trim back to capacity.
            while self.stats.bytes_used > self.capacity_bytes and len(self._files) > 1:
                self._evict_oldest()
        return n

    def _evict_oldest(self) -> None:
        """Delete the least recently used file (lock held)."""
        old = next(iter(self._files.values()))
        self._forget(old)
        self.stats.files_evicted += 1
        _unlink_quietly(self.path / old.name)

    def _add(self, f: _File) -> None:
        """Index `f` (lock held); a file of the same name (same content) is replaced."""
        old = self._files.get(f.name)
        if old is not None:
            self._forget(old)
        self._files[f.name] = f
        self.stats.bytes_used += f.size
        for pos, h in enumerate(f.hashes):
            self._index[h] = (f, pos)

    def _scan(self) -> None:
        """Index the files already in the directory, oldest first; drop what exceeds capacity."""
        found: list[tuple[float, _File]] = []
        skipped: list[str] = []
        try:
            entries = list(os.scandir(self.path))
        except OSError as exc:
            self.stats.enabled = False
            self._warn_once("off", f"radixkv disk tier turned off: cannot list {self.path} ({exc})")
            return
        for entry in entries:
            name = entry.name
            if name.startswith(_TMP_PREFIX):
                self._remove_orphan(entry)
                continue
            if not name.endswith(SUFFIX):
                continue
            try:
                st = entry.stat()
                with open(entry.path, "rb") as fh:
                    parsed = self._parse_header(fh, st.st_size)
            except OSError as exc:
                parsed = f"unreadable: {exc}"
            if isinstance(parsed, str):
                skipped.append(f"{name} ({parsed})")
                continue
            ns_key, parent, hashes, _, _, _ = parsed
            found.append((st.st_mtime, _File(name, st.st_size, ns_key, parent, hashes, next(self._uids))))
        found.sort(key=lambda x: x[0])
        with self._lock:
            for _, f in found:
                self._add(f)
            while self._files and self.stats.bytes_used > self.capacity_bytes:
                self._evict_oldest()
            self.stats.files_skipped += len(skipped)
        if skipped:
            self._warn_once(
                "skip",
                f"radixkv disk tier: {len(skipped)} file(s) in {self.path} cannot be served and count as "
                f"misses: {', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}",
            )
        if not os.access(self.path, os.W_OK):
            self.stats.enabled = False
            self._warn_once("off", f"radixkv disk tier turned off: {self.path} is not writable")

    def _remove_orphan(self, entry: os.DirEntry) -> None:
        """Delete a temporary file whose writing process is gone (it was killed mid-write)."""
        try:
            pid = int(entry.name[len(_TMP_PREFIX) :].split("-", 1)[0])
        except ValueError:
            return
        if pid == os.getpid():
            return
        try:
            os.kill(pid, 0)
            return  # the writer is alive: leave its file alone
        except ProcessLookupError:
            pass
        except OSError:
            return
        _unlink_quietly(entry.path)

    def _warn_once(self, kind: str, message: str) -> None:
        warn_once(self._warned, self._lock, kind, message, stacklevel=4)


def _unlink_quietly(path: str | os.PathLike[str]) -> None:
    """Delete a file that may already be gone (another process, or never created)."""
    with contextlib.suppress(OSError):
        os.unlink(path)
