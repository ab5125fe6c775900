"""Order books on the Brain (issue 17): what trading code reads, and the checks of a whole-book entry.

The book itself is kept in the Brain Redis by the consumer's ingest call (`book.lua` inside the
tickbridge_brain library): whole-book entries (`type=BOOK`) replace it, diffs extend it only along an unbroken
update-ID chain, and a break marks it invalid until the next whole book. `read_book` reads the state and the
top levels in one function call, so a reader never gets levels of one update ID with the state of another,
and never an invalid book marked valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from tickbridge.core import keys
from tickbridge.core.redis_io import execute_packed
from tickbridge.core.tick import BookSnapshot, Level, TickError
from tickbridge.core.wire import decode_book

#: The read-only Redis function returning a book's state and top levels (book.lua).
BOOK_READ_FUNCTION = "tickbridge_book_read"
#: Levels per side a read returns at most.
MAX_DEPTH = 5000


@dataclass(frozen=True, slots=True)
class Book:
    """A symbol's order book as the Brain holds it: bids high->low, asks low->high (exchange decimal strings).

    `valid` is False while the book waits for a snapshot (after an update-ID break, before the first snapshot,
    after lost state); its levels are then the last ones known and must not be traded on. `reason` says why.
    """

    symbol: str
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    last_update_id: int
    timestamp: int  # exchange time (µs) of the last diff (or snapshot) applied
    valid: bool
    reason: str = ""
    recv_ts: int = 0  # the collector's receive time (µs) of what was applied last

    @property
    def best_bid(self) -> Level | None:
        return self.bids[0] if self.bids else None

    @property
    def best_ask(self) -> Level | None:
        return self.asks[0] if self.asks else None


def book_verdict(fields: list[bytes], symbols: frozenset[bytes]) -> BookSnapshot | str:
    """The whole-book entry `fields` holds, or why it is dead-lettered (not valid, or a symbol not in SYMBOLS)."""
    try:
        book = decode_book(fields)
    except TickError as exc:
        return str(exc)
    if book.symbol.encode() not in symbols:
        return f"symbol {book.symbol!r} not in SYMBOLS"
    return book


def book_keys_index(symbol: str, key_list: list[str], known: dict[str, int]) -> int:
    """The FCALL key index of `symbol`'s book: its four keys and the wanted set, appended to `key_list` once
    per call, consecutive (book.lua addresses them from the first; Redis indexes KEYS from 1)."""
    idx = known.get(symbol)
    if idx is None:
        key_list.extend((*keys.book_keys(symbol), keys.BOOK_WANTED))
        idx = known[symbol] = len(key_list) - 4
    return idx


def _pairs(flat: Sequence[bytes]) -> tuple[Level, ...]:
    return tuple((flat[i].decode(), flat[i + 1].decode()) for i in range(0, len(flat) - 1, 2))


def parse_book(symbol: str, reply: Sequence[Any]) -> Book:
    """A `tickbridge_book_read` reply as a `Book` (a missing book: empty, invalid, reason 'no book yet')."""
    flat_state, bids, asks = reply
    state = {flat_state[i].decode(): flat_state[i + 1].decode() for i in range(0, len(flat_state) - 1, 2)}
    if not state:
        return Book(symbol, (), (), 0, 0, False, "no book yet")
    return Book(
        symbol=symbol,
        bids=_pairs(bids),
        asks=_pairs(asks),
        last_update_id=int(state.get("last_update_id", 0)),
        timestamp=int(state.get("timestamp", 0)),
        valid=state.get("valid") == "1",
        reason=state.get("reason", ""),
        recv_ts=int(state.get("recv_ts", 0)),
    )


def book_command(symbol: str, depth: int, exchange: str = keys.EXCHANGE) -> list[str | int]:
    """The FCALL_RO reading `symbol`'s book, `depth` levels per side (1..MAX_DEPTH)."""
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be 1..{MAX_DEPTH}, got {depth}")
    return ["FCALL_RO", BOOK_READ_FUNCTION, 4, *keys.book_keys(symbol, exchange), depth]


async def read_book(client: aioredis.Redis, symbol: str, depth: int = 20) -> Book:
    """`symbol`'s book from the Brain Redis (state and levels of one update ID)."""
    (reply,) = await execute_packed(client, [book_command(symbol, depth)])
    if isinstance(reply, BaseException):
        raise reply
    return parse_book(symbol, reply)
