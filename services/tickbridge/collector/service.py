"""The collector service: connection manager, frame processor, and the Redis writer.

Data flow: one reader task per WebSocket connection puts raw frames into a bounded inbox (a full inbox
stops the reader: TCP backpressure). A single processor task parses, deduplicates and routes them, so
every per-symbol decision (trade-ID order, book updates) happens in one place, in order; REST work
(snapshots, trade back-fill) runs in background tasks whose results come back through the same inbox.
The processor hands batches to the `StreamWriter` through a second bounded queue.

Make-before-break: on the lifetime limit, `serverShutdown` or a stale stream the manager opens a second
connection to the same URL, waits until it delivers data that joins every valid book (an event that is
contiguous with or already in the book), makes it the primary and closes the old one. Both feed the same
dedup (trade IDs, depth `u <= book id`); only the primary's gaps trigger back-fill or a resync.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from tickbridge.collector.book import DepthSync, OrderBook, Outcome
from tickbridge.collector.metrics import CollectorMetrics
from tickbridge.collector.parser import (
    FUTURE_TIME,
    MAX_FRAME_BYTES,
    ControlReply,
    Rejected,
    ServerShutdown,
    parse_frame,
    to_us,
)  # fmt: skip
from tickbridge.collector.rest import RestClient, RestError
from tickbridge.collector.writer import DeadLetter, Item, StreamWriter
from tickbridge.core import keys
from tickbridge.core.backoff import Backoff
from tickbridge.core.lifecycle import Service
from tickbridge.core.redis_io import TRANSIENT_ERRORS, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.tick import MAX_TS_US, DepthDiff, Tick, TickError, Trade, check_levels
from tickbridge.core.wire import now_us

log = logging.getLogger(__name__)

#: The WebSocket refuses frames above this (and closes with 1009); between MAX_FRAME_BYTES and this
#: the parser rejects and dead-letters them without losing the connection.
WS_MAX_SIZE = 16 * MAX_FRAME_BYTES
#: Trades a single gap may back-fill; beyond that the rest is counted as lost.
MAX_BACKFILL = 200_000
#: Live trades of one symbol parked behind its back-fill. A stuck back-fill (6 attempts of 10 s per page, and
#: a 429/418 Retry-After waited out on each) can freeze a symbol for minutes; 50,000 trades is about a minute
#: of the busiest pair (~15 MB). Reaching it ends that back-fill early: the unfetched rest of the gap is lost
#: (counted), which beats holding an unbounded backlog and stalling the symbol.
MAX_PARKED = 50_000
#: A trade at or below the last trade ID but more than this newer than the last trade's exchange time
#: starts a new ID sequence (a real duplicate is never newer: IDs rise with time).
ID_RESET_SLACK_US = 1_000_000
#: A trade whose exchange time is more than this after its receive time is dead-lettered (reason
#: `future_time`): appended, it would top WARM (trimmed to the window before its newest tick) and the newest
#: trade time (a later new ID sequence would pass for duplicates). Exchange and VPS clocks agree within
#: milliseconds under NTP; 5 s leaves room for a clock off by far more than that.
MAX_AHEAD_US = 5_000_000
OUT_BATCH = 1000


@dataclass(eq=False)
class Connection:
    gen: int
    ws: ClientConnection
    opened: float
    last_frame: float
    frames: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True, slots=True)
class SnapshotResult:
    symbol: str
    snapshot: dict[str, Any] | None


@dataclass(frozen=True, slots=True, eq=False)
class BackfillResult:
    """Trades fetched from REST for `first..last` of `symbol` (ascending, possibly incomplete).

    The fetch task fills `trades` in place, so a back-fill ended early keeps what it already has; rows it
    refused for their time (`future`) are dead-lettered with them.
    """

    symbol: str
    first: int
    last: int
    trades: list[Trade]
    future: list[DeadLetter] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Switch:
    """Inbox marker: frames of `gen` are primary from here on (every frame of the old one is ahead of it)."""

    gen: int


@dataclass(frozen=True, slots=True)
class Disconnected:
    """Inbox marker: primary `gen` is gone with no replacement (after its last frame): books are unknown."""

    gen: int


#: Events held per non-primary connection while they are ahead of the primary (bounded).
MAX_HELD = 100_000


def stream_url(base: str, symbols: Iterable[str]) -> str:
    """Combined-stream URL with `<sym>@trade` and `<sym>@depth@100ms` for each symbol."""
    names = [f"{s.lower()}@{kind}" for s in symbols for kind in ("trade", "depth@100ms")]
    return f"{base.rstrip('/')}/stream?streams={'/'.join(names)}"


class Collector(Service):
    """Binance WebSocket -> HOT deque + WARM sorted sets + the VPS stream."""

    name = "collector"

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        *,
        inbox_size: int = 20_000,
        join_timeout_s: float = 10.0,
        reconnect_base_s: float = 0.1,
        max_parked: int = MAX_PARKED,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.symbols = settings.symbols
        self.metrics = CollectorMetrics(registry if registry is not None else CollectorRegistry())
        self.url = stream_url(settings.binance_ws_url, self.symbols)
        self.join_timeout_s = join_timeout_s
        self.reconnect_base_s = reconnect_base_s
        self.max_parked = max_parked
        self.depth = {s: DepthSync(s) for s in self.symbols}
        self.last_trade: dict[str, int] = {}
        #: Exchange time of the newest trade appended per symbol: a trade at or below `last_trade` that is
        #: newer than it is no duplicate but a new ID sequence (see `_on_trade`).
        self.last_trade_ts: dict[str, int] = {}
        self._hot: dict[str, deque[Tick]] = {s: deque(maxlen=settings.hot_ticks) for s in self.symbols}
        self.inbox: asyncio.Queue[
            tuple[int, int, bytes | str] | SnapshotResult | BackfillResult | Switch | Disconnected | None
        ] = asyncio.Queue(inbox_size)
        self.conns: dict[int, Connection] = {}
        self.primary_gen = 0  # the processor's view (set by `Switch` markers, in frame order)
        self._active_gen = 0  # the manager's view
        self._held: dict[int, deque[Trade | DepthDiff]] = {}
        self._next_gen = 0
        self._wake = asyncio.Event()
        self._shutdown_gens: set[int] = set()
        self._joined: dict[str, int] = {}
        self._snap_tasks: dict[str, asyncio.Task[None]] = {}
        self._backfill_tasks: dict[str, asyncio.Task[None]] = {}
        #: Symbols with a back-fill in flight -> their later trades (gen, trade), appended after it.
        self._parked: dict[str, list[tuple[int, Trade]]] = {}
        #: The back-fill in flight per symbol; a result that is not this one was ended early (ignored).
        self._backfills: dict[str, BackfillResult] = {}
        self._snap_backoff: dict[str, Backoff] = {}
        self._tg: asyncio.TaskGroup | None = None
        self.rest = RestClient(settings.binance_rest_url, on_request=self._on_rest, on_capped=self._on_rest_capped)
        self.writer: StreamWriter | None = None
        self.started = asyncio.Event()  # the first connection is up
        m = self.metrics
        self._m_trade = {s: m.ticks.labels(s, "TRADE") for s in self.symbols}
        self._m_depth = {s: m.ticks.labels(s, "DEPTH") for s in self.symbols}
        # Counted locally per tick and flushed to Prometheus per batch (a labelled inc costs ~1 µs).
        self._n_trade = dict.fromkeys(self.symbols, 0)
        self._n_depth = dict.fromkeys(self.symbols, 0)
        # Exchange -> collector latency of every live tick (a cheap per-symbol bucket counter, not a Histogram).
        self._m_lat_trade = {s: m.latency.child(s, "TRADE") for s in self.symbols}
        self._m_lat_depth = {s: m.latency.child(s, "DEPTH") for s in self.symbols}
        self._m_dup_trade = m.duplicates.labels("TRADE")
        self._m_dup_depth = m.duplicates.labels("DEPTH")
        for s in self.symbols:
            m.book_valid.labels(s).set(0)
        m.export_symbols(self.symbols)

    # --- public views -------------------------------------------------------------------------

    def hot(self, symbol: str) -> list[Tick]:
        """The HOT cache: the last `hot_ticks` ticks of `symbol`, oldest first."""
        return list(self._hot[symbol])

    def book(self, symbol: str) -> OrderBook:
        return self.depth[symbol].book

    def book_valid(self, symbol: str) -> bool:
        """True while the book is known to match the exchange (synced, and current since any disconnect)."""
        sync = self.depth[symbol]
        return sync.valid and sync.confirmed

    def request_stop(self) -> None:
        super().request_stop()
        self._wake.set()

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        client = make_client(self.settings.vps_redis_url, self.settings)
        try:
            stored = await self._load_last_ids(client)
            if stored is None:
                return  # stopped before Redis answered
            for raw_sym, tid in stored.items():
                sym = raw_sym.decode() if isinstance(raw_sym, bytes) else raw_sym
                if sym in self.depth:
                    try:
                        self.last_trade[sym] = int(tid)
                    except ValueError:
                        log.error("%s: stored last trade ID %r is not a number: starting without one", sym, tid)
            if self.last_trade:
                log.info("resuming after trade IDs %s", self.last_trade)
                await self._load_last_times(client)
            self.writer = StreamWriter(
                client, self.settings.stream_key, self.metrics, warm_window_s=self.settings.warm_window_s,
                last_ids=self.last_trade,
            )  # fmt: skip
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self.writer.run(), name="collector-writer")
                tg.create_task(self._process(), name="collector-processor")
                tg.create_task(self._manage(), name="collector-connections")
        finally:
            await self.rest.close()
            await client.aclose()
        log.info("collector stopped: %d ticks written", self.writer.written if self.writer else 0)

    async def _load_last_ids(self, client: Any) -> dict[Any, Any] | None:
        """The last appended trade ID per symbol; waits for Redis (a restart of both must not crash-loop)."""
        backoff = Backoff(base=0.2, cap=10.0)
        while True:
            try:
                stored: dict[Any, Any] = await client.hgetall(keys.COLLECTOR_LAST_TRADE_IDS)
                return stored
            except TRANSIENT_ERRORS as exc:
                delay = backoff.next()
                log.warning("VPS Redis not reachable (%s), retrying in %.1fs", exc, delay)
                self.metrics.redis_errors.inc()
                if await self.sleep_or_stop(delay):
                    return None

    async def _load_last_times(self, client: Any) -> None:
        """The newest trade time per symbol from WARM (written in the same MULTI as the last trade IDs)."""
        symbols = list(self.last_trade)
        try:
            async with client.pipeline(transaction=False) as pipe:
                for sym in symbols:
                    pipe.zrange(keys.warm_key(sym), -1, -1, withscores=True)
                replies = await pipe.execute(raise_on_error=False)
        except TRANSIENT_ERRORS as exc:  # unknown: every ID at or below the stored one stays a duplicate
            log.warning("newest trade times not read (%s): a reset of trade IDs goes unnoticed until a trade", exc)
            return
        for sym, reply in zip(symbols, replies, strict=True):
            if isinstance(reply, list) and reply:
                self.last_trade_ts[sym] = int(reply[0][1])

    def _on_rest(self, endpoint: str, status: str) -> None:
        self.metrics.rest_requests.labels(endpoint, status).inc()

    def _on_rest_capped(self, endpoint: str, what: str) -> None:
        self.metrics.rest_capped.labels(endpoint, what).inc()

    # --- connections --------------------------------------------------------------------------

    async def _connect(self, reason: str, *, primary: bool) -> Connection | None:
        self._next_gen += 1
        gen = self._next_gen
        try:
            ws = await websockets.connect(
                self.url, max_size=WS_MAX_SIZE, ping_interval=None, open_timeout=10, close_timeout=2,
                compression=None,
            )  # fmt: skip
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            self.metrics.connect_failures.inc()
            log.warning("connect failed (%s): %s", reason, exc)
            return None
        now = time.monotonic()
        conn = Connection(gen=gen, ws=ws, opened=now, last_frame=now)
        assert self._tg is not None
        if primary:  # before any frame of this connection
            self._active_gen = gen
            await self.inbox.put(Switch(gen))
        conn.task = self._tg.create_task(self._read(conn), name=f"collector-ws-{gen}")
        self.conns[gen] = conn
        self.metrics.reconnects.labels(reason).inc()
        self.metrics.connections_open.set(len(self.conns))
        log.info("connection %d open (%s)", gen, reason)
        return conn

    async def _read(self, conn: Connection) -> None:
        inbox = self.inbox
        try:
            async for msg in conn.ws:
                recv = now_us()
                conn.frames += 1
                conn.last_frame = time.monotonic()
                item = (conn.gen, recv, msg)
                try:
                    inbox.put_nowait(item)
                except asyncio.QueueFull:
                    self.metrics.queue_full.labels("inbox").inc()
                    await inbox.put(item)  # stop reading: TCP backpressure
        except ConnectionClosed as exc:
            codes = {f.code for f in (exc.rcvd, exc.sent) if f is not None}
            if 1009 in codes:
                self.metrics.dead_letters.labels("oversized").inc()
            log.info("connection %d closed: %s", conn.gen, exc)
        except OSError as exc:
            log.info("connection %d failed: %s", conn.gen, exc)
        finally:
            conn.closed.set()
            self._wake.set()

    async def _close(self, conn: Connection) -> None:
        try:
            await conn.ws.close()
        except Exception:  # closing a broken socket: nothing left to save
            pass
        if conn.task is not None:
            await conn.task
        self.conns.pop(conn.gen, None)
        self._shutdown_gens.discard(conn.gen)
        self.metrics.connections_open.set(len(self.conns))

    async def _wait_wake(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.001))
        except TimeoutError:
            pass
        self._wake.clear()

    def _trigger(self, conn: Connection) -> str | None:
        if self.stopping.is_set():
            return "stop"
        if conn.closed.is_set():
            return "disconnect"
        if conn.gen in self._shutdown_gens:
            return "server_shutdown"
        now = time.monotonic()
        if now - conn.opened >= self.settings.ws_max_lifetime_s:
            return "lifetime"
        if now - conn.last_frame >= self.settings.ws_stale_timeout_s:
            return "stale"
        return None

    async def _manage(self) -> None:
        backoff = Backoff(base=self.reconnect_base_s, cap=30.0)
        reason = "start"
        try:
            while not self.stopping.is_set():
                primary = self.conns.get(self._active_gen)
                if primary is None:
                    conn = await self._connect(reason, primary=True)
                    if conn is None:
                        await self.sleep_or_stop(backoff.next())
                        continue
                    self.metrics.connection_up.set(1)
                    self.started.set()
                    continue
                trigger = self._trigger(primary)
                if trigger is None:
                    lifetime_left = primary.opened + self.settings.ws_max_lifetime_s - time.monotonic()
                    await self._wait_wake(min(1.0, lifetime_left))
                    continue
                if trigger == "stop":
                    break
                if trigger == "disconnect":
                    self.metrics.connection_up.set(0)
                    lived = time.monotonic() - primary.opened
                    await self._close(primary)
                    await self.inbox.put(Disconnected(primary.gen))
                    if lived >= 5.0:
                        backoff.reset()
                    reason = "disconnect"
                    await self.sleep_or_stop(backoff.next())
                    continue
                await self._rotate(primary, trigger, backoff)
        finally:
            for conn in list(self.conns.values()):
                await self._close(conn)
            self.metrics.connection_up.set(0)
            # Unfinished REST work is dropped: the hash still holds the last appended trade ID, so the next
            # start back-fills that gap again, and the books resync anyway.
            for task in (*self._snap_tasks.values(), *self._backfill_tasks.values()):
                task.cancel()
            await self.inbox.put(None)

    async def _rotate(self, old: Connection, reason: str, backoff: Backoff) -> None:
        """Make-before-break: open the replacement, let it join the books, then retire `old`."""
        log.info("rotating connection %d (%s)", old.gen, reason)
        new = await self._connect(reason, primary=False)
        if new is None:
            if reason == "stale" or old.closed.is_set():
                await self._close(old)  # nothing to keep: plain reconnect with backoff
                self.metrics.connection_up.set(0)
                await self.inbox.put(Disconnected(old.gen))
            await self.sleep_or_stop(backoff.next())
            return
        if reason != "stale":
            deadline = time.monotonic() + self.join_timeout_s
            while not (self.stopping.is_set() or old.closed.is_set() or new.closed.is_set()):
                if new.frames and self._joined_all(new.gen):
                    break
                if time.monotonic() >= deadline:
                    log.warning("connection %d did not join every book in %.0fs", new.gen, self.join_timeout_s)
                    break
                await self._wait_wake(0.05)
        if new.closed.is_set() and not old.closed.is_set() and reason != "stale":
            await self._close(new)  # the replacement died first: keep the old one, try again later
            await self.sleep_or_stop(backoff.next())
            return
        await self._close(old)  # its reader has put every frame it got into the inbox
        self._active_gen = new.gen
        await self.inbox.put(Switch(new.gen))
        self.metrics.connection_up.set(1)
        log.info("connection %d is primary, %d retired", new.gen, old.gen)

    def _joined_all(self, gen: int) -> bool:
        return all(self._joined.get(s) == gen for s, sync in self.depth.items() if sync.valid)

    # --- processing ---------------------------------------------------------------------------

    async def _process(self) -> None:
        assert self.writer is not None
        writer = self.writer
        out: list[Item] = []
        inbox = self.inbox
        while True:
            item = await inbox.get()
            stop = False
            while True:
                if item is None:
                    stop = True
                    break
                if isinstance(item, tuple):
                    self._on_frame(item[0], item[1], item[2], out)
                elif isinstance(item, Switch):
                    self._switch(item.gen, out)
                elif isinstance(item, BackfillResult):
                    self._on_backfill(item, out)
                elif isinstance(item, Disconnected):
                    self._invalidate_books(item.gen)
                else:
                    self._on_snapshot(item, out)
                if len(out) >= OUT_BATCH:
                    await self._flush(out)
                    out = []
                if inbox.empty():
                    break
                item = inbox.get_nowait()
            if out:
                await self._flush(out)
                out = []
            if stop:
                await writer.close_input()
                return

    async def _flush(self, out: list[Item]) -> None:
        assert self.writer is not None
        self._flush_counts()
        for i in range(0, len(out), OUT_BATCH):  # a large back-fill goes out in transactions of OUT_BATCH
            await self.writer.put(out[i : i + OUT_BATCH])

    def _switch(self, gen: int, out: list[Item]) -> None:
        """Make `gen` primary and replay what it delivered ahead of the old primary, in order."""
        self.primary_gen = gen
        held = self._held.pop(gen, deque())
        self._held.clear()
        for ev in held:
            if isinstance(ev, Trade):
                self._on_trade(ev, gen, out)
            else:
                self._on_depth(self.depth[ev.symbol], ev, gen, out)

    def _invalidate_books(self, gen: int) -> None:
        """The primary is gone without a replacement: what changed meanwhile is unknown, so no book counts
        as valid until the next connection tells. Its first event for a book either continues the book's
        update IDs (nothing was missed: valid again, no snapshot) or leaves a gap (the usual resync).
        Discarding the books instead wasted the snapshots in flight for books still syncing, and two quick
        reconnects ran out of REST weight (recovery 18-46 s instead of ~1 s, collector README).
        A make-before-break rotation never gets here: its overlap keeps the books continuous."""
        n = 0
        for symbol, sync in self.depth.items():
            if sync.valid and sync.confirmed:
                n += 1
                sync.confirmed = False
                self.metrics.book_valid.labels(symbol).set(0)
        log.warning("connection %d lost: %d books unconfirmed until their next update (a gap resyncs)", gen, n)

    def _hold(self, gen: int, ev: Trade | DepthDiff) -> None:
        held = self._held.get(gen)
        if held is None:
            held = self._held[gen] = deque(maxlen=MAX_HELD)
        held.append(ev)

    def _flush_counts(self) -> None:
        for counts, metric in ((self._n_trade, self._m_trade), (self._n_depth, self._m_depth)):
            for sym, n in counts.items():
                if n:
                    metric[sym].inc(n)
                    counts[sym] = 0

    def _dead_letter(self, rej: Rejected, recv: int, out: list[Item]) -> None:
        self.metrics.dead_letters.labels(rej.reason).inc()
        out.append(DeadLetter(rej.reason, rej.detail, rej.raw, recv))

    def _on_frame(self, gen: int, recv: int, raw: bytes | str, out: list[Item]) -> None:
        """Route one frame."""
        ev = parse_frame(raw, recv)
        kind = type(ev)
        if kind is Trade:
            assert isinstance(ev, Trade)
            if ev.symbol not in self.depth:
                self._dead_letter(Rejected("unknown_symbol", ev.symbol, _raw(raw)), recv, out)
                return
            if ev.timestamp > recv + MAX_AHEAD_US:
                self._dead_letter(Rejected(FUTURE_TIME, _ahead(ev, recv), _raw(raw)), recv, out)
                return
            self._on_trade(ev, gen, out)
        elif kind is DepthDiff:
            assert isinstance(ev, DepthDiff)
            sync = self.depth.get(ev.symbol)
            if sync is None:
                self._dead_letter(Rejected("unknown_symbol", ev.symbol, _raw(raw)), recv, out)
                return
            self._on_depth(sync, ev, gen, out)
        elif kind is Rejected:
            assert isinstance(ev, Rejected)
            self._dead_letter(ev, recv, out)
        elif kind is ServerShutdown:
            log.info("serverShutdown on connection %d", gen)
            self._shutdown_gens.add(gen)
            self._wake.set()
        elif kind is ControlReply:
            pass

    def _on_trade(self, ev: Trade, gen: int, out: list[Item]) -> None:
        parked = self._parked.get(ev.symbol)
        if parked is not None:  # a back-fill is in flight: keep ID order, append after it
            parked.append((gen, ev))
            if len(parked) >= self.max_parked:
                self._end_backfill_early(ev.symbol, out)
            return
        last = self.last_trade.get(ev.symbol)
        if last is not None:
            if ev.trade_id <= last:
                if ev.timestamp <= self.last_trade_ts.get(ev.symbol, MAX_TS_US) + ID_RESET_SLACK_US:
                    self._m_dup_trade.inc()
                    return
                # Newer than every trade appended, yet an ID we passed: not a duplicate (IDs rise with time)
                # but a new sequence (the exchange reset it, or BINANCE_WS_URL now points elsewhere).
                # Dropping it as a duplicate would drop every trade of the symbol from now on.
                self._restart_sequence(ev, last)
                last = ev.trade_id - 1
            if ev.trade_id > last + 1:
                if gen != self.primary_gen:
                    self._hold(gen, ev)  # overlap: the primary may still deliver the ones before it
                else:
                    self._start_backfill(ev, gen, last)
                return
        self._emit_trade(ev, out)

    def _restart_sequence(self, ev: Trade, last: int) -> None:
        self.metrics.trade_id_resets.labels(ev.symbol).inc()
        log.error("%s: trade ID %d after %d, but %.1f s newer than the last trade appended: a new ID sequence "
                  "(exchange reset, or BINANCE_WS_URL changed); following it", ev.symbol, ev.trade_id, last,
                  (ev.timestamp - self.last_trade_ts[ev.symbol]) / 1e6)  # fmt: skip
        self.last_trade[ev.symbol] = ev.trade_id - 1

    def _emit_trade(self, ev: Trade, out: list[Item], live: bool = True) -> None:
        self.last_trade[ev.symbol] = ev.trade_id
        self.last_trade_ts[ev.symbol] = ev.timestamp  # emitted in ID order, so in time order
        out.append(ev)
        self._hot[ev.symbol].append(ev)
        self._n_trade[ev.symbol] += 1
        if live:  # a back-filled trade's receive time is when REST answered: not the stream's latency
            self._m_lat_trade[ev.symbol].observe_us(ev.recv_ts - ev.timestamp)

    def _emit_depth(self, ev: DepthDiff, out: list[Item]) -> None:
        out.append(ev)
        self._hot[ev.symbol].append(ev)
        self._n_depth[ev.symbol] += 1
        self._m_lat_depth[ev.symbol].observe_us(ev.recv_ts - ev.timestamp)

    def _on_depth(self, sync: DepthSync, ev: DepthDiff, gen: int, out: list[Item]) -> None:
        outcome = sync.on_event(ev, primary=gen == self.primary_gen)
        if outcome is Outcome.APPLIED:
            self._joined[ev.symbol] = gen
            self._emit_depth(ev, out)
            if not sync.confirmed:  # the first update after a disconnect continued the book: nothing missed
                sync.confirmed = True
                self.metrics.book_valid.labels(ev.symbol).set(1)
        elif outcome is Outcome.DUPLICATE:
            self._m_dup_depth.inc()
            if sync.valid:
                self._joined[ev.symbol] = gen
        elif outcome is Outcome.AHEAD:
            self._hold(gen, ev)
        elif outcome is Outcome.BUFFERED:
            self._request_snapshot(ev.symbol, 0.0)
        elif outcome is Outcome.GAP:
            log.warning("%s: depth gap (book %d, event U=%d): resync", ev.symbol, sync.book.last_update_id,
                        ev.first_update_id)  # fmt: skip
            self.metrics.depth_gaps.labels(ev.symbol).inc()
            self.metrics.resyncs.labels(ev.symbol).inc()
            self.metrics.book_valid.labels(ev.symbol).set(0)
            self._request_snapshot(ev.symbol, 0.0)

    def _request_snapshot(self, symbol: str, delay: float) -> None:
        if symbol in self._snap_tasks or self.stopping.is_set():
            return
        assert self._tg is not None
        self._snap_tasks[symbol] = self._tg.create_task(self._fetch_snapshot(symbol, delay))

    async def _fetch_snapshot(self, symbol: str, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        snap: dict[str, Any] | None
        try:
            snap = await self.rest.depth(symbol, self.settings.depth_snapshot_limit)
        except RestError as exc:
            log.warning("%s: snapshot failed: %s", symbol, exc)
            snap = None
        await self.inbox.put(SnapshotResult(symbol, snap))

    def _on_snapshot(self, res: SnapshotResult, out: list[Item]) -> None:
        symbol = res.symbol
        self._snap_tasks.pop(symbol, None)
        sync = self.depth[symbol]
        backoff = self._snap_backoff.setdefault(symbol, Backoff(base=0.2, cap=10.0))
        if sync.valid:
            return
        if res.snapshot is None:
            self._request_snapshot(symbol, backoff.next())
            return
        try:
            lid = res.snapshot["lastUpdateId"]
            bids = check_levels("bids", res.snapshot.get("bids"))
            asks = check_levels("asks", res.snapshot.get("asks"))
        except TickError as exc:
            log.warning("%s: bad snapshot: %s", symbol, exc)
            self._request_snapshot(symbol, backoff.next())
            return
        outcome, applied = sync.on_snapshot(lid, bids, asks)
        for ev in applied:
            self._emit_depth(ev, out)
        if outcome is Outcome.SYNCED:
            backoff.reset()
            self._joined[symbol] = self.primary_gen
            self.metrics.book_valid.labels(symbol).set(1)
            log.info("%s: book synced at %d (%d buffered events applied)", symbol, sync.book.last_update_id,
                     len(applied))  # fmt: skip
        else:  # STALE or GAP: keep buffering, fetch again
            if outcome is Outcome.GAP:
                self.metrics.depth_gaps.labels(symbol).inc()
            self._request_snapshot(symbol, backoff.next())

    def _start_backfill(self, trade: Trade, gen: int, last: int) -> None:
        """A gap before `trade` on the primary: fetch it from REST in the background, park the symbol."""
        symbol = trade.symbol
        self.metrics.trade_gaps.labels(symbol).inc()
        log.warning("%s: trade gap %d..%d, back-filling", symbol, last + 1, trade.trade_id - 1)
        self._parked[symbol] = [(gen, trade)]
        res = self._backfills[symbol] = BackfillResult(symbol, last + 1, trade.trade_id - 1, [])
        assert self._tg is not None
        self._backfill_tasks[symbol] = self._tg.create_task(
            self._fetch_backfill(res), name=f"collector-backfill-{symbol}"
        )

    async def _fetch_backfill(self, res: BackfillResult) -> None:
        """Pages of `historicalTrades` for `first..last` into `res.trades`; the processor appends them (other
        symbols go on)."""
        symbol, end, trades = res.symbol, res.last, res.trades
        start = max(res.first, end - MAX_BACKFILL + 1)
        next_id = start
        while next_id <= end:
            try:
                rows = await self.rest.historical_trades(symbol, next_id, min(1000, end - next_id + 1))
            except RestError as exc:
                log.error("%s: back-fill failed at %d: %s", symbol, next_id, exc)
                break
            progressed = False
            for row in rows:
                try:
                    tid = row["id"]
                    if not isinstance(tid, int) or tid < next_id:
                        continue
                    if tid > end:
                        break
                    maker = row["isBuyerMaker"]
                    recv = now_us()
                    trade = Trade(
                        symbol=symbol, price=row["price"], volume=row["qty"], side="SELL" if maker else "BUY",
                        timestamp=to_us(row["time"]), trade_id=tid, recv_ts=recv,
                    )  # fmt: skip
                    if trade.timestamp > recv + MAX_AHEAD_US:  # not appended: its ID stays a gap (lost)
                        res.future.append(DeadLetter(FUTURE_TIME, _ahead(trade, recv), orjson.dumps(row)[:4096], recv))
                        continue
                    trades.append(trade)
                except (KeyError, TypeError, TickError) as exc:
                    log.error("%s: bad historical trade %s: %s", symbol, str(row)[:200], exc)
                    continue
                next_id = tid + 1
                progressed = True
            if not progressed:
                break
        await self.inbox.put(res)

    def _on_backfill(self, res: BackfillResult, out: list[Item]) -> None:
        if self._backfills.get(res.symbol) is not res:
            return  # ended early (its trades were appended then); it finished before it saw the cancel
        del self._backfills[res.symbol]
        self._backfill_tasks.pop(res.symbol, None)
        self._finish_backfill(res, list(res.trades), out)

    def _end_backfill_early(self, symbol: str, out: list[Item]) -> None:
        """Too many trades parked: give up on the rest of the gap and let the symbol flow again."""
        res = self._backfills.pop(symbol)
        task = self._backfill_tasks.pop(symbol, None)
        if task is not None:
            task.cancel()  # it cannot add to `res.trades` any more: the cancel lands at its current await
        fetched = list(res.trades)
        first_lost = fetched[-1].trade_id + 1 if fetched else res.first
        log.warning("%s: %d trades parked behind the back-fill of %d..%d: ending it early, %d..%d lost",
                    symbol, len(self._parked[symbol]), res.first, res.last, first_lost, res.last)  # fmt: skip
        self._finish_backfill(res, fetched, out)

    def _finish_backfill(self, res: BackfillResult, trades: list[Trade], out: list[Item]) -> None:
        """Append the fetched trades, then the trades parked meanwhile (which may start another back-fill)."""
        symbol = res.symbol
        parked = self._parked.pop(symbol, [])
        for letter in res.future:
            self.metrics.dead_letters.labels(letter.reason).inc()
            out.append(letter)
        next_id = res.first
        for trade in trades:
            if trade.trade_id < next_id:
                continue
            if trade.trade_id > next_id:
                self.metrics.lost_trades.labels(symbol).inc(trade.trade_id - next_id)
            self._emit_trade(trade, out, live=False)
            next_id = trade.trade_id + 1
        if next_id <= res.last:
            self.metrics.lost_trades.labels(symbol).inc(res.last - next_id + 1)
            log.error("%s: %d trades (%d..%d) could not be back-filled", symbol, res.last - next_id + 1, next_id,
                      res.last)  # fmt: skip
        self.last_trade[symbol] = max(self.last_trade.get(symbol, 0), res.last)
        self.metrics.backfilled.labels(symbol).inc(len(trades))
        log.info("%s: back-filled %d trades", symbol, len(trades))
        for gen, trade in parked:
            self._on_trade(trade, gen, out)


def _ahead(trade: Trade, recv: int) -> str:
    return f"{trade.symbol} trade {trade.trade_id}: time {(trade.timestamp - recv) / 1e6:.1f} s after it was received"


def _raw(raw: bytes | str) -> bytes:
    return (raw.encode() if isinstance(raw, str) else raw)[:4096]
