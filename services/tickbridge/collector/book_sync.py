"""Order books: diffs applied to valid books, snapshots fetched (REST) to sync or resync a book, and books
left unconfirmed after a disconnect."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tickbridge.collector.base import SnapshotResult
from tickbridge.collector.book import DepthSync, Outcome
from tickbridge.collector.publisher import Item
from tickbridge.collector.rest import RestCallFailed
from tickbridge.collector.session import Session
from tickbridge.core.backoff import Backoff
from tickbridge.core.tick import DepthDiff, TickError, check_levels
from tickbridge.core.wire import now_us

log = logging.getLogger("tickbridge.collector.service")


class BookSync(Session):
    """Depth diffs and snapshots per symbol (`DepthSync`, Binance's procedure)."""

    def _on_depth(self, sync: DepthSync, ev: DepthDiff, gen: int, out: list[Item]) -> None:
        outcome = sync.on_event(ev, primary=gen == self.primary_gen)
        if outcome is Outcome.APPLIED:
            self._joined[ev.symbol] = gen
            self._emit_depth(ev, out)
            if not sync.confirmed:  # the first update after a disconnect continued the book: nothing missed
                sync.confirmed = True
                self.metrics.book_valid.labels(ev.symbol).set(1)
                self._on_synced(ev.symbol, out)
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
            self._on_reset(ev.symbol, ev.timestamp, "update-ID gap: resync", out)
            self._request_snapshot(ev.symbol, 0.0)

    def _on_synced(self, symbol: str, out: list[Item]) -> None:
        """A book became valid (after the diffs it applied are in `out`); `BookPublish` appends it whole."""

    def _on_reset(self, symbol: str, timestamp: int, reason: str, out: list[Item]) -> None:
        """A book stopped being valid; `BookPublish` appends a book reset (the Brain's book turns invalid)."""

    def _invalidate_books(self, gen: int, out: list[Item]) -> None:
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
                self._on_reset(symbol, now_us(), "exchange connection lost", out)
        log.warning("connection %d lost: %d books unconfirmed until their next update (a gap resyncs)", gen, n)

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
        except RestCallFailed as exc:
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
            self._on_synced(symbol, out)
            log.info("%s: book synced at %d (%d buffered events applied)", symbol, sync.book.last_update_id,
                     len(applied))  # fmt: skip
        else:  # STALE or GAP: keep buffering, fetch again
            if outcome is Outcome.GAP:
                self.metrics.depth_gaps.labels(symbol).inc()
            self._request_snapshot(symbol, backoff.next())
