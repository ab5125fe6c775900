"""Binance spot behind the adapter boundary, over the collector's own parser, book procedure and REST paths (the
same functions `parser.py`, `book.py` and `backfill.py` use today: wrapped, not moved, so nothing changes for the
running collector). It shows the boundary holds Binance unchanged; the session moves onto it in a later step.

Reference: docs/reference/binance-protocol.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from tickbridge.collector.base import stream_url
from tickbridge.collector.book import DepthSync, Outcome
from tickbridge.collector.parser import ControlReply, Rejected, ServerShutdown, parse_frame, to_us
from tickbridge.collector.rest import (
    DEPTH_ENDPOINT,
    HISTORICAL_TRADES_ENDPOINT,
    HISTORICAL_TRADES_WEIGHT,
    WEIGHT_PER_MINUTE,
    WEIGHT_SHARE,
    depth_weight,
)
from tickbridge.collector.venues import base
from tickbridge.core.tick import DepthDiff, Level, Trade, check_int

WS_URL = "wss://stream.binance.com:9443"
REST_URL = "https://api.binance.com"
#: Quote assets a Binance symbol may end with, longest match first (`BTCUSDT` is BTC/USDT, not BTCU/SDT).
QUOTES = ("FDUSD", "USDT", "USDC", "TUSD", "BUSD", "EUR", "TRY", "BRL", "BTC", "ETH", "BNB", "JPY", "USD")
#: Rows per `historicalTrades` page (its maximum).
TRADES_PAGE = 1000
#: Levels a REST depth snapshot may hold (`limit` is at most 5000).
MAX_SNAPSHOT_LEVELS = 5000

LIMITS = base.VenueLimits(
    ws_connects_per_s=300 / 300,  # 300 connection attempts per 5 minutes per IP
    ws_messages_per_s=5,  # incoming messages (subscribe, pong) per second per connection
    subscribe_deadline_s=None,  # the streams are named in the URL
    max_lifetime_s=24 * 3600,  # the server closes a connection at 24 h
    stale_after_s=60,  # `WS_STALE_TIMEOUT_S`' default: trade-less symbols still get a depth event per second
    rest_per_s=WEIGHT_PER_MINUTE * WEIGHT_SHARE / 60,  # REQUEST_WEIGHT per second (`RestRequest.cost` is weight)
    max_symbols_per_connection=512,  # 1024 streams per connection, two per symbol
)


def split_symbol(symbol: str) -> base.Instrument:
    """`BTCUSDT` -> BTC/USDT (the symbol stays as it is: Binance keys are already the normalized form)."""
    for quote in QUOTES:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return base.Instrument(base.BINANCE_SPOT, symbol[: -len(quote)], quote, symbol)
    raise base.VenueError(f"binance symbol: no known quote asset at the end of {symbol[:40]!r}")


def venue_trade(t: Trade) -> base.VenueTrade:
    return base.VenueTrade(
        symbol=t.symbol, price=t.price, volume=t.volume, side=t.side, timestamp=t.timestamp, trade_id=t.trade_id,
        recv_ts=t.recv_ts, exchange=t.exchange, venue_symbol=t.symbol,
    )  # fmt: skip


def book_update(d: DepthDiff) -> base.BookUpdate:
    return base.BookUpdate(symbol=d.symbol, exchange=d.exchange, timestamp=d.timestamp, bids=d.bids, asks=d.asks,
                           recv_ts=d.recv_ts, snapshot=False, venue_symbol=d.symbol,
                           update_ids=(d.first_update_id, d.last_update_id))  # fmt: skip


def depth_diff(u: base.BookUpdate) -> DepthDiff:
    if u.update_ids is None:
        raise base.VenueError(f"{u.symbol}: a Binance depth update needs its update IDs")
    return DepthDiff(symbol=u.symbol, timestamp=u.timestamp, first_update_id=u.update_ids[0],
                     last_update_id=u.update_ids[1], bids=u.bids, asks=u.asks, recv_ts=u.recv_ts)  # fmt: skip


_OUTCOME = {Outcome.APPLIED: base.BookOutcome.APPLIED, Outcome.DUPLICATE: base.BookOutcome.DUPLICATE,
            Outcome.BUFFERED: base.BookOutcome.BUFFERED, Outcome.GAP: base.BookOutcome.GAP,
            Outcome.STALE: base.BookOutcome.STALE, Outcome.SYNCED: base.BookOutcome.SYNCED}  # fmt: skip


class BinanceBook:
    """`book.DepthSync` (Binance's documented procedure) behind `VenueBook`. A snapshot is a REST one; the
    buffered diffs it releases are in `released` after `SYNCED` (emit them, in order). The make-before-break
    overlap (`primary=False`, outcome AHEAD) stays with the session: this wrapper feeds the primary."""

    def __init__(self, symbol: str) -> None:
        self.sync = DepthSync(symbol)
        self.released: list[DepthDiff] = []

    @property
    def valid(self) -> bool:
        return self.sync.valid

    def invalidate(self) -> None:
        self.sync.reset()

    def top(self, n: int) -> tuple[list[Level], list[Level]]:
        book = self.sync.book
        return book.sorted_bids()[:n], book.sorted_asks()[:n]

    def apply(self, update: base.BookUpdate) -> base.BookOutcome:
        if not update.snapshot:
            return _OUTCOME[self.sync.on_event(depth_diff(update))]
        if update.update_ids is None:
            raise base.VenueError(f"{update.symbol}: a Binance snapshot needs its lastUpdateId")
        outcome, self.released = self.sync.on_snapshot(update.update_ids[1], update.bids, update.asks)
        return _OUTCOME[outcome]


class BinanceAdapter:
    """Binance spot: combined stream named in the URL, REST `depth` snapshots and `historicalTrades` back-fill."""

    exchange = base.BINANCE_SPOT
    limits = LIMITS
    trade_ids = base.TradeIds.CONTIGUOUS

    def __init__(self, symbols: Sequence[str], *, ws_url: str = WS_URL, rest_url: str = REST_URL) -> None:
        self.symbols = base.SymbolMap(split_symbol(s) for s in symbols)
        self.ws_url = ws_url
        self.rest_url = rest_url.rstrip("/")

    def connect_url(self, instruments: Sequence[base.Instrument]) -> str:
        return stream_url(self.ws_url, [i.venue_symbol for i in instruments])

    def subscribe_messages(self, instruments: Sequence[base.Instrument]) -> list[bytes]:
        return []  # the URL names the streams

    def resync_messages(self, instruments: Sequence[base.Instrument]) -> list[bytes]:
        return []  # a Binance book resyncs from a REST snapshot (`snapshot_request`)

    def parse_frame(self, raw: bytes | str, recv_ts: int) -> base.FrameResult:
        event = parse_frame(raw, recv_ts)
        if isinstance(event, Rejected):
            return event
        if isinstance(event, ServerShutdown):
            return base.Frame((base.Control("server_shutdown", str(event.event_time)),))
        if isinstance(event, ControlReply):
            return base.Frame((base.Control("reply", str(event.id)[:40]),))
        if event.symbol not in self.symbols.by_venue:
            return Rejected("unknown_symbol", f"symbol {event.symbol!r} is not subscribed", base.kept(raw))
        return base.Frame((venue_trade(event) if isinstance(event, Trade) else book_update(event),))

    def new_book(self, instrument: base.Instrument) -> BinanceBook:
        return BinanceBook(instrument.symbol)

    def _trades_request(self, inst: base.Instrument, from_id: int, gap: base.TradeGap) -> base.RestRequest:
        limit = min(TRADES_PAGE, gap.last - from_id + 1)
        params = (("symbol", inst.venue_symbol), ("fromId", str(from_id)), ("limit", str(limit)))
        return base.RestRequest(self.rest_url, HISTORICAL_TRADES_ENDPOINT, params, HISTORICAL_TRADES_WEIGHT)

    def backfill_request(self, instrument: base.Instrument, gap: base.TradeGap) -> base.RestRequest:
        """`historicalTrades?fromId=<first>`: trades by ID, oldest first, up to 1000 a page."""
        return self._trades_request(instrument, gap.first, gap)

    def parse_backfill(
        self, instrument: base.Instrument, gap: base.TradeGap, body: bytes, recv_ts: int
    ) -> base.BackfillPage:
        """`[{"id", "price", "qty", "time", "isBuyerMaker", ...}, ...]`; the next page starts after its last ID."""
        rows = base.load_body(body, "binance historicalTrades", list)
        trades, rejected = base.parse_rows(rows, lambda row: self._rest_trade(instrument, row, recv_ts))
        newest = max((t.trade_id for t in trades), default=None)
        more = newest is not None and newest < gap.last
        nxt = self._trades_request(instrument, newest + 1, gap) if newest is not None and more else None
        return base.BackfillPage(base.gap_trades(gap, trades), nxt, tuple(rejected))

    @staticmethod
    def _rest_trade(inst: base.Instrument, row: object, recv_ts: int) -> base.VenueTrade:
        maker = base.need(row, "isBuyerMaker", "historicalTrades")
        if not isinstance(maker, bool):
            raise base.VenueError(f"isBuyerMaker: expected a boolean, got {type(maker).__name__}")
        return base.VenueTrade(
            symbol=inst.symbol, price=base.need(row, "price", "historicalTrades"),
            volume=base.need(row, "qty", "historicalTrades"), side="SELL" if maker else "BUY",
            timestamp=to_us(check_int("time", base.need(row, "time", "historicalTrades"))),
            trade_id=base.need(row, "id", "historicalTrades"), recv_ts=recv_ts, exchange=base.BINANCE_SPOT,
            venue_symbol=inst.venue_symbol,
        )  # fmt: skip

    def snapshot_request(self, instrument: base.Instrument, depth: int) -> base.RestRequest:
        params = (("symbol", instrument.venue_symbol), ("limit", str(depth)))
        return base.RestRequest(self.rest_url, DEPTH_ENDPOINT, params, depth_weight(depth))

    def parse_snapshot(self, instrument: base.Instrument, body: bytes, recv_ts: int) -> base.BookUpdate:
        """`{"lastUpdateId", "bids": [[price, qty], ...], "asks": [...]}`."""
        doc = base.load_body(body, "binance depth")
        lid = check_int("lastUpdateId", base.need(doc, "lastUpdateId", "depth"))
        sides = [base.levels_of(name, _pairs(base.need_list(doc, name, "depth"), name), MAX_SNAPSHOT_LEVELS)
                 for name in ("bids", "asks")]  # fmt: skip
        return base.BookUpdate(symbol=instrument.symbol, exchange=base.BINANCE_SPOT, timestamp=recv_ts, bids=sides[0],
                               asks=sides[1], recv_ts=recv_ts, snapshot=True, venue_symbol=instrument.venue_symbol,
                               update_ids=(lid, lid))  # fmt: skip


def _pairs(rows: list[object], name: str) -> list[tuple[object, object]]:
    out: list[tuple[object, object]] = []
    for row in rows:
        if not isinstance(row, list) or len(row) != 2:
            raise base.VenueError(f"{name}: level must be [price, qty], got {str(row)[:40]}")
        out.append((row[0], row[1]))
    return out
