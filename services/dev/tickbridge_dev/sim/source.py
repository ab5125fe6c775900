"""Where the simulator's market comes from: one `MarketSource` per mode (synthetic generator or capture
replay), so every mode-specific answer (history, snapshot, book, faults on IDs) is one method instead of an
`if mode == ...` at each use."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any

from tickbridge_dev.sim.config import SimConfig
from tickbridge_dev.sim.market import TradeHistory
from tickbridge_dev.sim.metrics import SimMetrics
from tickbridge_dev.sim.session import Hub


class MarketSource(ABC):
    """Produces the events the hub sends, and answers what REST and the faults ask about the market."""

    def __init__(self, config: SimConfig, hub: Hub, metrics: SimMetrics, symbols: tuple[str, ...]) -> None:
        self.config = config
        self.hub = hub
        self.metrics = metrics
        self.symbols = symbols
        self._symbol_set = frozenset(symbols)
        self.rate = float(config.rate)
        self.paused = False
        #: Set while not paused: the replay waits on it; the generator reads `paused`.
        self.resumed = asyncio.Event()
        self.resumed.set()
        #: Last diff-depth event per stream, (symbol, payload), for the `duplicate_depth` fault.
        self.last_depth: dict[str, tuple[str, str]] = {}

    def known(self, symbol: str) -> str:
        """`symbol` in upper case; ValueError if the market has no such symbol."""
        sym = symbol.upper()
        if sym not in self._symbol_set:
            raise ValueError(f"unknown symbol {symbol!r}")
        return sym

    def pause(self) -> None:
        self.paused = True
        self.resumed.clear()

    def resume(self) -> None:
        self.paused = False
        self.resumed.set()

    @abstractmethod
    def on_connect(self) -> None:
        """A client connected (the replay may start on it)."""

    @abstractmethod
    async def run(self) -> None:
        """Produce events until cancelled."""

    @abstractmethod
    def history(self, symbol: str) -> TradeHistory:
        """The trades REST back-fill serves."""

    @abstractmethod
    async def snapshot(self, symbol: str, limit: int) -> dict[str, Any]:
        """The REST depth snapshot (may wait until the market has one)."""

    @abstractmethod
    def snapshot_now(self, symbol: str, limit: int) -> dict[str, Any]:
        """The snapshot at this instant; ValueError if there is none yet."""

    @abstractmethod
    def book(self, symbol: str) -> tuple[dict[int, int], dict[int, int], int]:
        """Bids, asks (1e-8 units) and the book's update ID."""

    @abstractmethod
    def last_update_id(self, symbol: str) -> int:
        """The symbol's latest depth update ID."""

    @abstractmethod
    def first_sent_trade_id(self, symbol: str) -> int | None:
        """The first trade ID a client could have received."""

    @abstractmethod
    def skip_update_ids(self, symbol: str, n: int) -> None:
        """Lose pending depth and jump the update ID (the client sees a gap)."""

    @abstractmethod
    def skip_trade_ids(self, symbol: str, n: int) -> None:
        """Do not send the next `n` trades (they stay in back-fill)."""

    def burst(self, n_trades: int, symbol: str | None) -> None:
        """`n_trades` extra trades at once (synthetic mode only)."""
        raise ValueError("burst needs synthetic mode")

    def big_diff(self, symbol: str, n: int) -> None:
        """A ~n-level diff in the next depth window (synthetic mode only)."""
        raise ValueError("big_diff needs synthetic mode")

    def stats_extra(self) -> dict[str, Any]:
        """Mode-specific entries of `SimServer.stats()`."""
        return {}
