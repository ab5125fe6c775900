"""Issue 18: Coinbase and Kraken through the real pipeline, on real servers: simulator -> collector
(`EXCHANGE=coinbase|kraken`, the venue's own VPS stream) -> forwarder -> Brain stream -> consumer -> per-symbol
streams -> writer -> Brain QuestDB. With the venue's faults on the way (missed trades: back-filled, Coinbase by
ID, Kraken by time; a disconnect; a sequence gap or lost book messages: the books resync), every trade the
simulated venue made from the first one the collector saw is in QuestDB exactly once, and each per-symbol
stream holds its trades in trade-ID order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from conftest import ServiceRunner, eventually
from tickbridge.brain.consumer import BrainConsumer
from tickbridge.brain.writer import BrainWriter
from tickbridge.collector.venue_service import VenueCollector
from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBHttp
from tickbridge.core.redis_io import make_client
from tickbridge.core.settings import Settings
from tickbridge.forwarder.service import Forwarder
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer
from tickbridge_dev.sim import SimConfig
from tickbridge_dev.sim.venues import CoinbaseSim, KrakenSim
from tickbridge_dev.sim.venues.common import VenueServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SYMBOLS = ("BTCUSD", "ETHUSD", "SOLUSD")


def venue_settings(venue: str, sim: VenueServer, vps: RedisServer, brain: RedisServer, qdb: QuestDBServer) -> Settings:
    urls = {f"{venue}_ws_url": sim.ws_url, f"{venue}_rest_url": sim.rest_url}
    return Settings(
        exchange=venue, symbols=SYMBOLS, vps_redis_url=vps.url, brain_redis_url=brain.url, vps_questdb_url=qdb.url,
        brain_questdb_url=qdb.url, consumer_name="c1", writer_flush_interval_s=0.1, delivered_retention_s=1.0,
        **urls,
    )  # fmt: skip


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def per_symbol_ids(brain: aioredis.Redis, venue: str, symbol: str) -> list[int]:
    entries = await brain.xrange(keys.trades_key(symbol, venue))
    return [int(f[b"trade_id"]) for _, f in entries]


@pytest.mark.parametrize("venue", ["coinbase", "kraken"])
async def test_venue_trades_reach_questdb_exactly_once_in_order(
    venue: str, redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer, services: ServiceRunner
) -> None:
    sim: VenueServer = (CoinbaseSim if venue == "coinbase" else KrakenSim)(SimConfig(symbols=SYMBOLS, rate=300))
    await sim.start()
    vps, brain_server = redis_factory(), redis_factory()
    settings = venue_settings(venue, sim, vps, brain_server, questdb_server)
    assert settings.stream_key == f"market:vps:stream:{venue}"
    registry = CollectorRegistry()
    brain: aioredis.Redis = make_client(brain_server.url)
    http = QuestDBHttp(questdb_server.url)
    try:
        services.start(BrainWriter(settings, CollectorRegistry()))
        services.start(BrainConsumer(settings, CollectorRegistry(), block_ms=50))
        services.start(Forwarder(settings, CollectorRegistry(), buffer_table=f"vb_{venue}_{uuid.uuid4().hex[:6]}"))
        collector = services.start(VenueCollector(settings, registry))
        await asyncio.wait_for(collector.started.wait(), 20)

        async def flowing(n: int) -> bool:
            return all(len(collector.hot(s)) >= n for s in SYMBOLS[:2])

        await eventually(lambda: flowing(5), timeout=30, what="trades of every busy symbol")
        await eventually(lambda: _true(all(collector.book_valid(s) for s in SYMBOLS)), timeout=30, what="books")
        first = {s: min(t.trade_id for t in collector.hot(s)) for s in SYMBOLS if collector.hot(s)}

        sim.skip_trades("ETHUSD", 40)  # missed trades: a trade-ID gap, back-filled
        await asyncio.sleep(2)
        sim.drop_connections()  # a disconnect: resubscribe, the trade snapshot and back-fill close the hole
        await asyncio.sleep(2)
        if venue == "coinbase":
            assert isinstance(sim, CoinbaseSim)
            sim.skip_sequence(2)  # lost frames: every book of the connection resyncs
        else:
            assert isinstance(sim, KrakenSim)
            sim.corrupt_checksum("BTCUSD", 1)  # a checksum that disagrees: that book resyncs
        await asyncio.sleep(3)
        sim.pause()
        await eventually(lambda: _true(all(collector.book_valid(s) for s in SYMBOLS)), timeout=30, what="resynced")

        stats = sim.stats()["symbols"]
        expected = {m["symbol"]: int(m["last_trade_id"]) for m in stats.values()}

        async def all_in_questdb() -> bool:
            rows = await http.rows(
                f"SELECT symbol, count(), count_distinct(trade_id), min(trade_id), max(trade_id) FROM trades "
                f"WHERE exchange = '{venue}' GROUP BY symbol"
            )
            got = {r[0]: r[1:] for r in rows}
            return all(s in got and got[s][3] == expected[s] for s in first)

        await eventually(all_in_questdb, timeout=90, what=f"{venue} trades in QuestDB")
        rows = await http.rows(
            f"SELECT symbol, count(), count_distinct(trade_id), min(trade_id), max(trade_id) FROM trades "
            f"WHERE exchange = '{venue}' GROUP BY symbol"
        )
        for symbol, count, distinct, lo, hi in rows:
            assert lo <= first[symbol], (symbol, lo, first[symbol])
            assert count == distinct == hi - lo + 1, f"{venue} {symbol}: lost or duplicated trades"
            ids = await per_symbol_ids(brain, venue, symbol)
            assert ids == sorted(ids) and len(set(ids)) == len(ids), f"{venue} {symbol}: out of order"
        assert sample(registry, "tickbridge_collector_backfilled_trades_total", symbol="ETHUSD") >= 40
        assert sum(sample(registry, "tickbridge_collector_lost_trades_total", symbol=s) for s in SYMBOLS) == 0
        assert sample(registry, "tickbridge_collector_reconnects_total", reason="disconnect") >= 1
        assert sum(sample(registry, "tickbridge_collector_resyncs_total", symbol=s) for s in SYMBOLS) >= 1
        # The venue's WARM keys on the VPS, under its own exchange name.
        vps_c: Any = make_client(vps.url)
        try:
            assert await vps_c.zcard(keys.warm_key("ETHUSD", venue)) > 0
            assert await vps_c.hget(keys.for_exchange(keys.COLLECTOR_LAST_TRADE_IDS, venue), "ETHUSD")
        finally:
            await vps_c.aclose()
    finally:
        await services.stop()
        await http.close()
        await brain.aclose()
        await sim.stop()


async def _true(value: bool) -> bool:
    return value
