"""Collector against the simulator: the real captures replayed, and faults with a zero-loss oracle."""

from __future__ import annotations

import asyncio
import functools
import gzip
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from conftest import eventually
from test_collector_parser import capture_lines, rebuild_offline
from tickbridge.collector.service import Collector
from tickbridge.core import keys
from tickbridge.core.settings import Settings
from tickbridge.core.tick import DepthDiff, Trade
from tickbridge.core.wire import decode_entry
from tickbridge_dev.devstack.servers import RedisServer
from tickbridge_dev.sim import SimConfig, SimServer

pytestmark = pytest.mark.timeout(90)

SYMBOLS = ("BTCUSDT", "ETHUSDT")


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def read_stream(client: Any) -> list[Trade | DepthDiff]:
    ticks: list[Trade | DepthDiff] = []
    last = "-"
    while True:
        batch = await client.xrange(keys.DEFAULT_STREAM_KEY, min=last, count=10_000)
        if last != "-":
            batch = batch[1:]
        if not batch:
            return ticks
        ticks += [
            decode_entry(f) for _, f in batch if f.get(b"type") not in (b"BOOK", b"RESYNC")
        ]  # whole books, resets: no ticks
        last = batch[-1][0]


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Any]:
    c: Any = aioredis.Redis.from_url(redis_server.url)
    yield c
    await c.aclose()


async def run_collector(
    settings: Settings, registry: CollectorRegistry, **kw: Any
) -> tuple[Collector, asyncio.Task[None]]:
    collector = Collector(settings, registry, **kw)
    task = asyncio.create_task(collector.run())
    await asyncio.wait_for(collector.started.wait(), 10)
    return collector, task


async def stop_collector(collector: Collector, task: asyncio.Task[None]) -> None:
    collector.request_stop()
    await asyncio.wait_for(task, 20)


async def test_replay_of_real_captures(binance_data: Path, redis_server: RedisServer, client: Any) -> None:
    files = (binance_data / "ethusdt_20240808.gz", binance_data / "ethusdt_20240809.gz")
    sim = SimServer(SimConfig(mode="replay", replay_files=files, speed=0.0, symbols=("ETHUSDT",)))
    await sim.start()
    registry = CollectorRegistry()
    settings = Settings(
        binance_ws_url=sim.ws_url, binance_rest_url=sim.rest_url, symbols=("ETHUSDT",),
        vps_redis_url=redis_server.url, depth_snapshot_limit=5000,
    )  # fmt: skip
    collector, task = await run_collector(settings, registry)
    try:
        await eventually(lambda: _true(sim.replay_done), timeout=60, what="replay finished")
        await eventually(lambda: _true(collector.last_trade.get("ETHUSDT") == 1520553439), what="last trade")
        lid, bids, asks, _ = rebuild_offline(capture_lines(binance_data))
        await eventually(lambda: _true(collector.book("ETHUSDT").last_update_id == lid), what="last depth event")
        await eventually(
            lambda: _true(collector.publisher is not None and collector.publisher.queue.empty()), what="drain"
        )
    finally:
        await stop_collector(collector, task)
        await sim.stop()
    expected: dict[int, dict[str, Any]] = {}
    for name in files:
        with gzip.open(name, "rb") as fh:
            for line in fh:
                msg = orjson.loads(line.split(b" ", 1)[1])
                if msg.get("stream", "").endswith("@trade"):
                    expected[msg["data"]["t"]] = msg["data"]
    ticks = await read_stream(client)
    trades = [t for t in ticks if isinstance(t, Trade)]
    assert [t.trade_id for t in trades] == sorted(expected)  # each exactly once, in order
    for t in trades:
        raw = expected[t.trade_id]
        assert (t.symbol, t.price, t.volume, t.timestamp) == ("ETHUSDT", raw["p"], raw["q"], raw["T"] * 1000)
        assert t.side == ("SELL" if raw["m"] else "BUY")
    book = collector.book("ETHUSDT")
    assert book.last_update_id == lid and book.bids == bids and book.asks == asks
    depth = [t for t in ticks if isinstance(t, DepthDiff)]
    assert all(b.first_update_id == a.last_update_id + 1 for a, b in itertools.pairwise(depth))
    assert depth[-1].last_update_id == lid
    for metric in ("trade_gaps", "depth_gaps", "resyncs", "backfilled_trades", "lost_trades"):
        assert value(registry, f"tickbridge_collector_{metric}_total", symbol="ETHUSDT") == 0, metric
    assert value(registry, "tickbridge_collector_book_valid", symbol="ETHUSDT") == 1
    warm = await client.zrange(keys.warm_key("ETHUSDT"), 0, 0, withscores=True)
    assert warm and warm[0][1] >= trades[-1].timestamp - 300_000_000  # trimmed to 5 minutes


async def check_exactly_once(sim: SimServer, collector: Collector, client: Any) -> dict[str, list[int]]:
    """Pause the sim, let the collector catch up, then every symbol's trade IDs are contiguous, no repeats."""
    sim.pause()
    stats = sim.stats()["symbols"]
    ids: dict[str, list[int]] = defaultdict(list)

    async def caught_up() -> bool:
        ids.clear()
        for t in await read_stream(client):
            if isinstance(t, Trade):
                ids[t.symbol].append(t.trade_id)
        return all(ids[s] and ids[s][-1] == stats[s]["last_trade_id"] for s in SYMBOLS)

    await eventually(caught_up, what="every trade the sim generated is in the stream")
    for sym in SYMBOLS:
        got = ids[sym]
        assert got == list(range(got[0], stats[sym]["last_trade_id"] + 1)), f"{sym}: lost, duplicated or reordered"
    return ids


async def caught_up(sim: SimServer, collector: Collector) -> None:
    """Wait until the collector has appended every trade the sim had generated when this was called."""
    stats = sim.stats()["symbols"]
    for sym in SYMBOLS:
        target = stats[sym]["last_trade_id"]
        await eventually(functools.partial(_last_at_least, collector, sym, target), what=f"{sym} caught up")
        book_target = stats[sym]["last_update_id"]
        await eventually(functools.partial(_book_at_least, collector, sym, book_target), what=f"{sym} book")


def synthetic(**kw: Any) -> SimServer:
    return SimServer(SimConfig(symbols=SYMBOLS, rate=1000.0, seed=7, weights="even", **kw))


def settings_for(sim: SimServer, redis_server: RedisServer, **kw: Any) -> Settings:
    return Settings(
        binance_ws_url=sim.ws_url, binance_rest_url=sim.rest_url, symbols=SYMBOLS, vps_redis_url=redis_server.url,
        **kw,
    )  # fmt: skip


async def test_faults_lose_and_duplicate_nothing(redis_server: RedisServer, client: Any) -> None:
    sim = synthetic(shutdown_grace_s=1.0)
    await sim.start()
    registry = CollectorRegistry()
    collector, task = await run_collector(settings_for(sim, redis_server), registry, join_timeout_s=3.0)
    try:
        await eventually(lambda: _true(all(collector.book_valid(s) for s in SYMBOLS)), what="books valid")
        # A skipped update ID: only that book resyncs.
        sim.skip_update_ids("BTCUSDT", 3)
        await eventually(
            lambda: _true(value(registry, "tickbridge_collector_resyncs_total", symbol="BTCUSDT") == 1), what="resync"
        )
        await eventually(lambda: _true(collector.book_valid("BTCUSDT")), what="BTC valid again")
        assert value(registry, "tickbridge_collector_resyncs_total", symbol="ETHUSDT") == 0
        # Trades missing from the WebSocket are back-filled from REST before the next one is appended.
        sim.skip_trade_ids("ETHUSDT", 7)
        await eventually(
            lambda: _true(value(registry, "tickbridge_collector_backfilled_trades_total", symbol="ETHUSDT") >= 7),
            what="back-fill",
        )
        # Forced disconnects, one during a burst.
        for i, burst in enumerate((0, 3000)):
            if burst:
                sim.burst(burst)
                await asyncio.sleep(0.05)
            sim.drop_connections()
            await eventually(functools.partial(_reconnected, registry, i + 1), what="reconnected")
        assert value(registry, "tickbridge_collector_reconnects_total", reason="disconnect") >= 2
        # serverShutdown: make-before-break, the old connection closes after the grace period.
        await caught_up(sim, collector)  # the last reconnect's back-fill is done before we count
        gaps_before = sum(value(registry, "tickbridge_collector_trade_gaps_total", symbol=s) for s in SYMBOLS)
        resyncs_before = sum(value(registry, "tickbridge_collector_resyncs_total", symbol=s) for s in SYMBOLS)
        sim.server_shutdown()
        await eventually(
            lambda: _true(value(registry, "tickbridge_collector_reconnects_total", reason="server_shutdown") == 1),
            what="rotation on serverShutdown",
        )
        await eventually(lambda: _true(len(collector.conns) == 1), what="old connection retired")
        await asyncio.sleep(0.5)
        gaps_after = sum(value(registry, "tickbridge_collector_trade_gaps_total", symbol=s) for s in SYMBOLS)
        assert gaps_after == gaps_before  # the overlap covered everything
        assert sum(value(registry, "tickbridge_collector_resyncs_total", symbol=s) for s in SYMBOLS) == resyncs_before
        assert value(registry, "tickbridge_collector_reconnects_total", reason="disconnect") == 2
        await check_exactly_once(sim, collector, client)
        assert value(registry, "tickbridge_collector_lost_trades_total", symbol="ETHUSDT") == 0
    finally:
        await stop_collector(collector, task)
        await sim.stop()


async def test_rotation_before_lifetime_is_seamless(redis_server: RedisServer, client: Any) -> None:
    sim = synthetic(lifetime_s=3.0)
    await sim.start()
    registry = CollectorRegistry()
    settings = settings_for(sim, redis_server, ws_max_lifetime_s=1.5)
    collector, task = await run_collector(settings, registry, join_timeout_s=1.0)
    invalid: list[str] = []

    async def watch_books() -> None:  # a rotation keeps continuity: no book may go invalid, not even briefly
        while True:
            invalid.extend(s for s in SYMBOLS if not collector.book_valid(s))
            await asyncio.sleep(0.002)

    watcher: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: _true(all(collector.book_valid(s) for s in SYMBOLS)), what="books valid")
        watcher = asyncio.create_task(watch_books())
        await eventually(
            lambda: _true(value(registry, "tickbridge_collector_reconnects_total", reason="lifetime") >= 3),
            timeout=20,
            what="three rotations",
        )
        assert not invalid, invalid
        await check_exactly_once(sim, collector, client)
        for sym in SYMBOLS:
            assert value(registry, "tickbridge_collector_trade_gaps_total", symbol=sym) == 0
            assert value(registry, "tickbridge_collector_resyncs_total", symbol=sym) == 0
        assert value(registry, "tickbridge_collector_reconnects_total", reason="disconnect") == 0
        assert value(registry, "tickbridge_collector_duplicates_total", type="TRADE") > 0  # the overlap happened
        # Book updates too: each symbol's DEPTH entries chain U == previous u + 1 across every rotation.
        chains: dict[str, list[DepthDiff]] = defaultdict(list)
        for t in await read_stream(client):
            if isinstance(t, DepthDiff):
                chains[t.symbol].append(t)
        for sym in SYMBOLS:
            assert len(chains[sym]) > 20
            assert all(b.first_update_id == a.last_update_id + 1 for a, b in itertools.pairwise(chains[sym])), sym
    finally:
        if watcher is not None:
            watcher.cancel()
        await stop_collector(collector, task)
        await sim.stop()


async def _true(v: bool) -> bool:
    return v


async def _last_at_least(collector: Collector, symbol: str, n: int) -> bool:
    return collector.last_trade.get(symbol, 0) >= n


async def _book_at_least(collector: Collector, symbol: str, n: int) -> bool:
    return collector.book_valid(symbol) and collector.book(symbol).last_update_id >= n


async def _reconnected(registry: CollectorRegistry, n: int) -> bool:
    return (
        value(registry, "tickbridge_collector_reconnects_total", reason="disconnect") == n
        and value(registry, "tickbridge_collector_connection_up") == 1
    )


async def test_answers_pings_and_reconnects_a_stale_stream(redis_server: RedisServer, client: Any) -> None:
    sim = synthetic(ping_interval_s=0.2, pong_timeout_s=0.6)  # no pong in 0.6 s: the sim closes (1008)
    await sim.start()
    registry = CollectorRegistry()
    collector, task = await run_collector(settings_for(sim, redis_server, ws_stale_timeout_s=1.0), registry)
    try:
        await eventually(lambda: _true(all(collector.book_valid(s) for s in SYMBOLS)), what="books valid")
        first = next(iter(collector.conns))
        await asyncio.sleep(2.0)  # several ping intervals and pong timeouts: the connection must survive them
        assert list(collector.conns) == [first]
        assert value(registry, "tickbridge_collector_reconnects_total", reason="disconnect") == 0
        sim.stall(2.5)  # silence longer than ws_stale_timeout_s: the watchdog replaces the connection
        await eventually(
            lambda: _true(value(registry, "tickbridge_collector_reconnects_total", reason="stale") >= 1),
            what="stale reconnect",
        )
        # Let the rotations the stall set off finish (one connection, data flowing) before pausing the sim:
        # with a 1 s stale timeout a paused sim would otherwise keep replacing a half-joined connection.
        await eventually(lambda: _true(len(collector.conns) == 1 and not sim.stalled), what="rotation settled")
        await asyncio.sleep(0.5)
        await eventually(lambda: _true(len(collector.conns) == 1), what="rotation settled")
        await check_exactly_once(sim, collector, client)
    finally:
        await stop_collector(collector, task)
        await sim.stop()


async def test_kill_9_and_restart_lose_and_duplicate_nothing(
    redis_server: RedisServer, client: Any, tmp_path: Path
) -> None:
    """A collector process killed with SIGKILL; the next one resumes from the hash and back-fills the gap."""
    import os
    import signal
    import sys

    sim = synthetic()
    await sim.start()
    env = {
        **os.environ, "BINANCE_WS_URL": sim.ws_url, "BINANCE_REST_URL": sim.rest_url, "SYMBOLS": ",".join(SYMBOLS),
        "VPS_REDIS_URL": redis_server.url, "METRICS_PORT": "0", "LOG_LEVEL": "WARNING",
    }  # fmt: skip
    cmd = [sys.executable, "-m", "tickbridge", "collector"]
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, cwd=tmp_path)
    try:
        await eventually(lambda: _gt(client.xlen(keys.DEFAULT_STREAM_KEY), 500), what="first collector writing")
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await asyncio.sleep(1.0)  # trades keep coming while no collector runs
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, cwd=tmp_path)
        before = await client.xlen(keys.DEFAULT_STREAM_KEY)
        await eventually(lambda: _gt(client.xlen(keys.DEFAULT_STREAM_KEY), before + 500), what="second collector")
        sim.pause()
        stats = sim.stats()["symbols"]

        async def complete() -> bool:
            last = await client.hgetall(keys.COLLECTOR_LAST_TRADE_IDS)
            return all(int(last.get(s.encode(), 0)) == stats[s]["last_trade_id"] for s in SYMBOLS)

        await eventually(complete, what="every trade appended")
        ids: dict[str, list[int]] = defaultdict(list)
        for t in await read_stream(client):
            if isinstance(t, Trade):
                ids[t.symbol].append(t.trade_id)
        for sym in SYMBOLS:
            assert ids[sym] == list(range(ids[sym][0], stats[sym]["last_trade_id"] + 1)), sym
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)
        await sim.stop()


async def _gt(coro: Any, n: int) -> bool:
    return int(await coro) > n


async def test_redis_restart_loses_and_duplicates_nothing(
    redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    """Redis killed and restarted (AOF always) under load: the writer retries its batch exactly once."""
    redis_server = redis_factory(appendonly=True, appendfsync="always")
    client: Any = aioredis.Redis.from_url(redis_server.url)
    sim = synthetic()
    await sim.start()
    registry = CollectorRegistry()
    collector, task = await run_collector(settings_for(sim, redis_server), registry)
    try:
        await eventually(functools.partial(_xlen_over, client, 300), what="ticks flowing")
        await asyncio.to_thread(redis_server.kill9)
        await asyncio.sleep(1.0)  # the writer fails and retries; the reader fills the bounded queues
        await asyncio.to_thread(redis_server.restart)
        await client.aclose()
        client = aioredis.Redis.from_url(redis_server.url)  # the old pooled connection died with the server
        await eventually(
            lambda: _true(value(registry, "tickbridge_collector_redis_errors_total") >= 1), what="errors seen"
        )
        await check_exactly_once(sim, collector, client)
    finally:
        await stop_collector(collector, task)
        await sim.stop()
        await client.aclose()


async def _xlen_over(client: Any, n: int) -> bool:
    return int(await client.xlen(keys.DEFAULT_STREAM_KEY)) > n


async def test_keeps_trying_until_the_exchange_is_up(redis_server: RedisServer, client: Any) -> None:
    from tickbridge_dev.devstack.servers import free_port

    port = free_port()
    registry = CollectorRegistry()
    settings = Settings(
        binance_ws_url=f"ws://127.0.0.1:{port}", binance_rest_url=f"http://127.0.0.1:{port}", symbols=SYMBOLS,
        vps_redis_url=redis_server.url,
    )  # fmt: skip
    collector = Collector(settings, registry, reconnect_base_s=0.05)
    task = asyncio.create_task(collector.run())
    sim = SimServer(SimConfig(symbols=SYMBOLS, rate=500.0, seed=3, port=port))
    try:
        await eventually(
            lambda: _true(value(registry, "tickbridge_collector_connect_failures_total") >= 3), what="failed attempts"
        )
        assert value(registry, "tickbridge_collector_connection_up") == 0
        await sim.start()
        await eventually(lambda: _true(all(collector.book_valid(s) for s in SYMBOLS)), what="connected, books valid")
        # A symbol whose only trades came before the first connection has none to check yet (a fresh
        # collector does not back-fill what it never saw): pausing then would wait for ever.
        await eventually(lambda: _true(all(s in collector.last_trade for s in SYMBOLS)), what="a trade of each")
        await check_exactly_once(sim, collector, client)
    finally:
        await stop_collector(collector, task)
        await sim.stop()
