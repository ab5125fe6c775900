"""Prometheus metrics of the collector (`tickbridge_collector_*`); labels are bounded (symbols, types, reasons)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry

from tickbridge.collector.parser import COLLECTOR_REASONS, REASONS
from tickbridge.collector.rest import DEPTH_ENDPOINT, HISTORICAL_TRADES_ENDPOINT, MAX_BODY_BYTES, MAX_RETRY_AFTER_S
from tickbridge.core.metrics import HopLatency, counter, gauge, histogram

REST_ENDPOINTS = (DEPTH_ENDPOINT, HISTORICAL_TRADES_ENDPOINT)
_TICK_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class CollectorMetrics:
    """All collector metrics in one registry (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def c(name: str, doc: str, labels: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
            return counter(f"collector_{name}", doc, labels, registry=registry)

        def g(name: str, doc: str, labels: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
            return gauge(f"collector_{name}", doc, labels, registry=registry)

        self.ticks = c("ticks", "Ticks appended to the stream (rate = ticks/s)", ("symbol", "type"))
        self.duplicates = c("duplicates", "Ticks dropped as already seen (overlap, replays)", ("type",))
        self.connection_up = g("connection_up", "1 while a WebSocket connection is the primary, else 0")
        self.connections_open = g("connections_open", "Open WebSocket connections (2 during make-before-break)")
        self.reconnects = c("reconnects", "New connections opened, by reason", ("reason",))
        self.connect_failures = c("connect_failures", "Failed connection attempts")
        self.trade_gaps = c("trade_gaps", "Trade-ID gaps detected", ("symbol",))
        self.depth_gaps = c("depth_gaps", "Order-book update-ID gaps detected", ("symbol",))
        self.resyncs = c("resyncs", "Order-book resynchronisations started (snapshot requests)", ("symbol",))
        self.book_snapshots = c(
            "book_snapshots",
            "Whole-book entries appended by cause (sync, request), and book resets (reset)",
            ("cause",),
        )
        self.book_valid = g("book_valid", "1 when the local book is valid, 0 while resyncing", ("symbol",))
        self.backfilled = c("backfilled_trades", "Trades recovered from REST historicalTrades", ("symbol",))
        self.lost_trades = c("lost_trades", "Trades in a gap that REST could not return", ("symbol",))
        self.trade_id_resets = c(
            "trade_id_resets", "Trade-ID sequences that went back with newer trade times (exchange or URL changed)",
            ("symbol",),
        )  # fmt: skip
        # Per-hop latency (issue 19): every live tick, per symbol. Exchange -> collector compares Binance's clock
        # (milliseconds: up to 1 ms too high) with the VPS clock (NTP assumed); a negative one counts as 0.
        self.latency = HopLatency(
            "collector_latency_seconds",
            "Hop exchange -> collector: collector receive time (recv_ts) minus the exchange event time, per live "
            "tick (two hosts' clocks, NTP assumed; exchange times are whole ms; negatives count as 0)",
            ("symbol", "type"),
            registry=registry,
        )
        self.vps_stream_latency = HopLatency(
            "collector_vps_stream_latency_seconds",
            "Hop collector -> VPS stream: the VPS Redis confirmed the append (EXEC reply) minus recv_ts, per tick",
            registry=registry,
        )
        self.dead_letters = c("dead_letters", "Malformed or unexpected frames dead-lettered", ("reason",))
        self.queue_full = c("queue_full", "Times the reader or processor waited on a full queue", ("queue",))
        # Export every known label at 0, so dashboards and alerts see "none yet" rather than "no data".
        for reason in (*REASONS, *COLLECTOR_REASONS):
            self.dead_letters.labels(reason)
        for queue in ("inbox", "writer"):
            self.queue_full.labels(queue)
        self.redis_errors = c("redis_errors", "Failed stream writes (retried)")
        self.batch_size = histogram(
            "collector_batch_ticks", "Ticks per Redis transaction", buckets=_TICK_BUCKETS, registry=registry
        )
        self.rest_requests = c("rest_requests", "REST requests by endpoint and status", ("endpoint", "status"))
        # The statuses alerts look for, at 0: a series born at 1 shows no increase(), so the first 429 would pass.
        for endpoint in REST_ENDPOINTS:
            for status in ("429", "418"):
                self.rest_requests.labels(endpoint, status)
        self.rest_capped = c(
            "rest_capped",
            f"REST answers cut to a limit: a Retry-After over its cap (429: {MAX_RETRY_AFTER_S:.0f} s, 418: 3 days), "
            f"a body over {MAX_BODY_BYTES} bytes (refused)",
            ("endpoint", "what"),
        )  # fmt: skip
        for endpoint in REST_ENDPOINTS:
            for what in ("retry_after", "body"):
                self.rest_capped.labels(endpoint, what)

    def export_symbols(self, symbols: Iterable[str]) -> None:
        """Create the per-symbol counters at 0, so the first gap, loss or resync of a symbol is an increase()."""
        for symbol in symbols:
            for kind in ("TRADE", "DEPTH"):
                self.latency.child(symbol, kind)
            self.vps_stream_latency.child(symbol)
            for per_symbol in (self.trade_gaps, self.depth_gaps, self.resyncs, self.backfilled, self.lost_trades,
                              self.trade_id_resets):  # fmt: skip
                per_symbol.labels(symbol)
