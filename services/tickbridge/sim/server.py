"""`SimServer`: a Binance-compatible exchange (WebSocket streams + REST) on one aiohttp port.

Data frames are encoded here and written straight to each connection's transport, one WebSocket
message per event but one `transport.write` per connection per generation tick. A slow client therefore
never blocks the generator: its unsent bytes grow until the slow-consumer policy drops it, which is what
Binance does to clients that do not keep up.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry

from tickbridge.collector.rest import depth_weight
from tickbridge.sim import wire
from tickbridge.sim.config import SimConfig
from tickbridge.sim.market import SymbolMarket, TradeHistory, parse8
from tickbridge.sim.metrics import SimMetrics
from tickbridge.sim.replay import CaptureLine, ReplayBook, load_capture

log = logging.getLogger(__name__)

FAULT_ACTIONS = (
    "drop_connections",
    "server_shutdown",
    "skip_update_ids",
    "skip_trade_ids",
    "stall",
    "slow_consumer",
    "burst",
    "pause",
    "resume",
    "stale_snapshot",
    "duplicate_trades",
    "big_diff",
    "duplicate_depth",
)


def _micro(request: web.Request) -> bool:
    """REST `X-MBX-TIME-UNIT: MICROSECOND` header."""
    return request.headers.get("X-MBX-TIME-UNIT", "").lower() == "microsecond"


class Conn:
    """One client WebSocket connection."""

    def __init__(
        self, ws: web.WebSocketResponse, transport: asyncio.Transport, combined: bool, peer: str, micro: bool
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.combined = combined
        self.micro = micro  # timeUnit=MICROSECOND: E and T in µs
        self.peer = peer
        self.streams: dict[str, None] = {}  # ordered set, for LIST_SUBSCRIPTIONS
        self.out: list[bytes] = []
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.recv_times: deque[float] = deque()
        self.pings: deque[tuple[bytes, float]] = deque()
        now = time.monotonic()
        self.opened = now
        self.last_ping = now
        self.closing = False
        self.caught_up = now


class BinanceErrorReply(Exception):
    def __init__(self, status: int, code: int, msg: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(msg)
        self.status, self.code, self.msg, self.headers = status, code, msg, headers or {}


class SimServer:
    """The simulator; see the package docstring for the in-process API."""

    def __init__(self, config: SimConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = SimMetrics(registry if registry is not None else CollectorRegistry())
        self.rate = float(config.rate)
        self.symbols = tuple(s.upper() for s in config.symbols)
        self.markets: dict[str, SymbolMarket] = {}
        self.conns: set[Conn] = set()
        self.subs: dict[str, set[Conn]] = {}
        self.max_send_buffer = config.max_send_buffer_bytes
        self.slow_grace = config.slow_consumer_grace_s
        self.paused = False
        self.stall_until = 0.0
        self.failed: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._bursts: deque[tuple[int, str | None]] = deque()
        self._sent: dict[str, int] = {}  # this tick, per stream kind
        self._sent_total: dict[str, int] = {}
        # First trade ID actually sent per symbol: trades generated before anyone subscribed were never emitted.
        self._first_sent: dict[str, int] = {}
        self._connect_times: dict[str, deque[float]] = {}
        self._weights: dict[str, tuple[int, int]] = {}
        self._faults: dict[str, int] = {}
        self._rejections: dict[str, tuple[int, int]] = {}  # peer -> (minute, 429s sent)
        self._banned_until: dict[str, float] = {}
        self._last_depth: dict[str, tuple[str, str]] = {}  # stream -> (symbol, last payload) for duplicates
        self._stale: dict[str, tuple[int, dict[str, Any]]] = {}  # symbol -> (requests left, frozen snapshot)
        # Replay state.
        self.capture: list[CaptureLine] = []
        self.replay_pos = 0
        self.replay_done = False
        self._replay_go = asyncio.Event()
        self._replay_books: dict[str, ReplayBook] = {}
        self._replay_snap_ready: dict[str, asyncio.Event] = {}
        self._replay_hist: dict[str, TradeHistory] = {}
        self._replay_last_u: dict[str, int] = {}
        self._replay_skip_ids: dict[str, int] = {}
        self._replay_skip_trades: dict[str, int] = {}
        self._resumed = asyncio.Event()
        self._resumed.set()
        if config.mode == "synthetic":
            for sym in self.symbols:
                self.markets[sym] = SymbolMarket(
                    sym, config.seed, config.depth_levels, config.history_per_symbol, config.book_updates_per_trade
                )
            n = len(self.symbols)
            raw = [1.0 / (i + 1) ** 0.8 if config.weights == "zipf" else 1.0 for i in range(n)]
            acc, self._cum_weights = 0.0, []
            for w in raw:
                acc += w
                self._cum_weights.append(acc)
            self._alloc_rng = random.Random(f"{config.seed}:alloc")
        elif config.mode == "replay":
            if not config.replay_files:
                raise ValueError("replay mode needs replay_files")
            self.capture = load_capture(config.replay_files)
            self.symbols = tuple(dict.fromkeys(line.symbol for line in self.capture if line.symbol))
            for sym in self.symbols:
                self._replay_snap_ready[sym] = asyncio.Event()
                self._replay_hist[sym] = TradeHistory(config.history_per_symbol)
        else:
            raise ValueError(f"unknown mode {config.mode!r}")
        self._symbol_set = frozenset(self.symbols)

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def ws_url(self) -> str:
        return f"ws://{self.config.host}:{self._port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self.config.host}:{self._port}"

    async def start(self) -> None:
        """Listen and start generating (synthetic) or wait for the first client (replay)."""
        app = web.Application()
        app.router.add_get("/ws", self._ws_handler)
        app.router.add_get("/ws/{streams:.+}", self._ws_handler)
        app.router.add_get("/stream", self._ws_handler)
        app.router.add_get("/api/v3/depth", self._rest(self._depth, "depth"))
        app.router.add_get("/api/v3/historicalTrades", self._rest(self._historical, "historicalTrades"))
        app.router.add_get("/api/v3/trades", self._rest(self._recent, "trades"))
        app.router.add_get("/api/v3/aggTrades", self._rest(self._agg, "aggTrades"))
        app.router.add_get("/api/v3/ping", self._rest(self._ping, "ping"))
        app.router.add_get("/api/v3/time", self._rest(self._time, "time"))
        app.router.add_get("/api/v3/exchangeInfo", self._rest(self._exchange_info, "exchangeInfo"))
        app.router.add_post("/_sim/fault", self._http_fault)
        app.router.add_get("/_sim/stats", self._http_stats)
        app.router.add_post("/_sim/rate", self._http_rate)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        if self.config.mode == "synthetic":
            self._spawn(self._generate_loop())
        else:
            self._spawn(self._replay_loop())
        self._spawn(self._housekeeping_loop())
        log.info("sim (%s) listening on %s", self.config.mode, self.rest_url)

    async def stop(self) -> None:
        """Close every connection and the listener."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in list(self.conns):
            c.transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failed = task.exception()
            log.critical("sim task crashed", exc_info=self.failed)

    # -- faults (in-process API) ---------------------------------------------------------------------------

    def _fault(self, action: str) -> None:
        log.info("fault injected: %s", action)
        self._faults[action] = self._faults.get(action, 0) + 1
        self.metrics.faults.labels(action).inc()

    def drop_connections(self) -> int:
        """Abort every client connection (no close frame: the client sees 1006). Returns how many."""
        self._fault("drop_connections")
        conns = list(self.conns)
        for c in conns:
            self._drop(c, "drop")
        return len(conns)

    def server_shutdown(self) -> int:
        """Send `serverShutdown` to every client, then close them after `shutdown_grace_s`."""
        self._fault("server_shutdown")
        event = orjson.dumps({"e": "serverShutdown", "E": time.time_ns() // 1_000_000})
        conns = [c for c in self.conns if not c.closing]
        for c in conns:
            body = b'{"stream":"!serverShutdown","data":' + event + b"}" if c.combined else event
            self._send(c, wire.frame(wire.to_micro(body) if c.micro else body))

        async def close_later() -> None:
            await asyncio.sleep(self.config.shutdown_grace_s)
            for c in conns:
                await self._close(c, 1001, "server shutdown", "shutdown")

        self._spawn(close_later())
        return len(conns)

    def skip_update_ids(self, symbol: str, n: int = 1) -> None:
        """Lose the symbol's pending diff and jump its update ID by `n`: the next depth event shows a gap."""
        self._fault("skip_update_ids")
        sym = self._known(symbol)
        if self.config.mode == "synthetic":
            self.markets[sym].skip_update_ids(n)
        else:
            self._replay_skip_ids[sym] = self._replay_skip_ids.get(sym, 0) + max(1, n)

    def skip_trade_ids(self, symbol: str, n: int = 1) -> None:
        """The next `n` trades of `symbol` are not sent on the WebSocket but stay in REST back-fill."""
        self._fault("skip_trade_ids")
        sym = self._known(symbol)
        if self.config.mode == "synthetic":
            self.markets[sym].suppress_trades += n
        else:
            self._replay_skip_trades[sym] = self._replay_skip_trades.get(sym, 0) + n

    def stall(self, seconds: float) -> None:
        """Send nothing (data, replies, pings) for `seconds`; connections stay open and get the backlog after."""
        self._fault("stall")
        self.stall_until = max(self.stall_until, time.monotonic() + seconds)

    def slow_consumer(self, max_buffer_bytes: int | None = 65536, grace_s: float | None = 0.5) -> None:
        """Tighten the slow-client policy (Binance disconnects clients that do not keep up): a connection
        whose unsent bytes stay above `max_buffer_bytes` for `grace_s` is dropped. `None` = configured value."""
        self._fault("slow_consumer")
        self.max_send_buffer = self.config.max_send_buffer_bytes if max_buffer_bytes is None else max_buffer_bytes
        self.slow_grace = self.config.slow_consumer_grace_s if grace_s is None else grace_s

    def stale_snapshot(self, symbol: str, n: int = 1) -> None:
        """The next `n` depth snapshots of `symbol` are frozen now: a client that starts buffering later
        gets `lastUpdateId` < its first buffered `U` and must fetch again (procedure step 4)."""
        self._fault("stale_snapshot")
        sym = self._known(symbol)
        if self.config.mode == "synthetic":
            snap = self.markets[sym].snapshot(5000)
        else:
            book = self._replay_books.get(sym)
            if book is None:
                raise ValueError("the replay has not reached its snapshot yet")
            snap = book.snapshot(5000)
        self._stale[sym] = (n, snap)

    def big_diff(self, symbol: str, n: int = 1000) -> None:
        """Next depth window of `symbol` carries ~n levels, mostly removals of never-seen prices, plus one
        level with the capped quantity (synthetic mode)."""
        self._fault("big_diff")
        if self.config.mode != "synthetic":
            raise ValueError("big_diff needs synthetic mode")
        self.markets[self._known(symbol)].big_diff(n)

    def duplicate_depth(self, symbol: str) -> None:
        """Send the symbol's last diff-depth events again (`u` <= the client's book ID: it must ignore them)."""
        self._fault("duplicate_depth")
        sym = self._known(symbol)
        for stream, (s, payload) in list(self._last_depth.items()):
            if s == sym:
                self._emit(stream, payload)
        self._flush_out()

    def duplicate_trades(self, symbol: str, n: int = 1) -> None:
        """Send the last `n` trades of `symbol` again on its trade stream (the client must drop them)."""
        self._fault("duplicate_trades")
        sym = self._known(symbol)
        stream = sym.lower() + "@trade"
        now_ms = time.time_ns() // 1_000_000
        for r in self._history(sym).rows(None, n):
            self._emit(
                stream,
                f'{{"e":"trade","E":{max(now_ms, r["time"])},"s":"{sym}","t":{r["id"]},"p":"{r["price"]}",'
                f'"q":"{r["qty"]}","T":{r["time"]},"m":{"true" if r["isBuyerMaker"] else "false"},"M":true}}',
            )
        self._flush_out()

    def burst(self, n_trades: int, symbol: str | None = None) -> None:
        """Emit `n_trades` extra trades at once (over the weighted symbols, or one symbol)."""
        self._fault("burst")
        if self.config.mode != "synthetic":
            raise ValueError("burst needs synthetic mode")
        self._bursts.append((n_trades, None if symbol is None else self._known(symbol)))

    def pause(self) -> None:
        """Stop generating new events (pending depth windows are still flushed)."""
        self._fault("pause")
        self.paused = True
        self._resumed.clear()

    def resume(self) -> None:
        self._fault("resume")
        self.paused = False
        self._resumed.set()

    def set_rate(self, rate: float) -> None:
        self.rate = max(0.0, float(rate))

    def start_replay(self) -> None:
        """Start the replay now (otherwise it starts when the first client connects)."""
        self._replay_go.set()

    def _known(self, symbol: str) -> str:
        sym = symbol.upper()
        if sym not in self._symbol_set:
            raise ValueError(f"unknown symbol {symbol!r}")
        return sym

    def stats(self) -> dict[str, Any]:
        """Per-symbol trade/update-ID ranges (what was generated), totals and connections."""
        per: dict[str, dict[str, Any]] = {}
        for sym in self.symbols:
            if self.config.mode == "synthetic":
                m = self.markets[sym]
                hist, last_u = m.history, m.update_id
            else:
                hist, last_u = self._replay_hist[sym], self._replay_last_u.get(sym, 0)
            per[sym] = {
                "first_trade_id": hist.first_id,
                "first_sent_trade_id": self._first_sent.get(
                    sym, hist.first_id if self.config.mode == "replay" else None
                ),
                "last_trade_id": hist.last_id,
                "trades": hist.count,
                "last_update_id": last_u,
            }
        out: dict[str, Any] = {
            "mode": self.config.mode,
            "symbols": per,
            "totals": {
                "trades": sum(p["trades"] for p in per.values()),
                "messages_sent": dict(self._sent_total),
                "faults": dict(self._faults),
            },
            "connections": len(self.conns),
            "paused": self.paused,
            "rate": self.rate,
        }
        if self.config.mode == "replay":
            out["replay"] = {"position": self.replay_pos, "total": len(self.capture), "done": self.replay_done}
        return out

    def book(self, symbol: str) -> tuple[dict[int, int], dict[int, int], int]:
        """Internal book (bids, asks in 1e-8 units) and its update ID: the oracle for snapshot tests."""
        sym = self._known(symbol)
        if self.config.mode == "synthetic":
            m = self.markets[sym]
            bids, asks = m.book()
            return bids, asks, m.update_id
        rb = self._replay_books[sym]
        return dict(rb.bids), dict(rb.asks), rb.last_update_id

    # -- sending -------------------------------------------------------------------------------------------

    @property
    def stalled(self) -> bool:
        return time.monotonic() < self.stall_until

    def _send(self, c: Conn, data: bytes) -> None:
        """Send (or hold while stalled) one pre-framed message."""
        if c.closing or c.transport.is_closing():
            return
        if self.stalled:
            c.held.append(data)
            c.held_bytes += len(data)
            if c.held_bytes > self.config.max_send_buffer_bytes:  # bound our own memory during a long stall
                self._drop(c, "stall_backlog")
            return
        if c.held:  # end of a stall: the backlog goes first, in order
            held, c.held, c.held_bytes = c.held, [], 0
            c.transport.write(b"".join(held))
        c.transport.write(data)
        self._check_backlog(c)

    def _check_backlog(self, c: Conn) -> None:
        """Slow-consumer policy: drop a connection whose unsent bytes stay over budget past the grace time."""
        now = time.monotonic()
        if c.transport.get_write_buffer_size() <= self.max_send_buffer:
            c.caught_up = now
        elif now - c.caught_up > self.slow_grace:
            self._drop(c, "slow_consumer")

    def _emit(self, stream: str, data: str) -> None:
        """Queue one event for every subscriber of `stream` (framed once per wire form)."""
        subs = self.subs.get(stream)
        if subs:
            self._fanout(stream, subs, data.encode(), None, None)

    def _emit_exact(self, stream: str, combined_text: bytes, data: dict[str, Any]) -> None:
        """Replay: combined clients get the captured bytes verbatim."""
        subs = self.subs.get(stream)
        if subs:
            self._fanout(stream, subs, None, combined_text, data)

    def _fanout(
        self,
        stream: str,
        subs: set[Conn],
        payload: bytes | None,
        combined: bytes | None,
        data: dict[str, Any] | None,
    ) -> None:
        frames: dict[tuple[bool, bool], bytes] = {}
        for c in subs:
            key = (c.combined, c.micro)
            f = frames.get(key)
            if f is None:
                if c.combined and combined is not None:
                    body = combined
                else:
                    if payload is None:
                        payload = orjson.dumps(data)
                    body = b'{"stream":"' + stream.encode() + b'","data":' + payload + b"}" if c.combined else payload
                f = frames[key] = wire.frame(wire.to_micro(body) if c.micro else body)
            c.out.append(f)
        kind = stream.partition("@")[2]
        self._sent[kind] = self._sent.get(kind, 0) + len(subs)

    def _flush_out(self) -> None:
        for c in list(self.conns):
            if c.out:
                data = b"".join(c.out)
                c.out.clear()
                self._send(c, data)
        if self._sent:
            for kind, n in self._sent.items():
                self.metrics.messages.labels(kind).inc(n)
                self._sent_total[kind] = self._sent_total.get(kind, 0) + n
            self._sent.clear()

    def _drop(self, c: Conn, reason: str) -> None:
        if c.closing:
            return
        c.closing = True
        log.info("dropping %s (%s)", c.peer, reason)
        self.metrics.disconnects.labels(reason).inc()
        c.transport.abort()

    async def _close(self, c: Conn, code: int, message: str, reason: str) -> None:
        if c.closing:
            return
        c.closing = True
        log.info("closing %s with %d (%s)", c.peer, code, reason)
        self.metrics.disconnects.labels(reason).inc()
        try:
            await asyncio.wait_for(c.ws.close(code=code, message=message.encode(), drain=False), 5.0)
        except (TimeoutError, ConnectionError):
            c.transport.abort()

    # -- synthetic generation ----------------------------------------------------------------------------

    async def _generate_loop(self) -> None:
        tick = self.config.tick_interval_s
        last = time.monotonic()
        carry = 0.0
        now_ms = time.time_ns() // 1_000_000
        next100 = (now_ms // 100 + 1) * 100
        next1000 = (now_ms // 1000 + 1) * 1000
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            dt, last = now - last, now
            now_ms = time.time_ns() // 1_000_000
            n = 0
            if not self.paused:
                carry += self.rate * dt
                n = int(carry)
                carry -= n
                # A late loop does not replay its whole backlog at once, and no tick may freeze the loop.
                cap = min(int(self.rate * 0.5) + 1, 10_000)
                if n > cap:
                    n, carry = cap, 0.0
            if n:
                self._produce(n, None, now_ms)
            budget = 5_000  # per tick, so a big burst does not freeze the loop (pings, readers)
            while self._bursts and budget > 0:
                count, sym = self._bursts.popleft()
                take = min(count, budget)
                self._produce(take, sym, now_ms)
                budget -= take
                if count > take:
                    self._bursts.appendleft((count - take, sym))
            if now_ms >= next100:
                grid_ms = now_ms // 100 * 100  # E on the grid, events exactly 100 ms apart as on Binance
                for m in self.markets.values():
                    msg = m.flush100(grid_ms)
                    if msg is not None:
                        self._emit(m.stream_prefix + "@depth@100ms", msg)
                        self._last_depth[m.stream_prefix + "@depth@100ms"] = (m.symbol, msg)
                next100 = (now_ms // 100 + 1) * 100
            if now_ms >= next1000:
                grid_ms = now_ms // 1000 * 1000
                for m in self.markets.values():
                    msg = m.flush1000(grid_ms)
                    if msg is not None:
                        self._emit(m.stream_prefix + "@depth", msg)
                        self._last_depth[m.stream_prefix + "@depth"] = (m.symbol, msg)
                next1000 = (now_ms // 1000 + 1) * 1000
            self._flush_out()

    def _produce(self, n: int, symbol: str | None, now_ms: int) -> None:
        if symbol is None:
            picks = self._alloc_rng.choices(self.symbols, cum_weights=self._cum_weights, k=n)
        else:
            picks = [symbol] * n
        trade_ms = now_ms - 1  # E >= T, usually by a millisecond as on the real stream
        subs = self.subs
        markets = self.markets
        for sym in picks:
            m = markets[sym]
            tid, price, qty, maker = m.trade(trade_ms)
            if m.suppress_trades:
                m.suppress_trades -= 1
            else:
                stream = m.stream_prefix + "@trade"
                if stream in subs:
                    self._first_sent.setdefault(sym, tid)
                    self._emit(stream, m.trade_json(tid, price, qty, maker, trade_ms, now_ms))
            ticker_stream = m.stream_prefix + "@bookTicker"
            if ticker_stream in subs:
                msg = m.ticker_json_if_changed()
                if msg is not None:
                    self._emit(ticker_stream, msg)
        self.metrics.trades.inc(n)

    # -- replay --------------------------------------------------------------------------------------------

    async def _replay_loop(self) -> None:
        await self._replay_go.wait()
        lines = self.capture
        speed = self.config.speed
        t0 = time.monotonic()
        base = lines[0].recv_ns if lines else 0
        for i, line in enumerate(lines):
            if not self._resumed.is_set():
                self._flush_out()
                paused_at = time.monotonic()
                await self._resumed.wait()
                t0 += time.monotonic() - paused_at
            if speed > 0:
                delay = t0 + (line.recv_ns - base) / 1e9 / speed - time.monotonic()
                if delay > 0:
                    self._flush_out()
                    await asyncio.sleep(delay)
            elif i % 256 == 0:
                self._flush_out()
                await asyncio.sleep(0)
            self._replay_line(line)
            self.replay_pos = i + 1
        self._flush_out()
        self.replay_done = True
        log.info("replay finished: %d lines", len(lines))

    def _replay_line(self, line: CaptureLine) -> None:
        sym = line.symbol
        data = line.data
        if line.stream is None:
            # Everything before the snapshot line is on the wire before the REST body can be served.
            self._flush_out()
            self._replay_books[sym] = ReplayBook(data)
            self._replay_last_u.setdefault(sym, data["lastUpdateId"])
            self._replay_snap_ready[sym].set()
            return
        kind = line.stream.partition("@")[2]
        if kind == "trade":
            self._replay_hist[sym].append(data["t"], parse8(data["p"]), parse8(data["q"]), data["T"], bool(data["m"]))
            self.metrics.trades.inc()
            if self._replay_skip_trades.get(sym):
                self._replay_skip_trades[sym] -= 1
                return
        elif kind.startswith("depth") and "u" in data:
            book = self._replay_books.get(sym)
            if book is not None:
                book.apply(data)
            self._replay_last_u[sym] = max(self._replay_last_u.get(sym, 0), data["u"])
            skip = self._replay_skip_ids.get(sym, 0)
            if skip > 0:
                self._replay_skip_ids[sym] = max(0, skip - (data["u"] - data["U"] + 1))
                return
        elif kind == "bookTicker":
            self._replay_last_u[sym] = max(self._replay_last_u.get(sym, 0), data["u"])
        self._emit_exact(line.stream, line.text, data)

    # -- housekeeping: pings, pong timeouts, lifetime, end of stall --------------------------------------

    async def _housekeeping_loop(self) -> None:
        cfg = self.config
        interval = max(0.02, min(0.25, cfg.ping_interval_s / 4, cfg.pong_timeout_s / 4, cfg.lifetime_s / 4))
        was_stalled = False
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            stalled = self.stalled
            if was_stalled and not stalled:
                for c in list(self.conns):
                    if c.held:
                        self._send(c, b"")
                    c.last_ping = now
                    c.pings.clear()
            was_stalled = stalled
            for c in list(self.conns):
                if c.closing:
                    continue
                if not stalled:
                    self._check_backlog(c)
                if now - c.opened >= cfg.lifetime_s:
                    # Binance just disconnects at 24 h (no serverShutdown first).
                    self._spawn(self._close(c, 1000, "", "lifetime"))
                    continue
                if stalled:
                    continue
                if c.pings and now - c.pings[0][1] >= cfg.pong_timeout_s:
                    self._spawn(self._close(c, 1008, "Pong timeout", "pong_timeout"))
                    continue
                if now - c.last_ping >= cfg.ping_interval_s:
                    payload = str(time.time_ns() // 1_000_000).encode()
                    c.pings.append((payload, now))
                    c.last_ping = now
                    self._send(c, wire.frame(payload, 0x9))

    # -- WebSocket -----------------------------------------------------------------------------------------

    def _check_connect_rate(self, peer: str) -> bool:
        now = time.monotonic()
        times = self._connect_times.setdefault(peer, deque())
        while times and now - times[0] > 300:
            times.popleft()
        times.append(now)
        return len(times) <= self.config.max_connects_per_5m

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        peer = request.remote or "?"
        if not self._check_connect_rate(peer):
            return web.json_response({"code": -1003, "msg": "Too many connection attempts."}, status=429)
        if request.path.startswith("/stream"):
            combined = True
            names = [s for s in request.query.get("streams", "").split("/") if s]
        else:
            combined = False
            names = [s for s in request.match_info.get("streams", "").split("/") if s]
        time_unit = request.query.get("timeUnit", "millisecond").lower()
        if time_unit not in ("millisecond", "microsecond"):
            return web.json_response({"code": 2, "msg": "Invalid request: invalid timeUnit"}, status=400)
        if any(not wire.valid_stream(s) for s in names):
            return web.json_response({"code": 2, "msg": "Invalid request: invalid stream"}, status=400)
        if len(set(names)) > self.config.max_streams:
            return web.json_response({"code": 2, "msg": "Invalid request: too many streams"}, status=400)
        ws = web.WebSocketResponse(autoping=False, compress=False, max_msg_size=1 << 20)
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None
        c = Conn(ws, transport, combined, peer, time_unit == "microsecond")
        self.conns.add(c)
        self.metrics.connections.set(len(self.conns))
        self.metrics.connects.inc()
        log.info("client %s connected: %s, %d streams", peer, request.path, len(names))
        for name in names:
            self._subscribe(c, name)
        if self.config.mode == "replay" and self.config.replay_autostart:
            self._replay_go.set()
        try:
            await self._serve_conn(c)
        finally:
            self.conns.discard(c)
            for name in list(c.streams):
                self._unsubscribe(c, name)
            self.metrics.connections.set(len(self.conns))
            if not c.closing:
                self.metrics.disconnects.labels("client").inc()
                log.info("client %s disconnected", peer)
                c.closing = True
        return ws

    async def _serve_conn(self, c: Conn) -> None:
        """Read client frames: control messages, pings, pongs; enforce the 5 frames/s limit."""
        async for msg in c.ws:
            if c.closing:
                break
            now = time.monotonic()
            c.recv_times.append(now)
            while now - c.recv_times[0] > 1.0:
                c.recv_times.popleft()
            if len(c.recv_times) > self.config.max_incoming_per_s:
                await self._close(c, 1008, "Too many requests", "rate_limit")
                break
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                self._control(c, msg.data)
            elif msg.type is WSMsgType.PING:
                self._send(c, wire.frame(msg.data, 0xA))
            elif msg.type is WSMsgType.PONG:
                self._pong(c, msg.data)

    def _pong(self, c: Conn, payload: bytes) -> None:
        # Only a pong echoing an outstanding ping counts; unsolicited pongs do not reset the timeout.
        if any(p == payload for p, _ in c.pings):
            while c.pings:
                p, _ = c.pings.popleft()
                if p == payload:
                    break

    def _subscribe(self, c: Conn, name: str) -> None:
        if name in c.streams:
            return
        c.streams[name] = None
        self.subs.setdefault(name, set()).add(c)

    def _unsubscribe(self, c: Conn, name: str) -> None:
        c.streams.pop(name, None)
        subs = self.subs.get(name)
        if subs is not None:
            subs.discard(c)
            if not subs:
                del self.subs[name]

    def _control(self, c: Conn, text: str | bytes) -> None:
        req = wire.parse_request(text)
        if isinstance(req, bytes):
            self._send(c, wire.frame(req))
            return
        reply = self._handle_request(c, req)
        self._send(c, wire.frame(reply))

    def _handle_request(self, c: Conn, req: wire.Request) -> bytes:
        method, params, rid = req.method, req.params, req.id
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if not params or any(not isinstance(p, str) or not wire.valid_stream(p) for p in params):
                return wire.error(2, "Invalid request: invalid stream", rid)
            if method == "SUBSCRIBE":
                if len(set(c.streams) | set(params)) > self.config.max_streams:
                    return wire.error(2, "Invalid request: too many streams", rid)
                for p in params:
                    self._subscribe(c, p)
            else:
                for p in params:
                    self._unsubscribe(c, p)
            return wire.result(None, rid)
        if method == "LIST_SUBSCRIPTIONS":
            if params:
                return wire.error(2, "Invalid request: too many parameters", rid)
            return wire.result(list(c.streams), rid)
        # SET_PROPERTY / GET_PROPERTY
        if not params or not isinstance(params[0], str):
            return wire.error(2, "Invalid request: property name must be a string", rid)
        if params[0] != "combined":
            return wire.error(0, "Unknown property", rid)
        if method == "GET_PROPERTY":
            if len(params) > 1:
                return wire.error(2, "Invalid request: too many parameters", rid)
            return wire.result(c.combined, rid)
        if len(params) != 2:
            return wire.error(2, "Invalid request: too many parameters", rid)
        if not isinstance(params[1], bool):
            return wire.error(1, "Invalid value type: expected Boolean", rid)
        c.combined = params[1]
        return wire.result(None, rid)

    # -- REST ----------------------------------------------------------------------------------------------

    def _rest(
        self, fn: Callable[[web.Request], Coroutine[Any, Any, tuple[Any, int]]], endpoint: str
    ) -> Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            peer = request.remote or "?"
            try:
                body, weight = await fn(request)
                used = self._charge(peer, weight)
                status = 200
                resp = web.Response(body=orjson.dumps(body), content_type="application/json")
            except BinanceErrorReply as exc:
                used = self._charge(peer, 1) if exc.status not in (418, 429) else self._used(peer)
                status = exc.status
                resp = web.Response(
                    body=orjson.dumps({"code": exc.code, "msg": exc.msg}),
                    status=exc.status,
                    content_type="application/json",
                    headers=exc.headers,
                )
            resp.headers["X-MBX-USED-WEIGHT-1M"] = str(used)
            self.metrics.rest.labels(endpoint, str(status)).inc()
            return resp

        return handler

    def _used(self, peer: str) -> int:
        minute = int(time.time() // 60)
        window, used = self._weights.get(peer, (minute, 0))
        return used if window == minute else 0

    def _precheck(self, request: web.Request, weight: int) -> None:
        """429 before doing the work if this request would exceed the per-minute weight."""
        peer = request.remote or "?"
        limit = self.config.rest_weight_limit
        now = time.time()
        banned = self._banned_until.get(peer, 0.0)
        if now < banned:
            raise BinanceErrorReply(
                418,
                -1003,
                f"Way too much request weight used; IP banned until {int(banned * 1000)}. "
                "Please use WebSocket Streams for live updates to avoid bans.",
                {"Retry-After": str(max(1, int(banned - now)))},
            )
        if self._used(peer) + weight > limit:
            minute = int(now // 60)
            window, count = self._rejections.get(peer, (minute, 0))
            count = count + 1 if window == minute else 1
            self._rejections[peer] = (minute, count)
            if count > self.config.rest_429s_before_ban:  # kept hammering after 429s: a 418 ban
                self._banned_until[peer] = now + self.config.rest_ban_s
            retry = 60 - int(now % 60)
            raise BinanceErrorReply(
                429,
                -1003,
                f"Too much request weight used; current limit is {limit} request weight per 1 MINUTE. "
                "Please use WebSocket Streams for live updates to avoid polling the API.",
                {"Retry-After": str(max(1, retry))},
            )

    def _charge(self, peer: str, weight: int) -> int:
        minute = int(time.time() // 60)
        used = self._used(peer) + weight
        self._weights[peer] = (minute, used)
        return used

    def _symbol_param(self, request: web.Request) -> str:
        raw = request.query.get("symbol")
        if not raw:
            raise BinanceErrorReply(
                400, -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."
            )
        sym = raw.upper()
        if sym not in self._symbol_set:
            raise BinanceErrorReply(400, -1121, "Invalid symbol.")
        return sym

    @staticmethod
    def _int_param(request: web.Request, name: str, default: int | None) -> int | None:
        raw = request.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise BinanceErrorReply(400, -1100, f"Illegal characters found in parameter '{name}'.") from None

    async def _depth(self, request: web.Request) -> tuple[Any, int]:
        limit = self._int_param(request, "limit", 100) or 100
        limit = max(1, min(limit, 5000))
        weight = depth_weight(limit)
        self._precheck(request, weight)
        sym = self._symbol_param(request)
        stale = self._stale.get(sym)
        if stale is not None:
            left, snap = stale
            if left <= 1:
                del self._stale[sym]
            else:
                self._stale[sym] = (left - 1, snap)
            return {**snap, "bids": snap["bids"][:limit], "asks": snap["asks"][:limit]}, weight
        if self.config.mode == "synthetic":
            return self.markets[sym].snapshot(limit), weight
        ready = self._replay_snap_ready[sym]
        if not ready.is_set():
            # The capture's snapshot exists only once the replay reached its line (as the real client saw it).
            try:
                await asyncio.wait_for(ready.wait(), 30.0)
            except TimeoutError:
                raise BinanceErrorReply(
                    503, -1001, "Internal error; unable to process your request. Please try again."
                ) from None
        return self._replay_books[sym].snapshot(limit), weight

    def _history(self, sym: str) -> TradeHistory:
        return self.markets[sym].history if self.config.mode == "synthetic" else self._replay_hist[sym]

    def _trade_limit(self, request: web.Request) -> int:
        limit = self._int_param(request, "limit", 500) or 500
        if limit < 1 or limit > 1000:
            raise BinanceErrorReply(400, -1130, "Invalid data sent for a parameter.")
        return limit

    async def _historical(self, request: web.Request) -> tuple[Any, int]:
        self._precheck(request, 25)
        sym = self._symbol_param(request)
        limit = self._trade_limit(request)
        from_id = self._int_param(request, "fromId", None)
        rows = self._history(sym).rows(from_id, limit)
        if _micro(request):
            for r in rows:
                r["time"] *= 1000
        return rows, 25

    async def _recent(self, request: web.Request) -> tuple[Any, int]:
        self._precheck(request, 25)
        sym = self._symbol_param(request)
        rows = self._history(sym).rows(None, self._trade_limit(request))
        if _micro(request):
            for r in rows:
                r["time"] *= 1000
        return rows, 25

    async def _agg(self, request: web.Request) -> tuple[Any, int]:
        """One aggregate per trade (`a` = `f` = `l` = trade ID): simple and gap-free."""
        self._precheck(request, 4)
        sym = self._symbol_param(request)
        rows = self._history(sym).rows(self._int_param(request, "fromId", None), self._trade_limit(request))
        micro = _micro(request)
        return [
            {
                "a": r["id"],
                "p": r["price"],
                "q": r["qty"],
                "f": r["id"],
                "l": r["id"],
                "T": r["time"] * 1000 if micro else r["time"],
                "m": r["isBuyerMaker"],
                "M": True,
            }
            for r in rows
        ], 4

    async def _ping(self, request: web.Request) -> tuple[Any, int]:
        self._precheck(request, 1)
        return {}, 1

    async def _time(self, request: web.Request) -> tuple[Any, int]:
        self._precheck(request, 1)
        return {"serverTime": time.time_ns() // (1000 if _micro(request) else 1_000_000)}, 1

    async def _exchange_info(self, request: web.Request) -> tuple[Any, int]:
        self._precheck(request, 20)
        return {
            "timezone": "UTC",
            "serverTime": time.time_ns() // 1_000_000,
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
            ],
            "symbols": [
                {"symbol": s, "status": "TRADING", "baseAsset": s[:-4], "quoteAsset": s[-4:]} for s in self.symbols
            ],
        }, 20

    # -- control plane over HTTP -----------------------------------------------------------------------------

    async def _http_fault(self, request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=orjson.loads)
            action = body.get("action")
            symbol = body.get("symbol")
            count = body.get("count")
            seconds = body.get("seconds")
            result: Any = None
            if action == "drop_connections":
                result = self.drop_connections()
            elif action == "server_shutdown":
                result = self.server_shutdown()
            elif action == "skip_update_ids":
                self.skip_update_ids(str(symbol), int(count or 1))
            elif action == "skip_trade_ids":
                self.skip_trade_ids(str(symbol), int(count or 1))
            elif action == "stall":
                self.stall(float(seconds or 1.0))
            elif action == "slow_consumer":
                self.slow_consumer(None if count is None else int(count), None if seconds is None else float(seconds))
            elif action == "burst":
                self.burst(int(count or 1000), None if symbol is None else str(symbol))
            elif action == "stale_snapshot":
                self.stale_snapshot(str(symbol), int(count or 1))
            elif action == "big_diff":
                self.big_diff(str(symbol), int(count or 1000))
            elif action == "duplicate_depth":
                self.duplicate_depth(str(symbol))
            elif action == "duplicate_trades":
                self.duplicate_trades(str(symbol), int(count or 1))
            elif action == "pause":
                self.pause()
            elif action == "resume":
                self.resume()
            else:
                raise ValueError(f"unknown action {action!r}; expected one of {', '.join(FAULT_ACTIONS)}")
        except (ValueError, TypeError, AttributeError) as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=400)
        return web.json_response({"ok": True, "result": result})

    async def _http_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

    async def _http_rate(self, request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=orjson.loads)
            rate = float(body["rate"])
            if not math.isfinite(rate) or rate < 0:
                raise ValueError("rate must be >= 0")
        except (ValueError, TypeError, KeyError) as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=400)
        self.set_rate(rate)
        return web.json_response({"ok": True, "rate": self.rate})
