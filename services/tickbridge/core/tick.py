"""The normalized tick: trades and order-book diffs, and their Redis stream encoding.

Stream entries carry one field per attribute (readable with `redis-cli XRANGE`) in a fixed order,
so Redis stores them compactly (same field names as the node's master entry). Decimal values stay
the exchange's strings end to end; only QuestDB stores them as DOUBLE.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import orjson

from tickbridge.core.keys import EXCHANGE

Side = Literal["BUY", "SELL"]
Level = tuple[str, str]

#: Field order of a trade entry (contract).
TRADE_FIELDS: tuple[str, ...] = (
    "symbol", "exchange", "type", "price", "volume", "side", "timestamp", "trade_id", "recv_ts",
)  # fmt: skip
#: Field order of an order-book diff entry (contract, plus recv_ts).
DEPTH_FIELDS: tuple[str, ...] = (
    "symbol", "exchange", "type", "timestamp", "first_update_id", "last_update_id", "bids", "asks", "recv_ts",
)  # fmt: skip

# `\Z`, not `$`: `$` also matches before a trailing newline ("BTCUSDT\n" would pass).
_DECIMAL = re.compile(r"^[0-9]{1,20}(\.[0-9]{1,18})?\Z")
_SYMBOL = re.compile(r"^[A-Z0-9]{2,32}\Z")
#: Plausible exchange times in µs: 2017-01-01 .. 2100-01-01.
MIN_TS_US = 1_483_228_800_000_000
MAX_TS_US = 4_102_444_800_000_000
MAX_ID = 2**63 - 1
MAX_LEVELS = 10_000


class TickError(ValueError):
    """A record that is not a valid tick; the message says why in one line."""


def check_decimal(name: str, value: object, *, positive: bool) -> str:
    """A non-negative decimal string as the exchange sends it (`"2600.01000000"`)."""
    if not isinstance(value, str):
        raise TickError(f"{name}: expected a decimal string, got {type(value).__name__}")
    if not _DECIMAL.match(value):
        raise TickError(f"{name}: not a plain decimal string: {value[:40]!r}")
    number = float(value)
    if not math.isfinite(number):
        raise TickError(f"{name}: not finite: {value[:40]!r}")
    if positive and number <= 0:
        raise TickError(f"{name}: must be > 0, got {value!r}")
    return value


def check_int(name: str, value: object, lo: int = 0, hi: int = MAX_ID) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TickError(f"{name}: expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise TickError(f"{name}: {value} out of range [{lo}, {hi}]")
    return value


def check_symbol(value: object) -> str:
    if not isinstance(value, str) or not _SYMBOL.match(value):
        raise TickError(f"symbol: invalid {str(value)[:40]!r}")
    return value


def check_exchange(value: object) -> str:
    """Only `binance_spot`: the exchange names Redis keys (`market:<exchange>:trades:<SYMBOL>`), so a stray
    value would write outside the keys the ACLs allow (and stall the consumer) or where nobody reads."""
    if value != EXCHANGE:
        raise TickError(f"exchange: expected {EXCHANGE!r}, got {str(value)[:40]!r}")
    return EXCHANGE


def check_levels(name: str, value: object) -> tuple[Level, ...]:
    if not isinstance(value, list | tuple):
        raise TickError(f"{name}: expected a list of [price, qty], got {type(value).__name__}")
    if len(value) > MAX_LEVELS:
        raise TickError(f"{name}: {len(value)} levels exceeds {MAX_LEVELS}")
    levels: list[Level] = []
    for level in value:
        if not isinstance(level, list | tuple) or len(level) != 2:
            raise TickError(f"{name}: level must be [price, qty], got {str(level)[:40]}")
        levels.append((check_decimal(f"{name}.price", level[0], positive=True),
                       check_decimal(f"{name}.qty", level[1], positive=False)))  # fmt: skip
    return tuple(levels)


@dataclass(frozen=True, slots=True)
class Trade:
    """One exchange trade. `timestamp` is the exchange trade time (µs), `recv_ts` the collector's (µs)."""

    symbol: str
    price: str
    volume: str
    side: Side
    timestamp: int
    trade_id: int
    recv_ts: int
    exchange: str = EXCHANGE

    def __post_init__(self) -> None:
        check_symbol(self.symbol)
        check_exchange(self.exchange)
        check_decimal("price", self.price, positive=True)
        check_decimal("volume", self.volume, positive=True)
        if self.side not in ("BUY", "SELL"):
            raise TickError(f"side: expected BUY or SELL, got {self.side!r}")
        check_int("timestamp", self.timestamp, MIN_TS_US, MAX_TS_US)
        check_int("trade_id", self.trade_id)
        check_int("recv_ts", self.recv_ts, MIN_TS_US, MAX_TS_US)

    def fields(self) -> list[str | int]:
        """Flat `field, value, …` list in contract order, ready for XADD."""
        return [
            "symbol", self.symbol, "exchange", self.exchange, "type", "TRADE", "price", self.price,
            "volume", self.volume, "side", self.side, "timestamp", self.timestamp,
            "trade_id", self.trade_id, "recv_ts", self.recv_ts,
        ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class DepthDiff:
    """One order-book diff event (`depthUpdate`): absolute quantities, `"0"` removes a level."""

    symbol: str
    timestamp: int
    first_update_id: int
    last_update_id: int
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    recv_ts: int
    exchange: str = EXCHANGE

    def __post_init__(self) -> None:
        check_symbol(self.symbol)
        check_exchange(self.exchange)
        check_int("timestamp", self.timestamp, MIN_TS_US, MAX_TS_US)
        check_int("first_update_id", self.first_update_id)
        check_int("last_update_id", self.last_update_id)
        if self.last_update_id < self.first_update_id:
            raise TickError(f"last_update_id {self.last_update_id} < first_update_id {self.first_update_id}")
        check_int("recv_ts", self.recv_ts, MIN_TS_US, MAX_TS_US)

    def fields(self) -> list[str | int]:
        """Flat `field, value, …` list in contract order, ready for XADD."""
        return [
            "symbol", self.symbol, "exchange", self.exchange, "type", "DEPTH", "timestamp", self.timestamp,
            "first_update_id", self.first_update_id, "last_update_id", self.last_update_id,
            "bids", orjson.dumps(self.bids).decode(), "asks", orjson.dumps(self.asks).decode(),
            "recv_ts", self.recv_ts,
        ]  # fmt: skip


Tick = Trade | DepthDiff


def _text(fields: Mapping[str, str], name: str) -> str:
    try:
        return fields[name]
    except KeyError:
        raise TickError(f"missing field {name!r}") from None


def _integer(fields: Mapping[str, str], name: str) -> int:
    raw = _text(fields, name)
    # Length first: int() of more than 4300 digits raises a plain ValueError, not a TickError.
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise TickError(f"{name}: not an integer: {raw[:40]!r}")
    return int(raw)


def normalize_fields(raw: Mapping[bytes, bytes] | Mapping[str, str] | Sequence[bytes]) -> dict[str, str]:
    """Stream entry fields as `str -> str`, from a redis-py dict or a raw flat `[f, v, f, v]` list."""
    try:
        if isinstance(raw, Mapping):
            return {
                (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in raw.items()
            }
        if len(raw) % 2:
            raise TickError("odd number of field/value items")
        return {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw), 2)}
    except UnicodeDecodeError as exc:
        raise TickError(f"invalid UTF-8 in entry: {exc.reason}") from None


def decode_entry(raw: Mapping[bytes, bytes] | Mapping[str, str] | Sequence[bytes]) -> Tick:
    """Decode and validate a stream entry; raises `TickError` with the reason."""
    fields = normalize_fields(raw)
    kind = _text(fields, "type")
    if kind == "TRADE":
        side = _text(fields, "side")
        if side not in ("BUY", "SELL"):
            raise TickError(f"side: expected BUY or SELL, got {side[:10]!r}")
        return Trade(
            symbol=_text(fields, "symbol"),
            exchange=_text(fields, "exchange"),
            price=_text(fields, "price"),
            volume=_text(fields, "volume"),
            side=side,  # type: ignore[arg-type]
            timestamp=_integer(fields, "timestamp"),
            trade_id=_integer(fields, "trade_id"),
            recv_ts=_integer(fields, "recv_ts"),
        )
    if kind == "DEPTH":
        try:
            bids = orjson.loads(_text(fields, "bids"))
            asks = orjson.loads(_text(fields, "asks"))
        except orjson.JSONDecodeError as exc:
            raise TickError(f"bids/asks: invalid JSON: {exc}") from None
        return DepthDiff(
            symbol=_text(fields, "symbol"),
            exchange=_text(fields, "exchange"),
            timestamp=_integer(fields, "timestamp"),
            first_update_id=_integer(fields, "first_update_id"),
            last_update_id=_integer(fields, "last_update_id"),
            bids=check_levels("bids", bids),
            asks=check_levels("asks", asks),
            recv_ts=_integer(fields, "recv_ts") if "recv_ts" in fields else _integer(fields, "timestamp"),
        )
    raise TickError(f"type: unknown {kind[:20]!r} (expected TRADE or DEPTH)")


def parse_stream_id(entry_id: bytes | str) -> tuple[int, int]:
    """`b"1723161255343-7"` -> `(1723161255343, 7)`."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_stream_id(ms: int, seq: int) -> str:
    return f"{ms}-{seq}"
