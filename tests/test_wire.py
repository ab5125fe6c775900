"""The wire module: one round trip per layout, and brain.lua's layouts checked against the Python encoders on a
real Redis (Lua cannot import `tickbridge.core.wire`)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from tickbridge.brain.consumer import BrainConsumer
from tickbridge.brain.deadletters import read_all, replay
from tickbridge.collector.metrics import CollectorMetrics
from tickbridge.collector.publisher import StreamPublisher
from tickbridge.core import keys, wire
from tickbridge.core.redis_io import ensure_group, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.tick import MAX_TS_US, MIN_TS_US, BookReset, BookSnapshot, DepthDiff, TickError, Trade
from tickbridge_dev.devstack.servers import RedisServer

symbols = st.from_regex(r"[A-Z0-9]{2,32}", fullmatch=True)
positive = st.from_regex(r"[1-9][0-9]{0,8}(\.[0-9]{1,8})?", fullmatch=True)
decimals = st.from_regex(r"[0-9]{1,9}(\.[0-9]{1,8})?", fullmatch=True)
ts_us = st.integers(MIN_TS_US, MAX_TS_US)
ids = st.integers(0, 2**63 - 1)
trades = st.builds(
    Trade, symbol=symbols, price=positive, volume=positive, side=st.sampled_from(["BUY", "SELL"]), timestamp=ts_us,
    trade_id=ids, recv_ts=ts_us,
)  # fmt: skip
levels = st.lists(st.tuples(positive, decimals), max_size=4).map(tuple)


@st.composite
def depth_diffs(draw: st.DrawFn) -> DepthDiff:
    first = draw(ids)
    return DepthDiff(symbol=draw(symbols), timestamp=draw(ts_us), first_update_id=first,
                     last_update_id=draw(st.integers(first, 2**63 - 1)), bids=draw(levels), asks=draw(levels),
                     recv_ts=draw(ts_us))  # fmt: skip


ticks = trades | depth_diffs()


def as_bytes(fields: list[Any]) -> list[bytes]:
    return [f if isinstance(f, bytes) else str(f).encode() for f in fields]


@given(ticks)
def test_tick_entry_round_trip(tick: Trade | DepthDiff) -> None:
    raw = as_bytes(wire.encode_tick(tick))
    assert wire.decode_entry(raw) == tick
    assert wire.strict_decode(raw) == tick
    names = tuple(f.decode() for f in raw[::2])
    assert names == (wire.TRADE_FIELDS if isinstance(tick, Trade) else wire.DEPTH_FIELDS)


@given(trades)
def test_trade_fast_check_and_lua_values(trade: Trade) -> None:
    raw = as_bytes(wire.encode_trade(trade))
    if trade.timestamp >= MIN_TS_US and len(str(trade.timestamp)) == 16 and len(str(trade.recv_ts)) == 16:
        assert wire.match_trade(raw) == (trade.symbol.encode(), trade.exchange.encode())
    values = raw[wire.TRADE_VALUES]
    assert values == as_bytes([trade.price, trade.volume, trade.side, trade.timestamp, trade.trade_id, trade.recv_ts])


@given(ticks, st.from_regex(r"[0-9]{1,13}-[0-9]{1,5}", fullmatch=True))
def test_symbol_entry_round_trip(tick: Trade | DepthDiff, src_id: str) -> None:
    raw = as_bytes(wire.encode_symbol_entry(src_id, tick))
    assert wire.decode_symbol_entry(raw) == (src_id.encode(), tick)
    values = wire.symbol_trade(raw)
    if isinstance(tick, Trade):
        assert values is not None
        named = dict(zip(wire.SYMBOL_TRADE_VALUES, values, strict=True))
        assert wire.decode_entry({k.encode(): v for k, v in named.items()}) == tick
    else:
        assert values is None


@given(trades)
def test_warm_member_round_trip(trade: Trade) -> None:
    w = wire.decode_warm_member(wire.encode_warm_member(trade).encode(), float(trade.timestamp))
    if trade.timestamp < 2**53:  # a float score is exact up to 2**53 µs (year 2255): every valid timestamp
        assert w.timestamp == trade.timestamp
    assert (w.trade_id, w.price, w.volume, w.side, w.recv_ts) == (
        trade.trade_id, trade.price, trade.volume, trade.side, trade.recv_ts,
    )  # fmt: skip


@given(st.tuples(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1)))
def test_stream_id_round_trip(entry_id: tuple[int, int]) -> None:
    text = wire.format_stream_id(entry_id)
    assert wire.parse_stream_id(text) == entry_id == wire.parse_stream_id(text.encode())
    assert wire.stream_id_ms(text) == entry_id[0]


@given(st.lists(st.binary(max_size=20), min_size=1, max_size=10).map(lambda xs: xs + xs))
def test_buffer_payload_round_trip(fields: list[bytes]) -> None:
    decoded = wire.decode_payload(wire.encode_payload(fields))
    assert [f if isinstance(f, bytes) else f.encode() for f in decoded] == fields


@given(st.text(max_size=30), st.binary(max_size=30), st.lists(st.binary(max_size=10), max_size=8))
def test_consumer_dead_letter_round_trip(reason: str, src_id: bytes, original: list[bytes]) -> None:
    original = [o for o in original if o not in wire.CONSUMER_DEAD_LETTER_ADDED]
    original = original[: len(original) // 2 * 2]
    letter = wire.split_dead_letter([b"src_id", src_id, b"reason", reason.encode(), *original])
    assert letter == (src_id, reason, original, "")


def test_collector_and_writer_dead_letters_name_their_fields() -> None:
    assert wire.collector_dead_letter("r", "d", b"raw", 5)[::2] == ["reason", "detail", "raw", "recv_ts"]
    assert wire.writer_dead_letter(b"s", b"1-1", "why")[::2] == ["stream", "src_id", "reason"]


# ------------------------------------------------------------------------------------- on a real Redis

TS = (int(time.time()) - 5) * 1_000_000


def _trade(i: int, symbol: str = "BTCUSDT") -> Trade:
    return Trade(symbol, f"{100 + i}.5", "0.25", "SELL" if i % 2 else "BUY", TS + i, 1000 + i, TS + i + 700)


async def test_brain_lua_writes_the_wire_layouts(redis_server: RedisServer) -> None:
    """What brain.lua appends (per-symbol entries, WARM members and scores) is what the wire encoders say, for
    trades in the contract's order (the 'T' records), trades in another order and depth diffs."""
    client = make_client(redis_server.url)
    stream, group = keys.DEFAULT_STREAM_KEY, keys.DEFAULT_CONSUMER_GROUP
    settings = Settings(brain_redis_url=redis_server.url, symbols=("BTCUSDT", "ETHUSDT"), consumer_name="c")
    consumer = BrainConsumer(settings, CollectorRegistry())
    try:
        await ensure_group(client, stream, group, "0")
        sent: list[tuple[bytes, Trade | DepthDiff]] = []
        for i in range(5):
            t = _trade(i)
            sent.append((await client.xadd(stream, dict(zip(*[iter(wire.encode_trade(t))] * 2, strict=True))), t))
        reordered = _trade(9, "ETHUSDT")
        fields = wire.encode_trade(reordered)
        pairs = list(zip(fields[::2], fields[1::2], strict=True))[::-1]  # another field order
        sent.append((await client.xadd(stream, dict(pairs)), reordered))
        depth = DepthDiff("ETHUSDT", TS, 5, 7, (("1.5", "2"),), (), TS + 9)
        sent.append((await client.xadd(stream, dict(zip(*[iter(wire.encode_depth(depth))] * 2, strict=True))), depth))
        consumer.client = client
        await consumer._setup()
        await consumer.read_new()
        await consumer._finish_inflight()
        for src_id, tick in sent:
            key = (keys.trades_key if isinstance(tick, Trade) else keys.depth_key)(tick.symbol)
            written = [f for _, f in await client.xrange(key) if f[b"src_id"] == src_id]
            assert len(written) == 1
            flat = [x for kv in written[0].items() for x in kv]
            assert flat == as_bytes(wire.encode_symbol_entry(src_id, tick))
            assert wire.decode_symbol_entry(flat) == (src_id, tick)
        for symbol in ("BTCUSDT", "ETHUSDT"):
            warm = await client.zrange(keys.warm_key(symbol), 0, -1, withscores=True)
            expected = sorted(
                (wire.encode_warm_member(t).encode(), float(t.timestamp))
                for _, t in sent
                if isinstance(t, Trade) and t.symbol == symbol
            )
            assert sorted(warm) == expected
    finally:
        await client.aclose()


async def test_replay_and_collector_write_the_same_warm_member(redis_server: RedisServer) -> None:
    """`tickbridge deadletters --replay` (brain.lua's replay function) and the collector (VPS) put the one WARM
    layout: what `decode_warm_member` reads."""
    client = make_client(redis_server.url)
    try:
        t = _trade(1)
        letter = {"src_id": "1-1", "reason": "test", **dict(zip(*[iter(wire.encode_trade(t))] * 2, strict=True))}
        await client.xadd(keys.CONSUMER_DEAD_LETTER, letter)
        result = await replay(client, await read_all(client))
        assert result.replayed == 1
        assert await client.zrange(keys.warm_key("BTCUSDT"), 0, -1, withscores=True) == [
            (wire.encode_warm_member(t).encode(), float(t.timestamp))
        ]
        await client.delete(keys.warm_key("BTCUSDT"))
        publisher = StreamPublisher(client, keys.DEFAULT_STREAM_KEY, CollectorMetrics(CollectorRegistry()), linger_s=0)
        await publisher._write([t])
        ((member, score),) = await client.zrange(keys.warm_key("BTCUSDT"), 0, -1, withscores=True)
        assert wire.decode_warm_member(member, score) == wire.decode_warm_member(
            wire.encode_warm_member(t), t.timestamp
        )
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("stream", "kind"), [(keys.trades_key("BTCUSDT"), "trades"), (keys.depth_key("ETHUSDT"), "depth"), ("x", "")]
)
def test_symbol_stream_kind(stream: str, kind: str) -> None:
    assert keys.symbol_stream_kind(stream) == kind


def test_whole_book_entry_round_trip_and_strict_fields() -> None:
    """`type=BOOK` (issue 17): exactly its fields, exact decimal strings both ways."""
    book = BookSnapshot("ETHUSDT", 1_723_161_255_343_000, 7, (("2.50000000", "1.00000000"),),
                        (("2.60000000", "0.50000000"),), 1_723_161_255_344_000)  # fmt: skip
    fields = [str(x).encode() for x in wire.encode_book(book)]
    assert wire.is_book_entry(fields) and not wire.is_book_entry([b"type", b"DEPTH"])
    assert wire.decode_book(fields) == book
    with pytest.raises(TickError):
        wire.decode_book([*fields, b"extra", b"1"])
    with pytest.raises(TickError):
        wire.decode_book([f.replace(b"2.50000000", b"nan") for f in fields])
    reset = BookReset("ETHUSDT", 7, 1_723_161_255_345_000, 1_723_161_255_346_000, "update-ID gap: resync")
    fields = [str(x).encode() for x in wire.encode_reset(reset)]
    assert wire.is_book_entry(fields) and wire.decode_book(fields) == reset
    with pytest.raises(TickError):
        wire.decode_book([*fields[:-2], b"bids", b"[]"])  # a reset's fields, not a book's
