"""`radixkv.wrap(model, shared=...)` against a real redis-server: replicas in separate processes."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch
from radixkv.benchmarks.presets import load_model
from radixkv.benchmarks.redis_server import RedisServer
from radixkv.integrations.hf import UncachedWarning

import radixkv
from radixkv import SharedTierError
from radixkv.disk_tier import TierWarning

_REPLICA = """
import json, torch, radixkv
from radixkv.benchmarks.presets import load_model
torch.manual_seed(0)
model = load_model("tiny")
cached = radixkv.wrap(model, capacity_tokens=4096, shared={url!r})
prompt = torch.randint(0, 500, (1, 200), generator=torch.Generator().manual_seed(7))
ours = cached.generate(prompt, max_new_tokens=12, do_sample=False)
plain = model.generate(prompt, max_new_tokens=12, do_sample=False)
s = cached.cache.shared_stats
print(json.dumps({{"same": torch.equal(ours, plain), "reused": cached.stats.reused_tokens,
                   "hits": s.hits, "queued": s.queued}}))
"""


@pytest.fixture
def server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    yield srv
    srv.stop()


def _replica(url: str) -> dict:
    import json

    out = subprocess.run(
        [sys.executable, "-c", _REPLICA.format(url=url)], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_reuses_the_first_ones_prefix_with_identical_tokens(server: RedisServer) -> None:
    """Two processes load the same model: the second one's first request reuses the prefix the
    first computed (through Redis, written at the first's exit at the latest), and both return
    exactly the tokens of plain generate."""
    first = _replica(server.url)
    assert first["same"] and first["reused"] == 0 and first["queued"] > 0
    second = _replica(server.url)
    assert second["same"] and second["hits"] == 1
    assert second["reused"] == 192  # 199 prompt tokens to match: 12 whole blocks of 16


def test_generate_survives_a_server_killed_mid_run(server: RedisServer) -> None:
    """After the server dies, generate neither raises nor changes its output."""
    model = load_model("tiny")
    cached = radixkv.wrap(model, capacity_tokens=4096, shared=server.url)
    prompt = torch.randint(0, 500, (1, 120), generator=torch.Generator().manual_seed(3))
    server.kill()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TierWarning)
        ours = cached.generate(prompt, max_new_tokens=6, do_sample=False)
        assert cached.flush(10)
    assert torch.equal(ours, model.generate(prompt, max_new_tokens=6, do_sample=False))
    s = cached.cache.shared_stats
    assert s is not None and s.errors + s.timeouts + s.dropped_down >= 1
    cached.cache.close()


def test_wrap_with_a_wrong_password_fails_saying_so() -> None:
    """requirepass: wrap with a wrong password raises SharedTierError naming the password."""
    srv = RedisServer(password="pw-1").start()
    try:
        with pytest.raises(SharedTierError, match="password"):
            radixkv.wrap(load_model("tiny"), capacity_tokens=1024, shared=f"redis://:nope@127.0.0.1:{srv.port}/0")
        ok = radixkv.wrap(load_model("tiny"), capacity_tokens=1024, shared=srv.url)
        assert ok.cache.shared_stats.up
        ok.cache.close()
    finally:
        srv.stop()


def test_fingerprint_follows_the_weights_and_a_weight_change_stops_sharing(server: RedisServer) -> None:
    """Equal weights give equal fingerprints, one changed weight another; after a weight change
    the wrapped model stops using the shared tier (its keys name the old weights)."""
    from radixkv.integrations._hf_fingerprint import model_fingerprint

    a, b = load_model("tiny"), load_model("tiny")
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1.0
    assert model_fingerprint(a) != model_fingerprint(b)
    cached = radixkv.wrap(a, capacity_tokens=1024, shared=server.url)
    with torch.no_grad():
        next(a.parameters()).view(-1)[0] += 1.0
    prompt = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UncachedWarning, match="shared tier is off"):
        cached.generate(prompt, max_new_tokens=2, do_sample=False)
    assert cached.cache.shared_stats is None
