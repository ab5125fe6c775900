"""The simulated Coinbase and Kraken venues against the step-1 adapters, over real sockets (issue 18).

A client connects with `websockets`, subscribes with the adapter's own messages and feeds every frame through
`parse_frame`, the venue book and `ConnectionState`. Checked: trades contiguous by trade ID (150 symbols at
1,200 trades/s), every injected fault seen by the adapter (sequence gap, checksum mismatch, disconnect), missed
trades recovered through the simulated REST with the adapter's paging, and the adapter's book equal to the
simulator's at >= 200 checkpoints with faults among them (Kraken: an independent rebuild's checksum agrees
with every update the simulator did not corrupt). Checkpoints use `rate=0` and `sim.step(n)`: the test
places each one after a generation tick and reads until it has every frame the simulator wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tickbridge.collector.venues import base
from tickbridge.collector.venues.base import BookOutcome, ConnectionState, SeqOutcome, TradeGap, VenueTrade
from tickbridge.collector.venues.coinbase import CoinbaseAdapter
from tickbridge.collector.venues.kraken import KrakenAdapter
from tickbridge_dev.sim import SimConfig
from tickbridge_dev.sim.main import add_arguments, config_from
from tickbridge_dev.sim.venues import CoinbaseSim, KrakenSim, VenueServer
from tickbridge_dev.sim.venues.common import VenueConn, venue_symbols

pytestmark = pytest.mark.timeout(90)

FIVE = ("BTCUSD", "ETHUSD", "SOLUSDT", "XRPUSD", "DOGEUSDT")
#: 150 symbols: Binance's default 50 in USDT, USD and EUR.
MANY = tuple(f"{s[:-4]}-{q}" for q in ("USDT", "USD", "EUR") for s in SimConfig().symbols)
RECV = 1_700_000_000_000_000
Adapter = CoinbaseAdapter | KrakenAdapter


def adapter_for(sim: VenueServer, depth: int = 10) -> Adapter:
    if isinstance(sim, CoinbaseSim):
        return CoinbaseAdapter(sim.symbols, ws_url=sim.ws_url, rest_url=sim.rest_url, brokerage_url=sim.rest_url)
    return KrakenAdapter(sim.symbols, depth=depth, ws_url=sim.ws_url, rest_url=sim.rest_url)


class Client:
    """One connection through the adapter: trades by symbol, books, the connection's numbering, outcomes."""

    def __init__(self, sim: VenueServer, adapter: Adapter, ws: ClientConnection, before: set[VenueConn]) -> None:
        self.sim, self.adapter, self.ws = sim, adapter, ws
        self.instruments = [adapter.symbols.venue(s) for s in sim.symbols]
        self.state = ConnectionState()
        for inst in self.instruments:
            self.state.books[inst.symbol] = adapter.new_book(inst)
        self.trades: dict[str, list[VenueTrade]] = {}
        self.outcomes: dict[BookOutcome, int] = {}
        self.gaps = 0
        self.received = 0
        self.rejected: list[base.Rejected] = []
        self.on_update: Callable[[base.BookUpdate, BookOutcome], None] | None = None
        self._before = before  # the server's connections before this one
        self.conn: VenueConn | None = None

    async def subscribe(self) -> None:
        """Subscribe, and find this connection's server side (the one that was not there before)."""
        for msg in self.adapter.subscribe_messages(self.instruments):
            await self.ws.send(msg)
        while self.conn is None:
            new = self.sim.conns - self._before
            if new:
                (self.conn,) = new
            else:
                await asyncio.sleep(0.01)

    def server_frames(self) -> int:
        assert self.conn is not None
        return self.conn.frames

    async def read(self) -> None:
        raw = await asyncio.wait_for(self.ws.recv(), 10)
        self.received += 1
        frame = self.adapter.parse_frame(raw, RECV)
        if isinstance(frame, base.Rejected):
            self.rejected.append(frame)
            return
        outcome, hit = self.state.on_frame(frame)
        if outcome is SeqOutcome.GAP:
            self.gaps += 1
            await self.resync(hit)
        for ev in frame.events:
            if isinstance(ev, VenueTrade):
                self.trades.setdefault(ev.symbol, []).append(ev)
            elif isinstance(ev, base.BookUpdate):
                got = self.state.books[ev.symbol].apply(ev)
                self.outcomes[got] = self.outcomes.get(got, 0) + 1
                if self.on_update is not None:
                    self.on_update(ev, got)
                if got is BookOutcome.CHECKSUM_MISMATCH:
                    await self.resync([ev.symbol])

    async def resync(self, symbols: Sequence[str]) -> None:
        if symbols:
            for msg in self.adapter.resync_messages([self.adapter.symbols.by_symbol[s] for s in symbols]):
                await self.ws.send(msg)

    async def drain(self) -> None:
        """Read every frame the simulator has written so far."""
        while self.received < self.server_frames():
            await self.read()

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self.read()

    def all_valid(self) -> bool:
        return all(book.valid for book in self.state.books.values())

    async def settle(self) -> None:
        """Drain, and wait out any resync in flight (its snapshot follows the request)."""
        await self.drain()
        await self.until(self.all_valid)
        await self.drain()


def assert_contiguous(trades: dict[str, list[VenueTrade]]) -> int:
    total = 0
    for symbol, ts in trades.items():
        ids = [t.trade_id for t in ts]
        assert ids == list(range(ids[0], ids[0] + len(ids))), f"{symbol}: trade IDs not contiguous"
        total += len(ids)
    return total


async def rest_get(req: base.RestRequest) -> bytes:
    async with aiohttp.ClientSession() as http, http.get(req.base + req.path, params=list(req.params)) as r:
        assert r.status == 200, await r.text()
        return await r.read()


async def backfill(adapter: Adapter, symbol: str, gap: TradeGap) -> tuple[tuple[VenueTrade, ...], int]:
    """The adapter's paging over the simulated REST: the gap's trades and the pages it took."""
    inst = adapter.symbols.by_symbol[symbol]
    req = adapter.backfill_request(inst, gap)
    got: list[VenueTrade] = []
    pages = 0
    while req is not None:
        page = adapter.parse_backfill(inst, gap, await rest_get(req), RECV)
        assert not page.rejected
        got.extend(page.trades)
        req = page.next
        pages += 1
    return base.gap_trades(gap, got), pages


def sim_for(kind: type[VenueServer], symbols: tuple[str, ...] = FIVE, rate: float = 0.0) -> VenueServer:
    return kind(SimConfig(symbols=symbols, rate=rate, seed=7))


@contextlib.asynccontextmanager
async def session(
    kind: type[VenueServer],
    symbols: tuple[str, ...] = FIVE,
    rate: float = 0.0,
    depth: int = 10,
    on_update: Callable[[base.BookUpdate, BookOutcome], None] | None = None,
) -> AsyncIterator[tuple[Any, Adapter, Client]]:
    """A running simulator and one subscribed client whose books are all synced."""
    sim = sim_for(kind, symbols, rate)
    await sim.start()
    try:
        adapter = adapter_for(sim, depth)
        before = set(sim.conns)
        async with websockets.connect(sim.ws_url, max_size=2**24) as ws:
            client = Client(sim, adapter, ws, before)
            client.on_update = on_update
            await client.subscribe()
            await client.until(client.all_valid)
            yield sim, adapter, client
    finally:
        await sim.stop()


# ---------------------------------------------------------------------------------------------- both venues


@pytest.mark.parametrize("kind", [CoinbaseSim, KrakenSim])
async def test_150_symbols_trades_contiguous(kind: type[VenueServer]) -> None:
    """150 symbols at 1,200 trades/s for ~2 s: every trade arrives, by ID, per symbol; nothing rejected."""
    async with session(kind, MANY, 1200.0) as (sim, _, client):
        await client.until(lambda: sum(len(t) for t in client.trades.values()) >= 2400)
        sim.pause()
        await client.drain()
        assert len(sim.symbols) == 150
        assert not client.rejected
        assert client.gaps == 0 and BookOutcome.CHECKSUM_MISMATCH not in client.outcomes
        total = assert_contiguous(client.trades)
        for symbol, ts in client.trades.items():  # the live tape reaches the simulator's last trade
            assert ts[-1].trade_id == sim.markets[ts[-1].venue_symbol].market.history.last_id, symbol
        assert total >= 2400 and len(client.trades) > 100


@pytest.mark.parametrize("kind", [CoinbaseSim, KrakenSim])
async def test_missed_trades_backfilled_through_rest(kind: type[VenueServer]) -> None:
    """`skip_trades`: 2,500 trades never sent; the adapter sees the ID jump and pages them back from REST."""
    async with session(kind) as (sim, adapter, client):
        sim.step(50, "BTCUSD")
        sim.skip_trades("BTCUSD", 2500)
        sim.step(2600, "BTCUSD")
        await client.drain()
        ids = [t.trade_id for t in client.trades["BTCUSD"]]
        jumps = [(a, b) for a, b in itertools.pairwise(ids) if b != a + 1]
        assert len(jumps) == 1 and jumps[0][1] - jumps[0][0] - 1 == 2500
        before = next(t for t in client.trades["BTCUSD"] if t.trade_id == jumps[0][0])
        gap = TradeGap("BTCUSD", jumps[0][0] + 1, jumps[0][1] - 1, before.timestamp)
        got, pages = await backfill(adapter, "BTCUSD", gap)
        assert [t.trade_id for t in got] == list(range(gap.first, gap.last + 1))
        assert pages >= 3  # pages of 1000
        market = sim.markets[adapter.symbols.by_symbol["BTCUSD"].venue_symbol]
        for t in got:  # the REST rows are the trades the WebSocket would have sent
            held = market.held(t.trade_id)
            assert held is not None
            assert (Decimal(t.price), Decimal(t.volume), t.timestamp) == (
                Decimal(market.price(held.price)),
                Decimal(market.qty(held.qty)),
                held.time_us,
            )
            assert t.side == ("SELL" if held.buyer_maker else "BUY")


@pytest.mark.parametrize("kind", [CoinbaseSim, KrakenSim])
async def test_trades_older_than_the_history_stay_missing(kind: type[VenueServer]) -> None:
    """A venue keeps a bounded history: a gap reaching past it is filled only from the oldest trade still held;
    the rest stays missing (what the collector counts as lost), and nothing outside the gap comes back."""
    sim = kind(SimConfig(symbols=FIVE, rate=0.0, seed=7, history_per_symbol=1000))
    await sim.start()
    try:
        adapter = adapter_for(sim)
        before = set(sim.conns)
        async with websockets.connect(sim.ws_url, max_size=2**24) as ws:
            client = Client(sim, adapter, ws, before)
            await client.subscribe()
            await client.until(client.all_valid)
            sim.step(10, "ETHUSD")
            sim.skip_trades("ETHUSD", 1500)
            sim.step(1600, "ETHUSD")
            await client.settle()
        ids = [t.trade_id for t in client.trades["ETHUSD"]]
        (a, b) = next((a, b) for a, b in itertools.pairwise(ids) if b != a + 1)
        after = next(t.timestamp for t in client.trades["ETHUSD"] if t.trade_id == a)
        gap = TradeGap("ETHUSD", a + 1, b - 1, after)
        got, _ = await backfill(adapter, "ETHUSD", gap)
        oldest = sim.markets[adapter.symbols.by_symbol["ETHUSD"].venue_symbol].market.history.oldest_id
        assert oldest is not None and gap.first < oldest <= gap.last
        assert [t.trade_id for t in got] == list(range(oldest, gap.last + 1))  # the held part, by ID
    finally:
        await sim.stop()


@pytest.mark.parametrize("kind", [CoinbaseSim, KrakenSim])
async def test_disconnect_seen_and_a_new_connection_resyncs(kind: type[VenueServer]) -> None:
    """`drop_connections`: the client sees an abnormal close (1006); a new connection gets fresh snapshots and
    the trades missed meanwhile are in REST."""
    async with session(kind) as (sim, adapter, client):
        sim.step(40)
        await client.drain()
        assert sim.drop_connections() == 1
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            await client.read()
        assert closed.value.rcvd is None  # no close frame: 1006
        sim.step(40)
        before = set(sim.conns)
        async with websockets.connect(sim.ws_url, max_size=2**24) as ws2:
            client2 = Client(sim, adapter, ws2, before)
            await client2.subscribe()
            sim.step(40)
            await client2.settle()
            for symbol, book in client2.state.books.items():
                assert book.top(10**6) == expected_book(sim, adapter, symbol)


def expected_book(sim: VenueServer, adapter: Adapter, symbol: str) -> tuple[list[Any], list[Any]]:
    vs = adapter.symbols.by_symbol[symbol].venue_symbol
    if isinstance(adapter, KrakenAdapter):
        assert isinstance(sim, KrakenSim)
        return sim.view(vs, adapter.depth)
    return sim.markets[vs].book_text()


# ---------------------------------------------------------------------------------------------- Coinbase


async def test_coinbase_book_equals_sim_at_checkpoints_through_sequence_gaps() -> None:
    """250 checkpoints; every 25th tick one `l2_data` frame is lost (numbered, not sent): the connection's
    `sequence_num` shows each gap, every book resubscribes, and every book equals the simulator's after."""
    async with session(CoinbaseSim) as (sim, adapter, client):
        checkpoints = lost = 0
        for i in range(250):
            if i % 25 == 10:
                sim.skip_sequence(1)
                lost += 1
            sim.step(20)
            sim.step(1)  # a loss shows at the next numbered frame: make sure there is one
            await client.settle()
            for symbol, book in client.state.books.items():
                assert book.top(10**6) == expected_book(sim, adapter, symbol), (i, symbol)
            checkpoints += 1
        assert checkpoints >= 200
        assert client.gaps == lost == client.state.sequence.lost == 10
        assert client.outcomes[BookOutcome.SYNCED] == len(FIVE) * (1 + lost)  # each gap resynced every book
        assert not client.rejected


async def test_coinbase_protocol_acks_errors_heartbeats_and_deadline() -> None:
    sim = sim_for(CoinbaseSim)
    assert isinstance(sim, CoinbaseSim)
    sim.subscribe_deadline_s = 0.3
    await sim.start()
    try:
        adapter = adapter_for(sim)
        async with websockets.connect(sim.ws_url) as ws:  # no subscription: closed at the deadline
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        sim.subscribe_deadline_s = 30.0  # the next connection takes its time on a loaded machine
        async with websockets.connect(sim.ws_url) as ws:
            await ws.send(b'{"type":"subscribe","channel":"level2","product_ids":["NOPE-USD"]}')
            bad = adapter.parse_frame(await ws.recv(), RECV)
            assert isinstance(bad, base.Rejected) and bad.reason == "exchange_error"
            await ws.send(adapter.subscribe_messages([])[0])  # heartbeats
            acks = adapter.parse_frame(await ws.recv(), RECV)
            assert isinstance(acks, base.Frame) and acks.events[0] == base.Control(
                "subscribed", "{'heartbeats': ['heartbeats']}"
            )
            beat = adapter.parse_frame(await asyncio.wait_for(ws.recv(), 3), RECV)
            assert isinstance(beat, base.Frame) and beat.events[0].kind == "heartbeat" and beat.sequence == 1
    finally:
        await sim.stop()


# ---------------------------------------------------------------------------------------------- Kraken


def reference_checksum(bids: dict[Decimal, tuple[str, str]], asks: dict[Decimal, tuple[str, str]]) -> int:
    """Written from Kraken's guide, apart from both the adapter and the simulator."""

    def text(level: tuple[str, str]) -> str:
        return "".join(s.replace(".", "").lstrip("0") for s in level)

    top_asks = [asks[k] for k in sorted(asks)[:10]]
    top_bids = [bids[k] for k in sorted(bids, reverse=True)[:10]]
    return zlib.crc32("".join(map(text, top_asks + top_bids)).encode())


class Reference:
    """An independent rebuild of one connection's books: apply, truncate to depth, checksum every message."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.books: dict[str, tuple[dict[Decimal, tuple[str, str]], dict[Decimal, tuple[str, str]]]] = {}
        self.agreed = self.disagreed = 0

    def on_update(self, ev: base.BookUpdate, outcome: BookOutcome) -> None:
        if ev.snapshot:
            self.books[ev.symbol] = ({}, {})
        if ev.symbol not in self.books:
            return  # between a mismatch and the resubscription's snapshot
        for side, levels in zip(self.books[ev.symbol], (ev.bids, ev.asks), strict=True):
            for price, qty in levels:
                if Decimal(qty) == 0:
                    side.pop(Decimal(price), None)
                else:
                    side[Decimal(price)] = (price, qty)
        bids, asks = self.books[ev.symbol]
        for side, keep in ((bids, sorted(bids, reverse=True)[: self.depth]), (asks, sorted(asks)[: self.depth])):
            for k in set(side) - set(keep):
                del side[k]
        if reference_checksum(bids, asks) == ev.checksum:
            self.agreed += 1
        else:
            self.disagreed += 1
            del self.books[ev.symbol]
        assert (outcome is BookOutcome.CHECKSUM_MISMATCH) == (reference_checksum(bids, asks) != ev.checksum)


@pytest.mark.parametrize("depth", [10, 25])
async def test_kraken_book_equals_sim_at_checkpoints_through_lost_and_corrupt_updates(depth: int) -> None:
    """250 checkpoints with book messages lost (`drop_book_update`) and checksums corrupted: every corrupted
    checksum is a mismatch, a lost message is a mismatch unless later messages healed the book, each mismatch
    resubscribes, and at every checkpoint every book equals the simulator's view (depth 25: the top 10, which is
    all the checksum can vouch for; see the adapter README)."""
    reference = Reference(depth)
    async with session(KrakenSim, depth=depth, on_update=reference.on_update) as (sim, adapter, client):
        corrupted = dropped = checkpoints = 0
        for i in range(250):
            symbol = FIVE[i % len(FIVE)]
            if i % 20 == 5:
                sim.corrupt_checksum(symbol)
                corrupted += 1
            elif i % 20 == 15:
                sim.drop_book_update(symbol)
                dropped += 1
            sim.step(20, symbol if i % 2 else None)
            sim.step(5, symbol)  # a lost message shows at the symbol's next one (unless that one heals it)
            await client.settle()
            for sym, book in client.state.books.items():
                want = expected_book(sim, adapter, sym)
                got = book.top(10**6)
                if depth == 10:
                    assert got == want, (i, sym)
                else:
                    assert (got[0][:10], got[1][:10]) == (want[0][:10], want[1][:10]), (i, sym)
            checkpoints += 1
        mismatches = client.outcomes.get(BookOutcome.CHECKSUM_MISMATCH, 0)
        assert checkpoints >= 200
        assert sum(sim.corrupt.values()) == 0 and sum(sim.lose_book.values()) == 0  # every fault was injected
        assert corrupted < mismatches <= corrupted + dropped  # lost updates were seen, the others healed
        assert reference.disagreed == mismatches and reference.agreed >= 500
        assert not client.rejected


async def test_kraken_protocol_status_acks_errors_ping_and_heartbeat() -> None:
    sim = sim_for(KrakenSim)
    await sim.start()
    try:
        adapter = adapter_for(sim)
        assert isinstance(adapter, KrakenAdapter)
        async with websockets.connect(sim.ws_url) as ws:
            status = adapter.parse_frame(await ws.recv(), RECV)
            assert isinstance(status, base.Frame) and status.events == (base.Control("status", "online"),)
            await ws.send(adapter.ping_message())
            pong = adapter.parse_frame(await ws.recv(), RECV)
            assert isinstance(pong, base.Frame) and pong.events == (base.Control("pong"),)
            await ws.send(b'{"method":"subscribe","params":{"channel":"book","symbol":["BTC/EUR"]},"req_id":9}')
            bad = adapter.parse_frame(await ws.recv(), RECV)
            assert isinstance(bad, base.Rejected) and bad.reason == "exchange_error"
            await ws.send(b'{"method":"subscribe","params":{"channel":"book","symbol":["BTC/USD"],"depth":7}}')
            bad = adapter.parse_frame(await ws.recv(), RECV)
            assert isinstance(bad, base.Rejected) and "depth" in bad.detail.lower()
            inst = adapter.symbols.by_symbol["BTCUSD"]
            await ws.send(adapter.subscribe_messages([inst])[0])  # trade, with its snapshot
            ack = adapter.parse_frame(await ws.recv(), RECV)
            assert isinstance(ack, base.Frame) and ack.events == (base.Control("subscribed", "trade BTC/USD"),)
            kinds = set()
            while "heartbeat" not in kinds:
                frame = adapter.parse_frame(await asyncio.wait_for(ws.recv(), 3), RECV)
                assert isinstance(frame, base.Frame)
                kinds.update(e.kind for e in frame.events if isinstance(e, base.Control))
    finally:
        await sim.stop()


@pytest.mark.parametrize("kind", [CoinbaseSim, KrakenSim])
async def test_two_connections_each_kept_right(kind: type[VenueServer]) -> None:
    """Two clients at once (Kraken: depths 10 and 100, two views of one book; Coinbase: each connection numbered
    from 0 on its own): both books follow the simulator's through 100 ticks, one loss hits only its connection."""
    sim = sim_for(kind)
    await sim.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = []
            for depth in (10, 100):
                adapter = adapter_for(sim, depth)
                before = set(sim.conns)
                ws = await stack.enter_async_context(websockets.connect(sim.ws_url, max_size=2**24))
                client = Client(sim, adapter, ws, before)
                await client.subscribe()
                await client.until(client.all_valid)
                clients.append(client)
            for i in range(100):
                if i == 50 and clients[0].conn is not None:
                    clients[0].conn.lose += 1  # Coinbase: the first connection loses one message, not the second
                sim.step(20)
                sim.step(1)
                for client in clients:
                    await client.settle()
                    for symbol, book in client.state.books.items():
                        assert book.top(10**6) == expected_book(sim, client.adapter, symbol), (i, symbol)
            if isinstance(sim, CoinbaseSim):
                assert [c.gaps for c in clients] == [1, 0]
    finally:
        await sim.stop()


# ---------------------------------------------------------------------------------------------- REST, CLI


async def test_rest_budgets_answer_as_the_venues_do() -> None:
    """Past the public budget Coinbase answers 429, Kraken an `EGeneral:Too many requests` error; an unknown
    product or pair is refused the venue's way, and the adapters read those answers as one `VenueError`."""
    for kind in (CoinbaseSim, KrakenSim):
        sim = sim_for(kind)
        await sim.start()
        try:
            adapter = adapter_for(sim)
            inst = adapter.symbols.by_symbol["BTCUSD"]
            req = adapter.snapshot_request(inst, 10)
            assert req is not None
            book = adapter.parse_snapshot(inst, await rest_get(req), RECV)
            assert (list(book.bids), list(book.asks)) == tuple(map(list, sim.markets[inst.venue_symbol].book_text(10)))
            async with aiohttp.ClientSession() as http:
                answers = []
                for _ in range(20):
                    async with http.get(req.base + req.path, params=list(req.params)) as r:
                        answers.append((r.status, await r.read()))
                bad = {"pair": "NOPEUSD"} if kind is KrakenSim else {}
                path = req.path if kind is KrakenSim else "/products/NOPE-USD/trades"
                await asyncio.sleep(1.1)  # one token back
                async with http.get(req.base + path, params=bad) as r:
                    unknown = (r.status, await r.read())
            if kind is CoinbaseSim:
                assert answers[-1][0] == 429 and unknown[0] == 404
            else:
                assert answers[-1] == (200, b'{"error":["EGeneral:Too many requests"]}')
                with pytest.raises(base.VenueError, match="Unknown asset pair"):
                    adapter.parse_snapshot(inst, unknown[1], RECV)
        finally:
            await sim.stop()


def test_cli_venue_option() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from(parser.parse_args(["--venue", "coinbase", "--symbols", "BTCUSDT,eth-usd"]), ())
    assert venue_symbols(config.symbols, "/") == ("BTC/USDT", "ETH/USD")
    for bad in (["--venue", "kraken", "--mode", "replay", "--replay", "x"], ["--venue", "kraken", "--symbols", "FOO"]):
        with pytest.raises(SystemExit):
            config_from(parser.parse_args(bad), ("BTCUSDT",))
    assert parser.parse_args([]).venue == "binance_spot"
