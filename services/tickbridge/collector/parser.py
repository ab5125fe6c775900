"""Raw exchange frame -> routed event, or a rejection with a reason. A pure function (fuzzed in issue 7).

`parse_frame` never raises for bad input: anything that is not a valid trade, diff-depth event,
`serverShutdown` or control response becomes a `Rejected` carrying a bounded reason code (a metric
label), a one-line detail and the raw payload (truncated) for the dead-letter stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from tickbridge.core.tick import DepthDiff, TickError, Trade, check_int, check_levels

#: Frames larger than this are rejected (the WebSocket itself allows more, so we still see and count them).
MAX_FRAME_BYTES = 1 << 20
#: Raw payload kept in a dead letter.
MAX_RAW_KEPT = 4096
#: Below this an exchange time is in ms (default), at or above in µs (`timeUnit=MICROSECOND`).
_US_THRESHOLD = 10**14

#: Bounded set of rejection reasons (metric label values).
REASONS = (
    "oversized", "json", "not_object", "unknown_stream", "unknown_event", "schema", "stream_mismatch",
    "exchange_error", "unknown_symbol",
)  # fmt: skip
#: Reasons the collector adds after parsing (they need more than the frame): a trade whose exchange time
#: is more than `MAX_AHEAD_US` after it was received (a corrupt or hostile frame, or a clock far off).
FUTURE_TIME = "future_time"
COLLECTOR_REASONS = (FUTURE_TIME,)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A frame that is not a usable event: `reason` is one of `REASONS`."""

    reason: str
    detail: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class ServerShutdown:
    """`{"e":"serverShutdown","E":...}`: the server will close this connection soon."""

    event_time: int


@dataclass(frozen=True, slots=True)
class ControlReply:
    """`{"result": ..., "id": ...}`: the answer to a control request (ignored)."""

    id: object


Event = Trade | DepthDiff | ServerShutdown | ControlReply | Rejected


def to_us(value: int) -> int:
    """Exchange time in µs: ms by default, already µs with `timeUnit=MICROSECOND` (16 digits)."""
    return value * 1000 if value < _US_THRESHOLD else value


def _raw_bytes(raw: bytes | str) -> bytes:
    data = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
    return data[:MAX_RAW_KEPT]


def parse_trade(data: dict[str, Any], recv_ts: int) -> Trade:
    """A `<symbol>@trade` payload::

        {
          "e": "trade",          # event type
          "E": 1723161255343,    # event time (ms, or µs with timeUnit=MICROSECOND)
          "s": "BTCUSDT",        # symbol, upper case
          "t": 3735683259,       # trade ID, +1 per trade per symbol
          "p": "61837.63000000", # price (decimal string, kept as is)
          "q": "0.02000000",     # quantity
          "T": 1723161255342,    # trade time -> `timestamp` (µs)
          "m": true,             # buyer is the maker: the taker SOLD -> side SELL
          "M": true              # ignore
        }

    Unknown keys (a legacy `b`/`a`) are ignored. Raises `TickError` on a missing or mistyped field.
    """
    try:
        symbol, trade_id, price, qty, ts, maker = data["s"], data["t"], data["p"], data["q"], data["T"], data["m"]
    except KeyError as exc:
        raise TickError(f"trade: missing field {exc.args[0]!r}") from None
    if not isinstance(maker, bool):
        raise TickError(f"m: expected a boolean, got {type(maker).__name__}")
    check_int("T", ts)
    return Trade(
        symbol=symbol,
        price=price,
        volume=qty,
        side="SELL" if maker else "BUY",
        timestamp=to_us(ts),
        trade_id=trade_id,
        recv_ts=recv_ts,
    )


def parse_depth(data: dict[str, Any], recv_ts: int) -> DepthDiff:
    """A `<symbol>@depth@100ms` payload::

        {
          "e": "depthUpdate",    # event type
          "E": 1723161261311,    # event time -> `timestamp` (µs)
          "s": "BTCUSDT",        # symbol
          "U": 50093242275,      # first update ID in the event
          "u": 50093242277,      # final update ID in the event
          "b": [["57950.00000000", "0.01763000"]],   # bids: absolute qty, "0.00000000" removes
          "a": [["61856.27000000", "0.00000000"]]    # asks
        }

    Raises `TickError` on a missing or mistyped field.
    """
    try:
        symbol, ts, first, last, bids, asks = data["s"], data["E"], data["U"], data["u"], data["b"], data["a"]
    except KeyError as exc:
        raise TickError(f"depthUpdate: missing field {exc.args[0]!r}") from None
    check_int("E", ts)
    return DepthDiff(
        symbol=symbol,
        timestamp=to_us(ts),
        first_update_id=first,
        last_update_id=last,
        bids=check_levels("b", bids),
        asks=check_levels("a", asks),
        recv_ts=recv_ts,
    )


def _route(stream: str | None, data: dict[str, Any], recv_ts: int, raw: bytes | str) -> Event:
    kind = data.get("e")
    if kind == "trade":
        tick: Trade | DepthDiff = parse_trade(data, recv_ts)
        suffix = "@trade"
    elif kind == "depthUpdate":
        tick = parse_depth(data, recv_ts)
        suffix = "@depth"
    elif kind == "serverShutdown":
        return ServerShutdown(event_time=check_int("E", data.get("E", 0)))
    else:
        return Rejected("unknown_event", f"unknown event type {str(kind)[:40]!r}", _raw_bytes(raw))
    if stream is not None:
        name, _, rest = stream.partition("@")
        if name.upper() != tick.symbol or not ("@" + rest).startswith(suffix):
            return Rejected(
                "stream_mismatch", f"stream {stream[:60]!r} carries {kind} for {tick.symbol}", _raw_bytes(raw)
            )
    return tick


def parse_frame(raw: bytes | str, recv_ts: int, max_bytes: int = MAX_FRAME_BYTES) -> Event:
    """Decode one WebSocket frame (combined `{"stream","data"}` wrapper or a raw payload).

    `recv_ts` is the local receive time in µs, copied into the tick.
    """
    if len(raw) > max_bytes:
        return Rejected("oversized", f"frame of {len(raw)} bytes exceeds {max_bytes}", _raw_bytes(raw))
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejected("json", f"invalid JSON: {str(exc)[:80]}", _raw_bytes(raw))
    if not isinstance(msg, dict):
        return Rejected("not_object", f"expected a JSON object, got {type(msg).__name__}", _raw_bytes(raw))
    try:
        if "stream" in msg:
            stream, data = msg["stream"], msg.get("data")
            if not isinstance(stream, str):
                return Rejected("schema", "stream: expected a string", _raw_bytes(raw))
            if not isinstance(data, dict):
                return Rejected("schema", "data: expected a JSON object", _raw_bytes(raw))
            if stream == "!serverShutdown" or data.get("e") == "serverShutdown":
                return ServerShutdown(event_time=check_int("E", data.get("E", 0)))
            if "@trade" not in stream and "@depth" not in stream:
                return Rejected("unknown_stream", f"unexpected stream {stream[:60]!r}", _raw_bytes(raw))
            return _route(stream, data, recv_ts, raw)
        if "e" in msg:
            return _route(None, msg, recv_ts, raw)
        if "error" in msg:
            return Rejected("exchange_error", f"error reply: {str(msg['error'])[:120]}", _raw_bytes(raw))
        if "result" in msg and "id" in msg:
            return ControlReply(id=msg["id"])
        return Rejected("unknown_event", "object without stream, e, result or error", _raw_bytes(raw))
    except TickError as exc:
        return Rejected("schema", str(exc)[:200], _raw_bytes(raw))
    except (TypeError, ValueError, AttributeError) as exc:  # e.g. a list where a string was expected
        return Rejected("schema", f"{type(exc).__name__}: {str(exc)[:160]}", _raw_bytes(raw))
