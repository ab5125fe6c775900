"""The load test's µs hop followers and floor (devstack/hopwatch.py) against a real redis-server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from tickbridge.core import keys
from tickbridge_dev.devstack.hopwatch import HopWatch
from tickbridge_dev.devstack.loadtest import hop_table
from tickbridge_dev.devstack.servers import RedisServer

pytestmark = pytest.mark.timeout(60)


def test_followers_stamp_recv_ts_and_the_floor(redis_server: RedisServer, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_server.url)
    watch = HopWatch(redis_server.url, redis_server.url, ["BTCUSDT"], tmp_path / "hw", pace_ms=1.0)
    try:
        time.sleep(1.5)  # the followers start and block
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            now = time.time_ns() // 1000
            for key in (keys.DEFAULT_STREAM_KEY, keys.trades_key("BTCUSDT")):
                client.xadd(key, {"type": "TRADE", "recv_ts": now})
                client.xadd(key, {"type": "DEPTH", "recv_ts": now - 10_000_000})  # not a trade: never sampled
            time.sleep(0.005)
    finally:
        samples = watch.stop()
        client.close()
    for name in ("vps_stream", "brain_stream", "symbol_stream", "floor"):
        values = samples[name]
        assert len(values) > 5, (name, len(values))
        assert all(0 <= v < 1_000_000 for v in values), (name, max(values))  # µs, and no DEPTH sample
    table = hop_table(samples)
    assert table["vps_stream"]["share_p50"] == table["vps_stream"]["p50"]
    assert table["symbol_stream"]["n"] == len(samples["symbol_stream"])
