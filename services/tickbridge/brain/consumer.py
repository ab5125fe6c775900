"""`tickbridge consumer`: the Brain stream (consumer group as a cursor) -> per-symbol streams + WARM sorted sets.

Exactly once by construction (issue 20): the group `CONSUMER_GROUP` is a durable cursor. The consumer reads
with XREAD from the group's last-delivered ID, and each batch is one call of the Redis function
`tickbridge_brain_ingest` (brain.lua) that appends every tick to `market:<exchange>:trades|depth:<SYMBOL>`
(with `src_id` = the Brain-stream ID), trades to the WARM zset, and moves the group past the batch (`XGROUP
SETID … ENTRIESREAD`): keys written and cursor moved are one atomic step, so a crash before or after it never
loses or duplicates, and Redis keeps no pending list (no per-entry XACK, no claims). The call checks that the
group is still where the batch was read from; if another consumer moved it, nothing is written and this one
re-reads from the group, so a second consumer on the same stream is harmless (it waits as a standby and takes
over if the first stops) and each symbol keeps the Brain stream's order.

Entries are decoded and validated in Python first, and only the contract's fields of a valid tick of a
configured symbol (SYMBOLS) travel on, in the contract's order (a trade in another field order is written
in the contract's). Anything else (extra, duplicate or missing fields, invalid values, a symbol outside
SYMBOLS) goes to the dead-letter stream through the same function, as a capped copy: at most
`dead_letter_max_bytes` of the raw fields (a `truncated` field says what was cut), in a stream capped at
`dead_letter_maxlen` entries (the oldest are evicted; both counted). A peer on the link can neither stall the
consumer nor fill the Brain Redis with what it sends. An entry whose append fails (its target key is not a
stream) is dead-lettered by the same call, with the error as reason, while the rest of the batch is written.

Upgrade: entries left pending by a consumer of an older version (XREADGROUP) are handled once at start, each
acked and written in one step only if not done before (CONSUMER_MAX_DELIVERIES still dead-letters one
delivered too often); then the group is a cursor.

Trimming: the Brain stream is trimmed (MINID, approximate) below the oldest entry CONSUMER_GROUP still
needs, keeping `trim_retention_s` of history. Other groups are ignored (a stray group at 0-0 must not
stop the trimming and fill the Brain's memory).

The Brain only sees the VPS through data: the VPS link is reported up while the newest tick in the
Brain stream is younger than `stale_after_s`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry
from redis.exceptions import ResponseError

from tickbridge.brain.book_metrics import BookMetrics
from tickbridge.brain.books import book_keys_index, book_record, book_verdict
from tickbridge.brain.common import (
    INGEST_FUNCTION,
    group_floor,
    instance_name,
    load_functions,
    parse_info_pairs,
    reply_or_raise,
)
from tickbridge.brain.fastforward import FastForward
from tickbridge.core import keys
from tickbridge.core.backoff import Backoff
from tickbridge.core.groups import GroupMember, read_after
from tickbridge.core.lifecycle import Service, Watchdog, run_service, setup_logging, tune_gc
from tickbridge.core.metrics import HopLatency, counter, gauge, histogram, serve_metrics
from tickbridge.core.redis_io import TRANSIENT_ERRORS, Command, ensure_group, execute_packed, make_client
from tickbridge.core.settings import Settings, load_settings
from tickbridge.core.tick import BookReset, BookSnapshot, DepthDiff, Tick, TickError, Trade
from tickbridge.core.wire import (
    TRADE_VALUES,
    GroupEntry,
    encode_trade,
    entry_field,
    is_book_entry,
    match_trade,
    now_us,
    stream_id_ms,
    strict_decode,
)

log = logging.getLogger(__name__)

#: The `recv_ts` values of a batch per symbol (bytes as read, or ints), for the hop latency histogram.
Stamps = Sequence[tuple[bytes, Sequence[bytes | int]]]

MONITOR_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ResponseError)

#: Dead-letter stream cap (XADD MAXLEN =): the oldest dead letters are evicted (counted) beyond it.
DEAD_LETTER_MAXLEN = 10_000
#: Bytes of an entry's raw fields (names and values) a dead letter copies at most; 10,000 x 16 KiB = 160 MB
#: at worst, under a tenth of the Brain Redis' 2 GB `maxmemory`. A valid tick is far smaller (a trade
#: ~150 B; a depth diff of Binance's 100 ms stream a few KiB), so a valid one stays replayable.
DEAD_LETTER_MAX_BYTES = 16_384
#: Seconds a consumer whose call found the group moved by another one waits before it reads again (a standby).
STANDBY_S = 1.0


class GroupMoved(Exception):
    """Another consumer moved the group since this one read its batch: nothing was written."""


#: Field pairs a dead letter copies at most (the contract has 9; brain.lua unpacks them in one call).
DEAD_LETTER_MAX_FIELDS = 64


def capped_copy(
    fields: list[bytes], max_bytes: int, max_fields: int = DEAD_LETTER_MAX_FIELDS
) -> tuple[list[bytes], str]:
    """The first field pairs of an entry within `max_bytes` (names and values; the last one cut) and
    `max_fields` pairs, and what was cut ('' when the copy is whole)."""
    total = sum(map(len, fields))
    pairs = len(fields) // 2
    if total <= max_bytes and pairs <= max_fields:
        return list(fields), ""
    out: list[bytes] = []
    left = max_bytes
    for i in range(0, min(pairs, max_fields) * 2, 2):
        if left <= 0:
            break
        name = fields[i][:left]
        left -= len(name)
        value = fields[i + 1][: max(left, 0)]
        left -= len(value)
        out += [name, value]
    kept = sum(map(len, out))
    return out, f"kept {len(out) // 2} of {pairs} fields, {kept} of {total} bytes"


class ConsumerMetrics:
    """Prometheus metrics of the Brain consumer."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.entries = counter(
            "consumer_entries_total",
            "Brain-stream entries handled, by outcome (written, duplicate, dead_letter, missing)",
            ("outcome",),
            registry=registry,
        )
        self.dead_letters = counter(
            "consumer_dead_letters_total", "Entries sent to the dead-letter stream", registry=registry
        )
        self.dead_letters_truncated = counter(
            "consumer_dead_letters_truncated_total",
            "Dead letters that keep only part of their entry's fields (the byte or field cap)",
            registry=registry,
        )
        self.dead_letters_evicted = counter(
            "consumer_dead_letters_evicted_total",
            "Oldest dead letters evicted by the dead-letter stream's length cap",
            registry=registry,
        )
        self.claimed = counter(
            "consumer_claimed_total", "Entries re-delivered from the PEL or claimed", registry=registry
        )
        self.errors = counter("consumer_errors_total", "Batch failures by kind", ("kind",), registry=registry)
        for kind in ("redis", "response", "warm"):  # exported at 0 so dashboards show "none yet"
            self.errors.labels(kind)
        self.batch_seconds = histogram("consumer_batch_seconds", "Time of one ingest call", registry=registry)
        self.batch_size = histogram(
            "consumer_batch_entries",
            "Entries per ingest call",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
            registry=registry,
        )
        self.throughput = gauge("consumer_throughput_ticks_per_second", "Entries handled per second", registry=registry)
        self.lag = gauge(
            "consumer_lag_entries", "Entries in the Brain stream not yet delivered to the group", registry=registry
        )
        self.pending = gauge("consumer_pending_entries", "Entries delivered but not acked (group)", registry=registry)
        self.lag_seconds = gauge(
            "consumer_lag_seconds",
            "Age of the oldest entry not yet handled (pending or undelivered)",
            registry=registry,
        )
        self.oldest_pending_age = gauge(
            "consumer_oldest_pending_age_seconds", "Age of the oldest pending entry", registry=registry
        )
        self.staleness = gauge(
            "consumer_data_staleness_seconds",
            "Now minus the exchange time of the newest tick in the Brain stream",
            registry=registry,
        )
        self.vps_link_up = gauge(
            "consumer_vps_link_up",
            "1 while ticks from the VPS keep arriving (staleness under the threshold)",
            registry=registry,
        )
        self.dead_letter_length = gauge(
            "consumer_dead_letter_entries", "Length of the dead-letter stream", registry=registry
        )
        self.brain_redis_up = gauge(
            "consumer_brain_redis_up",
            "1 while the consumer's last monitoring round reached the Brain Redis",
            registry=registry,
        )
        self.brain_redis_used_memory = gauge(
            "consumer_brain_redis_used_memory_bytes", "used_memory of the Brain Redis (INFO memory)", registry=registry
        )
        self.symbol_stream_latency = HopLatency(
            "consumer_symbol_stream_latency_seconds",
            "Hop collector -> per-symbol stream: the ingest call returned on the Brain minus the collector's recv_ts, "
            "per tick (clocks of the Brain and the VPS, NTP assumed; negatives count as 0)",
            registry=registry,
        )
        self.brain_redis_maxmemory = gauge(
            "consumer_brain_redis_maxmemory_bytes",
            "maxmemory of the Brain Redis (INFO memory; 0 = no limit)",
            registry=registry,
        )


class BrainConsumer(Service):
    """One consumer instance of the Brain consumer group."""

    name = "consumer"

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry = REGISTRY,
        *,
        stale_after_s: float = 10.0,
        trim_retention_s: float = 60.0,
        monitor_interval_s: float = 1.0,
        block_ms: int = 500,
        dead_letter_maxlen: int = DEAD_LETTER_MAXLEN,
        dead_letter_max_bytes: int = DEAD_LETTER_MAX_BYTES,
        fastforward: bool = True,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.metrics = ConsumerMetrics(registry)
        self.book_metrics = BookMetrics(registry, settings.symbols)
        self.stream = settings.stream_key
        self.group = settings.consumer_group
        self.consumer = instance_name(settings, "consumer")
        self.member = GroupMember(self.group, self.consumer)
        self.stale_after_s = stale_after_s
        self.trim_retention_s = trim_retention_s
        self.monitor_interval_s = monitor_interval_s
        self.block_ms = block_ms
        self.dead_letter_maxlen = dead_letter_maxlen
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self.symbols = frozenset(s.encode() for s in settings.symbols)
        self._latency = {s.encode(): self.metrics.symbol_stream_latency.child(s) for s in settings.symbols}
        self._info_denied = False
        self.warm_window_us = int(settings.warm_window_s * 1_000_000)
        self.watchdog = Watchdog(default_limit=120.0)
        self.client: aioredis.Redis | None = None
        self.handled = 0
        self._newest_ts_us: int | None = None  # exchange time of the newest tick seen in the Brain stream
        #: The group's last-delivered ID as this consumer knows it: where the next batch is read from (the last
        #: ID of the batch in flight, whose call moves the group there).
        self.position: bytes | None = None
        #: True after a call found the group moved by another consumer: this one waits (`_stand_by`).
        self._standby = False
        self._keys: dict[tuple[bytes, bytes], tuple[str, str]] = {}
        self._inflight: asyncio.Task[tuple[int, int]] | None = None
        #: Live ticks to WARM ahead of a backlog (issue 16, `fastforward.py`); None: off (benchmarks of the core).
        self.fastforward: FastForward | None = (
            FastForward(settings, registry, self, lambda: self.handled) if fastforward else None
        )

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        self.client = make_client(self.settings.brain_redis_url, self.settings)
        log.info("consumer %s on %s group %s", self.consumer, self.stream, self.group)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._consume_loop())
                tg.create_task(self._monitor_loop())
                if self.fastforward is not None:
                    tg.create_task(self.fastforward.run())
                tg.create_task(self.watchdog.run(self.stopping))
        finally:
            await self.client.aclose()
            log.info("consumer %s stopped after %d entries", self.consumer, self.handled)

    async def _setup(self) -> None:
        assert self.client is not None
        await load_functions(self.client)
        await ensure_group(self.client, self.stream, self.group, "0")
        await self.fold_pending()
        await self._sync_position()

    async def _stand_by(self) -> None:
        """Wait while another consumer moves the group; take over once it has not moved for `STANDBY_S` (the
        other one stopped, or has nothing to do: then both read, and the loser of the next call stands by again).
        A standby costs one XINFO GROUPS per `STANDBY_S`, not a read and a build of every batch."""
        await self._sync_position()
        before = self.position
        if await self.sleep_or_stop(STANDBY_S):
            return
        await self._sync_position()
        if self.position == before:
            self._standby = False
            log.info("consumer %s takes over %s at %s", self.consumer, self.stream, before)

    async def _sync_position(self) -> None:
        """Read from where the group is (its last-delivered ID)."""
        assert self.client is not None
        (groups,) = await execute_packed(self.client, [["XINFO", "GROUPS", self.stream]])
        mine = [g for g in map(parse_info_pairs, reply_or_raise(groups)) if g[b"name"] == self.group.encode()]
        if not mine:
            raise ResponseError(f"NOGROUP {self.group} on {self.stream}")
        self.position = mine[0][b"last-delivered-id"]

    async def _consume_loop(self) -> None:
        backoff = Backoff(base=0.1, cap=5.0)
        ready = False
        while not self.stopping.is_set():
            self.watchdog.beat("consume")
            try:
                if not ready:
                    await self._setup()
                    ready = True
                if self._standby:
                    await self._stand_by()
                    continue
                if self.position is None:
                    await self._sync_position()
                await self.read_new()
                backoff.reset()
            except GroupMoved:
                # Another consumer ingests this stream: stand by, then read again from where the group is.
                await self._drop_inflight()
                self.position = None
                self._standby = True
            except TRANSIENT_ERRORS as exc:
                self.metrics.errors.labels("redis").inc()
                log.warning("Brain Redis unavailable (%s); retrying", exc)
                await self._drop_inflight()
                ready = False
                await self.sleep_or_stop(backoff.next())
            except ResponseError as exc:
                self.metrics.errors.labels("response").inc()
                log.error("Redis error: %s", exc)
                await self._drop_inflight()
                ready = False  # NOGROUP / missing function: recreate, then read from the group's position
                await self.sleep_or_stop(backoff.next())
        await self._drop_inflight()

    # ---------------------------------------------------------------- reading

    async def _read(self, block: bool) -> list[GroupEntry]:
        """XREAD of the next batch after `position` (no pending list: the ingest call moves the group)."""
        assert self.client is not None and self.position is not None
        block_ms = self.block_ms if block else None
        got = await read_after(self.client, [self.stream], [self.position], self.settings.consumer_batch, block_ms)
        return next(iter(got.values()), [])

    async def read_new(self) -> int:
        """Read and validate one batch of new entries while the previous batch's call runs in Redis.

        Python work overlaps Redis work; at most one call is in flight, and it is awaited before anything else
        touches the group. The next batch is read from the last ID of the one in flight: if that call finds the
        group moved (or fails), the next one does too, and the loop reads again from the group.
        """
        assert self.position is not None
        idle = self._inflight is None
        entries = await self._read(block=idle)
        if not entries and idle:
            # Nothing new for a whole block: look where the group is before the next read (an operator may have
            # moved it back, e.g. the repair of a refused Brain stream; a read after a bogus position waits forever).
            self.position = None
            return 0
        built = self._build(entries, {}, self.position) if entries else None
        await self._finish_inflight()
        if built is not None:
            self.position = entries[-1][0]
            self._inflight = asyncio.create_task(self._call(built[0], len(entries), built[1], built[2], built[3]))
            # Let the call go out before the next read: otherwise that read's round trip delays every tick.
            await asyncio.sleep(0)
        return len(entries)

    async def fold_pending(self) -> int:
        """Upgrade from a consumer that read with XREADGROUP: every entry pending in the group (any member's) is
        handled once, acked and written in one step only if not done before. The group is past them already."""
        assert self.client is not None
        total = 0
        async for entries, deleted in self.member.claim_idle(self.client, self.stream, 0, self.settings.consumer_batch):
            if deleted:
                self.metrics.entries.labels("missing").inc(deleted)
                log.warning("%d pending entries were trimmed before anyone handled them", deleted)
            if entries:
                total += len(entries)
                await self.process(entries, recovered=True)
        pages = self.member.own_pending(self.client, [self.stream], self.settings.consumer_batch, self.stopping)
        async for page in pages:
            entries = next(iter(page.values()))
            total += len(entries)
            await self.process(entries, recovered=True)
        if total:
            self.metrics.claimed.inc(total)
            log.info("folded %d entries left pending by an older consumer", total)
        return total

    async def _delivery_counts(self, entries: Sequence[GroupEntry]) -> dict[bytes, int]:
        assert self.client is not None
        lo, hi = entries[0][0], entries[-1][0]
        cmd: Command = ["XPENDING", self.stream, self.group, lo, hi, len(entries) * 2 + 10, self.consumer]
        (reply,) = await execute_packed(self.client, [cmd])
        return {row[0]: int(row[3]) for row in reply_or_raise(reply)}

    # ---------------------------------------------------------------- writing

    async def process(self, entries: Sequence[GroupEntry], *, recovered: bool) -> tuple[int, int]:
        """Validate a batch and hand it to the atomic ingest function; returns (written, duplicates).

        `recovered`: pending entries of an older consumer (upgrade mode: acked one by one, the group stays);
        otherwise the batch read from `position`, which the call moves the group past.
        """
        await self._finish_inflight()
        if recovered:
            counts = await self._delivery_counts(entries)
            cmd, dead, truncated, stamps = self._build(entries, counts, b"")
        else:
            assert self.position is not None
            cmd, dead, truncated, stamps = self._build(entries, {}, self.position)
            self.position = entries[-1][0]
        return await self._call(cmd, len(entries), dead, truncated, stamps)

    def _build(
        self, entries: Sequence[GroupEntry], counts: dict[bytes, int], position: bytes
    ) -> tuple[list[str | bytes | int], int, int, Stamps]:
        """The FCALL for a batch (validation happens here), the number of dead letters in it, how many of
        them keep only part of their entry, and the ticks' `recv_ts` per symbol (for the hop latency).

        `position`: the group's last-delivered ID the batch was read after (the call moves the group to the
        batch's last ID if the group is still there); b"" for pending entries of an older consumer."""
        # The dead-letter stream is always KEYS[2]: the call dead-letters an entry whose append failed.
        key_index: dict[str, int] = {keys.CONSUMER_DEAD_LETTER: 2}
        key_list: list[str] = [self.stream, keys.CONSUMER_DEAD_LETTER]

        def index(key: str) -> int:
            idx = key_index.get(key)
            if idx is None:
                key_list.append(key)
                idx = key_index[key] = len(key_list)
            return idx

        # Trades in the contract's order send 6 values; symbol and exchange travel once per key pair
        # (trade stream at index k, its WARM zset at k + 1) in `header`.
        header: list[str | bytes | int] = []
        pair_index: dict[tuple[bytes, bytes], int] = {}

        def trade_pair(symbol: bytes, exchange: bytes) -> int:
            idx = pair_index.get((symbol, exchange))
            if idx is None:
                trades, warm = self._trade_keys(symbol, exchange)
                key_list.extend((trades, warm))
                idx = pair_index[(symbol, exchange)] = len(key_list) - 1
                header.extend((idx, symbol, exchange))
            return idx

        book_index: dict[str, int] = {}
        args: list[str | bytes | int] = []
        runs: dict[tuple[bytes, bytes], list[bytes]] = {}  # (symbol, exchange) -> 7 values per trade
        dead = truncated = 0
        dl = 2
        symbols = self.symbols
        stamps: list[tuple[bytes, Sequence[bytes | int]]] = []
        for entry_id, fields in entries:
            if fields is None:  # deleted from the stream while pending: nothing left to write
                args += ["D", entry_id, dl, self.dead_letter_maxlen, 4,
                         "reason", "entry deleted while pending", "src_stream", self.stream]  # fmt: skip
                dead += 1
                continue
            deliveries = counts.get(entry_id, 1)
            if deliveries > self.settings.consumer_max_deliveries:
                reason = f"delivered {deliveries} times"
            else:
                fast = match_trade(fields)
                if fast is not None and fast[0] in symbols:  # the common case, without a dict and a dataclass
                    run = runs.get(fast)
                    if run is None:
                        run = runs[fast] = []
                    run += (entry_id, *fields[TRADE_VALUES])
                    continue
                tick = self._verdict(fields)
                if isinstance(tick, Trade):
                    # Another field order: written in the contract's, in its symbol's run (the order of the
                    # Brain stream per symbol holds).
                    pair = (tick.symbol.encode(), tick.exchange.encode())
                    run = runs.get(pair)
                    if run is None:
                        run = runs[pair] = []
                    run += (entry_id, *(str(v).encode() for v in encode_trade(tick)[TRADE_VALUES]))
                    continue
                if isinstance(tick, DepthDiff | BookSnapshot | BookReset):
                    # Diffs and whole books go to the per-symbol depth stream, in order, and into the book.
                    stamps.append((tick.symbol.encode(), (tick.recv_ts,)))
                    target = index(keys.depth_key(tick.symbol, tick.exchange))
                    args += book_record(entry_id, target, book_keys_index(tick.symbol, key_list, book_index), tick)
                    continue
                reason = tick
            raw = fields if len(fields) % 2 == 0 else [*fields, b""]
            copy, cut = capped_copy(raw, self.dead_letter_max_bytes)
            extra: list[bytes] = [b"truncated", cut.encode()] if cut else []
            truncated += bool(cut)
            args += ["D", entry_id, dl, self.dead_letter_maxlen, 2 + len(extra) + len(copy),
                     b"reason", reason.encode(), *extra, *copy]  # fmt: skip
            dead += 1
        for (symbol, exchange), run in runs.items():
            args += ["T", trade_pair(symbol, exchange), len(run) // 7, *run]
            stamps.append((symbol, run[6::7]))  # each trade is (id, price, volume, side, timestamp, trade_id, recv_ts)
        last_id = entries[-1][0] if position else b""
        head = [self.group, self.warm_window_us, position, last_id, len(entries), self.dead_letter_maxlen,
                len(header) // 3, *header]  # fmt: skip
        return ["FCALL", INGEST_FUNCTION, len(key_list), *key_list, *head, *args], dead, truncated, stamps

    def _verdict(self, fields: list[bytes]) -> Tick | BookSnapshot | BookReset | str:
        """The tick (or whole book) the entry holds, or why it is dead-lettered."""
        if is_book_entry(fields):
            return book_verdict(fields, self.symbols)
        try:
            tick = strict_decode(fields)
        except TickError as exc:
            return str(exc)
        if tick.symbol.encode() not in self.symbols:
            # A per-symbol stream, WARM set, writer group and QuestDB symbol for any name the link sends
            # would let it fill the Brain: only the configured symbols pass.
            return f"symbol {tick.symbol!r} not in SYMBOLS"
        return tick

    async def _call(
        self, cmd: list[str | bytes | int], n: int, dead: int, truncated: int = 0, stamps: Stamps = ()
    ) -> tuple[int, int]:
        assert self.client is not None
        started = time.perf_counter()
        (reply,) = await execute_packed(self.client, [cmd])
        written, dup, warm_errors, failed, first_error, evicted, moved = reply_or_raise(reply)
        if moved:
            raise GroupMoved(f"{self.group} on {self.stream} moved by another consumer")
        if stamps:
            # Hop collector -> per-symbol stream, once per call that returned (an entry it left pending, rare,
            # counts again when its retry succeeds).
            confirmed_us = now_us()
            latency = self._latency
            for symbol, recv in stamps:
                child = latency.get(symbol)
                if child is not None:
                    child.observe_since(confirmed_us, map(int, recv))
        if evicted:
            self.metrics.dead_letters_evicted.inc(int(evicted))
        if warm_errors:
            self.metrics.errors.labels("warm").inc(warm_errors)
            log.error("%d WARM commands failed (a key of the wrong type?); the ticks are written", warm_errors)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(n)
        if dead:
            # Dead letters are "written" to the dead-letter stream by the same call; split the count.
            self.metrics.dead_letters.inc(dead)
            self.metrics.dead_letters_truncated.inc(truncated)
            self.metrics.entries.labels("dead_letter").inc(dead)
            log.warning("%d entries sent to %s", dead, keys.CONSUMER_DEAD_LETTER)
        self.metrics.entries.labels("written").inc(max(0, int(written) - dead))
        if dup:
            self.metrics.entries.labels("duplicate").inc(int(dup))
        if failed:
            # Their target key refused the append: dead-lettered by the same call (replayable once the key is
            # fixed); the rest of the batch is written.
            self.metrics.dead_letters.inc(int(failed))
            self.metrics.entries.labels("dead_letter").inc(int(failed))
            self.metrics.errors.labels("response").inc()
            log.error("%d entries dead-lettered, their append failed: %s", failed, first_error.decode())
        elif first_error:
            self.metrics.errors.labels("response").inc()
            log.error("ingest: %s", first_error.decode())
        self.handled += n
        return int(written), int(dup)

    async def _drop_inflight(self) -> None:
        """Wait for the call in flight; if it failed (or found the group moved) nothing of it was written, and its
        entries are read again from the group's position."""
        try:
            await self._finish_inflight()
        except MONITOR_ERRORS as exc:
            log.warning("batch call failed (%s); read again from the group", exc)
        except GroupMoved as exc:
            log.warning("batch call not applied (%s); read again from the group", exc)

    async def _finish_inflight(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            await task

    def _trade_keys(self, symbol: bytes, exchange: bytes) -> tuple[str, str]:
        cached = self._keys.get((symbol, exchange))
        if cached is None:
            sym, exch = symbol.decode(), exchange.decode()
            cached = self._keys[(symbol, exchange)] = (keys.trades_key(sym, exch), keys.warm_key(sym, exch))
        return cached

    # ---------------------------------------------------------------- monitoring

    async def _monitor_loop(self) -> None:
        last_handled, last_t = self.handled, time.monotonic()
        last_trim = 0.0
        while not await self.sleep_or_stop(self.monitor_interval_s):
            now = time.monotonic()
            self.metrics.throughput.set((self.handled - last_handled) / max(now - last_t, 1e-6))
            last_handled, last_t = self.handled, now
            try:
                await self.update_metrics()
                self.metrics.brain_redis_up.set(1)
            except TRANSIENT_ERRORS as exc:
                log.debug("monitor: %s", exc)
                self._brain_redis_unreachable()
                continue
            except ResponseError as exc:
                log.debug("monitor: %s", exc)
            try:
                if now - last_trim > 5.0:
                    await self.trim()
                    last_trim = now
            except MONITOR_ERRORS as exc:
                log.debug("trim: %s", exc)

    def _brain_redis_unreachable(self) -> None:
        """Without Redis no tick can arrive: staleness keeps growing from the newest tick seen, and the link
        reads down, so DataStale and VPSDisconnected fire instead of freezing at their last healthy value."""
        self.metrics.brain_redis_up.set(0)
        self.metrics.vps_link_up.set(0)
        if self._newest_ts_us is not None:
            self.metrics.staleness.set(max(0.0, (now_us() - self._newest_ts_us) / 1e6))

    async def update_metrics(self) -> None:
        """Lag, pending, ages, staleness, VPS link status, dead letters, heartbeat."""
        assert self.client is not None
        cmds: list[Command] = [
            ["XINFO", "GROUPS", self.stream],
            ["XPENDING", self.stream, self.group],
            ["XREVRANGE", self.stream, "+", "-", "COUNT", 1],
            ["XLEN", keys.CONSUMER_DEAD_LETTER],
            ["SET", keys.heartbeat_key("consumer", self.consumer), str(time.time()), "EX", 15],
            ["INFO", "memory"],
        ]
        groups_r, pending_r, newest_r, dl_r, _, memory_r = await execute_packed(self.client, cmds)
        self._memory(memory_r)
        now_ms = time.time() * 1000
        ages: list[float] = []
        if not isinstance(groups_r, BaseException):
            for g in groups_r:
                info = parse_info_pairs(g)
                if info[b"name"].decode() != self.group:
                    continue
                lag = info.get(b"lag")
                self.metrics.lag.set(float(lag) if lag is not None else 0.0)
                self.metrics.pending.set(float(info[b"pending"]))
                (nxt,) = await execute_packed(
                    self.client, [["XRANGE", self.stream, b"(" + info[b"last-delivered-id"], "+", "COUNT", 1]]
                )
                if not isinstance(nxt, BaseException) and nxt:
                    ages.append(max(0.0, (now_ms - stream_id_ms(nxt[0][0])) / 1000))
        if not isinstance(pending_r, BaseException) and pending_r and pending_r[0]:
            age = max(0.0, (now_ms - stream_id_ms(pending_r[1])) / 1000)
            self.metrics.oldest_pending_age.set(age)
            ages.append(age)
        else:
            self.metrics.oldest_pending_age.set(0)
        self.metrics.lag_seconds.set(max(ages) if ages else 0.0)
        if not isinstance(newest_r, BaseException) and newest_r:
            fields = newest_r[0][1]
            ts = _int_field(fields, b"timestamp")
            if ts is not None:
                self._newest_ts_us = ts
                staleness = max(0.0, (now_us() - ts) / 1e6)
                self.metrics.staleness.set(staleness)
                self.metrics.vps_link_up.set(1 if staleness < self.stale_after_s else 0)
        else:
            self.metrics.vps_link_up.set(0)
        if not isinstance(dl_r, BaseException):
            self.metrics.dead_letter_length.set(float(dl_r))
        await self.book_metrics.update(self.client)

    def _memory(self, reply: object) -> None:
        """used_memory and maxmemory from INFO memory: BrainRedisMemoryHigh fires before `maxmemory` (with
        `noeviction`) refuses the forwarder's XADDs and stops the pipeline."""
        if isinstance(reply, BaseException):
            if not self._info_denied:  # e.g. an ACL without +info: said once, the other metrics go on
                self._info_denied = True
                log.warning("no Brain Redis memory metrics: INFO memory failed (%s)", reply)
            return
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name == "used_memory":
                self.metrics.brain_redis_used_memory.set(float(value))
            elif name == "maxmemory":
                self.metrics.brain_redis_maxmemory.set(float(value))

    async def trim(self) -> None:
        """Trim the Brain stream below what CONSUMER_GROUP still needs, keeping `trim_retention_s` of history.

        The forwarder dedups by explicit IDs against the stream's last ID, which survives trimming.
        """
        assert self.client is not None
        floor = await group_floor(self.client, self.stream, self.group)
        if floor is None:
            return
        keep_ms = int(time.time() * 1000 - self.trim_retention_s * 1000)
        minid = min(floor, (keep_ms, 0))
        if minid[0] <= 0:
            return
        await execute_packed(self.client, [["XTRIM", self.stream, "MINID", "~", f"{minid[0]}-{minid[1]}"]])


def _int_field(fields: list[bytes] | None, name: bytes) -> int | None:
    value = entry_field(fields, name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def run_command(args: argparse.Namespace) -> None:
    """`tickbridge consumer` (no options: configuration comes from the environment)."""
    settings = load_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings.metrics_port_for("consumer"), settings.metrics_bind)
    tune_gc()
    # Test hook (not in --help): `0` turns the fast-forward follower off, to measure its cost (make bench-brain).
    fastforward = os.environ.get("CONSUMER_FASTFORWARD", "1") != "0"
    run_service(lambda: BrainConsumer(settings, fastforward=fastforward))
