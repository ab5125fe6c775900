"""The collector service: connection manager, frame processor, and the Redis publisher.

Data flow: one reader task per WebSocket connection puts raw frames into a bounded inbox (a full inbox
stops the reader: TCP backpressure). A single processor task parses, deduplicates and routes them, so
every per-symbol decision (trade-ID order, book updates) happens in one place, in order; REST work
(snapshots, trade back-fill) runs in background tasks whose results come back through the same inbox.
The processor hands batches to the `StreamPublisher` through a second bounded queue.

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
from typing import Any

from tickbridge.collector.backfill import Backfill, _ahead
from tickbridge.collector.base import (
    HANDOVER_S,
    ID_RESET_SLACK_US,
    MAX_AHEAD_US,
    MAX_BACKFILL,
    MAX_HELD,
    MAX_PARKED,
    OUT_BATCH,
    WS_MAX_SIZE,
    BackfillResult,
    BookRequest,
    Connection,
    Disconnected,
    SnapshotResult,
    Switch,
    run_collector,
    stream_url,
)
from tickbridge.collector.parser import (
    FUTURE_TIME,
    ControlReply,
    Rejected,
    ServerShutdown,
    parse_frame,
)  # fmt: skip
from tickbridge.collector.publisher import FrameDeadLetter, Item
from tickbridge.core import keys
from tickbridge.core.tick import MAX_TS_US, DepthDiff, Trade

log = logging.getLogger(__name__)

__all__ = [
    "ID_RESET_SLACK_US",
    "MAX_AHEAD_US",
    "MAX_BACKFILL",
    "MAX_HELD",
    "MAX_PARKED",
    "OUT_BATCH",
    "WS_MAX_SIZE",
    "BackfillResult",
    "Collector",
    "Connection",
    "Disconnected",
    "SnapshotResult",
    "Switch",
    "stream_url",
]


class Collector(Backfill):
    """Binance WebSocket -> HOT deque + WARM sorted sets + the VPS stream."""

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        await run_collector(self, keys.EXCHANGE, self._start)

    async def _start(self, tg: asyncio.TaskGroup, client: Any) -> None:
        tg.create_task(self._manage(), name="collector-connections")
        tg.create_task(self.poll_book_requests(client), name="collector-book-requests")

    # --- processing ---------------------------------------------------------------------------

    async def _process(self) -> None:
        assert self.publisher is not None
        publisher = self.publisher
        out: list[Item] = []
        inbox = self.inbox
        clock = time.perf_counter
        while True:
            item = await inbox.get()
            stop = False
            started = clock()
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
                    self._invalidate_books(item.gen, out)
                elif isinstance(item, BookRequest):
                    self._on_book_request(item, out)
                else:
                    self._on_snapshot(item, out)
                if len(out) >= OUT_BATCH:
                    await self._flush(out)
                    out = []
                elif out and publisher.waiting and clock() - started > HANDOVER_S:
                    # Only to an idle publisher: one with a transaction in flight takes what queued meanwhile
                    # anyway, and at high rates the handovers would cost CPU for nothing.
                    await publisher.put(out)
                    out = []
                    await asyncio.sleep(0)  # the publisher sends it now, Redis runs it while we go on
                    started = clock()
                if inbox.empty():
                    break
                item = inbox.get_nowait()
            if out:
                await self._flush(out)
                out = []
            if stop:
                await publisher.close_input()
                return

    async def _flush(self, out: list[Item]) -> None:
        assert self.publisher is not None
        self._flush_counts()
        for i in range(0, len(out), OUT_BATCH):  # a large back-fill goes out in transactions of OUT_BATCH
            await self.publisher.put(out[i : i + OUT_BATCH])

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

    def _dead_letter(self, rej: Rejected, recv: int, out: list[Item]) -> None:
        self.metrics.dead_letters.labels(rej.reason).inc()
        out.append(FrameDeadLetter(rej.reason, rej.detail, rej.raw, recv))

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


def _raw(raw: bytes | str) -> bytes:
    return (raw.encode() if isinstance(raw, str) else raw)[:4096]
