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
    urls: dict[str, Any] = {f"{venue}_ws_url": sim.ws_url, f"{venue}_rest_url": sim.rest_url}
    return Settings(
        exchange=venue, symbols=SYMBOLS, vps_redis_url=vps.url, brain_redis_url=brain.url, vps_questdb_url=qdb.url,
        brain_questdb_url=qdb.url, consumer_name="c1", writer_flush_interval_s=0.1, delivered_retention_s=1.0,
        **urls,
    )  # fmt: skip


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def per_symbol_ids(brain: Any, venue: str, symbol: str) -> list[int]:
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


async def vps_trade_ids(client: Any, venue: str) -> dict[str, list[int]]:
    """Trade IDs per symbol in the venue's VPS stream, in stream order."""
    ids: dict[str, list[int]] = {}
    for _, f in await client.xrange(keys.stream_key_for(venue)):
        ids.setdefault(f[b"symbol"].decode(), []).append(int(f[b"trade_id"]))
    return ids


async def run_venue_collector(settings: Settings, registry: CollectorRegistry) -> tuple[VenueCollector, Any]:
    collector = VenueCollector(settings, registry)
    task = asyncio.create_task(collector.run())
    await asyncio.wait_for(collector.started.wait(), 20)
    return collector, task


async def stop(collector: VenueCollector, task: Any) -> None:
    collector.request_stop()
    await asyncio.wait_for(task, 30)


@pytest.mark.parametrize("venue", ["coinbase", "kraken"])
async def test_a_restarted_collector_resumes_where_its_stream_ends(
    venue: str, redis_factory: Callable[..., RedisServer]
) -> None:
    """Stopped for 3 s while the venue trades, a new collector back-fills from the exchange's own last-trade-ID
    hash: the stream holds every trade of each symbol once, in ID order (Kraken: by time, filtered by ID)."""
    sim: VenueServer = (CoinbaseSim if venue == "coinbase" else KrakenSim)(SimConfig(symbols=SYMBOLS, rate=200))
    await sim.start()
    vps = redis_factory()
    urls: dict[str, Any] = {f"{venue}_ws_url": sim.ws_url, f"{venue}_rest_url": sim.rest_url}
    settings = Settings(exchange=venue, symbols=SYMBOLS, vps_redis_url=vps.url, **urls)
    client: Any = make_client(vps.url)
    try:
        collector, task = await run_venue_collector(settings, CollectorRegistry())
        await eventually(lambda: _true(len(collector.hot("BTCUSD")) >= 10), timeout=30, what="trades")
        await stop(collector, task)
        await asyncio.sleep(3)  # the venue trades on: a gap for the next collector
        registry = CollectorRegistry()
        collector, task = await run_venue_collector(settings, registry)
        await eventually(lambda: _true(len(collector.hot("BTCUSD")) >= 10), timeout=30, what="trades again")
        sim.pause()
        last = {m["symbol"]: int(m["last_trade_id"]) for m in sim.stats()["symbols"].values()}

        async def caught_up() -> bool:
            ids = await vps_trade_ids(client, venue)
            return all(ids.get(s, [0])[-1] == last[s] for s in ids)

        await eventually(caught_up, timeout=30, what="the stream up to the venue's last trade")
        await stop(collector, task)
        for symbol, ids in (await vps_trade_ids(client, venue)).items():
            assert ids == list(range(ids[0], ids[-1] + 1)), f"{venue} {symbol}: lost, duplicated or out of order"
        assert sum(sample(registry, "tickbridge_collector_backfilled_trades_total", symbol=s) for s in SYMBOLS) > 0
        assert sum(sample(registry, "tickbridge_collector_lost_trades_total", symbol=s) for s in SYMBOLS) == 0
    finally:
        await client.aclose()
        await sim.stop()


async def test_kraken_trades_rest_no_longer_has_are_counted_lost(redis_factory: Callable[..., RedisServer]) -> None:
    """Kraken pages its REST trades by time from the last trade seen: when the venue no longer keeps the older
    trades of a gap (here it keeps 300 per symbol and 600 are skipped), the ones REST returns are appended in
    order and the rest of the gap is counted in `lost_trades_total`, never appended out of order."""
    sim = KrakenSim(SimConfig(symbols=SYMBOLS, rate=0, history_per_symbol=300))
    await sim.start()
    vps = redis_factory()
    settings = Settings(exchange="kraken", symbols=SYMBOLS, vps_redis_url=vps.url, kraken_ws_url=sim.ws_url,
                        kraken_rest_url=sim.rest_url)  # fmt: skip
    registry = CollectorRegistry()
    client: Any = make_client(vps.url)
    try:
        collector, task = await run_venue_collector(settings, registry)
        sim.step(5, "BTCUSD")
        await eventually(lambda: _true(len(collector.hot("BTCUSD")) >= 5), timeout=30, what="first trades")
        sim.skip_trades("BTCUSD", 600)
        sim.step(600, "BTCUSD")  # never sent; REST keeps only the newest 300 of them
        sim.step(3, "BTCUSD")
        last = int(sim.stats()["symbols"]["BTC/USD"]["last_trade_id"])

        async def done() -> bool:
            return (await vps_trade_ids(client, "kraken")).get("BTCUSD", [0])[-1] == last

        await eventually(done, timeout=60, what="the trades after the gap")
        ids = (await vps_trade_ids(client, "kraken"))["BTCUSD"]
        assert ids == sorted(set(ids)), "duplicated or out of order"
        lost = sample(registry, "tickbridge_collector_lost_trades_total", symbol="BTCUSD")
        assert lost == ids[-1] - ids[0] + 1 - len(ids) > 0, (lost, len(ids))
        assert sample(registry, "tickbridge_collector_backfilled_trades_total", symbol="BTCUSD") > 0
        await stop(collector, task)
    finally:
        await client.aclose()
        await sim.stop()
