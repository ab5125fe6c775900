"""Flushing to QuestDB: the ILP sender, one transaction per table, then the writer group moved past the batch
(XGROUP SETID per stream, never before QuestDB confirmed) with the batch's dead letters in one MULTI; rows of
a suspended table set aside (their streams' group stays where it is).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from questdb.ingress import Buffer, IngressError, Sender

from tickbridge.brain.writer_base import TableBatch
from tickbridge.brain.writer_rows import WriterRows
from tickbridge.core import keys
from tickbridge.core.backoff import Backoff
from tickbridge.core.groups import Cursor
from tickbridge.core.metrics import HopCounts
from tickbridge.core.questdb_io import ilp_conf
from tickbridge.core.redis_io import Command, execute_packed
from tickbridge.core.wire import BOOK_DDL, DEPTH_DDL, TRADES_DDL, now_us, writer_dead_letter

log = logging.getLogger("tickbridge.brain.writer")

#: Per stream, where its group goes once a batch is in QuestDB.
Confirm = dict[bytes, Cursor]


class WriterFlushing(WriterRows):
    """Flushes the batches to QuestDB (in the background while the next ones are read) and acks them."""

    def _new_sender(self) -> Sender:
        conf = ilp_conf(self.settings.brain_questdb_url, self.settings, retry_timeout_ms=self.retry_timeout_ms)
        sender = Sender.from_conf(conf)
        sender.establish()
        return sender

    async def _setup_questdb(self) -> None:
        await self.qdb.exec(TRADES_DDL)
        await self.qdb.exec(DEPTH_DDL)
        await self.qdb.exec(BOOK_DDL)
        # Known before the first flush: a writer (re)started while a table is suspended must not hand it rows.
        self.suspended_tables = set(await self.qdb.suspended_tables())
        if self.suspended_tables:
            log.error("QuestDB WAL tables suspended at start: %s", ", ".join(sorted(self.suspended_tables)))
        if self.sender is None:
            self.sender = await asyncio.to_thread(self._new_sender)
        sender: Any = self.sender
        if not self.batches:
            for table in (keys.TRADES_TABLE, keys.DEPTH_TABLE, keys.BOOK_TABLE):
                self.batches[table] = TableBatch(table, sender.new_buffer())

    def _swap(self) -> tuple[dict[str, TableBatch], list[tuple[bytes, bytes, str]], Confirm]:
        """Hand the current batches over for flushing (with where each stream's group goes once they are in
        QuestDB) and start new ones for reading."""
        frozen, dead = self.batches, self._pending_dead
        confirm = {s: Cursor(c.position, c.entries_read) for s in self._advanced if (c := self.cursors.get(s))}
        self._advanced = set()
        self.batches = {t: TableBatch(t, self._new_buffer()) for t in frozen}
        self._pending_dead = []
        self._first_row_at = None
        now = time.monotonic()
        if self._last_flush_at:
            rate = sum(b.rows for b in frozen.values()) / max(now - self._last_flush_at, 1e-3)
            self.flow_rows_per_s = (self.flow_rows_per_s + rate) / 2  # a little smoothing: one odd batch is not a trend
        self._last_flush_at = now
        return frozen, dead, confirm

    def _new_buffer(self) -> Buffer:
        if self.sender is not None:
            return self.sender.new_buffer()
        return Buffer(protocol_version=2)  # the version ilp_conf() asks for

    async def start_flush(self) -> None:
        """Flush the current batches in the background while the next ones are read (one at a time)."""
        await self._await_flushing()
        frozen, dead, confirm = self._swap()
        self._flushing = asyncio.create_task(self._flush_batches(frozen, dead, confirm, retry=True))

    async def flush_all(self, *, retry: bool = True) -> None:
        """Flush everything held now and wait for it."""
        await self._await_flushing()
        frozen, dead, confirm = self._swap()
        await self._flush_batches(frozen, dead, confirm, retry=retry)

    async def _await_flushing(self) -> None:
        task, self._flushing = self._flushing, None
        if task is not None:
            await task

    async def _drop_flushing(self) -> None:
        """Wait for the background flush; if it failed, its entries are read again from the group's position."""
        try:
            await self._await_flushing()
        except Exception as exc:
            log.warning("background flush failed (%s); its entries are read again", exc)

    async def _flush_batches(
        self, batches: dict[str, TableBatch], dead: list[tuple[bytes, bytes, str]], confirm: Confirm, *, retry: bool
    ) -> None:
        """Flush each table (one transaction each, retried with backoff until done), then move the group past
        the batch on every stream none of whose rows were set aside."""
        backoff = Backoff(base=0.2, cap=5.0)
        rows_in_batch = sum(b.rows for b in batches.values())
        for batch in batches.values():
            while batch.rows:
                if batch.table in self.suspended_tables:
                    # Keep the Redis copies until the table applies again (rows taken into a suspended WAL
                    # are not visible, and are lost if the operator must resume past a bad transaction):
                    # the rows are set aside, their streams' group stays put, and the other table goes on.
                    self.metrics.errors.labels("suspended").inc()
                    if batch.table not in self.held:
                        log.error("%s is suspended: %d rows set aside, its streams wait in Redis until it "
                                  "applies again", batch.table, batch.rows)  # fmt: skip
                    self.held.add(batch.table)
                    for stream in batch.recv:
                        self._frozen.setdefault(stream, set()).add(batch.table)
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
        await self._confirm({s: c for s, c in confirm.items() if s not in self._frozen}, dead)
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

    async def _confirm(self, confirm: Confirm, dead: list[tuple[bytes, bytes, str]]) -> None:
        """QuestDB confirmed the batch: append its dead letters and move the group past it, in one MULTI. If we
        die before, the batch is read again and its rows re-sent (DEDUP absorbs them); nothing is moved past
        unconfirmed rows."""
        assert self.client is not None
        if not confirm and not dead:
            return
        cmds: list[Command] = [["MULTI"]]
        for stream, entry_id, reason in dead:
            cmds.append(["XADD", keys.WRITER_DEAD_LETTER, "*", *writer_dead_letter(stream, entry_id, reason)])
        cmds += [cursor.setid(stream, self.group) for stream, cursor in confirm.items()]
        cmds.append(["EXEC"])
        replies = await execute_packed(self.client, cmds)
        done = replies[-1]
        errors = [r for r in (done if isinstance(done, list) else [done]) if isinstance(r, BaseException)]
        if errors:  # e.g. NOGROUP: the key was deleted meanwhile; the loop sets the groups up again
            raise errors[0]
        if dead:
            self.metrics.dead_letters.inc(len(dead))
            log.error("%d entries could not become rows; see %s", len(dead), keys.WRITER_DEAD_LETTER)
