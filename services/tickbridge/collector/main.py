"""`tickbridge collector`: Binance WebSocket -> HOT deque + WARM Redis + the VPS stream."""

from __future__ import annotations

import argparse

from prometheus_client import REGISTRY

from tickbridge.collector.service import Collector
from tickbridge.core.lifecycle import run_service, setup_logging
from tickbridge.core.metrics import serve_metrics
from tickbridge.core.settings import load_settings


def run_command(args: argparse.Namespace) -> None:
    """Run the collector until SIGTERM/SIGINT (configuration from the environment / `.env`)."""
    settings = load_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings.metrics_port_for("collector"), settings.metrics_bind)
    run_service(lambda: Collector(settings, REGISTRY))
