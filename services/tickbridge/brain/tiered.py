"""Tiered market data for trading code: HOT (in-process deque), WARM (Brain Redis zset), COLD (QuestDB).

- HOT: the newest HOT_TICKS trades per symbol by (timestamp, trade_id), whatever order they arrive in,
  kept current by a background task that XREADs the per-symbol streams (prefilled from WARM at start).
  A symbol whose trade key is not a stream, or whose WARM key is not a sorted set, is left out (it
  answers from WARM/COLD; a WARM key of the wrong type is an error naming it) instead of stopping the
  others.
- WARM: the consumer's sorted set `market:<exchange>:warm:<SYMBOL>` (score = exchange time µs,
  member `trade_id|price|volume|side|recv_ts`), the last WARM_WINDOW_S before its newest tick. Read
  through one lean connection (`core.rawlink`: both replies of a range in one read) when it is free,
  else through the redis-py pool. Stale connections (Redis restarted) are replaced and the read sent
  once more, on either path, so a restart costs no answer.
- COLD: QuestDB `trades` as the read-only PG-wire user (QUESTDB_READER_USER/PASSWORD, which cannot DROP or
  INSERT; over HTTP `/exec` only where QuestDB has no logins), plus the trades the writer has not confirmed
  yet, read back from the per-symbol stream (the writer trims it only below what it confirmed). Without them a writer
  more than WARM's window behind (QuestDB down, a long catch-up) would leave a silent hole between COLD
  and WARM.

`recent()` and `range()` answer from the fastest tier that covers the request; a request older than
WARM is stitched from COLD and WARM, de-duplicated by trade_id, so the seam is invisible.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import logging
import time
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from types import TracebackType
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry
from redis.exceptions import NoPermissionError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tickbridge.brain.book_history import book_at
from tickbridge.brain.books import HOT_BOOK_DEPTH, Book, HotBooks, read_book
from tickbridge.brain.catchup import CatchUp, overlap, parse_catchup
from tickbridge.brain.common import as_text, parse_info_pairs, parse_read_reply, reply_or_raise
from tickbridge.core import keys
from tickbridge.core.metrics import counter, histogram
from tickbridge.core.questdb_io import QuestDBError, reader_for
from tickbridge.core.rawlink import RawRedis, RawReplyError
from tickbridge.core.redis_io import TRANSIENT_ERRORS, Command, execute_packed, execute_read, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.tick import check_exchange, check_symbol
from tickbridge.core.wire import TRADE_VALUES, decode_warm_member, match_trade, parse_stream_id, symbol_trade

log = logging.getLogger(__name__)

TIER_BUCKETS = (
    0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
)  # fmt: skip

HOT, WARM, COLD = "hot", "warm", "cold"
#: Latency label of the read-back of trades the writer has not confirmed (the per-symbol stream).
BACKLOG = "backlog"
#: A trade reaches the Brain after it happened (per-symbol entry IDs are Brain time), give or take the
#: clock error between the exchange and the Brain: entries that arrived before `start - margin` hold
#: no trade of a range.
ARRIVAL_MARGIN_MS = 600_000
#: Entries per XRANGE of the writer's backlog, and at most per answer (a writer hours behind): beyond
#: it the answer may miss trades, counted in `tiered_backlog_truncated_total` and logged.
BACKLOG_CHUNK = 10_000
BACKLOG_MAX = 500_000
#: Errors after which the follower refills HOT from WARM instead of dying.
FOLLOW_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ResponseError)
#: How often the catch-up state (`catch_up()`) is re-read; answers use a copy at most twice as old.
CATCHUP_REFRESH_S = 0.5


class TickRow(NamedTuple):
    """One trade as the tiers return it (times in µs since the epoch)."""

    timestamp: int
    trade_id: int
    price: float
    volume: float
    side: str
    recv_ts: int


@dataclass(frozen=True)
class Answer:
    """Rows oldest first, the tiers that answered, and the time it took.

    `missing`: during a catch-up (issue 16), the part of the request (exchange time, µs) the ordered path has
    not delivered yet: trades in it may be absent from `rows`. None: the answer is complete."""

    rows: list[TickRow]
    tiers: tuple[str, ...]
    seconds: float
    missing: tuple[int, int] | None = None


class TieredMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.latency = histogram(
            "tiered_latency_seconds", "Latency of one tier access", ("tier",), buckets=TIER_BUCKETS, registry=registry
        )
        self.answers = counter("tiered_answers_total", "Answers by the slowest tier used", ("tier",), registry=registry)
        self.errors = counter(
            "tiered_follow_errors_total", "HOT follower errors (Redis unavailable)", registry=registry
        )
        self.backlog_rows = counter(
            "tiered_backlog_rows_total",
            "Rows answered from the per-symbol stream because the writer had not confirmed them yet",
            registry=registry,
        )
        self.backlog_truncated = counter(
            "tiered_backlog_truncated_total",
            f"Answers whose read-back of the writer's backlog stopped at {BACKLOG_MAX} entries",
            registry=registry,
        )


#: One `TieredMetrics` per registry: a second `TieredMarketData` in a process shares the first one's series
#: (registering them again raised DuplicateTimeseries).
_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, TieredMetrics] = weakref.WeakKeyDictionary()


def tiered_metrics(registry: CollectorRegistry = REGISTRY) -> TieredMetrics:
    """The `TieredMetrics` of `registry`, created on first use."""
    metrics = _METRICS.get(registry)
    if metrics is None:
        metrics = _METRICS[registry] = TieredMetrics(registry)
    return metrics


def parse_warm_member(member: bytes, score: float) -> TickRow:
    w = decode_warm_member(member, score)
    return TickRow(w.timestamp, w.trade_id, float(w.price), float(w.volume), w.side, w.recv_ts)


def parse_stream_fields(fields: Sequence[bytes]) -> TickRow:
    f = dict(zip(fields[::2], fields[1::2], strict=True))
    return TickRow(
        int(f[b"timestamp"]), int(f[b"trade_id"]), float(f[b"price"]), float(f[b"volume"]), f[b"side"].decode(),
        int(f[b"recv_ts"]),
    )  # fmt: skip


def us_to_iso(us: int) -> str:
    return datetime.fromtimestamp(us // 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{us % 1_000_000:06d}Z"


def merge(*parts: Iterable[TickRow]) -> list[TickRow]:
    """Union by trade_id, ordered by (timestamp, trade_id)."""
    seen: dict[int, TickRow] = {}
    for part in parts:
        for row in part:
            seen.setdefault(row.trade_id, row)
    return sorted(seen.values(), key=lambda r: (r.timestamp, r.trade_id))


class _Hot:
    """The newest N trades of one symbol, sorted by (timestamp, trade_id), de-duplicated by trade_id.

    Sorted, not in arrival order: batches of two consumers interleave in a per-symbol stream, and HOT
    must still hold every trade newer than its oldest (`range()` relies on it) and no older one.
    """

    def __init__(self, size: int) -> None:
        self.rows: deque[TickRow] = deque(maxlen=size)
        self.ids: set[int] = set()

    def add(self, row: TickRow) -> None:
        # TickRow compares as (timestamp, trade_id, ...), and trade_ids held are unique.
        if row.trade_id in self.ids:
            return
        rows = self.rows
        full = len(rows) == rows.maxlen
        if not rows or row > rows[-1]:  # in order, the common case: O(1)
            if full:
                self.ids.discard(rows[0].trade_id)  # the append pushes it out
            rows.append(row)
        else:
            if full:
                if row < rows[0]:
                    return  # older than all we hold (e.g. a dead letter put back): not one of the newest N
                self.ids.discard(rows.popleft().trade_id)
            bisect.insort(rows, row)
        self.ids.add(row.trade_id)


class TieredMarketData:
    """HOT/WARM/COLD market data for trading code. Use `async with TieredMarketData(settings) as md:`."""

    def __init__(
        self,
        settings: Settings,
        symbols: Sequence[str] | None = None,
        registry: CollectorRegistry = REGISTRY,
        *,
        follow: bool = True,
        exchange: str = keys.EXCHANGE,
        recheck_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.symbols = [check_symbol(s) for s in (symbols or settings.symbols)]
        self.exchange = check_exchange(exchange)  # it names Redis keys and goes into COLD's SQL
        self.hot_size = settings.hot_ticks
        self.window_us = int(settings.warm_window_s * 1_000_000)
        self.metrics = tiered_metrics(registry)
        # Label children looked up once: `.labels()` costs more than the HOT answer itself.
        self._hot_latency = self.metrics.latency.labels(HOT)
        self._warm_latency = self.metrics.latency.labels(WARM)
        self._cold_latency = self.metrics.latency.labels(COLD)
        self._backlog_latency = self.metrics.latency.labels(BACKLOG)
        self._answers = {tier: self.metrics.answers.labels(tier) for tier in (HOT, WARM, COLD)}
        self.follow = follow
        self.redis: aioredis.Redis = make_client(settings.brain_redis_url, settings)
        # WARM reads: one lean connection (both replies of a range in one read, parsed in C); a read
        # that finds it busy (concurrent callers) or broken goes through the pool instead.
        self._raw = RawRedis(settings.brain_redis_url, settings)
        self._raw_lock = asyncio.Lock()
        self.qdb = reader_for(settings)
        if settings.questdb_user and not settings.questdb_reader_user:
            log.warning("COLD reads QuestDB with QUESTDB_USER, the writer's login (it can DROP TABLE): give trading "
                        "code QUESTDB_READER_USER/QUESTDB_READER_PASSWORD instead")  # fmt: skip
        self._hot: dict[str, _Hot] = {}
        #: Symbol -> its key of the wrong type (trade key not a stream, or WARM key not a sorted set):
        #: left out of HOT (it answers from WARM/COLD) so the others keep following; looked at again
        #: every `recheck_s`.
        self._excluded: dict[str, str] = {}
        self._recheck_s = recheck_s
        self._backlog_refused = False  # warned once that the ACL refuses the backlog read
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Order books (issue 17): HOT copies of the top levels, kept by their own follower.
        self.books = HotBooks(self.redis, self.symbols, self.exchange)
        self._book_task: asyncio.Task[None] | None = None
        self._live_task: asyncio.Task[None] | None = None
        #: The fast-forward live stream (issue 16): newest ticks while a backlog replays, followed into HOT.
        # The exchange's own stream (issue 18): STREAM_KEY when these settings are that exchange's.
        stream = settings.stream_key if self.exchange == settings.exchange else keys.stream_key_for(self.exchange)
        self.live_key = keys.live_stream_key(stream)
        self.catchup_key = keys.catchup_key(self.exchange)  # this exchange's catch-up, not the last writer's
        self._exchange_b = self.exchange.encode()
        self._live_last = "0-0"
        self._catchup: CatchUp | None = None
        self._catchup_at = -1e9  # monotonic time of `_catchup`

    async def __aenter__(self) -> TieredMarketData:
        await self.start()
        return self

    async def __aexit__(self, *exc: object | TracebackType) -> None:
        await self.close()

    async def start(self, ready_timeout: float = 5.0) -> None:
        """Prefill HOT from WARM and start following the per-symbol streams (if `follow`).

        Waits up to `ready_timeout` for HOT; until it is ready, answers come from WARM/COLD.
        """
        if self.follow:
            self._book_task = asyncio.create_task(self.books.run(FOLLOW_ERRORS, self._book_error))
            self._task = asyncio.create_task(self._follow())
            self._live_task = asyncio.create_task(self._follow_live())
            ready = asyncio.create_task(self._ready.wait())
            await asyncio.wait([ready, self._task], timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if self._task.done():
                self._task.result()

    async def close(self) -> None:
        for task in (self._book_task, self._live_task, self._task):
            if task is None:
                continue
            # A cancel that lands while a finished read is waiting to be resumed can be absorbed inside
            # redis-py's read (seen here after trading code held the loop for a while), and the follower
            # would block on its next XREAD forever: repeat the cancel until the task has ended.
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.2)
            with contextlib.suppress(asyncio.CancelledError, *FOLLOW_ERRORS):
                await task
        await self._raw.close()
        await self.redis.aclose()
        await self.qdb.close()

    # ---------------------------------------------------------------- HOT follower

    async def _prefill(self) -> dict[str, str]:
        """Remember each stream's last ID, then load the newest WARM ticks: nothing falls in between."""
        cmds: list[Command] = [["XINFO", "STREAM", keys.trades_key(s, self.exchange)] for s in self.symbols]
        *infos, live_info = await execute_packed(self.redis, [*cmds, ["XINFO", "STREAM", self.live_key]])
        self._live_last = "0-0"
        if not isinstance(live_info, BaseException):
            self._live_last = parse_info_pairs(live_info)[b"last-generated-id"].decode()
        last: dict[str, str] = {}
        excluded: dict[str, str] = {}
        for sym, info in zip(self.symbols, infos, strict=True):
            if _wrong_type(info):
                excluded[sym] = keys.trades_key(sym, self.exchange)
            elif isinstance(info, BaseException):
                last[sym] = "0-0"
            else:
                d = info if isinstance(info, dict) else {info[i]: info[i + 1] for i in range(0, len(info), 2)}
                last[sym] = d[b"last-generated-id"].decode()
        followed = [s for s in self.symbols if s not in excluded]
        cmds = [["ZRANGE", keys.warm_key(s, self.exchange), -self.hot_size, -1, "WITHSCORES"] for s in followed]
        warm = await execute_packed(self.redis, cmds)
        prefilled: dict[str, _Hot] = {}
        for sym, reply in zip(followed, warm, strict=True):
            if _wrong_type(reply):
                # Not prefilled, HOT would claim to hold trades it never saw: leave the symbol out.
                excluded[sym] = keys.warm_key(sym, self.exchange)
                del last[sym]
                continue
            hot = prefilled[sym] = _Hot(self.hot_size)
            for member, score in _pairs(reply_or_raise(reply)):
                hot.add(parse_warm_member(member, float(score)))
        for sym, key in sorted(excluded.items()):
            if self._excluded.get(sym) != key:
                self.metrics.errors.inc()
                log.error("%s is of the wrong type: %s is left out of HOT until it is fixed", key, sym)
        self._excluded = excluded
        for sym in excluded:
            self._hot.pop(sym, None)
        self._hot.update(prefilled)
        return last

    async def _follow(self) -> None:
        last: dict[str, str] | None = None
        prefilled_at = 0.0
        while True:
            try:
                if last is not None and self._excluded and time.monotonic() - prefilled_at > self._recheck_s:
                    last = None  # an excluded key may be fixed by now: prefill again
                if last is None:
                    last = await self._prefill()
                    prefilled_at = time.monotonic()
                    self._ready.set()
                followed = [s for s in self.symbols if s in last]
                if not followed:
                    await asyncio.sleep(min(1.0, self._recheck_s))
                    continue
                streams = [keys.trades_key(s, self.exchange) for s in followed]
                cmd: list[str | int] = ["XREAD", "COUNT", 1000, "BLOCK", 1000, "STREAMS", *streams]
                cmd += [last[s] for s in followed]
                (reply,) = await execute_packed(self.redis, [cmd])
                for stream, entries in parse_read_reply(reply_or_raise(reply)).items():
                    sym = stream.decode().rsplit(":", 1)[1]
                    hot = self._hot[sym]
                    # A full HOT ignores a trade older than all it holds: during a catch-up (the replay of an old
                    # backlog while HOT holds live ticks) such entries are skipped before they are parsed.
                    oldest = hot.rows[0].timestamp if len(hot.rows) == hot.rows.maxlen else None
                    for _entry_id, fields in entries:
                        if not fields:
                            continue
                        if oldest is not None:
                            values = symbol_trade(fields)
                            if values is not None and int(values[6]) < oldest:
                                continue
                        hot.add(parse_stream_fields(fields))
                    if entries:
                        last[sym] = entries[-1][0].decode()
            except FOLLOW_ERRORS as exc:
                # Lost Redis: HOT may have a gap, so refill it from WARM when Redis is back.
                self.metrics.errors.inc()
                log.warning("tiered follower: %s", exc)
                last = None
                self._ready.clear()
                self._hot.clear()
                await asyncio.sleep(1.0)

    def _book_error(self, exc: BaseException) -> None:
        self.metrics.errors.inc()
        log.warning("tiered book follower: %s", exc)

    async def book(self, symbol: str, depth: int = HOT_BOOK_DEPTH) -> Book:
        """`symbol`'s order book: bids, asks (top `depth` each), last update ID, exchange time, `valid`.

        HOT (the in-process copy, a dict lookup) when it holds `depth` levels, else WARM (one Redis call that
        reads the state and the levels together). Never trade on a book whose `valid` is False."""
        started = time.perf_counter()
        hot = self.books.get(symbol, depth)
        if hot is not None:
            self._hot_latency.observe(time.perf_counter() - started)
            self._answers[HOT].inc()
            return hot
        book = await read_book(self.redis, symbol, depth)
        self._warm_latency.observe(time.perf_counter() - started)
        self._answers[WARM].inc()
        return book

    async def book_at(self, symbol: str, t_us: int, depth: int = HOT_BOOK_DEPTH) -> Book:
        """`symbol`'s book as it was at exchange time `t_us` (µs), rebuilt from QuestDB (COLD): the newest whole
        book at or before `t_us` plus the diffs after it (`book_history`; doubles, not the exact strings)."""
        started = time.perf_counter()
        book = await book_at(self.qdb, symbol, t_us, depth, self.exchange)
        self._cold_latency.observe(time.perf_counter() - started)
        self._answers[COLD].inc()
        return book

    async def _follow_live(self) -> None:
        """The fast-forward live stream into HOT (a task of its own: the per-symbol streams carry the replay of
        a backlog during a catch-up, and live ticks must not queue behind it), and the catch-up state."""
        while True:
            try:
                await self._ready.wait()
                cmd: list[str | int] = ["XREAD", "COUNT", 5000, "BLOCK", 250, "STREAMS", self.live_key, self._live_last]
                (reply,) = await execute_packed(self.redis, [cmd])
                for _stream, entries in parse_read_reply(reply_or_raise(reply)).items():
                    self._add_live(entries)
                if time.monotonic() - self._catchup_at >= CATCHUP_REFRESH_S:
                    await self.catch_up()
            except FOLLOW_ERRORS as exc:
                log.debug("tiered live follower: %s", exc)  # the per-symbol follower counts and logs Redis errors
                await asyncio.sleep(1.0)

    def _add_live(self, entries: Sequence[tuple[bytes, Any]]) -> None:
        """Trades of the live stream (raw VPS entries) into HOT; `_Hot.add` drops one it holds already."""
        hots = self._hot
        for _entry_id, fields in entries:
            if not fields:
                continue
            fast = match_trade(fields)
            if fast is None or fast[1] != self._exchange_b:
                continue  # depth, or a trade in another layout: the ordered path brings it
            hot = hots.get(fast[0].decode())
            if hot is None:
                continue
            price, volume, side, ts, trade_id, recv_ts = fields[TRADE_VALUES]
            hot.add(TickRow(int(ts), int(trade_id), float(price), float(volume), side.decode(), int(recv_ts)))
        if entries:
            self._live_last = as_text(entries[-1][0])

    def hot(self, symbol: str) -> list[TickRow]:
        """HOT ticks of `symbol`, oldest first (by timestamp, trade_id)."""
        hot = self._hot.get(symbol)
        return list(hot.rows) if hot else []

    def _hot_ready(self, symbol: str) -> _Hot | None:
        """HOT for `symbol` only while the follower keeps it current (else callers fall back to WARM)."""
        if not self.follow or not self._ready.is_set() or self._task is None or self._task.done():
            return None
        return self._hot.get(symbol)

    # ---------------------------------------------------------------- WARM and COLD access

    async def _warm_exec(self, cmds: Sequence[Command]) -> list[Any]:
        """Run WARM commands in one round trip; error replies in place as `ResponseError` (as the pool does)."""
        if not self._raw_lock.locked():
            async with self._raw_lock:
                for _attempt in range(2):
                    try:
                        replies = await self._raw.execute(cmds)
                    except OSError as exc:  # ConnectionError, refused, unreachable, TimeoutError
                        if isinstance(exc, TimeoutError) or isinstance(exc.__cause__, TimeoutError):
                            raise RedisTimeoutError(str(exc)) from exc  # waiting again would only double the wait
                        # A read is safe to repeat: a stale link (Redis restarted) is reopened once.
                        log.debug("lean WARM link: %s", exc)
                        continue
                    return [ResponseError(str(r)) if isinstance(r, RawReplyError) else r for r in replies]
        return await execute_read(self.redis, cmds)

    async def _warm(self, cmd: Command) -> list[TickRow]:
        started = time.perf_counter()
        (reply,) = await self._warm_exec([cmd])
        rows = [parse_warm_member(m, float(s)) for m, s in _pairs(_check_warm(reply, cmd[1]))]
        self._warm_latency.observe(time.perf_counter() - started)
        return rows

    async def _cold(self, symbol: str, where: str, order: str, limit: int) -> list[TickRow]:
        sql = (
            "SELECT cast(timestamp AS LONG), trade_id, price, volume, side, cast(recv_ts AS LONG) "
            f"FROM {keys.TRADES_TABLE} "
            f"WHERE symbol = '{symbol}' AND exchange = '{self.exchange}'{where} "
            f"ORDER BY timestamp {order} LIMIT {limit}"
        )
        started = time.perf_counter()
        rows = await self.qdb.rows(sql)
        self._cold_latency.observe(time.perf_counter() - started)
        return [TickRow(int(r[0]), int(r[1]), float(r[2]), float(r[3]), str(r[4]), int(r[5] or 0)) for r in rows]

    async def _backlog(
        self, symbol: str, lo_us: int | None, hi_us: int | None, *, keep: int, newest: bool
    ) -> list[TickRow]:
        """Trades of the per-symbol stream the writer has not confirmed (so maybe not in COLD yet), with
        `lo_us <= timestamp <= hi_us`: at most `keep`, the newest ones if `newest`, else the oldest.

        The writer's group says what is confirmed: everything after its last-delivered ID, and its
        pending entries. A stream that is missing or not a stream has nothing to add.
        """
        if keep <= 0:
            return []
        key = keys.trades_key(symbol, self.exchange)
        started = time.perf_counter()
        groups_r, pending_r = await execute_read(
            self.redis, [["XINFO", "GROUPS", key], ["XPENDING", key, keys.WRITER_GROUP]]
        )
        if isinstance(groups_r, ResponseError):
            if isinstance(groups_r, NoPermissionError) and not self._backlog_refused:
                # An ACL user without XINFO GROUPS/XPENDING/XRANGE: COLD answers without the writer's backlog.
                self._backlog_refused = True
                log.warning("COLD answers may miss what the writer has not confirmed yet: %s (the ACL user `reader` "
                            "has the commands)", groups_r)  # fmt: skip
            return []  # no such key, or the wrong type (HOT leaves the symbol out, the writer skips it)
        start = _unconfirmed_from(groups_r, pending_r)
        if lo_us is not None:
            floor_ms = max(0, lo_us // 1000 - ARRIVAL_MARGIN_MS)
            if start == "-" or parse_stream_id(start.lstrip("(")) < (floor_ms, 0):
                start = f"{floor_ms}-0"
        rows: list[TickRow] = []
        scanned = 0
        pick = heapq.nlargest if newest else heapq.nsmallest
        while True:
            (reply,) = await execute_read(self.redis, [["XRANGE", key, start, "+", "COUNT", BACKLOG_CHUNK]])
            if isinstance(reply, ResponseError):
                break  # the key changed type meanwhile: what was read stands
            for _entry_id, fields in reply:
                try:
                    row = parse_stream_fields(fields)
                except (KeyError, ValueError, TypeError):
                    continue  # not a trade (the writer dead-letters it)
                if (lo_us is None or row.timestamp >= lo_us) and (hi_us is None or row.timestamp <= hi_us):
                    rows.append(row)
            if len(rows) > keep:
                rows = pick(keep, rows)
            scanned += len(reply)
            if len(reply) < BACKLOG_CHUNK:
                break
            if scanned >= BACKLOG_MAX:
                self.metrics.backlog_truncated.inc()
                log.warning("%s: the writer is more than %d entries behind; the answer may miss trades", key, scanned)
                break
            start = "(" + as_text(reply[-1][0])
        self._backlog_latency.observe(time.perf_counter() - started)
        if rows:
            self.metrics.backlog_rows.inc(len(rows))
        return rows

    def _done(
        self, rows: list[TickRow], tiers: tuple[str, ...], started: float, gap: tuple[int, int] | None = None
    ) -> Answer:
        self._answers[tiers[-1]].inc()
        missing = overlap(gap, rows[0].timestamp, rows[-1].timestamp) if gap is not None and rows else None
        return Answer(rows, tiers, time.perf_counter() - started, missing)

    # ---------------------------------------------------------------- public API

    async def catch_up(self) -> CatchUp:
        """Where a catch-up stands (issue 16): active or not, backlog, oldest age, rate, ETA, the ordered
        frontier and the gap below the live view (see `brain/catchup.py`). One Redis round trip."""
        (reply,) = await self._warm_exec([["HGETALL", self.catchup_key]])
        state = parse_catchup(reply_or_raise(reply))
        self._catchup, self._catchup_at = state, time.monotonic()
        return state

    async def _gap(self) -> tuple[int, int] | None:
        """The catch-up gap, from a copy at most 2 x CATCHUP_REFRESH_S old (the follower keeps it fresh)."""
        if time.monotonic() - self._catchup_at > 2 * CATCHUP_REFRESH_S:
            try:
                await self.catch_up()
            except ResponseError as exc:  # an ACL without the hash: answers as before, without a gap
                if self._catchup is None:
                    log.warning("no catch-up state (%s): answers cannot say what a catch-up still misses", exc)
                self._catchup = parse_catchup([])
                self._catchup_at = time.monotonic()
            except TRANSIENT_ERRORS as exc:
                # Redis unreachable: HOT still answers; the last state read stands until Redis is back.
                log.debug("catch-up state not refreshed: %s", exc)
                self._catchup_at = time.monotonic()
        return self._catchup.missing if self._catchup is not None else None

    async def recent(self, symbol: str, n: int) -> Answer:
        """The newest `n` trades of `symbol`, oldest first, from the fastest tier that holds them.

        `n == 0` is no rows and no tier (`tiers == ()`); a negative `n` is a ValueError.
        """
        check_symbol(symbol)
        started = time.perf_counter()
        if n <= 0:  # `ZRANGE key -n -1` would be the whole window for 0, most of it for n < 0
            if n < 0:
                raise ValueError(f"recent(): n must be >= 0, got {n}")
            return Answer([], (), time.perf_counter() - started)
        gap = await self._gap()
        hot = self._hot_ready(symbol)
        if hot is not None and n <= len(hot.rows):
            rows = list(islice(reversed(hot.rows), n))  # HOT is sorted: no sort here
            rows.reverse()
            self._hot_latency.observe(time.perf_counter() - started)
            return self._done(rows, (HOT,), started, gap)
        warm = await self._warm(["ZRANGE", keys.warm_key(symbol, self.exchange), -n, -1, "WITHSCORES"])
        if len(warm) >= n:
            return self._done(warm, (WARM,), started, gap)
        upto = warm[0].timestamp if warm else None
        where = f" AND timestamp <= '{us_to_iso(upto)}'" if upto is not None else ""
        cold, backlog = await asyncio.gather(
            self._cold(symbol, where, "DESC", n), self._backlog(symbol, None, upto, keep=n, newest=True)
        )
        rows = merge(cold, backlog, warm)[-n:]
        return self._done(rows, (WARM, COLD) if warm else (COLD,), started, gap)

    async def range(self, symbol: str, start_us: int, end_us: int, *, limit: int = 1_000_000) -> Answer:
        """Trades of `symbol` with `start_us <= timestamp <= end_us`, oldest first, stitched across tiers
        (at most `limit`, the oldest ones; a negative `limit` is a ValueError)."""
        check_symbol(symbol)
        if limit < 0:  # each tier would read it differently (QuestDB's LIMIT -n is "the last n")
            raise ValueError(f"range(): limit must be >= 0, got {limit}")
        started = time.perf_counter()
        # During a catch-up, a request that reaches into the gap below the live view is stitched from every
        # tier (HOT and WARM hold live ticks above the gap, not what the replay has not brought yet).
        hole = overlap(await self._gap(), start_us, end_us)
        hot = self._hot_ready(symbol)
        # HOT holds every trade it has seen that is newer than its oldest row (`_Hot` keeps the newest N,
        # sorted); one it evicted or ignored may share that row's timestamp, hence `>`.
        if hole is None and hot is not None and hot.rows and start_us > hot.rows[0].timestamp:
            rows = [r for r in hot.rows if start_us <= r.timestamp <= end_us]  # already by (timestamp, trade_id)
            self._hot_latency.observe(time.perf_counter() - started)
            return self._done(rows[:limit], (HOT,), started)
        # One round trip: WARM's newest tick (its coverage) and the WARM part of the range.
        warm_key = keys.warm_key(symbol, self.exchange)
        started_warm = time.perf_counter()
        newest_r, range_r = await self._warm_exec(
            [
                ["ZRANGE", warm_key, -1, -1, "WITHSCORES"],
                ["ZRANGE", warm_key, start_us, end_us, "BYSCORE", "LIMIT", 0, limit, "WITHSCORES"],
            ],
        )
        newest = _pairs(_check_warm(newest_r, warm_key))
        warm = [parse_warm_member(m, float(sc)) for m, sc in _pairs(_check_warm(range_r, warm_key))]
        self._warm_latency.observe(time.perf_counter() - started_warm)
        floor = int(float(newest[0][1])) - self.window_us if newest else None
        if hole is None and floor is not None and start_us > floor:
            return self._done(warm, (WARM,), started)
        where = f" AND timestamp >= '{us_to_iso(start_us)}' AND timestamp <= '{us_to_iso(end_us)}'"
        cold, backlog = await asyncio.gather(
            self._cold(symbol, where, "ASC", limit),
            self._backlog(symbol, start_us, end_us, keep=limit, newest=False),
        )
        if hole is not None or (floor is not None and end_us > floor):
            # The newest part may not be in QuestDB yet: WARM fills it in (and holds the live ticks of a catch-up).
            rows = merge(cold, backlog, warm)[:limit]
            self._answers[COLD].inc()
            return Answer(rows, (WARM, COLD), time.perf_counter() - started, hole)
        return self._done(merge(cold, backlog)[:limit] if backlog else cold, (COLD,), started)


def _unconfirmed_from(groups: Any, pending: Any) -> str:
    """XRANGE start of what the writer has not confirmed: its oldest pending entry, else just after its
    last-delivered ID (`-`, all of it, if the writer group does not exist yet)."""
    for group in groups:
        info = parse_info_pairs(group)
        if as_text(info[b"name"]) != keys.WRITER_GROUP:
            continue
        if not isinstance(pending, ResponseError) and pending and pending[0]:
            return as_text(pending[1])  # at or below last-delivered
        return "(" + as_text(info[b"last-delivered-id"])
    return "-"


def _wrong_type(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and "WRONGTYPE" in str(reply)


def _check_warm(reply: Any, key: object) -> Any:
    """`reply_or_raise()`, with the key named when WARM is not a sorted set (Redis' own message does not name it)."""
    if _wrong_type(reply):
        raise ResponseError(f"WRONGTYPE {key!s} is not a sorted set: no WARM answers until it is fixed") from reply
    return reply_or_raise(reply)


def _pairs(flat: Any) -> list[tuple[bytes, Any]]:
    """ZRANGE WITHSCORES reply: RESP2 flat list or RESP3 list of [member, score] pairs."""
    if not flat:
        return []
    if isinstance(flat[0], list):
        return [(p[0], p[1]) for p in flat]
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


__all__ = ["COLD", "HOT", "WARM", "Answer", "QuestDBError", "TickRow", "TieredMarketData"]
