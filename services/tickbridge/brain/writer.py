"""`tickbridge writer`: the Brain's per-symbol streams -> QuestDB `trades` and `depth_updates`.

Consumer group `tickbridge-writer` on every per-symbol stream (the configured symbols plus any found by SCAN),
used as a durable cursor: the writer reads with XREAD from the group's last-delivered ID and moves the group
(XGROUP SETID) past a batch once QuestDB confirmed it, so Redis keeps no pending list, no XACK, nothing to
claim (half the Redis time of XREADGROUP + XACK). A read that comes back short (the streams are drained)
flushes what is held, unless a flush is in flight or started less than the flush interval ago: a trade after a
quiet spell goes at once, a steady flow once per interval, a backlog in batches of at most WRITER_BATCH_ROWS
rows. The interval follows the flow (`flush_interval`): QuestDB pays ~15 core-ms per transaction whatever
its size, so at 10,000 rows/s and more it is WRITER_FLUSH_INTERVAL_S (0.5 s: few, big transactions), and
below it shrinks with the flow down to WRITER_FLUSH_MIN_INTERVAL_S (0.1 s: a trade visible ~0.1 s after it
arrived at 1,200/s, where the CPU is there); each table is one ILP-over-HTTP request (`transactional=True`: one
request = one transaction), and the group moves only after QuestDB confirmed every table of the batch. A crash before
the group moved re-reads and re-sends the rows, which the tables' `DEDUP UPSERT KEYS` absorb. When QuestDB is
down or slow the batch is kept, reading pauses and the flush is retried with backoff: the group never moves
past unflushed rows. A suspended WAL table gets nothing: its rows are set aside (their streams' group stays
put) and its streams are not read until it applies again, while the other table keeps flowing. A second writer
would read and write everything again (DEDUP absorbs it): run one.

WARM lives in the consumer's sorted sets only, so the writer trims each per-symbol stream below what
its group still needs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

from redis.exceptions import ResponseError

from tickbridge.brain.writer_base import MONITOR_ERRORS, OUTAGE_ERRORS, TableBatch, WriterMetrics
from tickbridge.brain.writer_monitor import WriterMonitor
from tickbridge.brain.writer_rows import table_of
from tickbridge.core.backoff import Backoff
from tickbridge.core.groups import read_after
from tickbridge.core.lifecycle import run_service, setup_logging, tune_gc
from tickbridge.core.metrics import serve_metrics
from tickbridge.core.questdb_io import QuestDBError
from tickbridge.core.redis_io import make_client
from tickbridge.core.settings import load_settings

log = logging.getLogger(__name__)

#: Flow (rows/s) from which the writer waits the whole WRITER_FLUSH_INTERVAL_S between two flushes.
FULL_INTERVAL_ROWS_PER_S = 10_000.0

__all__ = [
    "MONITOR_ERRORS",
    "OUTAGE_ERRORS",
    "BrainWriter",
    "TableBatch",
    "WriterMetrics",
    "run_command",
    "table_of",
]


class BrainWriter(WriterMonitor):
    """Writes the per-symbol streams to QuestDB, exactly once with DEDUP."""

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
                if self.held - self.suspended_tables:
                    await self._resume_held()
                if self._need_recover:
                    await self.recover_own()
                    self._need_recover = False
                await self.read_new()
                if self._due():
                    await self.start_flush()
                backoff.reset()
            except OUTAGE_ERRORS as exc:
                # Redis or QuestDB unavailable: the group never moved past unflushed rows; drop them, back
                # off and read again from the group's position (a re-sent row is absorbed by DEDUP).
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
        """Forget unflushed rows (their entries are after the group's position: read again from there)."""
        for batch in self.batches.values():
            batch.clear()
        self._pending_dead = []
        self._advanced = set()
        self._first_row_at = None
        self._need_recover = True

    async def _final_flush(self) -> None:
        try:
            await self._await_flushing()
            if any(b.rows for b in self.batches.values()):
                await self.flush_all(retry=False)
        except Exception as exc:  # stopping: the next writer re-sends what the group was not moved past
            log.warning("final flush failed (%s); its entries are read again at the next start", exc)

    # ---------------------------------------------------------------- reading
    async def _resume_held(self) -> None:
        """Tables that apply again: read their streams again from their group's position (so does everything
        held in memory now: a re-sent row is absorbed by DEDUP, and no stream is moved past a row set aside)."""
        await self._drop_flushing()  # a flush in flight may still set rows of these tables aside
        resumed = self.held - self.suspended_tables
        if not resumed:
            return
        self.held -= resumed
        self._frozen = {s: left for s, tables in self._frozen.items() if (left := tables - resumed)}
        log.info("%s applies again: its streams are read again from the group's position", ", ".join(sorted(resumed)))
        self._reset_batches()

    def _due(self) -> bool:
        """Flush when the batch is full, or when the last read came back short (the streams are drained), no
        flush is in flight and the last one started WRITER_FLUSH_INTERVAL_S ago or more. Rows that arrive
        meanwhile make the next batch: a trade after a quiet spell is flushed at once, a steady flow every
        interval (QuestDB pays per transaction), a backlog in batches of WRITER_BATCH_ROWS."""
        rows = self._rows()
        if rows >= self.settings.writer_batch_rows:
            return True
        if not rows and not self._pending_dead:  # dead letters alone go too: the group moves past them
            return False
        interval = self.flush_interval()
        now = time.monotonic()
        if not self._last_short:  # more is waiting: keep reading, up to the interval since the first row
            return self._first_row_at is not None and now - self._first_row_at >= interval
        return (self._flushing is None or self._flushing.done()) and now - self._last_flush_at >= interval

    def flush_interval(self) -> float:
        """The least time between two flushes for the flow of the last batches: WRITER_FLUSH_INTERVAL_S at
        FULL_INTERVAL_ROWS_PER_S and more, shorter in proportion below, never under WRITER_FLUSH_MIN_INTERVAL_S
        (unless that is the longer of the two). Each transaction costs QuestDB about the same whatever its size
        (`python -m tickbridge_dev.bench.writer_cadence`): a light flow buys freshness with CPU the machine has to
        spare, a heavy flow keeps the transactions few."""
        longest = self.settings.writer_flush_interval_s
        scaled = longest * self.flow_rows_per_s / FULL_INTERVAL_ROWS_PER_S
        return min(longest, max(self.settings.writer_flush_min_interval_s, scaled))

    def _per_stream_count(self) -> int:
        return max(200, self.settings.writer_batch_rows // 8)

    def _readable(self) -> list[str]:
        """The streams to read: all but those of held (suspended) tables, and those with rows set aside."""
        if not self.held and not self._frozen:
            return self.streams
        return [s for s in self.streams if table_of(s) not in self.held and s.encode() not in self._frozen]

    async def _read(self, streams: list[str], block_ms: int | None) -> dict[bytes, list[Any]]:
        assert self.client is not None
        missing = [s for s in streams if s.encode() not in self.cursors]
        if missing:  # discovered since, or back after being skipped
            await self.load_cursors(missing)
        starts = [self.cursors[s.encode()].position for s in streams]
        return await read_after(self.client, streams, starts, self._per_stream_count(), block_ms)

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
                wait = self.flush_interval() - (time.monotonic() - self._last_flush_at)
                if wait > 0 and await self.sleep_or_stop(wait):
                    return 0
        streams = self._readable()
        if not streams:  # every table suspended (or no stream yet): wait, without a busy loop
            await self.sleep_or_stop(0.5)
            return 0
        got = await self._read(streams, block)
        now = time.monotonic()
        if now - self._last_count_read > 5.0:
            # Settled: every position is its group's (nothing read since the last batch, which QuestDB confirmed).
            flushing = self._flushing
            confirmed = flushing is None or (flushing.done() and not flushing.cancelled() and not flushing.exception())
            settled = not got and not self._rows() and not self._advanced and confirmed
            if settled or any(c.entries_read is None for c in self.cursors.values()):
                self._last_count_read = now  # idle, or after an upgrade: one round trip
                await self.count_read((s.encode() for s in streams if not got.get(s.encode())), settled=settled)
        count = self._per_stream_count()
        self._last_short = all(len(entries) < count for entries in got.values())
        return self._add(got)

    async def recover_own(self) -> None:
        """Read every stream again from its group's position (at start, and after an outage or a failed batch)."""
        self.cursors = {}
        await self.load_cursors(self.streams)


def run_command(args: argparse.Namespace) -> None:
    """`tickbridge writer` (no options: configuration comes from the environment)."""
    settings = load_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings.metrics_port_for("writer"), settings.metrics_bind)
    tune_gc()
    run_service(lambda: BrainWriter(settings))
