"""Kraken spot, WebSocket v2 (`trade`, `book` with its CRC32 checksum) and REST `Trades` for back-fill.

Docs: https://docs.kraken.com/api/docs/websocket-v2/trade, .../websocket-v2/book,
https://docs.kraken.com/api/docs/guides/spot-ws-book-v2 (checksum), https://docs.kraken.com/api/docs/rest-api/get-recent-trades.
What Kraken guarantees and where it differs from Binance: README.md beside this file.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from typing import Any

from tickbridge.collector.parser import MAX_FRAME_BYTES
from tickbridge.collector.venues import base
from tickbridge.collector.venues.base import (
    KRAKEN,
    BackfillPage,
    BookOutcome,
    BookUpdate,
    Control,
    Frame,
    FrameResult,
    Instrument,
    Reject,
    RestRequest,
    SymbolMap,
    TradeGap,
    TradeIds,
    VenueError,
    VenueEvent,
    VenueLimits,
    VenueTrade,
)
from tickbridge.collector.venues.levels import SyncedBook
from tickbridge.core.tick import Level, check_int

WS_URL = "wss://ws.kraken.com/v2"
REST_URL = "https://api.kraken.com"
TRADES_PATH = "/0/public/Trades"
DEPTH_PATH = "/0/public/Depth"
#: The depths the `book` channel offers; the book is truncated to the one subscribed.
BOOK_DEPTHS = (10, 25, 100, 500, 1000)
#: The checksum covers this many levels per side, whatever the depth.
CHECKSUM_LEVELS = 10
#: Rows per REST `Trades` answer (its maximum).
TRADES_PAGE = 1000
#: The back-fill starts this long before the last trade seen: times are µs on the WebSocket, 0.1 µs on REST,
#: and `since` is compared on Kraken's side; the overlap is dropped by trade ID.
BACKFILL_LEAD_US = 1000
#: REST spells some assets the legacy way (`XBTUSD`); the WebSocket v2 uses the common codes (`BTC/USD`).
REST_ASSET = {"BTC": "XBT", "DOGE": "XDG"}
#: Levels a REST Depth answer may hold (its `count` is at most 500).
MAX_REST_LEVELS = 500

LIMITS = VenueLimits(
    ws_connects_per_s=150 / 600,  # Cloudflare: about 150 connection attempts per rolling 10 minutes per IP
    ws_messages_per_s=5,  # not documented for market data: as conservative as Binance's 5/s
    subscribe_deadline_s=None,
    max_lifetime_s=None,  # none documented; the shared session still rotates (make-before-break)
    stale_after_s=10,  # a `heartbeat` frame every second once subscribed
    rest_per_s=1,  # public endpoints: Kraken asks for at most about one call per second
    max_symbols_per_connection=100,  # ours: one `book` frame per symbol update, keep a connection's rate bounded
)


def checksum_text(price: str, qty: str) -> str:
    """One level as the checksum spells it: '.' removed, then leading zeros (`0.00100000` -> `100000`)."""
    return price.replace(".", "").lstrip("0") + qty.replace(".", "").lstrip("0")


def book_checksum(bids: Sequence[Level], asks: Sequence[Level]) -> int:
    """Kraken's CRC32 (unsigned) of the top 10 asks low to high, then the top 10 bids high to low, each level's
    price and quantity as sent (`checksum_text`). `bids`/`asks` are best first."""
    text = "".join(checksum_text(p, q) for p, q in asks[:CHECKSUM_LEVELS])
    text += "".join(checksum_text(p, q) for p, q in bids[:CHECKSUM_LEVELS])
    return zlib.crc32(text.encode("ascii"))


class KrakenBook(SyncedBook):
    """One symbol's `book` channel: a snapshot, then updates, each followed by truncation to the subscribed depth
    (Kraken sends no removal for a level pushed out of it) and the checksum of the result. A mismatch invalidates
    the book: resubscribe (`KrakenAdapter.resync_messages`) for a new snapshot."""

    def __init__(self, symbol: str, depth: int) -> None:
        if depth not in BOOK_DEPTHS:
            raise VenueError(f"kraken book depth: expected one of {BOOK_DEPTHS}, got {depth}")
        super().__init__(symbol)
        self.depth = depth
        self.mismatches = 0

    def checksum(self) -> int:
        bids, asks = self.top(CHECKSUM_LEVELS)
        return book_checksum(bids, asks)

    def apply(self, update: BookUpdate) -> BookOutcome:
        if update.snapshot:
            self.levels.load(update.bids, update.asks)
            self.updates = 0
        elif not self._valid:
            return BookOutcome.NOT_SYNCED
        else:
            self.levels.apply(update.bids, update.asks)
            self.updates += 1
        self.levels.truncate(self.depth)
        if update.checksum is not None and update.checksum != self.checksum():
            self.mismatches += 1
            self.invalidate()
            return BookOutcome.CHECKSUM_MISMATCH
        self._valid = True
        return BookOutcome.SYNCED if update.snapshot else BookOutcome.APPLIED


def rest_pair(inst: Instrument) -> str:
    """The REST `pair` of an instrument (`BTC/USD` -> `XBTUSD`)."""
    return REST_ASSET.get(inst.base, inst.base) + REST_ASSET.get(inst.quote, inst.quote)


class KrakenAdapter:
    """Kraken spot: WebSocket v2 trades and book, REST `Trades` back-fill (by time, filtered by trade ID)."""

    exchange = KRAKEN
    limits = LIMITS
    trade_ids = TradeIds.CONTIGUOUS

    def __init__(self, venue_symbols: Sequence[str], *, depth: int = 10, ws_url: str = WS_URL,
                 rest_url: str = REST_URL) -> None:  # fmt: skip
        if depth not in BOOK_DEPTHS:
            raise VenueError(f"kraken book depth: expected one of {BOOK_DEPTHS}, got {depth}")
        self.symbols = SymbolMap(base.split_pair(KRAKEN, s, "/") for s in venue_symbols)
        self.depth = depth
        self.ws_url = ws_url
        self.rest_url = rest_url.rstrip("/")
        self._req_id = 0

    # ------------------------------------------------------------------ WebSocket out

    def _request(self, method: str, params: dict[str, Any]) -> bytes:
        self._req_id += 1
        return json.dumps({"method": method, "params": params, "req_id": self._req_id}).encode()

    def _book_params(self, instruments: Sequence[Instrument]) -> dict[str, Any]:
        symbols = [i.venue_symbol for i in instruments]
        return {"channel": "book", "symbol": symbols, "depth": self.depth, "snapshot": True}

    def connect_url(self, instruments: Sequence[Instrument]) -> str:
        return self.ws_url  # subscriptions follow the connect

    def subscribe_messages(self, instruments: Sequence[Instrument]) -> list[bytes]:
        """`trade` with its snapshot (the last 50 trades: they close a short gap after a reconnect), then `book`."""
        symbols = [i.venue_symbol for i in instruments]
        return [self._request("subscribe", {"channel": "trade", "symbol": symbols, "snapshot": True}),
                self._request("subscribe", self._book_params(instruments))]  # fmt: skip

    def resync_messages(self, instruments: Sequence[Instrument]) -> list[bytes]:
        """Unsubscribe and subscribe `book` again: Kraken then sends a new snapshot."""
        params = self._book_params(instruments)
        unsub = {k: v for k, v in params.items() if k != "snapshot"}
        return [self._request("unsubscribe", unsub), self._request("subscribe", params)]

    def ping_message(self) -> bytes:
        """The application-level ping (Kraken answers `{"method": "pong", ...}`)."""
        self._req_id += 1
        return json.dumps({"method": "ping", "req_id": self._req_id}).encode()

    # ------------------------------------------------------------------ WebSocket in

    def parse_frame(self, raw: bytes | str, recv_ts: int, max_bytes: int = MAX_FRAME_BYTES) -> FrameResult:
        msg = base.load_object(raw, max_bytes, exact=True)
        if not isinstance(msg, dict):
            return msg
        return base.route_guarded(raw, msg, lambda m: self._route(m, recv_ts))

    def _route(self, msg: dict[str, Any], recv_ts: int) -> Frame:
        if "method" in msg:
            return Frame((self._reply(msg),))
        channel = msg.get("channel")
        if channel == "heartbeat":
            return Frame((Control("heartbeat"),))
        if channel == "status":
            data = base.need_list(msg, "data", "status")
            return Frame((Control("status", str(base.need(data[0], "system", "status.data"))[:40] if data else ""),))
        if channel not in ("trade", "book"):
            raise Reject("unknown_stream", f"unexpected channel {str(channel)[:40]!r}")
        kind = msg.get("type")
        if kind not in ("snapshot", "update"):
            raise Reject("unknown_event", f"{channel}: unexpected type {str(kind)[:40]!r}")
        items = base.need_list(msg, "data", channel)
        events: list[VenueEvent] = []
        for item in items:
            if channel == "trade":
                events.append(self._trade(item, recv_ts))
            else:
                events.append(self._book(item, kind == "snapshot", recv_ts))
        return Frame(tuple(events))

    def _reply(self, msg: dict[str, Any]) -> Control:
        method = msg["method"]
        if method == "pong":
            return Control("pong")
        if method not in ("subscribe", "unsubscribe"):
            raise Reject("unknown_event", f"unexpected method {str(method)[:40]!r}")
        if msg.get("success") is not True:
            raise Reject("exchange_error", f"{method} failed: {str(msg.get('error'))[:160]}")
        result = msg.get("result")
        detail = f"{result.get('channel')} {result.get('symbol')}" if isinstance(result, dict) else ""
        return Control(method + "d", detail[:80])

    def _trade(self, item: object, recv_ts: int) -> VenueTrade:
        inst = self.symbols.venue(base.need(item, "symbol", "trade"))
        side = base.need(item, "side", "trade")
        if side not in ("buy", "sell"):  # the taker's side
            raise VenueError(f"trade.side: expected buy or sell, got {str(side)[:20]!r}")
        return VenueTrade(
            symbol=inst.symbol,
            price=base.decimal_text("price", base.need(item, "price", "trade"), positive=True),
            volume=base.decimal_text("qty", base.need(item, "qty", "trade"), positive=True),
            side="BUY" if side == "buy" else "SELL",
            timestamp=base.iso_to_us("timestamp", base.need(item, "timestamp", "trade")),
            trade_id=check_int("trade_id", base.need(item, "trade_id", "trade")),
            recv_ts=recv_ts,
            exchange=KRAKEN,
            venue_symbol=inst.venue_symbol,
        )

    def _book(self, item: object, snapshot: bool, recv_ts: int) -> BookUpdate:
        inst = self.symbols.venue(base.need(item, "symbol", "book"))
        sides = []
        for name in ("bids", "asks"):
            rows = base.need_list(item, name, "book")
            sides.append(
                base.levels_of(
                    name, ((base.need(r, "price", name), base.need(r, "qty", name)) for r in rows), self.depth
                )
            )
        assert isinstance(item, dict)
        stamp = item.get("timestamp")  # updates carry it, snapshots do not
        return BookUpdate(
            symbol=inst.symbol,
            exchange=KRAKEN,
            timestamp=recv_ts if stamp is None else base.iso_to_us("timestamp", stamp),
            bids=sides[0],
            asks=sides[1],
            recv_ts=recv_ts,
            snapshot=snapshot,
            venue_symbol=inst.venue_symbol,
            checksum=check_int("checksum", base.need(item, "checksum", "book"), 0, 2**32 - 1),
        )

    def new_book(self, instrument: Instrument) -> KrakenBook:
        return KrakenBook(instrument.symbol, self.depth)

    # ------------------------------------------------------------------ REST

    def _trades_request(self, inst: Instrument, since: str) -> RestRequest:
        return RestRequest(self.rest_url, TRADES_PATH,
                           (("pair", rest_pair(inst)), ("since", since), ("count", str(TRADES_PAGE))))  # fmt: skip

    def backfill_request(self, instrument: Instrument, gap: TradeGap) -> RestRequest:
        """`Trades?since=` the last trade's time (ns) less `BACKFILL_LEAD_US`: Kraken pages by time, not by ID."""
        return self._trades_request(instrument, str(max(gap.after_us - BACKFILL_LEAD_US, 0) * 1000))

    def parse_backfill(self, instrument: Instrument, gap: TradeGap, body: bytes, recv_ts: int) -> BackfillPage:
        """`{"error": [], "result": {"<PAIR>": [[price, volume, time, b|s, m|l, misc, trade_id], ...], "last": ns}}`;
        the next page starts at `last` while the gap's end is not reached and the page was not empty."""
        result = _result(body, "Trades")
        rows = [v for k, v in result.items() if k != "last"]
        if len(rows) != 1 or not isinstance(rows[0], list):
            raise VenueError("kraken Trades: expected one pair's list of trades in result")
        trades, rejected = base.parse_rows(rows[0], lambda row: self._rest_trade(instrument, row, recv_ts))
        last = result.get("last")
        more = trades and max(t.trade_id for t in trades) < gap.last and isinstance(last, str) and last.isdigit()
        nxt = self._trades_request(instrument, str(last)) if more else None
        return BackfillPage(base.gap_trades(gap, trades), nxt, tuple(rejected))

    def _rest_trade(self, inst: Instrument, row: object, recv_ts: int) -> VenueTrade:
        if not isinstance(row, list) or len(row) < 7:  # rows before trade IDs (7th field) cannot be placed
            raise VenueError(f"kraken Trades row: expected 7 fields, got {str(row)[:80]}")
        price, volume, when, side, _kind, _misc, trade_id = row[:7]
        if side not in ("b", "s"):
            raise VenueError(f"kraken Trades row: side {str(side)[:10]!r} is not b or s")
        return VenueTrade(
            symbol=inst.symbol,
            price=base.decimal_text("price", price, positive=True),
            volume=base.decimal_text("volume", volume, positive=True),
            side="BUY" if side == "b" else "SELL",
            timestamp=base.seconds_to_us("time", when),
            trade_id=check_int("trade_id", trade_id),
            recv_ts=recv_ts,
            exchange=KRAKEN,
            venue_symbol=inst.venue_symbol,
        )

    def snapshot_request(self, instrument: Instrument, depth: int) -> RestRequest:
        """REST `Depth`: for checks and tools only. It carries no checksum or sequence that would place it among
        the WebSocket updates, so the book itself is (re)synced by resubscribing (`resync_messages`)."""
        count = str(min(depth, MAX_REST_LEVELS))
        return RestRequest(self.rest_url, DEPTH_PATH, (("pair", rest_pair(instrument)), ("count", count)))

    def parse_snapshot(self, instrument: Instrument, body: bytes, recv_ts: int) -> BookUpdate:
        """`{"error": [], "result": {"<PAIR>": {"asks": [[price, volume, time], ...], "bids": [...]}}}`."""
        result = _result(body, "Depth")
        if len(result) != 1:
            raise VenueError("kraken Depth: expected one pair in result")
        book = next(iter(result.values()))
        sides = []
        for name in ("bids", "asks"):
            rows = base.need_list(book, name, "Depth")
            if not all(isinstance(r, list) and len(r) >= 2 for r in rows):
                raise VenueError(f"kraken Depth {name}: expected [price, volume, time] rows")
            sides.append(base.levels_of(name, ((r[0], r[1]) for r in rows), MAX_REST_LEVELS))
        return BookUpdate(symbol=instrument.symbol, exchange=KRAKEN, timestamp=recv_ts, bids=sides[0], asks=sides[1],
                          recv_ts=recv_ts, snapshot=True, venue_symbol=instrument.venue_symbol)  # fmt: skip


def _result(body: bytes, what: str) -> dict[str, Any]:
    """The `result` of a Kraken REST answer; its `error` list, when not empty, as one `VenueError`."""
    try:
        doc = json.loads(body, parse_float=str)
    except (ValueError, RecursionError) as exc:
        raise VenueError(f"kraken {what}: invalid JSON: {str(exc)[:80]}") from None
    errors = base.need(doc, "error", what)
    if not isinstance(errors, list):
        raise VenueError(f"kraken {what}: error is not a list")
    if errors:
        raise VenueError(f"kraken {what}: {'; '.join(map(str, errors))[:160]}")
    result = base.need(doc, "result", what)
    if not isinstance(result, dict):
        raise VenueError(f"kraken {what}: result is not an object")
    return result
