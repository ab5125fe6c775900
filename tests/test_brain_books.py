"""Order books on the Brain (issue 17), on a real redis-server through the consumer: whole books replace,
diffs apply only on an unbroken update-ID chain, a break marks the book invalid and asks for a snapshot, and
a read never returns levels of one update ID with the state of another."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from conftest import ServiceRunner, eventually
from tickbridge.brain.books import Book, read_book
from tickbridge.brain.consumer import BrainConsumer
from tickbridge.core import keys
from tickbridge.core.redis_io import ensure_group, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.tick import BookReset, BookSnapshot, DepthDiff
from tickbridge.core.wire import encode_book, encode_depth, encode_reset
from tickbridge_dev.devstack.servers import RedisServer

pytestmark = pytest.mark.timeout(60)

STREAM = keys.DEFAULT_STREAM_KEY
SYM = "ETHUSDT"
TS = 1_723_161_255_343_000


def snap(u: int, bids: list[tuple[str, str]], asks: list[tuple[str, str]]) -> BookSnapshot:
    return BookSnapshot(SYM, TS + u, u, tuple(bids), tuple(asks), TS + u)


def diff(first: int, last: int, bids: list[tuple[str, str]] = (), asks: list[tuple[str, str]] = ()) -> DepthDiff:  # type: ignore[assignment]
    return DepthDiff(SYM, TS + last, first, last, tuple(bids), tuple(asks), TS + last)


@pytest.fixture
async def brain(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = make_client(redis_server.url)
    yield client
    await client.aclose()


async def feed(brain: aioredis.Redis, *entries: BookSnapshot | DepthDiff | BookReset) -> None:
    for e in entries:
        fields: list[Any] = (
            encode_book(e) if isinstance(e, BookSnapshot) else encode_reset(e) if isinstance(e, BookReset)
            else encode_depth(e)
        )  # fmt: skip
        await brain.xadd(STREAM, dict(zip(fields[::2], fields[1::2], strict=True)))


async def settled(brain: aioredis.Redis) -> bool:
    info = (await brain.xinfo_groups(STREAM))[0]
    return bool(info["pending"] == 0 and info["lag"] == 0)


async def book_after(brain: aioredis.Redis, *entries: BookSnapshot | DepthDiff | BookReset) -> Book:
    await feed(brain, *entries)
    await eventually(lambda: settled(brain), timeout=10, what="consumer caught up")
    return await read_book(brain, SYM, depth=100)


async def test_rules_of_the_brain_book(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    await ensure_group(brain, STREAM, keys.DEFAULT_CONSUMER_GROUP)
    settings = Settings(brain_redis_url=redis_server.url, symbols=(SYM,), consumer_name="c1")
    registry = CollectorRegistry()
    services.start(BrainConsumer(settings, registry, monitor_interval_s=0.1))

    def gauge(name: str) -> float | None:
        return registry.get_sample_value(f"tickbridge_consumer_book_{name}", {"symbol": SYM})

    # A diff before any snapshot: no book, invalid, asked for.
    book = await book_after(brain, diff(5, 6, [("1.0", "1.0")]))
    assert not book.valid and book.reason == "no book yet" and not book.bids
    assert await brain.smembers(keys.BOOK_WANTED) == {SYM.encode()}
    await eventually(lambda: _true(gauge("valid") == 0 and (gauge("invalid_seconds") or 0) > 0), what="metrics")

    # A snapshot replaces and validates (and clears the request); zero quantities never enter the book.
    book = await book_after(
        brain, snap(10, [("2.00", "1.0"), ("3.00", "2.0"), ("1.50", "0.000")], [("4.00", "1.5"), ("3.50", "0.7")])
    )
    assert book.valid and book.last_update_id == 10
    assert book.bids == (("3.00", "2.0"), ("2.00", "1.0")) and book.asks == (("3.50", "0.7"), ("4.00", "1.5"))
    assert await brain.smembers(keys.BOOK_WANTED) == set()
    await eventually(lambda: _true(gauge("valid") == 1 and gauge("invalid_seconds") == 0), what="valid in metrics")
    assert (gauge("age_seconds") or 0) > 1e6  # the test's exchange time is in 2024

    # Stale diffs are ignored; the straddling one and its successors apply (absolute quantities, 0 removes).
    book = await book_after(
        brain,
        diff(8, 10, [("3.00", "99")]),
        diff(9, 12, [("3.00", "0"), ("2.50", "5.5")]),
        diff(13, 13, asks=[("3.50", "0.00000000"), ("3.75", "1")]),
    )
    assert book.valid and book.last_update_id == 13 and book.timestamp == TS + 13
    assert book.bids == (("2.50", "5.5"), ("2.00", "1.0")) and book.asks == (("3.75", "1"), ("4.00", "1.5"))

    # A break: invalid (levels kept but flagged), later diffs ignored, the symbol asked for.
    book = await book_after(brain, diff(15, 16, [("2.60", "1")]), diff(17, 18, [("2.70", "1")]))
    assert not book.valid and book.last_update_id == 13 and "break" in book.reason
    assert ("2.60", "1") not in book.bids and await brain.smembers(keys.BOOK_WANTED) == {SYM.encode()}

    # An older snapshot than a valid book is ignored; a newer one repairs an invalid book.
    book = await book_after(brain, snap(18, [("2.70", "1")], [("2.80", "1")]))
    assert book.valid and book.last_update_id == 18 and book.bids == (("2.70", "1"),)
    book = await book_after(brain, snap(17, [("9.00", "1")], []), diff(19, 19, [("2.65", "3")]))
    assert book.valid and book.last_update_id == 19 and book.bids == (("2.70", "1"), ("2.65", "3"))

    # The collector's book stopped being valid (RESYNC after 19): so does the Brain's; an older reset is ignored.
    book = await book_after(brain, BookReset(SYM, 5, TS, TS, "old"))
    assert book.valid and book.last_update_id == 19
    book = await book_after(brain, BookReset(SYM, 19, TS + 20, TS + 20, "update-ID gap: resync"))
    assert not book.valid and "VPS book not valid after 19" in book.reason
    assert await brain.smembers(keys.BOOK_WANTED) == set()  # no request: the collector sends its book itself
    book = await book_after(brain, snap(25, levels_after := [("2.75", "2")], []))
    assert book.valid and book.bids == tuple(levels_after)

    # Whole books and resets travel on in the per-symbol depth stream, between the diffs (for the writer).
    kinds = [f[b"type"] for _, f in await brain.xrange(keys.depth_key(SYM))]
    assert kinds.count(b"BOOK") == 4 and kinds.count(b"DEPTH") == 7 and kinds.count(b"RESYNC") == 2
    top = await read_book(brain, SYM, depth=1)
    assert top.best_bid == ("2.75", "2") and top.best_ask is None


async def _true(value: bool) -> bool:
    return value


async def test_live_lane_makes_a_book_valid_and_current_before_the_backlog(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    """Issue 16 + 17: while a backlog replays, the live lane's newest whole book makes the Brain's book valid and
    current at once; the replay bringing the older diffs, the break and the same entries again changes nothing."""
    await ensure_group(brain, STREAM, keys.DEFAULT_CONSUMER_GROUP)
    settings = Settings(brain_redis_url=redis_server.url, symbols=(SYM,), consumer_name="c1")
    registry = CollectorRegistry()
    services.start(BrainConsumer(settings, registry, monitor_interval_s=0.1))
    live = keys.live_stream_key(STREAM)

    book = await book_after(brain, snap(10, [("2.00", "1")], [("3.00", "1")]), diff(11, 12, [("2.10", "1")]))
    assert book.valid and book.last_update_id == 12

    async def on_live(*entries: BookSnapshot | DepthDiff) -> None:
        for e in entries:
            fields: list[Any] = encode_book(e) if isinstance(e, BookSnapshot) else encode_depth(e)
            await brain.xadd(live, dict(zip(fields[::2], fields[1::2], strict=True)))

    async def state() -> tuple[bool, int]:
        b = await read_book(brain, SYM, depth=100)
        return b.valid, b.last_update_id

    # The live lane's first diff is far ahead of the Brain's book: a break, and the symbol is asked for.
    await on_live(diff(500, 501, [("2.50", "1")]))
    await eventually(lambda: _eq(state(), (False, 12)), timeout=10, what="break on the live lane")
    assert await brain.smembers(keys.BOOK_WANTED) == {SYM.encode()}
    # The collector's whole book comes by the live lane, then the live diffs after it: valid and current.
    await on_live(snap(600, [("2.60", "2"), ("2.40", "1")], [("2.70", "1")]), diff(601, 602, [("2.40", "0")]))
    await eventually(lambda: _eq(state(), (True, 602)), timeout=10, what="valid from the live lane")
    assert await brain.smembers(keys.BOOK_WANTED) == set()

    # The ordered replay of the backlog: older diffs, the live diff's break point, the whole book and the diffs
    # again. All stale: the book stays valid at 602 with the same levels.
    book = await book_after(
        brain,
        diff(13, 14, [("9.99", "9")]),
        diff(500, 501, [("2.50", "1")]),
        snap(600, [("2.60", "2"), ("2.40", "1")], [("2.70", "1")]),
        diff(601, 602, [("2.40", "0")]),
    )
    assert book.valid and book.last_update_id == 602
    assert book.bids == (("2.60", "2"),) and book.asks == (("2.70", "1"),)
    assert registry.get_sample_value("tickbridge_consumer_fastforward_book_entries_total") == 3
    # The per-symbol depth stream holds what the ordered path brought, once each (the live lane adds nothing).
    assert len(await brain.xrange(keys.depth_key(SYM))) == 2 + 4


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
