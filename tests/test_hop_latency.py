"""Per-hop latency histograms in production (issue 19), on real servers: the simulator -> collector -> VPS Redis ->
forwarder -> Brain Redis -> consumer -> writer -> QuestDB, every role in-process with its own registry. Each hop
counts every tick exactly once, its quantiles are plausible (above 0, below the test's wall time), and the hops,
all measured from the same receive time, add up in pipeline order."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from conftest import ServiceRunner, eventually
from tickbridge.brain.consumer import BrainConsumer
from tickbridge.brain.writer import BrainWriter
from tickbridge.collector.service import Collector
from tickbridge.core.metrics import HopLatency
from tickbridge.core.settings import Settings
from tickbridge.forwarder.service import Forwarder
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer
from tickbridge_dev.sim import SimConfig, SimServer

pytestmark = pytest.mark.timeout(180)

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


def histogram(registry: CollectorRegistry, name: str, **labels: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets as (le, count), count, sum) of one label set, summed over the other labels."""
    buckets: dict[float, float] = {}
    count = total = 0.0
    for family in registry.collect():
        if family.name != name:
            continue
        for s in family.samples:
            if any(s.labels.get(k) != v for k, v in labels.items()):
                continue
            if s.name == f"{name}_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
            elif s.name == f"{name}_count":
                count += s.value
            elif s.name == f"{name}_sum":
                total += s.value
    return sorted(buckets.items()), count, total


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile: linear within the bucket, 0 as the first bucket's lower bound."""
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(cumulative - below, 1e-9)
        lower, below = le, cumulative
    return lower


def test_buckets_are_cumulative_and_in_seconds() -> None:
    registry = CollectorRegistry()
    hop = HopLatency("t_latency_seconds", "test", registry=registry)
    child = hop.child("BTCUSDT")
    child.observe_since(1_000_000, [999_950, 999_000, 990_000, 2_000_000])  # 50 µs, 1 ms, 10 ms, -1 s
    child.observe_us(20_000_000)  # 20 s: only +Inf
    buckets, count, total = histogram(registry, "tickbridge_t_latency_seconds", symbol="BTCUSDT")
    got = dict(buckets)
    assert count == 5 and got[float("inf")] == 5
    assert got[0.0001] == 2  # 50 µs and the negative one (counted as 0)
    assert got[0.001] == 3 and got[0.0075] == 3 and got[0.01] == 4 and got[10.0] == 4
    assert total == pytest.approx(20.01105)


async def test_every_hop_counts_every_tick_with_plausible_quantiles(
    redis_factory: Callable[..., RedisServer], questdb_factory: Callable[..., QuestDBServer], services: ServiceRunner
) -> None:
    vps, brain, qdb = redis_factory(), redis_factory(), questdb_factory()
    sim = SimServer(SimConfig(symbols=SYMBOLS, rate=300.0, seed=3, weights="even"))
    await sim.start()
    settings = Settings(
        binance_ws_url=sim.ws_url, binance_rest_url=sim.rest_url, symbols=SYMBOLS,
        vps_redis_url=vps.url, brain_redis_url=brain.url, vps_questdb_url=qdb.url, brain_questdb_url=qdb.url,
        forward_batch=2000, delivered_retention_s=0.5, consumer_name="t", consumer_claim_idle_ms=1000,
        writer_flush_interval_s=0.1, writer_batch_rows=2000,
    )  # fmt: skip
    registries = {role: CollectorRegistry() for role in ("collector", "forwarder", "consumer", "writer")}
    started = time.monotonic()
    try:
        collector = services.start(Collector(settings, registries["collector"]))
        services.start(Forwarder(settings, registries["forwarder"]))
        consumer = services.start(BrainConsumer(settings, registries["consumer"]))
        writer = services.start(BrainWriter(settings, registries["writer"]))

        async def flowing() -> bool:
            return writer.written > 500

        await eventually(flowing, 60, what="ticks in QuestDB")
        sim.pause()

        async def settled() -> bool:
            appended = collector.publisher.written if collector.publisher is not None else -1
            return appended > 0 and consumer.handled == appended and writer.written == appended

        await eventually(settled, 60, interval=0.2, what="every appended tick in QuestDB")
        await eventually(settled, 5, what="still settled")  # nothing more in flight
        n = collector.publisher.written if collector.publisher is not None else 0
        wall = time.monotonic() - started
    finally:
        await services.stop()
        await sim.stop()

    hops = (
        ("collector", "tickbridge_collector_vps_stream_latency_seconds"),
        ("forwarder", "tickbridge_forwarder_brain_stream_latency_seconds"),
        ("consumer", "tickbridge_consumer_symbol_stream_latency_seconds"),
        ("writer", "tickbridge_writer_questdb_latency_seconds"),
    )
    exchange = histogram(registries["collector"], "tickbridge_collector_latency_seconds")
    # The whole books the collector appended (issue 17, one per symbol as it syncs) travel the hops below like
    # ticks, but came from no exchange frame.
    books = sum(registries["collector"].get_sample_value("tickbridge_collector_book_snapshots_total", {"cause": c})
                or 0 for c in ("sync", "request", "reset"))  # fmt: skip
    assert books >= len(SYMBOLS)
    assert exchange[1] == n - books, "exchange -> collector: one observation per live tick"
    means = []
    for role, name in hops:
        buckets, count, total = histogram(registries[role], name)
        assert count == n, f"{name}: {count} observations for {n} ticks"
        p50, p99 = quantile(0.5, buckets), quantile(0.99, buckets)
        assert 0 < p50 <= p99 < wall, f"{name}: p50 {p50}, p99 {p99}, test ran {wall:.1f} s"
        per_symbol = [histogram(registries[role], name, symbol=s)[1] for s in SYMBOLS]
        assert all(per_symbol) and sum(per_symbol) == n, f"{name}: per symbol {per_symbol}"
        means.append(total / count)
    # The same ticks, each confirmed at a later stage after the earlier one: the means rise along the pipeline.
    assert means == sorted(means), dict(zip((h[1] for h in hops), means, strict=True))
