"""`tickbridge collector`: the exchange's WebSocket -> HOT deque + WARM Redis + the VPS stream.

`EXCHANGE=binance_spot` (the default) runs Binance's `Collector`; `coinbase` and `kraken` the `VenueCollector`
on their adapters (issue 18), each into its own stream (`market:vps:stream:<exchange>` unless STREAM_KEY says).
"""

from __future__ import annotations

import argparse

from prometheus_client import REGISTRY

from tickbridge.collector.service import Collector
from tickbridge.collector.venue_service import VenueCollector
from tickbridge.core import keys
from tickbridge.core.lifecycle import Service, run_service, setup_logging, tune_gc
from tickbridge.core.metrics import serve_metrics
from tickbridge.core.settings import Settings, load_settings


def make_collector(settings: Settings) -> Service:
    """The collector of `settings.exchange`."""
    if settings.exchange == keys.EXCHANGE:
        return Collector(settings, REGISTRY)
    return VenueCollector(settings, REGISTRY)


def run_command(args: argparse.Namespace) -> None:
    """Run the collector until SIGTERM/SIGINT (configuration from the environment / `.env`)."""
    settings = load_settings()
    setup_logging(settings.log_level)
    # Every frame allocates a dict, a Trade and its strings; with the default thresholds the books and HOT
    # deques were scanned again and again: at 10,000/s ~100 young and ~9 older collections a second, one full
    # one of ~0.4 s in 10 s on a loaded host (a latency spike of its own). Measured in gc.callbacks (issue 20).
    tune_gc()
    serve_metrics(settings.metrics_port_for("collector"), settings.metrics_bind)
    run_service(lambda: make_collector(settings))
