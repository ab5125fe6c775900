"""Local order book per symbol, kept by Binance's documented procedure (binance-protocol.md §4).

`DepthSync` is the per-symbol state machine: it buffers diff events from the stream's start (and
across snapshot retries), loads a snapshot whose `lastUpdateId` is not older than the first buffered
`U`, drops `u <= lastUpdateId`, applies the straddling event and then requires continuity
(`U == previous u + 1`; `U > id + 1` is a gap: only this symbol goes back to SYNCING).

Events from a connection that is not the primary one (the make-before-break overlap) never cause a
resync: if they are ahead of the book they are ignored, since the primary connection delivers them.
Every event returned as applied extends the book's update-ID sequence by exactly the event's range, so
the diff stream appended downstream is contiguous and deduplicated per symbol between resyncs.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Sequence
from decimal import Decimal

from tickbridge.core.tick import DepthDiff, Level

#: Events kept while waiting for a snapshot; the oldest go first (the rest stays contiguous).
MAX_BUFFERED = 20_000


def _is_zero(qty: str) -> bool:
    return not qty.strip("0.")


class OrderBook:
    """Price -> quantity per side. Prices are the exchange's strings (one format per symbol)."""

    __slots__ = ("asks", "bids", "last_update_id", "timestamp")

    def __init__(self) -> None:
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}
        self.last_update_id = 0
        self.timestamp = 0  # exchange time (µs) of the last diff applied; 0 = none since the snapshot

    def load_snapshot(self, last_update_id: int, bids: Iterable[Sequence[str]], asks: Iterable[Sequence[str]]) -> None:
        self.bids = {p: q for p, q in bids if not _is_zero(q)}
        self.asks = {p: q for p, q in asks if not _is_zero(q)}
        self.last_update_id = last_update_id

    def apply(self, bids: Iterable[Level], asks: Iterable[Level], last_update_id: int) -> None:
        """Absolute quantities; zero removes the level (absent levels are fine to remove)."""
        for side, levels in ((self.bids, bids), (self.asks, asks)):
            for price, qty in levels:
                if _is_zero(qty):
                    side.pop(price, None)
                else:
                    side[price] = qty
        self.last_update_id = last_update_id

    def sorted_bids(self) -> list[Level]:
        return sorted(self.bids.items(), key=lambda kv: Decimal(kv[0]), reverse=True)

    def sorted_asks(self) -> list[Level]:
        return sorted(self.asks.items(), key=lambda kv: Decimal(kv[0]))

    def snapshot(self) -> tuple[int, list[Level], list[Level]]:
        """`(last_update_id, bids high->low, asks low->high)` for tests and tools."""
        return self.last_update_id, self.sorted_bids(), self.sorted_asks()


class BookState(enum.Enum):
    SYNCING = 0
    VALID = 1


class Outcome(enum.Enum):
    APPLIED = "applied"  # extended the book (returned for emission)
    DUPLICATE = "duplicate"  # u <= book id (or <= the last buffered u)
    BUFFERED = "buffered"  # waiting for a snapshot
    AHEAD = "ahead"  # from a non-primary connection, beyond the book: ignored
    GAP = "gap"  # primary event beyond id + 1: the book is discarded, resync starts
    STALE = "stale"  # snapshot older than the first buffered event: fetch again
    SYNCED = "synced"  # snapshot loaded and the buffer applied


class DepthSync:
    """One symbol's book plus its sync state machine."""

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.book = OrderBook()
        self.state = BookState.SYNCING
        self.buffer: deque[DepthDiff] = deque(maxlen=MAX_BUFFERED)
        #: False from a disconnect until the next update shows the book missed nothing (or a resync).
        self.confirmed = True

    @property
    def valid(self) -> bool:
        return self.state is BookState.VALID

    def on_event(self, ev: DepthDiff, primary: bool = True) -> Outcome:
        """Feed one diff event; `APPLIED` means it is now part of the book (emit it)."""
        if self.state is BookState.VALID:
            book = self.book
            if ev.last_update_id <= book.last_update_id:
                return Outcome.DUPLICATE
            if ev.first_update_id > book.last_update_id + 1:
                if not primary:
                    return Outcome.AHEAD
                self._start_resync(ev)
                return Outcome.GAP
            book.apply(ev.bids, ev.asks, ev.last_update_id)
            book.timestamp = ev.timestamp
            return Outcome.APPLIED
        buf = self.buffer
        if buf:
            last = buf[-1].last_update_id
            if ev.last_update_id <= last:
                return Outcome.DUPLICATE
            if ev.first_update_id > last + 1:
                if not primary:
                    return Outcome.AHEAD
                buf.clear()  # the buffer must be contiguous: restart it from here
        buf.append(ev)
        return Outcome.BUFFERED

    def _start_resync(self, ev: DepthDiff | None) -> None:
        self.state = BookState.SYNCING
        self.confirmed = True  # a resync confirms by itself (the snapshot sequence)
        self.buffer.clear()
        if ev is not None:
            self.buffer.append(ev)

    def reset(self) -> None:
        """Discard the book and start buffering again (e.g. a failed snapshot sequence)."""
        self.book = OrderBook()
        self._start_resync(None)

    def needs_snapshot(self) -> bool:
        return self.state is BookState.SYNCING and bool(self.buffer)

    def on_snapshot(
        self, last_update_id: int, bids: Iterable[Sequence[str]], asks: Iterable[Sequence[str]]
    ) -> tuple[Outcome, list[DepthDiff]]:
        """Load a REST snapshot; returns `(SYNCED, applied buffered events)`, `STALE` or `GAP`."""
        if self.state is BookState.VALID:
            return Outcome.DUPLICATE, []
        if not self.buffer or last_update_id < self.buffer[0].first_update_id:
            return Outcome.STALE, []  # keep buffering, fetch again
        self.book = OrderBook()
        self.book.load_snapshot(last_update_id, bids, asks)
        self.state = BookState.VALID
        pending = list(self.buffer)
        self.buffer.clear()
        # The book's time until a diff applies: the newest event the snapshot already covers.
        self.book.timestamp = max((ev.timestamp for ev in pending if ev.last_update_id <= last_update_id), default=0)
        applied: list[DepthDiff] = []
        for i, ev in enumerate(pending):
            outcome = self.on_event(ev)
            if outcome is Outcome.GAP:  # no event straddles lastUpdateId + 1: start over from here
                self.buffer.extend(pending[i + 1 :])
                return Outcome.GAP, applied
            if outcome is Outcome.APPLIED:
                applied.append(ev)
        return Outcome.SYNCED, applied
