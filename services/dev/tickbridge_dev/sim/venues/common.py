"""What the Coinbase and Kraken simulators share: the synthetic markets (the Binance simulator's `SymbolMarket`,
one per venue symbol, driven at the same rate and zipf spread), the generator and heartbeat loops, the
connections and their send path, a REST request budget, and the `/_sim` control plane.

A venue module subclasses `VenueServer` with its protocol: what a client message does (`on_message`), what a
generation tick publishes (`publish`), what a heartbeat is, its REST routes and its faults.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry

from tickbridge.collector.venues.base import Instrument, split_pair, venue_symbols
from tickbridge_dev.sim import wire
from tickbridge_dev.sim.app import SimApp
from tickbridge_dev.sim.config import SimConfig
from tickbridge_dev.sim.market import REFERENCE_PRICES, SCALE, SymbolMarket
from tickbridge_dev.sim.metrics import SimMetrics

log = logging.getLogger(__name__)

#: Trades a `trade`/`market_trades` subscription starts with (the venue's most recent ones).
TRADE_SNAPSHOT = 50


def decimals_of(units: int) -> int:
    """Digits after the point that show a step of `units` (1e-8 units): 0.01 -> 2, at least 1."""
    digits = 8
    while digits > 1 and units % 10 == 0:
        units //= 10
        digits -= 1
    return digits


def fmt_units(units: int, decimals: int) -> str:
    """1e-8 units as a decimal with `decimals` digits after the point (exact: the step divides the value)."""
    text = f"{units // SCALE}.{units % SCALE:08d}"
    return text[: len(text) - (8 - decimals)]


def iso_us(us: int, digits: int = 6) -> str:
    """µs since the epoch as RFC 3339 UTC with `digits` fraction digits (9: ns, as Coinbase prints them)."""
    secs, frac = divmod(us, 1_000_000)
    stamp = datetime.datetime.fromtimestamp(secs, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{(f'{frac:06d}' + '000')[:digits]}Z"


@dataclass(frozen=True, slots=True)
class SimTrade:
    """One generated trade (prices and quantities in 1e-8 units, time in µs, unique and rising per symbol)."""

    trade_id: int
    price: int
    qty: int
    buyer_maker: bool
    time_us: int


class VenueMarket:
    """One venue symbol's synthetic market and how the venue spells its numbers."""

    def __init__(self, venue: str, instrument: Instrument, config: SimConfig) -> None:
        self.instrument = instrument
        self.venue_symbol = instrument.venue_symbol
        ref = REFERENCE_PRICES.get(instrument.symbol) or REFERENCE_PRICES.get(instrument.base + "USDT")
        self.market = SymbolMarket(
            f"{venue}:{instrument.symbol}",
            config.seed,
            config.depth_levels,
            config.history_per_symbol,
            config.book_updates_per_trade,
            ref,
        )
        self.price_decimals = decimals_of(self.market.tick)
        self.last_us = 0

    def price(self, units: int) -> str:
        return fmt_units(units, self.price_decimals)

    @staticmethod
    def qty(units: int) -> str:
        return fmt_units(units, 8)

    def trade(self, now_us: int) -> SimTrade | None:
        """The next trade; None when a `skip_trades` fault keeps it off the WebSocket (it is still in REST)."""
        when = self.last_us = max(now_us, self.last_us + 1)
        m = self.market
        tid, price, qty, maker = m.trade(when)
        if m.suppress_trades:
            m.suppress_trades -= 1
            return None
        return SimTrade(tid, price, qty, maker, when)

    def recent(self, n: int) -> list[SimTrade]:
        """The last `n` trades held, oldest first."""
        h = self.market.history
        if h.last_id is None or h.oldest_id is None:
            return []
        return [t for t in (self.held(i) for i in range(max(h.oldest_id, h.last_id - n + 1), h.last_id + 1)) if t]

    def held(self, trade_id: int) -> SimTrade | None:
        row = self.market.history.row(trade_id)
        return None if row is None else SimTrade(trade_id, row[0], row[1], row[3], row[2])

    def top(self, depth: int | None = None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The book's levels best first, (price, qty) in units, all or the best `depth` per side."""
        m = self.market
        bids = m.bids[::-1] if depth is None else m.bids[: -depth - 1 : -1]
        asks = m.asks if depth is None else m.asks[:depth]
        return [(p, m.bid_qty[p]) for p in bids], [(p, m.ask_qty[p]) for p in asks]

    def book_text(self, depth: int | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """`top` as the venue spells it: the oracle tests compare a client's book with."""
        bids, asks = self.top(depth)
        return ([(self.price(p), self.qty(q)) for p, q in bids], [(self.price(p), self.qty(q)) for p, q in asks])


@dataclass(eq=False)
class VenueConn:
    """One client connection and the per-connection protocol state of either venue."""

    ws: web.WebSocketResponse
    transport: asyncio.Transport
    peer: str
    #: Frames written so far (tests wait until they have read this many).
    frames: int = 0
    closing: bool = False
    opened: float = field(default_factory=time.monotonic)
    #: channel -> subscribed venue symbols (ordered).
    subs: dict[str, dict[str, None]] = field(default_factory=dict)
    #: Coinbase: the next `sequence_num`; frames still to lose (numbered but not sent).
    seq: int = 0
    lose: int = 0
    #: Kraken: the `book` depth subscribed per symbol.
    depths: dict[str, int] = field(default_factory=dict)
    heartbeats: int = 0


class RestBudget:
    """A token bucket per client IP: `rate` requests per second, `burst` at once (the venues' public limits)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, peer: str) -> bool:
        now = time.monotonic()
        tokens, then = self._buckets.get(peer, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        ok = tokens >= 1.0
        self._buckets[peer] = (tokens - 1.0 if ok else tokens, now)
        return ok


Fault = Callable[[Any, str | None, int | None], Any]


class VenueServer(SimApp):
    """A simulated venue on one aiohttp port: WebSocket at `ws_path`, REST beside it, `/_sim/*` control."""

    exchange: ClassVar[str]
    separator: ClassVar[str]
    ws_path: ClassVar[str]
    #: action -> call(server, symbol, count) for `POST /_sim/fault`.
    faults: ClassVar[dict[str, Fault]]

    def __init__(self, config: SimConfig, registry: CollectorRegistry | None = None) -> None:
        super().__init__(config)
        self.metrics = SimMetrics(registry if registry is not None else CollectorRegistry())
        self._rate = float(config.rate)
        self.paused = False
        self.conns: set[VenueConn] = set()
        self.fault_counts: dict[str, int] = {}
        self.markets: dict[str, VenueMarket] = {}
        self._first_sent: dict[str, int] = {}
        for vs in venue_symbols(config.symbols, self.separator):
            inst = split_pair(self.exchange, vs, self.separator)
            self.markets[vs] = VenueMarket(self.exchange, inst, config)
        self.symbols = tuple(self.markets)
        raw = [1.0 / (i + 1) ** 0.8 if config.weights == "zipf" else 1.0 for i in range(len(self.symbols))]
        self._cum_weights = [sum(raw[: i + 1]) for i in range(len(raw))]
        self._alloc_rng = random.Random(f"{config.seed}:{self.exchange}:alloc")

    # -- lifecycle -----------------------------------------------------------------------------------------

    @property
    def ws_url(self) -> str:
        return f"ws://{self.config.host}:{self._port}{self.ws_path}"

    @property
    def rate(self) -> float:
        return self._rate

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(self.ws_path, self._ws_handler)
        self.add_rest_routes(app)
        app.router.add_post("/_sim/fault", self._http_fault)
        await self.serve(app, self._generate(), self._heartbeat_loop())
        log.info("sim %s listening on %s, %d symbols", self.exchange, self.rest_url, len(self.symbols))

    async def stop(self) -> None:
        await self.shutdown(self._abort_all)

    def _abort_all(self) -> None:
        for c in list(self.conns):
            c.transport.abort()

    # -- generation ----------------------------------------------------------------------------------------

    async def _generate(self) -> None:
        """`rate` trades per second over the symbols, one publication per tick (as the Binance generator)."""
        tick = self.config.tick_interval_s
        last, carry = time.monotonic(), 0.0
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            dt, last = now - last, now
            if self.paused:
                continue
            carry += self.rate * dt
            n = int(carry)
            carry -= n
            cap = min(int(self.rate * 0.5) + 1, 10_000)  # a late loop does not replay its whole backlog
            if n > cap:
                n, carry = cap, 0.0
            if n:
                self.step(n)

    def step(self, n: int, symbol: str | None = None) -> None:
        """Generate `n` trades (zipf-spread, or all of `symbol`) with their book changes and publish them now:
        the generator's tick, and what tests call with `rate=0` to place checkpoints."""
        if symbol is None:
            picks = self._alloc_rng.choices(self.symbols, cum_weights=self._cum_weights, k=n)
        else:
            picks = [self.known(symbol)] * n
        now_us = time.time_ns() // 1000
        trades: dict[str, list[SimTrade]] = {}
        watched = bool(self.conns)
        for vs in picks:
            t = self.markets[vs].trade(now_us)
            if t is not None:
                trades.setdefault(vs, []).append(t)
                if watched:  # the oracle's start: trades made before any client connected reached nobody
                    self._first_sent.setdefault(vs, t.trade_id)
        changes = {}
        for vs in dict.fromkeys(picks):
            bids, asks = self.markets[vs].market.take_changes()
            if bids or asks:
                changes[vs] = (bids, asks)
        self.metrics.trades.inc(n)
        self.publish(trades, changes)

    @abstractmethod
    def publish(
        self, trades: dict[str, list[SimTrade]], changes: dict[str, tuple[dict[int, int], dict[int, int]]]
    ) -> None:
        """Send one tick's trades and book changes (price -> new qty in units, 0 removed) to the subscribers."""

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for c in list(self.conns):
                if not c.closing:
                    self.heartbeat(c)

    @abstractmethod
    def heartbeat(self, c: VenueConn) -> None:
        """The venue's once-a-second liveness frame, where the connection asked for one."""

    # -- connections ---------------------------------------------------------------------------------------

    def send(self, c: VenueConn, data: bytes) -> None:
        """Write one text frame (no await: a tick reaches every client without yielding); a client whose unsent
        bytes pass the budget is dropped, as the venues drop clients that do not keep up."""
        if c.closing or c.transport.is_closing():
            return
        c.transport.write(wire.frame(data))
        c.frames += 1
        if c.transport.get_write_buffer_size() > self.config.max_send_buffer_bytes:
            self.drop(c, "slow_consumer")

    def drop(self, c: VenueConn, reason: str) -> None:
        """Abort the connection (no close frame: the client sees 1006)."""
        if not c.closing:
            c.closing = True
            self.metrics.disconnects.labels(reason).inc()
            c.transport.abort()

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=1 << 20)
        await ws.prepare(request)
        assert request.transport is not None
        c = VenueConn(ws, request.transport, request.remote or "?")
        self.conns.add(c)
        self.metrics.connects.inc()
        self.metrics.connections.set(len(self.conns))
        self.on_open(c)
        try:
            async for msg in ws:
                if c.closing:
                    break
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    self.on_message(c, msg.data)
        finally:
            self.conns.discard(c)
            self.metrics.connections.set(len(self.conns))
            c.closing = True
        return ws

    @abstractmethod
    def on_open(self, c: VenueConn) -> None:
        """A new connection (Kraken greets it; Coinbase starts its subscription deadline)."""

    @abstractmethod
    def on_message(self, c: VenueConn, data: str | bytes) -> None:
        """One client frame."""

    def known(self, symbol: str) -> str:
        """A symbol of this venue in its own form (`BTC-USD`; `BTCUSD` is accepted); ValueError if unknown."""
        for vs, m in self.markets.items():
            if symbol in (vs, m.instrument.symbol):
                return vs
        raise ValueError(f"{self.exchange}: unknown symbol {symbol!r}")

    # -- faults, stats, control plane ------------------------------------------------------------------------

    def fault(self, action: str) -> None:
        log.info("sim %s fault injected: %s", self.exchange, action)
        self.fault_counts[action] = self.fault_counts.get(action, 0) + 1
        self.metrics.faults.labels(action).inc()

    def drop_connections(self) -> int:
        """Abort every client connection (1006). Returns how many."""
        self.fault("drop_connections")
        conns = [c for c in self.conns if not c.closing]
        for c in conns:
            self.drop(c, "drop")
        return len(conns)

    def skip_trades(self, symbol: str, n: int = 1) -> None:
        """The next `n` trades of `symbol` are not sent on the WebSocket but stay in the REST back-fill."""
        self.fault("skip_trades")
        self.markets[self.known(symbol)].market.suppress_trades += n

    def pause(self) -> None:
        self.fault("pause")
        self.paused = True

    def resume(self) -> None:
        self.fault("resume")
        self.paused = False

    def set_rate(self, rate: float) -> None:
        self._rate = max(0.0, float(rate))

    def stats(self) -> dict[str, Any]:
        """Per-symbol trade-ID ranges, totals, faults and connections (`GET /_sim/stats`)."""
        per = {}
        for vs, m in self.markets.items():
            h = m.market.history
            per[vs] = {
                "symbol": m.instrument.symbol,
                "first_trade_id": h.first_id,
                "first_sent_trade_id": self._first_sent.get(vs),
                "last_trade_id": h.last_id,
                "trades": h.count,
            }
        return {
            "exchange": self.exchange,
            "symbols": per,
            "totals": {"trades": sum(p["trades"] for p in per.values()), "faults": dict(self.fault_counts)},
            "connections": len(self.conns),
            "paused": self.paused,
            "rate": self.rate,
        }

    async def _http_fault(self, request: web.Request) -> web.Response:
        """`POST /_sim/fault {"action", "symbol", "count"}`: 400 with the reason for an unknown action."""
        try:
            body = await request.json(loads=orjson.loads)
            action = body.get("action")
            fault = self.faults.get(action)
            if fault is None:
                raise ValueError(f"unknown action {action!r}; expected one of {', '.join(self.faults)}")
            count = body.get("count")
            result = fault(self, body.get("symbol"), None if count is None else int(count))
        except (ValueError, TypeError, AttributeError) as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=400)
        return web.json_response({"ok": True, "result": result})

    @abstractmethod
    def add_rest_routes(self, app: web.Application) -> None:
        """The venue's REST endpoints."""


#: Faults every venue has, for `POST /_sim/fault`.
COMMON_FAULTS: dict[str, Fault] = {
    "drop_connections": lambda s, sym, n: s.drop_connections(),
    "skip_trades": lambda s, sym, n: s.skip_trades(str(sym), n or 1),
    "pause": lambda s, sym, n: s.pause(),
    "resume": lambda s, sym, n: s.resume(),
}


def since_id(m: VenueMarket, after_us: int) -> int | None:
    """The first held trade ID with a time after `after_us` (times rise with IDs), None if there is none."""
    h = m.market.history
    lo, hi = h.oldest_id, h.last_id
    if lo is None or hi is None:
        return None
    hi += 1
    while lo < hi:
        mid = (lo + hi) // 2
        t = m.held(mid)
        if t is not None and t.time_us > after_us:
            hi = mid
        else:
            lo = mid + 1
    return lo if lo <= (h.last_id or 0) else None


def json_body(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")
