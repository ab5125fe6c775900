"""Replay of real captures (`<recv_ns> <json>` per line, gzip; see data/binance/README.md): the
capture format, the book it rolls forward, and `ReplaySource`, which paces the lines out to the clients."""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tickbridge_dev.sim.config import SimConfig
from tickbridge_dev.sim.market import TradeHistory, fmt8, parse8
from tickbridge_dev.sim.metrics import SimMetrics
from tickbridge_dev.sim.session import Hub
from tickbridge_dev.sim.source import MarketSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureLine:
    """One captured message: a WebSocket event (`stream` set) or the REST snapshot (`stream` None)."""

    recv_ns: int
    stream: str | None
    symbol: str
    text: bytes  # the line's JSON exactly as captured (combined wrapper for WebSocket lines)
    data: dict[str, Any]


def load_capture(paths: tuple[Path | str, ...]) -> list[CaptureLine]:
    """All lines of the files in order; the snapshot line gets the symbol of the depth events around it."""
    out: list[CaptureLine] = []
    last_symbol = ""
    pending_snapshots: list[int] = []
    for path in paths:
        with gzip.open(path, "rb") as fh:
            for raw in fh:
                raw = raw.rstrip(b"\r\n")
                if not raw:
                    continue
                ns, _, text = raw.partition(b" ")
                obj = orjson.loads(text)
                stream = obj.get("stream")
                if stream is None:
                    pending_snapshots.append(len(out))
                    out.append(CaptureLine(int(ns), None, last_symbol, text, obj))
                    continue
                symbol = stream.partition("@")[0].upper()
                if not last_symbol:
                    for idx in pending_snapshots:
                        out[idx] = CaptureLine(out[idx].recv_ns, None, symbol, out[idx].text, out[idx].data)
                pending_snapshots.clear()
                last_symbol = symbol
                out.append(CaptureLine(int(ns), stream, symbol, text, obj["data"]))
    return out


class ReplayBook:
    """The capture's snapshot rolled forward with the replayed diffs, so later snapshots stay consistent."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.last_update_id: int = snapshot["lastUpdateId"]
        self.bids = {parse8(p): parse8(q) for p, q in snapshot["bids"]}
        self.asks = {parse8(p): parse8(q) for p, q in snapshot["asks"]}

    def apply(self, event: dict[str, Any]) -> None:
        if event["u"] <= self.last_update_id:
            return
        for side, levels in ((self.bids, event["b"]), (self.asks, event["a"])):
            for p, q in levels:
                price, qty = parse8(p), parse8(q)
                if qty:
                    side[price] = qty
                else:
                    side.pop(price, None)
        self.last_update_id = event["u"]

    def snapshot(self, limit: int) -> dict[str, Any]:
        bids = sorted(self.bids, reverse=True)[:limit]
        asks = sorted(self.asks)[:limit]
        return {
            "lastUpdateId": self.last_update_id,
            "bids": [[fmt8(p), fmt8(self.bids[p])] for p in bids],
            "asks": [[fmt8(p), fmt8(self.asks[p])] for p in asks],
        }


class ReplaySource(MarketSource):
    """Replay mode: the capture's lines at their recorded pace (times `speed`), from the first client on
    (`replay_autostart`) or `start()`; combined clients get the captured bytes verbatim."""

    def __init__(self, config: SimConfig, hub: Hub, metrics: SimMetrics) -> None:
        if not config.replay_files:
            raise ValueError("replay mode needs replay_files")
        capture = load_capture(config.replay_files)
        super().__init__(config, hub, metrics, tuple(dict.fromkeys(line.symbol for line in capture if line.symbol)))
        self.capture = capture
        self.position = 0
        self.done = False
        self._go = asyncio.Event()
        self._books: dict[str, ReplayBook] = {}
        self._snap_ready = {sym: asyncio.Event() for sym in self.symbols}
        self._hist = {sym: TradeHistory(config.history_per_symbol) for sym in self.symbols}
        self._last_u: dict[str, int] = {}
        self._skip_ids: dict[str, int] = {}
        self._skip_trades: dict[str, int] = {}
        #: Pause before the line of this index (checkpoint tests: the replay stops at a known line).
        self.pause_before: int | None = None

    def start(self) -> None:
        """Start the replay now (otherwise it starts when the first client connects)."""
        self._go.set()

    def on_connect(self) -> None:
        if self.config.replay_autostart:
            self._go.set()

    # -- what REST and the faults ask ----------------------------------------------------------------------

    def history(self, symbol: str) -> TradeHistory:
        return self._hist[symbol]

    async def snapshot(self, symbol: str, limit: int) -> dict[str, Any]:
        """The capture's snapshot exists only once the replay reached its line (as the real client saw it);
        TimeoutError after 30 s without it."""
        ready = self._snap_ready[symbol]
        if not ready.is_set():
            await asyncio.wait_for(ready.wait(), 30.0)
        return self._books[symbol].snapshot(limit)

    def snapshot_now(self, symbol: str, limit: int) -> dict[str, Any]:
        book = self._books.get(symbol)
        if book is None:
            raise ValueError("the replay has not reached its snapshot yet")
        return book.snapshot(limit)

    def book(self, symbol: str) -> tuple[dict[int, int], dict[int, int], int]:
        rb = self._books[symbol]
        return dict(rb.bids), dict(rb.asks), rb.last_update_id

    def last_update_id(self, symbol: str) -> int:
        return self._last_u.get(symbol, 0)

    def first_sent_trade_id(self, symbol: str) -> int | None:
        return self._hist[symbol].first_id

    def skip_update_ids(self, symbol: str, n: int) -> None:
        self._skip_ids[symbol] = self._skip_ids.get(symbol, 0) + max(1, n)

    def skip_trade_ids(self, symbol: str, n: int) -> None:
        self._skip_trades[symbol] = self._skip_trades.get(symbol, 0) + n

    def stats_extra(self) -> dict[str, Any]:
        return {"replay": {"position": self.position, "total": len(self.capture), "done": self.done}}

    # -- pacing --------------------------------------------------------------------------------------------

    async def run(self) -> None:
        await self._go.wait()
        hub = self.hub
        lines = self.capture
        speed = self.config.speed
        t0 = time.monotonic()
        base = lines[0].recv_ns if lines else 0
        for i, line in enumerate(lines):
            if self.pause_before is not None and i >= self.pause_before:
                self.pause_before = None
                self.pause()
            if not self.resumed.is_set():
                hub.flush()
                paused_at = time.monotonic()
                await self.resumed.wait()
                t0 += time.monotonic() - paused_at
            if speed > 0:
                delay = t0 + (line.recv_ns - base) / 1e9 / speed - time.monotonic()
                if delay > 0:
                    hub.flush()
                    await asyncio.sleep(delay)
            elif i % 256 == 0:
                hub.flush()
                await asyncio.sleep(0)
            self._replay_line(line)
            self.position = i + 1
        hub.flush()
        self.done = True
        log.info("replay finished: %d lines", len(lines))

    def _replay_line(self, line: CaptureLine) -> None:
        sym = line.symbol
        data = line.data
        if line.stream is None:
            # Everything before the snapshot line is on the wire before the REST body can be served.
            self.hub.flush()
            self._books[sym] = ReplayBook(data)
            self._last_u.setdefault(sym, data["lastUpdateId"])
            self._snap_ready[sym].set()
            return
        kind = line.stream.partition("@")[2]
        if kind == "trade":
            self._hist[sym].append(data["t"], parse8(data["p"]), parse8(data["q"]), data["T"], bool(data["m"]))
            self.metrics.trades.inc()
            if self._skip_trades.get(sym):
                self._skip_trades[sym] -= 1
                return
        elif kind.startswith("depth") and "u" in data:
            book = self._books.get(sym)
            if book is not None:
                book.apply(data)
            self._last_u[sym] = max(self._last_u.get(sym, 0), data["u"])
            skip = self._skip_ids.get(sym, 0)
            if skip > 0:
                self._skip_ids[sym] = max(0, skip - (data["u"] - data["U"] + 1))
                return
        elif kind == "bookTicker":
            self._last_u[sym] = max(self._last_u.get(sym, 0), data["u"])
        self.hub.emit_exact(line.stream, line.text, data)
