"""The exchange adapter boundary: what is per venue, as pure functions and small state machines (no I/O).

Per venue (an adapter): the WebSocket subscription messages, frame parsing into venue records, trade
identity, the order-book procedure and its continuity check, the REST back-fill of missed trades (request and
answer, page by page), the REST book snapshot, rate limits and connection lifetime rules. Shared (the
collector, unchanged): HOT/WARM, the VPS stream, batching, metrics, lifecycle, reconnects and dedup by trade ID.

Records. A venue parser yields `VenueTrade` and `BookUpdate`, validated like `core.tick.Trade`/`DepthDiff`
with the same checks. They carry what the shared ticks do not (the venue's own symbol, Coinbase's connection
`sequence_num`, Kraken's CRC32) and become the shared ticks through `to_tick()`. The pipeline carries every
exchange of `EXCHANGES` (`core.tick.check_exchange`, the ACLs `redis/users.*.acl`, `wire.match_trade`: the
exchange names Redis keys, so the three move together).

Symbols. One normalized form across venues, the one Binance keys already use: base and quote upper case,
concatenated (`BTCUSD` for Coinbase `BTC-USD` and Kraken `BTC/USD`; Binance `BTCUSDT` stays `BTCUSDT`), with the
venue's own form kept in `Instrument.venue_symbol`. Asset aliases (Kraken `XBT`, `XDG`) map to the common code.
"""

from __future__ import annotations

import calendar
import datetime
import enum
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from tickbridge.collector.parser import MAX_RAW_KEPT, Rejected
from tickbridge.core import keys
from tickbridge.core.tick import (
    MAX_TS_US,
    MIN_TS_US,
    Level,
    Side,
    TickError,
    Trade,
    check_decimal,
    check_int,
    check_symbol,
)

BINANCE_SPOT = keys.EXCHANGE
COINBASE = "coinbase"
KRAKEN = "kraken"
#: The `exchange` values: they name Redis keys (`market:<exchange>:…`) and QuestDB rows.
EXCHANGES = keys.EXCHANGES
assert EXCHANGES == (BINANCE_SPOT, COINBASE, KRAKEN)
#: Quote currencies recognised when a normalized symbol (`BTCUSDT`, as SYMBOLS holds it) is turned into a
#: venue's form (`BTC-USDT`, `BTC/USDT`).
QUOTES = ("USDT", "USDC", "USD", "EUR", "GBP", "BTC", "ETH")

#: Venue asset codes that name the same asset as another code (Kraken's legacy ISO-4217-A3 style names).
ASSET_ALIASES = {"XBT": "BTC", "XXBT": "BTC", "XDG": "DOGE", "XXDG": "DOGE", "ZUSD": "USD", "ZEUR": "EUR",
                 "ZGBP": "GBP", "ZJPY": "JPY", "ZCAD": "CAD", "XETH": "ETH"}  # fmt: skip
_ASSET = re.compile(r"^[A-Z0-9]{1,16}\Z")


def one_line(text: str) -> str:
    """`text` with every run of white space (newlines included) as one space: log lines and metric details stay
    one line whatever a venue put in the strings they quote."""
    return " ".join(text.split())


class VenueError(TickError):
    """A venue frame, REST answer or request that is not what the venue documents; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def check_venue(exchange: object) -> str:
    """One of `EXCHANGES` (the adapter boundary; the pipeline's own check is `core.tick.check_exchange`)."""
    if exchange not in EXCHANGES:
        raise VenueError(f"exchange: expected one of {', '.join(EXCHANGES)}, got {str(exchange)[:40]!r}")
    return str(exchange)


def normalize_asset(code: str) -> str:
    """The common code of a venue asset code (`XBT` -> `BTC`), upper case."""
    upper = code.upper()
    return ASSET_ALIASES.get(upper, upper)


@dataclass(frozen=True, slots=True)
class Instrument:
    """One market on one venue: `symbol` (normalized, `BTCUSD`) is what keys and tables carry,
    `venue_symbol` (`BTC-USD`, `BTC/USD`, `BTCUSDT`) what the venue's messages and REST calls carry."""

    exchange: str
    base: str
    quote: str
    venue_symbol: str

    def __post_init__(self) -> None:
        check_venue(self.exchange)
        for name, code in (("base", self.base), ("quote", self.quote)):
            if not isinstance(code, str) or not _ASSET.match(code):
                raise VenueError(f"{name}: invalid asset code {str(code)[:40]!r}")
        check_symbol(self.symbol)

    @property
    def symbol(self) -> str:
        return self.base + self.quote


def split_pair(exchange: str, venue_symbol: str, separator: str) -> Instrument:
    """`BASE<sep>QUOTE` (Coinbase `BTC-USD`, Kraken `BTC/USD`) as an `Instrument` with normalized assets."""
    base, sep, quote = venue_symbol.partition(separator)
    if not sep or not base or not quote:
        raise VenueError(f"{exchange} symbol: expected BASE{separator}QUOTE, got {venue_symbol[:40]!r}")
    return Instrument(exchange, normalize_asset(base), normalize_asset(quote), venue_symbol)


def venue_symbols(symbols: Iterable[str], separator: str) -> tuple[str, ...]:
    """Symbols in a venue's form: `BTC-USD` stays (separator adjusted), `BTCUSDT` becomes `BTC<sep>USDT` (a known
    quote suffix, `QUOTES`); ValueError naming the symbol otherwise."""
    out = []
    for s in symbols:
        s = s.strip().upper()
        if "-" in s or "/" in s:
            out.append(s.replace("-", separator).replace("/", separator))
            continue
        quote = next((q for q in QUOTES if s.endswith(q) and len(s) > len(q)), None)
        if quote is None:
            raise ValueError(f"symbol {s!r}: no known quote currency ({', '.join(QUOTES)}); give BASE-QUOTE")
        out.append(f"{s[: -len(quote)]}{separator}{quote}")
    return tuple(out)


class SymbolMap:
    """The instruments one adapter serves, by venue symbol and by normalized symbol; two venue symbols that
    normalize alike (Kraken `XBT/USD` and `BTC/USD`) would share keys, so they are refused."""

    def __init__(self, instruments: Iterable[Instrument]) -> None:
        self.by_venue: dict[str, Instrument] = {}
        self.by_symbol: dict[str, Instrument] = {}
        for inst in instruments:
            other = self.by_symbol.get(inst.symbol)
            if other is not None and other != inst:
                raise VenueError(f"{inst.venue_symbol!r} and {other.venue_symbol!r} both normalize to {inst.symbol}")
            self.by_venue[inst.venue_symbol] = inst
            self.by_symbol[inst.symbol] = inst

    def venue(self, venue_symbol: object) -> Instrument:
        """The instrument of a symbol as the venue spells it; `VenueError` for one not subscribed."""
        inst = self.by_venue.get(venue_symbol) if isinstance(venue_symbol, str) else None
        if inst is None:
            raise UnknownSymbol(f"symbol {str(venue_symbol)[:40]!r} is not subscribed")
        return inst

    def __iter__(self) -> Iterator[Instrument]:
        return iter(self.by_venue.values())

    def __len__(self) -> int:
        return len(self.by_venue)


class UnknownSymbol(VenueError):
    """A frame for a symbol the adapter was not configured with (reason `unknown_symbol`)."""


# ---------------------------------------------------------------------------------------------- time

#: ASCII: `\d` would also take other scripts' digits (and `int()` reads them).
_ISO = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:Z|\+00:00)\Z", re.ASCII)


def iso_to_us(name: str, value: object) -> int:
    """An RFC 3339 UTC time (`2023-02-09T20:19:35.39625135Z`, up to ns) in µs since the epoch (ns truncated).
    Not `datetime.fromisoformat`: Python 3.11 reads at most 6 fraction digits and Coinbase sends 9."""
    m = _ISO.match(value) if isinstance(value, str) else None
    if m is None:
        raise VenueError(f"{name}: not an RFC 3339 UTC time: {str(value)[:40]!r}")
    year, month, day, hour, minute, second, frac = m.groups()
    try:
        when = datetime.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    except ValueError:
        raise VenueError(f"{name}: not a valid time: {str(value)[:40]!r}") from None
    secs = calendar.timegm(when.timetuple())
    return secs * 1_000_000 + int((frac or "0").ljust(6, "0")[:6])


def seconds_to_us(name: str, value: object) -> int:
    """A decimal count of seconds in µs (0.1 µs digits cut): exact from text (`"1688669597.8277369"`, as
    `load_object(exact=True)` and Kraken's REST parsing keep it); an int or float as Python prints it."""
    text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,12})?", text):
        raise VenueError(f"{name}: not a decimal count of seconds: {str(value)[:40]!r}")
    whole, _, frac = text.partition(".")
    return int(whole) * 1_000_000 + int(frac.ljust(6, "0")[:6])


def check_time(name: str, value: int) -> int:
    return check_int(name, value, MIN_TS_US, MAX_TS_US)


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class VenueTrade:
    """One trade as a venue reported it, validated like `core.tick.Trade`. `side` is the taker's side (the
    venue's own convention is converted by its parser); `trade_id` the venue's integer trade identity."""

    symbol: str
    price: str
    volume: str
    side: Side
    timestamp: int
    trade_id: int
    recv_ts: int
    exchange: str
    venue_symbol: str

    def __post_init__(self) -> None:
        check_symbol(self.symbol)
        check_venue(self.exchange)
        for name, value in (("price", self.price), ("volume", self.volume)):
            check_decimal(name, value, positive=True)
        if self.side not in ("BUY", "SELL"):
            raise TickError(f"side: expected BUY or SELL, got {self.side!r}")
        for name, ts in (("timestamp", self.timestamp), ("recv_ts", self.recv_ts)):
            check_time(name, ts)
        check_int("trade_id", self.trade_id)

    def to_tick(self) -> Trade:
        """The shared tick (`core.tick.Trade`, the same exchange)."""
        return Trade(symbol=self.symbol, price=self.price, volume=self.volume, side=self.side,
                     timestamp=self.timestamp, trade_id=self.trade_id, recv_ts=self.recv_ts,
                     exchange=self.exchange)  # fmt: skip


@dataclass(frozen=True, slots=True)
class BookUpdate:
    """Absolute quantities at price levels (`"0"` removes a level). `snapshot` replaces the book. Continuity, where
    the venue gives it: `update_ids` the book's own update-ID range (Binance `U..u`; a snapshot's `lastUpdateId`
    twice), `sequence` the connection's frame number (Coinbase `sequence_num`), `checksum` the venue's digest of
    the book after this update (Kraken: CRC32 of the top 10 levels). Levels are validated by the parser
    (`levels_of`), which also bounds their number."""

    symbol: str
    exchange: str
    timestamp: int
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    recv_ts: int
    snapshot: bool
    venue_symbol: str
    sequence: int | None = None
    checksum: int | None = None
    update_ids: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        check_symbol(self.symbol)
        if self.update_ids is not None:
            first, last = (check_int("update_id", v) for v in self.update_ids)
            if first > last:
                raise VenueError(f"update IDs {first}..{last} are not a range")
        check_venue(self.exchange)
        check_time("timestamp", self.timestamp)
        check_time("recv_ts", self.recv_ts)
        if not isinstance(self.bids, tuple) or not isinstance(self.asks, tuple):
            raise VenueError("bids, asks: expected tuples of levels (from `levels_of`)")


@dataclass(frozen=True, slots=True)
class Control:
    """A frame that carries no market data: `kind` is `subscribed`, `unsubscribed`, `heartbeat`, `status` or
    `pong`; `detail` a short text for logs (a status, a heartbeat counter)."""

    kind: str
    detail: str = ""


VenueEvent = VenueTrade | BookUpdate | Control


@dataclass(frozen=True, slots=True)
class Frame:
    """One WebSocket frame's events, in the frame's order. `sequence` is the frame's place in the connection's
    numbering where the venue numbers frames (Coinbase `sequence_num`), else None."""

    events: tuple[VenueEvent, ...]
    sequence: int | None = None


FrameResult = Frame | Rejected


class SeqOutcome(enum.Enum):
    FIRST = "first"  # the connection's first numbered frame
    NEXT = "next"  # previous + 1
    GAP = "gap"  # frames were lost: every book fed by this connection must resync
    STALE = "stale"  # not above the last one seen: out of order or repeated, ignore it


class SequenceTracker:
    """Continuity of one connection's frame numbers (Coinbase `sequence_num`: one counter for every channel and
    product of the connection, from 0 at its start). A new connection starts a new tracker."""

    __slots__ = ("last", "lost")

    def __init__(self) -> None:
        self.last: int | None = None
        #: Frames known lost on this connection (sum of the holes).
        self.lost = 0

    def observe(self, sequence: int) -> SeqOutcome:
        last = self.last
        if last is None:
            self.last = sequence
            return SeqOutcome.FIRST
        if sequence <= last:
            return SeqOutcome.STALE
        self.last = sequence
        if sequence == last + 1:
            return SeqOutcome.NEXT
        self.lost += sequence - last - 1
        return SeqOutcome.GAP


# ---------------------------------------------------------------------------------------------- parsing


class Reject(Exception):
    """Raised by a venue's frame router: the frame becomes `Rejected(reason, detail)` (reason in `REASONS`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def kept(raw: bytes | str) -> bytes:
    """The raw frame as a dead letter keeps it (the first `MAX_RAW_KEPT` bytes)."""
    data = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
    return data[:MAX_RAW_KEPT]


def load_object(raw: bytes | str, max_bytes: int, *, exact: bool = False) -> dict[str, Any] | Rejected:
    """A frame's JSON object. `exact` keeps JSON numbers with a fraction as their text (`0.00100000` stays
    that string: Kraken v2 sends prices and quantities as numbers, and its checksum is over their digits)."""
    if len(raw) > max_bytes:
        return Rejected("oversized", f"frame of {len(raw)} bytes exceeds {max_bytes}", kept(raw))
    try:
        msg = json.loads(raw, parse_float=str) if exact else orjson.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, orjson's, bad UTF-8; too deep for `json`
        return Rejected("json", f"invalid JSON: {str(exc)[:80]}", kept(raw))
    if not isinstance(msg, dict):
        return Rejected("not_object", f"expected a JSON object, got {type(msg).__name__}", kept(raw))
    return msg


def route_guarded(raw: bytes | str, msg: dict[str, Any], route: Callable[[dict[str, Any]], Frame]) -> FrameResult:
    """`route(msg)`, with every way it can refuse the frame turned into one `Rejected`."""
    try:
        return route(msg)
    except Reject as exc:
        return Rejected(exc.reason, one_line(exc.detail)[:200], kept(raw))
    except UnknownSymbol as exc:
        return Rejected("unknown_symbol", str(exc)[:200], kept(raw))
    except TickError as exc:
        return Rejected("schema", one_line(str(exc))[:200], kept(raw))
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        return Rejected("schema", one_line(f"{type(exc).__name__}: {str(exc)[:160]}"), kept(raw))


def load_body(body: bytes, what: str, kind: type = object) -> Any:
    """A REST answer's JSON of type `kind`, or one `VenueError` naming `what` (`coinbase trades`)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise VenueError(f"{what}: invalid JSON: {str(exc)[:80]}") from None
    if not isinstance(doc, kind):
        raise VenueError(f"{what}: expected a {kind.__name__}, got {type(doc).__name__}")
    return doc


def need(obj: object, name: str, where: str) -> Any:
    """`obj[name]`, or one `VenueError` naming what is missing where."""
    if not isinstance(obj, dict):
        raise VenueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if name not in obj:
        raise VenueError(f"{where}: missing field {name!r}")
    return obj[name]


def need_list(obj: object, name: str, where: str) -> list[Any]:
    value = need(obj, name, where)
    if not isinstance(value, list):
        raise VenueError(f"{where}.{name}: expected a list, got {type(value).__name__}")
    return value


def decimal_text(name: str, value: object, *, positive: bool) -> str:
    """A decimal as text, from a JSON string or (with `load_object(exact=True)`) a number's own digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return check_decimal(name, value, positive=positive)


def levels_of(name: str, pairs: Iterable[tuple[object, object]], limit: int) -> tuple[Level, ...]:
    """Validated `(price, qty)` levels, at most `limit` (a venue's full-depth snapshot can hold many)."""
    out: list[Level] = []
    for price, qty in pairs:
        if len(out) >= limit:
            raise VenueError(f"{name}: more than {limit} levels")
        out.append((decimal_text(f"{name}.price", price, positive=True),
                    decimal_text(f"{name}.qty", qty, positive=False)))  # fmt: skip
    return tuple(out)


# ---------------------------------------------------------------------------------------------- books


class BookOutcome(enum.Enum):
    """What the shared session does after a book took an update: the union of the venues' procedures."""

    SYNCED = "synced"  # a snapshot loaded (and, where the venue sends one, its checksum agreed)
    APPLIED = "applied"  # an update extended a valid book: emit it
    NOT_SYNCED = "not_synced"  # an update while the book waits for a WebSocket snapshot: dropped
    BUFFERED = "buffered"  # kept until a REST snapshot arrives (Binance): request one
    DUPLICATE = "duplicate"  # already in the book (update IDs): dropped
    GAP = "gap"  # update IDs jumped: the book is invalid, resync
    STALE = "stale"  # a REST snapshot older than the buffered updates (Binance): fetch another
    CHECKSUM_MISMATCH = "checksum_mismatch"  # the venue's digest disagrees: the book is invalid, resync


class VenueBook(Protocol):
    """One symbol's book, kept by the venue's procedure. The caller resyncs (`VenueAdapter.resync_messages`)
    after `CHECKSUM_MISMATCH` or after `invalidate()` (a connection-level gap or a disconnect)."""

    @property
    def valid(self) -> bool: ...

    def apply(self, update: BookUpdate) -> BookOutcome: ...

    def invalidate(self) -> None: ...

    def top(self, n: int) -> tuple[list[Level], list[Level]]:
        """Bids high to low and asks low to high, `n` levels each at most."""
        ...


# ---------------------------------------------------------------------------------------------- REST


@dataclass(frozen=True, slots=True)
class RestRequest:
    """A GET for the collector's REST client: `base` is the adapter's REST base URL, `cost` what it spends of
    the venue's budget (Binance weight, else 1 request)."""

    base: str
    path: str
    params: tuple[tuple[str, str], ...]
    cost: int = 1


@dataclass(frozen=True, slots=True)
class TradeGap:
    """Trades `first..last` (inclusive, venue trade IDs) are missing. `after_us` is the exchange time of the last
    trade before the gap: venues that page by time (Kraken) start there."""

    symbol: str
    first: int
    last: int
    after_us: int

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last:
            raise VenueError(f"trade gap {self.first}..{self.last} is empty or negative")


@dataclass(frozen=True, slots=True)
class BackfillPage:
    """The part of the gap one REST answer held (ID order, inside the gap, no repeats) and the request for the
    next page, or None when the gap is covered or the venue has nothing more (what is still missing is lost).
    Pages run oldest first (Binance, Kraken) or newest first (Coinbase): merge them all with `gap_trades` before
    appending."""

    trades: tuple[VenueTrade, ...]
    next: RestRequest | None
    #: One line per row that was not a valid trade (skipped, as the Binance back-fill does: its ID stays missing).
    rejected: tuple[str, ...] = ()


def parse_rows(rows: Iterable[object], parse: Callable[[object], VenueTrade]) -> tuple[list[VenueTrade], list[str]]:
    """Each REST row through `parse`; a bad row is skipped with its one-line reason instead of failing the page."""
    trades: list[VenueTrade] = []
    rejected: list[str] = []
    for row in rows:
        try:
            trades.append(parse(row))
        except (TickError, TypeError, ValueError) as exc:
            rejected.append(one_line(f"{str(exc)[:160]}: {str(row)[:80]}"))
    return trades, rejected


def gap_trades(gap: TradeGap, trades: Iterable[VenueTrade]) -> tuple[VenueTrade, ...]:
    """The trades inside `gap`, by trade ID, each once (pages overlap at their edges)."""
    inside = {t.trade_id: t for t in trades if gap.first <= t.trade_id <= gap.last}
    return tuple(inside[i] for i in sorted(inside))


# ---------------------------------------------------------------------------------------------- adapter


@dataclass(frozen=True, slots=True)
class VenueLimits:
    """A venue's documented limits and connection rules (README.md says where each comes from)."""

    #: New WebSocket connections per second per IP.
    ws_connects_per_s: float
    #: Messages a client may send per second (subscriptions, pings), per IP or connection as documented.
    ws_messages_per_s: float
    #: The server closes a connection without a subscription after this many seconds (None: no such rule).
    subscribe_deadline_s: float | None
    #: The server closes a connection after this long (None: no documented limit; rotate anyway).
    max_lifetime_s: float | None
    #: Without any frame for this long the connection is stale (the venue sends heartbeats more often).
    stale_after_s: float
    #: Public REST budget per second per IP we may spend, in `RestRequest.cost` units (Binance: weight).
    rest_per_s: float
    #: Symbols per connection we subscribe at most.
    max_symbols_per_connection: int


class TradeIds(enum.Enum):
    """What a venue's trade ID guarantees (gap detection needs `CONTIGUOUS`)."""

    CONTIGUOUS = "contiguous"  # +1 per trade per symbol: a jump is a gap
    UNIQUE = "unique"  # unique per symbol but not contiguous: only duplicates can be told


class VenueAdapter(Protocol):
    """What is per venue. Every method is pure: it builds or reads bytes, the collector does the I/O."""

    exchange: str
    ws_url: str
    rest_url: str
    limits: VenueLimits
    trade_ids: TradeIds
    symbols: SymbolMap

    def connect_url(self, instruments: Sequence[Instrument]) -> str:
        """The WebSocket URL for a connection carrying `instruments` (Binance names its streams in it)."""
        ...

    def subscribe_messages(self, instruments: Sequence[Instrument]) -> list[bytes]:
        """The frames to send on a new connection, in order, within `limits.ws_messages_per_s`."""
        ...

    def resync_messages(self, instruments: Sequence[Instrument]) -> list[bytes]:
        """The frames that make the venue send a fresh book snapshot for `instruments` on this connection."""
        ...

    def parse_frame(self, raw: bytes | str, recv_ts: int) -> FrameResult:
        """One WebSocket frame; never raises for bad input (a `Rejected` with a bounded reason instead)."""
        ...

    def new_book(self, instrument: Instrument) -> VenueBook: ...

    def backfill_request(self, instrument: Instrument, gap: TradeGap) -> RestRequest | None:
        """The first REST request for the missing trades, or None where the venue cannot back-fill."""
        ...

    def parse_backfill(self, instrument: Instrument, gap: TradeGap, body: bytes, recv_ts: int) -> BackfillPage:
        """One REST answer; `VenueError` (one line) if it is not what the venue documents."""
        ...

    def snapshot_request(self, instrument: Instrument, depth: int) -> RestRequest | None:
        """A REST book snapshot request, or None where the book comes only from the WebSocket."""
        ...

    def parse_snapshot(self, instrument: Instrument, body: bytes, recv_ts: int) -> BookUpdate: ...


@dataclass(slots=True)
class ConnectionState:
    """Per-connection state the shared session keeps for an adapter: the frame numbering (Coinbase) and the books
    fed by the connection (a numbering gap invalidates all of them)."""

    sequence: SequenceTracker = field(default_factory=SequenceTracker)
    books: dict[str, VenueBook] = field(default_factory=dict)

    def on_frame(self, frame: Frame) -> tuple[SeqOutcome | None, list[str]]:
        """Track `frame.sequence`: its outcome (None for an unnumbered frame; drop a `STALE` one) and, after a
        `GAP`, the symbols whose books it invalidated (resync them: the lost frame may have been theirs)."""
        if frame.sequence is None:
            return None, []
        outcome = self.sequence.observe(frame.sequence)
        if outcome is not SeqOutcome.GAP:
            return outcome, []
        hit = [symbol for symbol, book in self.books.items() if book.valid]
        for symbol in hit:
            self.books[symbol].invalidate()
        return outcome, hit
