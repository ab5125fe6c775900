"""Prometheus metrics of the simulator (`tickbridge_sim_*`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tickbridge.core import metrics as m


class SimMetrics:
    """Counters for what the simulator sent and which faults it injected."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = m.counter(
            "sim_messages_sent_total", "WebSocket data messages sent", ("stream_type",), registry=registry
        )
        self.trades = m.counter("sim_trades_generated_total", "Trades generated or replayed", registry=registry)
        self.shortfall = m.counter(
            "sim_trades_shortfall_total",
            "Trades RATE asked for that the generator skipped because its loop ran late (the machine is too slow)",
            registry=registry,
        )
        self.connections = m.gauge("sim_connections", "Open WebSocket connections", registry=registry)
        self.connects = m.counter("sim_connections_opened_total", "WebSocket connections accepted", registry=registry)
        self.disconnects = m.counter(
            "sim_disconnects_total", "Connections closed by the simulator", ("reason",), registry=registry
        )
        self.faults = m.counter(
            "sim_faults_injected_total", "Faults injected on command", ("action",), registry=registry
        )
        self.rest = m.counter("sim_rest_requests_total", "REST requests", ("endpoint", "status"), registry=registry)
