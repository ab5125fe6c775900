"""The collector's state, its public views (HOT, books) and the output of ticks (HOT deque + the batch).

The collector is one service; its work is layered, each layer a class in a file of its own that uses only
the layers below it: this base, `session` (WebSocket connections, make-before-break), `book_sync` (order
books: snapshots, resyncs), `backfill` (REST back-fill of trade gaps), and `service` (the processor: routing
frames, trade-ID order, handing batches to the `StreamPublisher`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from picows.websockets import ClientConnection
from prometheus_client import CollectorRegistry

from tickbridge.collector.book import DepthSync, OrderBook
from tickbridge.collector.metrics import CollectorMetrics
from tickbridge.collector.parser import (
    MAX_FRAME_BYTES,
)  # fmt: skip
from tickbridge.collector.publisher import FrameDeadLetter, Item, StreamPublisher
from tickbridge.collector.rest import RestClient
from tickbridge.core import keys
from tickbridge.core.backoff import Backoff
from tickbridge.core.lifecycle import Service
from tickbridge.core.rawlink import RawRedis
from tickbridge.core.redis_io import TRANSIENT_ERRORS, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.tick import DepthDiff, Tick, Trade

log = logging.getLogger("tickbridge.collector.service")

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
#: Processing time after which the processor hands what it has to the publisher and lets it send, before the rest
#: of the inbox: a burst (Binance's 100 ms depth grid delivers a diff per symbol at once, ~35 µs each) no longer
#: holds back the trades ahead of it until the whole burst is parsed; Redis runs one transaction while the next
#: is parsed (issue 20).
HANDOVER_S = 0.0002


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
    future: list[FrameDeadLetter] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Switch:
    """Inbox marker: frames of `gen` are primary from here on (every frame of the old one is ahead of it)."""

    gen: int


@dataclass(frozen=True, slots=True)
class BookRequest:
    """Symbols whose whole book the Brain asked for (`book_publish`; through the inbox, in frame order)."""

    symbols: tuple[str, ...]


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


class Resumable(Protocol):
    """A collector of any exchange, as `load_resume_state` and `run_collector` see it."""

    settings: Settings
    symbols: tuple[str, ...]
    last_trade: dict[str, int]
    last_trade_ts: dict[str, int]
    metrics: CollectorMetrics
    publisher: StreamPublisher | None
    rest: RestClient
    _tg: asyncio.TaskGroup | None

    async def sleep_or_stop(self, seconds: float) -> bool: ...

    async def _process(self) -> None: ...


async def run_collector(
    target: Resumable, exchange: str, start: Callable[[asyncio.TaskGroup, Any], Coroutine[Any, Any, None]]
) -> None:
    """A collector's life, any exchange: resume from the VPS Redis, then the publisher and the processor, plus
    what `start(task_group, client)` adds (connections, polls) until they all end; closes REST and Redis."""
    client = make_client(target.settings.vps_redis_url, target.settings)
    raw = RawRedis(target.settings.vps_redis_url, target.settings, timeout=10.0)
    try:
        if not await load_resume_state(target, client, exchange):
            return  # stopped before Redis answered
        target.publisher = StreamPublisher(
            client, target.settings.stream_key, target.metrics, warm_window_s=target.settings.warm_window_s,
            last_ids=target.last_trade, exchange=exchange, raw=raw,
        )  # fmt: skip
        async with asyncio.TaskGroup() as tg:
            target._tg = tg
            tg.create_task(target.publisher.run(), name="collector-publisher")
            tg.create_task(target._process(), name="collector-processor")
            await start(tg, client)
    finally:
        await target.rest.close()
        await raw.close()
        await client.aclose()
    log.info("collector stopped: %d ticks written", target.publisher.written if target.publisher else 0)


async def load_resume_state(target: Resumable, client: Any, exchange: str) -> bool:
    """The last appended trade ID per symbol of `exchange` (its hash) and, from WARM, the newest trade time
    (written in the same MULTI as the IDs); waits for Redis (a restart of both must not crash-loop). False if
    a stop came first."""
    backoff = Backoff(base=0.2, cap=10.0)
    while True:
        try:
            stored: dict[Any, Any] = await client.hgetall(keys.for_exchange(keys.COLLECTOR_LAST_TRADE_IDS, exchange))
            break
        except TRANSIENT_ERRORS as exc:
            delay = backoff.next()
            log.warning("VPS Redis not reachable (%s), retrying in %.1fs", exc, delay)
            target.metrics.redis_errors.inc()
            if await target.sleep_or_stop(delay):
                return False
    for raw_sym, tid in stored.items():
        sym = raw_sym.decode() if isinstance(raw_sym, bytes) else raw_sym
        if sym in target.symbols:
            try:
                target.last_trade[sym] = int(tid)
            except ValueError:
                log.error("%s: stored last trade ID %r is not a number: starting without one", sym, tid)
    if not target.last_trade:
        return True
    log.info("resuming after trade IDs %s", target.last_trade)
    symbols = list(target.last_trade)
    try:
        async with client.pipeline(transaction=False) as pipe:
            for sym in symbols:
                pipe.zrange(keys.warm_key(sym, exchange), -1, -1, withscores=True)
            replies = await pipe.execute(raise_on_error=False)
    except TRANSIENT_ERRORS as exc:  # unknown: every ID at or below the stored one stays a duplicate
        log.warning("newest trade times not read (%s): a reset of trade IDs goes unnoticed until a trade", exc)
        return True
    for sym, reply in zip(symbols, replies, strict=True):
        if isinstance(reply, list) and reply:
            target.last_trade_ts[sym] = int(reply[0][1])
    return True


class CollectorBase(Service):
    """State of the collector, the public views and the emitting of ticks."""

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
            tuple[int, int, bytes | str] | SnapshotResult | BackfillResult | Switch | Disconnected | BookRequest | None
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
        self.publisher: StreamPublisher | None = None
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

    def _on_rest(self, endpoint: str, status: str) -> None:
        self.metrics.rest_requests.labels(endpoint, status).inc()

    def _on_rest_capped(self, endpoint: str, what: str) -> None:
        self.metrics.rest_capped.labels(endpoint, what).inc()

    def _hold(self, gen: int, ev: Trade | DepthDiff) -> None:
        held = self._held.get(gen)
        if held is None:
            held = self._held[gen] = deque(maxlen=MAX_HELD)
        held.append(ev)

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

    def _flush_counts(self) -> None:
        for counts, metric in ((self._n_trade, self._m_trade), (self._n_depth, self._m_depth)):
            for sym, n in counts.items():
                if n:
                    metric[sym].inc(n)
                    counts[sym] = 0

    def _on_trade(self, ev: Trade, gen: int, out: list[Item]) -> None:
        """Route a trade in ID order (the processor, `Collector._on_trade`)."""
        raise NotImplementedError
