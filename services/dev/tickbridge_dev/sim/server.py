"""`SimServer`: a Binance-compatible exchange (WebSocket streams + REST) on one aiohttp port.

The parts, one concern per module: `session` (connections, subscriptions, the control protocol and the
send path with its stall and slow-consumer policies), `rest` (the `/api/v3` endpoints and request
weights), `synthetic` / `replay` (the market source of each mode), `faults` (fault injection). This
module wires them together and owns the lifecycle, the stats and the `/_sim` control plane.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from tickbridge_dev.sim.app import SimApp
from tickbridge_dev.sim.config import SimConfig
from tickbridge_dev.sim.faults import FaultInjection
from tickbridge_dev.sim.market import SymbolMarket
from tickbridge_dev.sim.metrics import SimMetrics
from tickbridge_dev.sim.replay import ReplaySource
from tickbridge_dev.sim.rest import RestApi
from tickbridge_dev.sim.session import Hub
from tickbridge_dev.sim.source import MarketSource
from tickbridge_dev.sim.synthetic import SyntheticSource

log = logging.getLogger(__name__)


class SimServer(FaultInjection, SimApp):
    """The simulator; see the package docstring for the in-process API."""

    def __init__(self, config: SimConfig, registry: CollectorRegistry | None = None) -> None:
        SimApp.__init__(self, config)
        self.metrics = SimMetrics(registry if registry is not None else CollectorRegistry())
        self._faults: dict[str, int] = {}
        self.hub = Hub(config, self.metrics, self._spawn, self._on_connect)
        self.source: MarketSource
        if config.mode == "synthetic":
            self.source = SyntheticSource(config, self.hub, self.metrics)
        elif config.mode == "replay":
            self.source = ReplaySource(config, self.hub, self.metrics)
        else:
            raise ValueError(f"unknown mode {config.mode!r}")
        self.rest = RestApi(config, self.metrics, self.source)

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def ws_url(self) -> str:
        return f"ws://{self.config.host}:{self._port}"

    async def start(self) -> None:
        """Listen and start generating (synthetic) or wait for the first client (replay)."""
        app = web.Application()
        self.hub.add_routes(app)
        self.rest.add_routes(app)
        app.router.add_post("/_sim/fault", self.http_fault)
        await self.serve(app, self.source.run(), self.hub.housekeeping_loop())
        log.info("sim (%s) listening on %s", self.config.mode, self.rest_url)

    async def stop(self) -> None:
        """Close every connection and the listener."""
        await self.shutdown(self.hub.abort_all)

    def _on_connect(self) -> None:
        self.source.on_connect()

    # -- state the tests and tools read ----------------------------------------------------------------------

    @property
    def symbols(self) -> tuple[str, ...]:
        return self.source.symbols

    @property
    def rate(self) -> float:
        return self.source.rate

    @property
    def paused(self) -> bool:
        return self.source.paused

    @property
    def stalled(self) -> bool:
        return self.hub.stalled

    @property
    def markets(self) -> dict[str, SymbolMarket]:
        """The synthetic markets (empty in replay mode)."""
        return self.source.markets if isinstance(self.source, SyntheticSource) else {}

    @property
    def replay_done(self) -> bool:
        return isinstance(self.source, ReplaySource) and self.source.done

    def set_rate(self, rate: float) -> None:
        self.source.rate = max(0.0, float(rate))

    def start_replay(self) -> None:
        """Start the replay now (otherwise it starts when the first client connects)."""
        if isinstance(self.source, ReplaySource):
            self.source.start()

    def stats(self) -> dict[str, Any]:
        """Per-symbol trade/update-ID ranges (what was generated), totals and connections."""
        source = self.source
        per: dict[str, dict[str, Any]] = {}
        for sym in source.symbols:
            hist = source.history(sym)
            per[sym] = {
                "first_trade_id": hist.first_id,
                "first_sent_trade_id": source.first_sent_trade_id(sym),
                "last_trade_id": hist.last_id,
                "trades": hist.count,
                "last_update_id": source.last_update_id(sym),
            }
        return {
            "mode": self.config.mode,
            "symbols": per,
            "totals": {
                "trades": sum(p["trades"] for p in per.values()),
                "messages_sent": dict(self.hub.sent_total),
                "faults": dict(self._faults),
            },
            "connections": len(self.hub.conns),
            "paused": source.paused,
            "rate": source.rate,
            **source.stats_extra(),
        }

    def book(self, symbol: str) -> tuple[dict[int, int], dict[int, int], int]:
        """Internal book (bids, asks in 1e-8 units) and its update ID: the oracle for snapshot tests."""
        return self.source.book(self.source.known(symbol))
