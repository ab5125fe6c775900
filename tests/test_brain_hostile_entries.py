"""What a hostile or buggy peer can put on the Brain stream (issue 14, items 1 and 5), against a real redis-server.

Only the contract's fields of a valid tick of a configured symbol travel past the consumer; anything else
(too wide, extra or duplicate fields, a symbol outside SYMBOLS) is dead-lettered with a capped copy, the
dead-letter stream is capped in entries and bytes, and the pipeline goes on. The consumer also reports the
Brain Redis' memory, so BrainRedisMemoryHigh can fire before `maxmemory` stops the pipeline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from conftest import ServiceRunner, eventually
from tickbridge.brain import deadletters
from tickbridge.brain.consumer import BrainConsumer
from tickbridge.core import keys
from tickbridge.core.redis_io import ensure_group, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import DEPTH_FIELDS, TRADE_FIELDS, encode_tick
from tickbridge_dev.devstack.servers import RedisServer
from tickbridge_dev.loadgen.brain import make_depth, make_trade

pytestmark = pytest.mark.timeout(90)

STREAM = keys.DEFAULT_STREAM_KEY
GROUP = keys.DEFAULT_CONSUMER_GROUP
SYMBOLS = ("BTCUSDT", "ETHUSDT")
TS = 1_763_900_000_000_000


def consumer(server: RedisServer, registry: CollectorRegistry, **attrs: Any) -> BrainConsumer:
    settings = Settings(
        brain_redis_url=server.url, symbols=SYMBOLS, consumer_name="c1", consumer_claim_idle_ms=1000,
        consumer_max_deliveries=2,
    )  # fmt: skip
    svc = BrainConsumer(settings, registry, monitor_interval_s=0.1)
    for name, value in attrs.items():  # the dead-letter caps, small enough for a test
        setattr(svc, name, value)
    return svc


@pytest.fixture
async def brain(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = make_client(redis_server.url)
    await ensure_group(client, STREAM, GROUP)
    yield client
    await client.aclose()


def trade(symbol: str, trade_id: int) -> list[bytes]:
    return [str(x).encode() for x in encode_tick(make_trade(symbol, trade_id, TS + trade_id))]


async def xadd(client: aioredis.Redis, fields: list[bytes]) -> bytes:
    reply: bytes = await client.execute_command("XADD", STREAM, "*", *fields)  # type: ignore[no-untyped-call]
    return reply


async def drained(client: aioredis.Redis) -> bool:
    info = (await client.xinfo_groups(STREAM))[0]
    return bool(info["pending"] == 0 and info["lag"] == 0)


async def per_symbol(client: aioredis.Redis, key: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await client.xrange(key)]


async def dead_letters(client: aioredis.Redis) -> dict[bytes, dict[bytes, bytes]]:
    return {f[b"src_id"]: f for _, f in await client.xrange(keys.CONSUMER_DEAD_LETTER)}


async def test_wide_entries_are_dead_lettered_and_the_pipeline_goes_on(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    """10,000 field pairs used to make brain.lua's `unpack` raise on every attempt (dead-letter path included):
    the entry stayed pending for good and own-pending recovery stopped every later entry."""
    good: list[bytes] = []
    for i in range(1, 6):
        good.append(await xadd(brain, trade("BTCUSDT", i)))
    wide = [x for i in range(10_000) for x in (b"f%d" % i, b"v%d" % i)]
    wide_trade = trade("BTCUSDT", 6) + [x for i in range(10_000) for x in (b"junk%d" % i, b"x")]
    bad = [await xadd(brain, wide), await xadd(brain, wide_trade)]
    for i in range(7, 12):
        good.append(await xadd(brain, trade("BTCUSDT", i)))
    registry = CollectorRegistry()
    services.start(consumer(redis_server, registry))

    await eventually(lambda: drained(brain), timeout=30, what="the group drained (lag 0, nothing pending)")
    rows = await per_symbol(brain, keys.trades_key("BTCUSDT"))
    assert [r[b"src_id"] for r in rows] == good
    letters = await dead_letters(brain)
    assert sorted(letters) == sorted(bad)
    for letter in letters.values():
        assert len(letter) <= 2 * 64 + 8, "the dead letter keeps a capped copy"
        assert sum(len(k) + len(v) for k, v in letter.items()) <= 20_000
        assert b"truncated" in letter
    assert registry.get_sample_value("tickbridge_consumer_dead_letters_total") == 2


async def test_extra_fields_never_reach_the_per_symbol_streams(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    """A valid trade with ~3,000 extra fields used to pass and be copied, junk and all, into the per-symbol
    stream (and on to everyone who reads it); one extra field, a duplicate field or a missing one as well."""
    junk = [x for i in range(3_000) for x in (b"junk%d" % i, b"\xff" * 8)]
    depth = [str(x).encode() for x in encode_tick(make_depth("ETHUSDT", 10, TS))]
    level = ["1" * 20 + "." + "1" * 18, "2" * 20 + "." + "2" * 18]
    big_levels = orjson.dumps([level] * 10_000)  # the most decode_entry accepts: 850 KB a side
    cases = {
        "3,000 extra fields": trade("BTCUSDT", 2) + junk,
        "one extra field": [*trade("BTCUSDT", 3), b"note", b"hello"],
        "duplicate field": [*trade("BTCUSDT", 4), b"price", b"1.00"],
        "missing field": trade("BTCUSDT", 5)[:-2],
        "depth with an extra field": [*depth, b"evil", b"1"],
        "depth with a duplicate field": [*depth, b"bids", b"[]"],
        "oversize depth (valid levels, 1.7 MB)": [
            str(x).encode() for x in encode_tick(make_depth("ETHUSDT", 20, TS))[:-6]
        ]
        + [b"bids", big_levels, b"asks", big_levels, b"recv_ts", str(TS).encode()],
    }
    good = [await xadd(brain, trade("BTCUSDT", 1))]
    bad = {await xadd(brain, fields): label for label, fields in cases.items()}
    reordered = trade("BTCUSDT", 6)
    reordered = [x for k, v in reversed(list(zip(reordered[::2], reordered[1::2], strict=True))) for x in (k, v)]
    good.append(await xadd(brain, reordered))  # valid in another field order: written, in the contract's order
    good_depth = await xadd(brain, depth)
    registry = CollectorRegistry()
    services.start(consumer(redis_server, registry))

    await eventually(lambda: drained(brain), timeout=30, what="the group drained")
    rows = await per_symbol(brain, keys.trades_key("BTCUSDT"))
    assert [r[b"src_id"] for r in rows] == good
    for row in rows:
        assert list(row) == [b"src_id", *(f.encode() for f in TRADE_FIELDS)], "only the contract's fields"
    depth_rows = await per_symbol(brain, keys.depth_key("ETHUSDT"))
    assert [r[b"src_id"] for r in depth_rows] == [good_depth]
    assert list(depth_rows[0]) == [b"src_id", *(f.encode() for f in DEPTH_FIELDS)]
    letters = await dead_letters(brain)
    assert set(letters) == set(bad), {bad.get(k, k) for k in set(letters) ^ set(bad)}


async def test_symbols_outside_symbols_are_dead_lettered_and_create_no_keys(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    """A valid-looking symbol that is not configured used to get its own stream, WARM set (then writer group
    and QuestDB symbol): an unbounded number of keys from the link."""
    good = [await xadd(brain, trade("ETHUSDT", 1))]
    bad = [await xadd(brain, trade(f"ZZ{i}USDT", 1)) for i in range(20)]
    bad.append(await xadd(brain, [str(x).encode() for x in encode_tick(make_depth("QQQUSDT", 1, TS))]))
    good.append(await xadd(brain, trade("ETHUSDT", 2)))
    services.start(consumer(redis_server, CollectorRegistry()))

    await eventually(lambda: drained(brain), timeout=30, what="the group drained")
    assert [r[b"src_id"] for r in await per_symbol(brain, keys.trades_key("ETHUSDT"))] == good
    letters = await dead_letters(brain)
    assert sorted(letters) == sorted(bad)
    assert all(b"SYMBOLS" in letter[b"reason"] for letter in letters.values())
    created = sorted(k.decode() for k in await brain.keys("market:*"))
    assert created == sorted([STREAM, keys.trades_key("ETHUSDT"), keys.warm_key("ETHUSDT")])
    # `tickbridge deadletters --replay` leaves them too (under the same SYMBOLS), then puts them back once
    # the symbols are configured.
    listed = await deadletters.read_all(brain)
    result = await deadletters.replay(brain, listed, symbols=SYMBOLS)
    assert result.replayed == 0 and sum(result.invalid.values()) == 21
    result = await deadletters.replay(brain, listed, symbols=(*SYMBOLS, "QQQUSDT", *(f"ZZ{i}USDT" for i in range(20))))
    assert result.replayed == 21 and await brain.xlen(keys.CONSUMER_DEAD_LETTER) == 0
    assert await brain.xlen(keys.depth_key("QQQUSDT")) == 1


async def test_dead_letters_are_capped_in_count_and_bytes_and_stay_listable(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    """Dead letters used to keep whole raw values without any cap: 200 entries of 1 MB each were 200 MB of
    Brain Redis. Now: at most `dead_letter_maxlen` entries of at most `dead_letter_max_bytes`, counted."""
    big = b"B" * 1_000_000
    bad = [await xadd(brain, [b"type", b"TRADE", b"symbol", b"BTCUSDT", b"blob", big]) for _ in range(200)]
    good = await xadd(brain, trade("BTCUSDT", 1))
    registry = CollectorRegistry()
    services.start(consumer(redis_server, registry, dead_letter_maxlen=50, dead_letter_max_bytes=4096))

    await eventually(lambda: drained(brain), timeout=60, what="the group drained")
    assert [r[b"src_id"] for r in await per_symbol(brain, keys.trades_key("BTCUSDT"))] == [good]
    assert await brain.xlen(keys.CONSUMER_DEAD_LETTER) == 50
    letters = await dead_letters(brain)
    assert sorted(letters) == sorted(bad[-50:]), "the newest dead letters are kept"
    for letter in letters.values():
        assert sum(len(k) + len(v) for k, v in letter.items()) <= 4096 + 512
        assert letter[b"blob"] == big[: len(letter[b"blob"])]  # a prefix of the raw value
    usage = await brain.memory_usage(keys.CONSUMER_DEAD_LETTER)
    assert usage is not None and usage < 1_000_000, usage

    def sample(name: str) -> float | None:
        return registry.get_sample_value(f"tickbridge_consumer_{name}")

    assert sample("dead_letters_total") == 200
    assert sample("dead_letters_truncated_total") == 200
    assert sample("dead_letters_evicted_total") == 150

    # `tickbridge deadletters` still lists them, and a replay leaves the capped copies where they are.
    listed = await deadletters.read_all(brain)
    assert len(listed) == 50 and all(letter.truncated for letter in listed)
    result = await deadletters.replay(brain, listed)
    assert result.replayed == 0 and result.invalid == {deadletters.TRUNCATED: 50}
    assert await brain.xlen(keys.CONSUMER_DEAD_LETTER) == 50


async def test_brain_redis_memory_is_reported(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    """used_memory and maxmemory from INFO memory, for BrainRedisMemoryHigh (nothing watched them before)."""
    await brain.config_set("maxmemory", 256 * 1024 * 1024)
    registry = CollectorRegistry()
    services.start(consumer(redis_server, registry))

    async def reported() -> bool:
        return registry.get_sample_value("tickbridge_consumer_brain_redis_maxmemory_bytes") == 256 * 1024 * 1024

    await eventually(reported, timeout=10, what="maxmemory reported")
    used = registry.get_sample_value("tickbridge_consumer_brain_redis_used_memory_bytes")
    assert used is not None and 100_000 < used < 256 * 1024 * 1024
    await xadd(brain, [b"big", b"x" * 20_000_000])  # 20 MB more: the gauge follows

    async def grew() -> bool:
        now = registry.get_sample_value("tickbridge_consumer_brain_redis_used_memory_bytes")
        return now is not None and now > used + 15_000_000

    await eventually(grew, timeout=10, what="used memory grew")


async def test_wide_record_in_a_hand_made_call_is_dead_lettered_by_the_function(
    brain: aioredis.Redis, redis_server: RedisServer
) -> None:
    """brain.lua itself never raises on a record it cannot unpack (a consumer of another version, a bug): the
    entry is dead-lettered without its fields and acked, so no batch can fail for good."""
    svc = consumer(redis_server, CollectorRegistry())
    svc.client = make_client(redis_server.url)
    try:
        await svc._setup()  # loads the function library
        wide_id = await xadd(brain, [b"a", b"b"])
        assert [e[0] for e in await svc._read(block=False)] == [wide_id]
        fields = [x for i in range(10_000) for x in (b"f%d" % i, b"v")]  # more values than Lua can unpack
        reply = await brain.execute_command(  # type: ignore[no-untyped-call]
            "FCALL", "tickbridge_brain_ingest", 2, STREAM, keys.CONSUMER_DEAD_LETTER, GROUP, 300_000_000,
            svc.position, wide_id, 1, 10_000, 0, "d", wide_id, 2, len(fields), *fields,
        )  # fmt: skip
        assert reply[0] == 1 and reply[3] == 0, reply
        letters = await dead_letters(brain)
        assert list(letters) == [wide_id] and b"unpack" in letters[wide_id][b"reason"]
        assert await drained(brain)
    finally:
        await svc.client.aclose()
