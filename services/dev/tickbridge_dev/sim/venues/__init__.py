"""Coinbase and Kraken beside the Binance simulator (issue 18): each a `VenueServer` on its own port speaking the
venue's WebSocket and the REST endpoints the collector's adapters use, driven by the same synthetic market model.
See README.md beside this file."""

from __future__ import annotations

from tickbridge.collector.venues.base import COINBASE, KRAKEN
from tickbridge_dev.sim.venues.coinbase import CoinbaseSim
from tickbridge_dev.sim.venues.common import VenueServer
from tickbridge_dev.sim.venues.kraken import KrakenSim

#: `exchange` -> the simulator class of that venue (Binance is `tickbridge_dev.sim.SimServer`).
VENUES: dict[str, type[VenueServer]] = {COINBASE: CoinbaseSim, KRAKEN: KrakenSim}

__all__ = ["VENUES", "CoinbaseSim", "KrakenSim", "VenueServer"]
