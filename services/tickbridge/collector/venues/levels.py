"""Price levels of one order book, keyed by value (a venue may spell one price two ways: `45283.5`, `45283.50`),
each level keeping the strings as the venue sent them (Kraken's checksum is computed over those strings)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation

from tickbridge.collector.venues.base import VenueError
from tickbridge.core.tick import Level


def is_zero(qty: str) -> bool:
    return not qty.strip("0.")


def _key(price: str) -> Decimal:
    try:
        return Decimal(price)
    except InvalidOperation:  # validated levels never get here; a direct caller might
        raise VenueError(f"price: not a decimal: {price[:40]!r}") from None


class LevelBook:
    """Bids and asks: price value -> (price, qty) as sent. Absolute quantities; zero removes a level."""

    __slots__ = ("asks", "bids")

    def __init__(self) -> None:
        self.bids: dict[Decimal, Level] = {}
        self.asks: dict[Decimal, Level] = {}

    def clear(self) -> None:
        self.bids.clear()
        self.asks.clear()

    def load(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        self.clear()
        self.apply(bids, asks)

    def apply(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        """Levels in the order sent: a later one for the same price wins."""
        for side, levels in ((self.bids, bids), (self.asks, asks)):
            for price, qty in levels:
                if is_zero(qty):
                    side.pop(_key(price), None)
                else:
                    side[_key(price)] = (price, qty)

    def top_bids(self, n: int) -> list[Level]:
        return [self.bids[k] for k in heapq.nlargest(n, self.bids)]

    def top_asks(self, n: int) -> list[Level]:
        return [self.asks[k] for k in heapq.nsmallest(n, self.asks)]

    def truncate(self, depth: int) -> None:
        """Keep the best `depth` levels per side (a venue that streams only that depth never removes the ones
        that fall out of it)."""
        for side, worst in ((self.bids, heapq.nsmallest), (self.asks, heapq.nlargest)):
            excess = len(side) - depth
            if excess > 0:
                for k in worst(excess, side):
                    del side[k]

    def crossed(self) -> bool:
        """Best bid at or above best ask: a book no venue publishes, so ours is wrong."""
        return bool(self.bids and self.asks) and max(self.bids) >= min(self.asks)


class SyncedBook:
    """What a venue's book has besides its procedure: its levels, whether they are in sync, and the updates
    applied since the last snapshot. A subclass adds `apply` (the procedure)."""

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.levels = LevelBook()
        self._valid = False
        #: Updates applied since the last snapshot (the book's own count).
        self.updates = 0

    @property
    def valid(self) -> bool:
        return self._valid

    def invalidate(self) -> None:
        """Out of sync (a gap, a mismatch, a lost connection): the levels are dropped until a snapshot."""
        self._valid = False
        self.levels.clear()

    def top(self, n: int) -> tuple[list[Level], list[Level]]:
        """Bids high to low and asks low to high, `n` levels each at most."""
        return self.levels.top_bids(n), self.levels.top_asks(n)
