"""The disk tier on its own: format, verification, capacity, restarts, failures."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from radixkv import KVSpec
from radixkv.core.hashing import chain_hashes, namespace_key, pack_tokens, root_hash
from radixkv.tiers.disk import SUFFIX, DiskTier, TierWarning

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32)
BS = 4
NS = namespace_key(None)


def run_of(tokens: list[int], ns: bytes = NS, spec: KVSpec = SPEC) -> tuple[int, list[int], torch.Tensor]:
    """(parent hash, block hashes, blocks [n, L, 2, H, bs, D]) for a run starting at the root;
    the KV values are a deterministic function of the token ids (same in every process)."""
    parent = root_hash(ns)
    hashes = chain_hashes(parent, pack_tokens(tokens), BS)
    n = len(hashes)
    base = torch.tensor(tokens[: n * BS], dtype=torch.float64).view(n, 1, 1, 1, BS, 1)
    shape = (n, spec.num_layers, 2, spec.num_kv_heads, BS, spec.head_dim)
    offs = torch.arange(spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim, dtype=torch.float64)
    offs = offs.view(spec.num_layers, 2, spec.num_kv_heads, 1, spec.head_dim).unsqueeze(0)
    return parent, hashes, (base * 7 + offs).expand(shape).to(spec.dtype).contiguous()


def tier(path: Path, capacity: int = 1 << 20) -> DiskTier:
    return DiskTier(path, capacity, SPEC, BS)


def test_round_trip_and_restart(tmp_path: Path) -> None:
    """What one tier wrote, a second tier on the same directory (a restart) reads back exactly."""
    toks = list(range(100, 132))  # 8 blocks
    parent, hashes, blocks = run_of(toks)
    d = tier(tmp_path)
    assert d.write(NS, parent, hashes, toks, blocks) == 8
    assert torch.equal(d.read(NS, parent, hashes, toks), blocks)
    d2 = tier(tmp_path)
    assert d2.count(hashes) == 8
    assert torch.equal(d2.read(NS, parent, hashes, toks), blocks)
    # A suffix of the run, starting mid-file, reads the right blocks.
    assert torch.equal(d2.read(NS, hashes[2], hashes[3:6], toks[12:24]), blocks[3:6])
    d2.check()


def test_write_skips_blocks_already_stored(tmp_path: Path) -> None:
    """Files are written once: a run whose blocks are on disk writes only the new ones."""
    toks = list(range(32))
    parent, hashes, blocks = run_of(toks)
    d = tier(tmp_path)
    assert d.write(NS, parent, hashes[:4], toks[:16], blocks[:4]) == 4
    assert d.write(NS, parent, hashes, toks, blocks) == 4
    assert d.snapshot().files_written == 2
    assert torch.equal(d.read(NS, parent, hashes, toks), blocks)


def test_query_tokens_are_compared_not_just_hashes(tmp_path: Path) -> None:
    """A file indexed under the query's hashes but holding other tokens is a miss, not wrong KV."""
    toks = list(range(16))
    parent, hashes, blocks = run_of(toks)
    d = tier(tmp_path)
    d.write(NS, parent, hashes, toks, blocks)
    other = [t + 1000 for t in toks]
    with pytest.warns(TierWarning, match="token ids differ"):
        out = d.read(NS, parent, hashes, other)  # as if the hashes had collided
    assert out.shape[0] == 0
    assert d.snapshot().files_skipped == 1


def test_namespace_and_spec_are_checked(tmp_path: Path) -> None:
    """Another namespace's query, or a tier of another spec, never reads a file."""
    toks = list(range(16))
    parent, hashes, blocks = run_of(toks)
    tier(tmp_path).write(NS, parent, hashes, toks, blocks)
    d = tier(tmp_path)
    with pytest.warns(TierWarning, match="namespace"):
        assert d.read(namespace_key("other"), parent, hashes, toks).shape[0] == 0
    spec16 = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float16)
    with pytest.warns(TierWarning, match="another KV spec"):
        d16 = DiskTier(tmp_path, 1 << 20, spec16, BS)
    assert d16.count(hashes) == 0 and d16.snapshot().files_skipped == 1
    with pytest.warns(TierWarning, match="another KV spec"):
        assert DiskTier(tmp_path, 1 << 20, SPEC, 8).count(hashes) == 0


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header", "garbage"])
def test_damaged_files_are_counted_misses(tmp_path: Path, damage: str) -> None:
    """Truncated or corrupt files are skipped with one warning; the caller sees a miss, no error."""
    toks = list(range(32))
    parent, hashes, blocks = run_of(toks)
    tier(tmp_path).write(NS, parent, hashes, toks, blocks)
    (path,) = tmp_path.glob(f"*{SUFFIX}")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 10]
    elif damage == "flip_payload":
        data[-5] ^= 0xFF
    elif damage == "flip_header":
        data[60] ^= 0xFF
    else:
        data = bytearray(b"x" * 50)
    path.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = tier(tmp_path)
        out = d.read(NS, parent, hashes, toks)
    assert out.shape[0] == 0
    assert d.snapshot().files_skipped == 1
    assert len([w for w in caught if issubclass(w.category, TierWarning)]) == 1


def test_payload_damage_in_a_later_block_serves_the_verified_prefix(tmp_path: Path) -> None:
    """Per-block checksums: a bad last block leaves the blocks before it servable."""
    toks = list(range(32))
    parent, hashes, blocks = run_of(toks)
    d = tier(tmp_path)
    d.write(NS, parent, hashes, toks, blocks)
    (path,) = tmp_path.glob(f"*{SUFFIX}")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert torch.equal(d.read(NS, parent, hashes[:3], toks[:12]), blocks[:3])
    with pytest.warns(TierWarning, match="checksum"):
        assert d.read(NS, parent, hashes, toks).shape[0] == 0


def test_capacity_evicts_least_recently_used_files(tmp_path: Path) -> None:
    """The directory never holds more than capacity_bytes of this tier's files."""
    runs = [run_of(list(range(i * 1000, i * 1000 + 16))) for i in range(6)]
    d = tier(tmp_path, 1 << 20)
    d.write(NS, runs[0][0], runs[0][1], list(range(16)), runs[0][2])
    size = d.snapshot().bytes_used
    d = tier(tmp_path, 3 * size)  # room for three files of this size
    d.write(NS, runs[1][0], runs[1][1], list(range(1000, 1016)), runs[1][2])
    d.read(NS, runs[0][0], runs[0][1], list(range(16)))  # run 0 is now the most recent
    for i in (2, 3):
        d.write(NS, runs[i][0], runs[i][1], list(range(i * 1000, i * 1000 + 16)), runs[i][2])
    s = d.snapshot()
    assert s.bytes_used <= 3 * size and s.files == 3 and s.files_evicted == 1
    assert d.count(runs[1][1]) == 0 and d.count(runs[0][1]) == 4
    assert sum(p.stat().st_size for p in tmp_path.glob(f"*{SUFFIX}")) <= 3 * size
    d.check()
    # Restarting with a smaller capacity trims the directory to it.
    d1 = tier(tmp_path, size)
    assert d1.snapshot().files == 1 and len(list(tmp_path.glob(f"*{SUFFIX}"))) == 1


def test_a_run_larger_than_capacity_is_cut(tmp_path: Path) -> None:
    toks = list(range(64))
    parent, hashes, blocks = run_of(toks)
    d = tier(tmp_path, 1000)
    n = d.write(NS, parent, hashes, toks, blocks)
    assert 0 < n < 16 and d.snapshot().bytes_used <= 1000
    assert torch.equal(d.read(NS, parent, hashes, toks), blocks[:n])
    assert tier(tmp_path, 0).snapshot().files == 0


def test_bad_arguments_name_themselves(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="disk_capacity_bytes"):
        DiskTier(tmp_path, -1, SPEC, BS)
    with pytest.raises(TypeError, match="disk_capacity_bytes"):
        DiskTier(tmp_path, 1.5, SPEC, BS)  # type: ignore[arg-type]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="disk_path"):
        DiskTier(afile, 100, SPEC, BS)
    with pytest.raises(TypeError, match="disk_path"):
        DiskTier(3, 100, SPEC, BS)  # type: ignore[arg-type]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_turns_the_tier_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """One warning, then every call is a quiet no-op; no exception reaches the caller."""
    toks = list(range(32))
    parent, hashes, blocks = run_of(toks)
    d = tier(tmp_path)

    def failing_open(*args: object, **kwargs: object) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr("builtins.open", failing_open)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert d.write(NS, parent, hashes[:4], toks[:16], blocks[:4]) == 0
        assert d.write(NS, parent, hashes, toks, blocks) == 0
    assert not d.enabled and d.count(hashes) == 0
    assert next(str(w.message) for w in caught if issubclass(w.category, TierWarning)).startswith(
        "radixkv disk tier turned off"
    )
    assert len([w for w in caught if issubclass(w.category, TierWarning)]) == 1
    assert not [p for p in tmp_path.iterdir()]  # no temporary file left behind


_WRITER = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from test_disk_tier import run_of, NS, tier
    from pathlib import Path
    import radixkv.tiers.disk as dt
    path = Path({path!r})
    toks = list(range(4000, 4064))
    parent, hashes, blocks = run_of(toks)
    d = tier(path, 1 << 24)
    d.write(NS, parent, hashes[:4], toks[:16], blocks[:4])   # one whole file first
    real_open = open
    class Slow:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *a): return self.f.__exit__(*a)
        def write(self, b):
            n = self.f.write(b[: len(b) // 2]); self.f.flush()
            print("WRITING", flush=True)
            import time; time.sleep(60)
    def slow_open(p, mode="r", *a, **k):
        f = real_open(p, mode, *a, **k)
        return Slow(f) if "w" in mode else f
    dt.open = slow_open
    d.write(NS, parent, hashes, toks, blocks)
    """
)


def test_writer_killed_mid_write_leaves_nothing_wrong(tmp_path: Path) -> None:
    """SIGKILL during a write: a restarted tier serves the whole earlier file, never the partial
    one, and removes the dead writer's temporary file."""
    code = _WRITER.format(tests=str(Path(__file__).parent), path=str(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"WRITING", line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # the partial file exists
    toks = list(range(4000, 4064))
    parent, hashes, blocks = run_of(toks)
    d = tier(tmp_path, 1 << 24)
    assert d.count(hashes) == 4
    assert torch.equal(d.read(NS, parent, hashes, toks), blocks[:4])
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert d.snapshot().files_skipped == 0


def test_two_tiers_sharing_a_directory(tmp_path: Path) -> None:
    """Two tiers (as two processes would) write and evict in one directory; every read is
    either exact or a miss."""
    a, b = tier(tmp_path, 6000), tier(tmp_path, 6000)
    runs = {i: (list(range(i * 100, i * 100 + 16)), *run_of(list(range(i * 100, i * 100 + 16)))) for i in range(12)}
    for i, (toks, parent, hashes, blocks) in runs.items():
        (a if i % 2 else b).write(NS, parent, hashes, toks, blocks)
    c = tier(tmp_path, 1 << 20)
    served = 0
    for toks, parent, hashes, blocks in runs.values():
        for reader in (a, b, c):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TierWarning)
                out = reader.read(NS, parent, hashes, toks)
            assert torch.equal(out, blocks[: out.shape[0]])
            served += out.shape[0]
    assert served > 0


_SHARER = textwrap.dedent(
    """
    import sys, warnings
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_disk_tier import run_of, NS, tier
    warnings.simplefilter("ignore")
    d = tier(Path({path!r}), 8000)
    for rep in range(3):
        for i in range({first}, {first} + 12):
            toks = list(range(i * 100, i * 100 + 16))
            parent, hashes, blocks = run_of(toks)
            d.write(NS, parent, hashes, toks, blocks)
            out = d.read(NS, parent, hashes, toks)
            assert (out == blocks[: out.shape[0]]).all()
    print("OK", flush=True)
    """
)


def test_two_processes_writing_one_directory(tmp_path: Path) -> None:
    """Two processes write, read and evict overlapping runs in one directory at the same time;
    afterwards every file there is whole and every read is exact."""
    tests = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SHARER.format(tests=tests, path=str(tmp_path), first=first)],
            stdout=subprocess.PIPE,
            env=env,
        )
        for first in (0, 6)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all(o.strip() == b"OK" for o in outs), outs
    d = tier(tmp_path, 1 << 20)
    assert d.snapshot().files_skipped == 0 and d.snapshot().files > 0
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    served = 0
    for i in range(18):
        toks = list(range(i * 100, i * 100 + 16))
        parent, hashes, blocks = run_of(toks)
        out = d.read(NS, parent, hashes, toks)
        assert torch.equal(out, blocks[: out.shape[0]])
        served += out.shape[0]
    assert served > 0
