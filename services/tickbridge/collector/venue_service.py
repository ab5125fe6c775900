"""The collector of a venue behind the adapter boundary (`venues.base.VenueAdapter`): Coinbase and Kraken.

What is per venue comes from the adapter: the URL and subscriptions, frame parsing, trade identity, the book
procedure and its continuity check (Coinbase's per-connection `sequence_num`, Kraken's CRC32), the REST
back-fill pages and the limits. What is shared with Binance's `Collector` is used as is: the `StreamPublisher`
(VPS stream, WARM, last trade IDs, batch token: exactly-once per batch), `CollectorMetrics`, the resume state
(`base.load_resume_state`), the REST client with its budget, dead letters and the service lifecycle.

Flow: one reader task per connection (at most `limits.max_symbols_per_connection` symbols each) puts raw frames
into one bounded inbox; a single processor parses them and keeps each symbol's trades in ID order: a duplicate
(ID at or below the last appended) is dropped, a jump starts a REST back-fill while that symbol's later trades
are parked, then the fetched trades go out, what REST could not return is counted lost, then the parked ones.
A reconnect resubscribes: the trade subscription's snapshot (the venue's recent trades) fills a short outage and
a longer one is back-filled like any gap. Books are kept per connection by the adapter's procedure: a sequence
gap (Coinbase: every book of the connection) or a checksum mismatch (Kraken) resubscribes the book channel.

Not here yet (collector README): depth rows (`DepthDiff` needs per-symbol update IDs neither venue gives),
whole books for the Brain, make-before-break rotation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import websockets
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from tickbridge.collector.base import MAX_AHEAD_US, MAX_BACKFILL, MAX_PARKED, OUT_BATCH, run_collector
from tickbridge.collector.metrics import CollectorMetrics
from tickbridge.collector.parser import FUTURE_TIME, Rejected
from tickbridge.collector.publisher import FrameDeadLetter, Item, StreamPublisher
from tickbridge.collector.rest import PacedBudget, RestCallFailed, RestClient
from tickbridge.collector.venues import coinbase, kraken
from tickbridge.collector.venues.base import (
    COINBASE,
    KRAKEN,
    BookOutcome,
    BookUpdate,
    ConnectionState,
    Frame,
    Instrument,
    RestRequest,
    SeqOutcome,
    TradeGap,
    VenueAdapter,
    VenueError,
    VenueTrade,
    gap_trades,
    venue_symbols,
)
from tickbridge.core.backoff import Backoff
from tickbridge.core.lifecycle import Service
from tickbridge.core.settings import Settings
from tickbridge.core.tick import Tick, Trade
from tickbridge.core.wire import now_us

log = logging.getLogger(__name__)

#: REST pages one back-fill may fetch (1000 trades each) before the rest of its gap counts as lost.
MAX_BACKFILL_PAGES = MAX_BACKFILL // 1000
#: Attempts per back-fill page: a venue's "too many requests" answer (Kraken: HTTP 200 with an error) is retried
#: (backoff up to 10 s: about a minute in all), then the rest of the gap counts as lost.
PAGE_ATTEMPTS = 8


def make_adapter(settings: Settings) -> VenueAdapter:
    """The adapter of `settings.exchange` (Coinbase or Kraken) for `SYMBOLS` (normalized: `BTCUSD`)."""
    if settings.exchange == COINBASE:
        return coinbase.CoinbaseAdapter(venue_symbols(settings.symbols, "-"), ws_url=settings.coinbase_ws_url,
                                        rest_url=settings.coinbase_rest_url)  # fmt: skip
    if settings.exchange == KRAKEN:
        return kraken.KrakenAdapter(venue_symbols(settings.symbols, "/"), ws_url=settings.kraken_ws_url,
                                    rest_url=settings.kraken_rest_url)  # fmt: skip
    raise VenueError(f"no venue collector for {settings.exchange!r} (binance_spot runs `Collector`)")


@dataclass(frozen=True, slots=True)
class Opened:
    """Inbox marker: connection `lane` (its chunk of symbols) started generation `gen`, before any frame."""

    lane: int
    gen: int


@dataclass(frozen=True, slots=True)
class Closed:
    """Inbox marker: generation `gen` of `lane` is gone (after its last frame): its books are unknown."""

    lane: int
    gen: int


@dataclass(slots=True, eq=False)
class Backfill:
    """A back-fill in flight: the gap and what REST returned so far (filled by the fetch task)."""

    instrument: Instrument
    gap: TradeGap
    trades: list[VenueTrade] = field(default_factory=list)


class VenueCollector(Service):
    """Venue WebSocket (Coinbase, Kraken) -> HOT deque + WARM sorted sets + the exchange's VPS stream."""

    name = "collector"

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        *,
        adapter: VenueAdapter | None = None,
        inbox_size: int = 20_000,
        reconnect_base_s: float = 0.1,
        max_parked: int = MAX_PARKED,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.adapter = adapter if adapter is not None else make_adapter(settings)
        self.exchange = self.adapter.exchange
        self.instruments = list(self.adapter.symbols)
        self.symbols = tuple(i.symbol for i in self.instruments)
        size = self.adapter.limits.max_symbols_per_connection
        self.lanes = [self.instruments[i : i + size] for i in range(0, len(self.instruments), size)]
        self.metrics = CollectorMetrics(registry if registry is not None else CollectorRegistry())
        self.reconnect_base_s = reconnect_base_s
        self.max_parked = max_parked
        self.last_trade: dict[str, int] = {}
        self.last_trade_ts: dict[str, int] = {}
        self._hot: dict[str, deque[Tick]] = {s: deque(maxlen=settings.hot_ticks) for s in self.symbols}
        self.inbox: asyncio.Queue[tuple[int, int, int, bytes | str] | Opened | Closed | Backfill | None] = (
            asyncio.Queue(inbox_size)
        )
        #: Per lane: the live generation, its socket (for resync messages) and its frame/book state.
        self._ws: dict[int, tuple[int, ClientConnection]] = {}
        self._state: dict[int, tuple[int, ConnectionState]] = {}
        self._parked: dict[str, list[Trade]] = {}
        self._backfills: dict[str, Backfill] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_gen = 0
        self._tg: asyncio.TaskGroup | None = None
        self.publisher: StreamPublisher | None = None
        rest_url = self.adapter.rest_url
        self.rest = RestClient(rest_url, on_request=self._on_rest, on_capped=self._on_rest_capped)
        # The venue's public budget (requests per second, evenly spaced) in place of Binance's weight per minute.
        self.rest.budget = PacedBudget(self.adapter.limits.rest_per_s)
        self._n_trade = dict.fromkeys(self.symbols, 0)
        self._m_trade = {s: self.metrics.ticks.labels(s, "TRADE") for s in self.symbols}
        self._m_dup = self.metrics.duplicates.labels("TRADE")
        for s in self.symbols:
            self.metrics.book_valid.labels(s).set(0)
        self.metrics.export_symbols(self.symbols)
        self.started = asyncio.Event()
        #: Books currently valid (tests, `book_valid`).
        self.valid_books: set[str] = set()

    # --- public views -------------------------------------------------------------------------

    def hot(self, symbol: str) -> list[Tick]:
        """The HOT cache: the last `hot_ticks` trades of `symbol`, oldest first."""
        return list(self._hot[symbol])

    def book_valid(self, symbol: str) -> bool:
        return symbol in self.valid_books

    def _on_rest(self, endpoint: str, status: str) -> None:
        self.metrics.rest_requests.labels(endpoint, status).inc()

    def _on_rest_capped(self, endpoint: str, what: str) -> None:
        self.metrics.rest_capped.labels(endpoint, what).inc()

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        await run_collector(self, self.exchange, self._start)

    async def _start(self, tg: asyncio.TaskGroup, client: Any) -> None:
        log.info("%s collector: %d symbols on %d connection(s) -> %s", self.exchange, len(self.symbols),
                 len(self.lanes), self.settings.stream_key)  # fmt: skip
        readers = [tg.create_task(self._lane(i, lane), name=f"collector-lane-{i}") for i, lane in enumerate(self.lanes)]
        await self.stopping.wait()
        for task in (*readers, *self._tasks):
            task.cancel()
        await asyncio.gather(*readers, *self._tasks, return_exceptions=True)
        await self.inbox.put(None)

    # --- connections --------------------------------------------------------------------------

    async def _lane(self, lane: int, instruments: Sequence[Instrument]) -> None:
        """One connection for `instruments`, reconnected forever (jittered backoff, reset after 5 s of life)."""
        backoff = Backoff(base=self.reconnect_base_s, cap=30.0)
        reason = "start"
        stale_s = min(self.adapter.limits.stale_after_s, self.settings.ws_stale_timeout_s)
        while not self.stopping.is_set():
            try:
                ws = await websockets.connect(
                    self.adapter.connect_url(instruments), max_size=_max_frame(self.adapter) * 2, ping_interval=20,
                    open_timeout=10, close_timeout=2, compression=None,
                )  # fmt: skip
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
                self.metrics.connect_failures.inc()
                log.warning("%s lane %d: connect failed (%s): %s", self.exchange, lane, reason, exc)
                await self.sleep_or_stop(backoff.next())
                continue
            self._next_gen += 1
            gen = self._next_gen
            opened = time.monotonic()
            await self.inbox.put(Opened(lane, gen))
            self._ws[lane] = (gen, ws)
            self.metrics.reconnects.labels(reason).inc()
            self.metrics.connections_open.set(len(self._ws))
            self.metrics.connection_up.set(1)
            self.started.set()
            try:
                await self._send_paced(ws, self.adapter.subscribe_messages(instruments))
                while not self.stopping.is_set():
                    # `asyncio.timeout`, not `wait_for`: on 3.11 `wait_for` can swallow a cancel that meets a frame
                    # arriving (the reader then never stopped on a busy stream).
                    async with asyncio.timeout(stale_s):
                        msg = await ws.recv()
                    item = (lane, gen, now_us(), msg)
                    try:
                        self.inbox.put_nowait(item)
                    except asyncio.QueueFull:
                        self.metrics.queue_full.labels("inbox").inc()
                        await self.inbox.put(item)  # stop reading: TCP backpressure
            except TimeoutError:
                reason = "stale"
                log.warning("%s lane %d: no frame for %.0f s, reconnecting", self.exchange, lane, stale_s)
            except (ConnectionClosed, OSError) as exc:
                reason = "disconnect"
                log.info("%s lane %d: connection %d closed: %s", self.exchange, lane, gen, exc)
            finally:
                self._ws.pop(lane, None)
                self.metrics.connections_open.set(len(self._ws))
                if not self._ws:
                    self.metrics.connection_up.set(0)
                await ws.close()
            await self.inbox.put(Closed(lane, gen))
            if time.monotonic() - opened >= 5.0:
                backoff.reset()
            await self.sleep_or_stop(backoff.next())

    async def _send_paced(self, ws: ClientConnection, messages: list[bytes]) -> None:
        """Send within the venue's client message rate."""
        gap = 1.0 / self.adapter.limits.ws_messages_per_s
        for i, msg in enumerate(messages):
            if i:
                await asyncio.sleep(gap)
            await ws.send(msg.decode())

    def _resync(self, lane: int, symbols: Sequence[str]) -> None:
        """Make the venue resend the books of `symbols` on `lane` (adapter's messages, in the background)."""
        for s in symbols:
            self.metrics.resyncs.labels(s).inc()
            self.metrics.book_valid.labels(s).set(0)
            self.valid_books.discard(s)
        live = self._ws.get(lane)
        if live is None or self._tg is None or self.stopping.is_set():
            return  # the next connection subscribes afresh
        insts = [self.adapter.symbols.by_symbol[s] for s in symbols]
        task = self._tg.create_task(self._send_quietly(live[1], self.adapter.resync_messages(insts)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_quietly(self, ws: ClientConnection, messages: list[bytes]) -> None:
        try:
            await self._send_paced(ws, messages)
        except (ConnectionClosed, OSError) as exc:  # the reader sees the close and reconnects (new snapshots)
            log.info("%s: resync not sent: %s", self.exchange, exc)

    # --- processing ---------------------------------------------------------------------------

    async def _process(self) -> None:
        """Take what the inbox holds (up to `OUT_BATCH` items), route it in order, hand the ticks over as one batch."""
        assert self.publisher is not None
        while True:
            items = [await self.inbox.get()]
            while len(items) < OUT_BATCH and not self.inbox.empty():
                items.append(self.inbox.get_nowait())
            out: list[Item] = []
            for item in items:
                if item is None:  # stopping: what came before goes out, then the publisher drains
                    await self._hand_over(out)
                    await self.publisher.close_input()
                    return
                self._route(item, out)
            await self._hand_over(out)

    def _route(self, item: tuple[int, int, int, bytes | str] | Opened | Closed | Backfill, out: list[Item]) -> None:
        if isinstance(item, tuple):
            self._on_frame(*item, out)
        elif isinstance(item, Backfill):
            self._on_backfill(item, out)
        elif isinstance(item, Opened):
            self._state[item.lane] = (item.gen, ConnectionState())
        else:
            self._on_closed(item)

    async def _hand_over(self, out: list[Item]) -> None:
        if not out:
            return
        for sym, n in self._n_trade.items():
            if n:
                self._m_trade[sym].inc(n)
                self._n_trade[sym] = 0
        assert self.publisher is not None
        for i in range(0, len(out), OUT_BATCH):  # a large back-fill goes out in transactions of OUT_BATCH
            await self.publisher.put(out[i : i + OUT_BATCH])

    def _on_closed(self, item: Closed) -> None:
        gen, state = self._state.get(item.lane, (None, None))
        if gen != item.gen or state is None:
            return
        del self._state[item.lane]
        for s in state.books:
            self.metrics.book_valid.labels(s).set(0)
            self.valid_books.discard(s)

    def _dead_letter(self, reason: str, detail: str, raw: bytes | str, recv: int, out: list[Item]) -> None:
        self.metrics.dead_letters.labels(reason).inc()
        data = raw.encode() if isinstance(raw, str) else raw
        out.append(FrameDeadLetter(reason, detail, data[:4096], recv))

    def _on_frame(self, lane: int, gen: int, recv: int, raw: bytes | str, out: list[Item]) -> None:
        frame = self.adapter.parse_frame(raw, recv)
        if isinstance(frame, Rejected):
            self._dead_letter(frame.reason, frame.detail, frame.raw, recv, out)
            return
        live = self._state.get(lane)
        if live is None or live[0] != gen:
            return  # a frame of a connection already replaced
        state = live[1]
        outcome, hit = state.on_frame(frame)
        if outcome is SeqOutcome.STALE:
            return
        if hit:
            log.warning("%s lane %d: sequence gap, resyncing %d books", self.exchange, lane, len(hit))
            self._resync(lane, hit)
        self._on_events(lane, state, frame, raw, recv, out)

    def _on_events(
        self, lane: int, state: ConnectionState, frame: Frame, raw: bytes | str, recv: int, out: list[Item]
    ) -> None:
        trades = [e for e in frame.events if isinstance(e, VenueTrade)]
        # A frame may hold a symbol's trades newest first (a subscription's snapshot): ID order per symbol.
        trades.sort(key=lambda t: (t.symbol, t.trade_id))
        for vt in trades:
            if vt.timestamp > recv + MAX_AHEAD_US:
                self._dead_letter(FUTURE_TIME, f"{vt.symbol} trade {vt.trade_id} ahead of its receive time", raw,
                                  recv, out)  # fmt: skip
                continue
            self._on_trade(vt.to_tick(), out)
        for ev in frame.events:
            if isinstance(ev, BookUpdate):
                self._on_book(lane, state, ev)

    def _on_book(self, lane: int, state: ConnectionState, ev: BookUpdate) -> None:
        book = state.books.get(ev.symbol)
        if book is None:
            book = state.books[ev.symbol] = self.adapter.new_book(self.adapter.symbols.by_symbol[ev.symbol])
        result = book.apply(ev)
        if result is BookOutcome.SYNCED:
            self.valid_books.add(ev.symbol)
            self.metrics.book_valid.labels(ev.symbol).set(1)
        elif result in (BookOutcome.CHECKSUM_MISMATCH, BookOutcome.GAP):
            self.metrics.depth_gaps.labels(ev.symbol).inc()
            log.warning("%s %s: book %s, resyncing", self.exchange, ev.symbol, result.value)
            self._resync(lane, [ev.symbol])

    # --- trades: ID order, gaps, back-fill ----------------------------------------------------

    def _emit(self, ev: Trade, out: list[Item]) -> None:
        self.last_trade[ev.symbol] = ev.trade_id
        self.last_trade_ts[ev.symbol] = ev.timestamp
        out.append(ev)
        self._hot[ev.symbol].append(ev)
        self._n_trade[ev.symbol] += 1

    def _on_trade(self, ev: Trade, out: list[Item]) -> None:
        sym = ev.symbol
        parked = self._parked.get(sym)
        if parked is not None:  # a back-fill is in flight: keep ID order, append after it
            parked.append(ev)
            if len(parked) >= self.max_parked:
                self._end_backfill(self._backfills[sym], out, early=True)
            return
        last = self.last_trade.get(sym)
        if last is not None:
            if ev.trade_id <= last:
                self._m_dup.inc()
                return
            if ev.trade_id > last + 1:
                self._start_backfill(ev, last)
                return
        self._emit(ev, out)

    def _start_backfill(self, ev: Trade, last: int) -> None:
        sym = ev.symbol
        gap = TradeGap(sym, last + 1, ev.trade_id - 1, self.last_trade_ts.get(sym, ev.timestamp))
        self.metrics.trade_gaps.labels(sym).inc()
        log.warning("%s %s: trades %d..%d missing, back-filling", self.exchange, sym, gap.first, gap.last)
        job = Backfill(self.adapter.symbols.by_symbol[sym], gap)
        self._backfills[sym] = job
        self._parked[sym] = [ev]
        assert self._tg is not None
        task = self._tg.create_task(self._fetch(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, job: Backfill) -> None:
        """REST pages of `job.gap` into `job.trades`; the result goes through the inbox (frame order)."""
        req: RestRequest | None = self.adapter.backfill_request(job.instrument, job.gap)
        pages = 0
        try:
            while req is not None and pages < MAX_BACKFILL_PAGES:
                pages += 1
                req = await self._page(job, req)
        except (RestCallFailed, VenueError) as exc:
            log.error("%s %s: back-fill stopped: %s", self.exchange, job.gap.symbol, exc)
        finally:
            if not self.stopping.is_set():
                await self.inbox.put(job)

    async def _page(self, job: Backfill, req: RestRequest) -> RestRequest | None:
        backoff = Backoff(base=1.0, cap=10.0)
        for attempt in range(PAGE_ATTEMPTS):
            body = await self.rest.get_bytes(req.path, dict(req.params), req.cost)
            try:
                page = self.adapter.parse_backfill(job.instrument, job.gap, body, now_us())
            except VenueError as exc:  # Kraken answers a rate limit with HTTP 200 and an error: wait, retry
                if attempt + 1 == PAGE_ATTEMPTS:
                    raise
                log.warning("%s %s: back-fill page refused (%s), retrying", self.exchange, job.gap.symbol, exc)
                await asyncio.sleep(backoff.next())
                continue
            for reason in page.rejected:
                log.warning("%s %s: back-fill row skipped: %s", self.exchange, job.gap.symbol, reason)
            job.trades.extend(page.trades)
            return page.next
        return None

    def _on_backfill(self, job: Backfill, out: list[Item]) -> None:
        if self._backfills.get(job.gap.symbol) is job:
            self._end_backfill(job, out, early=False)

    def _end_backfill(self, job: Backfill, out: list[Item], *, early: bool) -> None:
        """Append what REST returned, count the rest of the gap lost, then the parked trades, in ID order."""
        sym, gap = job.gap.symbol, job.gap
        del self._backfills[sym]
        parked = self._parked.pop(sym)
        filled = gap_trades(gap, job.trades)
        last = self.last_trade.get(sym, gap.first - 1)
        for vt in filled:
            if vt.trade_id > last:
                self._emit(vt.to_tick(), out)
        self.metrics.backfilled.labels(sym).inc(len(filled))
        lost = gap.last - gap.first + 1 - len(filled)
        if lost:
            self.metrics.lost_trades.labels(sym).inc(lost)
            why = "back-fill ended early: parked trades at the limit" if early else "not returned by REST"
            log.warning("%s %s: %d trades of %d..%d lost (%s)", self.exchange, sym, lost, gap.first, gap.last, why)
        self.last_trade[sym] = max(self.last_trade.get(sym, gap.last), gap.last)
        for ev in parked:
            self._on_trade(ev, out)


def _max_frame(adapter: VenueAdapter) -> int:
    """The largest frame the venue sends (a Coinbase `level2` snapshot holds the whole book)."""
    return coinbase.MAX_FRAME_BYTES if adapter.exchange == COINBASE else 16 * 2**20
