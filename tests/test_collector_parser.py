"""Collector parser and order book: unit cases and an offline replay of the real captures."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import hiredis
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickbridge.collector.book import DepthSync, Outcome
from tickbridge.collector.parser import REASONS, ControlReply, Rejected, ServerShutdown, parse_frame
from tickbridge.collector.publisher import TradePacker, pack_zadd
from tickbridge.core import keys
from tickbridge.core.tick import MAX_TS_US, MIN_TS_US, DepthDiff, Trade
from tickbridge.core.wire import decode_entry, encode_tick, encode_trade, encode_warm_member

pytestmark = pytest.mark.timeout(60)

RECV = 1_723_161_255_400_000
TRADE = {"e": "trade", "E": 1723161255343, "s": "BTCUSDT", "t": 3735683259, "p": "61837.63000000",
         "q": "0.02000000", "T": 1723161255342, "m": True, "M": True}  # fmt: skip
DEPTH = {"e": "depthUpdate", "E": 1723161261311, "s": "BTCUSDT", "U": 10, "u": 12,
         "b": [["57950.00000000", "0.01763000"]], "a": [["61856.27000000", "0.00000000"]]}  # fmt: skip


def frame(stream: str, data: object) -> bytes:
    return orjson.dumps({"stream": stream, "data": data})


def test_trade_maps_fields() -> None:
    ev = parse_frame(frame("btcusdt@trade", TRADE), RECV)
    assert isinstance(ev, Trade)
    assert (ev.symbol, ev.price, ev.volume, ev.side) == ("BTCUSDT", "61837.63000000", "0.02000000", "SELL")
    assert ev.timestamp == 1723161255342000 and ev.trade_id == 3735683259 and ev.recv_ts == RECV
    buy = parse_frame(frame("btcusdt@trade", {**TRADE, "m": False, "T": 1723161255342123}), RECV)
    assert isinstance(buy, Trade) and buy.side == "BUY" and buy.timestamp == 1723161255342123  # µs kept


def test_raw_and_legacy_payloads() -> None:
    ev = parse_frame(orjson.dumps({**TRADE, "b": 1, "a": 2}), RECV)  # /ws/ form, legacy order IDs ignored
    assert isinstance(ev, Trade)
    depth = parse_frame(frame("btcusdt@depth@100ms", DEPTH), RECV)
    assert isinstance(depth, DepthDiff)
    assert (depth.first_update_id, depth.last_update_id, depth.timestamp) == (10, 12, 1723161261311000)
    assert depth.bids == (("57950.00000000", "0.01763000"),)


def test_control_messages() -> None:
    assert isinstance(parse_frame(b'{"e":"serverShutdown","E":1770123456789}', RECV), ServerShutdown)
    wrapped = b'{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1770123456789}}'
    assert isinstance(parse_frame(wrapped, RECV), ServerShutdown)
    assert isinstance(parse_frame(b'{"result":null,"id":1}', RECV), ControlReply)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"stream":"btcusdt@trade","data":{"e":"trade"', "json"),
        (b"\xff\xfe", "json"),
        (b"[1,2]", "not_object"),
        (b"42", "not_object"),
        (frame("btcusdt@trade", {k: v for k, v in TRADE.items() if k != "p"}), "schema"),
        (frame("btcusdt@trade", {**TRADE, "t": "12"}), "schema"),
        (frame("btcusdt@trade", {**TRADE, "p": 61837.63}), "schema"),
        (frame("btcusdt@trade", {**TRADE, "m": "yes"}), "schema"),
        (frame("btcusdt@trade", {**TRADE, "T": None}), "schema"),
        (frame("btcusdt@trade", {**TRADE, "s": ["BTC"]}), "schema"),
        (frame("btcusdt@trade", {**TRADE, "q": "-1"}), "schema"),
        (frame("btcusdt@depth@100ms", {**DEPTH, "b": [["1"]]}), "schema"),
        (frame("btcusdt@depth@100ms", {**DEPTH, "b": "x"}), "schema"),
        (frame("btcusdt@depth@100ms", {**DEPTH, "U": 13}), "schema"),
        (frame("btcusdt@depth@100ms", {**DEPTH, "u": 2**63}), "schema"),
        (frame("btcusdt@trade", "nope"), "schema"),
        (frame("btcusdt@kline_1m", {"e": "kline"}), "unknown_stream"),
        (frame("btcusdt@trade", {**TRADE, "e": "blockTrade"}), "unknown_event"),
        (frame("ethusdt@trade", TRADE), "stream_mismatch"),
        (frame("btcusdt@trade", DEPTH), "stream_mismatch"),
        (b'{"error":{"code":2,"msg":"Invalid request: invalid stream"},"id":2}', "exchange_error"),
        (b'{"hello":1}', "unknown_event"),
    ],
)
def test_bad_input_is_rejected_with_reason(raw: bytes, reason: str) -> None:
    ev = parse_frame(raw, RECV)
    assert isinstance(ev, Rejected), ev
    assert ev.reason == reason and ev.detail and ev.raw == raw[:4096]


def test_oversized_frame_is_rejected_truncated() -> None:
    raw = frame("btcusdt@trade", {**TRADE, "pad": "x" * (1 << 20)})
    ev = parse_frame(raw, RECV)
    assert isinstance(ev, Rejected) and ev.reason == "oversized" and len(ev.raw) == 4096


def diff(
    first: int, last: int, bids: tuple[tuple[str, str], ...] = (), asks: tuple[tuple[str, str], ...] = ()
) -> DepthDiff:
    return DepthDiff("BTCUSDT", RECV, first, last, bids, asks, RECV)


def test_book_straddle_continuity_gap_and_overlap() -> None:
    sync = DepthSync("BTCUSDT")
    assert sync.on_event(diff(95, 99)) is Outcome.BUFFERED
    assert sync.on_event(diff(100, 104, bids=(("10", "1"),))) is Outcome.BUFFERED
    assert sync.on_event(diff(100, 104)) is Outcome.DUPLICATE  # the same event from a second connection
    assert sync.on_event(diff(110, 111), primary=False) is Outcome.AHEAD
    assert sync.on_snapshot(94, [], [])[0] is Outcome.STALE  # older than the first buffered U: fetch again
    assert not sync.valid and len(sync.buffer) == 2  # buffer kept across retries
    outcome, applied = sync.on_snapshot(102, [["10", "5"], ["9", "2"]], [["11", "1"]])
    assert outcome is Outcome.SYNCED and [e.first_update_id for e in applied] == [100]  # straddles 103
    assert sync.book.bids == {"10": "1", "9": "2"} and sync.book.last_update_id == 104
    assert sync.on_event(diff(105, 106, asks=(("11", "0.000"),))) is Outcome.APPLIED
    assert sync.book.asks == {}
    assert sync.on_event(diff(104, 106)) is Outcome.DUPLICATE
    assert sync.on_event(diff(110, 112), primary=False) is Outcome.AHEAD and sync.valid
    assert sync.on_event(diff(108, 109)) is Outcome.GAP and not sync.valid
    assert sync.needs_snapshot() and sync.buffer[0].first_update_id == 108


def test_book_snapshot_without_straddle_is_a_gap() -> None:
    sync = DepthSync("BTCUSDT")
    sync.on_event(diff(100, 104))
    sync.on_event(diff(105, 106))
    outcome, applied = sync.on_snapshot(106, [["1", "1"]], [])
    assert outcome is Outcome.SYNCED and applied == []  # everything dropped: next event must straddle 107
    assert sync.on_event(diff(108, 110)) is Outcome.GAP


# --- offline replay of the real captures -------------------------------------------------------------


def capture_lines(binance_data: Path) -> list[bytes]:
    lines: list[bytes] = []
    for name in ("ethusdt_20240808.gz", "ethusdt_20240809.gz"):
        with gzip.open(binance_data / name, "rb") as fh:
            lines.extend(line.rstrip(b"\n").split(b" ", 1)[1] for line in fh if line.strip())
    return lines


def rebuild_offline(lines: list[bytes]) -> tuple[int, dict[str, str], dict[str, str], list[int]]:
    """Independent oracle: the snapshot, then every later diff with u > lastUpdateId, in file order."""
    book: dict[str, dict[str, str]] = {"b": {}, "a": {}}
    lid = -1
    trades: list[int] = []
    pre: list[dict[str, object]] = []
    for raw in lines:
        msg = orjson.loads(raw)
        if "lastUpdateId" in msg:
            lid = msg["lastUpdateId"]
            book = {"b": dict(msg["bids"]), "a": dict(msg["asks"])}
            continue
        data = msg["data"]
        if msg["stream"].endswith("@trade"):
            trades.append(data["t"])
        elif msg["stream"].endswith("@depth@100ms"):
            pre.append(data)
            if lid < 0:
                continue
            for d in pre:
                if d["u"] <= lid:  # type: ignore[operator]
                    continue
                for side in ("b", "a"):
                    for price, qty in d[side]:  # type: ignore[attr-defined]
                        if float(qty) == 0:
                            book[side].pop(price, None)
                        else:
                            book[side][price] = qty
                lid = d["u"]  # type: ignore[assignment]
            pre = []
    return lid, book["b"], book["a"], trades


def test_replay_captures_offline(binance_data: Path) -> None:
    lines = capture_lines(binance_data)
    sync = DepthSync("ETHUSDT")
    trades: list[Trade] = []
    gaps = rejected = 0
    applied_ids: list[tuple[int, int]] = []
    for i, raw in enumerate(lines):
        if raw.startswith(b'{"lastUpdateId"'):
            snap = orjson.loads(raw)
            outcome, applied = sync.on_snapshot(snap["lastUpdateId"], snap["bids"], snap["asks"])
            assert outcome is Outcome.SYNCED
            applied_ids += [(e.first_update_id, e.last_update_id) for e in applied]
            continue
        ev = parse_frame(raw, RECV + i)
        if isinstance(ev, Trade):
            trades.append(ev)
        elif isinstance(ev, DepthDiff):
            outcome = sync.on_event(ev)
            gaps += outcome is Outcome.GAP
            if outcome is Outcome.APPLIED:
                applied_ids.append((ev.first_update_id, ev.last_update_id))
        elif isinstance(ev, Rejected):
            rejected += ev.reason != "unknown_stream"  # bookTicker is not subscribed by the collector
    ids = [t.trade_id for t in trades]
    assert len(ids) == 6106 + 8409 and ids == list(range(1520538925, 1520553440))
    assert gaps == 0 and rejected == 0 and sync.valid
    assert applied_ids[0][0] == 35346513513  # the first kept event has U == lastUpdateId + 1
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(applied_ids))  # contiguous
    lid, bids, asks, oracle_trades = rebuild_offline(lines)
    assert oracle_trades == ids
    assert sync.book.last_update_id == lid
    assert sync.book.bids == bids and sync.book.asks == asks
    top_bid, top_ask = sync.book.sorted_bids()[0], sync.book.sorted_asks()[0]
    assert float(top_bid[0]) < float(top_ask[0])  # not crossed


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from(["e", "E", "s", "t", "p", "q", "T", "m", "U", "u", "b", "a", "stream", "data", "result", "id"])


@pytest.mark.timeout(900)  # `make fuzz` runs 10,000 examples
@given(
    raw=st.binary(max_size=200)
    | st.builds(lambda d: orjson.dumps(d), st.dictionaries(_keys, _json, max_size=8))
    | st.builds(
        lambda d, stream: orjson.dumps({"stream": stream, "data": {**TRADE, **d}}),
        st.dictionaries(_keys, _json, max_size=3),
        st.sampled_from(["btcusdt@trade", "btcusdt@depth@100ms", "x"]),
    )
    | st.builds(
        lambda d: orjson.dumps({"stream": "btcusdt@depth@100ms", "data": {**DEPTH, **d}}),
        st.dictionaries(_keys, _json, max_size=3),
    )
)
def test_fuzz_parse_frame_never_raises(raw: bytes) -> None:
    ev = parse_frame(raw, RECV)
    assert isinstance(ev, Trade | DepthDiff | ServerShutdown | ControlReply | Rejected)
    if isinstance(ev, Rejected):
        assert ev.reason in REASONS and ev.raw == raw[:4096]
    elif isinstance(ev, Trade | DepthDiff):
        assert decode_entry([str(v).encode() for v in encode_tick(ev)]) == ev  # what the stream stores round-trips


def test_retry_after_header_values() -> None:
    import email.utils
    import time

    from tickbridge.collector.rest import parse_retry_after

    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("0.5") == 0.5
    for bad in (None, "", "  ", "soon", "-3", "inf", "nan", "Wed, 99 Foo 2015 07:28:00 GMT"):
        assert parse_retry_after(bad, default=4.0) == 4.0, bad
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: no wait
    ahead = parse_retry_after(email.utils.formatdate(time.time() + 120, usegmt=True))
    assert 118 <= ahead <= 120


# --- the publisher's trade packing (issue 20: one string format instead of hiredis per trade) -----------------

#: One packer per stream name (built once: `make fuzz` runs this 10,000 times within the file's timeout).
_PACKERS = {name: TradePacker(name) for name in ("market:vps:stream", "market:vps:stream:coinbase", "x")}
_DIGITS = "0123456789"
#: Plain decimals > 0 as the exchange sends them (up to 20 integer and 18 fraction digits): cheap to draw.
_DEC = st.builds(
    lambda whole, frac: f"{whole}.{frac}" if frac else str(whole),
    st.integers(0, 10**20 - 1),
    st.text(_DIGITS, max_size=18),
).filter(lambda s: bool(s.strip("0.")))


@given(
    symbol=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ" + _DIGITS, min_size=2, max_size=32),
    exchange=st.sampled_from(keys.EXCHANGES),
    price=_DEC,
    volume=_DEC,
    side=st.sampled_from(["BUY", "SELL"]),
    ts=st.integers(MIN_TS_US, MAX_TS_US - 10),  # recv_ts = ts + 7 and a second trade at ts + 1 stay in range
    trade_id=st.integers(0, 2**63 - 1),
    stream=st.sampled_from(sorted(_PACKERS)),
)
def test_trade_packing_is_byte_identical_to_hiredis(
    symbol: str, exchange: str, price: str, volume: str, side: str, ts: int, trade_id: int, stream: str
) -> None:
    """What the publisher sends for a trade (its XADD and its WARM pair in a ZADD) is exactly
    `hiredis.pack_command` of `encode_trade` / `encode_warm_member`: same bytes, same entry."""
    trade = Trade(symbol, price, volume, side, ts, trade_id, ts + 7, exchange)  # type: ignore[arg-type]
    packer = _PACKERS[stream]
    assert packer.ok
    data, pair = packer.xadd(trade)
    assert data == hiredis.pack_command(("XADD", stream, "*", *encode_trade(trade)))  # type: ignore[arg-type]
    other = Trade(symbol, volume, price, side, ts + 1, trade_id // 2, ts, exchange)  # type: ignore[arg-type]
    pairs = [pair, packer.xadd(other)[1]]
    expected = ("ZADD", "market:w", ts, encode_warm_member(trade), ts + 1, encode_warm_member(other))
    assert pack_zadd("market:w", pairs).data == hiredis.pack_command(expected)  # type: ignore[arg-type]
