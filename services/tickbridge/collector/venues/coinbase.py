"""Coinbase Advanced Trade: WebSocket `market_trades`, `level2` (`l2_data`), `heartbeats`; REST for back-fill and
book snapshots.

Docs: https://docs.cdp.coinbase.com/coinbase-app/advanced-trade-apis/websocket/websocket-channels,
https://docs.cdp.coinbase.com/coinbase-app/advanced-trade-apis/websocket/websocket-overview (sequence numbers),
https://docs.cdp.coinbase.com/exchange/reference/exchangerestapi_getproducttrades (trades by ID, `after` cursor).
What Coinbase guarantees and where it differs from Binance: README.md beside this file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from tickbridge.collector.venues import base
from tickbridge.collector.venues.base import (
    COINBASE,
    decimal_text,
    gap_trades,
    iso_to_us,
    levels_of,
    load_object,
    need,
    need_list,
    parse_rows,
    route_guarded,
    split_pair,
)
from tickbridge.collector.venues.levels import SyncedBook
from tickbridge.core.tick import Side, check_int

WS_URL = "wss://advanced-trade-ws.coinbase.com"
#: Trades by trade ID are only on the Exchange API (Advanced Trade's public trades page by time only).
REST_URL = "https://api.exchange.coinbase.com"
#: Advanced Trade public REST (the product book).
BROKERAGE_URL = "https://api.coinbase.com"
PRODUCT_BOOK_PATH = "/api/v3/brokerage/market/product_book"
#: A `level2` snapshot holds the whole book (BTC-USD: several MB, tens of thousands of levels), far past Binance's
#: 1 MiB frames: the session must allow frames this large on a Coinbase connection.
MAX_FRAME_BYTES = 64 * 2**20
MAX_SNAPSHOT_LEVELS = 500_000
#: Rows per Exchange `trades` page (its maximum).
TRADES_PAGE = 1000
#: Levels the product-book endpoint returns at most for our request.
MAX_REST_LEVELS = 10_000

LIMITS = base.VenueLimits(
    ws_connects_per_s=8,  # Advanced Trade WebSocket connections: 8 per second per IP
    ws_messages_per_s=8,  # unauthenticated messages: 8 per second per IP
    subscribe_deadline_s=5,  # a connection without a subscribe message is closed after 5 s
    max_lifetime_s=None,  # none documented; the shared session still rotates (make-before-break)
    stale_after_s=10,  # `heartbeats` every second (without it, quiet channels close after 60-90 s)
    rest_per_s=10,  # public REST: 10 requests per second per IP (Exchange and Advanced Trade alike)
    max_symbols_per_connection=100,  # ours: a sequence gap resyncs every book of its connection
)

#: `side` on public trades is the maker's (the resting order's); the taker's side, which we store, is the other.
_TAKER = {"BUY": "SELL", "SELL": "BUY", "buy": "SELL", "sell": "BUY"}
_BOOK_SIDE = {"bid": 0, "offer": 1, "ask": 1}


def taker_side(maker: object) -> Side:
    side = _TAKER.get(maker) if isinstance(maker, str) else None
    if side is None:
        raise base.VenueError(f"side: expected BUY or SELL, got {str(maker)[:20]!r}")
    return "BUY" if side == "BUY" else "SELL"


def trade_id_of(value: object) -> int:
    """Coinbase's trade ID: a decimal string on the WebSocket (`"000000000"`), an integer on REST."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    return check_int("trade_id", value)


class CoinbaseBook(SyncedBook):
    """One product's `level2` book: the subscription's snapshot, then updates (absolute sizes, `"0"` removes).
    Continuity is the connection's `sequence_num` (`base.ConnectionState`), which invalidates the book on a gap;
    a resubscribe sends a new snapshot."""

    def apply(self, update: base.BookUpdate) -> base.BookOutcome:
        if update.snapshot:
            self.levels.load(update.bids, update.asks)
            self._valid = True
            self.updates = 0
            return base.BookOutcome.SYNCED
        if not self._valid:
            return base.BookOutcome.NOT_SYNCED
        self.levels.apply(update.bids, update.asks)
        self.updates += 1
        return base.BookOutcome.APPLIED


class CoinbaseAdapter:
    """Coinbase Advanced Trade market data (public channels, no JWT)."""

    exchange = COINBASE
    limits = LIMITS
    trade_ids = base.TradeIds.CONTIGUOUS

    def __init__(self, venue_symbols: Sequence[str], *, ws_url: str = WS_URL, rest_url: str = REST_URL,
                 brokerage_url: str = BROKERAGE_URL) -> None:  # fmt: skip
        self.symbols = base.SymbolMap(split_pair(COINBASE, s, "-") for s in venue_symbols)
        self.ws_url = ws_url
        self.rest_url = rest_url.rstrip("/")
        self.brokerage_url = brokerage_url.rstrip("/")

    # ------------------------------------------------------------------ WebSocket out

    @staticmethod
    def _message(kind: str, channel: str, instruments: Sequence[base.Instrument] = ()) -> bytes:
        msg: dict[str, Any] = {"type": kind, "channel": channel}
        if instruments:
            msg["product_ids"] = [i.venue_symbol for i in instruments]
        return orjson.dumps(msg)

    def connect_url(self, instruments: Sequence[base.Instrument]) -> str:
        return self.ws_url  # subscriptions follow the connect

    def subscribe_messages(self, instruments: Sequence[base.Instrument]) -> list[bytes]:
        """One subscribe per channel (Coinbase takes one channel a message): `heartbeats` first, so quiet
        products keep the connection open, then `market_trades` and `level2`."""
        return [self._message("subscribe", "heartbeats"), self._message("subscribe", "market_trades", instruments),
                self._message("subscribe", "level2", instruments)]  # fmt: skip

    def resync_messages(self, instruments: Sequence[base.Instrument]) -> list[bytes]:
        """Unsubscribe and subscribe `level2` again: a new subscription starts with a snapshot."""
        return [self._message("unsubscribe", "level2", instruments), self._message("subscribe", "level2", instruments)]

    # ------------------------------------------------------------------ WebSocket in

    def parse_frame(self, raw: bytes | str, recv_ts: int, max_bytes: int = MAX_FRAME_BYTES) -> base.FrameResult:
        msg = load_object(raw, max_bytes)
        if not isinstance(msg, dict):
            return msg
        return route_guarded(raw, msg, lambda m: self._route(m, recv_ts))

    def _route(self, msg: dict[str, Any], recv_ts: int) -> base.Frame:
        if msg.get("type") == "error":
            raise base.Reject("exchange_error", f"error: {str(msg.get('message'))[:160]}")
        channel = msg.get("channel")
        seq = msg.get("sequence_num")
        sequence = None if seq is None else check_int("sequence_num", seq)
        events = need_list(msg, "events", str(channel)[:20])
        if channel == "subscriptions":
            detail = str(events[0].get("subscriptions")) if events and isinstance(events[0], dict) else ""
            return base.Frame((base.Control("subscribed", detail[:80]),), sequence)
        if channel == "heartbeats":
            counter = str(need(events[0], "heartbeat_counter", "heartbeats")) if events else ""
            return base.Frame((base.Control("heartbeat", counter[:20]),), sequence)
        if channel not in ("market_trades", "l2_data"):
            raise base.Reject("unknown_stream", f"unexpected channel {str(channel)[:40]!r}")
        if sequence is None:  # data without its number cannot be placed: a gap could pass unseen
            raise base.VenueError(f"{channel}: missing field 'sequence_num'")
        out: list[base.VenueEvent] = []
        for event in events:
            kind = need(event, "type", channel)
            if kind not in ("snapshot", "update"):
                raise base.Reject("unknown_event", f"{channel}: unexpected event type {str(kind)[:40]!r}")
            if channel == "market_trades":
                out.extend(self._trade(t, recv_ts) for t in need_list(event, "trades", channel))
            else:
                stamp = iso_to_us("timestamp", need(msg, "timestamp", channel))
                out.append(self._book(event, kind == "snapshot", stamp, sequence, recv_ts))
        return base.Frame(tuple(out), sequence)

    def _trade(self, item: object, recv_ts: int) -> base.VenueTrade:
        return self._trade_row(self.symbols.venue(need(item, "product_id", "trade")), item, recv_ts)

    def _book(self, event: object, snapshot: bool, stamp: int, sequence: int, recv_ts: int) -> base.BookUpdate:
        """An `l2_data` event. Its time is the message's: snapshot levels carry `event_time` 1970-01-01."""
        inst = self.symbols.venue(need(event, "product_id", "l2_data"))
        sides: tuple[list[tuple[object, object]], list[tuple[object, object]]] = ([], [])
        for row in need_list(event, "updates", "l2_data"):
            side = _BOOK_SIDE.get(need(row, "side", "updates"))
            if side is None:
                raise base.VenueError(f"updates.side: expected bid or offer, got {str(row.get('side'))[:20]!r}")
            sides[side].append((need(row, "price_level", "updates"), need(row, "new_quantity", "updates")))
        bids = levels_of("bids", sides[0], MAX_SNAPSHOT_LEVELS)
        asks = levels_of("asks", sides[1], MAX_SNAPSHOT_LEVELS)
        return base.BookUpdate(
            symbol=inst.symbol,
            exchange=COINBASE,
            timestamp=stamp,
            bids=bids,
            asks=asks,
            recv_ts=recv_ts,
            snapshot=snapshot,
            venue_symbol=inst.venue_symbol,
            sequence=sequence,
        )

    def new_book(self, instrument: base.Instrument) -> CoinbaseBook:
        return CoinbaseBook(instrument.symbol)

    # ------------------------------------------------------------------ REST

    def _trades_request(self, inst: base.Instrument, after: int) -> base.RestRequest:
        return base.RestRequest(self.rest_url, f"/products/{inst.venue_symbol}/trades",
                           (("after", str(after)), ("limit", str(TRADES_PAGE))))  # fmt: skip

    def backfill_request(self, instrument: base.Instrument, gap: base.TradeGap) -> base.RestRequest:
        """Exchange `GET /products/<id>/trades?after=<last + 1>`: trades with a smaller ID, newest first."""
        return self._trades_request(instrument, gap.last + 1)

    def parse_backfill(
        self, instrument: base.Instrument, gap: base.TradeGap, body: bytes, recv_ts: int
    ) -> base.BackfillPage:
        """`[{"time", "trade_id", "price", "size", "side"}, ...]` newest first; the next page is `after=` the
        oldest ID of this one while that is still above the gap's start."""
        rows = base.load_body(body, "coinbase trades", list)
        trades, rejected = parse_rows(rows, lambda r: self._trade_row(instrument, r, recv_ts))
        oldest = min((t.trade_id for t in trades), default=None)
        page = gap_trades(gap, trades)
        nxt = self._trades_request(instrument, oldest) if oldest is not None and oldest > gap.first else None
        return base.BackfillPage(page, nxt, tuple(rejected))

    @staticmethod
    def _trade_row(inst: base.Instrument, row: object, recv_ts: int) -> base.VenueTrade:
        """A trade as both the WebSocket and the Exchange REST API spell it (`trade_id` a string on the first)."""
        return base.VenueTrade(
            symbol=inst.symbol,
            price=decimal_text("price", need(row, "price", "trades"), positive=True),
            volume=decimal_text("size", need(row, "size", "trades"), positive=True),
            side=taker_side(need(row, "side", "trades")),
            timestamp=iso_to_us("time", need(row, "time", "trades")),
            trade_id=trade_id_of(need(row, "trade_id", "trades")),
            recv_ts=recv_ts,
            exchange=COINBASE,
            venue_symbol=inst.venue_symbol,
        )

    def snapshot_request(self, instrument: base.Instrument, depth: int) -> base.RestRequest:
        """Advanced Trade `product_book`: for checks and tools only. It has no `sequence_num` to place it among
        the WebSocket updates; the book is (re)synced by resubscribing `level2` (`resync_messages`)."""
        limit = str(min(depth, MAX_REST_LEVELS))
        return base.RestRequest(self.brokerage_url, PRODUCT_BOOK_PATH,
                           (("product_id", instrument.venue_symbol), ("limit", limit)))  # fmt: skip

    def parse_snapshot(self, instrument: base.Instrument, body: bytes, recv_ts: int) -> base.BookUpdate:
        """`{"pricebook": {"product_id", "bids": [{"price", "size"}], "asks": [...], "time"}}`."""
        doc = base.load_body(body, "coinbase product_book")
        book = need(doc, "pricebook", "product_book")
        if need(book, "product_id", "pricebook") != instrument.venue_symbol:
            raise base.VenueError(
                f"coinbase product_book: for {str(book['product_id'])[:40]!r}, not {instrument.venue_symbol}"
            )
        sides = []
        for name in ("bids", "asks"):
            rows = need_list(book, name, "pricebook")
            sides.append(
                levels_of(name, ((need(r, "price", name), need(r, "size", name)) for r in rows), MAX_REST_LEVELS)
            )
        stamp = book.get("time")
        when = recv_ts if stamp is None else iso_to_us("time", stamp)
        return base.BookUpdate(
            symbol=instrument.symbol,
            exchange=COINBASE,
            timestamp=when,
            bids=sides[0],
            asks=sides[1],
            recv_ts=recv_ts,
            snapshot=True,
            venue_symbol=instrument.venue_symbol,
        )
