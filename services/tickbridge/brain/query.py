"""`tickbridge query <SYMBOL>`: recent trades or a time range from the tiered cache, as a table."""

from __future__ import annotations

import argparse
import asyncio
import re
from datetime import UTC, datetime

import aiohttp
from prometheus_client import CollectorRegistry
from redis.exceptions import ResponseError
from rich.console import Console
from rich.table import Table

from tickbridge.brain.books import Book
from tickbridge.brain.tiered import Answer, TieredMarketData, us_to_iso
from tickbridge.core.questdb_io import QuestDBError
from tickbridge.core.redis_io import TRANSIENT_ERRORS, make_client
from tickbridge.core.settings import die, load_settings
from tickbridge.core.tick import TickError, check_symbol
from tickbridge.core.wire import now_us

#: Servers unreachable or refusing the query (e.g. a WARM key of the wrong type): one line, exit 1.
QUERY_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ResponseError, QuestDBError, aiohttp.ClientError)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s|m|h|d)$")
_UNIT_US = {"us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}


def parse_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0: {text!r}")
    return n


def parse_duration_us(text: str) -> int:
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 30s, 5m, 2h: {text!r}")
    return int(float(match.group(1)) * _UNIT_US[match.group(2)])


def parse_time_us(text: str) -> int:
    """ISO-8601 (UTC if no zone) or microseconds since the epoch."""
    if text.isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ISO-8601 time or epoch µs: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1_000_000)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `tickbridge query` (the CLI's sub-parser)."""
    p.description = __doc__
    p.add_argument("symbol", help="e.g. BTCUSDT")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--recent", type=parse_count, metavar="N", help="the newest N trades (default 20)")
    what.add_argument("--since", type=parse_duration_us, metavar="DURATION", help="trades of the last 30s, 5m, 2h, ...")
    what.add_argument("--start", type=parse_time_us, metavar="TIME", help="range start (ISO-8601 UTC or epoch µs)")
    what.add_argument(
        "--book",
        type=parse_count,
        nargs="?",
        const=20,
        metavar="DEPTH",
        help="the order book instead of trades: top DEPTH levels per side (default 20) and its validity",
    )
    p.add_argument("--end", type=parse_time_us, metavar="TIME", help="range end (default now)")
    p.add_argument("--limit", type=int, default=200, help="rows shown at most (default 200; the newest)")
    p.add_argument("--no-follow", action="store_true", help="skip the HOT tier (answer from WARM/COLD only)")


def render(symbol: str, answer: Answer, limit: int, console: Console) -> None:
    rows = answer.rows[-limit:]
    table = Table(
        title=f"{symbol}: {len(answer.rows)} trades",
        caption=f"tiers: {' + '.join(answer.tiers)}   {answer.seconds * 1000:.2f} ms"
        + (f"   (showing newest {len(rows)})" if len(rows) < len(answer.rows) else ""),
    )
    for name, justify in (("time (UTC)", "left"), ("trade_id", "right"), ("side", "left"), ("price", "right"),
                          ("volume", "right"), ("delay ms", "right")):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        style = "green" if r.side == "BUY" else "red"
        delay = f"{(r.recv_ts - r.timestamp) / 1000:.1f}" if r.recv_ts else ""
        table.add_row(
            us_to_iso(r.timestamp), str(r.trade_id), f"[{style}]{r.side}[/]", f"{r.price:g}", f"{r.volume:g}", delay
        )
    console.print(table)


def render_book(book: Book, console: Console) -> None:
    """Bids and asks side by side, best first, with the book's update ID, time and validity."""
    state = "[green]valid[/]" if book.valid else f"[red]NOT VALID[/] ({book.reason})"
    when = us_to_iso(book.timestamp) if book.timestamp else "-"
    table = Table(title=f"{book.symbol} order book: {state}",
                  caption=f"last update ID {book.last_update_id}   exchange time {when}")  # fmt: skip
    for name in ("bid qty", "bid", "ask", "ask qty"):
        table.add_column(name, justify="right")
    for i in range(max(len(book.bids), len(book.asks))):
        bid = book.bids[i] if i < len(book.bids) else ("", "")
        ask = book.asks[i] if i < len(book.asks) else ("", "")
        table.add_row(bid[1], f"[green]{bid[0]}[/]", f"[red]{ask[0]}[/]", ask[1])
    console.print(table)


async def run_query(args: argparse.Namespace) -> None:
    settings = load_settings()
    # A dead Redis is one line at once, not a HOT follower retrying until the ready timeout.
    probe = make_client(settings.brain_redis_url, settings, timeout=3.0)
    try:
        await probe.ping()
    finally:
        await probe.aclose()
    if args.book is not None:
        async with TieredMarketData(settings, [args.symbol], CollectorRegistry(), follow=False) as md:
            render_book(await md.book(args.symbol, max(1, args.book)), Console(width=120))
        return
    async with TieredMarketData(settings, [args.symbol], CollectorRegistry(), follow=not args.no_follow) as md:
        now = now_us()
        if args.since is not None:
            answer = await md.range(args.symbol, now - args.since, now)
        elif args.start is not None:
            answer = await md.range(args.symbol, args.start, args.end if args.end is not None else now)
        else:
            answer = await md.recent(args.symbol, 20 if args.recent is None else args.recent)
    render(args.symbol, answer, args.limit, Console(width=120))


def run_command(args: argparse.Namespace) -> None:
    """`tickbridge query BTCUSDT [--recent N | --since 5m | --start T [--end T] | --book [DEPTH]]`."""
    try:
        args.symbol = check_symbol(args.symbol.upper())
    except TickError as exc:
        die(f"tickbridge query: {exc}")
    try:
        asyncio.run(run_query(args))
    except QUERY_ERRORS as exc:
        die(f"tickbridge query: {type(exc).__name__}: {exc}", code=1)
