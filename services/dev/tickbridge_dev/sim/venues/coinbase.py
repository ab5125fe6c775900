"""Simulated Coinbase: the Advanced Trade WebSocket (`heartbeats`, `market_trades`, `level2` as `l2_data`, one
`sequence_num` counter per connection over every channel) and the REST endpoints the adapter uses (Exchange
`GET /products/<id>/trades` paged by trade ID, newest first; Advanced Trade `product_book`).

Faults: `drop_connections()`, `skip_sequence(n)` (the next `n` `l2_data` frames of every connection are numbered
but not sent: a `sequence_num` gap and a book that really missed updates), `skip_trades(sym, n)` (not sent on
the WebSocket, in REST back-fill).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

import orjson
from aiohttp import web

from tickbridge.collector.venues import coinbase
from tickbridge.collector.venues.base import COINBASE
from tickbridge_dev.sim.venues.common import (
    COMMON_FAULTS,
    TRADE_SNAPSHOT,
    Fault,
    RestBudget,
    SimTrade,
    VenueConn,
    VenueMarket,
    VenueServer,
    iso_us,
    json_body,
)

#: What a client may subscribe (`level2` data arrives on the `l2_data` channel).
CHANNELS = ("heartbeats", "market_trades", "level2")
#: Advanced Trade does not document a size limit per trades page on the Exchange API beyond 1000.
MAX_TRADES_PAGE = coinbase.TRADES_PAGE


def _now_iso() -> str:
    return iso_us(time.time_ns() // 1000, 9)


def _maker_side(t: SimTrade) -> str:
    """Coinbase's `side` is the maker's: the resting buyer when the buyer was the maker."""
    return "BUY" if t.buyer_maker else "SELL"


class CoinbaseSim(VenueServer):
    """Coinbase Advanced Trade market data (public channels) and the Exchange REST trades."""

    exchange = COINBASE
    separator = "-"
    ws_path = "/"
    faults: ClassVar[dict[str, Fault]] = {
        **COMMON_FAULTS,
        "skip_sequence": lambda s, sym, n: s.skip_sequence(n or 1),
    }

    #: A connection without a subscription is closed after this long (tests shorten it).
    subscribe_deadline_s = coinbase.LIMITS.subscribe_deadline_s or 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget = RestBudget(coinbase.LIMITS.rest_per_s, 15)

    # -- WebSocket out -----------------------------------------------------------------------------------

    def send_numbered(self, c: VenueConn, channel: str, events: bytes) -> None:
        """One message with the connection's next `sequence_num`; a frame the `skip_sequence` fault loses
        still takes its number."""
        seq = c.seq
        c.seq += 1
        if c.lose and channel == "l2_data":
            c.lose -= 1
            return
        self.send(
            c,
            b'{"channel":"'
            + channel.encode()
            + b'","client_id":"","timestamp":"'
            + _now_iso().encode()
            + b'","sequence_num":'
            + str(seq).encode()
            + b',"events":'
            + events
            + b"}",
        )

    def _trade_rows(self, m: VenueMarket, trades: list[SimTrade]) -> list[dict[str, Any]]:
        return [
            {
                "trade_id": str(t.trade_id),
                "product_id": m.venue_symbol,
                "price": m.price(t.price),
                "size": m.qty(t.qty),
                "side": _maker_side(t),
                "time": iso_us(t.time_us, 9),
            }
            for t in trades
        ]

    @staticmethod
    def _levels(m: VenueMarket, bids: list[tuple[int, int]], asks: list[tuple[int, int]]) -> list[dict[str, str]]:
        stamp = iso_us(time.time_ns() // 1000, 9)
        rows = [
            {"side": "bid", "event_time": stamp, "price_level": m.price(p), "new_quantity": m.qty(q)} for p, q in bids
        ]
        rows += [
            {"side": "offer", "event_time": stamp, "price_level": m.price(p), "new_quantity": m.qty(q)} for p, q in asks
        ]
        return rows

    def publish(
        self, trades: dict[str, list[SimTrade]], changes: dict[str, tuple[dict[int, int], dict[int, int]]]
    ) -> None:
        trade_events = {
            vs: orjson.dumps([{"type": "update", "trades": self._trade_rows(self.markets[vs], ts)}])
            for vs, ts in trades.items()
        }
        book_events = {}
        for vs, (bids, asks) in changes.items():
            m = self.markets[vs]
            rows = self._levels(m, sorted(bids.items(), reverse=True), sorted(asks.items()))
            book_events[vs] = orjson.dumps([{"type": "update", "product_id": vs, "updates": rows}])
        for c in list(self.conns):
            for vs in c.subs.get("market_trades", {}):
                if vs in trade_events:
                    self.send_numbered(c, "market_trades", trade_events[vs])
            for vs in c.subs.get("level2", {}):
                if vs in book_events:
                    self.send_numbered(c, "l2_data", book_events[vs])

    def heartbeat(self, c: VenueConn) -> None:
        if "heartbeats" in c.subs:
            c.heartbeats += 1
            event = {"current_time": _now_iso(), "heartbeat_counter": c.heartbeats}
            self.send_numbered(c, "heartbeats", orjson.dumps([event]))

    # -- WebSocket in --------------------------------------------------------------------------------------

    def on_open(self, c: VenueConn) -> None:
        """Coinbase closes a connection that has not subscribed within 5 s."""

        def check() -> None:
            if not c.subs and not c.closing:
                self.drop(c, "subscribe_deadline")

        asyncio.get_running_loop().call_later(self.subscribe_deadline_s, check)

    def _error(self, c: VenueConn, message: str) -> None:
        self.send(c, orjson.dumps({"type": "error", "message": message}))

    def on_message(self, c: VenueConn, data: str | bytes) -> None:
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._error(c, "Failed to parse message")
            return
        if not isinstance(msg, dict) or msg.get("type") not in ("subscribe", "unsubscribe"):
            self._error(c, "Failed to parse message: type must be subscribe or unsubscribe")
            return
        channel = msg.get("channel")
        products = msg.get("product_ids", [])
        if channel not in CHANNELS:
            self._error(c, f"Failure to subscribe: unknown channel {str(channel)[:40]}")
            return
        if not isinstance(products, list) or (channel != "heartbeats" and not products):
            self._error(c, "Failure to subscribe: product_ids required")
            return
        unknown = [p for p in products if p not in self.markets]
        if unknown:
            self._error(c, f"Failure to subscribe: unknown product {str(unknown[0])[:40]}")
            return
        subs = c.subs.setdefault(channel, {})
        new: list[str] = []
        if msg["type"] == "unsubscribe":
            for p in products or ["heartbeats"]:
                subs.pop(p, None)
            if not subs:
                del c.subs[channel]
        else:
            new = [p for p in products or ["heartbeats"] if p not in subs]
            subs.update(dict.fromkeys(new))
        self._subscriptions(c)
        if msg["type"] == "subscribe":
            for vs in new:
                self._snapshot(c, channel, vs)

    def _subscriptions(self, c: VenueConn) -> None:
        current = {ch: list(ps) for ch, ps in c.subs.items()}
        self.send_numbered(c, "subscriptions", orjson.dumps([{"subscriptions": current}]))

    def _snapshot(self, c: VenueConn, channel: str, vs: str) -> None:
        """A new `level2` subscription starts with the whole book; `market_trades` with the recent trades."""
        m = self.markets.get(vs)
        if m is None:
            return
        if channel == "level2":
            bids, asks = m.top()
            rows = self._levels(m, bids, asks)
            for row in rows:  # snapshot levels carry no event time of their own
                row["event_time"] = "1970-01-01T00:00:00Z"
            self.send_numbered(c, "l2_data", orjson.dumps([{"type": "snapshot", "product_id": vs, "updates": rows}]))
        elif channel == "market_trades":
            rows = self._trade_rows(m, m.recent(TRADE_SNAPSHOT))
            self.send_numbered(c, "market_trades", orjson.dumps([{"type": "snapshot", "trades": rows}]))

    # -- faults ----------------------------------------------------------------------------------------------

    def skip_sequence(self, n: int = 1) -> None:
        """The next `n` `l2_data` frames of every connection are lost on the wire (numbered, not sent)."""
        self.fault("skip_sequence")
        for c in self.conns:
            c.lose += n

    # -- REST ------------------------------------------------------------------------------------------------

    def add_rest_routes(self, app: web.Application) -> None:
        app.router.add_get("/products/{product_id}/trades", self._trades)
        app.router.add_get(coinbase.PRODUCT_BOOK_PATH, self._product_book)

    def _rest_error(self, request: web.Request, endpoint: str) -> web.Response | None:
        if not self.budget.take(request.remote or "?"):
            self.metrics.rest.labels(endpoint, "429").inc()
            return json_body({"message": "Public rate limit exceeded"}, 429)
        return None

    async def _trades(self, request: web.Request) -> web.Response:
        """Exchange API trades, newest first: `after=<id>` the ones below it, `before=<id>` the ones above it;
        `limit` at most 1000. Trades older than the held history are gone (the page stops there)."""
        limited = self._rest_error(request, "trades")
        if limited is not None:
            return limited
        m = self.markets.get(request.match_info["product_id"])
        if m is None:
            return json_body({"message": "NotFound"}, 404)
        try:
            limit = int(request.query.get("limit", "1000"))
            after = request.query.get("after")
            before = request.query.get("before")
            after_id, before_id = (None if v is None else int(v) for v in (after, before))
        except ValueError:
            return json_body({"message": "invalid cursor or limit"}, 400)
        if not 1 <= limit <= MAX_TRADES_PAGE:
            return json_body({"message": f"limit must be 1..{MAX_TRADES_PAGE}"}, 400)
        h = m.market.history
        if h.last_id is None or h.oldest_id is None:
            ids: range = range(0)
        elif before_id is not None:  # the `limit` trades just above `before`, returned newest first
            ids = range(min(h.last_id, before_id + limit), max(before_id, h.oldest_id - 1), -1)
        else:
            top = h.last_id if after_id is None else min(h.last_id, after_id - 1)
            ids = range(top, max(top - limit, h.oldest_id - 1), -1)
        rows = []
        for tid in ids:
            t = m.held(tid)
            if t is not None:
                rows.append(
                    {
                        "time": iso_us(t.time_us, 9),
                        "trade_id": t.trade_id,
                        "price": m.price(t.price),
                        "size": m.qty(t.qty),
                        "side": _maker_side(t).lower(),
                    }
                )
        resp = json_body(rows)
        if rows:
            resp.headers["cb-before"] = str(rows[0]["trade_id"])
            resp.headers["cb-after"] = str(rows[-1]["trade_id"])
        self.metrics.rest.labels("trades", "200").inc()
        return resp

    async def _product_book(self, request: web.Request) -> web.Response:
        limited = self._rest_error(request, "product_book")
        if limited is not None:
            return limited
        m = self.markets.get(request.query.get("product_id", ""))
        if m is None:
            return json_body({"error": "NOT_FOUND", "message": "product not found"}, 404)
        try:
            limit = max(1, min(int(request.query.get("limit", "50")), coinbase.MAX_REST_LEVELS))
        except ValueError:
            return json_body({"error": "INVALID_ARGUMENT", "message": "limit"}, 400)
        bids, asks = m.book_text(limit)
        book = {
            "product_id": m.venue_symbol,
            "bids": [{"price": p, "size": q} for p, q in bids],
            "asks": [{"price": p, "size": q} for p, q in asks],
            "time": _now_iso(),
        }
        self.metrics.rest.labels("product_book", "200").inc()
        return json_body({"pricebook": book})
