"""Past order books from QuestDB (issue 17): `book_at(symbol, t)` = the newest whole book at or before `t`
(`book_snapshots`) plus the diffs after it up to `t` (`depth_updates`), applied by Binance's rules.

Both tables hold levels as DOUBLE[][] (the writer's `ilp_depth` / `ilp_book`), so a past book's prices and
quantities are the exchange's values as doubles (written back as plain decimals), not its exact strings; the
live book (`books.read_book`) keeps the strings. A past book is `valid` only when the diffs continue the
snapshot's update-ID chain without a break up to `t` (the writer missing a diff, or a VPS resync between the
snapshot and `t`, makes it invalid, with the reason).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Protocol

import orjson

from tickbridge.brain.books import Book
from tickbridge.core import keys
from tickbridge.core.tick import Level


class SqlRows(Protocol):
    async def rows(self, sql: str) -> list[list[Any]]: ...


def _iso(us: int) -> str:
    from tickbridge.brain.tiered import us_to_iso  # the one formatter of COLD's time literals

    return us_to_iso(us)


def _plain(x: float) -> str:
    """A double as a plain decimal string (`1.2345E-4` -> `0.00012345`)."""
    return format(Decimal(repr(float(x))), "f")


def _levels(raw: Any) -> list[list[float]]:
    # `::varchar` text on both QuestDB paths (asyncpg cannot decode QuestDB's arrays; HTTP could).
    value = orjson.loads(raw) if isinstance(raw, str | bytes) else raw
    return list(value or [])


def _apply(side: dict[float, float], levels: list[list[float]]) -> None:
    for price, qty in levels:
        if qty == 0:
            side.pop(price, None)
        else:
            side[price] = qty


def _top(side: dict[float, float], depth: int, reverse: bool) -> tuple[Level, ...]:
    return tuple((_plain(p), _plain(side[p])) for p in sorted(side, reverse=reverse)[:depth])


async def book_at(
    qdb: SqlRows, symbol: str, t_us: int, depth: int = 20, exchange: str = keys.EXCHANGE, *, max_diffs: int = 1_000_000
) -> Book:
    """`symbol`'s book as it was at exchange time `t_us` (µs), top `depth` levels per side."""
    snap = await qdb.rows(
        "SELECT cast(timestamp AS LONG), last_update_id, bids::varchar, asks::varchar, cast(recv_ts AS LONG), valid "
        f"FROM {keys.BOOK_TABLE} WHERE symbol = '{symbol}' AND exchange = '{exchange}' "
        f"AND timestamp <= '{_iso(t_us)}' ORDER BY timestamp DESC, last_update_id DESC LIMIT 1"
    )
    if not snap:
        return Book(symbol, (), (), 0, 0, False, f"no whole book at or before {_iso(t_us)}")
    ts, u, raw_bids, raw_asks, recv, whole = snap[0]
    ts, u = int(ts), int(u)
    if whole is False or whole == "false":
        return Book(symbol, (), (), u, ts, False, f"the VPS book stopped being valid after {u}, before {_iso(t_us)}")
    bids = {float(p): float(q) for p, q in _levels(raw_bids)}
    asks = {float(p): float(q) for p, q in _levels(raw_asks)}
    diffs = await qdb.rows(
        "SELECT cast(timestamp AS LONG), first_update_id, last_update_id, bids::varchar, asks::varchar, "
        f"cast(recv_ts AS LONG) FROM {keys.DEPTH_TABLE} WHERE symbol = '{symbol}' AND exchange = '{exchange}' "
        f"AND timestamp >= '{_iso(ts)}' AND timestamp <= '{_iso(t_us)}' AND last_update_id > {u} "
        f"ORDER BY last_update_id LIMIT {max_diffs}"
    )
    reason = ""
    for d_ts, first, last, d_bids, d_asks, d_recv in diffs:
        if int(first) > u + 1:
            reason = f"update-ID break in the history: book at {u}, next diff from {first}"
            break
        _apply(bids, _levels(d_bids))
        _apply(asks, _levels(d_asks))
        ts, u, recv = int(d_ts), int(last), d_recv
    return Book(symbol, _top(bids, depth, True), _top(asks, depth, False), u, ts, not reason, reason, int(recv or 0))
