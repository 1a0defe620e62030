"""`radixkv.wrap(model, shared=...)` against a real redis-server: replicas in separate processes."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch
from radixkv.benchmarks.shared import RedisServer
from radixkv.integrations.models import load_model

import radixkv
from radixkv import SharedTierError
from radixkv.tiers.disk import TierWarning

_REPLICA = """
import json, torch, radixkv
from radixkv.integrations.models import load_model
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
    """Two processes load the same model (a child process, then this one): this one's first
    request reuses the prefix the child computed (through Redis, written at the child's exit at
    the latest), and both return exactly the tokens of plain generate."""
    first = _replica(server.url)
    assert first["same"] and first["reused"] == 0 and first["queued"] > 0
    model = load_model("tiny")
    cached = radixkv.wrap(model, capacity_tokens=4096, shared=server.url)
    prompt = torch.randint(0, 500, (1, 200), generator=torch.Generator().manual_seed(7))
    ours = cached.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, model.generate(prompt, max_new_tokens=12, do_sample=False))
    assert cached.cache.shared_stats.hits == 1
    assert cached.stats.reused_tokens == 192  # 199 prompt tokens to match: 12 whole blocks of 16
    cached.cache.close()


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


def test_after_a_weight_change_redis_never_serves_the_old_weights_kv(server: RedisServer) -> None:
    """A wrapped model whose weights change in place keys new entries by the new weights: the
    prefix its old weights wrote to Redis is not reused, and the output equals plain generate."""
    model = load_model("tiny")
    cached = radixkv.wrap(model, capacity_tokens=1024, shared=server.url)
    prompt = torch.randint(0, 500, (1, 80), generator=torch.Generator().manual_seed(1))
    cached.generate(prompt, max_new_tokens=2, do_sample=False)
    assert cached.flush(10) and cached.cache.shared_stats.written > 0
    with torch.no_grad():
        next(model.parameters()).view(-1)[:100] += 0.5
    before = cached.stats.reused_tokens
    ours = cached.generate(prompt, max_new_tokens=4, do_sample=False)
    assert cached.stats.reused_tokens == before  # nothing reused: neither local nor from Redis
    assert torch.equal(ours, model.generate(prompt, max_new_tokens=4, do_sample=False))
    cached.cache.close()


def test_replicas_with_other_weights_never_share(server: RedisServer) -> None:
    """Two wraps of equal weights share through Redis; a wrap of weights that differ in one
    value reads nothing the others wrote."""
    a, b, c = load_model("tiny"), load_model("tiny"), load_model("tiny")
    with torch.no_grad():
        next(c.parameters()).view(-1)[0] += 1.0
    prompt = torch.randint(0, 500, (1, 100), generator=torch.Generator().manual_seed(2))
    wa = radixkv.wrap(a, capacity_tokens=1024, shared=server.url)
    wa.generate(prompt, max_new_tokens=2, do_sample=False)
    assert wa.flush(10)
    wb = radixkv.wrap(b, capacity_tokens=1024, shared=server.url)
    wc = radixkv.wrap(c, capacity_tokens=1024, shared=server.url)
    wb.generate(prompt, max_new_tokens=2, do_sample=False)
    wc.generate(prompt, max_new_tokens=2, do_sample=False)
    assert wb.stats.reused_tokens == 96 and wc.stats.reused_tokens == 0
    for w in (wa, wb, wc):
        w.cache.close()
