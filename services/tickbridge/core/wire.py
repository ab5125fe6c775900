"""Every on-the-wire layout of tickbridge, encode and decode side by side.

Anything that leaves a process (a Redis stream entry, a WARM sorted-set member, a stream ID, a QuestDB row,
a dead letter, a spilled buffer row) is built and read here and nowhere else; key and table *names* live in
`core/keys.py`. `brain/brain.lua` cannot import this module: `tests/test_wire.py` runs it on a real Redis and
checks what it writes against the encoders below. The layouts, in `docs/DEVELOPING.md` ("Wire format") too:

- tick entry (trade, depth diff) of `market:vps:stream` on both hosts: `encode_tick`; `decode_entry`,
  `strict_decode` (exactly the contract's fields), `match_trade` (the fast check of a trade);
- per-symbol entry (`src_id` + tick) of the Brain's `market:<ex>:trades|depth:<SYM>`: `encode_symbol_entry`
  (and brain.lua); `symbol_trade` (fast, positional), `decode_symbol_entry`;
- WARM member of `market:<ex>:warm:<SYM>` on both hosts: `encode_warm_member` (and brain.lua);
  `decode_warm_member`;
- stream ID of every stream: `format_stream_id`; `parse_stream_id`, `stream_id_ms`;
- `vps_buffer` row (VPS QuestDB): `vps_buffer_ddl`, `ilp_buffer_row`, `encode_payload`; `decode_payload`;
- `trades` and `depth_updates` rows (Brain QuestDB): `TRADES_DDL`, `DEPTH_DDL`, `ilp_trade`, `ilp_depth`;
- dead letters: `collector_dead_letter`, `writer_dead_letter`, and the consumer's (built by brain.lua from
  the consumer's records) read back by `split_dead_letter`.

The WARM member is `trade_id|price|volume|side|recv_ts`, scored by the exchange trade time (µs), on the VPS
and on the Brain alike. The score already holds `timestamp` (contract: "a sorted set scored by timestamp"),
so repeating it in the member (the VPS's old `…|timestamp`) carried nothing, while `recv_ts` is only in the
member: the tiered reader returns it with every WARM row and latency measurements need it. `trade_id` first
keeps members unique per trade (a trade written twice is one member, as long as its `recv_ts` is the same:
every writer copies it from the one stream entry).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import orjson
from questdb.ingress import Buffer, TimestampMicros

from tickbridge.core import keys
from tickbridge.core.tick import (
    MAX_ID,
    MAX_TS_US,
    MIN_TS_US,
    BookReset,
    BookSnapshot,
    DepthDiff,
    Tick,
    TickError,
    Trade,
    check_levels,
)

# ---------------------------------------------------------------------------------------------- time, IDs

#: A stream entry ID as numbers: `(ms, seq)`; tuples compare in stream order.
StreamId = tuple[int, int]
#: An entry as XRANGE/XREAD return it: (ID, flat `[field, value, ...]`).
RawEntry = tuple[bytes, list[bytes]]
#: An entry as XREADGROUP/XAUTOCLAIM return it: fields are None when it was deleted while pending.
GroupEntry = tuple[bytes, list[bytes] | None]


def now_us() -> int:
    """Wall-clock time in µs (the unit of `timestamp`, `recv_ts` and WARM scores)."""
    return time.time_ns() // 1000


def parse_stream_id(entry_id: bytes | str) -> StreamId:
    """`b"1723161255343-7"` -> `(1723161255343, 7)`; a bare `"1723161255343"` is seq 0."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_stream_id(entry_id: StreamId) -> str:
    """`(1723161255343, 7)` -> `"1723161255343-7"`."""
    return f"{entry_id[0]}-{entry_id[1]}"


def stream_id_ms(entry_id: bytes | str) -> int:
    """The millisecond part of a stream ID (when Redis appended an entry with `*`)."""
    return parse_stream_id(entry_id)[0]


# ---------------------------------------------------------------------------------------------- tick entries

#: Field order of a trade entry (contract).
TRADE_FIELDS: tuple[str, ...] = (
    "symbol", "exchange", "type", "price", "volume", "side", "timestamp", "trade_id", "recv_ts",
)  # fmt: skip
#: Field order of an order-book diff entry (contract, plus recv_ts).
DEPTH_FIELDS: tuple[str, ...] = (
    "symbol", "exchange", "type", "timestamp", "first_update_id", "last_update_id", "bids", "asks", "recv_ts",
)  # fmt: skip
TRADE_TYPE = "TRADE"
DEPTH_TYPE = "DEPTH"
#: The values of a trade entry in contract order from `price` on (price, volume, side, timestamp, trade_id,
#: recv_ts): what brain.lua's 'T' record takes per trade after the entry ID (`fields[TRADE_VALUES]`).
TRADE_VALUES = slice(7, None, 2)


def encode_trade(t: Trade) -> list[str | int]:
    """Flat `field, value, …` list of a trade in contract order, ready for XADD."""
    return [
        "symbol", t.symbol, "exchange", t.exchange, "type", TRADE_TYPE, "price", t.price, "volume", t.volume,
        "side", t.side, "timestamp", t.timestamp, "trade_id", t.trade_id, "recv_ts", t.recv_ts,
    ]  # fmt: skip


def encode_depth(d: DepthDiff) -> list[str | int]:
    """Flat `field, value, …` list of an order-book diff in contract order (levels as JSON), ready for XADD."""
    return [
        "symbol", d.symbol, "exchange", d.exchange, "type", DEPTH_TYPE, "timestamp", d.timestamp,
        "first_update_id", d.first_update_id, "last_update_id", d.last_update_id,
        "bids", orjson.dumps(d.bids).decode(), "asks", orjson.dumps(d.asks).decode(), "recv_ts", d.recv_ts,
    ]  # fmt: skip


#: Field order of a whole-book entry (issue 17): the collector's book when it (re)syncs or the Brain asks.
BOOK_FIELDS: tuple[str, ...] = (
    "symbol", "exchange", "type", "timestamp", "last_update_id", "bids", "asks", "recv_ts",
)  # fmt: skip
BOOK_TYPE = "BOOK"


def encode_book(b: BookSnapshot) -> list[str | int]:
    """Flat `field, value, …` list of a whole book (levels as JSON `[[price, qty], …]`), ready for XADD."""
    return [
        "symbol", b.symbol, "exchange", b.exchange, "type", BOOK_TYPE, "timestamp", b.timestamp,
        "last_update_id", b.last_update_id, "bids", orjson.dumps(b.bids).decode(),
        "asks", orjson.dumps(b.asks).decode(), "recv_ts", b.recv_ts,
    ]  # fmt: skip


#: Field order of a book-reset entry (issue 17): the collector's book stopped being valid after
#: `last_update_id` (an update-ID gap, a disconnect); the Brain's book is invalid until the next whole book.
RESYNC_FIELDS: tuple[str, ...] = ("symbol", "exchange", "type", "timestamp", "last_update_id", "reason", "recv_ts")
RESYNC_TYPE = "RESYNC"


def encode_reset(r: BookReset) -> list[str | int]:
    """Flat `field, value, …` list of a book reset, ready for XADD."""
    return [
        "symbol", r.symbol, "exchange", r.exchange, "type", RESYNC_TYPE, "timestamp", r.timestamp,
        "last_update_id", r.last_update_id, "reason", r.reason, "recv_ts", r.recv_ts,
    ]  # fmt: skip


def is_book_entry(fields: Sequence[bytes] | None) -> bool:
    """True for a `type=BOOK` or `type=RESYNC` entry (`decode_book`, not `decode_entry`)."""
    kind = entry_field(fields, b"type")
    return kind == b"BOOK" or kind == b"RESYNC"


def _book_fields(raw: Mapping[bytes, bytes] | Mapping[str, str] | Sequence[bytes]) -> dict[str, str]:
    """A BOOK or RESYNC entry's fields, exactly its type's; raises `TickError`."""
    if not isinstance(raw, Mapping):
        if len(raw) > 2 * len(BOOK_FIELDS):
            raise TickError(f"{len(raw) // 2} fields, more than a book's {len(BOOK_FIELDS)}")
        if sum(map(len, raw)) > MAX_ENTRY_BYTES:
            raise TickError(f"more than {MAX_ENTRY_BYTES} bytes")
    fields = normalize_fields(raw)
    kind = fields.get("type")
    if set(fields) != set(BOOK_FIELDS if kind == BOOK_TYPE else RESYNC_FIELDS):
        raise TickError(f"not a book entry: fields {sorted(fields)[:12]}")
    return fields


def decode_book(raw: Mapping[bytes, bytes] | Mapping[str, str] | Sequence[bytes]) -> BookSnapshot | BookReset:
    """Decode and validate a `type=BOOK` (exactly `BOOK_FIELDS`) or `type=RESYNC` (`RESYNC_FIELDS`) entry;
    raises `TickError`."""
    fields = _book_fields(raw)
    if fields["type"] == RESYNC_TYPE:
        return BookReset(
            symbol=fields["symbol"],
            exchange=fields["exchange"],
            timestamp=_integer(fields, "timestamp"),
            last_update_id=_integer(fields, "last_update_id"),
            reason=fields["reason"],
            recv_ts=_integer(fields, "recv_ts"),
        )
    try:
        bids = orjson.loads(fields["bids"])
        asks = orjson.loads(fields["asks"])
    except orjson.JSONDecodeError as exc:
        raise TickError(f"bids/asks: invalid JSON: {exc}") from None
    return BookSnapshot(
        symbol=fields["symbol"],
        exchange=fields["exchange"],
        timestamp=_integer(fields, "timestamp"),
        last_update_id=_integer(fields, "last_update_id"),
        bids=check_levels("bids", bids),
        asks=check_levels("asks", asks),
        recv_ts=_integer(fields, "recv_ts"),
    )


def encode_tick(tick: Tick) -> list[str | int]:
    """`encode_trade` or `encode_depth`."""
    return encode_trade(tick) if isinstance(tick, Trade) else encode_depth(tick)


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
    """Decode and validate a tick entry (any field order, extra fields ignored); raises `TickError`."""
    fields = normalize_fields(raw)
    kind = _text(fields, "type")
    if kind == TRADE_TYPE:
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
    if kind == DEPTH_TYPE:
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


_TRADE_NAMES = frozenset(f.encode() for f in TRADE_FIELDS)
_DEPTH_NAMES = frozenset(f.encode() for f in DEPTH_FIELDS)
_CONTRACT_NAMES = _TRADE_NAMES | _DEPTH_NAMES
_MAX_ITEMS = 2 * max(len(TRADE_FIELDS), len(DEPTH_FIELDS))
#: Bytes of an entry at most: the collector's frame cap (`collector.parser.MAX_FRAME_BYTES`), so no entry the
#: collector writes is larger; a bigger one (bids/asks of 10,000 levels of 38-digit decimals) is refused.
MAX_ENTRY_BYTES = 1 << 20


def strict_decode(fields: list[bytes]) -> Tick:
    """`decode_entry`, and exactly the contract's fields of its type, each once (`recv_ts` optional on a
    depth diff, as `decode_entry` allows): extra fields would travel on to every reader of the per-symbol
    stream, and thousands of them made brain.lua's `unpack` fail. Raises `TickError`."""
    if len(fields) > _MAX_ITEMS:  # before any decoding: a wide entry costs nothing more than its length
        raise TickError(f"{len(fields) // 2} fields, more than the contract's {_MAX_ITEMS // 2}")
    size = sum(map(len, fields))
    if size > MAX_ENTRY_BYTES:
        raise TickError(f"{size} bytes, more than {MAX_ENTRY_BYTES}")
    names = fields[::2]
    seen = set(names)
    if len(seen) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise TickError(f"duplicate field {dup[:40]!r}")
    extra = seen - _CONTRACT_NAMES
    if extra:
        raise TickError(f"unexpected field {min(extra)[:40]!r}")
    tick = decode_entry(fields)
    extra = seen - (_TRADE_NAMES if isinstance(tick, Trade) else _DEPTH_NAMES)
    if extra:
        kind = "trade" if isinstance(tick, Trade) else "depth diff"
        raise TickError(f"unexpected field {min(extra)[:40]!r} in a {kind}")
    return tick


_DEC = rb"(?=[0-9.]*[1-9])[0-9]{1,20}(?:\.[0-9]{1,18})?"  # a decimal string > 0
#: A trade entry in the contract's field order, fields joined with NUL (which no valid value contains).
_TRADE = re.compile(
    rb"symbol\0([A-Z0-9]{2,32})\0exchange\0("
    + b"|".join(re.escape(e.encode()) for e in keys.EXCHANGES)
    + rb")\0type\0TRADE\0price\0"
    + _DEC
    + rb"\0volume\0"
    + _DEC
    + rb"\0side\0(?:BUY|SELL)\0timestamp\0([0-9]{16})\0trade_id\0([0-9]{1,19})"
    + rb"\0recv_ts\0([0-9]{16})"
)
_MIN_TS = str(MIN_TS_US).encode()
_MAX_TS = str(MAX_TS_US).encode()
_MAX_ID = str(MAX_ID).encode()


def match_trade(fields: list[bytes]) -> tuple[bytes, bytes] | None:
    """(symbol, exchange) if `fields` is a valid trade in the contract's field order, else None.

    The same rules as `decode_entry` in one regex (several times faster than building a dict and a
    dataclass); anything else (depth diffs, other field orders, invalid values) returns None and the
    caller falls back to `decode_entry` for the precise verdict.
    """
    if len(fields) != 18:
        return None
    m = _TRADE.fullmatch(b"\0".join(fields))
    if m is None:
        return None
    symbol, exchange, ts, tid, recv = m.groups()  # one call (five `group` calls cost ~0.15 µs more per trade)
    if not (_MIN_TS <= ts <= _MAX_TS and _MIN_TS <= recv <= _MAX_TS):
        return None
    if len(tid) == 19 and tid > _MAX_ID:
        return None
    return symbol, exchange


def entry_field(fields: Sequence[bytes] | None, name: bytes) -> bytes | None:
    """The value of field `name` in a flat field list (the first one), or None."""
    if not fields:
        return None
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == name:
            return fields[i + 1]
    return None


# ---------------------------------------------------------------------------------------------- per-symbol

#: Field names of a trade in a Brain per-symbol stream (brain.lua writes it): `src_id` (the Brain-stream
#: ID), then the tick in contract order.
SYMBOL_TRADE_NAMES: list[bytes] = [b"src_id", *(f.encode() for f in TRADE_FIELDS)]


def encode_symbol_entry(src_id: bytes | str, tick: Tick) -> list[str | int | bytes]:
    """The fields brain.lua appends to a per-symbol stream for `tick` read at `src_id`."""
    return ["src_id", src_id, *encode_tick(tick)]


def decode_symbol_entry(fields: Sequence[bytes]) -> tuple[bytes, Tick]:
    """(src_id, tick) of a per-symbol entry; raises `TickError`."""
    if len(fields) < 2 or fields[0] != b"src_id":
        raise TickError("per-symbol entry without a leading src_id")
    return fields[1], decode_entry(fields[2:])


#: The names of `symbol_trade`'s values, in order.
SYMBOL_TRADE_VALUES = ("symbol", "exchange", "type", "price", "volume", "side", "timestamp", "trade_id", "recv_ts")


def symbol_trade(fields: list[bytes]) -> list[bytes] | None:
    """The values of a trade in brain.lua's layout (`SYMBOL_TRADE_NAMES`), named by `SYMBOL_TRADE_VALUES`, or None
    for anything else (a depth diff, another field order: decode those by name). Checks the layout, not the
    values. A plain slice: the writer's hot path unpacks it."""
    if len(fields) == 20 and fields[0::2] == SYMBOL_TRADE_NAMES and fields[7] == b"TRADE":
        return fields[3::2]
    return None


# ---------------------------------------------------------------------------------------------- WARM

#: Separator of a WARM member's parts (no valid value contains it).
WARM_SEP = "|"


class WarmTrade(NamedTuple):
    """A WARM sorted-set entry: the member's parts and its score (`timestamp`, exchange time in µs)."""

    timestamp: int
    trade_id: int
    price: str
    volume: str
    side: str
    recv_ts: int


def encode_warm_member(t: Trade) -> str:
    """`trade_id|price|volume|side|recv_ts` (scored by `t.timestamp`; see the module docstring)."""
    return f"{t.trade_id}|{t.price}|{t.volume}|{t.side}|{t.recv_ts}"


def decode_warm_member(member: bytes | str, score: float) -> WarmTrade:
    """The trade a WARM member and its score stand for; ValueError if the member is not of that layout."""
    text = member.decode() if isinstance(member, bytes) else member
    trade_id, price, volume, side, recv_ts = text.split(WARM_SEP)
    return WarmTrade(int(score), int(trade_id), price, volume, side, int(recv_ts))


# ---------------------------------------------------------------------------------------------- QuestDB

#: Brain `trades` (contract): one row per trade, every trade exactly once through DEDUP.
TRADES_DDL = (
    f"CREATE TABLE IF NOT EXISTS {keys.TRADES_TABLE} (timestamp TIMESTAMP, exchange SYMBOL, symbol SYMBOL, "
    "side SYMBOL, price DOUBLE, volume DOUBLE, trade_id LONG, recv_ts TIMESTAMP) TIMESTAMP(timestamp) "
    "PARTITION BY DAY WAL DEDUP UPSERT KEYS(timestamp, exchange, symbol, trade_id)"
)
#: Order-book diffs: levels as DOUBLE[][] arrays ([[price, qty], ...]), one row per diff event.
DEPTH_DDL = (
    f"CREATE TABLE IF NOT EXISTS {keys.DEPTH_TABLE} (timestamp TIMESTAMP, exchange SYMBOL, symbol SYMBOL, "
    "first_update_id LONG, last_update_id LONG, bids DOUBLE[][], asks DOUBLE[][], recv_ts TIMESTAMP) "
    "TIMESTAMP(timestamp) PARTITION BY DAY WAL DEDUP UPSERT KEYS(timestamp, exchange, symbol, last_update_id)"
)

#: Whole books: one row per BOOK entry (`valid`), levels as DOUBLE[][] like `depth_updates` (same rebuild
#: arithmetic); a RESYNC entry is a row without levels and `valid` false: no past book from there until the next.
BOOK_DDL = (
    f"CREATE TABLE IF NOT EXISTS {keys.BOOK_TABLE} (timestamp TIMESTAMP, exchange SYMBOL, symbol SYMBOL, "
    "last_update_id LONG, valid BOOLEAN, bids DOUBLE[][], asks DOUBLE[][], recv_ts TIMESTAMP) "
    "TIMESTAMP(timestamp) PARTITION BY DAY WAL DEDUP UPSERT KEYS(timestamp, exchange, symbol, last_update_id)"
)


def vps_buffer_ddl(table: str = keys.VPS_BUFFER_TABLE) -> str:
    """The VPS spill buffer: one row per stream entry, `ts` strictly increasing in ID order."""
    return (
        f"CREATE TABLE IF NOT EXISTS {table} (ts TIMESTAMP, id_ms LONG, id_seq LONG, kind SYMBOL, "
        "symbol SYMBOL, payload VARCHAR) TIMESTAMP(ts) PARTITION BY HOUR WAL DEDUP UPSERT KEYS(ts, id_ms, id_seq)"
    )


def ilp_trade(
    buffer: Buffer,
    exchange: str,
    symbol: str,
    side: str,
    price: float,
    volume: float,
    trade_id: int,
    recv_ts: int,
    timestamp: int,
) -> None:
    """One `trades` row into an ILP buffer."""
    buffer.row(
        keys.TRADES_TABLE,
        symbols={"exchange": exchange, "symbol": symbol, "side": side},
        columns={"price": price, "volume": volume, "trade_id": trade_id, "recv_ts": TimestampMicros(recv_ts)},
        at=TimestampMicros(timestamp),
    )


def ilp_depth(
    buffer: Buffer,
    exchange: str,
    symbol: str,
    first_update_id: int,
    last_update_id: int,
    bids: Any,
    asks: Any,
    recv_ts: int,
    timestamp: int,
) -> None:
    """One `depth_updates` row into an ILP buffer (`bids`/`asks` as float64 arrays of shape (n, 2))."""
    ids = {"first_update_id": first_update_id, "last_update_id": last_update_id}
    _ilp_levels(buffer, keys.DEPTH_TABLE, exchange, symbol, ids, bids, asks, recv_ts, timestamp)


def ilp_book(
    buffer: Buffer, exchange: str, symbol: str, last_update_id: int, valid: bool, bids: Any, asks: Any, recv_ts: int,
    timestamp: int,
) -> None:  # fmt: skip
    """One `book_snapshots` row into an ILP buffer (levels as in `ilp_depth`; `valid` false: a book reset)."""
    head = {"last_update_id": last_update_id, "valid": valid}
    _ilp_levels(buffer, keys.BOOK_TABLE, exchange, symbol, head, bids, asks, recv_ts, timestamp)


def _ilp_levels(
    buffer: Buffer, table: str, exchange: str, symbol: str, head: dict[str, Any], bids: Any, asks: Any, recv_ts: int,
    timestamp: int,
) -> None:  # fmt: skip
    buffer.row(
        table,
        symbols={"exchange": exchange, "symbol": symbol},
        columns={**head, "bids": bids, "asks": asks, "recv_ts": TimestampMicros(recv_ts)},
        at=TimestampMicros(timestamp),
    )


def ilp_buffer_row(buffer: Buffer, table: str, entry_id: StreamId, ts: int, fields: Sequence[bytes]) -> None:
    """One `vps_buffer` row: the entry's ID, its type and symbol (for SQL), its fields as `encode_payload`."""
    buffer.row(
        table,
        symbols={
            "kind": _short(entry_field(fields, b"type")) or "?",
            "symbol": _short(entry_field(fields, b"symbol")) or "?",
        },
        columns={"id_ms": entry_id[0], "id_seq": entry_id[1], "payload": encode_payload(fields)},
        at=TimestampMicros(ts),
    )


def _short(value: bytes | None) -> str:
    return value.decode(errors="replace")[:32] if value else ""


def encode_payload(fields: Sequence[bytes]) -> str:
    """JSON list of the field/value strings; entries that are not UTF-8 go base64 (`{"b64": [...]}`)."""
    try:
        return orjson.dumps([f.decode() for f in fields]).decode()
    except UnicodeDecodeError:
        return orjson.dumps({"b64": [base64.b64encode(f).decode() for f in fields]}).decode()


def decode_payload(payload: str) -> list[str] | list[bytes]:
    """The field/value list stored by `encode_payload`; ValueError if it is not one (an even, non-empty list
    of strings), so a damaged row can never reach the Brain as a malformed XADD."""
    doc = orjson.loads(payload)
    if isinstance(doc, dict) and isinstance(doc.get("b64"), list):
        raw = doc["b64"]
        if raw and len(raw) % 2 == 0 and all(isinstance(x, str) for x in raw):
            return [base64.b64decode(x, validate=True) for x in raw]
    elif isinstance(doc, list) and doc and len(doc) % 2 == 0 and all(isinstance(x, str) for x in doc):
        fields: list[str] = doc
        return fields
    raise ValueError("not a field/value list")


# ---------------------------------------------------------------------------------------------- dead letters

#: Fields the Brain consumer adds to a dead letter (the rest is the entry as it was, possibly cut).
CONSUMER_DEAD_LETTER_ADDED = frozenset({b"src_id", b"reason", b"src_stream", b"truncated"})


def collector_dead_letter(reason: str, detail: str, raw: bytes, recv_ts: int) -> list[str | bytes | int]:
    """Fields of a collector dead letter: why, the detail, the frame as received and when."""
    return ["reason", reason, "detail", detail, "raw", raw, "recv_ts", recv_ts]


def writer_dead_letter(stream: bytes | str, src_id: bytes, reason: str) -> list[str | bytes]:
    """Fields of a writer dead letter: the per-symbol stream and entry that could not become a row, and why."""
    return ["stream", stream, "src_id", src_id, "reason", reason]


class DeadLetterParts(NamedTuple):
    """A consumer dead letter split into the consumer's additions and the original fields."""

    src_id: bytes
    reason: str
    fields: list[bytes]  # the original entry, flat (only its first fields and bytes if `truncated`)
    truncated: str  # what the consumer's cap cut ('' = the whole entry)


def split_dead_letter(flat: Sequence[bytes]) -> DeadLetterParts:
    """Split a consumer dead letter into the consumer's additions and the original fields."""
    src_id, reason, truncated = b"", "", ""
    original: list[bytes] = []
    for i in range(0, len(flat) - 1, 2):
        name, value = flat[i], flat[i + 1]
        if name == b"src_id" and not src_id:
            src_id = value
        elif name == b"reason" and not reason:
            reason = value.decode(errors="replace")
        elif name == b"truncated" and not truncated:
            truncated = value.decode(errors="replace")
        elif name not in CONSUMER_DEAD_LETTER_ADDED:
            original += [name, value]
    return DeadLetterParts(src_id, reason, original, truncated)
