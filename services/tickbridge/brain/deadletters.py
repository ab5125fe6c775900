"""`tickbridge deadletters [--replay]`: what the consumer quarantined, and putting it back after a fix.

The consumer dead-letters an entry that is invalid or that failed CONSUMER_MAX_DELIVERIES times (for
example while a per-symbol key held something other than a stream). Each dead letter keeps the entry's
fields, its Brain-stream ID (`src_id`) and the reason. `--replay` decodes each one again; a valid tick
is appended to its per-symbol stream and its dead letter deleted in one atomic call
(`tickbridge_brain_replay`), so a replay that is interrupted or run twice repeats nothing. The writer
takes it from there (and QuestDB's DEDUP would absorb a trade that was somehow written before).
Entries that are still invalid stay where they are, and so do truncated ones: the consumer copies at most
16 KiB of an entry's fields into its dead letter (`truncated` says what was cut), and the stream keeps the
newest 10,000 (issue 14), so a capped copy is listed with its reason but never replayed. A replayed tick
lands after newer ones in its per-symbol stream (QuestDB orders by timestamp; HOT ignores a tick older
than all it holds). A trade inside WARM's window goes to WARM in the same call (WARM must hold every trade
of its window); an older one does not (WARM would claim trades it lacks), and COLD answers for it.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from rich.console import Console
from rich.table import Table

from tickbridge.brain.common import load_functions, reply_or_raise
from tickbridge.core import keys
from tickbridge.core.redis_io import TRANSIENT_ERRORS, Command, execute_packed, make_client
from tickbridge.core.settings import die, load_settings
from tickbridge.core.tick import TickError, Trade
from tickbridge.core.wire import decode_entry, encode_tick, encode_warm_member, split_dead_letter

REPLAY_FUNCTION = "tickbridge_brain_replay"
#: Why a truncated dead letter is left in place.
TRUNCATED = "truncated copy (only part of the entry was kept): not replayable"
ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ResponseError)


@dataclass
class ConsumerDeadLetter:
    id: bytes
    src_id: bytes
    reason: str
    fields: list[bytes]  # the original entry, flat (only its first fields and bytes if `truncated`)
    truncated: str = ""  # what the consumer's cap cut ('' = the whole entry)


@dataclass
class ReplayResult:
    replayed: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    gone: int = 0


def parse_dead_letter(entry_id: bytes, flat: list[bytes]) -> ConsumerDeadLetter:
    """Split a dead letter into the consumer's additions and the original fields."""
    src_id, reason, original, truncated = split_dead_letter(flat)
    return ConsumerDeadLetter(entry_id, src_id, reason, original, truncated)


async def read_all(client: aioredis.Redis, stream: str = keys.CONSUMER_DEAD_LETTER) -> list[ConsumerDeadLetter]:
    """Every dead letter, oldest first (read in pages of 1,000)."""
    out: list[ConsumerDeadLetter] = []
    start = "-"
    while True:
        (page,) = await execute_packed(client, [["XRANGE", stream, start, "+", "COUNT", 1000]])
        page = reply_or_raise(page)
        out += [parse_dead_letter(e[0], e[1] or []) for e in page]
        if len(page) < 1000:
            return out
        start = "(" + page[-1][0].decode()


async def replay(
    client: aioredis.Redis,
    letters: list[ConsumerDeadLetter],
    *,
    warm_window_s: float = 300.0,
    symbols: Collection[str] | None = None,
) -> ReplayResult:
    """Put every dead letter that now decodes as a valid tick back into its per-symbol stream (and a trade
    inside WARM's window into WARM). With `symbols` (SYMBOLS), a tick of another symbol stays, as the
    consumer would dead-letter it again (it creates no per-symbol key)."""
    await load_functions(client)
    window_us = int(warm_window_s * 1_000_000)
    result = ReplayResult()
    for letter in letters:
        if letter.truncated:
            result.invalid[TRUNCATED] += 1
            continue
        try:
            tick = decode_entry(letter.fields)
        except TickError as exc:
            result.invalid[str(exc)] += 1
            continue
        if symbols is not None and tick.symbol not in symbols:
            result.invalid[f"symbol {tick.symbol!r} not in SYMBOLS"] += 1
            continue
        if isinstance(tick, Trade):
            target = keys.trades_key(tick.symbol, tick.exchange)
            score: str | int = tick.timestamp
            member = encode_warm_member(tick)
        else:
            target, score, member = keys.depth_key(tick.symbol, tick.exchange), "", ""
        cmd: Command = [
            "FCALL", REPLAY_FUNCTION, 3, keys.CONSUMER_DEAD_LETTER, target, keys.warm_key(tick.symbol, tick.exchange),
            letter.id, window_us, score, member, "src_id", letter.src_id, *encode_tick(tick),
        ]  # fmt: skip
        (reply,) = await execute_packed(client, [cmd])
        if isinstance(reply, ResponseError):
            result.failed.append(f"{letter.id.decode()} -> {target}: {reply}")
        elif reply == 1:
            result.replayed += 1
        else:
            result.gone += 1
    return result


def _summary(letters: list[ConsumerDeadLetter], console: Console) -> None:
    reasons = Counter(letter.reason for letter in letters)
    table = Table(title=f"{keys.CONSUMER_DEAD_LETTER}: {len(letters)} entries")
    table.add_column("reason")
    table.add_column("entries", justify="right")
    for reason, n in reasons.most_common():
        table.add_row(reason[:100], str(n))
    console.print(table)
    truncated = sum(1 for letter in letters if letter.truncated)
    if truncated:
        console.print(f"{truncated} of them keep only part of their entry (capped copies: listed, never replayed)")


async def run(args: argparse.Namespace, console: Console) -> int:
    settings = load_settings()
    client = make_client(settings.brain_redis_url, settings)
    try:
        letters = await read_all(client)
        _summary(letters, console)
        if not args.replay:
            return 0
        result = await replay(client, letters, warm_window_s=settings.warm_window_s, symbols=settings.symbols)
    finally:
        await client.aclose()
    console.print(f"replayed {result.replayed}; still invalid {sum(result.invalid.values())} (left in place)"
                  + (f"; already gone {result.gone}" if result.gone else ""))  # fmt: skip
    for reason, n in result.invalid.most_common(5):
        console.print(f"  invalid x{n}: {reason[:100]}")
    if result.failed:
        console.print(f"failed {len(result.failed)} (left in place; is the cause fixed?): {result.failed[0]}")
        return 1
    return 0


def main(argv: list[str]) -> None:
    """`tickbridge deadletters [--replay]` (configured by BRAIN_REDIS_URL and the TLS variables)."""
    p = argparse.ArgumentParser(prog="tickbridge deadletters", description=__doc__.split("\n\n")[0])
    p.add_argument("--replay", action="store_true", help="put every entry that is now valid back (atomic per entry)")
    args = p.parse_args(argv)
    try:
        code = asyncio.run(run(args, Console(width=120)))
    except ERRORS as exc:
        die(f"tickbridge deadletters: {type(exc).__name__}: {exc}", code=1)
    raise SystemExit(code)
