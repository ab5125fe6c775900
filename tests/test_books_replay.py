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
from tickbridge.brain.book_history import book_at
from tickbridge.brain.books import Book, read_book
from tickbridge.brain.consumer import BrainConsumer
from tickbridge.brain.writer import BrainWriter
from tickbridge.collector.service import Collector
from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBError, QuestDBHttp
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


class Replay:
    """The simulator replaying the captures as fast as it can, stopping before each checkpoint line, and the
    reference fed with the capture up to where it stopped."""

    def __init__(self, binance_data: Path, n: int) -> None:
        self.files = (binance_data / "ethusdt_20240808.gz", binance_data / "ethusdt_20240809.gz")
        self.lines = load_capture(self.files)
        self.points = checkpoints(self.lines, n)
        self.sim = SimServer(SimConfig(mode="replay", replay_files=self.files, speed=0.0, symbols=(SYM,)))
        source = self.sim.source
        assert isinstance(source, ReplaySource)
        self.source = source
        source.pause_before = self.points[0]
        self.ref = Reference()
        self._fed = 0

    def settings(self, vps: RedisServer, brain: RedisServer, qdb: QuestDBServer, **kw: Any) -> Settings:
        return Settings(
            binance_ws_url=self.sim.ws_url, binance_rest_url=self.sim.rest_url, symbols=(SYM,), vps_redis_url=vps.url,
            brain_redis_url=brain.url, vps_questdb_url=qdb.url, consumer_name="c1", depth_snapshot_limit=1000, **kw,
        )  # fmt: skip

    async def stopped_at(self, n: int) -> Reference:
        """Wait until the replay stopped before checkpoint `n`; the reference then holds everything before it."""
        point = self.points[n]
        await eventually(lambda: _true(self.source.paused and self.source.position == point), timeout=60,
                         what=f"replay stopped before line {point}")  # fmt: skip
        for line in self.lines[self._fed : point]:
            self.ref.feed(line.stream, line.data)
        self._fed = point
        return self.ref

    def go_on(self, n: int) -> None:
        """Resume after checkpoint `n` (to the next one, or to the end)."""
        if n + 1 < len(self.points):
            self.source.pause_before = self.points[n + 1]
        self.source.resume()


async def test_brain_book_equals_reference_and_collector_at_every_checkpoint(
    binance_data: Path, redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer,
    services: ServiceRunner,
) -> None:  # fmt: skip
    replay = Replay(binance_data, CHECKPOINTS)
    vps, brain_server = redis_factory(), redis_factory()
    await replay.sim.start()
    settings = replay.settings(vps, brain_server, questdb_server, delivered_retention_s=1.0)
    brain: aioredis.Redis = make_client(brain_server.url)
    collector = Collector(settings, CollectorRegistry())
    try:
        services.start(BrainConsumer(settings, CollectorRegistry(), block_ms=50))
        services.start(Forwarder(settings, CollectorRegistry(), buffer_table="vps_buffer_books_replay"))
        services.start(collector)
        waits: list[float] = []
        for n in range(len(replay.points)):
            ref = await replay.stopped_at(n)
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
            replay.go_on(n)
        waits.sort()
        median, worst = waits[len(waits) // 2] * 1000, waits[-1] * 1000
        print(
            f"\n{len(replay.points)} checkpoints equal; Brain caught up in median {median:.0f} ms, max {worst:.0f} ms"
        )
    finally:
        await services.stop()
        await brain.aclose()
        await replay.sim.stop()


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


async def test_book_at_rebuilds_the_live_book_from_questdb(
    binance_data: Path, redis_factory: Callable[..., RedisServer], questdb_factory: Callable[..., QuestDBServer],
    services: ServiceRunner,
) -> None:  # fmt: skip
    """History (acceptance 4): the same replay with the writer, and an exchange update-ID gap half-way (a VPS
    resync, so QuestDB holds two whole books and a break in the diffs). At 40 checkpoints the live Brain book is
    noted; afterwards `book_at(symbol, its time)` from QuestDB must equal it (as numbers: QuestDB keeps
    doubles) at the same update ID, valid."""
    replay = Replay(binance_data, 40)
    vps, brain_server, qdb = redis_factory(), redis_factory(), questdb_factory()
    await replay.sim.start()
    settings = replay.settings(vps, brain_server, qdb, brain_questdb_url=qdb.url, writer_flush_interval_s=0.1)
    brain: aioredis.Redis = make_client(brain_server.url)
    live: list[Book] = []
    try:
        services.start(BrainWriter(settings, CollectorRegistry()))
        services.start(BrainConsumer(settings, CollectorRegistry(), block_ms=50))
        services.start(Forwarder(settings, CollectorRegistry(), buffer_table="vps_buffer_books_history"))
        services.start(Collector(settings, CollectorRegistry()))
        for n in range(len(replay.points)):
            ref = await replay.stopped_at(n)
            live.append(await brain_book_at(brain, ref.u, f"checkpoint {n}"))
            assert (live[-1].bids, live[-1].asks) == ref.top()[1:], f"checkpoint {n}: the live book is the exchange's"
            if n == len(replay.points) // 2:
                replay.source.skip_update_ids(SYM, 3)  # the exchange leaves out updates: the collector resyncs
            replay.go_on(n)
        http = QuestDBHttp(qdb.url)
        try:
            for table in (keys.DEPTH_TABLE, keys.BOOK_TABLE):
                await eventually(lambda t=table: _applied(http, t), timeout=60, what=f"{table} written")
            snapshots = await http.scalar(f"SELECT count() FROM {keys.BOOK_TABLE}")
            assert snapshots >= 2, "the resync's whole book is in QuestDB too"
            for n, book in enumerate(live):
                past = await book_at(http, SYM, book.timestamp, DEPTH)
                assert past.valid and past.last_update_id == book.last_update_id, (n, past.reason)
                assert _numbers(past) == _numbers(book), f"checkpoint {n}: book_at differs from the live book"
        finally:
            await http.close()
    finally:
        await services.stop()
        await brain.aclose()
        await replay.sim.stop()


def _numbers(book: Book) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    return [(float(p), float(q)) for p, q in book.bids], [(float(p), float(q)) for p, q in book.asks]


async def _applied(http: QuestDBHttp, table: str) -> bool:
    try:
        await http.wait_applied(table, timeout=5)
        return int(await http.wal_pending(table) or 0) == 0
    except QuestDBError:
        return False


async def test_a_brain_book_that_lost_its_state_asks_for_a_whole_book_and_gets_it(
    binance_data: Path, redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer,
    services: ServiceRunner,
) -> None:  # fmt: skip
    """The request path end to end: the Brain's book keys deleted (a Brain Redis that lost its state) or the
    book marked invalid; the next diff asks (Brain set), the forwarder relays (VPS set), the collector appends
    its whole book, and the Brain's book is valid and equal to the reference again."""
    replay = Replay(binance_data, 12)
    vps, brain_server = redis_factory(), redis_factory()
    await replay.sim.start()
    settings = replay.settings(vps, brain_server, questdb_server)
    brain: aioredis.Redis = make_client(brain_server.url)
    registry = CollectorRegistry()
    try:
        services.start(BrainConsumer(settings, CollectorRegistry(), block_ms=50))
        services.start(Forwarder(settings, CollectorRegistry(), buffer_table="vps_buffer_books_requests"))
        services.start(Collector(settings, registry))
        repaired: list[float] = []
        for n in range(len(replay.points)):
            ref = await replay.stopped_at(n)
            started = time.monotonic()
            book = await brain_book_at(brain, ref.u, f"checkpoint {n}")
            if n in (4, 8):
                repaired.append(time.monotonic() - started)
            assert (book.bids, book.asks) == ref.top()[1:]
            if n == 3:
                await brain.delete(*keys.book_keys(SYM))  # lost state
            elif n == 7:
                await brain.hset(keys.book_keys(SYM)[0], "valid", "0")  # a break
            replay.go_on(n)
        requested = registry.get_sample_value("tickbridge_collector_book_snapshots_total", {"cause": "request"})
        assert requested is not None and requested >= 2
        print(
            f"\nvalid again {', '.join(f'{s:.2f}' for s in repaired)} s after the replay stopped at the next checkpoint"
        )
    finally:
        await services.stop()
        await brain.aclose()
        await replay.sim.stop()
