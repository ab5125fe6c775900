"""Writer against real redis-server and QuestDB: exactly once, re-sends deduplicated, QuestDB restart, suspension."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from conftest import ServiceRunner, equals, eventually
from tickbridge import cli
from tickbridge.brain.consumer import BrainConsumer
from tickbridge.brain.writer import BrainWriter
from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBHttp
from tickbridge.core.redis_io import ensure_group, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import encode_tick
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer
from tickbridge_dev.loadgen.brain import TradeSource, as_mapping, make_depth

pytestmark = pytest.mark.timeout(150)

STREAM = keys.DEFAULT_STREAM_KEY
GROUP = keys.DEFAULT_CONSUMER_GROUP
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
CHECK_SQL = (
    "SELECT symbol, count(), count_distinct(trade_id), max(trade_id) - min(trade_id) + 1 FROM trades GROUP BY symbol"
)


def settings_for(redis: RedisServer, qdb: QuestDBServer, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "brain_redis_url": redis.url,
        "brain_questdb_url": qdb.url,
        "symbols": SYMBOLS,
        "consumer_claim_idle_ms": 1000,
        "writer_flush_interval_s": 0.1,
        "writer_batch_rows": 2000,
        "consumer_name": "t",
    }
    base.update(kw)
    return Settings(**base)


@pytest.fixture
async def brain(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = make_client(redis_server.url)
    yield client
    await client.aclose()


async def check_rows(qdb: QuestDBHttp) -> dict[str, list[int]]:
    return {row[0]: [int(x) for x in row[1:]] for row in await qdb.rows(CHECK_SQL)}


def all_exactly_once(expected: dict[str, int]) -> Callable[[QuestDBHttp], Any]:
    async def check(qdb: QuestDBHttp) -> bool:
        await qdb.wait_applied("trades")
        rows = await check_rows(qdb)
        return rows == {sym: [n, n, n] for sym, n in expected.items()}

    return check


async def test_writes_exactly_once_and_resend_is_deduplicated(
    brain: aioredis.Redis,
    redis_server: RedisServer,
    questdb_factory: Callable[..., QuestDBServer],
    services: ServiceRunner,
) -> None:
    qserver = questdb_factory()
    qdb = QuestDBHttp(qserver.url)
    settings = settings_for(redis_server, qserver)
    await ensure_group(brain, STREAM, GROUP)
    source = TradeSource(SYMBOLS)
    await source.append(brain, STREAM, 6000)
    for i in range(5):
        await brain.xadd(STREAM, as_mapping(encode_tick(make_depth("ETHUSDT", 100 + 10 * i, source.ts + i))))
    registry = CollectorRegistry()
    services.start(BrainConsumer(settings, CollectorRegistry()))
    # No monitor (so no trim) in the first writer: the re-send below must find every entry it wrote, as after
    # a crash between the flush and the ack. Its first trim, 2 s in, used to race the stop under load.
    writer = services.start(BrainWriter(settings, registry, monitor_interval_s=3600))
    check = all_exactly_once(source.counts())
    try:
        await eventually(lambda: check(qdb), timeout=40, interval=0.3, what="trades exactly once")
        await qdb.wait_applied("depth_updates")
        depth = await qdb.rows("SELECT last_update_id, bids, asks FROM depth_updates ORDER BY last_update_id")
        assert [r[0] for r in depth] == [102, 112, 122, 132, 142]
        assert depth[0][1] == [[100.1, 1.5], [100.0, 0.0]] and depth[0][2] == [[100.2, 2.0]]
        assert registry.get_sample_value("tickbridge_writer_rows_total", {"table": "trades"}) == 6000
        assert writer.written == 6005

        # A writer that died after the flush but before the ack: everything is re-sent. DEDUP absorbs it.
        await services.stop()
        for sym in SYMBOLS:
            await brain.execute_command("XGROUP", "SETID", keys.trades_key(sym), keys.WRITER_GROUP, "0")
        again = services.start(BrainWriter(settings, CollectorRegistry()))
        await eventually(lambda: _true(again.written >= 6000), timeout=60, what="re-send")
        assert await check(qdb)
        # Nothing is left behind in the writer group, and the written entries can be trimmed.
        await eventually(lambda: _no_backlog(brain), timeout=10, what="writer group drained")
        await again.trim()
        for sym in SYMBOLS:
            assert await brain.xlen(keys.trades_key(sym)) < 200  # approximate MINID: whole nodes of 100
    finally:
        await qdb.close()


async def _true(value: bool) -> bool:
    return value


async def _no_backlog(client: aioredis.Redis) -> bool:
    for sym in SYMBOLS:
        info = [g for g in await client.xinfo_groups(keys.trades_key(sym)) if g["name"] == keys.WRITER_GROUP.encode()]
        if info[0]["pending"] or info[0]["lag"]:
            return False
    return True


Fault = Callable[[QuestDBServer, BrainWriter, CollectorRegistry], Awaitable[None]]


async def flow_through(
    brain: aioredis.Redis, redis_server: RedisServer, qserver: QuestDBServer, services: ServiceRunner, fault: Fault
) -> None:
    """A steady flow through consumer and writer, `fault` once rows arrive, then every trade exactly once."""
    qdb = QuestDBHttp(qserver.url)
    settings = settings_for(redis_server, qserver)
    await ensure_group(brain, STREAM, GROUP)
    source = TradeSource(SYMBOLS)
    registry = CollectorRegistry()
    services.start(BrainConsumer(settings, CollectorRegistry()))
    writer = services.start(BrainWriter(settings, registry, retry_timeout_ms=1000, monitor_interval_s=0.5))
    stop_flow = asyncio.Event()

    async def flow() -> None:
        while not stop_flow.is_set():
            await source.append(brain, STREAM, 50, live=True)
            await asyncio.sleep(0.02)

    flow_task = asyncio.create_task(flow())
    try:
        await eventually(lambda: _some_rows(qdb), timeout=20, what="first rows")
        await fault(qserver, writer, registry)
        await asyncio.sleep(1.0)  # keep flowing a little after QuestDB answers again
        stop_flow.set()
        await flow_task
        check = all_exactly_once(source.counts())
        await eventually(lambda: check(qdb), timeout=60, interval=0.3, what="all rows exactly once after the fault")
        assert await _errors_seen(registry)  # the fault was noticed and counted
    finally:
        stop_flow.set()
        await qdb.close()


async def test_questdb_restart_mid_flow_loses_and_duplicates_nothing(
    brain: aioredis.Redis,
    redis_server: RedisServer,
    questdb_factory: Callable[..., QuestDBServer],
    services: ServiceRunner,
) -> None:
    async def restart(qserver: QuestDBServer, writer: BrainWriter, registry: CollectorRegistry) -> None:
        await asyncio.to_thread(qserver.restart)  # graceful stop + start on the same ports
        await eventually(lambda: _errors_seen(registry), timeout=20, what="writer noticed the outage")

    await flow_through(brain, redis_server, questdb_factory(), services, restart)


async def test_frozen_questdb_mid_flow_loses_and_duplicates_nothing(
    brain: aioredis.Redis,
    redis_server: RedisServer,
    questdb_factory: Callable[..., QuestDBServer],
    services: ServiceRunner,
) -> None:
    """A slow QuestDB at its worst: SIGSTOP for 25 s mid-flow. It keeps accepting connections but answers
    nothing, so flushes time out while QuestDB may still commit them after SIGCONT. The writer retries
    (DEDUP absorbs a batch that did land), reading pauses, the heartbeat goes on, and every trade ends up
    in `trades` exactly once."""

    async def freeze(qserver: QuestDBServer, writer: BrainWriter, registry: CollectorRegistry) -> None:
        qserver.pause()
        try:
            await asyncio.sleep(25.0)  # the fault's duration (past the 10 s request timeout), not a wait
            assert not writer.stopping.is_set()  # still running, not crashed by the stall
            assert await brain.exists(keys.heartbeat_key("writer", writer.consumer))
        finally:
            qserver.resume()

    await flow_through(brain, redis_server, questdb_factory(), services, freeze)


async def _some_rows(qdb: QuestDBHttp) -> bool:
    try:
        return bool(await qdb.scalar("SELECT count() FROM trades"))
    except Exception:
        return False


async def _errors_seen(registry: CollectorRegistry) -> bool:
    return any(
        s.value > 0
        for m in registry.collect()
        if m.name == "tickbridge_writer_errors"
        for s in m.samples
        if s.name.endswith("_total")
    )


async def test_suspended_table_is_reported_and_its_rows_wait_in_redis(
    brain: aioredis.Redis,
    redis_server: RedisServer,
    questdb_factory: Callable[..., QuestDBServer],
    services: ServiceRunner,
) -> None:
    """While `trades` is suspended nothing is flushed to it or acked: rows taken into a suspended WAL are not
    visible, and lost if the operator must resume past a bad transaction, so the Redis copies stay. After
    RESUME WAL every trade is in `trades` exactly once."""
    qserver = questdb_factory(extra_conf={"dev.mode.enabled": "true"})  # SUSPEND WAL needs dev mode
    qdb = QuestDBHttp(qserver.url)
    settings = settings_for(redis_server, qserver)
    await ensure_group(brain, STREAM, GROUP)
    source = TradeSource(("BTCUSDT", "ETHUSDT"))
    await source.append(brain, STREAM, 500)
    registry = CollectorRegistry()
    services.start(BrainConsumer(settings, CollectorRegistry()))
    writer = BrainWriter(settings, registry, monitor_interval_s=0.2)
    services.start(writer)
    try:
        await eventually(lambda: all_exactly_once(source.counts())(qdb), timeout=30, what="first trades")
        await qdb.exec("ALTER TABLE trades SUSPEND WAL")

        async def reported() -> bool:
            return registry.get_sample_value("tickbridge_writer_suspended_tables") == 1

        await eventually(reported, timeout=10, what="suspension reported")
        written = writer.written
        await source.append(brain, STREAM, 500)

        async def held() -> bool:
            return "trades" in writer.held

        await eventually(held, timeout=10, what="trades set aside")
        assert (registry.get_sample_value("tickbridge_writer_errors_total", {"kind": "suspended"}) or 0) >= 1
        # A writer restarted meanwhile knows before its first flush (its monitor would be too late).
        await services.stop_one(writer)
        writer = BrainWriter(settings, CollectorRegistry(), monitor_interval_s=60)
        services.start(writer)
        await eventually(held, timeout=10, what="trades set aside by the restarted writer")
        written = writer.written
        await source.append(brain, STREAM, 500)  # more while held: not read, they wait in Redis
        await asyncio.sleep(1.5)
        assert writer.written == written == 0  # nothing flushed (nor acked) while suspended
        backlog = sum([await brain.xlen(keys.trades_key(s)) for s in ("BTCUSDT", "ETHUSDT")])
        assert backlog >= 1000  # the Redis copies are kept
        await qdb.exec("ALTER TABLE trades RESUME WAL")
        # This writer checks once a minute: a fresh one takes the held rows over (a running writer resuming by
        # itself is the depth test's).
        await services.stop_one(writer)
        writer = BrainWriter(settings, CollectorRegistry(), monitor_interval_s=0.2)
        services.start(writer)
        await eventually(lambda: all_exactly_once(source.counts())(qdb), timeout=30, what="all trades after RESUME")
        # `written` counts after the XACK that follows QuestDB's confirmation: the rows can be visible first.
        await eventually(lambda: _true(writer.written >= 1000), timeout=5, what="1000 written")
        assert writer.held == set()
        await asyncio.sleep(0.5)  # a re-read that doubled them would have flushed by now
        assert writer.written == 1000  # every held row sent once
    finally:
        await qdb.close()


async def test_a_suspended_depth_table_does_not_hold_the_trades_back(
    brain: aioredis.Redis,
    redis_server: RedisServer,
    questdb_factory: Callable[..., QuestDBServer],
    services: ServiceRunner,
) -> None:
    """`depth_updates` suspended: its diffs wait in Redis while every trade keeps reaching `trades` exactly
    once; after RESUME WAL every diff is in `depth_updates` exactly once."""
    qserver = questdb_factory(extra_conf={"dev.mode.enabled": "true"})
    qdb = QuestDBHttp(qserver.url)
    settings = settings_for(redis_server, qserver)
    await ensure_group(brain, STREAM, GROUP)
    source = TradeSource(("BTCUSDT", "ETHUSDT"))
    update_ids = iter(range(100, 100_000, 10))

    async def append(trades: int, diffs: int) -> None:
        await source.append(brain, STREAM, trades)
        for _ in range(diffs):
            await brain.xadd(STREAM, as_mapping(encode_tick(make_depth("ETHUSDT", next(update_ids), source.ts))))

    await append(300, 5)
    registry = CollectorRegistry()
    services.start(BrainConsumer(settings, CollectorRegistry()))
    writer = BrainWriter(settings, registry, monitor_interval_s=0.2)
    services.start(writer)

    async def depth_rows() -> list[int]:
        await qdb.wait_applied("depth_updates")
        return [int(r[0]) for r in await qdb.rows("SELECT last_update_id FROM depth_updates ORDER BY 1")]

    try:
        await eventually(lambda: all_exactly_once(source.counts())(qdb), timeout=30, what="first trades")
        await eventually(lambda: equals(depth_rows(), [102, 112, 122, 132, 142]), timeout=30, what="first diffs")
        await qdb.exec("ALTER TABLE depth_updates SUSPEND WAL")

        async def reported() -> bool:
            return registry.get_sample_value("tickbridge_writer_suspended_tables") == 1

        await eventually(reported, timeout=10, what="suspension reported")
        for _ in range(3):  # trades keep flowing while the diffs wait
            await append(400, 5)
            await eventually(lambda: all_exactly_once(source.counts())(qdb), timeout=20, what="trades while held")
        assert writer.held == {"depth_updates"}
        await qdb.exec("ALTER TABLE depth_updates RESUME WAL")
        expected = list(range(102, 102 + 20 * 10, 10))
        await eventually(lambda: equals(depth_rows(), expected), timeout=30, what="every diff once after RESUME")
        assert await qdb.rows("SELECT count() FROM depth_updates") == [[20]]
        assert writer.held == set()
    finally:
        await qdb.close()


async def _table_exists(qdb: QuestDBHttp) -> bool:
    return bool(await qdb.rows("SELECT table_name FROM tables() WHERE table_name = 'trades'"))


async def test_a_per_symbol_key_of_the_wrong_type_stops_only_its_symbol(
    brain: aioredis.Redis,
    redis_server: RedisServer,
    questdb_factory: Callable[..., QuestDBServer],
    services: ServiceRunner,
) -> None:
    """`trades:SOLUSDT` holding a string (written by hand or by another program) is reported and left out;
    the other symbols keep flowing into QuestDB exactly once, and SOLUSDT flows again once the key is fixed."""
    qserver = questdb_factory()
    qdb = QuestDBHttp(qserver.url)
    settings = settings_for(redis_server, qserver)
    await brain.set(keys.trades_key("SOLUSDT"), "not a stream")
    await ensure_group(brain, STREAM, GROUP)
    source = TradeSource(("BTCUSDT", "ETHUSDT"))
    await source.append(brain, STREAM, 2000)
    registry = CollectorRegistry()
    services.start(BrainConsumer(settings, CollectorRegistry()))
    services.start(BrainWriter(settings, registry, discover_interval_s=0.5))
    try:
        await eventually(lambda: all_exactly_once(source.counts())(qdb), timeout=30, interval=0.3, what="BTC, ETH")
        assert (registry.get_sample_value("tickbridge_writer_errors_total", {"kind": "wrong_type"}) or 0) >= 1
        assert registry.get_sample_value("tickbridge_writer_skipped_keys") == 1

        await brain.delete(keys.trades_key("SOLUSDT"))  # fixed: the consumer's next SOLUSDT trade makes a stream
        sol = TradeSource(("SOLUSDT",))
        await sol.append(brain, STREAM, 500)
        expected = {**source.counts(), **sol.counts()}
        await eventually(lambda: all_exactly_once(expected)(qdb), timeout=30, interval=0.3, what="SOLUSDT again")
        await eventually(
            lambda: _true(registry.get_sample_value("tickbridge_writer_skipped_keys") == 0), timeout=5, what="0 skipped"
        )
    finally:
        await qdb.close()


async def test_dead_letters_replayed_after_the_fix_reach_questdb_exactly_once(
    brain: aioredis.Redis,
    redis_server: RedisServer,
    questdb_factory: Callable[..., QuestDBServer],
    services: ServiceRunner,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """While `trades:SOLUSDT` is not a stream, its trades are dead-lettered and the others flow. Once the
    key is deleted, `tickbridge deadletters --replay` puts them back: the contract's check query is equal
    for every symbol, the invalid entry stays quarantined, and a second replay repeats nothing."""
    qserver = questdb_factory()
    qdb = QuestDBHttp(qserver.url)
    settings = settings_for(redis_server, qserver, consumer_max_deliveries=1)
    await brain.set(keys.trades_key("SOLUSDT"), "not a stream")
    await ensure_group(brain, STREAM, GROUP)
    source = TradeSource(SYMBOLS)
    await source.append(brain, STREAM, 300)
    await brain.xadd(STREAM, {"type": "TRADE", "symbol": "BTCUSDT", "price": "nan"})
    services.start(BrainConsumer(settings, CollectorRegistry()))
    services.start(BrainWriter(settings, CollectorRegistry(), discover_interval_s=0.5))
    monkeypatch.setenv("BRAIN_REDIS_URL", redis_server.url)
    try:
        without_sol = {s: n for s, n in source.counts().items() if s != "SOLUSDT"}
        await eventually(lambda: all_exactly_once(without_sol)(qdb), timeout=30, interval=0.3, what="BTC, ETH")
        await eventually(lambda: equals(brain.xlen(keys.CONSUMER_DEAD_LETTER), 101), timeout=20, what="dead letters")

        await brain.delete(keys.trades_key("SOLUSDT"))
        with pytest.raises(SystemExit) as exit_:
            await asyncio.to_thread(cli.main, ["deadletters", "--replay"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "replayed 100; still invalid 1" in out and "append failed: WRONGTYPE" in out
        await eventually(lambda: all_exactly_once(source.counts())(qdb), timeout=30, interval=0.3, what="all once")
        sol = [int(f[b"trade_id"]) for _, f in await brain.xrange(keys.trades_key("SOLUSDT"))]
        assert sol == list(range(1, 101))  # in their original order
        # WARM was empty for SOLUSDT (every trade failed): all of them are inside its window now.
        warm = await brain.zrange(keys.warm_key("SOLUSDT"), 0, -1)
        assert [int(m.split(b"|")[0]) for m in warm] == list(range(1, 101))
        left = await brain.xrange(keys.CONSUMER_DEAD_LETTER)
        assert len(left) == 1 and left[0][1][b"price"] == b"nan"

        with pytest.raises(SystemExit):
            await asyncio.to_thread(cli.main, ["deadletters", "--replay"])
        assert "replayed 0; still invalid 1" in capsys.readouterr().out
        assert await brain.xlen(keys.trades_key("SOLUSDT")) == 100
        assert await brain.zcard(keys.warm_key("SOLUSDT")) == 100
    finally:
        await qdb.close()


async def test_a_stray_group_does_not_stop_the_writers_trimming(
    brain: aioredis.Redis, redis_server: RedisServer, questdb_server: QuestDBServer
) -> None:
    """Issue 14: the per-symbol streams trim below the writer's group only, whatever other group sits at 0-0."""
    stream = keys.trades_key(SYMBOLS[0])
    await ensure_group(brain, stream, keys.WRITER_GROUP)
    await brain.xgroup_create(stream, "stray-group", id="0")
    for i in range(1000):
        await brain.xadd(stream, {"n": str(i)})
    read = await brain.xreadgroup(keys.WRITER_GROUP, "w", {stream: ">"})
    await brain.xack(stream, keys.WRITER_GROUP, *[eid for eid, _ in read[0][1]])  # written: may go
    writer = BrainWriter(settings_for(redis_server, questdb_server), CollectorRegistry())
    writer.client = make_client(redis_server.url)
    writer.streams = [stream]
    try:
        await writer.trim()
    finally:
        await writer.client.aclose()
        await writer.qdb.close()
    assert await brain.xlen(stream) < 1000, "the stray group at 0-0 held the trimming back"


async def test_a_short_read_flushes_at_once_and_a_steady_flow_once_per_interval(
    brain: aioredis.Redis,
    redis_server: RedisServer,
    questdb_factory: Callable[..., QuestDBServer],
    services: ServiceRunner,
) -> None:
    """No timer delays a trade after a quiet spell: the read comes back short and the writer flushes at once.
    A trade that follows within WRITER_FLUSH_INTERVAL_S of the last flush waits for the interval (QuestDB pays
    per transaction). Every trade confirmed, acked and in QuestDB exactly once."""
    interval = 5.0
    qserver = questdb_factory()
    qdb = QuestDBHttp(qserver.url)
    settings = settings_for(redis_server, qserver, writer_flush_interval_s=interval,
                            writer_flush_min_interval_s=interval, writer_batch_rows=10_000)  # fmt: skip
    await ensure_group(brain, STREAM, GROUP)
    source = TradeSource(SYMBOLS)
    services.start(BrainConsumer(settings, CollectorRegistry()))
    writer = services.start(BrainWriter(settings, CollectorRegistry(), monitor_interval_s=3600))

    async def flushed(n: int) -> float:
        """Seconds from appending one trade until the writer confirmed `n` rows."""
        t0 = time.monotonic()
        await source.append(brain, STREAM, 1, live=True)
        await eventually(lambda: _true(writer.written >= n), timeout=30, interval=0.02, what=f"trade {n} flushed")
        return time.monotonic() - t0

    try:
        first = await flushed(1)  # nothing flushed before: at once
        second = await flushed(2)  # right after the first flush: waits for the interval
        await asyncio.sleep(interval)
        third = await flushed(3)  # after a quiet spell: at once again
        assert first < interval - 1 and third < interval - 1, (first, third)
        assert second > interval - first - 1, (first, second)
        await eventually(lambda: _no_backlog(brain), timeout=10, what="acked after the flush")
        await eventually(lambda: all_exactly_once(source.counts())(qdb), timeout=30, interval=0.3, what="in QuestDB")
        assert writer.written == 3
    finally:
        await qdb.close()


def test_the_flush_interval_follows_the_flow() -> None:
    """QuestDB pays per transaction: a light flow gets the short interval, 10,000 rows/s and more the long one."""
    writer = BrainWriter(Settings(writer_flush_interval_s=0.5, writer_flush_min_interval_s=0.1), CollectorRegistry())
    for flow, expected in ((0.0, 0.1), (1_200.0, 0.1), (5_000.0, 0.25), (10_000.0, 0.5), (50_000.0, 0.5)):
        writer.flow_rows_per_s = flow
        assert writer.flush_interval() == pytest.approx(expected), flow
    fixed = BrainWriter(Settings(writer_flush_interval_s=0.05, writer_flush_min_interval_s=0.1), CollectorRegistry())
    assert fixed.flush_interval() == pytest.approx(0.05)  # the shorter setting wins: one fixed interval


async def test_a_light_steady_flow_is_visible_soon_and_commits_at_most_once_per_interval(
    brain: aioredis.Redis, redis_server: RedisServer, questdb_server: QuestDBServer, services: ServiceRunner
) -> None:
    """With the default intervals, a light steady flow (20 trades/s) is in QuestDB soon after each trade (generous
    bounds: a loaded host), and the writer does not commit once per read: at most once per (short) interval."""
    symbols = ("CADENCEAUSDT", "CADENCEBUSDT")
    defaults = {k: Settings.model_fields[k].default for k in ("writer_flush_interval_s", "writer_flush_min_interval_s")}
    settings = settings_for(redis_server, questdb_server, symbols=symbols, **defaults)
    interval = settings.writer_flush_min_interval_s
    qdb = QuestDBHttp(questdb_server.url)
    await ensure_group(brain, STREAM, GROUP)
    source = TradeSource(symbols)
    registry = CollectorRegistry()
    services.start(BrainConsumer(settings, CollectorRegistry()))
    writer = services.start(BrainWriter(settings, registry, monitor_interval_s=3600))
    in_list = ", ".join(f"'{s}'" for s in symbols)
    seen: list[tuple[float, int]] = []  # (monotonic time, rows visible)

    async def watch() -> None:
        while True:
            n = await qdb.scalar(f"SELECT count() FROM trades WHERE symbol IN ({in_list})")
            seen.append((time.monotonic(), n))
            await asyncio.sleep(0.02)

    try:
        await eventually(lambda: _true(writer.sender is not None), timeout=30, what="writer ready")
        watcher = asyncio.create_task(watch())
        sent_at: list[float] = []
        flushes0 = registry.get_sample_value("tickbridge_writer_batch_rows_count") or 0.0
        started = time.monotonic()
        for _ in range(60):
            await source.append(brain, STREAM, 1, live=True)
            sent_at.append(time.monotonic())
            await asyncio.sleep(0.05)
        await eventually(lambda: _true(bool(seen) and seen[-1][1] >= len(sent_at)), timeout=30, what="all visible")
        elapsed = time.monotonic() - started
        watcher.cancel()
        flushes = (registry.get_sample_value("tickbridge_writer_batch_rows_count") or 0.0) - flushes0
        lags = [next(t for t, n in seen if n > i) - at for i, at in enumerate(sent_at)]
        assert writer.flush_interval() == pytest.approx(interval)  # a light flow: the short interval
        assert sorted(lags)[len(lags) // 2] < interval + 0.5, lags
        assert max(lags) < interval + 2.0, lags
        assert flushes <= elapsed / interval + 3, (flushes, elapsed, interval)
    finally:
        await qdb.close()
