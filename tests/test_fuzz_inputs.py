"""Fuzz and property tests of everything that reads untrusted bytes (issue 7).

Two parsers stand between the outside and the pipeline: `parse_frame` (exchange WebSocket frames, which
the collector does not control) and `decode_entry` (stream entries, which cross the internet on the
VPS -> Brain link). For any input they must either return a valid tick or reject it in their own
terms (`Rejected` with a bounded reason and the raw payload / `TickError`), never raise anything else:
a stray exception would take the role down. What they accept must be canonical, and valid ticks must
come through unchanged whatever garbage surrounds them.

`make test` runs the short "default" hypothesis profile; `make fuzz` runs these with "long".
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from tickbridge.collector.parser import (
    MAX_RAW_KEPT,
    REASONS,
    ControlReply,
    Rejected,
    ServerShutdown,
    parse_frame,
)
from tickbridge.core.tick import (
    MAX_TS_US,
    MIN_TS_US,
    DepthDiff,
    TickError,
    Trade,
    _check_levels_each,
    check_levels,
)
from tickbridge.core.wire import decode_entry, encode_tick, match_trade

# The long profile runs thousands of examples per test: give it room, keep the default run tight.
pytestmark = pytest.mark.timeout(60 if settings().max_examples <= 1000 else 1800)

RECV = 1_723_161_255_400_000
DECIMAL = re.compile(r"[0-9]{1,20}(\.[0-9]{1,18})?")
SYMBOL = re.compile(r"[A-Z0-9]{2,32}")

# -- strategies -------------------------------------------------------------------------------------

symbols = st.sampled_from(["BTCUSDT", "ETHUSDT", "1000PEPEUSDT"]) | st.from_regex(SYMBOL, fullmatch=True)
decimals = st.from_regex(DECIMAL, fullmatch=True)
positive_decimals = decimals.filter(lambda s: float(s) > 0)
ts_us = st.integers(MIN_TS_US, MAX_TS_US)
ids = st.integers(0, 2**63 - 1)
levels = st.lists(st.tuples(positive_decimals, decimals), max_size=5).map(tuple)

trades = st.builds(
    Trade, symbol=symbols, price=positive_decimals, volume=positive_decimals,
    side=st.sampled_from(["BUY", "SELL"]), timestamp=ts_us, trade_id=ids, recv_ts=ts_us,
)  # fmt: skip


@st.composite
def depth_diffs(draw: st.DrawFn) -> DepthDiff:
    first = draw(ids)
    last = draw(st.integers(first, 2**63 - 1))
    return DepthDiff(symbol=draw(symbols), timestamp=draw(ts_us), first_update_id=first, last_update_id=last,
                     bids=draw(levels), asks=draw(levels), recv_ts=draw(ts_us))  # fmt: skip


ticks = trades | depth_diffs()

#: Values a hostile or broken peer may put anywhere: wrong types, non-finite and out-of-range numbers.
NASTY_TEXT = [
    "", " ", "NaN", "nan", "inf", "-inf", "Infinity", "-1", "-0.5", "0", "0.0", "1e400", "1e5", "0x10", " 1", "1 ",
    "1_000", "１２", "9" * 5000, "1.0\n", "BTCUSDT\n", "\u0000", "btcusdt", "TRADE", "DEPTH", "[]", "[[\"1\"]]",
    "[[\"1\",\"1\",\"1\"]]", "{}", "null", str(2**63), str(2**64), "-9223372036854775809", "\ufffd",
]  # fmt: skip
nasty_text = st.sampled_from(NASTY_TEXT) | st.text(max_size=40)
nasty_bytes = nasty_text.map(lambda s: s.encode()) | st.binary(max_size=40)
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | nasty_text
)  # fmt: skip
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def entry(tick: Trade | DepthDiff) -> list[bytes]:
    """A stream entry as redis-py returns it raw: a flat `[field, value, ...]` list of bytes."""
    return [str(x).encode() for x in encode_tick(tick)]


def assert_canonical(tick: Trade | DepthDiff) -> None:
    """Whatever a parser accepts is well-formed all the way down (no `\\n` smuggled past a `$`)."""
    assert SYMBOL.fullmatch(tick.symbol), tick.symbol
    assert MIN_TS_US <= tick.timestamp <= MAX_TS_US and MIN_TS_US <= tick.recv_ts <= MAX_TS_US
    if isinstance(tick, Trade):
        assert DECIMAL.fullmatch(tick.price) and float(tick.price) > 0
        assert DECIMAL.fullmatch(tick.volume) and float(tick.volume) > 0
        assert tick.side in ("BUY", "SELL") and 0 <= tick.trade_id < 2**63
    else:
        assert 0 <= tick.first_update_id <= tick.last_update_id < 2**63
        for price, qty in (*tick.bids, *tick.asks):
            assert DECIMAL.fullmatch(price) and DECIMAL.fullmatch(qty)
    assert decode_entry(entry(tick)) == tick


# -- decode_entry: the stream entry decoder (Brain side of the internet link) ------------------------


@given(ticks)
def test_fuzz_decode_entry_round_trips_every_valid_tick(tick: Trade | DepthDiff) -> None:
    raw = entry(tick)
    assert decode_entry(raw) == tick
    as_dict = dict(zip(raw[::2], raw[1::2], strict=True))
    assert decode_entry(as_dict) == tick
    # An extra field (a newer collector) does not change the tick.
    assert decode_entry([*raw, b"added_later", b"x"]) == tick


def decode_or_reject(raw: Any) -> Trade | DepthDiff | None:
    """decode_entry's whole contract: a tick, or `TickError`; any other exception fails the test."""
    try:
        tick = decode_entry(raw)
    except TickError:
        return None
    assert_canonical(tick)
    return tick


@given(ticks, st.data())
def test_fuzz_decode_entry_mutated_field_is_rejected_or_still_valid(tick: Trade | DepthDiff, data: Any) -> None:
    raw = entry(tick)
    names = raw[::2]
    index = data.draw(st.integers(0, len(names) - 1), label="field")
    value = data.draw(nasty_bytes, label="value")
    mutated = list(raw)
    mutated[2 * index + 1] = value
    note(f"{names[index]!r} -> {value[:60]!r}")
    decode_or_reject(mutated)
    # Field missing entirely.
    dropped = mutated[: 2 * index] + mutated[2 * index + 2 :]
    result = decode_or_reject(dropped)
    if names[index] not in (b"recv_ts", b"exchange"):
        assert result is None, f"entry without {names[index]!r} accepted"


@given(st.dictionaries(nasty_bytes, nasty_bytes, max_size=12) | st.lists(nasty_bytes, max_size=20))
def test_fuzz_decode_entry_arbitrary_fields_never_crash(raw: Any) -> None:
    decode_or_reject(raw)


def field_accepts(field: str, value: str) -> bool:
    """Independent oracle of what each trade field may hold."""
    if field == "symbol":
        return SYMBOL.fullmatch(value) is not None
    if field == "side":
        return value in ("BUY", "SELL")
    if field in ("price", "volume"):
        return DECIMAL.fullmatch(value) is not None and float(value) > 0
    lo, hi = (MIN_TS_US, MAX_TS_US) if field in ("timestamp", "recv_ts") else (0, 2**63 - 1)
    return value.isascii() and value.isdigit() and len(value) <= 19 and lo <= int(value) <= hi


@pytest.mark.parametrize("field", ["price", "volume", "timestamp", "trade_id", "recv_ts", "symbol", "side"])
@pytest.mark.parametrize("value", NASTY_TEXT)
def test_decode_entry_nasty_values_match_the_oracle(field: str, value: str) -> None:
    good = Trade("BTCUSDT", "61000.5", "0.25", "SELL", 1_723_161_255_342_000, 7, 1_723_161_255_343_000)
    fields = dict(zip(encode_tick(good)[::2], encode_tick(good)[1::2], strict=True))
    fields[field] = value
    raw = [str(x).encode() for pair in fields.items() for x in pair]
    if field_accepts(field, value):
        assert_canonical(decode_entry(raw))
    else:
        with pytest.raises(TickError):
            decode_entry(raw)


def test_decode_entry_rejects_invalid_utf8_and_unknown_types() -> None:
    good = entry(Trade("BTCUSDT", "61000.5", "0.25", "SELL", 1_723_161_255_342_000, 7, 1_723_161_255_343_000))
    for i in range(1, len(good), 2):
        bad = list(good)
        bad[i] = b"\xff\xfe" + bad[i]
        with pytest.raises(TickError):
            decode_entry(bad)
    for kind in (b"KLINE", b"trade", b"", b"TRADE\x00"):
        with pytest.raises(TickError):
            decode_entry([b"type", kind, *good[2:4]])
    with pytest.raises(TickError):
        decode_entry([b"type", b"TRADE", b"odd"])


# -- parse_frame: exchange frames (collector) --------------------------------------------------------


def trade_payload(t: Trade, *, ms: bool) -> dict[str, Any]:
    ts = t.timestamp // 1000 if ms else t.timestamp
    return {"e": "trade", "E": ts, "s": t.symbol, "t": t.trade_id, "p": t.price, "q": t.volume, "T": ts,
            "m": t.side == "SELL", "M": True}  # fmt: skip


def check_frame_result(raw: bytes | str, ev: object) -> None:
    """parse_frame's contract for any input."""
    assert isinstance(ev, Trade | DepthDiff | ServerShutdown | ControlReply | Rejected), type(ev)
    if isinstance(ev, Rejected):
        assert ev.reason in REASONS and ev.detail and "\n" not in ev.reason
        data = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
        assert ev.raw == data[:MAX_RAW_KEPT], "dead letter must keep the raw payload"
    elif isinstance(ev, Trade | DepthDiff):
        assert_canonical(ev)
        assert ev.recv_ts == RECV


@given(trades.map(lambda t: Trade(t.symbol, t.price, t.volume, t.side, t.timestamp // 1000 * 1000, t.trade_id, RECV)),
       st.booleans(), st.booleans())  # fmt: skip
def test_fuzz_parse_frame_valid_trades_come_through_unchanged(t: Trade, wrapped: bool, ms: bool) -> None:
    payload = trade_payload(t, ms=ms)
    raw = orjson.dumps({"stream": f"{t.symbol.lower()}@trade", "data": payload} if wrapped else payload)
    assert parse_frame(raw, RECV) == t


@given(st.binary(max_size=300) | st.text(max_size=300))
def test_fuzz_parse_frame_arbitrary_bytes_never_crash(raw: bytes | str) -> None:
    check_frame_result(raw, parse_frame(raw, RECV))


@given(json_values, st.sampled_from(["btcusdt@trade", "btcusdt@depth@100ms", "!serverShutdown", None]))
def test_fuzz_parse_frame_arbitrary_json_never_crashes(value: Any, stream: str | None) -> None:
    raw = orjson.dumps(value if stream is None else {"stream": stream, "data": value})
    check_frame_result(raw, parse_frame(raw, RECV))


@given(trades, st.data())
def test_fuzz_parse_frame_mutated_trade_is_rejected_or_valid(t: Trade, data: Any) -> None:
    payload = trade_payload(t, ms=True)
    key = data.draw(st.sampled_from([*payload, "extra"]), label="key")
    action = data.draw(st.sampled_from(["replace", "drop"]), label="action")
    if action == "drop":
        payload.pop(key, None)
    else:
        payload[key] = data.draw(json_values, label="value")
    raw = orjson.dumps({"stream": f"{t.symbol.lower()}@trade", "data": payload})
    ev = parse_frame(raw, RECV)
    check_frame_result(raw, ev)
    if action == "drop" and key in ("s", "t", "p", "q", "T", "m"):
        assert isinstance(ev, Rejected), f"trade without {key!r} accepted"
    if key in ("extra", "M", "E") and isinstance(ev, Trade):
        assert ev == parse_frame(orjson.dumps({"stream": f"{t.symbol.lower()}@trade",
                                               "data": trade_payload(t, ms=True)}), RECV)  # fmt: skip


@given(st.lists(st.one_of(trades.map(lambda t: ("ok", t)), st.binary(max_size=60).map(lambda b: ("bad", b)),
                          json_values.map(lambda v: ("bad", orjson.dumps(v)))), max_size=30))  # fmt: skip
def test_fuzz_parse_frame_garbage_between_valid_frames_loses_nothing(items: list[tuple[str, Any]]) -> None:
    """Every valid trade in a stream of frames comes out, in order, whatever is interleaved with it."""
    frames: list[bytes] = []
    want: list[Trade] = []
    for kind, item in items:
        if kind == "ok":
            t = Trade(item.symbol, item.price, item.volume, item.side, item.timestamp // 1000 * 1000, item.trade_id,
                      RECV)  # fmt: skip
            want.append(t)
            frames.append(orjson.dumps({"stream": f"{t.symbol.lower()}@trade", "data": trade_payload(t, ms=True)}))
        else:
            frames.append(item)
    results = [parse_frame(f, RECV) for f in frames]
    for raw, ev in zip(frames, results, strict=True):
        check_frame_result(raw, ev)
    assert [ev for ev in results if isinstance(ev, Trade)] == want


@given(st.integers(10, 200), st.binary(min_size=1, max_size=300))
def test_fuzz_parse_frame_oversized_is_rejected_with_truncated_raw(limit: int, tail: bytes) -> None:
    raw = b"x" * limit + tail
    ev = parse_frame(raw, RECV, max_bytes=limit)
    assert isinstance(ev, Rejected) and ev.reason == "oversized" and ev.raw == raw[:MAX_RAW_KEPT]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"stream":"btcusdt@trade","data":{"e":"trade","s":"BTC\xffUSDT"}}',
        b'{"e":"trade","E":NaN}',
        b'{"e":"trade","E":Infinity}',
        b'{"e":"trade","E":1e400}',
        b'{"e":"trade","t":18446744073709551616}',
        b"[" * 5000 + b"]" * 5000,
        b'{"e":"trade","s":"BTCUSDT\\n","t":1,"p":"1","q":"1","T":1723161255342,"m":true}',
        b'{"e":"depthUpdate","s":"BTCUSDT","E":1723161255342,"U":1,"u":2,"b":[["1","-1"]],"a":[]}',
        b'{"e":"depthUpdate","s":"BTCUSDT","E":1723161255342,"U":1,"u":2,"b":[[1.5,"1"]],"a":[]}',
        b'{"e":"depthUpdate","s":"BTCUSDT","E":1723161255342,"U":1,"u":2,"b":[["1","1"]],"a":'
        + orjson.dumps([["1", "1"]] * 10_001)
        + b"}",
        b'{"e":"trade","s":"BTCUSDT","t":1,"p":"1","q":"1","T":-1723161255342,"m":true}',
        b'{"e":"trade","s":"BTCUSDT","t":-1,"p":"1","q":"1","T":1723161255342,"m":true}',
        b'{"e":"trade","s":"BTCUSDT","t":1,"p":"1","q":"1","T":1723161255342,"m":1}',
        b'{"e":"trade","s":"BTCUSDT","t":true,"p":"1","q":"1","T":1723161255342,"m":true}',
        b'{"e":"trade","s":"BTCUSDT","t":1.5,"p":"1","q":"1","T":1723161255342,"m":true}',
        b'{"e":"aggTrade","s":"BTCUSDT"}',
        b'{"stream":"btcusdt@trade","data":[]}',
        b'{"stream":["x"],"data":{}}',
        b'{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":"soon"}}',
    ],
)
def test_parse_frame_rejects_known_bad_frames(raw: bytes) -> None:
    ev = parse_frame(raw, RECV)
    check_frame_result(raw, ev)
    assert isinstance(ev, Rejected), ev


# -- the Brain consumer's fast path must agree with decode_entry --------------------------------------


def fast_and_full(raw: list[bytes]) -> tuple[tuple[bytes, bytes] | None, Trade | DepthDiff | None]:
    try:
        tick: Trade | DepthDiff | None = decode_entry(raw)
    except TickError:
        tick = None
    return match_trade(raw), tick


@given(trades, st.lists(st.tuples(st.integers(0, 8), nasty_bytes), max_size=2))
def test_fuzz_consumer_fast_path_accepts_only_what_decode_entry_accepts(
    t: Trade, mutations: list[tuple[int, bytes]]
) -> None:
    """`fast_trade` skips `decode_entry` for speed; whatever it lets through must be a valid trade."""
    raw = entry(t)
    for index, value in mutations:
        raw[2 * index + 1] = value
    fast, tick = fast_and_full(raw)
    if fast is not None:
        assert isinstance(tick, Trade), f"fast path accepted what decode_entry rejects: {raw!r}"
        assert fast == (tick.symbol.encode(), tick.exchange.encode())


@pytest.mark.parametrize("exchange", [b"evil", b"binance_futures", b"x"])
def test_consumer_fast_path_rejects_a_foreign_exchange(exchange: bytes) -> None:
    raw = entry(Trade("BTCUSDT", "61000.5", "0.25", "SELL", 1_723_161_255_342_000, 7, 1_723_161_255_343_000))
    raw[3] = exchange
    assert fast_and_full(raw) == (None, None)


# ------------------------------------------------------------------ order-book levels: one regex against each value

_LEVEL_EDGES: list[object] = [
    [["1.5", "0"]], [["0.000", "1"]], [["1", 2]], [[1, "2"]], [["1", "2", "3"]], [("1", "2")], ("x",), "x", None,
    [["1e5", "1"]], [["-1", "1"]], [["1.", "1"]], [["1.5\n", "1"]], [], (), [["00.10", "0.00000000"]],
    [["1\x002", "3\x004"]], [["1\x00", "2"]], [["1", "2\x00"]], [["١", "1"]], [["1", "2"], ["0", "1"]],
    [["1" * 20 + "." + "1" * 18, "0"]], [["1" * 21, "0"]], [["1." + "1" * 19, "0"]], [[b"1", "2"]],
    [["1", "2"]] * 3, [["1", "2"], "12"], [["1", "2"], ["1"]],
]  # fmt: skip


def _levels_outcome(check: Any, levels: object) -> object:
    try:
        return check("bids", levels)
    except TickError as exc:
        return str(exc)


@pytest.mark.parametrize("levels", _LEVEL_EDGES)
def test_check_levels_fast_path_agrees_with_the_check_per_value(levels: object) -> None:
    """`check_levels` validates a valid side with one regex over the joined values; it must accept exactly what
    the check per value accepts (a NUL inside a value must not shift the pairs), with the same error otherwise."""
    assert _levels_outcome(check_levels, levels) == _levels_outcome(_check_levels_each, levels)


def test_check_levels_rejects_values_that_would_shift_the_joined_pairs() -> None:
    """Joined, `["1\\x002", "3\\x004"]` reads like two valid levels: it must still be one invalid level."""
    with pytest.raises(TickError, match=r"bids.price: not a plain decimal string"):
        check_levels("bids", [["1\x002", "3\x004"]])
    assert check_levels("bids", [["1", "2"], ["3", "0"]]) == (("1", "2"), ("3", "0"))


# Mostly valid decimals (so whole sides take the fast path), some near misses and some other types.
_valid_decimal = st.from_regex(r"[0-9]{1,21}(\.[0-9]{1,19})?", fullmatch=True)
_decimalish = _valid_decimal | _valid_decimal | st.text(alphabet="0123456789.\x00-e\n١", min_size=0, max_size=24)
_level_value = _decimalish | st.integers() | st.none() | st.binary(max_size=3)


@given(
    st.lists(
        st.tuples(_decimalish, _decimalish).map(list)
        | st.tuples(_decimalish, _decimalish)
        | st.lists(_level_value, min_size=0, max_size=3)
        | _decimalish,
        max_size=6,
    )
)
@settings(max_examples=400, deadline=None)
def test_check_levels_fast_path_property(levels: list[object]) -> None:
    assert _levels_outcome(check_levels, levels) == _levels_outcome(_check_levels_each, levels)
