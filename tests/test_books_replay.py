"""Issue 17, acceptance 1: the real captures (data/binance) replayed by the simulator through collector ->
VPS Redis -> forwarder -> Brain Redis -> consumer, all on real servers. The replay stops at >= 200 checkpoints;
at each, the Brain's book (top 100 levels per side, exact strings) equals a reference rebuilt here from the
capture alone (its REST snapshot and its diffs by Binance's rules) and the collector's own book, all three at the
same update ID, and the Brain calls it valid."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from conftest import ServiceRunner, eventually
from tickbridge.brain.books import Book, read_book
from tickbridge.brain.consumer import BrainConsumer
from tickbridge.collector.service import Collector
from tickbridge.core.redis_io import make_client
from tickbridge.core.settings import Settings
from tickbridge.forwarder.service import Forwarder
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer
from tickbridge_dev.sim import SimConfig, SimServer
from tickbridge_dev.sim.replay import ReplaySource, load_capture

pytestmark = pytest.mark.timeout(600)

SYM = "ETHUSDT"
DEPTH = 100
CHECKPOINTS = 220
Side = tuple[tuple[str, str], ...]


class Reference:
    """Binance's procedure on the capture's lines alone: buffer diffs until the REST snapshot, drop u <= its
    lastUpdateId, then apply in order; every later diff must continue the chain (the captures have no gap)."""

    def __init__(self) -> None:
        self.pending: list[dict[str, Any]] = []
        self.book: dict[str, dict[str, str]] | None = None
        self.u = 0

    def feed(self, stream: str | None, data: dict[str, Any]) -> None:
        if stream is None:
            self.book = {"b": dict(data["bids"]), "a": dict(data["asks"])}
            self.u = data["lastUpdateId"]
            pending, self.pending = self.pending, []
            for ev in pending:
                self._diff(ev)
        elif stream.endswith("@depth@100ms"):
            if self.book is None:
                self.pending.append(data)
            else:
                self._diff(data)

    def _diff(self, ev: dict[str, Any]) -> None:
        assert self.book is not None
        if ev["u"] <= self.u:
            return
        assert ev["U"] <= self.u + 1, f"gap in the capture at {self.u}"
        for side in ("b", "a"):
            for price, qty in ev[side]:
                if Decimal(qty) == 0:
                    self.book[side].pop(price, None)
                else:
                    self.book[side][price] = qty
        self.u = ev["u"]

    def top(self) -> tuple[int, Side, Side]:
        assert self.book is not None
        bids = sorted(self.book["b"].items(), key=lambda kv: Decimal(kv[0]), reverse=True)[:DEPTH]
        asks = sorted(self.book["a"].items(), key=lambda kv: Decimal(kv[0]))[:DEPTH]
        return self.u, tuple(bids), tuple(asks)


def checkpoints(lines: list[Any], n: int) -> list[int]:
    """`n` line indexes spread over the depth events after the snapshot line (the replay stops before each)."""
    snap = next(i for i, line in enumerate(lines) if line.stream is None)
    depth = [i for i, line in enumerate(lines) if i > snap + 5 and line.stream and "@depth" in line.stream]
    step = len(depth) / n
    return [depth[int(k * step)] for k in range(n)]


async def test_brain_book_equals_reference_and_collector_at_every_checkpoint(
    binance_data: Path, redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer,
    services: ServiceRunner,
) -> None:  # fmt: skip
    files = (binance_data / "ethusdt_20240808.gz", binance_data / "ethusdt_20240809.gz")
    lines = load_capture(files)
    points = checkpoints(lines, CHECKPOINTS)
    vps, brain_server = redis_factory(), redis_factory()
    sim = SimServer(SimConfig(mode="replay", replay_files=files, speed=0.0, symbols=(SYM,)))
    source = sim.source
    assert isinstance(source, ReplaySource)
    source.pause_before = points[0]
    await sim.start()
    settings = Settings(
        binance_ws_url=sim.ws_url, binance_rest_url=sim.rest_url, symbols=(SYM,), vps_redis_url=vps.url,
        brain_redis_url=brain_server.url, vps_questdb_url=questdb_server.url, consumer_name="c1",
        depth_snapshot_limit=1000, delivered_retention_s=1.0,
    )  # fmt: skip
    brain: aioredis.Redis = make_client(brain_server.url)
    collector = Collector(settings, CollectorRegistry())
    try:
        services.start(BrainConsumer(settings, CollectorRegistry(), block_ms=50))
        services.start(Forwarder(settings, CollectorRegistry(), buffer_table="vps_buffer_books_replay"))
        services.start(collector)
        ref = Reference()
        fed = 0
        waits: list[float] = []
        for n, point in enumerate(points):
            await eventually(lambda p=point: _true(source.paused and source.position == p), timeout=60,
                             what=f"replay stopped before line {point}")  # fmt: skip
            for line in lines[fed:point]:
                ref.feed(line.stream, line.data)
            fed = point
            want_u, want_bids, want_asks = ref.top()
            started = time.monotonic()
            await eventually(lambda u=want_u: _true(collector.book(SYM).last_update_id == u), timeout=30,
                             what=f"collector at {want_u}")  # fmt: skip
            book = await brain_book_at(brain, want_u, f"checkpoint {n}")
            waits.append(time.monotonic() - started)
            vps_book = collector.book(SYM)
            assert vps_book.last_update_id == want_u
            assert tuple(vps_book.sorted_bids()[:DEPTH]) == want_bids, f"collector bids at {want_u}"
            assert tuple(vps_book.sorted_asks()[:DEPTH]) == want_asks, f"collector asks at {want_u}"
            assert book.bids == want_bids, f"Brain bids at checkpoint {n}, u={want_u}"
            assert book.asks == want_asks, f"Brain asks at checkpoint {n}, u={want_u}"
            assert len(book.bids) == len(book.asks) == DEPTH
            if n + 1 < len(points):
                source.pause_before = points[n + 1]
            source.resume()
        waits.sort()
        print(f"\n{len(points)} checkpoints equal; Brain caught up in median {waits[len(waits) // 2] * 1000:.0f} ms, "
              f"max {waits[-1] * 1000:.0f} ms")  # fmt: skip
    finally:
        await services.stop()
        await brain.aclose()
        await sim.stop()


async def brain_book_at(brain: aioredis.Redis, u: int, what: str, timeout: float = 30.0) -> Book:
    """The Brain's book once it is valid at update ID `u` (AssertionError after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        book = await read_book(brain, SYM, DEPTH)
        if book.valid and book.last_update_id == u:
            return book
        assert time.monotonic() < deadline, f"{what}: Brain book {book.last_update_id} valid={book.valid}, want {u}"
        await asyncio.sleep(0.001)


async def _true(value: bool) -> bool:
    return value
