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
from typing import Any

from redis.exceptions import ResponseError

from tickbridge.brain.writer_base import MONITOR_ERRORS, OUTAGE_ERRORS, TableBatch, WriterMetrics
from tickbridge.brain.writer_monitor import WriterMonitor
from tickbridge.brain.writer_rows import table_of
from tickbridge.core.backoff import Backoff
from tickbridge.core.lifecycle import run_service, setup_logging, tune_gc
from tickbridge.core.metrics import serve_metrics
from tickbridge.core.questdb_io import QuestDBError
from tickbridge.core.redis_io import make_client
from tickbridge.core.settings import load_settings

log = logging.getLogger(__name__)

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


def run_command(args: argparse.Namespace) -> None:
    """`tickbridge writer` (no options: configuration comes from the environment)."""
    settings = load_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings.metrics_port_for("writer"), settings.metrics_bind)
    tune_gc()
    run_service(lambda: BrainWriter(settings))
