"""The normalized tick: trades and order-book diffs, validated on construction.

Their encodings (stream entries, WARM members, QuestDB rows) live in `tickbridge.core.wire`. Decimal values
stay the exchange's strings end to end; only QuestDB stores them as DOUBLE.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import chain
from typing import Literal

from tickbridge.core.keys import EXCHANGE, EXCHANGES

Side = Literal["BUY", "SELL"]
Level = tuple[str, str]

# `\Z`, not `$`: `$` also matches before a trailing newline ("BTCUSDT\n" would pass).
_DECIMAL = re.compile(r"^[0-9]{1,20}(\.[0-9]{1,18})?\Z")
_SYMBOL = re.compile(r"^[A-Z0-9]{2,32}\Z")
#: Plausible exchange times in µs: 2017-01-01 .. 2100-01-01.
MIN_TS_US = 1_483_228_800_000_000
MAX_TS_US = 4_102_444_800_000_000
MAX_ID = 2**63 - 1
MAX_LEVELS = 10_000


class TickError(ValueError):
    """A record that is not a valid tick; the message says why in one line."""


def check_decimal(name: str, value: object, *, positive: bool) -> str:
    """A non-negative decimal string as the exchange sends it (`"2600.01000000"`)."""
    if not isinstance(value, str):
        raise TickError(f"{name}: expected a decimal string, got {type(value).__name__}")
    if not _DECIMAL.match(value):
        raise TickError(f"{name}: not a plain decimal string: {value[:40]!r}")
    # At most 20 integer digits: always finite, so no float() per value (a per-tick cost); zero is all zeros.
    if positive and not value.strip("0."):
        raise TickError(f"{name}: must be > 0, got {value!r}")
    return value


def check_int(name: str, value: object, lo: int = 0, hi: int = MAX_ID) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TickError(f"{name}: expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise TickError(f"{name}: {value} out of range [{lo}, {hi}]")
    return value


#: Symbols that passed `check_symbol` (a few hundred at most in practice; capped): a set lookup per tick instead
#: of a regex match.
_VALID_SYMBOLS: set[str] = set()


def check_symbol(value: object) -> str:
    if type(value) is str and value in _VALID_SYMBOLS:
        return value
    if not isinstance(value, str) or not _SYMBOL.match(value):
        raise TickError(f"symbol: invalid {str(value)[:40]!r}")
    if len(_VALID_SYMBOLS) < 10_000:
        _VALID_SYMBOLS.add(value)
    return value


def check_exchange(value: object) -> str:
    """One of `keys.EXCHANGES`: the exchange names Redis keys (`market:<exchange>:trades:<SYMBOL>`), so a stray
    value would write outside the keys the ACLs allow (and stall the consumer) or where nobody reads."""
    if value not in EXCHANGES:
        raise TickError(f"exchange: expected one of {', '.join(EXCHANGES)}, got {str(value)[:40]!r}")
    return str(value)


#: A whole side of valid levels, joined as `price\0qty\0...`: a price is a decimal with a non-zero digit, a quantity
#: any decimal (`_DECIMAL`'s rules; no value can contain the NUL that separates them, see `check_levels`).
_PAIR_TYPES: set[type] = {list, tuple}
_JOINED_LEVELS = re.compile(r"(?:(?=[0-9.]*[1-9])[0-9]{1,20}(?:\.[0-9]{1,18})?\0[0-9]{1,20}(?:\.[0-9]{1,18})?\0)*")


def check_levels(name: str, value: object) -> tuple[Level, ...]:
    """A side of an order book as `(price, qty)` string pairs: at most MAX_LEVELS, each a 2-item list or tuple of a
    price > 0 and a quantity >= 0 as plain decimal strings. One regex over the joined side when it is valid (a
    depth diff's side in less than half the time of a check per value, for the Binance collector and the Brain
    consumer); anything else goes through the check per level, which names the first bad value."""
    if type(value) is list or type(value) is tuple:
        if not value:
            return ()
        # Type and length checks by C-level map() (a Python loop per level would cost as much as the match).
        if len(value) <= MAX_LEVELS and set(map(type, value)) <= _PAIR_TYPES and set(map(len, value)) == {2}:
            flat: list[str] = list(chain.from_iterable(value))
            try:
                text = "\0".join(flat) + "\0"
            except TypeError:  # a value that is not a string
                text = ""
            # A NUL inside a value would shift the pairs: the count rules it out before the match.
            if text.count("\0") == len(flat) and _JOINED_LEVELS.fullmatch(text):
                return tuple(zip(flat[0::2], flat[1::2], strict=True))
    return _check_levels_each(name, value)


def _check_levels_each(name: str, value: object) -> tuple[Level, ...]:
    if not isinstance(value, list | tuple):
        raise TickError(f"{name}: expected a list of [price, qty], got {type(value).__name__}")
    if len(value) > MAX_LEVELS:
        raise TickError(f"{name}: {len(value)} levels exceeds {MAX_LEVELS}")
    levels: list[Level] = []
    for level in value:
        if not isinstance(level, list | tuple) or len(level) != 2:
            raise TickError(f"{name}: level must be [price, qty], got {str(level)[:40]}")
        levels.append((check_decimal(f"{name}.price", level[0], positive=True),
                       check_decimal(f"{name}.qty", level[1], positive=False)))  # fmt: skip
    return tuple(levels)


@dataclass(frozen=True, slots=True)
class Trade:
    """One exchange trade. `timestamp` is the exchange trade time (µs), `recv_ts` the collector's (µs)."""

    symbol: str
    price: str
    volume: str
    side: Side
    timestamp: int
    trade_id: int
    recv_ts: int
    exchange: str = EXCHANGE

    def __post_init__(self) -> None:
        check_symbol(self.symbol)
        check_exchange(self.exchange)
        check_decimal("price", self.price, positive=True)
        check_decimal("volume", self.volume, positive=True)
        if self.side not in ("BUY", "SELL"):
            raise TickError(f"side: expected BUY or SELL, got {self.side!r}")
        check_int("timestamp", self.timestamp, MIN_TS_US, MAX_TS_US)
        check_int("trade_id", self.trade_id)
        check_int("recv_ts", self.recv_ts, MIN_TS_US, MAX_TS_US)


@dataclass(frozen=True, slots=True)
class DepthDiff:
    """One order-book diff event (`depthUpdate`): absolute quantities, `"0"` removes a level."""

    symbol: str
    timestamp: int
    first_update_id: int
    last_update_id: int
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    recv_ts: int
    exchange: str = EXCHANGE

    def __post_init__(self) -> None:
        _check_book_event(self)
        check_int("first_update_id", self.first_update_id)
        if self.last_update_id < self.first_update_id:
            raise TickError(f"last_update_id {self.last_update_id} < first_update_id {self.first_update_id}")


Tick = Trade | DepthDiff
#: One side of a book.
Levels = tuple[Level, ...]


def _check_book_event(ev: DepthDiff | BookSnapshot | BookReset) -> None:
    """What a diff and a whole book share: symbol, exchange, times and the last update ID."""
    check_symbol(ev.symbol)
    check_exchange(ev.exchange)
    check_int("timestamp", ev.timestamp, MIN_TS_US, MAX_TS_US)
    check_int("last_update_id", ev.last_update_id)
    check_int("recv_ts", ev.recv_ts, MIN_TS_US, MAX_TS_US)


@dataclass(frozen=True, slots=True)
class BookSnapshot:
    """A whole local order book at `last_update_id` (the collector's, `type=BOOK` entry): bids high->low, asks
    low->high, the exchange's decimal strings. `timestamp` is the exchange time of the last diff applied (µs)."""

    symbol: str
    #: exchange time (µs) of the newest diff the book includes
    timestamp: int
    #: the update ID of that diff: the book continues with the diff whose range holds `last_update_id + 1`
    last_update_id: int
    #: (price, quantity) exact strings, bids high->low, asks low->high
    bids: Levels
    asks: Levels
    #: when the collector took the book (µs)
    recv_ts: int
    exchange: str = EXCHANGE

    def __post_init__(self) -> None:
        _check_book_event(self)


@dataclass(frozen=True, slots=True)
class BookReset:
    """The collector's book of `symbol` stopped being known to match the exchange after `last_update_id` (an
    update-ID gap: a resync starts; a disconnect: unconfirmed until the next update). `type=RESYNC` entry: the
    Brain marks its book invalid until the next whole book. `timestamp`: when it was noticed (µs)."""

    symbol: str
    last_update_id: int
    timestamp: int
    recv_ts: int
    reason: str
    exchange: str = EXCHANGE

    def __post_init__(self) -> None:
        _check_book_event(self)
        if not self.reason or len(self.reason) > 200 or not self.reason.isprintable():
            raise TickError(f"reason: expected 1..200 printable characters, got {self.reason[:40]!r}")
