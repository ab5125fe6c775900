"""Whole-book entries (`type=BOOK`, issue 17): what the Brain needs to hold the same book as the collector.

The collector appends its whole book for a symbol (exact decimal strings, at the book's `last_update_id`,
after every diff up to that ID in the stream) when the book becomes valid (first sync, every resync) and when
the Brain asks: the Brain's ingest function puts a symbol whose book broke into `tickbridge:book:wanted`, the
forwarder moves it to `tickbridge:book:requests` on the VPS, and `poll_book_requests` here takes it from there
every `BOOK_POLL_S`. The diffs already carry `first_update_id`/`last_update_id`, so the Brain checks the chain
itself; a snapshot is the only thing it cannot rebuild on its own.
"""

from __future__ import annotations

import logging
from typing import Any

from tickbridge.collector.base import BookRequest
from tickbridge.collector.book import DepthSync
from tickbridge.collector.book_sync import BookSync
from tickbridge.collector.publisher import Item
from tickbridge.core import keys
from tickbridge.core.redis_io import TRANSIENT_ERRORS
from tickbridge.core.tick import BookReset, BookSnapshot
from tickbridge.core.wire import now_us

log = logging.getLogger("tickbridge.collector.service")

#: How often the collector looks for snapshot requests from the Brain (VPS set `BOOK_REQUESTS`).
BOOK_POLL_S = 0.25
#: Requests taken per poll at most (a set holds each symbol once; this bounds a hostile one).
MAX_REQUESTS = 1024


def book_entry(sync: DepthSync) -> BookSnapshot:
    """The whole book of a valid `sync` as an entry (bids high->low, asks low->high)."""
    book = sync.book
    recv = now_us()
    return BookSnapshot(
        symbol=sync.symbol,
        timestamp=book.timestamp or recv,
        last_update_id=book.last_update_id,
        bids=tuple(book.sorted_bids()),
        asks=tuple(book.sorted_asks()),
        recv_ts=recv,
    )


class BookPublish(BookSync):
    """Appends BOOK entries: on every (re)sync (`_on_synced`) and on the Brain's requests."""

    def _on_synced(self, symbol: str, out: list[Item]) -> None:
        out.append(book_entry(self.depth[symbol]))
        self.metrics.book_snapshots.labels("sync").inc()

    def _on_reset(self, symbol: str, timestamp: int, reason: str, out: list[Item]) -> None:
        sync = self.depth[symbol]
        out.append(BookReset(symbol, sync.book.last_update_id, timestamp, now_us(), reason))
        self.metrics.book_snapshots.labels("reset").inc()

    def _on_book_request(self, req: BookRequest, out: list[Item]) -> None:
        """A book that is not valid now sends its entry when it syncs; a confirmed valid one goes at once."""
        for symbol in req.symbols:
            sync = self.depth.get(symbol)
            if sync is not None and sync.valid and sync.confirmed:
                out.append(book_entry(sync))
                self.metrics.book_snapshots.labels("request").inc()

    async def poll_book_requests(self, client: Any) -> None:
        """Move the Brain's snapshot requests (VPS set) into the inbox until the collector stops."""
        while not await self.sleep_or_stop(BOOK_POLL_S):
            try:
                raw = await client.spop(keys.BOOK_REQUESTS, MAX_REQUESTS)
            except TRANSIENT_ERRORS as exc:
                log.debug("book requests not read: %s", exc)
                continue
            symbols = tuple(sorted({s.decode(errors="replace") for s in raw or ()} & set(self.depth)))
            if symbols:
                log.info("the Brain asks for the books of %s", ",".join(symbols))
                await self.inbox.put(BookRequest(symbols))
