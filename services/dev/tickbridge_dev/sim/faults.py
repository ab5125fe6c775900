"""Fault injection: the `SimServer` methods tests call in-process, and `POST /_sim/fault` for other
processes (`{"action", "symbol", "count", "seconds"}`), one table entry per action."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from tickbridge_dev.sim.config import SimConfig
from tickbridge_dev.sim.metrics import SimMetrics
from tickbridge_dev.sim.rest import RestApi, StaleSnapshot
from tickbridge_dev.sim.session import Hub, Spawn
from tickbridge_dev.sim.source import MarketSource

log = logging.getLogger(__name__)


class FaultInjection:
    """The fault methods of `SimServer` (a mixin: they act on its hub, source and REST API)."""

    config: SimConfig
    metrics: SimMetrics
    hub: Hub
    source: MarketSource
    rest: RestApi
    _spawn: Spawn
    _faults: dict[str, int]

    def _fault(self, action: str) -> None:
        log.info("fault injected: %s", action)
        self._faults[action] = self._faults.get(action, 0) + 1
        self.metrics.faults.labels(action).inc()

    def drop_connections(self) -> int:
        """Abort every client connection (no close frame: the client sees 1006). Returns how many."""
        self._fault("drop_connections")
        conns = list(self.hub.conns)
        for c in conns:
            self.hub.drop(c, "drop")
        return len(conns)

    def server_shutdown(self) -> int:
        """Send `serverShutdown` to every client, then close them after `shutdown_grace_s`."""
        self._fault("server_shutdown")
        event = orjson.dumps({"e": "serverShutdown", "E": time.time_ns() // 1_000_000})
        conns = self.hub.broadcast_event("!serverShutdown", event)

        async def close_later() -> None:
            await asyncio.sleep(self.config.shutdown_grace_s)
            for c in conns:
                await self.hub.close(c, 1001, "server shutdown", "shutdown")

        self._spawn(close_later())
        return len(conns)

    def skip_update_ids(self, symbol: str, n: int = 1) -> None:
        """Lose the symbol's pending diff and jump its update ID by `n`: the next depth event shows a gap."""
        self._fault("skip_update_ids")
        self.source.skip_update_ids(self.source.known(symbol), n)

    def skip_trade_ids(self, symbol: str, n: int = 1) -> None:
        """The next `n` trades of `symbol` are not sent on the WebSocket but stay in REST back-fill."""
        self._fault("skip_trade_ids")
        self.source.skip_trade_ids(self.source.known(symbol), n)

    def stall(self, seconds: float) -> None:
        """Send nothing (data, replies, pings) for `seconds`; connections stay open and get the backlog after."""
        self._fault("stall")
        self.hub.stall_until = max(self.hub.stall_until, time.monotonic() + seconds)

    def slow_consumer(self, max_buffer_bytes: int | None = 65536, grace_s: float | None = 0.5) -> None:
        """Tighten the slow-client policy (Binance disconnects clients that do not keep up): a connection
        whose unsent bytes stay above `max_buffer_bytes` for `grace_s` is dropped. `None` = configured value."""
        self._fault("slow_consumer")
        hub = self.hub
        hub.max_send_buffer = self.config.max_send_buffer_bytes if max_buffer_bytes is None else max_buffer_bytes
        hub.slow_grace = self.config.slow_consumer_grace_s if grace_s is None else grace_s

    def stale_snapshot(self, symbol: str, n: int = 1) -> None:
        """The next `n` depth snapshots of `symbol` are frozen now: a client that starts buffering later
        gets `lastUpdateId` < its first buffered `U` and must fetch again (procedure step 4)."""
        self._fault("stale_snapshot")
        sym = self.source.known(symbol)
        self.rest.stale[sym] = StaleSnapshot(n, self.source.snapshot_now(sym, 5000))

    def big_diff(self, symbol: str, n: int = 1000) -> None:
        """Next depth window of `symbol` carries ~n levels, mostly removals of never-seen prices, plus one
        level with the capped quantity (synthetic mode)."""
        self._fault("big_diff")
        self.source.big_diff(symbol, n)

    def duplicate_depth(self, symbol: str) -> None:
        """Send the symbol's last diff-depth events again (`u` <= the client's book ID: it must ignore them)."""
        self._fault("duplicate_depth")
        sym = self.source.known(symbol)
        for stream, (s, payload) in list(self.source.last_depth.items()):
            if s == sym:
                self.hub.emit(stream, payload)
        self.hub.flush()

    def duplicate_trades(self, symbol: str, n: int = 1) -> None:
        """Send the last `n` trades of `symbol` again on its trade stream (the client must drop them)."""
        self._fault("duplicate_trades")
        sym = self.source.known(symbol)
        stream = sym.lower() + "@trade"
        now_ms = time.time_ns() // 1_000_000
        for r in self.source.history(sym).rows(None, n):
            self.hub.emit(
                stream,
                f'{{"e":"trade","E":{max(now_ms, r["time"])},"s":"{sym}","t":{r["id"]},"p":"{r["price"]}",'
                f'"q":"{r["qty"]}","T":{r["time"]},"m":{"true" if r["isBuyerMaker"] else "false"},"M":true}}',
            )
        self.hub.flush()

    def burst(self, n_trades: int, symbol: str | None = None) -> None:
        """Emit `n_trades` extra trades at once (over the weighted symbols, or one symbol; synthetic mode)."""
        self._fault("burst")
        self.source.burst(n_trades, symbol)

    def pause(self) -> None:
        """Stop generating new events (pending depth windows are still flushed)."""
        self._fault("pause")
        self.source.pause()

    def resume(self) -> None:
        self._fault("resume")
        self.source.resume()

    async def http_fault(self, request: web.Request) -> web.Response:
        """`POST /_sim/fault`: 400 with the reason for an unknown action or bad arguments."""
        try:
            body = await request.json(loads=orjson.loads)
            action = body.get("action")
            fault = HTTP_FAULTS.get(action)
            if fault is None:
                raise ValueError(f"unknown action {action!r}; expected one of {', '.join(FAULT_ACTIONS)}")
            result = fault(self, body.get("symbol"), body.get("count"), body.get("seconds"))
        except (ValueError, TypeError, AttributeError) as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=400)
        return web.json_response({"ok": True, "result": result})


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


#: action -> call(server, symbol, count, seconds), with the HTTP API's defaults.
HTTP_FAULTS: dict[str, Callable[[FaultInjection, Any, Any, Any], Any]] = {
    "drop_connections": lambda s, sym, count, sec: s.drop_connections(),
    "server_shutdown": lambda s, sym, count, sec: s.server_shutdown(),
    "skip_update_ids": lambda s, sym, count, sec: s.skip_update_ids(str(sym), int(count or 1)),
    "skip_trade_ids": lambda s, sym, count, sec: s.skip_trade_ids(str(sym), int(count or 1)),
    "stall": lambda s, sym, count, sec: s.stall(float(sec or 1.0)),
    "slow_consumer": lambda s, sym, count, sec: s.slow_consumer(_opt_int(count), _opt_float(sec)),
    "burst": lambda s, sym, count, sec: s.burst(int(count or 1000), None if sym is None else str(sym)),
    "pause": lambda s, sym, count, sec: s.pause(),
    "resume": lambda s, sym, count, sec: s.resume(),
    "stale_snapshot": lambda s, sym, count, sec: s.stale_snapshot(str(sym), int(count or 1)),
    "duplicate_trades": lambda s, sym, count, sec: s.duplicate_trades(str(sym), int(count or 1)),
    "big_diff": lambda s, sym, count, sec: s.big_diff(str(sym), int(count or 1000)),
    "duplicate_depth": lambda s, sym, count, sec: s.duplicate_depth(str(sym)),
}
FAULT_ACTIONS = tuple(HTTP_FAULTS)
