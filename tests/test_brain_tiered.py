"""TieredMarketData and `tickbridge query` against real redis-server and QuestDB: tier choice and seamless stitching."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from conftest import ServiceRunner, equals, eventually
from tickbridge.brain import query
from tickbridge.brain.consumer import BrainConsumer
from tickbridge.brain.loadgen import TradeSource, make_trade
from tickbridge.brain.tiered import COLD, HOT, WARM, TickRow, TieredMarketData, _Hot
from tickbridge.brain.writer import BrainWriter
from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBHttp
from tickbridge.core.redis_io import Command, ensure_group, execute_packed, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.tick import TickError
from tickbridge.core.wire import encode_tick
from tickbridge.devstack.servers import QuestDBServer, RedisServer, free_port

pytestmark = pytest.mark.timeout(90)

SYM = "BTCUSDT"


def pipeline_settings(redis_server: RedisServer, qserver: QuestDBServer, **kw: Any) -> Settings:
    """Consumer, writer and TieredMarketData on one Brain Redis and QuestDB, for SYM."""
    base: dict[str, Any] = {
        "brain_redis_url": redis_server.url, "brain_questdb_url": qserver.url, "symbols": (SYM,), "hot_ticks": 100,
        "warm_window_s": 300, "writer_flush_interval_s": 0.1, "consumer_name": "t",
    }  # fmt: skip
    return Settings(**{**base, **kw})


async def test_tiers_answer_and_stitch_seamlessly(
    redis_server: RedisServer,
    questdb_factory: Callable[..., QuestDBServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    qserver = questdb_factory()
    settings = pipeline_settings(redis_server, qserver)
    brain = make_client(redis_server.url)
    qdb = QuestDBHttp(qserver.url)
    await ensure_group(brain, keys.DEFAULT_STREAM_KEY, keys.DEFAULT_CONSUMER_GROUP)
    now = time.time_ns() // 1000
    # 2,000 trades an hour ago (COLD only), then 1,000 in the last seconds (WARM and COLD).
    old = TradeSource([SYM], first_id=1, start_us=now - 3_600_000_000, step_us=1000)
    await old.append(brain, keys.DEFAULT_STREAM_KEY, 2000)
    new = TradeSource([SYM], first_id=2001, start_us=now - 10_000_000, step_us=5000)
    await new.append(brain, keys.DEFAULT_STREAM_KEY, 1000)
    consumer = BrainConsumer(settings, CollectorRegistry())
    writer = BrainWriter(settings, CollectorRegistry())
    tasks = [asyncio.create_task(consumer.run()), asyncio.create_task(writer.run())]
    registry = CollectorRegistry()
    try:

        async def loaded() -> bool:
            await qdb.wait_applied("trades")
            return bool(await qdb.scalar("SELECT count() FROM trades") == 3000)

        await eventually(loaded, timeout=30, interval=0.2, what="3000 rows in QuestDB")
        await eventually(lambda: _zcard(brain, 1000), timeout=5, what="WARM holds the recent 1000 only")

        async with TieredMarketData(settings, registry=registry) as md:
            a = await md.recent(SYM, 50)
            assert a.tiers == (HOT,) and [r.trade_id for r in a.rows] == list(range(2951, 3001))
            a = await md.recent(SYM, 500)
            assert a.tiers == (WARM,) and [r.trade_id for r in a.rows] == list(range(2501, 3001))
            a = await md.recent(SYM, 1500)
            assert a.tiers == (WARM, COLD) and [r.trade_id for r in a.rows] == list(range(1501, 3001))
            a = await md.range(SYM, now - 3_700_000_000, now + 1_000_000)
            assert a.tiers == (WARM, COLD) and [r.trade_id for r in a.rows] == list(range(1, 3001))
            last = a.rows[-1]
            assert (last.price, last.side) == (float(new_price(3000)), "SELL")
            a = await md.range(SYM, now - 3_600_000_000, now - 3_600_000_000 + 9_999)
            assert a.tiers == (COLD,) and [r.trade_id for r in a.rows] == list(range(1, 11))
            a = await md.range(SYM, now - 8_000_000, now + 1_000_000)  # inside WARM, before HOT's oldest
            assert a.tiers == (WARM,) and [r.trade_id for r in a.rows] == list(range(2401, 3001))
            hot_oldest = md.hot(SYM)[0].timestamp
            a = await md.range(SYM, hot_oldest + 1, now + 1_000_000)
            assert a.tiers == (HOT,) and [r.trade_id for r in a.rows] == list(range(2902, 3001))

            # HOT follows new ticks.
            await new.append(brain, keys.DEFAULT_STREAM_KEY, 10, live=True)
            await eventually(lambda: _hot_last(md, 3010), timeout=10, what="HOT follows")
            for tier in (HOT, WARM, COLD):
                count = registry.get_sample_value("tickbridge_tiered_latency_seconds_count", {"tier": tier})
                assert count and count > 0

        # The CLI shows the same answers for a person.
        monkeypatch.setenv("BRAIN_REDIS_URL", redis_server.url)
        monkeypatch.setenv("BRAIN_QUESTDB_URL", qserver.url)
        monkeypatch.setenv("SYMBOLS", SYM)
        capsys.readouterr()
        await asyncio.to_thread(query.main, [SYM, "--recent", "5", "--no-follow"])
        out = capsys.readouterr().out
        assert "3010" in out and "warm" in out
    finally:
        consumer.request_stop()
        writer.request_stop()
        await asyncio.gather(*tasks)
        await brain.aclose()
        await qdb.close()


def new_price(trade_id: int) -> str:
    return f"{100 + (trade_id % 1000) / 100:.2f}"


async def _zcard(client: object, n: int) -> bool:
    return bool(await client.zcard(keys.warm_key(SYM)) == n)  # type: ignore[attr-defined]


async def _hot_last(md: TieredMarketData, trade_id: int) -> bool:
    rows = md.hot(SYM)
    return bool(rows and rows[-1].trade_id == trade_id)


async def test_warm_reads_with_concurrent_callers_a_redis_restart_and_an_error_reply(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """WARM reads go through a lean connection when it is free and through the pool otherwise: the answers
    are the same either way, a broken link (Redis restarted) costs no answer, and an error reply is raised
    as redis-py's `ResponseError`, as before."""
    server = redis_factory(appendonly=True)  # the restart keeps WARM
    settings = Settings(
        brain_redis_url=server.url,
        brain_questdb_url="http://127.0.0.1:9",  # never asked: every request is inside WARM
        symbols=(SYM,),
        hot_ticks=100,
        warm_window_s=300,
    )
    client = make_client(server.url)
    now = time.time_ns() // 1000
    first = now - 10_000_000
    members: list[int | str] = []
    for i in range(1000):  # trade i + 1 at first + i * 10 ms
        ts = first + i * 10_000
        members += [ts, f"{i + 1}|{new_price(i + 1)}|0.5|BUY|{ts + 1500}"]
    await client.execute_command("ZADD", keys.warm_key(SYM), *members)
    await client.set(keys.warm_key("ETHUSDT"), "not a sorted set")

    def expected(k: int) -> list[int]:
        return list(range(10 * k + 1, 10 * k + 11))  # the 10 trades of the k-th 100 ms

    try:
        async with TieredMarketData(settings, registry=CollectorRegistry(), follow=False) as md:
            answers = await asyncio.gather(*(md.range(SYM, first + k * 100_000, first + k * 100_000 + 99_999)
                                             for k in range(50)))  # fmt: skip
            for k, a in enumerate(answers):
                assert a.tiers == (WARM,) and [r.trade_id for r in a.rows] == expected(k)
            recents = await asyncio.gather(*(md.recent(SYM, n) for n in (1, 10, 500)))
            assert [[r.trade_id for r in a.rows] for a in recents] == [
                [1000],
                list(range(991, 1001)),
                list(range(501, 1001)),
            ]
            assert all(a.tiers == (WARM,) for a in recents)
            assert (recents[0].rows[0].price, recents[0].rows[0].side) == (float(new_price(1000)), "BUY")

            await asyncio.to_thread(server.restart)  # the lean link and the pool's connections are now broken
            answers = await asyncio.gather(*(md.range(SYM, first + k * 100_000, first + k * 100_000 + 99_999)
                                             for k in range(50)))  # fmt: skip
            for k, a in enumerate(answers):  # one caller on the lean link, the others on stale pool connections
                assert a.tiers == (WARM,) and [r.trade_id for r in a.rows] == expected(k)
            for k in (0, 49, 7):
                a = await md.range(SYM, first + k * 100_000, first + k * 100_000 + 99_999)
                assert a.tiers == (WARM,) and [r.trade_id for r in a.rows] == expected(k)

            with pytest.raises(ResponseError, match="WRONGTYPE"):
                await md.range("ETHUSDT", first, now)
            a = await md.recent(SYM, 10)  # the link is still good after an error reply
            assert [r.trade_id for r in a.rows] == list(range(991, 1001))

            await asyncio.to_thread(server.stop)  # Redis gone: redis-py's error, as before
            with pytest.raises(RedisConnectionError):
                await md.recent(SYM, 10)
    finally:
        await client.aclose()


@pytest.mark.parametrize("name", ["binance_spot' OR '1'='1", "BINANCE_SPOT", ""])
def test_unknown_exchange_or_symbol_is_refused_before_any_query(name: str) -> None:
    """The exchange and the symbol name Redis keys and go into COLD's SQL: anything but a known exchange
    and a plain symbol is refused with a one-line error, before a connection is made."""
    settings = Settings(brain_redis_url="redis://127.0.0.1:9/0", brain_questdb_url="http://127.0.0.1:9")
    with pytest.raises(TickError, match="exchange"):
        TieredMarketData(settings, symbols=(SYM,), registry=CollectorRegistry(), exchange=name)
    with pytest.raises(TickError, match="symbol"):
        TieredMarketData(settings, symbols=("BTC'--",), registry=CollectorRegistry())


def test_query_with_redis_down_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there
    monkeypatch.setenv("BRAIN_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("BRAIN_QUESTDB_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(SystemExit) as exc:
        query.main([SYM])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tickbridge query: ConnectionError") and f":{port}" in err[0]


def test_hot_keeps_the_newest_when_an_old_trade_arrives_late() -> None:
    """A trade older than everything in a full HOT deque (a dead letter put back hours later) is not one of
    the last N and must not push a recent one out."""
    hot = _Hot(3)
    for i, ts in enumerate((10, 20, 30), start=1):
        hot.add(TickRow(ts, i, 1.0, 1.0, "BUY", ts))
    hot.add(TickRow(5, 99, 1.0, 1.0, "BUY", 5))
    assert [r.trade_id for r in hot.rows] == [1, 2, 3]
    hot.add(TickRow(40, 4, 1.0, 1.0, "BUY", 40))
    assert [r.trade_id for r in hot.rows] == [2, 3, 4] and hot.ids == {2, 3, 4}


async def test_a_trade_key_of_the_wrong_type_costs_hot_only_its_own_symbol(
    redis_server: RedisServer, services: ServiceRunner
) -> None:
    """`trades:ETHUSDT` holding a string must not stop the HOT follower for every symbol: BTCUSDT answers
    from HOT and stays current, ETHUSDT answers from WARM, and ETHUSDT joins HOT once its key is fixed."""
    settings = Settings(
        brain_redis_url=redis_server.url,
        brain_questdb_url="http://127.0.0.1:9",  # never asked: every request is inside HOT or WARM
        symbols=(SYM, "ETHUSDT"),
        hot_ticks=100,
        warm_window_s=300,
        consumer_name="t",
    )
    brain = make_client(redis_server.url)
    await brain.set(keys.trades_key("ETHUSDT"), "not a stream")
    await ensure_group(brain, keys.DEFAULT_STREAM_KEY, keys.DEFAULT_CONSUMER_GROUP)
    now = time.time_ns() // 1000
    btc = TradeSource([SYM], start_us=now - 10_000_000, step_us=10_000)
    await btc.append(brain, keys.DEFAULT_STREAM_KEY, 200)
    eth_members: list[int | str] = []
    for i in range(1, 21):  # ETHUSDT's WARM, as the consumer left it before the key went bad
        eth_members += [now - 5_000_000 + i, f"{i}|{new_price(i)}|0.5|BUY|{now}"]
    await brain.execute_command("ZADD", keys.warm_key("ETHUSDT"), *eth_members)
    services.start(BrainConsumer(settings, CollectorRegistry()))
    await eventually(lambda: equals(brain.xlen(keys.trades_key(SYM)), 200), timeout=10, what="BTC written")
    try:
        md = TieredMarketData(settings, registry=CollectorRegistry(), recheck_s=0.5)
        async with md:
            a = await md.recent(SYM, 10)
            assert a.tiers == (HOT,) and [r.trade_id for r in a.rows] == list(range(191, 201))
            e = await md.recent("ETHUSDT", 5)
            assert e.tiers == (WARM,) and [r.trade_id for r in e.rows] == list(range(16, 21))
            await btc.append(brain, keys.DEFAULT_STREAM_KEY, 5, live=True)  # HOT stays current for BTC

            async def btc_current() -> bool:
                got = await md.recent(SYM, 1)
                return got.tiers == (HOT,) and got.rows[0].trade_id == 205

            await eventually(btc_current, timeout=10, what="BTC's HOT follows new trades")

            await brain.delete(keys.trades_key("ETHUSDT"))  # fixed: ETHUSDT joins HOT at the next check

            async def eth_hot() -> bool:
                return (await md.recent("ETHUSDT", 5)).tiers == (HOT,)

            await eventually(eth_hot, timeout=10, what="ETHUSDT back in HOT")
    finally:
        await brain.aclose()


async def test_close_returns_after_trading_code_held_the_loop(redis_server: RedisServer) -> None:
    """Trading code that answers from HOT for over a second never yields, so the follower's XREAD reply
    waits to be resumed; a cancel landing then used to be absorbed, and `close()` took 5 s or more,
    in a longer run here forever."""
    settings = Settings(
        brain_redis_url=redis_server.url, brain_questdb_url="http://127.0.0.1:9", symbols=(SYM,), hot_ticks=100
    )
    brain = make_client(redis_server.url)
    now = time.time_ns() // 1000
    members: list[int | str] = []
    for i in range(1, 201):
        members += [now - 5_000_000 + i, f"{i}|{new_price(i)}|0.5|BUY|{now}"]
    await brain.execute_command("ZADD", keys.warm_key(SYM), *members)
    try:
        for _ in range(3):
            md = TieredMarketData(settings, registry=CollectorRegistry())
            await md.start()
            busy_until = time.perf_counter() + 1.5  # past the follower's 1 s XREAD BLOCK
            while time.perf_counter() < busy_until:
                assert (await md.recent(SYM, 10)).tiers == (HOT,)
            async with asyncio.timeout(3):  # a hang bound, not a speed claim (it used to take 5 s to forever)
                await md.close()
            assert md._task is not None and md._task.done()
    finally:
        await brain.aclose()


async def _ingest(
    client: object, symbol: str, trade_ids: Iterable[int], ts: Callable[[int], int], *, warm: bool = True
) -> None:
    """Per-symbol stream entries (and WARM members) in this order, as the consumer writes them."""
    cmds: list[Command] = []
    for tid in trade_ids:
        t = make_trade(symbol, tid, ts(tid))
        cmds.append(["XADD", keys.trades_key(symbol), "*", *encode_tick(t)])
        if warm:
            cmds.append(
                ["ZADD", keys.warm_key(symbol), t.timestamp, f"{tid}|{t.price}|{t.volume}|{t.side}|{t.recv_ts}"]
            )
    for reply in await execute_packed(client, cmds):  # type: ignore[arg-type]
        assert not isinstance(reply, BaseException), reply


def _ids(rows: Iterable[TickRow]) -> list[int]:
    return [r.trade_id for r in rows]


def test_hot_orders_by_time_evicts_the_oldest_and_drops_duplicates() -> None:
    """HOT holds the newest N by (timestamp, trade_id) whatever the arrival order."""
    hot = _Hot(3)
    for tid, ts in ((1, 10), (3, 30), (2, 20)):
        hot.add(TickRow(ts, tid, 1.0, 1.0, "BUY", ts))
    assert _ids(hot.rows) == [1, 2, 3]
    hot.add(TickRow(25, 5, 1.0, 1.0, "BUY", 25))  # out of order, full: the oldest (1) goes
    hot.add(TickRow(25, 4, 1.0, 1.0, "BUY", 25))  # same time: trade_id decides; 2 goes
    hot.add(TickRow(30, 3, 1.0, 1.0, "BUY", 30))  # a duplicate
    hot.add(TickRow(24, 6, 1.0, 1.0, "BUY", 24))  # older than all held
    assert _ids(hot.rows) == [4, 5, 3] and hot.ids == {3, 4, 5}


def _hot_and_warm_only(server: RedisServer, *symbols: str) -> Settings:
    return Settings(
        brain_redis_url=server.url,
        brain_questdb_url="http://127.0.0.1:9",  # never asked: every request is inside HOT or WARM
        symbols=symbols,
        hot_ticks=100,
        warm_window_s=300,
    )


def _clock() -> Callable[[int], int]:
    """Trade ID -> exchange time (µs), 1 ms apart, all within the last 10 s."""
    now = time.time_ns() // 1000
    return lambda tid: now - 10_000_000 + tid * 1000


async def test_hot_holds_the_newest_by_time_when_batches_arrive_out_of_order(redis_server: RedisServer) -> None:
    """With two consumers, a later batch (1101-1150) can land in the per-symbol stream before an earlier one
    (1001-1100). HOT must still hold the newest 100 by exchange time, and `range()` may answer from HOT
    only where HOT holds every trade: it used to return 1001-1100 for the newest 100, and 99 of 149 rows."""
    settings = _hot_and_warm_only(redis_server, SYM)
    brain = make_client(redis_server.url)
    ts = _clock()

    await _ingest(brain, SYM, range(901, 1001), ts)
    try:
        async with TieredMarketData(settings, registry=CollectorRegistry()) as md:
            assert (await md.recent(SYM, 100)).tiers == (HOT,)
            await _ingest(brain, SYM, range(1101, 1151), ts)
            await _ingest(brain, SYM, range(1001, 1101), ts)
            await _ingest(brain, SYM, [1120, 950, 1151], ts)  # a duplicate, one older than HOT, then in order
            await eventually(lambda: _hot_last(md, 1151), timeout=10, what="HOT read the whole stream")

            a = await md.recent(SYM, 100)
            assert a.tiers == (HOT,) and _ids(a.rows) == list(range(1052, 1152))
            assert _ids(md.hot(SYM)) == list(range(1052, 1152))
            a = await md.range(SYM, ts(1060), ts(1151))
            assert a.tiers == (HOT,) and _ids(a.rows) == list(range(1060, 1152))
            a = await md.range(SYM, ts(1002), ts(1151))  # older than HOT's oldest: WARM holds it all
            assert a.tiers == (WARM,) and _ids(a.rows) == list(range(1002, 1152))
    finally:
        await brain.aclose()


async def test_a_warm_key_of_the_wrong_type_costs_hot_only_its_own_symbol(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """WARM of ETHUSDT holding a string used to send the follower into a retry loop with HOT empty for every
    symbol. Now BTCUSDT answers from HOT and stays current; ETHUSDT is left out of HOT (it could not be
    prefilled, so HOT would miss trades it claims to hold) and its WARM reads fail naming the key, until
    the key is fixed and ETHUSDT joins HOT at the next check."""
    eth = "ETHUSDT"
    settings = _hot_and_warm_only(redis_server, SYM, eth)
    brain = make_client(redis_server.url)
    ts = _clock()

    await brain.set(keys.warm_key(eth), "not a sorted set")
    await _ingest(brain, SYM, range(1, 201), ts)
    await _ingest(brain, eth, range(1, 21), ts, warm=False)  # the consumer's WARM ZADD fails, the stream is written
    registry = CollectorRegistry()
    bad_warm = f"WRONGTYPE {keys.warm_key(eth)} is not a sorted set"
    try:
        async with TieredMarketData(settings, registry=registry, recheck_s=0.5) as md:
            a = await md.recent(SYM, 10)
            assert a.tiers == (HOT,) and _ids(a.rows) == list(range(191, 201))
            with pytest.raises(ResponseError, match=bad_warm):
                await md.recent(eth, 5)
            with pytest.raises(ResponseError, match=bad_warm):
                await md.range(eth, ts(1), ts(20))
            await _ingest(brain, SYM, range(201, 206), ts)

            async def btc_current() -> bool:
                got = await md.recent(SYM, 1)
                return got.tiers == (HOT,) and _ids(got.rows) == [205]

            await eventually(btc_current, timeout=10, what="BTC's HOT follows new trades")
            # Counted once, not once per retry (prefills run every 0.5 s while a key is bad).
            assert registry.get_sample_value("tickbridge_tiered_follow_errors_total") == 1

            # A person asking gets the same error in one line.
            monkeypatch.setenv("BRAIN_REDIS_URL", redis_server.url)
            monkeypatch.setenv("BRAIN_QUESTDB_URL", "http://127.0.0.1:9")
            capsys.readouterr()
            with pytest.raises(SystemExit) as exc:
                await asyncio.to_thread(query.main, [eth, "--no-follow"])
            err = capsys.readouterr().err.strip().splitlines()
            assert exc.value.code == 1 and len(err) == 1 and bad_warm in err[0]

            await brain.delete(keys.warm_key(eth))  # fixed: ETHUSDT joins HOT at the next check
            await _ingest(brain, eth, range(21, 31), ts)

            async def eth_hot() -> bool:
                got = await md.recent(eth, 5)
                return got.tiers == (HOT,) and _ids(got.rows) == list(range(26, 31))

            await eventually(eth_hot, timeout=10, what="ETHUSDT back in HOT")
            assert _ids((await md.recent(SYM, 3)).rows) == [203, 204, 205]
    finally:
        await brain.aclose()


async def test_recent_of_zero_is_empty_and_of_a_negative_count_is_refused(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`recent(sym, 0)` used to send `ZRANGE key 0 -1` (the whole WARM window) and a negative n nearly all
    of it. Whatever tier would answer: 0 is no rows, a negative count a ValueError."""
    settings = Settings(
        brain_redis_url=redis_server.url,
        brain_questdb_url="http://127.0.0.1:9",  # unreachable: an empty answer needs no tier at all
        symbols=(SYM,),
        hot_ticks=100,
        warm_window_s=300,
    )
    brain = make_client(redis_server.url)
    now = time.time_ns() // 1000
    await _ingest(brain, SYM, range(1, 301), lambda tid: now - 10_000_000 + tid * 1000)
    try:
        for follow, tier in ((False, WARM), (True, HOT)):
            async with TieredMarketData(settings, registry=CollectorRegistry(), follow=follow) as md:
                assert (await md.recent(SYM, 5)).tiers == (tier,)  # the tier that would answer
                for symbol in (SYM, "ETHUSDT"):  # ETHUSDT has no trades: it would go to COLD
                    assert (await md.recent(symbol, 0)).rows == []
                    with pytest.raises(ValueError, match="n must be >= 0"):
                        await md.recent(symbol, -3)
                    with pytest.raises(ValueError, match="limit must be >= 0"):
                        await md.range(symbol, now - 10_000_000, now, limit=-1)

        monkeypatch.setenv("BRAIN_REDIS_URL", redis_server.url)
        monkeypatch.setenv("BRAIN_QUESTDB_URL", "http://127.0.0.1:9")
        capsys.readouterr()
        await asyncio.to_thread(query.main, [SYM, "--recent", "0", "--no-follow"])
        assert f"{SYM}: 0 trades" in capsys.readouterr().out
        with pytest.raises(SystemExit) as exc:
            query.main([SYM, "--recent", "-3"])
        assert exc.value.code == 2 and "--recent" in capsys.readouterr().err
    finally:
        await brain.aclose()


async def test_a_writer_behind_more_than_warm_leaves_no_hole(
    redis_server: RedisServer, questdb_factory: Callable[..., QuestDBServer], services: ServiceRunner
) -> None:
    """The writer stopped (QuestDB down, a long catch-up) while trades older than WARM's window reached the
    Brain: they are in neither WARM nor QuestDB, only in the per-symbol stream. `range()` and `recent()` read
    them back from there, pending ones included, so no hole opens between COLD and WARM, and nothing is
    doubled once the writer has caught up."""
    qserver = questdb_factory()
    settings = pipeline_settings(redis_server, qserver, consumer_claim_idle_ms=1000)
    brain = make_client(redis_server.url)
    qdb = QuestDBHttp(qserver.url)
    stream, key = keys.DEFAULT_STREAM_KEY, keys.trades_key(SYM)
    await ensure_group(brain, stream, keys.DEFAULT_CONSUMER_GROUP)
    now = time.time_ns() // 1000
    services.start(BrainConsumer(settings, CollectorRegistry()))
    writer = services.start(BrainWriter(settings, CollectorRegistry()))
    try:
        # 1..1000 an hour ago reach QuestDB; then the writer stops.
        await TradeSource([SYM], first_id=1, start_us=now - 3_600_000_000).append(brain, stream, 1000)

        async def in_questdb(n: int) -> bool:
            await qdb.wait_applied("trades")
            return bool(await qdb.scalar("SELECT count() FROM trades") == n)

        await eventually(lambda: in_questdb(1000), timeout=30, interval=0.2, what="1000 rows in QuestDB")
        await services.stop_one(writer)
        # 1001..2000 half an hour ago (older than WARM's window) and 2001..3000 in the last seconds.
        await TradeSource([SYM], first_id=1001, start_us=now - 1_800_000_000).append(brain, stream, 1000)
        await TradeSource([SYM], first_id=2001, start_us=now - 10_000_000, step_us=5000).append(brain, stream, 1000)

        async def consumed() -> bool:
            last = await brain.xrevrange(key, count=1)
            return bool(last and last[0][1][b"trade_id"] == b"3000")

        await eventually(consumed, timeout=20, what="the consumer wrote 3000")
        await eventually(lambda: _zcard(brain, 1000), timeout=5, what="WARM holds the recent 1000 only")
        # A writer that read 300 of them and died before QuestDB confirmed: those are pending, not confirmed.
        await brain.xreadgroup(keys.WRITER_GROUP, "gone", {key: ">"}, count=300)

        registry = CollectorRegistry()
        async with TieredMarketData(settings, registry=registry) as md:
            a = await md.range(SYM, now - 7_200_000_000, now + 1_000_000)
            assert a.tiers == (WARM, COLD) and [r.trade_id for r in a.rows] == list(range(1, 3001))
            a = await md.range(SYM, now - 1_900_000_000, now - 1_700_000_000)
            assert a.tiers == (COLD,) and [r.trade_id for r in a.rows] == list(range(1001, 2001))
            a = await md.range(SYM, now - 7_200_000_000, now + 1_000_000, limit=1500)
            assert [r.trade_id for r in a.rows] == list(range(1, 1501))
            a = await md.recent(SYM, 2500)
            assert a.tiers == (WARM, COLD) and [r.trade_id for r in a.rows] == list(range(501, 3001))
            assert (registry.get_sample_value("tickbridge_tiered_backlog_rows_total") or 0) >= 2000

            # The writer catches up (the dead one's pending entries claimed): the same answers, once each.
            services.start(BrainWriter(settings, CollectorRegistry()))
            await eventually(lambda: in_questdb(3000), timeout=30, interval=0.2, what="3000 rows in QuestDB")
            a = await md.range(SYM, now - 7_200_000_000, now + 1_000_000)
            assert [r.trade_id for r in a.rows] == list(range(1, 3001))
            a = await md.recent(SYM, 2500)
            assert [r.trade_id for r in a.rows] == list(range(501, 3001))
    finally:
        await brain.aclose()
        await qdb.close()
