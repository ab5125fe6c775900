"""The simulator's WebSocket side: connections, subscriptions, Binance's control protocol and the send path.

Data frames are encoded once per wire form and written straight to each connection's transport, one
WebSocket message per event but one `transport.write` per connection per generation tick. A slow client
therefore never blocks the generator: its unsent bytes grow until the slow-consumer policy drops it, which
is what Binance does to clients that do not keep up. A stall holds every frame (data, replies, pings) and
sends the backlog in order when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from tickbridge_dev.sim import wire
from tickbridge_dev.sim.config import SimConfig
from tickbridge_dev.sim.metrics import SimMetrics

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], None]


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


class Hub:
    """Every open connection and its subscriptions; events go out through `emit` + `flush`.

    `on_connect` runs for each accepted connection (replay mode starts on the first one); `spawn` runs a
    background task that the owner cancels on stop."""

    def __init__(self, config: SimConfig, metrics: SimMetrics, spawn: Spawn, on_connect: Callable[[], None]) -> None:
        self.config = config
        self.metrics = metrics
        self._spawn = spawn
        self._on_connect = on_connect
        self.conns: set[Conn] = set()
        self.subs: dict[str, set[Conn]] = {}
        self.max_send_buffer = config.max_send_buffer_bytes
        self.slow_grace = config.slow_consumer_grace_s
        self.stall_until = 0.0
        self._sent: dict[str, int] = {}  # this tick, per stream kind
        self.sent_total: dict[str, int] = {}
        self._connect_times: dict[str, deque[float]] = {}

    # -- sending -------------------------------------------------------------------------------------------

    @property
    def stalled(self) -> bool:
        return time.monotonic() < self.stall_until

    def send(self, c: Conn, data: bytes) -> None:
        """Send (or hold while stalled) one pre-framed message."""
        if c.closing or c.transport.is_closing():
            return
        if self.stalled:
            c.held.append(data)
            c.held_bytes += len(data)
            if c.held_bytes > self.config.max_send_buffer_bytes:  # bound our own memory during a long stall
                self.drop(c, "stall_backlog")
            return
        if c.held:  # end of a stall: the backlog goes first, in order
            held, c.held, c.held_bytes = c.held, [], 0
            c.transport.write(b"".join(held))
        c.transport.write(data)
        self.check_backlog(c)

    def check_backlog(self, c: Conn) -> None:
        """Slow-consumer policy: drop a connection whose unsent bytes stay over budget past the grace time."""
        now = time.monotonic()
        if c.transport.get_write_buffer_size() <= self.max_send_buffer:
            c.caught_up = now
        elif now - c.caught_up > self.slow_grace:
            self.drop(c, "slow_consumer")

    def emit(self, stream: str, data: str) -> None:
        """Queue one event for every subscriber of `stream` (framed once per wire form)."""
        subs = self.subs.get(stream)
        if subs:
            self._fanout(stream, subs, data.encode(), None, None)

    def emit_exact(self, stream: str, combined_text: bytes, data: dict[str, Any]) -> None:
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

    def flush(self) -> None:
        """Write what `emit` queued, one write per connection, and count it."""
        for c in list(self.conns):
            if c.out:
                data = b"".join(c.out)
                c.out.clear()
                self.send(c, data)
        if self._sent:
            for kind, n in self._sent.items():
                self.metrics.messages.labels(kind).inc(n)
                self.sent_total[kind] = self.sent_total.get(kind, 0) + n
            self._sent.clear()

    def broadcast_event(self, stream: str, event: bytes) -> list[Conn]:
        """Send one event to every open connection (bare or in the combined wrapper); returns those reached."""
        conns = [c for c in self.conns if not c.closing]
        for c in conns:
            body = b'{"stream":"' + stream.encode() + b'","data":' + event + b"}" if c.combined else event
            self.send(c, wire.frame(wire.to_micro(body) if c.micro else body))
        return conns

    def drop(self, c: Conn, reason: str) -> None:
        """Abort the connection (no close frame: the client sees 1006)."""
        if c.closing:
            return
        c.closing = True
        log.info("dropping %s (%s)", c.peer, reason)
        self.metrics.disconnects.labels(reason).inc()
        c.transport.abort()

    async def close(self, c: Conn, code: int, message: str, reason: str) -> None:
        """Close with a close frame (`code`, `message`)."""
        if c.closing:
            return
        c.closing = True
        log.info("closing %s with %d (%s)", c.peer, code, reason)
        self.metrics.disconnects.labels(reason).inc()
        try:
            await asyncio.wait_for(c.ws.close(code=code, message=message.encode(), drain=False), 5.0)
        except (TimeoutError, ConnectionError):
            c.transport.abort()

    def abort_all(self) -> None:
        for c in list(self.conns):
            c.transport.abort()

    # -- housekeeping: pings, pong timeouts, lifetime, end of stall --------------------------------------

    async def housekeeping_loop(self) -> None:
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
                        self.send(c, b"")
                    c.last_ping = now
                    c.pings.clear()
            was_stalled = stalled
            for c in list(self.conns):
                if c.closing:
                    continue
                if not stalled:
                    self.check_backlog(c)
                if now - c.opened >= cfg.lifetime_s:
                    # Binance just disconnects at 24 h (no serverShutdown first).
                    self._spawn(self.close(c, 1000, "", "lifetime"))
                    continue
                if stalled:
                    continue
                if c.pings and now - c.pings[0][1] >= cfg.pong_timeout_s:
                    self._spawn(self.close(c, 1008, "Pong timeout", "pong_timeout"))
                    continue
                if now - c.last_ping >= cfg.ping_interval_s:
                    payload = str(time.time_ns() // 1_000_000).encode()
                    c.pings.append((payload, now))
                    c.last_ping = now
                    self.send(c, wire.frame(payload, 0x9))

    # -- WebSocket handshake and client frames -------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/ws", self.ws_handler)
        app.router.add_get("/ws/{streams:.+}", self.ws_handler)
        app.router.add_get("/stream", self.ws_handler)

    def _check_connect_rate(self, peer: str) -> bool:
        now = time.monotonic()
        times = self._connect_times.setdefault(peer, deque())
        while times and now - times[0] > 300:
            times.popleft()
        times.append(now)
        return len(times) <= self.config.max_connects_per_5m

    async def ws_handler(self, request: web.Request) -> web.StreamResponse:
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
        self._on_connect()
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
                await self.close(c, 1008, "Too many requests", "rate_limit")
                break
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                self._control(c, msg.data)
            elif msg.type is WSMsgType.PING:
                self.send(c, wire.frame(msg.data, 0xA))
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
            self.send(c, wire.frame(req))
            return
        reply = self._handle_request(c, req)
        self.send(c, wire.frame(reply))

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
