"""Prometheus helpers shared by every role (namespace `tickbridge`)."""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

NAMESPACE = "tickbridge"

#: Latency buckets from 50 µs to 60 s.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip


def serve_metrics(port: int, bind: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY) -> None:
    """Expose `/metrics`; port 0 disables the endpoint (tests running several roles in one process)."""
    if port == 0:
        return
    start_http_server(port, addr=bind, registry=registry)
    log.info("metrics on http://%s:%d/metrics", bind, port)


def counter(name: str, doc: str, labels: tuple[str, ...] = (), registry: CollectorRegistry = REGISTRY) -> Counter:
    return Counter(name, doc, labels, namespace=NAMESPACE, registry=registry)


def gauge(name: str, doc: str, labels: tuple[str, ...] = (), registry: CollectorRegistry = REGISTRY) -> Gauge:
    return Gauge(name, doc, labels, namespace=NAMESPACE, registry=registry)


def histogram(
    name: str,
    doc: str,
    labels: tuple[str, ...] = (),
    buckets: tuple[float, ...] = LATENCY_BUCKETS,
    registry: CollectorRegistry = REGISTRY,
) -> Histogram:
    return Histogram(name, doc, labels, namespace=NAMESPACE, buckets=buckets, registry=registry)
