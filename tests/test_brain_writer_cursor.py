"""The writer's group as a durable cursor (issue 20): XREAD from the group's position, XGROUP SETID once QuestDB
confirmed. Real redis-server and QuestDB: exactly once across kill -9 mid-batch, a trim never removes what
QuestDB has not confirmed, the group's lag stays valid, and an upgrade from a writer that left a pending list
(XREADGROUP) loses and duplicates nothing."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from conftest import ServiceRunner, eventually
from test_brain_kill import Role
from test_brain_writer import all_exactly_once, settings_for
from tickbridge.brain.consumer import BrainConsumer
from tickbridge.brain.writer import BrainWriter
from tickbridge.core import keys
from tickbridge.core.groups import Cursor, cursor_start, id_before
from tickbridge.core.questdb_io import QuestDBHttp
from tickbridge.core.redis_io import ensure_group, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import parse_stream_id
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer
from tickbridge_dev.loadgen.brain import TradeSource

pytestmark = pytest.mark.timeout(180)

STREAM = keys.DEFAULT_STREAM_KEY
SYMBOLS = ("BTCUSDT", "ETHUSDT")


async def exactly_once(qdb: QuestDBHttp, expected: dict[str, int]) -> bool:
    return bool(await all_exactly_once(expected)(qdb))


@pytest.fixture
async def brain(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = make_client(redis_server.url)
    yield client
    await client.aclose()


async def backlog(
    brain: aioredis.Redis, redis: RedisServer, qserver: QuestDBServer, n: int, **kw: Any
) -> tuple[Settings, TradeSource]:
    """Settings for these servers and `n` trades of SYMBOLS waiting in the Brain stream."""
    settings = settings_for(redis, qserver, **{"symbols": SYMBOLS, "writer_batch_rows": 500, **kw})
    await ensure_group(brain, STREAM, keys.DEFAULT_CONSUMER_GROUP)
    source = TradeSource(SYMBOLS)
    await source.append(brain, STREAM, n)
    return settings, source


async def writer_group(client: aioredis.Redis, sym: str) -> dict[Any, Any]:
    groups = await client.xinfo_groups(keys.trades_key(sym))
    return next(g for g in groups if g["name"] == keys.WRITER_GROUP.encode())


async def _drained(client: aioredis.Redis) -> bool:
    """Nothing pending (the writer keeps no pending list) and a valid lag of 0 on every trade stream."""
    for sym in SYMBOLS:
        g = await writer_group(client, sym)
        if g["pending"] != 0 or g["lag"] != 0:
            return False
    return True


def test_id_before() -> None:
    assert id_before((5, 3)) == (5, 2)
    assert id_before((5, 0)) == (4, 2**64 - 1)


async def test_cursor_start_folds_an_old_pending_list_in(brain: aioredis.Redis) -> None:
    """A group an older writer read with XREADGROUP: moved back to just below its oldest pending entry, which is
    acked (so the trim floor is the position), in one transaction; a group without pending entries is as is."""
    stream = "market:binance_spot:trades:BTCUSDT"
    ids = [await brain.xadd(stream, {"n": str(i)}) for i in range(30)]
    await ensure_group(brain, stream, keys.WRITER_GROUP, "0")
    assert await cursor_start(brain, stream, keys.WRITER_GROUP) == Cursor(b"0-0", None)  # Redis: lag estimated
    assert await cursor_start(brain, stream, "other") is None
    assert await cursor_start(brain, "no:such:key", keys.WRITER_GROUP) is None
    await brain.xreadgroup(keys.WRITER_GROUP, "old", {stream: ">"}, count=20)
    await brain.xack(stream, keys.WRITER_GROUP, *ids[:5], ids[7])  # confirmed before the upgrade
    cursor = await cursor_start(brain, stream, keys.WRITER_GROUP, page=4)  # several pages
    assert cursor is not None and cursor.entries_read is None
    assert parse_stream_id(cursor.position) == id_before(parse_stream_id(ids[5]))
    g = (await brain.xinfo_groups(stream))[0]
    assert g["pending"] == 0 and parse_stream_id(g["last-delivered-id"]) == parse_stream_id(cursor.position)
    # Read from there: the unconfirmed entries come again (ids[7], confirmed, too: DEDUP absorbs it).
    got: Any = await brain.xread({stream: cursor.position}, count=100)
    assert [e[0] for e in got[0][1]] == ids[5:]


async def test_upgrade_from_a_writer_with_a_pending_list_loses_and_duplicates_nothing(
    brain: aioredis.Redis,
    redis_server: RedisServer,
    questdb_factory: Callable[..., QuestDBServer],
    services: ServiceRunner,
) -> None:
    """Rows written, then an older writer's XREADGROUP left entries pending (read, never in QuestDB) with more
    unread after them: the new writer writes every trade exactly once and leaves no pending list."""
    qserver = questdb_factory()
    qdb = QuestDBHttp(qserver.url)
    settings, source = await backlog(brain, redis_server, qserver, 1000)
    consumer = services.start(BrainConsumer(settings, CollectorRegistry()))
    writer = services.start(BrainWriter(settings, CollectorRegistry(), monitor_interval_s=3600))
    try:
        await eventually(lambda: exactly_once(qdb, source.counts()), timeout=60, what="first rows")
        await services.stop_one(writer)
        await source.append(brain, STREAM, 1000)
        await eventually(lambda: _consumed(brain, consumer), timeout=30, what="consumer drained")
        for sym in SYMBOLS:  # the old writer: 300 read per symbol and never confirmed, the rest unread
            await brain.xreadgroup(keys.WRITER_GROUP, "old-writer", {keys.trades_key(sym): ">"}, count=300)
            assert (await writer_group(brain, sym))["pending"] == 300
        services.start(BrainWriter(settings, CollectorRegistry(), monitor_interval_s=3600))
        await eventually(lambda: exactly_once(qdb, source.counts()), timeout=60, what="every trade once")
        await eventually(lambda: _drained(brain), timeout=20, what="no pending list")
    finally:
        await qdb.close()


async def _consumed(client: aioredis.Redis, consumer: BrainConsumer) -> bool:
    g = (await client.xinfo_groups(STREAM))[0]
    return bool(g["lag"] == 0 and g["pending"] == 0)


async def test_trim_never_removes_what_questdb_has_not_confirmed(
    brain: aioredis.Redis,
    redis_server: RedisServer,
    questdb_factory: Callable[..., QuestDBServer],
    services: ServiceRunner,
) -> None:
    """QuestDB frozen: the writer reads on but cannot flush, so its group stays at what QuestDB confirmed and
    the trim keeps every entry after it (COLD reads them back). The consumer runs at its own speed meanwhile.
    After QuestDB is back, every trade is in `trades` exactly once and the lag is a valid 0."""
    qserver = questdb_factory()
    qdb = QuestDBHttp(qserver.url)
    settings, source = await backlog(brain, redis_server, qserver, 400, writer_batch_rows=97)  # many SETIDs
    services.start(BrainConsumer(settings, CollectorRegistry()))
    writer = services.start(BrainWriter(settings, CollectorRegistry(), monitor_interval_s=3600))
    try:
        await eventually(lambda: exactly_once(qdb, source.counts()), timeout=60, what="first rows")
        await eventually(lambda: _drained(brain), timeout=20, what="group at the top, lag valid")
        written = writer.written
        qserver.pause()
        try:
            await source.append(brain, STREAM, 3000)
            await asyncio.sleep(3.0)  # the fault's duration: reads go on, flushes hang
            for _ in range(3):
                await writer.trim()
            for sym in SYMBOLS:
                g = await writer_group(brain, sym)
                assert g["pending"] == 0
                after: Any = await brain.xrange(keys.trades_key(sym), f"({g['last-delivered-id'].decode()}", "+")
                assert len(after) >= 1500 - (writer.written - written)  # nothing unconfirmed trimmed
        finally:
            qserver.resume()
        await eventually(lambda: exactly_once(qdb, source.counts()), timeout=90, what="every trade once")
        await eventually(lambda: _drained(brain), timeout=30, what="drained, lag valid")
    finally:
        await qdb.close()


async def test_kill9_of_the_writer_mid_batch_loses_and_duplicates_nothing(
    brain: aioredis.Redis,
    redis_server: RedisServer,
    questdb_factory: Callable[..., QuestDBServer],
    services: ServiceRunner,
    tmp_path: Path,
) -> None:
    """A writer process killed with SIGKILL at random instants while it reads and flushes a backlog (batches in
    flight, the group not yet moved): each restart reads again from the group's position, and `trades` ends
    with every trade exactly once."""
    qserver = questdb_factory()
    qdb = QuestDBHttp(qserver.url)
    settings, source = await backlog(brain, redis_server, qserver, 20_000)
    services.start(BrainConsumer(settings, CollectorRegistry()))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("BRAIN_", "SYMBOLS", "CONSUMER_", "WRITER_"))},
        "BRAIN_REDIS_URL": redis_server.url,
        "BRAIN_QUESTDB_URL": qserver.url,
        "SYMBOLS": ",".join(SYMBOLS),
        "METRICS_PORT": "0",
        "WRITER_FLUSH_INTERVAL_S": "0.05",
        "WRITER_BATCH_ROWS": "1500",
        "LOG_LEVEL": "WARNING",
    }
    writer = Role("writer", "w1", env, tmp_path)
    rng = random.Random(20)
    try:
        for _ in range(6):
            writer.start()
            await eventually(lambda: _rows_grew(qdb), timeout=60, what="the writer writing")
            await asyncio.sleep(rng.uniform(0.0, 0.6))  # a random instant inside the flow of batches
            writer.kill9()
            await source.append(brain, STREAM, 1000)  # the consumer keeps going meanwhile
        writer.start()
        await eventually(lambda: exactly_once(qdb, source.counts()), timeout=120, what="every trade once")
        await eventually(lambda: _drained(brain), timeout=30, what="no pending list")
        assert writer.kills == 6
    finally:
        writer.stop()
        await qdb.close()


_last_count: list[int] = [0]


async def _rows_grew(qdb: QuestDBHttp) -> bool:
    """True once `trades` has more rows than at the last call that returned True."""
    try:
        count = int(await qdb.scalar("SELECT count() FROM trades") or 0)
    except Exception:
        return False
    if count > _last_count[0]:
        _last_count[0] = count
        return True
    return False


async def test_an_entry_appended_and_removed_leaves_no_phantom_lag(
    brain: aioredis.Redis,
    redis_server: RedisServer,
    questdb_factory: Callable[..., QuestDBServer],
    services: ServiceRunner,
) -> None:
    """The consumer's undo of a duplicate (XADD then XDEL in one call) counts in entries-added but is never read:
    once idle, the writer corrects its group's count, so the lag (and the backlog gauge behind WriterStalled)
    is 0 again, and the group moves past the removed entry only."""
    qserver = questdb_factory()
    qdb = QuestDBHttp(qserver.url)
    settings, source = await backlog(brain, redis_server, qserver, 200)
    registry = CollectorRegistry()
    services.start(BrainConsumer(settings, CollectorRegistry()))
    services.start(BrainWriter(settings, registry, monitor_interval_s=0.2))
    try:
        await eventually(lambda: exactly_once(qdb, source.counts()), timeout=60, what="first rows")
        await eventually(lambda: _drained(brain), timeout=20, what="lag 0")
        key = keys.trades_key(SYMBOLS[0])
        before = (await writer_group(brain, SYMBOLS[0]))["last-delivered-id"]
        undo = "redis.call('XDEL', KEYS[1], redis.call('XADD', KEYS[1], '*', 'undone', '1'))"  # one atomic step
        await brain.eval(undo, 1, key)
        await eventually(lambda: _drained(brain), timeout=20, what="lag 0 again")
        # Moved past the removed entry only: to the stream's last ID, with nothing real in between.
        after = (await writer_group(brain, SYMBOLS[0]))["last-delivered-id"]
        assert after == (await brain.xinfo_stream(key))["last-generated-id"]
        assert await brain.xrange(key, f"({before.decode()}", "+") == []

        async def gauge_zero() -> bool:
            return registry.get_sample_value("tickbridge_writer_backlog_entries") == 0

        await eventually(gauge_zero, timeout=10, what="backlog gauge 0")
        await source.append(brain, STREAM, 100)  # and the flow goes on, exactly once
        await eventually(lambda: exactly_once(qdb, source.counts()), timeout=60, what="more rows")
        await eventually(lambda: _drained(brain), timeout=20, what="lag 0 after more")
    finally:
        await qdb.close()
