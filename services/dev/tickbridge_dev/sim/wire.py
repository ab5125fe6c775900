"""Binance WebSocket protocol pieces: stream names, control messages and raw frame encoding."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

import orjson

#: Stream kinds the simulator serves; a well-formed name of another kind is still accepted (silence).
KINDS = ("trade", "depth@100ms", "depth", "bookTicker")
_STREAM_RE = re.compile(
    r"^[a-z0-9]{2,30}@(trade|aggTrade|depth|depth@100ms|depth@1000ms|depth(5|10|20)(@100ms)?|bookTicker"
    r"|miniTicker|ticker|avgPrice|kline_(1s|1m|3m|5m|15m|30m|1h|2h|4h|6h|8h|12h|1d|3d|1w|1M))$"
)
_ID_RE = re.compile(r"^[A-Za-z0-9]{1,36}$")
METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")


def valid_stream(name: str) -> bool:
    """Well-formed Binance stream name (lower-case symbol)."""
    return bool(_STREAM_RE.match(name))


def split_stream(name: str) -> tuple[str, str]:
    """`btcusdt@depth@100ms` -> ("BTCUSDT", "depth@100ms")."""
    sym, _, kind = name.partition("@")
    return sym.upper(), kind


_MS_TIMES = re.compile(rb'"([ET])":(\d{13})(?=[,}])')


def to_micro(payload: bytes) -> bytes:
    """`timeUnit=MICROSECOND`: event/trade times (`E`, `T`) in µs (16 digits)."""
    return _MS_TIMES.sub(rb'"\1":\g<2>000', payload)


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One unmasked, final server frame (text by default)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def error(code: int, msg: str, req_id: Any) -> bytes:
    return orjson.dumps({"error": {"code": code, "msg": msg}, "id": req_id})


def result(value: Any, req_id: Any) -> bytes:
    return orjson.dumps({"result": value, "id": req_id})


@dataclass
class Request:
    """A parsed, validated control message."""

    method: str
    params: list[Any]
    id: Any


def parse_request(text: str | bytes) -> Request | bytes:
    """Parse a client frame; returns the request or the error frame Binance would send."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return error(3, f"Invalid JSON: expected value at line 1 column {getattr(exc, 'colno', 1)}", None)
    if not isinstance(obj, dict):
        return error(3, "Invalid JSON: expected value at line 1 column 1", None)
    req_id = obj.get("id")
    if not (
        req_id is None
        or (isinstance(req_id, int) and not isinstance(req_id, bool) and -(2**63) <= req_id < 2**63)
        or (isinstance(req_id, str) and _ID_RE.match(req_id))
    ):
        return error(2, "Invalid request: request ID must be an unsigned integer", None)
    method = obj.get("method")
    if method is None:
        return error(2, "Invalid request: missing field `method`", req_id)
    if method not in METHODS:
        expected = ", ".join(f"`{m}`" for m in METHODS)
        return error(2, f"Invalid request: unknown variant `{method}`, expected one of {expected}", req_id)
    params = obj.get("params", [])
    if not isinstance(params, list):
        return error(2, "Invalid request: invalid parameters", req_id)
    return Request(method, params, req_id)
