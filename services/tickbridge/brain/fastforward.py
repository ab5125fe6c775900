"""Fast-forward on the Brain (issue 16): live ticks reach WARM (and HOT) while the ordered path catches up.

A task of the consumer process, beside its group loop. It never touches the Brain stream's group, the
per-symbol streams or QuestDB: those stay fed by the ordered path alone (every trade once, in trade-ID order).

- It follows the live stream `<STREAM_KEY>:live` (plain `XREAD`, no group; the forwarder's live lane fills it
  while the VPS replays a backlog) and writes each valid trade of a configured symbol to WARM with **the member
  the ordered path writes** (`trade_id|price|volume|side|recv_ts`, the entry's own strings, scored by its
  timestamp), then trims WARM to its window before the newest live tick. A trade that comes by both paths is
  one member; `TieredMarketData` follows the live stream too and de-duplicates HOT by trade_id.
- **Brain-side backlog** (the consumer group is `lag_min` or more entries behind while the Brain stream's top
  is live, e.g. a consumer restarted after 100,000 entries arrived): it also follows the Brain stream's tail,
  from `prime_ms` before its top, and copies those entries to the live stream (same IDs; an ID the live
  stream already holds is refused and skipped), so WARM and HOT get them through the same path.
- Every 0.5 s it writes the Brain side of the catch-up state to its exchange's hash (`keys.catchup_key`:
  `tickbridge:catchup` for Binance, `tickbridge:catchup:<exchange>` otherwise): `brain_lag` (entries the
  group has not received), `brain_frontier` (its last-delivered ID: the ordered path is complete below it),
  `brain_rate` (entries/s the consumer handles), `brain_eta_s`, `brain_tail_start` ("" unless following the
  tail), `brain_updated` (Unix time).
- Order-book entries on the live stream (diffs, whole books, resets) go to the Brain's books
  (`tickbridge_book_apply`, book.lua's rules): a book that broke during the outage asks for a whole book, which
  comes by the live lane, so it is valid and current again without waiting for the backlog. Its rules ignore
  stale entries, so the ordered replay bringing the same entries again changes nothing.

On start it re-reads the last `replay_ms` of the live stream (a restarted consumer fills the WARM it missed;
ZADD of the same member is a no-op).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from tickbridge.brain.books import book_apply_call, book_verdict
from tickbridge.brain.common import parse_info_pairs, parse_read_reply
from tickbridge.core import keys
from tickbridge.core.lifecycle import Service
from tickbridge.core.metrics import counter, gauge
from tickbridge.core.redis_io import TRANSIENT_ERRORS, Command, execute_packed, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.tick import BookReset, BookSnapshot, DepthDiff, TickError, Trade
from tickbridge.core.wire import (
    TRADE_VALUES,
    StreamId,
    encode_warm_member,
    format_stream_id,
    is_book_entry,
    match_trade,
    parse_stream_id,
    strict_decode,
)  # fmt: skip

log = logging.getLogger(__name__)

#: Consumer-group lag (entries) from which the Brain stream's tail is followed too.
LAG_MIN = 5_000
#: The tail is followed only while the Brain stream's top is this recent (else the forwarder is replaying and
#: its live lane is the live view).
TAIL_LIVE_MS = 5_000
#: The tail starts this long before the Brain stream's top.
PRIME_MS = 2_000
#: ... and at most this many entries before it.
PRIME_ENTRIES = 2_000
#: A (re)started follower re-reads this much of the live stream.
REPLAY_MS = 60_000
BATCH = 5_000
LIVE_MAXLEN = 200_000
STATUS_INTERVAL_S = 0.5

FF_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, RuntimeError)


class FastForwardMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.applied = counter("consumer_fastforward_trades_total", "Live trades written to WARM ahead of the "
                               "ordered path (fast-forward)", registry=r)  # fmt: skip
        self.tail = gauge("consumer_fastforward_tail_active", "1 while the Brain stream's tail is followed "
                          "(Brain-side backlog)", registry=r)  # fmt: skip
        self.live_age = gauge("consumer_fastforward_live_age_seconds", "Age (recv_ts) of the newest live trade "
                              "the fast-forward follower wrote to WARM", registry=r)  # fmt: skip
        self.active = gauge("catchup_active", "1 while a backlog is caught up (VPS or Brain side)", registry=r)
        self.backlog = gauge("catchup_backlog_entries", "Entries not yet on the ordered path: the VPS backlog "
                             "(last reported by the forwarder) plus the consumer group's lag", registry=r)  # fmt: skip
        self.eta = gauge("catchup_eta_seconds", "Estimated seconds until the catch-up ends (-1: unknown)", registry=r)
        self.rate = gauge("catchup_rate", "Entries/s of the slower stage of the catch-up", registry=r)
        self.errors = counter("consumer_fastforward_errors_total", "Failed fast-forward steps", registry=r)
        self.book_entries = counter("consumer_fastforward_book_entries_total", "Order-book entries of the live "
                                    "stream given to the Brain's books (stale ones included)", registry=r)  # fmt: skip


class FastForward:
    """The fast-forward follower of one consumer process (own connection)."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        service: Service,
        handled: Callable[[], int],
        *,
        lag_min: int = LAG_MIN,
        prime_ms: int = PRIME_MS,
        replay_ms: int = REPLAY_MS,
        books: bool = True,
    ) -> None:
        self.settings = settings
        self.service = service
        self.handled = handled
        self.stream = settings.stream_key
        self.live_key = keys.live_stream_key(settings.stream_key)
        self.catchup_key = keys.catchup_key(settings.exchange)  # this exchange's own hash
        self.group = settings.consumer_group
        self.symbols = frozenset(s.encode() for s in settings.symbols)
        self.window_us = int(settings.warm_window_s * 1_000_000)
        self.lag_min = lag_min
        self.prime_ms = prime_ms
        self.replay_ms = replay_ms
        self.books = books
        self.metrics = FastForwardMetrics(registry)
        self.client: aioredis.Redis = make_client(settings.brain_redis_url, settings, timeout=5.0)
        self.cursor: str | None = None  # live stream
        self.tail: StreamId | None = None  # Brain stream tail, while following it
        self.tail_start: StreamId | None = None
        self.lag = 0
        self._last_status = 0.0
        self._rate_mark = (time.monotonic(), handled())
        self.rate = 0.0
        self._warm_keys: dict[tuple[bytes, bytes], str] = {}
        self.failures = 0  # failed steps in a row

    async def run(self) -> None:
        """Until the consumer stops; a failed step is retried (WARM is a cache: nothing is lost meanwhile)."""
        try:
            while not self.service.stopping.is_set():
                try:
                    await self._status()
                    await self.step()
                    self.failures = 0
                except FF_ERRORS as exc:
                    await self._failed(exc)
        finally:
            await self.client.aclose()

    async def _failed(self, exc: BaseException) -> None:
        """Count, log the 1st, 10th and every 100th in a row, leave the tail mode, wait."""
        self.metrics.errors.inc()
        self.failures += 1
        if self.failures in (1, 10) or self.failures % 100 == 0:
            log.warning("fast-forward: %s", exc)
        self.tail = self.tail_start = None
        self.metrics.tail.set(0)
        await self.service.sleep_or_stop(0.5)

    async def step(self) -> None:
        if self.cursor is None:
            self.cursor = f"{max(0, int(time.time() * 1000) - self.replay_ms)}-0"
        streams, ids = [self.live_key], [self.cursor]
        if self.tail is not None:
            streams.append(self.stream)
            ids.append(format_stream_id(self.tail))
        (reply,) = await execute_packed(
            self.client, [("XREAD", "COUNT", BATCH, "BLOCK", 100, "STREAMS", *streams, *ids)]
        )
        if isinstance(reply, BaseException):
            raise RuntimeError(f"XREAD: {reply}")
        got = parse_read_reply(reply) if reply else {}
        tail = got.get(self.stream.encode(), [])
        if tail:
            self.tail = parse_stream_id(tail[-1][0])
            await self._copy_tail(tail)
        live = got.get(self.live_key.encode(), [])
        if live:
            self.cursor = live[-1][0].decode()
            await self.apply(live)

    async def _copy_tail(self, entries: Sequence[tuple[bytes, list[bytes] | None]]) -> None:
        maxlen = str(LIVE_MAXLEN)
        cmds: list[Command] = [("XADD", self.live_key, "MAXLEN", "~", maxlen, eid, *f) for eid, f in entries if f]
        await execute_packed(self.client, cmds)  # "equal or smaller": already in the live stream, skipped

    def _warm_key(self, symbol: bytes, exchange: bytes) -> str:
        key = self._warm_keys.get((symbol, exchange))
        if key is None:
            key = self._warm_keys[(symbol, exchange)] = keys.warm_key(symbol.decode(), exchange.decode())
        return key

    async def apply(self, entries: Sequence[tuple[bytes, list[bytes] | None]]) -> int:
        """WARM members of the valid trades of configured symbols among `entries`; book entries to the books."""
        zadd: dict[str, list[bytes | str | int]] = {}
        newest: dict[str, int] = {}
        depth: list[DepthDiff | BookSnapshot | BookReset] = []
        newest_recv = 0
        for _eid, fields in entries:
            if not fields:
                continue
            fast = match_trade(fields)
            if fast is not None:
                if fast[0] not in self.symbols:
                    continue
                price, volume, side, ts, trade_id, recv_ts = fields[TRADE_VALUES]
                key = self._warm_key(*fast)
                score = int(ts)
                member = b"|".join((trade_id, price, volume, side, recv_ts))
                newest_recv = max(newest_recv, int(recv_ts))
            else:
                item = self._decode(fields)
                if item is None:
                    continue
                if not isinstance(item, tuple):
                    depth.append(item)
                    continue
                key, score, member, recv = item
                newest_recv = max(newest_recv, recv)
            zadd.setdefault(key, []).extend((score, member))
            newest[key] = max(newest.get(key, 0), score)
        cmds: list[Command] = []
        for key, args in zadd.items():
            for i in range(0, len(args), 2000):
                cmds.append(("ZADD", key, *args[i : i + 2000]))
            cmds.append(("ZREMRANGEBYSCORE", key, "-inf", f"({newest[key] - self.window_us}"))
        if cmds:
            replies = await execute_packed(self.client, cmds)
            bad = [r for r in replies if isinstance(r, BaseException)]
            if bad:
                self.metrics.errors.inc(len(bad))
                log.warning("fast-forward: %d WARM commands failed: %s", len(bad), bad[0])
        trades = sum(len(a) for a in zadd.values()) // 2
        self.metrics.applied.inc(trades)
        if newest_recv:
            self.metrics.live_age.set(max(0.0, time.time() - newest_recv / 1e6))
        if depth and self.books:
            await self._apply_books(depth)
        return trades

    def _decode(self, fields: list[bytes]) -> tuple[str, int, bytes, int] | DepthDiff | BookSnapshot | BookReset | None:
        """Any entry but a trade in the contract's order: a trade's (WARM key, score, member, recv_ts), a book
        entry, or None (not valid or not a configured symbol: the ordered path dead-letters it)."""
        if is_book_entry(fields):
            book = book_verdict(fields, self.symbols)
            return None if isinstance(book, str) else book
        try:
            tick = strict_decode(fields)
        except (TickError, ValueError, KeyError, TypeError):
            return None
        if tick.symbol.encode() not in self.symbols:
            return None
        if isinstance(tick, DepthDiff):
            return tick
        assert isinstance(tick, Trade)
        key = self._warm_key(tick.symbol.encode(), tick.exchange.encode())
        return key, tick.timestamp, encode_warm_member(tick).encode(), tick.recv_ts

    async def _apply_books(self, items: Sequence[DepthDiff | BookSnapshot | BookReset]) -> None:
        (reply,) = await execute_packed(self.client, [book_apply_call(items)])
        if isinstance(reply, BaseException):
            self.metrics.errors.inc()
            log.warning("fast-forward: book entries not applied: %s", reply)
        else:
            self.metrics.book_entries.inc(len(items))

    async def _status(self) -> None:
        """Group lag and frontier, tail mode on or off, the Brain side of its exchange's catch-up hash."""
        now = time.monotonic()
        if now - self._last_status < STATUS_INTERVAL_S:
            return
        mark_t, mark_n = self._rate_mark
        n = self.handled()
        self.rate = (n - mark_n) / max(now - mark_t, 1e-6)
        self._rate_mark = (now, n)
        self._last_status = now
        groups_r, top_r, state_r = await execute_packed(
            self.client,
            [("XINFO", "GROUPS", self.stream), ("XREVRANGE", self.stream, "+", "-", "COUNT", 1),
             ("HGETALL", self.catchup_key)],
        )  # fmt: skip
        frontier: StreamId | None = None
        lag = 0
        if not isinstance(groups_r, BaseException):
            for g in groups_r:
                info = parse_info_pairs(g)
                if info[b"name"].decode() == self.group:
                    frontier = parse_stream_id(info[b"last-delivered-id"])
                    raw_lag = info.get(b"lag")
                    lag = int(raw_lag) if raw_lag is not None else 0
        self.lag = lag
        top = parse_stream_id(top_r[0][0]) if not isinstance(top_r, BaseException) and top_r else None
        top_live = top is not None and top[0] >= time.time() * 1000 - TAIL_LIVE_MS
        if self.tail is None and lag >= self.lag_min and top_live and top is not None:
            # At most PRIME_ENTRIES before the top: a backlog that arrived fast (a replay) is the ordered path's.
            (recent,) = await execute_packed(
                self.client, [("XREVRANGE", self.stream, "+", "-", "COUNT", PRIME_ENTRIES)]
            )
            oldest = parse_stream_id(recent[-1][0]) if recent and not isinstance(recent, BaseException) else top
            start = max((max(0, top[0] - self.prime_ms), 0), oldest)
            self.tail = self.tail_start = (start[0], start[1] - 1) if start[1] else (start[0] - 1, 2**63 - 1)
            self.metrics.tail.set(1)
            log.info("fast-forward: the consumer group is %d entries behind; following the Brain stream's tail "
                     "from %s", lag, format_stream_id(self.tail))  # fmt: skip
        elif self.tail is not None and lag < self.lag_min // 2:
            log.info("fast-forward: the consumer group caught up (lag %d); tail no longer followed", lag)
            self.tail = self.tail_start = None
            self.metrics.tail.set(0)
        brain_eta = lag / self.rate if self.rate > 0 else (0.0 if lag == 0 else -1.0)
        fields: list[Any] = [
            "brain_lag", lag, "brain_frontier", format_stream_id(frontier) if frontier else "",
            "brain_rate", f"{self.rate:.1f}", "brain_eta_s", f"{brain_eta:.1f}",
            "brain_updated", f"{time.time():.3f}",
        ]  # fmt: skip
        if self.tail_start is not None:  # kept after the tail mode ends, like the forwarder's `live_start`
            fields += ["brain_tail_start", format_stream_id(self.tail_start)]
        await execute_packed(self.client, [("HSET", self.catchup_key, *fields)])
        state = state_r if isinstance(state_r, dict) else {}
        if isinstance(state_r, list):
            state = dict(zip(state_r[::2], state_r[1::2], strict=False))
        vps_active = state.get(b"vps_active") == b"1"
        vps_backlog = int(state.get(b"vps_backlog", b"0") or 0) if vps_active else 0
        vps_eta = float(state.get(b"vps_eta_s", b"0") or 0) if vps_active else 0.0
        vps_rate = float(state.get(b"vps_rate", b"0") or 0)
        active = vps_active or lag >= self.lag_min
        self.metrics.active.set(int(active))
        self.metrics.backlog.set(vps_backlog + lag)
        etas = [vps_eta, brain_eta]
        self.metrics.eta.set(-1.0 if min(etas) < 0 else max(etas))
        rates = [r for r in ((vps_rate if vps_active else 0.0), self.rate) if r > 0]
        self.metrics.rate.set(min(rates) if rates else 0.0)
