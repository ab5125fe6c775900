"""`tickbridge writer`: the Brain's per-symbol streams -> QuestDB `trades` and `depth_updates`.

Consumer group `tickbridge-writer` on every per-symbol stream (the configured symbols plus any found
by SCAN). A read that comes back short (the streams are drained) flushes what is held, unless a flush is
in flight or started less than WRITER_FLUSH_INTERVAL_S ago (0.5 s by default): a trade after a quiet spell goes at
once, a steady flow once per interval, a backlog in batches of at most WRITER_BATCH_ROWS rows; each table
is one ILP-over-HTTP request (`transactional=True`: one request = one transaction), and the stream
entries of a table are XACKed only after QuestDB confirmed it. A crash between flush and ack re-sends
the rows, which the tables' `DEDUP UPSERT KEYS` absorb. When QuestDB is down or slow the batch is
kept, reading pauses and the flush is retried with backoff: nothing is acked unflushed. A suspended
WAL table gets nothing: its rows are set aside (their entries stay pending) and its streams are not read
until it applies again, while the other table keeps flowing.

WARM lives in the consumer's sorted sets only, so the writer trims each per-symbol stream below what
its group still needs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry
from questdb.ingress import Buffer, IngressError, Sender
from redis.exceptions import ResponseError

from tickbridge.brain.common import group_floor, instance_name, parse_info_pairs
from tickbridge.core import keys
from tickbridge.core.backoff import Backoff
from tickbridge.core.groups import GroupMember
from tickbridge.core.lifecycle import Service, Watchdog, run_service, setup_logging, tune_gc
from tickbridge.core.metrics import HopCounts, HopLatency, counter, gauge, histogram, serve_metrics
from tickbridge.core.questdb_io import QuestDBError, QuestDBHttp, ilp_conf
from tickbridge.core.redis_io import TRANSIENT_ERRORS, Command, ensure_group, execute_packed, make_client
from tickbridge.core.settings import Settings, load_settings
from tickbridge.core.wire import DEPTH_DDL, TRADES_DDL, ilp_depth, ilp_trade, now_us, symbol_trade, writer_dead_letter

log = logging.getLogger(__name__)

#: Redis or QuestDB unavailable: keep the batch and retry.


OUTAGE_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, QuestDBError, IngressError)
MONITOR_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ResponseError, QuestDBError)

_EMPTY_LEVELS = np.empty((0, 2), dtype=np.float64)


class WriterMetrics:
    """Prometheus metrics of the writer."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.rows = counter("writer_rows_total", "Rows confirmed by QuestDB, by table", ("table",), registry=registry)
        self.batch_rows = histogram(
            "writer_batch_rows",
            "Rows per flushed batch",
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000),
            registry=registry,
        )
        self.latency = histogram("writer_write_seconds", "ILP flush latency by table", ("table",), registry=registry)
        self.errors = counter("writer_errors_total", "Errors by kind", ("kind",), registry=registry)
        # Exported at 0 so dashboards show "none yet".
        for kind in ("redis_response", "questdb_flush", "wrong_type", "suspended"):
            self.errors.labels(kind)
        self.backlog = gauge(
            "writer_backlog_entries", "Entries in per-symbol streams not yet in QuestDB", registry=registry
        )
        self.buffered = gauge("writer_buffered_rows", "Rows held in memory awaiting a flush", registry=registry)
        self.skipped_keys = gauge(
            "writer_skipped_keys", "Per-symbol keys left out because they are not streams", registry=registry
        )
        self.suspended = gauge("writer_suspended_tables", "QuestDB WAL tables that are suspended", registry=registry)
        self.last_flush = gauge(
            "writer_last_flush_timestamp_seconds", "Unix time of the last confirmed flush", registry=registry
        )
        self.dead_letters = counter(
            "writer_dead_letters_total", "Entries that could not become rows", registry=registry
        )
        self.questdb_latency = HopLatency(
            "writer_questdb_latency_seconds",
            "Hop collector -> QuestDB: QuestDB confirmed the ILP transaction (not yet applied: WAL) minus the "
            "collector's recv_ts, per row (clocks of the Brain and the VPS, NTP assumed; negatives count as 0)",
            registry=registry,
        )


@dataclass
class TableBatch:
    """Rows of one table and the stream entries they came from (acked together after the flush)."""

    table: str
    buffer: Buffer
    rows: int = 0
    ids: dict[bytes, list[bytes]] = field(default_factory=dict)
    recv: dict[bytes, list[int]] = field(default_factory=dict)  # recv_ts per stream, for the hop latency

    def clear(self) -> None:
        self.buffer.clear()
        self.rows = 0
        self.ids = {}
        self.recv = {}


class BrainWriter(Service):
    """Writes the per-symbol streams to QuestDB, exactly once with DEDUP."""

    name = "writer"

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry = REGISTRY,
        *,
        retry_timeout_ms: int = 5_000,
        monitor_interval_s: float = 2.0,
        discover_interval_s: float = 10.0,
    ) -> None:
        super().__init__()
        self.settings = settings
        self._symbols = frozenset(settings.symbols)
        self._latency: dict[bytes, HopCounts | None] = {}
        self.metrics = WriterMetrics(registry)
        self.consumer = instance_name(settings, "writer")
        self.group = keys.WRITER_GROUP
        self.member = GroupMember(self.group, self.consumer)
        self.retry_timeout_ms = retry_timeout_ms
        self.monitor_interval_s = monitor_interval_s
        self.discover_interval_s = discover_interval_s
        self.streams: list[str] = []
        for sym in settings.symbols:
            self.streams += [keys.trades_key(sym), keys.depth_key(sym)]
        self.client: aioredis.Redis | None = None
        self.qdb = QuestDBHttp(settings.brain_questdb_url, settings)
        self.sender: Sender | None = None
        self.batches: dict[str, TableBatch] = {}
        self.watchdog = Watchdog(default_limit=300.0)
        self.written = 0
        #: WAL tables QuestDB reported suspended at the last check: nothing is flushed to them meanwhile.
        self.suspended_tables: set[str] = set()
        #: Tables whose rows were set aside because they were suspended: their streams are not read (the
        #: entries wait in Redis, pending or unread) until the table applies again, while the other table
        #: keeps flowing. A suspended `depth_updates` must not hold the trades back.
        self.held: set[str] = set()
        self._first_row_at: float | None = None
        self._need_recover = True
        self._last_claim = 0.0
        self._last_discover = 0.0
        self._grouped: set[str] = set()
        #: Per-symbol keys that hold something other than a stream: left out of every read (one bad key
        #: must not stop the other symbols) and looked at again at each discovery.
        self._skipped: dict[str, None] = {}
        self._pending_dead: list[tuple[bytes, bytes, str]] = []
        self._flushing: asyncio.Task[None] | None = None
        #: The last read returned less than it asked for from every stream: nothing more is waiting.
        self._last_short = True
        self._last_flush_at = 0.0  # monotonic time the last flush started
        self._texts: dict[bytes, str] = {}

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        self.client = make_client(self.settings.brain_redis_url, self.settings)
        log.info("writer %s -> %s", self.consumer, self.settings.brain_questdb_url)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._write_loop())
                tg.create_task(self._monitor_loop())
                tg.create_task(self.watchdog.run(self.stopping))
        finally:
            if self.sender is not None:
                self.sender.close()
            await self.client.aclose()
            await self.qdb.close()
            log.info("writer %s stopped after %d rows", self.consumer, self.written)

    def _new_sender(self) -> Sender:
        conf = ilp_conf(self.settings.brain_questdb_url, self.settings, retry_timeout_ms=self.retry_timeout_ms)
        sender = Sender.from_conf(conf)
        sender.establish()
        return sender

    async def _setup_questdb(self) -> None:
        await self.qdb.exec(TRADES_DDL)
        await self.qdb.exec(DEPTH_DDL)
        # Known before the first flush: a writer (re)started while a table is suspended must not hand it rows.
        self.suspended_tables = set(await self.qdb.suspended_tables())
        if self.suspended_tables:
            log.error("QuestDB WAL tables suspended at start: %s", ", ".join(sorted(self.suspended_tables)))
        if self.sender is None:
            self.sender = await asyncio.to_thread(self._new_sender)
        sender: Any = self.sender
        if not self.batches:
            for table in (keys.TRADES_TABLE, keys.DEPTH_TABLE):
                self.batches[table] = TableBatch(table, sender.new_buffer())

    async def _setup_groups(self, streams: Iterable[str]) -> None:
        assert self.client is not None
        for stream in list(streams):
            if stream not in self._grouped:
                try:
                    await ensure_group(self.client, stream, self.group, "0")
                except ResponseError as exc:
                    if "WRONGTYPE" not in str(exc):
                        raise
                    self._skip(stream)
                    continue
                self._grouped.add(stream)

    def _skip(self, stream: str) -> None:
        self.streams.remove(stream)
        self._skipped[stream] = None
        self.metrics.errors.labels("wrong_type").inc()
        self.metrics.skipped_keys.set(len(self._skipped))
        log.error("%s is not a stream: left out until it is deleted or becomes one (other symbols go on)", stream)

    async def _recheck_skipped(self) -> None:
        """Bring back skipped keys that were deleted (MKSTREAM recreates them) or became streams."""
        assert self.client is not None
        if not self._skipped:
            return
        names = list(self._skipped)
        types = await execute_packed(self.client, [["TYPE", name] for name in names])
        for name, kind in zip(names, types, strict=True):
            if isinstance(kind, ResponseError):  # e.g. NOPERM: an ACL without TYPE would keep it skipped for good
                log.warning("cannot look at skipped key %s again: %s", name, kind)
            elif kind in (b"stream", b"none", "stream", "none"):
                del self._skipped[name]
                self.streams.append(name)
                log.info("%s is back", name)
        self.metrics.skipped_keys.set(len(self._skipped))

    async def discover(self) -> None:
        """Add per-symbol streams that exist in Redis but are not in SYMBOLS (never lose a symbol)."""
        assert self.client is not None
        await self._recheck_skipped()
        found: list[str] = []
        for pattern in keys.SYMBOL_STREAM_PATTERNS:
            async for key in self.client.scan_iter(match=pattern, count=1000, _type="stream"):
                found.append(key.decode())
        new = sorted(set(found) - set(self.streams))
        if new:
            log.info("discovered %d more per-symbol streams", len(new))
            self.streams += new
        await self._setup_groups(self.streams)

    async def _write_loop(self) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        ready = False
        while not self.stopping.is_set():
            self.watchdog.beat("write")
            try:
                if not ready:
                    await self._setup_questdb()
                    await self._setup_groups(self.streams)
                    ready = True
                now = time.monotonic()
                if now - self._last_discover > self.discover_interval_s:
                    await self.discover()
                    self._last_discover = now
                if self._need_recover:
                    await self.recover_own()
                    self._need_recover = False
                if self.held - self.suspended_tables:
                    await self._resume_held()
                if now - self._last_claim > self.settings.consumer_claim_idle_ms / 2000:
                    await self.claim_idle()
                    self._last_claim = now
                await self.read_new()
                if self._due():
                    await self.start_flush()
                backoff.reset()
            except OUTAGE_ERRORS as exc:
                # Redis or QuestDB unavailable: nothing unflushed was acked; drop what we hold, back
                # off and re-read our pending entries (a re-sent row is absorbed by DEDUP).
                self.metrics.errors.labels(type(exc).__name__).inc()
                log.warning("writer: %s; retrying", exc)
                ready = ready and not isinstance(exc, QuestDBError)
                await self._drop_flushing()
                self._reset_batches()
                await self.sleep_or_stop(backoff.next())
            except ResponseError as exc:
                self.metrics.errors.labels("redis_response").inc()
                log.error("writer: Redis error %s", exc)
                ready = False
                self._grouped.clear()
                await self._drop_flushing()
                self._reset_batches()
                await self.sleep_or_stop(backoff.next())
        await self._final_flush()

    def _reset_batches(self) -> None:
        """Forget unflushed rows (their entries stay pending and are re-read from our PEL)."""
        for batch in self.batches.values():
            batch.clear()
        self._pending_dead = []
        self._first_row_at = None
        self._need_recover = True

    async def _final_flush(self) -> None:
        try:
            await self._await_flushing()
            if any(b.rows for b in self.batches.values()):
                await self.flush_all(retry=False)
        except Exception as exc:  # stopping: unacked entries are re-sent by the next writer
            log.warning("final flush failed (%s); entries stay pending", exc)

    # ---------------------------------------------------------------- reading

    def _rows(self) -> int:
        return sum(b.rows for b in self.batches.values())

    async def _resume_held(self) -> None:
        """Tables that apply again: read their streams again, from our own pending entries first."""
        await self._await_flushing()  # a flush in flight may still set rows of these tables aside
        resumed = self.held - self.suspended_tables
        if not resumed:
            return
        self.held -= resumed
        for table in resumed:
            self.batches[table].clear()  # rows read before the hold: re-read below with the rest, once
        streams = [s for s in self.streams if table_of(s) in resumed]
        log.info("%s applies again: re-reading its %d streams", ", ".join(sorted(resumed)), len(streams))
        await self.recover_own(streams)

    def _due(self) -> bool:
        """Flush when the batch is full, or when the last read came back short (the streams are drained), no
        flush is in flight and the last one started WRITER_FLUSH_INTERVAL_S ago or more. Rows that arrive
        meanwhile make the next batch: a trade after a quiet spell is flushed at once, a steady flow every
        interval (QuestDB pays per transaction), a backlog in batches of WRITER_BATCH_ROWS."""
        rows = self._rows()
        if rows >= self.settings.writer_batch_rows:
            return True
        if not rows:
            return False
        interval = self.settings.writer_flush_interval_s
        now = time.monotonic()
        if not self._last_short:  # more is waiting: keep reading, up to the interval since the first row
            return self._first_row_at is not None and now - self._first_row_at >= interval
        return (self._flushing is None or self._flushing.done()) and now - self._last_flush_at >= interval

    def _per_stream_count(self) -> int:
        return max(200, self.settings.writer_batch_rows // 8)

    def _readable(self) -> list[str]:
        """The streams to read: all but those of held (suspended) tables."""
        if not self.held:
            return self.streams
        return [s for s in self.streams if table_of(s) not in self.held]

    async def _read(self, streams: list[str], starts: list[str], block_ms: int | None) -> dict[bytes, list[Any]]:
        assert self.client is not None
        return await self.member.read(self.client, streams, starts, self._per_stream_count(), block_ms)

    async def read_new(self) -> int:
        """Read what the streams hold: blocking only while nothing is held. Rows held after a short read wait
        for the flush in flight and for the interval since the last flush started; then the next read takes
        what accumulated meanwhile, and the batch goes."""
        if self._rows() >= self.settings.writer_batch_rows:
            return 0
        block: int | None = 500
        if self._rows():
            block = None
            if self._last_short:
                flushing = self._flushing
                if flushing is not None and not flushing.done():
                    await asyncio.wait([flushing])  # its outcome is taken by the next start_flush
                wait = self.settings.writer_flush_interval_s - (time.monotonic() - self._last_flush_at)
                if wait > 0 and await self.sleep_or_stop(wait):
                    return 0
        streams = self._readable()
        if not streams:  # every table suspended (or no stream yet): wait, without a busy loop
            await self.sleep_or_stop(0.5)
            return 0
        got = await self._read(streams, [">"] * len(streams), block)
        count = self._per_stream_count()
        self._last_short = all(len(entries) < count for entries in got.values())
        return self._add(got)

    async def recover_own(self, streams: list[str] | None = None) -> int:
        """Re-read our own pending entries (delivered before a crash or a failed flush), of `streams` or all."""
        assert self.client is not None
        streams = list(self._readable() if streams is None else streams)
        total = 0
        async for page in self.member.own_pending(self.client, streams, self._per_stream_count(), self.stopping):
            total += self._add(page)
            if self._rows() >= self.settings.writer_batch_rows:
                await self.flush_all()
        if total:
            log.info("re-read %d own pending entries", total)
        return total

    async def claim_idle(self) -> int:
        """Claim entries of writers that died (idle past CONSUMER_CLAIM_IDLE_MS)."""
        assert self.client is not None
        total = 0
        for stream in self._readable():
            claims = self.member.claim_idle(
                self.client, stream, self.settings.consumer_claim_idle_ms, self._per_stream_count(), max_rounds=100
            )
            async for page, _deleted in claims:
                entries = [e for e in page if e[1] is not None]
                if entries:
                    total += self._add({stream.encode(): entries})
                    if self._rows() >= self.settings.writer_batch_rows:
                        await self.flush_all()
        if total:
            log.info("claimed %d idle entries", total)
        return total

    def _add(self, got: dict[bytes, list[Any]]) -> int:
        """Turn stream entries into ILP rows in the per-table buffers."""
        n = 0
        trades = self.batches[keys.TRADES_TABLE]
        text = self._text
        texts = self._texts
        dead: list[tuple[bytes, bytes, str]] = []
        for stream, entries in got.items():
            for entry_id, fields in entries:
                if fields is None:
                    continue
                st = symbol_trade(fields)
                try:
                    if st is not None:  # the consumer's layout: no dict (the common case)
                        symbol, exchange, _, price, volume, side, timestamp, trade_id, recv = st
                        recv_ts = int(recv)
                        ilp_trade(
                            trades.buffer, texts.get(exchange) or text(exchange), texts.get(symbol) or text(symbol),
                            texts.get(side) or text(side), float(price), float(volume), int(trade_id), recv_ts,
                            int(timestamp),
                        )  # fmt: skip
                        batch = trades
                    else:
                        recv_ts, batch = self._add_by_name(dict(zip(fields[::2], fields[1::2], strict=False)))
                except (KeyError, ValueError, TypeError, IngressError, orjson.JSONDecodeError) as exc:
                    dead.append((stream, entry_id, f"{type(exc).__name__}: {exc}"[:300]))
                    continue
                batch.rows += 1
                batch.ids.setdefault(stream, []).append(entry_id)
                batch.recv.setdefault(stream, []).append(recv_ts)
                n += 1
        if dead:
            # Acked with the dead-letter append in one MULTI so a crash cannot lose or repeat them.
            self._pending_dead.extend(dead)
        if n and self._first_row_at is None:
            self._first_row_at = time.monotonic()
        self.metrics.buffered.set(self._rows())
        return n

    def _add_by_name(self, f: dict[bytes, bytes]) -> tuple[int, TableBatch]:
        """A per-symbol entry in another field order (or a depth diff) into its table's buffer: its `recv_ts`
        and batch. Raises what a malformed entry raises (KeyError, ValueError, ...): it is dead-lettered."""
        kind = f[b"type"]
        if kind == b"TRADE":
            recv_ts = int(f[b"recv_ts"])
            batch = self.batches[keys.TRADES_TABLE]
            ilp_trade(
                batch.buffer, exchange=f[b"exchange"].decode(), symbol=f[b"symbol"].decode(), side=f[b"side"].decode(),
                price=float(f[b"price"]), volume=float(f[b"volume"]), trade_id=int(f[b"trade_id"]), recv_ts=recv_ts,
                timestamp=int(f[b"timestamp"]),
            )  # fmt: skip
        elif kind == b"DEPTH":
            recv_ts = int(f.get(b"recv_ts") or f[b"timestamp"])
            batch = self.batches[keys.DEPTH_TABLE]
            ilp_depth(
                batch.buffer, exchange=f[b"exchange"].decode(), symbol=f[b"symbol"].decode(),
                first_update_id=int(f[b"first_update_id"]), last_update_id=int(f[b"last_update_id"]),
                bids=_levels(f[b"bids"]), asks=_levels(f[b"asks"]), recv_ts=recv_ts, timestamp=int(f[b"timestamp"]),
            )  # fmt: skip
        else:
            raise ValueError(f"unknown type {kind[:20]!r}")
        return recv_ts, batch

    def _text(self, raw: bytes) -> str:
        """Decode a symbol-like value once (few distinct values)."""
        value = self._texts.get(raw)
        if value is None:
            value = raw.decode()
            if len(self._texts) < 10_000:
                self._texts[raw] = value
        return value

    # ---------------------------------------------------------------- flushing

    def _swap(self) -> tuple[dict[str, TableBatch], list[tuple[bytes, bytes, str]]]:
        """Hand the current batches over for flushing and start new ones for reading."""
        frozen, dead = self.batches, self._pending_dead
        self.batches = {t: TableBatch(t, self._new_buffer()) for t in frozen}
        self._pending_dead = []
        self._first_row_at = None
        self._last_flush_at = time.monotonic()
        return frozen, dead

    def _new_buffer(self) -> Buffer:
        if self.sender is not None:
            return self.sender.new_buffer()
        return Buffer(protocol_version=2)  # the version ilp_conf() asks for

    async def start_flush(self) -> None:
        """Flush the current batches in the background while the next ones are read (one at a time)."""
        await self._await_flushing()
        frozen, dead = self._swap()
        self._flushing = asyncio.create_task(self._flush_batches(frozen, dead, retry=True))

    async def flush_all(self, *, retry: bool = True) -> None:
        """Flush everything held now and wait for it."""
        await self._await_flushing()
        frozen, dead = self._swap()
        await self._flush_batches(frozen, dead, retry=retry)

    async def _await_flushing(self) -> None:
        task, self._flushing = self._flushing, None
        if task is not None:
            await task

    async def _drop_flushing(self) -> None:
        """Wait for the background flush; if it failed, its entries stay pending (re-read later)."""
        try:
            await self._await_flushing()
        except Exception as exc:
            log.warning("background flush failed (%s); its entries stay pending", exc)

    async def _flush_batches(
        self, batches: dict[str, TableBatch], dead: list[tuple[bytes, bytes, str]], *, retry: bool
    ) -> None:
        """Flush each table (one transaction each), then ack its entries; retry with backoff until done."""
        backoff = Backoff(base=0.2, cap=5.0)
        rows_in_batch = sum(b.rows for b in batches.values())
        for batch in batches.values():
            while batch.rows:
                if batch.table in self.suspended_tables:
                    # Keep the Redis copies until the table applies again (rows taken into a suspended WAL
                    # are not visible, and are lost if the operator must resume past a bad transaction):
                    # the rows are set aside, their entries stay pending, and the other table goes on.
                    self.metrics.errors.labels("suspended").inc()
                    if batch.table not in self.held:
                        log.error("%s is suspended: %d rows set aside, its streams wait in Redis until it "
                                  "applies again", batch.table, batch.rows)  # fmt: skip
                    self.held.add(batch.table)
                    batch.clear()
                    break
                try:
                    await self._flush_table(batch)
                except IngressError as exc:
                    self.metrics.errors.labels("questdb_flush").inc()
                    log.warning("flush of %d rows to %s failed: %s", batch.rows, batch.table, exc)
                    if not retry or self.stopping.is_set():
                        raise
                    # The Sender may hold a broken connection: start a fresh one, keep the buffer.
                    await self._replace_sender()
                    if await self.sleep_or_stop(backoff.next()):
                        raise
                self.watchdog.beat("write")
        await self._flush_dead(dead)
        if rows_in_batch:
            self.metrics.batch_rows.observe(rows_in_batch)
        self.metrics.buffered.set(self._rows())

    async def _replace_sender(self) -> None:
        old, self.sender = self.sender, None
        if old is not None:
            try:
                old.close(flush=False)
            except Exception as exc:
                log.debug("closing sender: %s", exc)
        try:
            self.sender = await asyncio.to_thread(self._new_sender)
        except IngressError as exc:
            log.debug("new sender: %s", exc)

    async def _flush_table(self, batch: TableBatch) -> None:
        assert self.client is not None
        if self.sender is None:
            self.sender = await asyncio.to_thread(self._new_sender)
        sender: Any = self.sender
        started = time.perf_counter()
        await asyncio.to_thread(sender.flush, batch.buffer, clear=False, transactional=True)
        self.metrics.latency.labels(batch.table).observe(time.perf_counter() - started)
        confirmed_us = now_us()
        for stream, recv in batch.recv.items():
            child = self._latency_of(stream)
            if child is not None:
                child.observe_since(confirmed_us, recv)
        # QuestDB confirmed the transaction: now ack. If we die here, the re-send is deduplicated.
        cmds: list[Command] = [["XACK", stream, self.group, *ids] for stream, ids in batch.ids.items()]
        await execute_packed(self.client, cmds)
        self.metrics.rows.labels(batch.table).inc(batch.rows)
        self.metrics.last_flush.set(time.time())
        self.written += batch.rows
        batch.clear()

    def _latency_of(self, stream: bytes) -> HopCounts | None:
        """The hop-latency counts of a per-symbol stream: configured symbols only (discovered keys are not)."""
        try:
            return self._latency[stream]
        except KeyError:
            symbol = stream.rsplit(b":", 1)[-1].decode(errors="replace")
            child = self.metrics.questdb_latency.child(symbol) if symbol in self._symbols else None
            if len(self._latency) < 10_000:
                self._latency[stream] = child
            return child

    async def _flush_dead(self, dead: list[tuple[bytes, bytes, str]]) -> None:
        assert self.client is not None
        if not dead:
            return
        cmds: list[Command] = [["MULTI"]]
        for stream, entry_id, reason in dead:
            cmds.append(["XADD", keys.WRITER_DEAD_LETTER, "*", *writer_dead_letter(stream, entry_id, reason)])
            cmds.append(["XACK", stream, self.group, entry_id])
        cmds.append(["EXEC"])
        await execute_packed(self.client, cmds)
        self.metrics.dead_letters.inc(len(dead))
        log.error("%d entries could not become rows; see %s", len(dead), keys.WRITER_DEAD_LETTER)

    # ---------------------------------------------------------------- monitoring

    async def _monitor_loop(self) -> None:
        last_trim = 0.0
        while not await self.sleep_or_stop(self.monitor_interval_s):
            try:
                await self.update_metrics()
                if time.monotonic() - last_trim > 5.0:
                    await self.trim()
                    last_trim = time.monotonic()
            except MONITOR_ERRORS as exc:
                log.debug("monitor: %s", exc)

    async def update_metrics(self) -> None:
        """Backlog from XINFO GROUPS (lag + pending), suspended WAL tables, heartbeat."""
        assert self.client is not None
        streams = list(self.streams)
        cmds: list[Command] = [["XINFO", "GROUPS", s] for s in streams]
        cmds.append(["SET", keys.heartbeat_key("writer", self.consumer), str(time.time()), "EX", 15])
        replies = await execute_packed(self.client, cmds)
        backlog = 0
        for reply in replies[:-1]:
            if isinstance(reply, BaseException):
                continue
            for g in reply:
                info = parse_info_pairs(g)
                if info[b"name"].decode() == self.group:
                    backlog += int(info.get(b"lag") or 0) + int(info[b"pending"])
        self.metrics.backlog.set(backlog)
        try:
            # Bounded: a stalled QuestDB must not hold the monitor loop (and so the heartbeat) past the TTL.
            suspended = await asyncio.wait_for(self.qdb.suspended_tables(), timeout=5.0)
        except (QuestDBError, OSError, TimeoutError) as exc:
            log.debug("suspended check: %s", exc)
            return
        self.metrics.suspended.set(len(suspended))
        if suspended:
            log.error("QuestDB WAL tables suspended (nothing becomes visible; their rows wait in Redis): %s",
                      ", ".join(suspended))  # fmt: skip
        elif self.suspended_tables:
            log.info("QuestDB WAL tables apply again: writing resumes")
        self.suspended_tables = set(suspended)

    async def trim(self) -> None:
        """Trim each per-symbol stream below what the writer's group still needs (other groups do not hold it back;
        WARM is the zset, not the stream)."""
        assert self.client is not None
        cmds: list[Command] = []
        for stream in list(self.streams):
            floor = await group_floor(self.client, stream, self.group)
            if floor is not None and floor > (0, 0):
                cmds.append(["XTRIM", stream, "MINID", "~", f"{floor[0]}-{floor[1]}"])
        if cmds:
            await execute_packed(self.client, cmds)


def table_of(stream: str) -> str:
    """The QuestDB table a per-symbol stream goes to (`market:<exchange>:depth:<SYMBOL>` or trades)."""
    return keys.DEPTH_TABLE if keys.symbol_stream_kind(stream) == "depth" else keys.TRADES_TABLE


def _levels(raw: bytes) -> Any:
    levels = orjson.loads(raw)
    if not levels:
        return _EMPTY_LEVELS
    return np.array(levels, dtype=np.float64)


def run_command(args: argparse.Namespace) -> None:
    """`tickbridge writer` (no options: configuration comes from the environment)."""
    settings = load_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings.metrics_port_for("writer"), settings.metrics_bind)
    tune_gc()
    run_service(lambda: BrainWriter(settings))
