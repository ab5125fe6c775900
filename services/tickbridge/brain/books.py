"""Order books on the Brain (issue 17): what trading code reads, and the checks of a whole-book entry.

The book itself is kept in the Brain Redis by the consumer's ingest call (`book.lua` inside the
tickbridge_brain library): whole-book entries (`type=BOOK`) replace it, diffs extend it only along an unbroken
update-ID chain, and a break marks it invalid until the next whole book. `read_book` reads the state and the
top levels in one function call, so a reader never gets levels of one update ID with the state of another,
and never an invalid book marked valid.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from tickbridge.core import keys
from tickbridge.core.redis_io import execute_packed
from tickbridge.core.tick import BookReset, BookSnapshot, DepthDiff, Level, TickError
from tickbridge.core.wire import decode_book, encode_book, encode_depth, encode_reset

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


def book_verdict(fields: list[bytes], symbols: frozenset[bytes]) -> BookSnapshot | BookReset | str:
    """The whole book or book reset `fields` holds, or why it is dead-lettered (not valid, or a symbol not in
    SYMBOLS)."""
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


def book_record(
    entry_id: bytes | str, target: int, book: int, tick: DepthDiff | BookSnapshot | BookReset
) -> list[str | bytes | int]:
    """brain.lua's `'q'` record: the entry for the per-symbol depth stream (contract order), then its levels flat
    (count of values, price, qty, ... per side) for the book, so the ingest call decodes no JSON."""
    if isinstance(tick, BookReset):
        fields, bids, asks = encode_reset(tick), [], []
    else:
        fields = encode_depth(tick) if isinstance(tick, DepthDiff) else encode_book(tick)
        bids = [x for level in tick.bids for x in level]
        asks = [x for level in tick.asks for x in level]
    return ["q", entry_id, target, book, len(fields), *fields, len(bids), *bids, len(asks), *asks]


BOOK_APPLY_FUNCTION = "tickbridge_book_apply"


def book_apply_call(items: Sequence[DepthDiff | BookSnapshot | BookReset]) -> list[str | bytes | int]:
    """`FCALL tickbridge_book_apply` of book entries in stream order (the fast-forward live lane, issue 16):
    the books only, by the same rules as the ingest call (book.lua), so an entry seen twice is stale."""
    key_list: list[str] = []
    known: dict[str, int] = {}
    args: list[str | bytes | int] = []
    for tick in items:
        # book_record's layout from its book index on (no entry ID, no stream target).
        args += book_record(b"", 0, book_keys_index(tick.symbol, key_list, known), tick)[3:]
    return ["FCALL", BOOK_APPLY_FUNCTION, len(key_list), *key_list, *args]


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


#: Levels per side the HOT copy keeps (a deeper `book()` reads WARM).
HOT_BOOK_DEPTH = 20


class HotBooks:
    """In-process copies of the Brain's books (top `depth` levels), for `TieredMarketData.book()` at HOT speed.

    Follows the per-symbol depth streams (every diff and whole book the consumer applied is appended there in
    the same call) and re-reads a symbol's book after each batch of its entries, so a copy is never older than
    the newest entry seen and carries the book's own `valid` flag. After a Redis error the copies are dropped
    (answers come from WARM) until the follower reads them again.
    """

    def __init__(self, client: aioredis.Redis, symbols: Sequence[str], exchange: str = keys.EXCHANGE,
                 depth: int = HOT_BOOK_DEPTH) -> None:  # fmt: skip
        self.client = client
        self.symbols = list(symbols)
        self.exchange = exchange
        self.depth = depth
        self.books: dict[str, Book] = {}
        self.ready = False

    def get(self, symbol: str, depth: int) -> Book | None:
        """The HOT copy cut to `depth` levels, or None (not followed, not read yet, or deeper than kept)."""
        book = self.books.get(symbol)
        if book is None or depth > self.depth:
            return None
        if len(book.bids) <= depth and len(book.asks) <= depth:
            return book
        return Book(book.symbol, book.bids[:depth], book.asks[:depth], book.last_update_id, book.timestamp,
                    book.valid, book.reason, book.recv_ts)  # fmt: skip

    async def refresh(self, symbols: Sequence[str]) -> None:
        replies = await execute_packed(self.client, [book_command(s, self.depth, self.exchange) for s in symbols])
        for symbol, reply in zip(symbols, replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply
            self.books[symbol] = parse_book(symbol, reply)

    async def run(self, errors: tuple[type[BaseException], ...], on_error: Any) -> None:
        """Follow until cancelled; `errors` drop the copies, call `on_error(exc)` and retry after 1 s."""
        streams = {keys.depth_key(s, self.exchange): s for s in self.symbols}
        while True:
            try:
                # Each stream's last ID first, then the books: an entry appended in between is read again below.
                infos = await execute_packed(self.client, [["XINFO", "STREAM", st] for st in streams])
                last = {}
                for stream, info in zip(streams, infos, strict=True):
                    if isinstance(info, BaseException):
                        if "no such key" not in str(info).lower():
                            raise info
                        last[stream] = "0-0"  # no diff yet: read from the start
                    else:
                        fields = info if isinstance(info, dict) else dict(zip(info[::2], info[1::2], strict=False))
                        top = fields.get(b"last-generated-id", b"0-0")
                        last[stream] = top.decode() if isinstance(top, bytes) else str(top)
                await self.refresh(self.symbols)
                self.ready = True
                while True:
                    cmd: list[str | int] = ["XREAD", "COUNT", 1000, "BLOCK", 1000, "STREAMS", *last, *last.values()]
                    (reply,) = await execute_packed(self.client, [cmd])
                    if isinstance(reply, BaseException):
                        raise reply
                    if not reply:
                        continue
                    items = reply.items() if isinstance(reply, dict) else reply
                    changed = []
                    for stream, entries in items:
                        name = stream.decode()
                        if entries:
                            last[name] = entries[-1][0].decode()
                            changed.append(streams[name])
                    if changed:
                        await self.refresh(changed)
            except errors as exc:
                self.books.clear()
                self.ready = False
                if "function not found" in str(exc).lower():  # no consumer has loaded the library yet: no books
                    await asyncio.sleep(5.0)
                    continue
                on_error(exc)
                await asyncio.sleep(1.0)


async def invalid_books(client: aioredis.Redis, symbols: Sequence[str], exchange: str = keys.EXCHANGE) -> list[str]:
    """The symbols whose Brain book is not valid now (missing counts as not valid); one round trip."""
    replies = await execute_packed(client, [["HGET", keys.book_keys(s, exchange)[0], "valid"] for s in symbols])
    bad = []
    for symbol, reply in zip(symbols, replies, strict=True):
        if isinstance(reply, BaseException):
            raise reply
        if reply != b"1":
            bad.append(symbol)
    return bad
