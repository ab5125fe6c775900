"""Collector end to end against a scripted exchange (exact frames) and a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry

import tickbridge.collector.service as collector_service
from conftest import equals, eventually
from tickbridge.collector.rest import DEPTH_ENDPOINT, HISTORICAL_TRADES_ENDPOINT, RestCallFailed
from tickbridge.collector.service import Collector
from tickbridge.core import keys
from tickbridge.core.settings import Settings
from tickbridge.core.tick import DepthDiff, Trade
from tickbridge.core.wire import decode_entry, now_us
from tickbridge_dev.devstack.servers import RedisServer

pytestmark = pytest.mark.timeout(60)

T0 = 1723161255342


class ScriptedExchange:
    """A Binance-shaped server whose frames the test writes by hand (bad input, exact sequences)."""

    def __init__(self) -> None:
        self.clients: list[web.WebSocketResponse] = []
        self.connected = asyncio.Event()
        self.snapshot: dict[str, Any] = {"lastUpdateId": 100, "bids": [["10.0", "1.0"]], "asks": [["11.0", "2.0"]]}
        self.history: dict[int, dict[str, Any]] = {}
        self.history_gate = asyncio.Event()  # historicalTrades answers once this is set
        self.history_gate.set()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/stream", self._ws)
        app.router.add_get("/api/v3/depth", self._depth)
        app.router.add_get("/api/v3/historicalTrades", self._trades)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.history_gate.set()  # a handler still waiting on it would hold up the cleanup
        for ws in self.clients:
            await ws.close()
        assert self.runner is not None
        await self.runner.cleanup()

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.clients.append(ws)
        self.connected.set()
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
        return ws

    async def _depth(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot)

    async def _trades(self, request: web.Request) -> web.Response:
        await self.history_gate.wait()
        start, limit = int(request.query["fromId"]), int(request.query["limit"])
        rows = [self.history[i] for i in range(start, start + limit) if i in self.history]
        return web.json_response(rows)

    async def drop(self) -> None:
        """Close every connection from the exchange's side (no serverShutdown first)."""
        for ws in self.clients:
            if not ws.closed:
                await ws.close()

    async def send(self, *frames: bytes | str) -> None:
        for ws in self.clients:
            if not ws.closed:
                for f in frames:
                    await (ws.send_bytes(f) if isinstance(f, bytes) else ws.send_str(f))


def trade(tid: int, symbol: str = "BTCUSDT", maker: bool = False, time_ms: int | None = None) -> bytes:
    t = T0 + tid if time_ms is None else time_ms
    data = {"e": "trade", "E": t, "s": symbol, "t": tid, "p": f"{100 + tid}.50000000", "q": "0.01000000",
            "T": t, "m": maker, "M": True}  # fmt: skip
    return orjson.dumps({"stream": f"{symbol.lower()}@trade", "data": data})


def history_row(tid: int, time_ms: int | None = None) -> dict[str, Any]:
    t = T0 + tid if time_ms is None else time_ms
    return {"id": tid, "price": f"{100 + tid}.50000000", "qty": "0.01000000", "quoteQty": "1", "time": t,
            "isBuyerMaker": tid % 2 == 0, "isBestMatch": True}  # fmt: skip


def depth(first: int, last: int, bids: list[list[str]] | None = None, symbol: str = "BTCUSDT") -> bytes:
    data = {"e": "depthUpdate", "E": T0 + last, "s": symbol, "U": first, "u": last, "b": bids or [], "a": []}
    return orjson.dumps({"stream": f"{symbol.lower()}@depth@100ms", "data": data})


@pytest.fixture
async def exchange() -> AsyncIterator[ScriptedExchange]:
    ex = ScriptedExchange()
    await ex.start()
    yield ex
    await ex.stop()


def settings_for(ex: ScriptedExchange, redis_server: RedisServer, **kw: Any) -> Settings:
    return Settings(
        binance_ws_url=f"ws://127.0.0.1:{ex.port}", binance_rest_url=f"http://127.0.0.1:{ex.port}",
        symbols=("BTCUSDT", "ETHUSDT"), vps_redis_url=redis_server.url, **kw,
    )  # fmt: skip


async def stream_ticks(client: Any, key: str = keys.DEFAULT_STREAM_KEY) -> list[Trade | DepthDiff]:
    """The ticks in the stream (whole-book entries, issue 17, left out)."""
    entries = await client.xrange(key)
    return [decode_entry(fields) for _, fields in entries if fields.get(b"type") not in (b"BOOK", b"RESYNC")]


async def trade_ids(client: Any) -> list[int]:
    return [t.trade_id for t in await stream_ticks(client) if isinstance(t, Trade)]


def count(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def start(settings: Settings, registry: CollectorRegistry, **kw: Any) -> tuple[Collector, asyncio.Task[None]]:
    collector = Collector(settings, registry, **kw)
    task = asyncio.create_task(collector.run())
    await asyncio.wait_for(collector.started.wait(), 10)
    return collector, task


async def stop(collector: Collector, task: asyncio.Task[None]) -> None:
    collector.request_stop()
    await asyncio.wait_for(task, 15)


async def test_bad_input_never_crashes_nor_loses_good_ticks(
    exchange: ScriptedExchange, redis_server: RedisServer
) -> None:
    client: Any = aioredis.Redis.from_url(redis_server.url)
    registry = CollectorRegistry()
    collector, task = await start(settings_for(exchange, redis_server), registry)
    await eventually(lambda: _true(exchange.connected.is_set()), what="connection")
    good = {"e": "trade", "E": T0, "s": "BTCUSDT", "t": 9, "p": "1.0", "q": "1.0", "T": T0, "m": True, "M": True}
    await exchange.send(
        trade(1),
        b'{"stream":"btcusdt@trade","data":{"e":"trade"',  # truncated JSON
        trade(2),
        orjson.dumps({"stream": "btcusdt@trade", "data": {k: v for k, v in good.items() if k != "p"}}),  # missing
        orjson.dumps({"stream": "btcusdt@trade", "data": {**good, "t": "9"}}),  # wrong type
        orjson.dumps({"stream": "btcusdt@trade", "data": {**good, "e": "blockTrade"}}),  # unknown event
        orjson.dumps({"stream": "btcusdt@kline_1m", "data": {"e": "kline"}}),  # unexpected stream
        orjson.dumps({"stream": "dogeusdt@trade", "data": {**good, "s": "DOGEUSDT"}}),  # not subscribed
        b"[]",
        "\x00not json at all",
        trade(3, maker=True),
        b'{"stream":"btcusdt@trade","data":{"pad":"' + b"x" * ((3 << 20) // 2) + b'"}}',  # 1.5 MiB frame
        b'{"result":null,"id":1}',  # a control reply: ignored, not dead-lettered
        trade(4),
    )
    await eventually(lambda: equals(trade_ids(client), [1, 2, 3, 4]), what="trades 1..4")
    dead = await client.xrange(keys.COLLECTOR_DEAD_LETTER)
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert sorted(reasons) == sorted(
        ["json", "schema", "schema", "unknown_event", "unknown_stream", "unknown_symbol", "not_object", "json",
         "oversized"]
    )  # fmt: skip
    oversized = next(f for _, f in dead if f[b"reason"] == b"oversized")
    assert len(oversized[b"raw"]) == 4096 and oversized[b"raw"].startswith(b'{"stream":"btcusdt@trade"')
    assert count(registry, "tickbridge_collector_dead_letters_total", reason="schema") == 2
    assert not task.done()
    ticks = await stream_ticks(client)
    t3 = next(t for t in ticks if isinstance(t, Trade) and t.trade_id == 3)
    assert (t3.side, t3.price, t3.volume, t3.timestamp) == ("SELL", "103.50000000", "0.01000000", (T0 + 3) * 1000)
    assert [t.trade_id for t in collector.hot("BTCUSDT") if isinstance(t, Trade)] == [1, 2, 3, 4]
    warm = await client.zrange(keys.warm_key("BTCUSDT"), 0, -1)
    assert len(warm) == 4 and warm[0].startswith(b"1|101.50000000|0.01000000|BUY|")
    await stop(collector, task)


async def test_depth_sync_gap_resync_and_trade_backfill_across_restart(
    exchange: ScriptedExchange, redis_server: RedisServer
) -> None:
    client: Any = aioredis.Redis.from_url(redis_server.url)
    registry = CollectorRegistry()
    settings = settings_for(exchange, redis_server)
    collector, task = await start(settings, registry)
    await eventually(lambda: _true(exchange.connected.is_set()), what="connection")
    # Buffered from the stream start: 95..99 is dropped (u <= 100), 99..103 straddles lastUpdateId + 1.
    await exchange.send(depth(95, 99), depth(99, 103, [["10.0", "3.0"]]), trade(10), trade(11))
    await eventually(lambda: _true(collector.book_valid("BTCUSDT")), what="book synced")
    await exchange.send(depth(104, 105, [["9.0", "1.0"]]), depth(104, 105), trade(11), trade(14))
    exchange.history = {i: history_row(i) for i in range(1, 100)}
    await eventually(lambda: equals(trade_ids(client), [10, 11, 12, 13, 14]), what="back-filled 12, 13")
    assert count(registry, "tickbridge_collector_trade_gaps_total", symbol="BTCUSDT") == 1
    assert count(registry, "tickbridge_collector_backfilled_trades_total", symbol="BTCUSDT") == 2
    assert collector.book("BTCUSDT").snapshot() == (105, [("10.0", "3.0"), ("9.0", "1.0")], [("11.0", "2.0")])
    # A skipped update ID: only BTCUSDT resyncs; ETHUSDT stays valid.
    exchange.snapshot = {"lastUpdateId": 50, "bids": [["1.0", "1.0"]], "asks": [["2.0", "1.0"]]}
    await exchange.send(depth(40, 51, symbol="ETHUSDT"))
    await eventually(lambda: _true(collector.book_valid("ETHUSDT")), what="ETH synced")
    exchange.snapshot = {"lastUpdateId": 108, "bids": [["8.0", "1.0"]], "asks": [["12.0", "1.0"]]}
    await exchange.send(depth(107, 109, [["8.5", "1.0"]]))  # 106 is missing
    await eventually(lambda: _true(collector.book("BTCUSDT").last_update_id == 109), what="BTC resynced")
    assert collector.book_valid("BTCUSDT")
    assert collector.book("BTCUSDT").snapshot() == (109, [("8.5", "1.0"), ("8.0", "1.0")], [("12.0", "1.0")])
    assert count(registry, "tickbridge_collector_resyncs_total", symbol="BTCUSDT") == 1
    assert count(registry, "tickbridge_collector_resyncs_total", symbol="ETHUSDT") == 0
    depth_ids = [(t.first_update_id, t.last_update_id) for t in await stream_ticks(client) if isinstance(t, DepthDiff)]
    assert depth_ids == [(99, 103), (104, 105), (40, 51), (107, 109)]
    await stop(collector, task)
    # A new process resumes from the hash: trades 15..19 came while it was down.
    registry2 = CollectorRegistry()
    collector, task = await start(settings, registry2)
    await eventually(lambda: _true(len(exchange.clients) == 2), what="second connection")
    await exchange.send(trade(20), trade(21))
    await eventually(lambda: equals(trade_ids(client), list(range(10, 22))), what="restart back-fill")
    assert count(registry2, "tickbridge_collector_backfilled_trades_total", symbol="BTCUSDT") == 5
    await stop(collector, task)


async def _true(value: bool) -> bool:
    return value


def test_bad_configuration_exits_with_one_line(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "SYMBOLS": "BTCUSDT,btc-usdt", "METRICS_PORT": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "tickbridge", "collector"], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("config error: SYMBOLS:") and len(proc.stderr.strip().splitlines()) == 1


async def test_frame_over_the_websocket_limit_reconnects_without_loss(
    exchange: ScriptedExchange, redis_server: RedisServer
) -> None:
    """Above the parser's limit frames are dead-lettered; above the socket's own limit (16 MiB) the
    connection closes with 1009: counted, reconnected, and the trade sent meanwhile is back-filled."""
    client: Any = aioredis.Redis.from_url(redis_server.url)
    registry = CollectorRegistry()
    collector, task = await start(settings_for(exchange, redis_server), registry)
    await eventually(lambda: _true(exchange.connected.is_set()), what="connection")
    exchange.history = {i: history_row(i) for i in range(1, 10)}
    await exchange.send(trade(1))
    await eventually(lambda: equals(trade_ids(client), [1]), what="trade 1")
    with contextlib.suppress(ConnectionError):  # the collector closes the socket as soon as it sees the size
        await exchange.send(b'{"stream":"btcusdt@trade","data":"' + b"x" * (17 << 20) + b'"}', trade(2))
    await eventually(lambda: _true(len(exchange.clients) == 2), what="reconnected")
    await exchange.send(trade(3))
    await eventually(lambda: equals(trade_ids(client), [1, 2, 3]), what="trades 1..3")
    assert count(registry, "tickbridge_collector_dead_letters_total", reason="oversized") == 1
    assert count(registry, "tickbridge_collector_reconnects_total", reason="disconnect") == 1
    await stop(collector, task)


@contextlib.asynccontextmanager
async def rest_server(routes: dict[str, Any]) -> AsyncIterator[str]:
    """A scripted REST exchange (`path -> handler`) on a free port; yields its base URL."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def rest_exchange(routes: dict[str, Any]) -> AsyncIterator[Any]:
    """A scripted REST exchange (`path -> handler`) on a free port and a `RestClient` pointed at it."""
    from tickbridge.collector.rest import RestClient

    async with rest_server(routes) as url:
        rest = RestClient(url)
        try:
            yield rest
        finally:
            await rest.close()


async def test_rest_client_honours_retry_after_and_weight_budget() -> None:
    import time

    from tickbridge.collector.rest import WeightBudget

    calls: list[float] = []

    async def depth(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return web.json_response({"code": -1003, "msg": "Too much request weight used"}, status=429,
                                     headers={"Retry-After": "1"})  # fmt: skip
        return web.json_response({"lastUpdateId": 7, "bids": [], "asks": []})

    async def bad(request: web.Request) -> web.Response:
        return web.json_response({"code": -1121, "msg": "Invalid symbol."}, status=400)

    async with rest_exchange({"/api/v3/depth": depth, "/api/v3/historicalTrades": bad}) as rest:
        assert (await rest.depth("BTCUSDT", 1000))["lastUpdateId"] == 7
        assert len(calls) == 2 and calls[1] - calls[0] >= 0.95  # waited for Retry-After
        with pytest.raises(RestCallFailed, match="HTTP 400"):  # a client error is not retried
            await rest.historical_trades("BTCUSDT", 1)
        # This minute's weight spent (1-s "minutes" here): the next call waits for the next one.
        rest.budget = WeightBudget(window_s=1.0, skew_s=0.0)
        rest.budget.observe(rest.budget.limit)
        window = rest.budget.window
        await rest.depth("BTCUSDT", 1000)  # weight 50
        assert rest.budget.window > window and rest.budget.used >= 50


@pytest.mark.parametrize("phase", [0.5, 0.01], ids=["mid-minute", "inside-the-skew"])
async def test_restarted_client_spends_only_what_the_exchange_has_left(phase: float) -> None:
    """A collector restarted within a minute its previous run nearly spent: the first answer's
    `X-MBX-USED-WEIGHT-1M` tells it, so 40 concurrent snapshots (2,000 weight over a 300-per-window
    exchange) all arrive without a single 429 (repeated 429s earn a 418 IP ban on Binance). Also when it
    starts just after the exchange's minute began but before its own (skewed) minute did."""
    import time

    from tickbridge.collector.rest import WeightBudget

    window_s, limit = 1.0, 300
    await asyncio.sleep((phase - time.time() % window_s) % window_s)
    used: dict[int, int] = {int(time.time() // window_s): 250}  # the previous run's spending this window
    answers: list[int] = []

    async def depth(request: web.Request) -> web.Response:
        window = int(time.time() // window_s)
        if used.get(window, 0) + 50 > limit:
            answers.append(429)
            headers = {"Retry-After": "1", "X-MBX-USED-WEIGHT-1M": str(used[window])}
            return web.json_response({"code": -1003, "msg": "Too much request weight"}, status=429, headers=headers)
        used[window] = used.get(window, 0) + 50
        answers.append(200)
        return web.json_response(
            {"lastUpdateId": 7, "bids": [], "asks": []}, headers={"X-MBX-USED-WEIGHT-1M": str(used[window])}
        )

    async with rest_exchange({"/api/v3/depth": depth}) as rest:
        # The exchange's limit, all of it ours (share 1.0); our window starts 50 ms after the exchange's.
        rest.budget = WeightBudget(limit, share=1.0, window_s=window_s, skew_s=0.05)
        snaps = await asyncio.gather(*(rest.depth(f"S{i}USDT", 1000) for i in range(40)))
        assert all(s["lastUpdateId"] == 7 for s in snaps)
        assert answers.count(429) == 0, answers
        assert answers.count(200) == 40
        assert all(v <= limit for v in used.values()), used


async def test_waits_for_redis_at_start(exchange: ScriptedExchange, redis_factory: Any) -> None:
    from tickbridge_dev.devstack.servers import free_port

    port = free_port()
    registry = CollectorRegistry()
    settings = Settings(
        binance_ws_url=f"ws://127.0.0.1:{exchange.port}", binance_rest_url=f"http://127.0.0.1:{exchange.port}",
        symbols=("BTCUSDT",), vps_redis_url=f"redis://127.0.0.1:{port}/0",
    )  # fmt: skip
    collector = Collector(settings, registry)
    task = asyncio.create_task(collector.run())
    await eventually(lambda: _true(count(registry, "tickbridge_collector_redis_errors_total") >= 1), what="retrying")
    assert not task.done()
    redis_server = await asyncio.to_thread(redis_factory, port=port)
    await asyncio.wait_for(collector.started.wait(), 20)
    await eventually(lambda: _true(exchange.connected.is_set()), what="connection")
    await exchange.send(trade(1))
    client: Any = aioredis.Redis.from_url(redis_server.url)
    await eventually(lambda: equals(trade_ids(client), [1]), what="trade appended")
    await stop(collector, task)


async def test_backfill_blocks_only_its_symbol(exchange: ScriptedExchange, redis_server: RedisServer) -> None:
    client: Any = aioredis.Redis.from_url(redis_server.url)
    collector, task = await start(settings_for(exchange, redis_server), CollectorRegistry())
    await eventually(lambda: _true(exchange.connected.is_set()), what="connection")
    exchange.history = {i: history_row(i) for i in range(1, 10)}
    exchange.history_gate.clear()  # REST hangs until the test lets it answer
    await exchange.send(trade(1), trade(4), trade(5), trade(1, "ETHUSDT"), trade(2, "ETHUSDT"))

    async def symbols_ids() -> list[tuple[str, int]]:
        return [(t.symbol, t.trade_id) for t in await stream_ticks(client) if isinstance(t, Trade)]

    await eventually(lambda: equals(symbols_ids(), [("BTCUSDT", 1), ("ETHUSDT", 1), ("ETHUSDT", 2)]), what="ETH flows")
    assert [t.trade_id for t in collector.hot("BTCUSDT") if isinstance(t, Trade)] == [1]
    exchange.history_gate.set()
    await eventually(lambda: equals(trade_ids(client), [1, 1, 2, 2, 3, 4, 5]), what="BTC back-filled in order")
    btc = [t.trade_id for t in await stream_ticks(client) if isinstance(t, Trade) and t.symbol == "BTCUSDT"]
    assert btc == [1, 2, 3, 4, 5]
    await stop(collector, task)


def test_counters_that_alerts_watch_exist_at_zero_before_the_first_event() -> None:
    """TradesLost / ExchangeRateLimited / OrderBookResyncStorm use increase(): a series born at 1 shows no
    increase, so the first lost trade or 429 of a process would never alert. They must exist at 0."""
    registry = CollectorRegistry()
    Collector(Settings(symbols=("BTCUSDT", "ETHUSDT")), registry)
    for symbol in ("BTCUSDT", "ETHUSDT"):
        for name in ("lost_trades", "resyncs", "trade_gaps", "depth_gaps", "backfilled_trades"):
            assert registry.get_sample_value(f"tickbridge_collector_{name}_total", {"symbol": symbol}) == 0.0, name
    for endpoint in (DEPTH_ENDPOINT, HISTORICAL_TRADES_ENDPOINT):
        for status in ("429", "418"):
            labels = {"endpoint": endpoint, "status": status}
            assert registry.get_sample_value("tickbridge_collector_rest_requests_total", labels) == 0.0, labels


async def symbols_ids(client: Any) -> list[tuple[str, int]]:
    return [(t.symbol, t.trade_id) for t in await stream_ticks(client) if isinstance(t, Trade)]


@contextlib.asynccontextmanager
async def running(settings: Settings, registry: CollectorRegistry, **kw: Any) -> AsyncIterator[Collector]:
    """A started collector, stopped also when the test fails (a stuck one would hang the fixtures' teardown)."""
    collector, task = await start(settings, registry, **kw)
    try:
        yield collector
    finally:
        await stop(collector, task)


async def test_stuck_backfill_ends_when_the_parked_trades_reach_the_cap(
    exchange: ScriptedExchange, redis_server: RedisServer
) -> None:
    """historicalTrades never answers: once `max_parked` live trades wait behind the back-fill, it is given
    up (the gap counted lost) and the symbol flows again, in order, each trade once; ETH never waited."""
    client: Any = aioredis.Redis.from_url(redis_server.url)
    registry = CollectorRegistry()
    async with running(settings_for(exchange, redis_server), registry, max_parked=5) as collector:
        await eventually(lambda: _true(exchange.connected.is_set()), what="connection")
        exchange.history = {i: history_row(i) for i in range(1, 10)}
        exchange.history_gate.clear()
        await exchange.send(
            trade(1), trade(10), trade(11), trade(1, "ETHUSDT"), trade(12), trade(2, "ETHUSDT"), trade(13)
        )
        frozen = [("BTCUSDT", 1), ("ETHUSDT", 1), ("ETHUSDT", 2)]
        await eventually(lambda: equals(symbols_ids(client), frozen), timeout=10, what="ETH flows, BTC parked")
        assert count(registry, "tickbridge_collector_lost_trades_total", symbol="BTCUSDT") == 0
        await exchange.send(trade(14))  # the fifth parked trade: the cap
        btc = [("BTCUSDT", i) for i in (10, 11, 12, 13, 14)]
        await eventually(lambda: equals(symbols_ids(client), frozen + btc), timeout=10, what="BTC released at the cap")
        assert count(registry, "tickbridge_collector_lost_trades_total", symbol="BTCUSDT") == 8  # 2..9
        assert count(registry, "tickbridge_collector_backfilled_trades_total", symbol="BTCUSDT") == 0
        exchange.history_gate.set()  # a late answer to the abandoned request must add nothing
        await exchange.send(trade(15), trade(3, "ETHUSDT"), trade(16))
        expected = frozen + btc + [("BTCUSDT", 15), ("ETHUSDT", 3), ("BTCUSDT", 16)]
        await eventually(lambda: equals(symbols_ids(client), expected), timeout=10, what="live again")
        assert await client.hget(keys.COLLECTOR_LAST_TRADE_IDS, "BTCUSDT") == b"16"
        assert not collector._parked and count(registry, "tickbridge_collector_trade_gaps_total", symbol="BTCUSDT") == 1
    assert await symbols_ids(client) == expected


async def test_backfilled_trades_leave_the_latency_histogram_alone(
    exchange: ScriptedExchange, redis_server: RedisServer
) -> None:
    """Back-filled trades are a minute old when REST returns them: that is not the stream's latency."""
    client: Any = aioredis.Redis.from_url(redis_server.url)
    registry = CollectorRegistry()
    async with running(settings_for(exchange, redis_server), registry):
        await eventually(lambda: _true(exchange.connected.is_set()), what="connection")
        now_ms = int(time.time() * 1000)
        exchange.history = {i: history_row(i, time_ms=now_ms - 60_000) for i in range(2, 200)}
        live = [1, *range(200, 216)]
        await exchange.send(*(trade(i, time_ms=now_ms) for i in live))
        await eventually(lambda: equals(trade_ids(client), list(range(1, 216))), what="198 back-filled")
        assert count(registry, "tickbridge_collector_backfilled_trades_total", symbol="BTCUSDT") == 198
        n = count(registry, "tickbridge_collector_latency_seconds_count", symbol="BTCUSDT", type="TRADE")
        total = count(registry, "tickbridge_collector_latency_seconds_sum", symbol="BTCUSDT", type="TRADE")
        assert n == len(live)  # every live trade, none of the back-filled ones
        assert total < 5 * n  # each live trade took well under 5 s; a back-filled one would add 60 s
        # The next hop counts every trade appended, back-filled ones included (recv_ts to the confirmed append).
        # It is observed once the publisher has read EXEC's reply, which can come after a reader sees the entries.
        appended = "tickbridge_collector_vps_stream_latency_seconds_count"
        await eventually(lambda: _true(count(registry, appended, symbol="BTCUSDT") == 215), what="215 appends observed")


async def test_a_command_failing_inside_the_transaction_is_retried_not_counted(
    exchange: ScriptedExchange, redis_server: RedisServer
) -> None:
    """The stream key is a string (WRONGTYPE inside EXEC): nothing counts as written, the stored last IDs
    stay where the stream is, errors are counted; once the key is deleted every trade arrives once, in order."""
    client: Any = aioredis.Redis.from_url(redis_server.url)
    await client.set(keys.DEFAULT_STREAM_KEY, "not a stream")
    await client.hset(keys.COLLECTOR_LAST_TRADE_IDS, mapping={"BTCUSDT": 0})
    registry = CollectorRegistry()
    async with running(settings_for(exchange, redis_server), registry) as collector:
        await eventually(lambda: _true(exchange.connected.is_set()), what="connection")
        sent = [("BTCUSDT", 1), ("ETHUSDT", 1), ("BTCUSDT", 2), ("BTCUSDT", 3), ("ETHUSDT", 2)]
        await exchange.send(*(trade(i, s) for s, i in sent))

        async def failing() -> bool:
            errors = count(registry, "tickbridge_collector_redis_errors_total")
            return collector.last_trade == {"BTCUSDT": 3, "ETHUSDT": 2} and errors >= 2  # a retry failed too

        await eventually(failing, timeout=10, what="writes failing")
        assert collector.publisher is not None and collector.publisher.written == 0
        # ETHUSDT had no stored ID: it is put just before its first unwritten trade (a restart back-fills it).
        assert await client.hgetall(keys.COLLECTOR_LAST_TRADE_IDS) == {b"BTCUSDT": b"0", b"ETHUSDT": b"0"}
        assert await client.get(keys.DEFAULT_STREAM_KEY) == b"not a stream"
        await client.delete(keys.DEFAULT_STREAM_KEY)
        await eventually(lambda: equals(symbols_ids(client), sent), timeout=10, what="written once the key is fixed")
        assert await client.hgetall(keys.COLLECTOR_LAST_TRADE_IDS) == {b"BTCUSDT": b"3", b"ETHUSDT": b"2"}
        assert collector.publisher.written == 5
        warm = await client.zrange(keys.warm_key("BTCUSDT"), 0, -1)
        assert [m.split(b"|")[0] for m in warm] == [b"1", b"2", b"3"]
        errors = count(registry, "tickbridge_collector_redis_errors_total")
        await exchange.send(trade(4))
        await eventually(lambda: equals(symbols_ids(client), [*sent, ("BTCUSDT", 4)]), what="writing normally")
        assert count(registry, "tickbridge_collector_redis_errors_total") == errors


async def test_books_are_unconfirmed_while_disconnected_then_continue_or_resync(
    exchange: ScriptedExchange, redis_server: RedisServer
) -> None:
    """After a lost connection no book counts as valid until the new connection tells: BTCUSDT's next update
    continues its update IDs (nothing missed: valid again without a snapshot), ETHUSDT's leaves a gap (the
    usual resync). Discarding every book instead cost 50 snapshots per reconnect, and REST weight with it."""
    client: Any = aioredis.Redis.from_url(redis_server.url)
    registry = CollectorRegistry()
    async with running(settings_for(exchange, redis_server), registry) as collector:
        symbols = ("BTCUSDT", "ETHUSDT")
        await eventually(lambda: _true(exchange.connected.is_set()), what="connection")
        await exchange.send(*(depth(99, 103, symbol=s) for s in symbols))
        await eventually(lambda: _true(all(collector.book_valid(s) for s in symbols)), what="books valid")
        await exchange.drop()
        await eventually(lambda: _true(not any(collector.book_valid(s) for s in symbols)), timeout=5, what="invalid")
        assert all(count(registry, "tickbridge_collector_book_valid", symbol=s) == 0 for s in symbols)
        await eventually(lambda: _true(len(exchange.clients) == 2), what="reconnected")
        assert not any(collector.book_valid(s) for s in symbols)  # no depth event on the new connection yet
        exchange.snapshot = {"lastUpdateId": 111, "bids": [["9.0", "1.0"]], "asks": [["12.0", "1.0"]]}
        await exchange.send(depth(104, 106, symbol="BTCUSDT"), depth(110, 112, symbol="ETHUSDT"))

        async def current() -> bool:
            return collector.book_valid("BTCUSDT") and collector.book("BTCUSDT").last_update_id == 106

        async def resynced() -> bool:
            return collector.book_valid("ETHUSDT") and collector.book("ETHUSDT").last_update_id == 112

        await eventually(current, what="BTCUSDT continued")
        await eventually(resynced, what="ETHUSDT resynced on the new connection")
        assert all(count(registry, "tickbridge_collector_book_valid", symbol=s) == 1 for s in symbols)
        assert count(registry, "tickbridge_collector_resyncs_total", symbol="BTCUSDT") == 0
        assert count(registry, "tickbridge_collector_resyncs_total", symbol="ETHUSDT") == 1
        depth_ids = [(t.symbol, t.first_update_id) for t in await stream_ticks(client) if isinstance(t, DepthDiff)]
        assert depth_ids == [(s, 99) for s in symbols] + [("BTCUSDT", 104), ("ETHUSDT", 110)]


async def test_rest_client_survives_a_retry_after_that_is_not_a_number() -> None:
    """HTTP allows an HTTP-date in Retry-After, and a proxy may send anything: wait and go on, never crash."""
    import email.utils

    calls: list[float] = []

    async def depth(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            retry = "soon" if len(calls) == 1 else email.utils.formatdate(time.time() + 1.5, usegmt=True)
            return web.json_response({"code": -1003, "msg": "Too much request weight used"}, status=429,
                                     headers={"Retry-After": retry})  # fmt: skip
        return web.json_response({"lastUpdateId": 7, "bids": [], "asks": []})

    async with rest_exchange({"/api/v3/depth": depth}) as rest:
        rest.default_retry_after_s = 0.3
        assert (await rest.depth("BTCUSDT", 1000))["lastUpdateId"] == 7
        assert len(calls) == 3
        assert calls[1] - calls[0] >= 0.25  # the default wait for an unreadable value
        assert calls[2] - calls[1] >= 0.45  # until the date (whole seconds: 0.5 .. 1.5 s from now)


async def test_trade_ids_starting_over_with_newer_times_are_a_new_sequence_not_duplicates(
    exchange: ScriptedExchange, redis_server: RedisServer
) -> None:
    """The VPS Redis says BTCUSDT is at trade 5,000,000, its newest trade an hour old (BINANCE_WS_URL pointed
    elsewhere before, or the exchange reset its IDs). Trades 1, 2, 3 made now are a new sequence: appended,
    counted once as a reset, and followed from there; a real duplicate (an ID seen, not newer) is still dropped.
    Before, every trade of the symbol was dropped as a duplicate until its IDs passed 5,000,000."""
    client: Any = aioredis.Redis.from_url(redis_server.url)
    now_ms = int(time.time() * 1000)
    await client.hset(keys.COLLECTOR_LAST_TRADE_IDS, mapping={"BTCUSDT": 5_000_000, "ETHUSDT": 7})
    await client.zadd(keys.warm_key("BTCUSDT"), {"5000000|1|1|BUY|1": (now_ms - 3_600_000) * 1000})
    registry = CollectorRegistry()
    async with running(settings_for(exchange, redis_server), registry) as collector:
        await eventually(lambda: _true(exchange.connected.is_set()), what="connection")
        await exchange.send(
            trade(1, time_ms=now_ms), trade(2, time_ms=now_ms), trade(2, time_ms=now_ms), trade(3, time_ms=now_ms + 1),
            trade(7, "ETHUSDT", time_ms=now_ms), trade(8, "ETHUSDT", time_ms=now_ms),  # ETH: no time known
        )  # fmt: skip
        expected = [("BTCUSDT", 1), ("BTCUSDT", 2), ("BTCUSDT", 3), ("ETHUSDT", 8)]
        await eventually(lambda: equals(symbols_ids(client), expected), timeout=10, what="the new sequence")
        assert count(registry, "tickbridge_collector_trade_id_resets_total", symbol="BTCUSDT") == 1
        assert count(registry, "tickbridge_collector_trade_id_resets_total", symbol="ETHUSDT") == 0
        assert count(registry, "tickbridge_collector_duplicates_total", type="TRADE") == 2  # BTC 2 again, ETH 7
        assert count(registry, "tickbridge_collector_trade_gaps_total", symbol="BTCUSDT") == 0
        assert await client.hget(keys.COLLECTOR_LAST_TRADE_IDS, "BTCUSDT") == b"3"
        assert collector.last_trade["BTCUSDT"] == 3


# ---- capped waits and bodies (issue 14, item 7) ---------------------------------------------------------


@contextlib.asynccontextmanager
async def collector_rest(url: str, registry: CollectorRegistry) -> AsyncIterator[Any]:
    """The collector's own REST client (its metrics wired) against `url`; the collector itself is not run."""
    collector = Collector(Settings(binance_rest_url=url, symbols=("BTCUSDT",)), registry)
    try:
        yield collector.rest
    finally:
        await collector.rest.close()


@pytest.mark.parametrize("status", [429, 418])
async def test_a_huge_retry_after_is_capped_counted_and_rest_work_resumes(status: int) -> None:
    """`Retry-After: 1e9` (a broken or hostile proxy in front of the exchange) used to block every REST call of
    the collector for 31 years: no snapshot, no back-fill, for good. The wait is capped, the cap counted; a 418
    (IP ban) has its own, longer cap (a real ban is honoured up to Binance's documented 3 days)."""
    calls: list[float] = []

    async def depth(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return web.json_response({"code": -1003, "msg": "Way too much request weight used"}, status=status,
                                     headers={"Retry-After": "1e9"})  # fmt: skip
        return web.json_response({"lastUpdateId": 7, "bids": [], "asks": []})

    registry = CollectorRegistry()
    async with rest_server({"/api/v3/depth": depth}) as url, collector_rest(url, registry) as rest:
        # The production caps are two minutes and three days: too long for a test; the other one stays long,
        # so a wrong choice of cap shows as a timeout.
        if status == 429:
            rest.max_retry_after_s = 0.5
        else:
            rest.max_ban_retry_after_s = 0.5
        snap = await asyncio.wait_for(rest.depth("BTCUSDT", 1000), 10)
        assert snap["lastUpdateId"] == 7
        assert len(calls) == 2 and 0.45 <= calls[1] - calls[0] < 5
        capped = count(registry, "tickbridge_collector_rest_capped_total", endpoint=DEPTH_ENDPOINT, what="retry_after")
        assert capped == 1
        assert await asyncio.wait_for(rest.depth("BTCUSDT", 1000), 5)  # and the next call goes at once
    from tickbridge.collector.rest import MAX_BAN_RETRY_AFTER_S, MAX_RETRY_AFTER_S

    assert 60 <= MAX_RETRY_AFTER_S <= 120
    assert MAX_BAN_RETRY_AFTER_S == 3 * 86400


async def test_an_oversized_rest_body_is_one_clear_error_counted_not_read_whole() -> None:
    """A REST answer is read up to a byte limit (here 64 KiB; in production a few MiB, far above a 5000-level
    snapshot): a bigger one, announced or streamed without a length, is refused with one error naming the
    limit and counted; the next call works. Before, the whole body went into memory, however large."""
    big = orjson.dumps([history_row(i) for i in range(1, 5000)])  # ~0.8 MB of valid JSON
    sent: list[int] = []

    async def trades(request: web.Request) -> web.StreamResponse:
        if request.query.get("fromId") == "1":  # streamed in chunks, no Content-Length
            resp = web.StreamResponse()
            await resp.prepare(request)
            for i in range(0, len(big), 16384):
                await resp.write(big[i : i + 16384])
                sent.append(i)
            await resp.write_eof()
            return resp
        if request.query.get("fromId") == "2":  # announced with a Content-Length
            return web.Response(body=big, content_type="application/json")
        return web.json_response([history_row(3)])

    registry = CollectorRegistry()
    async with rest_server({"/api/v3/historicalTrades": trades}) as url, collector_rest(url, registry) as rest:
        rest.max_body_bytes = 65536
        for from_id in (1, 2):
            with pytest.raises(RestCallFailed, match="over 65536 bytes") as exc:
                await asyncio.wait_for(rest.historical_trades("BTCUSDT", from_id), 10)
            assert len(str(exc.value)) < 300
        capped = count(registry, "tickbridge_collector_rest_capped_total", endpoint=HISTORICAL_TRADES_ENDPOINT,
                       what="body")  # fmt: skip
        assert capped == 2
        assert [r["id"] for r in await rest.historical_trades("BTCUSDT", 3)] == [3]


async def test_a_trade_far_ahead_of_its_receive_time_is_dead_lettered_and_later_trades_still_land(
    exchange: ScriptedExchange, redis_server: RedisServer
) -> None:
    """Trade 2 claims to happen an hour from now (a corrupt frame, a hostile or broken exchange side). Appended,
    it topped WARM (whose trim keeps only the window before its newest tick) and the newest trade time (a real
    new ID sequence after it would pass for duplicates). It is dead-lettered with its raw frame and counted;
    its ID is a gap like any other: the back-fill gets the same bogus time from REST and refuses it too, so
    the trade is counted lost; trades 3 and 4 land and WARM's top is trade 4."""
    client: Any = aioredis.Redis.from_url(redis_server.url)
    now_ms = int(time.time() * 1000)
    future_ms = now_ms + 3_600_000
    exchange.history = {2: history_row(2, time_ms=future_ms)}
    registry = CollectorRegistry()
    async with running(settings_for(exchange, redis_server), registry) as collector:
        await eventually(lambda: _true(exchange.connected.is_set()), what="connection")
        bogus = trade(2, time_ms=future_ms)
        await exchange.send(trade(1, time_ms=now_ms), bogus, trade(3, time_ms=now_ms + 1), trade(4, time_ms=now_ms + 2))
        await eventually(lambda: equals(trade_ids(client), [1, 3, 4]), timeout=10, what="trades 1, 3 and 4")
        letters = await client.xrange(keys.COLLECTOR_DEAD_LETTER)
        assert [f[b"reason"] for _, f in letters] == [b"future_time", b"future_time"]  # the frame, the REST row
        assert letters[0][1][b"raw"] == bogus
        assert count(registry, "tickbridge_collector_dead_letters_total", reason="future_time") == 2
        assert count(registry, "tickbridge_collector_lost_trades_total", symbol="BTCUSDT") == 1
        top = await client.zrange(keys.warm_key("BTCUSDT"), -1, -1, withscores=True)
        assert [int(score) for _, score in top] == [(now_ms + 2) * 1000]
        assert collector.last_trade_ts["BTCUSDT"] == (now_ms + 2) * 1000
    # A restarted collector reads the newest trade time back from WARM: not an hour ahead either.
    assert not (await client.zrangebyscore(keys.warm_key("BTCUSDT"), (now_ms + 10_000) * 1000, "+inf"))


async def test_a_burst_is_handed_over_in_parts_in_order_and_whole(
    exchange: ScriptedExchange, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20: the processor hands over what it has after HANDOVER_S of work (0 here: after every frame) and lets
    the publisher send it while it parses the rest of the inbox. A burst split that finely still lands whole, once,
    in receive order, in several transactions."""
    monkeypatch.setattr(collector_service, "HANDOVER_S", 0.0)
    client: Any = aioredis.Redis.from_url(redis_server.url)
    registry = CollectorRegistry()
    collector, task = await start(settings_for(exchange, redis_server), registry)
    await eventually(lambda: _true(exchange.connected.is_set()), what="connection")
    await exchange.send(depth(90, 101, [["10.0", "2.0"]]))  # straddles the snapshot's 100: the book is valid
    await eventually(lambda: _true(collector.book_valid("BTCUSDT")), what="book synced")
    frames: list[bytes] = []
    for i in range(1, 201):
        frames.append(trade(i))
        if i % 2 == 0:
            frames.append(trade(i // 2, symbol="ETHUSDT"))
        if i % 20 == 0:
            frames.append(depth(101 + i // 20, 101 + i // 20, [[f"{i}.0", "1.0"]]))
    before = count(registry, "tickbridge_collector_batch_ticks_count")
    for raw in frames:  # all in the inbox before the processor wakes: one burst, as one TCP read would bring it
        collector.inbox.put_nowait((collector.primary_gen, now_us(), raw))
    await eventually(lambda: equals(client.xlen(keys.DEFAULT_STREAM_KEY), len(frames) + 2), what="the burst")
    ticks = await stream_ticks(client)
    got = [(t.symbol, t.trade_id if isinstance(t, Trade) else t.last_update_id) for t in ticks]
    sent = [("BTCUSDT", 101)]  # the straddling diff before the burst
    for raw in frames:
        data = orjson.loads(raw)["data"]
        sent.append((data["s"], data["t"] if data["e"] == "trade" else data["u"]))
    assert got == sent  # every tick once, in receive order
    batches = count(registry, "tickbridge_collector_batch_ticks_count") - before
    assert batches > 1, "the burst went out as one transaction: no handover happened"
    await stop(collector, task)
