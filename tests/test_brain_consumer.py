"""Brain consumer against a real redis-server: exactly once, recovery, claiming, dead letters, sharing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from conftest import ServiceRunner, equals, eventually
from tickbridge.brain.consumer import BrainConsumer
from tickbridge.core import keys
from tickbridge.core.redis_io import ensure_group, execute_packed, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.tick import TickError
from tickbridge.core.wire import decode_entry, encode_tick, match_trade
from tickbridge_dev.devstack.servers import RedisServer
from tickbridge_dev.loadgen.brain import TradeSource, as_mapping, make_depth, make_trade

pytestmark = pytest.mark.timeout(60)

STREAM = keys.DEFAULT_STREAM_KEY
GROUP = keys.DEFAULT_CONSUMER_GROUP
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


def settings_for(server: RedisServer, **kw: Any) -> Settings:
    base: dict[str, Any] = {"brain_redis_url": server.url, "symbols": SYMBOLS, "consumer_claim_idle_ms": 1000}
    base.update(kw)
    return Settings(**base)


@pytest.fixture
async def brain(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = make_client(redis_server.url)
    yield client
    await client.aclose()


async def src_ids(client: aioredis.Redis, key: str) -> list[bytes]:
    return [fields[b"src_id"] for _, fields in await client.xrange(key)]


async def total_written(client: aioredis.Redis) -> int:
    return sum([await client.xlen(keys.trades_key(s)) for s in SYMBOLS])


async def test_writes_trades_depth_warm_and_dead_letters(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    await ensure_group(brain, STREAM, GROUP)
    source = TradeSource(SYMBOLS)
    await source.append(brain, STREAM, 300)
    await brain.xadd(STREAM, as_mapping(encode_tick(make_depth("BTCUSDT", 10, source.ts))))
    await brain.xadd(STREAM, {"type": "TRADE", "symbol": "BTCUSDT", "price": "nan"})
    registry = CollectorRegistry()
    services.start(BrainConsumer(settings_for(redis_server, consumer_name="c1"), registry))

    await eventually(lambda: equals(total_written(brain), 300), timeout=10, what="300 trades written")
    await eventually(lambda: equals(brain.xlen(keys.CONSUMER_DEAD_LETTER), 1), timeout=5, what="dead letter")
    assert await brain.xlen(keys.depth_key("BTCUSDT")) == 1
    for sym in SYMBOLS:
        ids = await src_ids(brain, keys.trades_key(sym))
        assert len(ids) == len(set(ids)) == 100
        assert await brain.zcard(keys.warm_key(sym)) == 100
        # Per-symbol order follows the Brain stream with one consumer.
        trade_ids = [int(f[b"trade_id"]) for _, f in await brain.xrange(keys.trades_key(sym))]
        assert trade_ids == list(range(1, 101))
    dl = (await brain.xrange(keys.CONSUMER_DEAD_LETTER))[0][1]
    assert b"reason" in dl and b"src_id" in dl
    info = (await brain.xinfo_groups(STREAM))[0]
    assert info["pending"] == 0
    assert registry.get_sample_value("tickbridge_consumer_dead_letters_total") == 1
    assert registry.get_sample_value("tickbridge_consumer_entries_total", {"outcome": "written"}) == 301


async def test_upgrade_folds_the_pending_lists_of_older_consumers_and_dead_letters_poison(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    """Issue 20: consumers of an older version (XREADGROUP) left pending entries, their own and a dead
    member's; the cursor consumer handles each once at start (acked and written in one step), then reads on
    from the group's position: every trade once, nothing pending."""
    await ensure_group(brain, STREAM, GROUP)
    # A poison entry: delivered to "me" again and again (e.g. the process crashed while handling it).
    poison_cmd = TradeSource(["XRPUSDT"]).next_commands(STREAM, 1)[0]
    poison_id = await brain.xadd(STREAM, as_mapping(poison_cmd[3:]))
    await brain.xreadgroup(GROUP, "me", {STREAM: ">"}, count=1)
    for _ in range(2):
        await brain.xclaim(STREAM, GROUP, "me", 0, [poison_id])
    source = TradeSource(SYMBOLS)
    await source.append(brain, STREAM, 30)
    # 10 delivered to "me" before a crash, 10 to a consumer that died, 10 never delivered.
    await brain.xreadgroup(GROUP, "me", {STREAM: ">"}, count=10)
    await brain.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=10)
    registry = CollectorRegistry()
    services.start(BrainConsumer(settings_for(redis_server, consumer_name="me", consumer_max_deliveries=3), registry))

    await eventually(lambda: equals(total_written(brain), 30), timeout=15, what="30 trades written once")
    await eventually(lambda: equals(brain.xlen(keys.CONSUMER_DEAD_LETTER), 1), timeout=5, what="poison dead-lettered")
    dl = (await brain.xrange(keys.CONSUMER_DEAD_LETTER))[0][1]
    assert dl[b"src_id"] == poison_id and b"delivered" in dl[b"reason"]
    ids: list[bytes] = []
    for sym in SYMBOLS:
        ids += await src_ids(brain, keys.trades_key(sym))
    assert len(ids) == len(set(ids)) == 30
    await eventually(lambda: _pending_zero(brain), timeout=5, what="group drained")
    assert (registry.get_sample_value("tickbridge_consumer_claimed_total") or 0) >= 20


async def _pending_zero(client: aioredis.Redis) -> bool:
    return bool((await client.xinfo_groups(STREAM))[0]["pending"] == 0)


async def test_a_second_consumer_is_a_harmless_standby_and_takes_over(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    """Issue 20: the group is a cursor moved by the ingest call itself, which writes nothing when another
    consumer moved the group since the batch was read. Two consumers on one stream: every trade once, in the
    Brain stream's order per symbol (by construction now), and the standby takes over when the other stops."""
    await ensure_group(brain, STREAM, GROUP)
    source = TradeSource(SYMBOLS)
    registries = [CollectorRegistry(), CollectorRegistry()]
    a = services.start(BrainConsumer(settings_for(redis_server, consumer_name="a", consumer_batch=200), registries[0]))
    b = services.start(BrainConsumer(settings_for(redis_server, consumer_name="b", consumer_batch=200), registries[1]))
    for _ in range(20):  # a steady flow, so both consumers race for batches
        await source.append(brain, STREAM, 500)
        await asyncio.sleep(0.01)
    await eventually(lambda: equals(total_written(brain), 10_000), timeout=30, what="10k written")
    assert a.handled + b.handled == 10_000
    active, standby = (a, b) if a.handled >= b.handled else (b, a)
    await services.stop_one(active)
    for _ in range(10):
        await source.append(brain, STREAM, 500)
        await asyncio.sleep(0.01)
    await eventually(lambda: equals(total_written(brain), 15_000), timeout=30, what="15k written after the stop")
    assert a.handled + b.handled == 15_000 and standby.handled >= 5_000
    for sym, count in source.counts().items():
        trade_ids = [int(f[b"trade_id"]) for _, f in await brain.xrange(keys.trades_key(sym))]
        assert trade_ids == list(range(1, count + 1))
    info = (await brain.xinfo_groups(STREAM))[0]
    assert info["pending"] == 0 and info["lag"] == 0


async def test_metrics_and_trimming(brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner) -> None:
    await ensure_group(brain, STREAM, GROUP)
    source = TradeSource(SYMBOLS, start_us=None)
    await source.append(brain, STREAM, 1000, live=True)
    registry = CollectorRegistry()
    svc = BrainConsumer(
        settings_for(redis_server, consumer_name="m"), registry, trim_retention_s=0, monitor_interval_s=0.1
    )
    services.start(svc)
    await eventually(lambda: equals(total_written(brain), 1000), timeout=10, what="written")

    async def metrics_ok() -> bool:
        link = registry.get_sample_value("tickbridge_consumer_vps_link_up")
        lag = registry.get_sample_value("tickbridge_consumer_lag_entries")
        return link == 1 and lag == 0

    await eventually(metrics_ok, timeout=5, what="link up, lag 0")
    staleness = registry.get_sample_value("tickbridge_consumer_data_staleness_seconds")
    assert staleness is not None and staleness < 10
    await svc.trim()
    assert await brain.xlen(STREAM) < 1000  # acked entries trimmed (approximate: whole nodes)
    info = await brain.xinfo_stream(STREAM)
    assert info["last-generated-id"]  # the top ID stays: the forwarder's duplicate check keeps working


async def test_brain_redis_down_shows_in_metrics_instead_of_freezing(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    """With the Brain Redis gone no tick can arrive: staleness must keep growing and the link read down,
    so DataStale / VPSDisconnected / BrainRedisDown can fire (they used to keep their last healthy values)."""
    await ensure_group(brain, STREAM, GROUP)
    await TradeSource(SYMBOLS, start_us=None).append(brain, STREAM, 100, live=True)
    registry = CollectorRegistry()
    services.start(BrainConsumer(settings_for(redis_server, consumer_name="d"), registry, monitor_interval_s=0.1))

    def sample(name: str) -> float | None:
        return registry.get_sample_value(f"tickbridge_consumer_{name}")

    async def reads(link: float, redis_up: float) -> bool:
        return sample("vps_link_up") == link and sample("brain_redis_up") == redis_up

    await eventually(lambda: reads(1, 1), timeout=10, what="link and Redis up")
    redis_server.kill9()
    await eventually(lambda: reads(0, 0), timeout=10, what="link and Redis down")
    first = sample("data_staleness_seconds")
    await asyncio.sleep(1.0)
    later = sample("data_staleness_seconds")
    assert first is not None and later is not None and later >= first + 0.8, (first, later)
    redis_server.start()

    async def redis_back() -> bool:
        return sample("brain_redis_up") == 1

    await eventually(redis_back, timeout=15, what="Redis back")


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"price": "0.00000000"},
        {"price": "1e5"},
        {"price": "-1.0"},
        {"volume": "0"},
        {"volume": "0.0001"},
        {"side": "buy"},
        {"symbol": "btcusdt"},
        {"symbol": "B"},
        {"timestamp": "1"},
        {"timestamp": "9999999999999999"},
        {"trade_id": "9223372036854775808"},
        {"trade_id": "9223372036854775807"},
        {"trade_id": "12a"},
        {"recv_ts": ""},
        {"type": "DEPTH"},
        {"exchange": "binance_spot\x00type"},
        {"price": "100.0\x00volume"},
    ],
)
def test_fast_trade_check_agrees_with_decode_entry(change: dict[str, str]) -> None:
    fields = [str(x).encode() for x in encode_tick(make_trade("BTCUSDT", 7, 1_763_900_000_000_000))]
    for name, value in change.items():
        fields[fields.index(name.encode()) + 1] = value.encode()
    try:
        decode_entry(fields)
        valid = True
    except TickError:
        valid = False
    fast = match_trade(fields)
    # The fast path may decline a valid entry (then decode_entry decides), never accept an invalid one.
    assert not (fast is not None and not valid)
    if not change:
        assert fast == (b"BTCUSDT", b"binance_spot")


async def test_entry_whose_append_fails_is_dead_lettered_without_harming_its_batch(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    await ensure_group(brain, STREAM, GROUP)
    await brain.set(keys.trades_key("XRPUSDT"), "not a stream")  # every XADD to it fails (WRONGTYPE)
    good = TradeSource(["BTCUSDT"])
    await good.append(brain, STREAM, 5)
    bad_cmd = TradeSource(["XRPUSDT"]).next_commands(STREAM, 1)[0]
    bad_id = await brain.xadd(STREAM, as_mapping(bad_cmd[3:]))
    await good.append(brain, STREAM, 5)
    registry = CollectorRegistry()
    settings = settings_for(redis_server, consumer_name="me", consumer_max_deliveries=2, symbols=(*SYMBOLS, "XRPUSDT"))
    services.start(BrainConsumer(settings, registry))

    await eventually(lambda: equals(brain.xlen(keys.CONSUMER_DEAD_LETTER), 1), timeout=20, what="dead-lettered")
    dl = (await brain.xrange(keys.CONSUMER_DEAD_LETTER))[0][1]
    # Dead-lettered by the same call, with the error (issue 20: nothing stays pending to be retried).
    assert dl[b"src_id"] == bad_id and b"WRONGTYPE" in dl[b"reason"] and dl[b"symbol"] == b"XRPUSDT"
    trade_ids = [int(f[b"trade_id"]) for _, f in await brain.xrange(keys.trades_key("BTCUSDT"))]
    assert sorted(trade_ids) == list(range(1, 11))  # the rest of the batch: written exactly once
    # ... and in WARM, the ones before the failing entry too (the call used to stop at the failing XADD,
    # leaving 1-5 written and acked but never in WARM)
    warm_ids = sorted(int(m.split(b"|")[0]) for m in await brain.zrange(keys.warm_key("BTCUSDT"), 0, -1))
    assert warm_ids == list(range(1, 11))
    await eventually(lambda: _pending_zero(brain), timeout=5, what="group drained")
    assert (registry.get_sample_value("tickbridge_consumer_errors_total", {"kind": "response"}) or 0) >= 1
    assert registry.get_sample_value("tickbridge_consumer_dead_letters_total") == 1


async def test_ingest_call_replayed_writes_nothing_twice(brain: aioredis.Redis, redis_server: RedisServer) -> None:
    """Two consumers racing for the same entries (or a retried call): the second call finds the group moved
    and writes nothing."""
    await ensure_group(brain, STREAM, GROUP)
    source = TradeSource(SYMBOLS)
    await source.append(brain, STREAM, 30)
    await brain.xadd(STREAM, as_mapping(encode_tick(make_depth("BTCUSDT", 5, source.ts))))
    svc = BrainConsumer(settings_for(redis_server, consumer_name="me"), CollectorRegistry())
    svc.client = make_client(redis_server.url)
    try:
        await svc._setup()
        entries = await svc._read(block=False)
        assert len(entries) == 31
        assert svc.position is not None
        cmd, dead, truncated, _ = svc._build(entries, {}, svc.position)
        assert dead == truncated == 0
        first, second = await execute_packed(brain, [cmd, cmd])
        assert first == [31, 0, 0, 0, b"", 0, 0] and second == [0, 0, 0, 0, b"", 0, 1]
        info = (await brain.xinfo_groups(STREAM))[0]
        assert info["last-delivered-id"] == entries[-1][0] and info["lag"] == 0 and info["pending"] == 0
        for sym in SYMBOLS:
            ids = await src_ids(brain, keys.trades_key(sym))
            assert len(ids) == len(set(ids)) == 10
            assert await brain.zcard(keys.warm_key(sym)) == 10
        assert await brain.xlen(keys.depth_key("BTCUSDT")) == 1
    finally:
        await svc.client.aclose()


async def test_mixed_entries_keep_per_symbol_order_and_are_written_once(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    """Regular trades, valid trades in another field order, order-book diffs and an invalid entry land
    once each, and every per-symbol stream keeps the order of the Brain stream (an odd-layout trade used
    to go ahead of its batch's regular trades of the same symbol). A WARM key of the wrong type is
    counted and costs no trade (it used to fail the whole call after the writes)."""
    await ensure_group(brain, STREAM, GROUP)
    await brain.set(keys.warm_key("SOLUSDT"), "not a sorted set")
    expected: dict[str, list[int]] = {s: [] for s in SYMBOLS}
    depth_ids: list[int] = []
    ts = 1_763_900_000_000_000
    for i in range(1, 601):
        sym = SYMBOLS[i % 3]
        fields = encode_tick(make_trade(sym, i, ts + i))
        if i % 50 == 7:  # the same trade, fields in another order: valid, decoded the slow way
            pairs = list(zip(fields[::2], fields[1::2], strict=True))
            fields = [x for pair in reversed(pairs) for x in pair]
        await brain.xadd(STREAM, as_mapping(fields))
        expected[sym].append(i)
        if i % 20 == 0:
            await brain.xadd(STREAM, as_mapping(encode_tick(make_depth(sym, i, ts + i))))
            depth_ids.append(i)
        if i == 300:
            await brain.xadd(STREAM, {"type": "TRADE", "symbol": "BTCUSDT", "price": "nan"})
    registry = CollectorRegistry()
    services.start(BrainConsumer(settings_for(redis_server, consumer_name="c1", consumer_batch=100), registry))

    await eventually(lambda: equals(total_written(brain), 600), timeout=15, what="600 trades written")
    await eventually(lambda: _pending_zero(brain), timeout=5, what="group drained")
    for sym in SYMBOLS:
        trade_ids = [int(f[b"trade_id"]) for _, f in await brain.xrange(keys.trades_key(sym))]
        assert trade_ids == expected[sym]
        per_symbol = [int(f[b"first_update_id"]) for _, f in await brain.xrange(keys.depth_key(sym))]
        assert per_symbol == [i for i in depth_ids if SYMBOLS[i % 3] == sym]
    assert await brain.xlen(keys.CONSUMER_DEAD_LETTER) == 1
    assert await brain.zcard(keys.warm_key("BTCUSDT")) == 200
    assert (registry.get_sample_value("tickbridge_consumer_errors_total", {"kind": "warm"}) or 0) >= 1
    assert registry.get_sample_value("tickbridge_consumer_errors_total", {"kind": "response"}) == 0
    assert registry.get_sample_value("tickbridge_consumer_entries_total", {"outcome": "written"}) == 600 + 30


async def test_a_stray_group_at_zero_does_not_stop_the_trimming(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    """Issue 14: a group nobody reads (created over the link, or a CONSUMER_GROUP that differs between the
    hosts) sits at 0-0; only CONSUMER_GROUP decides what the Brain stream may lose, or it never trims."""
    await ensure_group(brain, STREAM, GROUP)
    await brain.xgroup_create(STREAM, "stray-group", id="0")
    source = TradeSource(SYMBOLS, start_us=None)
    await source.append(brain, STREAM, 1000, live=True)
    svc = services.start(BrainConsumer(settings_for(redis_server, consumer_name="t"), CollectorRegistry(),
                                       trim_retention_s=0, monitor_interval_s=0.1))  # fmt: skip
    await eventually(lambda: equals(total_written(brain), 1000), timeout=10, what="written")
    await svc.trim()
    assert await brain.xlen(STREAM) < 1000, "the stray group at 0-0 held the trimming back"
