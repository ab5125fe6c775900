"""The load test's µs hop followers and floor (devstack/hopwatch.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from questdb.ingress import Sender

from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBHttp, ilp_conf
from tickbridge.core.wire import TRADES_DDL, ilp_trade
from tickbridge_dev.devstack.hopwatch import HopWatch
from tickbridge_dev.devstack.loadtest import hop_table
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer

pytestmark = pytest.mark.timeout(60)


def test_followers_stamp_recv_ts_and_the_floor(redis_server: RedisServer, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_server.url)
    watch = HopWatch(redis_server.url, redis_server.url, ["BTCUSDT"], tmp_path / "hw", pace_ms=1.0)
    try:
        assert watch.wait_ready()
        time.sleep(0.5)  # connected: now blocking in XREAD
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


def test_the_questdb_follower_stamps_when_the_row_became_visible(
    redis_server: RedisServer, questdb_server: QuestDBServer, tmp_path: Path
) -> None:
    """Each sample is recv_ts -> the row visible in `trades`: rows written 0.3 s after their entry read >= 0.3 s."""
    delay_s = 0.3
    client = redis.Redis.from_url(redis_server.url)
    qdb = QuestDBHttp(questdb_server.url)
    asyncio.run(_exec(qdb, TRADES_DDL))
    watch = HopWatch(redis_server.url, redis_server.url, ["HWVISUSDT"], tmp_path / "hw", pace_ms=1.0,
                     questdb_url=questdb_server.url, visible_pace_ms=10.0)  # fmt: skip
    try:
        assert watch.wait_ready()
        time.sleep(0.5)  # connected: now blocking in XREAD
        with Sender.from_conf(ilp_conf(questdb_server.url)) as sender:
            for trade_id in range(6):
                now = time.time_ns() // 1000
                client.xadd(keys.trades_key("HWVISUSDT"), _trade("HWVISUSDT", trade_id, now))
                time.sleep(delay_s)
                buf = sender.new_buffer()
                ilp_trade(buf, "binance_spot", "HWVISUSDT", "BUY", 1.0, 1.0, trade_id, now, now)
                sender.flush(buf, transactional=True)
                time.sleep(0.3)  # the follower sees it and pauses: the next entry finds it waiting again
    finally:
        samples = watch.stop()
        client.close()
        asyncio.run(qdb.close())
    values = samples["questdb"]
    assert len(values) >= 3, values
    assert all(delay_s * 1e6 <= v < 5e6 for v in values), values
    assert hop_table(samples)["questdb"]["n"] == len(values)


def test_a_trade_never_visible_counts_at_the_timeout(
    redis_server: RedisServer, questdb_server: QuestDBServer, tmp_path: Path
) -> None:
    """A trade that never reaches QuestDB (a stalled writer) is a sample at the timeout, a lower bound, not a
    sample left out: otherwise the visibility percentiles would look better the worse the writer does."""
    client = redis.Redis.from_url(redis_server.url)
    qdb = QuestDBHttp(questdb_server.url)
    asyncio.run(_exec(qdb, TRADES_DDL))
    watch = HopWatch(redis_server.url, redis_server.url, ["HWGONEUSDT"], tmp_path / "hw", pace_ms=1.0,
                     questdb_url=questdb_server.url, visible_pace_ms=10.0, visible_timeout_s=0.5)  # fmt: skip
    try:
        assert watch.wait_ready()
        time.sleep(0.5)  # connected: now blocking in XREAD
        for trade_id in range(3):
            client.xadd(keys.trades_key("HWGONEUSDT"), _trade("HWGONEUSDT", trade_id, time.time_ns() // 1000))
            time.sleep(0.8)  # past the timeout: the follower gives up on it and waits for the next one
    finally:
        samples = watch.stop()
        client.close()
        asyncio.run(qdb.close())
    values = samples["questdb"]
    assert len(values) >= 2, values
    assert all(0.5e6 <= v < 2e6 for v in values), values
    assert json.loads((tmp_path / "hw" / "questdb.json").read_text())["timed_out"] == len(values)


def _trade(symbol: str, trade_id: int, now_us: int) -> dict[str | bytes, str | int]:
    """A per-symbol stream entry of a trade received (and made) at `now_us`."""
    return {"symbol": symbol, "exchange": "binance_spot", "type": "TRADE", "price": "1", "volume": "1", "side": "BUY",
            "timestamp": now_us, "trade_id": trade_id, "recv_ts": now_us}  # fmt: skip


async def _exec(qdb: QuestDBHttp, sql: str) -> None:
    await qdb.exec(sql)


def test_a_harness_stopped_by_sigterm_leaves_no_follower_running(redis_server: RedisServer, tmp_path: Path) -> None:
    """A load test stopped by SIGTERM before the end of its window (the watch never reached `stop()`) takes its
    followers and pinger with it: they outlived such a run once and polled a Redis that was gone."""
    script = f"""
import sys, time
from pathlib import Path
from tickbridge_dev.devstack.hopwatch import HopWatch
from tickbridge_dev.devstack.servers import stop_on_signals
stop_on_signals()
watch = HopWatch({redis_server.url!r}, {redis_server.url!r}, ["BTCUSDT"], Path({str(tmp_path / "hw")!r}))
print(" ".join(map(str, watch.pids())), flush=True)
watch.wait_ready()
print("ready", flush=True)
time.sleep(60)
"""
    harness = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert harness.stdout is not None
        pids = [int(p) for p in harness.stdout.readline().split()]
        assert len(pids) == 5 and harness.stdout.readline().strip() == "ready"
        harness.send_signal(signal.SIGTERM)
        harness.wait(timeout=20)
    finally:
        harness.kill()
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A zombie of the harness's (reaped by init shortly) has exited too: only a live one fails.
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        assert state == "Z", f"follower {pid} still running after the harness stopped"
