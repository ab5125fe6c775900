"""Helpers for tests and load runs: a reference local order book (Binance's procedure) and a running sim."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CollectorRegistry

from tickbridge_dev.sim.config import SimConfig
from tickbridge_dev.sim.market import parse8
from tickbridge_dev.sim.server import SimServer


@asynccontextmanager
async def running_sim(config: SimConfig, registry: CollectorRegistry | None = None) -> AsyncIterator[SimServer]:
    """Start a `SimServer`, yield it, always stop it."""
    sim = SimServer(config, registry)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


class LocalBook:
    """Binance's local order-book procedure (reference §4), strict: any `U > id + 1` is a gap."""

    def __init__(self) -> None:
        self.buffer: list[dict[str, Any]] = []
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        self.update_id: int | None = None
        self.gaps = 0
        self.applied = 0

    @property
    def synced(self) -> bool:
        return self.update_id is not None

    def on_event(self, ev: dict[str, Any]) -> None:
        """Feed a depthUpdate payload; buffers until `sync()`, then applies or flags a gap (and unsyncs)."""
        if self.update_id is None:
            self.buffer.append(ev)
            return
        if ev["u"] <= self.update_id:
            return
        if ev["U"] > self.update_id + 1:
            self.gaps += 1
            self.update_id = None
            self.buffer = [ev]
            return
        self._apply(ev)

    def sync(self, snapshot: dict[str, Any]) -> bool:
        """Apply a snapshot plus buffered events; False if the snapshot is too old or does not connect."""
        lid = snapshot["lastUpdateId"]
        if self.buffer and lid < self.buffer[0]["U"]:
            return False
        remaining = [ev for ev in self.buffer if ev["u"] > lid]
        if remaining and not remaining[0]["U"] <= lid + 1 <= remaining[0]["u"]:
            return False
        self.bids = {parse8(p): parse8(q) for p, q in snapshot["bids"]}
        self.asks = {parse8(p): parse8(q) for p, q in snapshot["asks"]}
        self.update_id = lid
        self.buffer = []
        for ev in remaining:
            self.on_event(ev)
        return True

    def _apply(self, ev: dict[str, Any]) -> None:
        for side, levels in ((self.bids, ev["b"]), (self.asks, ev["a"])):
            for p, q in levels:
                price, qty = parse8(p), parse8(q)
                if qty:
                    side[price] = qty
                else:
                    side.pop(price, None)
        self.update_id = ev["u"]
        self.applied += 1
