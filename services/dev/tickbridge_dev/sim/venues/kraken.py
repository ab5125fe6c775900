"""Simulated Kraken spot: the WebSocket v2 (`status` on connect, `subscribe`/`unsubscribe` acknowledged per
symbol, `ping`/`pong`, `heartbeat` every second once subscribed, `trade` and `book` with snapshots, the book
at the subscribed depth with a CRC32 `checksum` on every message) and REST `Trades` (by time: `since` in ns,
`last`) and `Depth`.

The `book` channel shows a view of a deeper exchange book, as Kraken's does: per message the changed levels
in view, a zero quantity for a level deleted from view, the levels that enter the view in its place, and no
removal for a level pushed out of view by better ones (the client truncates to its depth). Prices and
quantities are JSON numbers with their trailing zeros (`0.00100000`), which the checksum covers.

Faults: `drop_connections()`, `drop_book_update(sym, n)` (the next `n` book messages of `sym` are lost on
the wire: the client's book is wrong, and the next checksum fails unless later messages heal it),
`corrupt_checksum(sym, n)` (the next `n` book messages of `sym` carry a wrong checksum), `skip_trades(sym, n)`.
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any, ClassVar

import orjson
from aiohttp import web

from tickbridge.collector.venues import kraken
from tickbridge.collector.venues.base import KRAKEN
from tickbridge_dev.sim.venues import common
from tickbridge_dev.sim.venues.common import SimTrade, VenueConn, VenueMarket, iso_us

Levels = dict[int, int]


def crc_text(price: str, qty: str) -> str:
    return price.replace(".", "").lstrip("0") + qty.replace(".", "").lstrip("0")


def checksum(bids: list[tuple[str, str]], asks: list[tuple[str, str]]) -> int:
    """Kraken's CRC32 over the top 10 asks (low to high), then the top 10 bids (high to low), best first given."""
    return zlib.crc32("".join(crc_text(p, q) for p, q in [*asks[:10], *bids[:10]]).encode())


def _num(text: str) -> orjson.Fragment:
    """A decimal as a JSON number with exactly the digits given (Kraken v2 sends `0.00100000`)."""
    return orjson.Fragment(text.encode())


class KrakenSim(common.VenueServer):
    """Kraken spot WebSocket v2 market data and REST `Trades`/`Depth`."""

    exchange = KRAKEN
    separator = "/"
    ws_path = "/v2"
    faults: ClassVar[dict[str, common.Fault]] = {
        **common.COMMON_FAULTS,
        "drop_book_update": lambda s, sym, n: s.drop_book_update(str(sym), n or 1),
        "corrupt_checksum": lambda s, sym, n: s.corrupt_checksum(str(sym), n or 1),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget = common.RestBudget(kraken.LIMITS.rest_per_s, 15)
        #: (symbol, depth) -> the view clients at that depth hold (bids, asks: price -> qty), while subscribed.
        self.views: dict[tuple[str, int], tuple[Levels, Levels]] = {}
        self.lose_book: dict[str, int] = {}
        self.corrupt: dict[str, int] = {}
        self._pairs = {kraken.rest_pair(m.instrument): vs for vs, m in self.markets.items()}
        self._conn_ids = 0

    def view(self, symbol: str, depth: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """The book a client subscribed at `depth` must hold, best first, as sent: the oracle for tests."""
        return self.markets[self.known(symbol)].book_text(depth)

    # -- WebSocket out -------------------------------------------------------------------------------------

    def _send_json(self, c: VenueConn, doc: dict[str, Any]) -> None:
        self.send(c, orjson.dumps(doc))

    def _trade_rows(self, m: VenueMarket, trades: list[SimTrade]) -> list[dict[str, Any]]:
        return [
            {
                "symbol": m.venue_symbol,
                "side": "sell" if t.buyer_maker else "buy",
                "price": _num(m.price(t.price)),
                "qty": _num(m.qty(t.qty)),
                "ord_type": "market",
                "trade_id": t.trade_id,
                "timestamp": iso_us(t.time_us),
            }
            for t in trades
        ]

    @staticmethod
    def _rows(m: VenueMarket, levels: list[tuple[int, int]]) -> list[dict[str, orjson.Fragment]]:
        return [{"price": _num(m.price(p)), "qty": _num(m.qty(q))} for p, q in levels]

    def _book_doc(
        self, vs: str, kind: str, bids: list[tuple[int, int]], asks: list[tuple[int, int]], crc: int
    ) -> bytes:
        m = self.markets[vs]
        item: dict[str, Any] = {"symbol": vs, "bids": self._rows(m, bids), "asks": self._rows(m, asks), "checksum": crc}
        if kind == "update":
            item["timestamp"] = iso_us(time.time_ns() // 1000)
        return orjson.dumps({"channel": "book", "type": kind, "data": [item]})

    def _checksum(self, m: VenueMarket, bids: Levels, asks: Levels) -> int:
        top_bids = [(m.price(p), m.qty(bids[p])) for p in sorted(bids, reverse=True)[:10]]
        top_asks = [(m.price(p), m.qty(asks[p])) for p in sorted(asks)[:10]]
        return checksum(top_bids, top_asks)

    def _view_messages(self, vs: str, depth: int) -> list[tuple[list[tuple[int, int]], list[tuple[int, int]], int]]:
        """The book messages (bids, asks, checksum) that take clients of the view `(vs, depth)` to the book now.

        Per side: a zero for each level deleted from view, then the levels in view that are new or changed, best
        first; nothing for a level pushed out by better ones (the client truncates). A message holds at most
        `depth` levels a side (the adapter refuses more), so a busy tick becomes two; each checksum is of the book
        the client holds after that message and its truncation."""
        m = self.markets[vs]
        held = self.views[(vs, depth)]
        top = m.top(depth)
        sides = []
        for was, now, book in zip(held, top, (m.market.bid_qty, m.market.ask_qty), strict=True):
            in_view = {p for p, _ in now}
            sides.append(
                [(p, 0) for p in was if p not in in_view and p not in book]
                + [(p, q) for p, q in now if was.get(p) != q]
            )
        out = []
        for k in range(0, max(len(sides[0]), len(sides[1])), depth):
            chunk = (sides[0][k : k + depth], sides[1][k : k + depth])
            for state, levels, worst in ((held[0], chunk[0], min), (held[1], chunk[1], max)):
                for p, q in levels:
                    if q:
                        state[p] = q
                    else:
                        state.pop(p, None)
                while len(state) > depth:
                    del state[worst(state)]
            out.append((chunk[0], chunk[1], self._checksum(m, *held)))
        return out

    def publish(
        self, trades: dict[str, list[SimTrade]], changes: dict[str, tuple[dict[int, int], dict[int, int]]]
    ) -> None:
        trade_docs = {
            vs: orjson.dumps({"channel": "trade", "type": "update", "data": self._trade_rows(self.markets[vs], ts)})
            for vs, ts in trades.items()
        }
        in_use = {(vs, c.depths[vs]) for c in self.conns for vs in c.subs.get("book", {})}
        for key in list(self.views):
            if key not in in_use:
                del self.views[key]
        book_docs: dict[tuple[str, int], list[bytes]] = {}
        for vs, depth in list(self.views):
            if vs not in changes:
                continue
            for bids, asks, crc in self._view_messages(vs, depth):
                if self.corrupt.get(vs):
                    self.corrupt[vs] -= 1
                    crc = (crc + 1) % 2**32
                if self.lose_book.get(vs):
                    self.lose_book[vs] -= 1
                    continue
                book_docs.setdefault((vs, depth), []).append(self._book_doc(vs, "update", bids, asks, crc))
        for c in list(self.conns):
            for vs in c.subs.get("trade", {}):
                if vs in trade_docs:
                    self.send(c, trade_docs[vs])
            for vs in c.subs.get("book", {}):
                for doc in book_docs.get((vs, c.depths[vs]), ()):
                    self.send(c, doc)

    def heartbeat(self, c: VenueConn) -> None:
        if c.subs:
            self.send(c, b'{"channel":"heartbeat"}')

    # -- WebSocket in --------------------------------------------------------------------------------------

    def on_open(self, c: VenueConn) -> None:
        self._conn_ids += 1
        self._send_json(
            c,
            {
                "channel": "status",
                "type": "update",
                "data": [
                    {"version": "2.0.0", "system": "online", "api_version": "v2", "connection_id": self._conn_ids}
                ],
            },
        )

    def on_message(self, c: VenueConn, data: str | bytes) -> None:
        time_in = iso_us(time.time_ns() // 1000)
        try:
            msg = json.loads(data)
        except ValueError:
            self._send_json(
                c, {"error": "Malformed request", "success": False, "time_in": time_in, "time_out": time_in}
            )
            return
        if not isinstance(msg, dict):
            msg = {}
        method, req_id = msg.get("method"), msg.get("req_id")
        stamps = {"time_in": time_in, "time_out": iso_us(time.time_ns() // 1000)}
        if method == "ping":
            self._send_json(c, {"method": "pong", "req_id": req_id, **stamps})
            return
        params = msg.get("params")
        if method not in ("subscribe", "unsubscribe") or not isinstance(params, dict):
            self._send_json(
                c,
                {
                    "error": f"Unsupported method {str(method)[:40]}",
                    "method": method,
                    "success": False,
                    "req_id": req_id,
                    **stamps,
                },
            )
            return
        channel, symbols = params.get("channel"), params.get("symbol", [])
        depth = params.get("depth", 10)
        error = None
        if channel not in ("trade", "book"):
            error = f"Channel {str(channel)[:40]} not found"
        elif not isinstance(symbols, list) or not symbols:
            error = "Missing symbol"
        elif channel == "book" and depth not in kraken.BOOK_DEPTHS:
            error = f"Invalid depth {str(depth)[:20]}"
        if error is not None:
            self._send_json(c, {"error": error, "method": method, "success": False, "req_id": req_id, **stamps})
            return
        for vs in symbols:
            self._one(c, method, str(channel), vs, depth, bool(params.get("snapshot", True)), req_id, stamps)

    def _one(
        self,
        c: VenueConn,
        method: str,
        channel: str,
        vs: object,
        depth: int,
        snapshot: bool,
        req_id: Any,
        stamps: dict[str, str],
    ) -> None:
        """One symbol of a (un)subscribe: the per-symbol acknowledgement, then the snapshot."""
        if not isinstance(vs, str) or vs not in self.markets:
            self._send_json(
                c,
                {
                    "error": f"Currency pair not supported {str(vs)[:40]}",
                    "method": method,
                    "success": False,
                    "symbol": str(vs)[:40],
                    "req_id": req_id,
                    **stamps,
                },
            )
            return
        result: dict[str, Any] = {"channel": channel, "symbol": vs}
        if channel == "book":
            result["depth"] = depth
        subs = c.subs.setdefault(channel, {})
        if method == "unsubscribe":
            if vs not in subs:
                self._send_json(
                    c,
                    {
                        "error": "Subscription Not Found",
                        "method": method,
                        "success": False,
                        "symbol": vs,
                        "req_id": req_id,
                        **stamps,
                    },
                )
                return
            del subs[vs]
            if channel == "book":
                c.depths.pop(vs, None)
            self._send_json(c, {"method": method, "result": result, "success": True, "req_id": req_id, **stamps})
            return
        if vs in subs:
            self._send_json(
                c,
                {
                    "error": "Already subscribed",
                    "method": method,
                    "success": False,
                    "symbol": vs,
                    "req_id": req_id,
                    **stamps,
                },
            )
            return
        subs[vs] = None
        result["snapshot"] = snapshot
        self._send_json(c, {"method": method, "result": result, "success": True, "req_id": req_id, **stamps})
        m = self.markets[vs]
        if channel == "book":
            c.depths[vs] = depth
            bids, asks = m.top(depth)
            self.views.setdefault((vs, depth), (dict(bids), dict(asks)))
            self.send(c, self._book_doc(vs, "snapshot", bids, asks, self._checksum(m, dict(bids), dict(asks))))
        elif snapshot:
            rows = self._trade_rows(m, m.recent(common.TRADE_SNAPSHOT))
            self.send(c, orjson.dumps({"channel": "trade", "type": "snapshot", "data": rows}))

    # -- faults ----------------------------------------------------------------------------------------------

    def drop_book_update(self, symbol: str, n: int = 1) -> None:
        """The next `n` book messages of `symbol` are lost on the wire (every depth, every client)."""
        self.fault("drop_book_update")
        vs = self.known(symbol)
        self.lose_book[vs] = self.lose_book.get(vs, 0) + n

    def corrupt_checksum(self, symbol: str, n: int = 1) -> None:
        """The next `n` book messages of `symbol` carry a checksum one off the true one."""
        self.fault("corrupt_checksum")
        vs = self.known(symbol)
        self.corrupt[vs] = self.corrupt.get(vs, 0) + n

    # -- REST ------------------------------------------------------------------------------------------------

    def add_rest_routes(self, app: web.Application) -> None:
        app.router.add_get(kraken.TRADES_PATH, self._trades)
        app.router.add_get(kraken.DEPTH_PATH, self._depth)

    def _market(self, request: web.Request, endpoint: str) -> VenueMarket | web.Response:
        """The `pair` asked for, or Kraken's answer: HTTP 200 with an `error` list."""
        if not self.budget.take(request.remote or "?"):
            self.metrics.rest.labels(endpoint, "429").inc()
            return common.json_body({"error": ["EGeneral:Too many requests"]})
        vs = self._pairs.get(request.query.get("pair", "").upper())
        if vs is None:
            return common.json_body({"error": ["EQuery:Unknown asset pair"]})
        self.metrics.rest.labels(endpoint, "200").inc()
        return self.markets[vs]

    async def _trades(self, request: web.Request) -> web.Response:
        """`Trades?pair=&since=<ns>&count=`: trades after `since`, oldest first, at most `count` (1000); `last`
        the time (ns) of the last row, to pass as the next `since`. Without `since`: the most recent ones."""
        m = self._market(request, "Trades")
        if not isinstance(m, VenueMarket):
            return m
        try:
            count = max(1, min(int(request.query.get("count", "1000")), kraken.TRADES_PAGE))
            since = request.query.get("since")
            start = None if since is None else common.since_id(m, int(since) // 1000)
        except ValueError:
            return common.json_body({"error": ["EGeneral:Invalid arguments"]})
        h = m.market.history
        if since is None:
            rows = m.recent(count)
        elif start is None or h.last_id is None:
            rows = []
        else:
            rows = [t for t in (m.held(i) for i in range(start, min(start + count, h.last_id + 1))) if t]
        out = [
            [
                m.price(t.price),
                m.qty(t.qty),
                _num(f"{t.time_us // 1_000_000}.{t.time_us % 1_000_000:06d}"),
                "s" if t.buyer_maker else "b",
                "m",
                "",
                t.trade_id,
            ]
            for t in rows
        ]
        last = str(rows[-1].time_us * 1000) if rows else str(since or 0)
        return common.json_body({"error": [], "result": {request.query["pair"].upper(): out, "last": last}})

    async def _depth(self, request: web.Request) -> web.Response:
        m = self._market(request, "Depth")
        if not isinstance(m, VenueMarket):
            return m
        try:
            count = max(1, min(int(request.query.get("count", "100")), kraken.MAX_REST_LEVELS))
        except ValueError:
            return common.json_body({"error": ["EGeneral:Invalid arguments"]})
        bids, asks = m.book_text(count)
        now = int(time.time())
        book = {"asks": [[p, q, now] for p, q in asks], "bids": [[p, q, now] for p, q in bids]}
        return common.json_body({"error": [], "result": {request.query["pair"].upper(): book}})
