"""RAM and disk budgets: spilling the oldest undelivered entries to the QuestDB buffer, and dropping the
oldest buffer partitions when DISK_BUFFER_BYTES is reached (counted as dropped)."""

from __future__ import annotations

import logging
import math
import time

from tickbridge.core.redis_io import Command
from tickbridge.core.wire import RawEntry, StreamId, format_stream_id, parse_stream_id
from tickbridge.forwarder.base import LinkDown, VpsFull
from tickbridge.forwarder.buffer import Partition
from tickbridge.forwarder.ledger import LedgerEntry, segments
from tickbridge.forwarder.recovery import Recovery

log = logging.getLogger("tickbridge.forwarder.service")

#: How far the VPS stream may exceed RAM_BUFFER_BYTES while the Brain is up and a replay runs (10 % of the
#: 3 GB default holds ~37 minutes of live flow at 1,200 ticks/s).
REPLAY_HEADROOM = 0.10
#: The disk budget is held in segments of at most 1/BUFFER_SEGMENTS of it (one partition each at most).
BUFFER_SEGMENTS = 4
#: Bytes per buffer row before any is measured (254 measured: VARCHAR payload, page slack).
DEFAULT_ROW_BYTES = 300
#: What a partition may take above its rows: column files grow by whole pages
#: (`cairo.writer.data.append.page.size`, 1 MiB on the VPS, over 7 files; an almost empty partition is ~7 MiB).
PARTITION_SLACK_BYTES = 8 * 2**20


class Spilling(Recovery):
    """Keeps the VPS stream under RAM_BUFFER_BYTES and the buffer under DISK_BUFFER_BYTES."""

    async def _enforce_ram_budget(self) -> None:
        usage = await self._vps("MEMORY", "USAGE", self.key, "SAMPLES", 5)
        if usage is None:
            return
        usage = int(usage)
        self.metrics.redis_bytes.set(usage)
        budget = int(self.settings.ram_buffer_bytes)
        if self.brain_up and (self.buffer_pending or self.catching_up):
            # Replaying (issue 16): the live ticks arriving meanwhile would be spilled only to be read back from
            # the buffer moments later (the issue saw 25k spilled during one replay). A little headroom first.
            budget = int(budget * (1 + REPLAY_HEADROOM))
        if usage <= budget:
            if (
                self._marker_saved
                and not self.spill_pending
                and await self._note_state(
                    buffer_high_id=format_stream_id(self.buffer_high), buffer_ts=self.buffer.last_ts
                )
            ):
                # No spill is in flight, so our buffer_high is exact: once saved, the marker kept while Redis
                # was full is not needed any more.
                await self._clear_marker()
            return
        if self.checkpoint > self.trimmed_to:
            # The RAM budget wins over the rewind window: drop the delivered copies first.
            await self._trim(self.checkpoint)
            usage = int(await self._vps("MEMORY", "USAGE", self.key, "SAMPLES", 5) or 0)
            if usage <= budget:
                return
        if not self.buffer_known and not await self._try_recover_buffer():
            return  # QuestDB unavailable: the backlog stays in Redis over budget (alerted: RedisOverRamBudget)
        length = int(await self._vps("XLEN", self.key))
        if length == 0:
            return
        per_entry = usage / length
        excess = math.ceil((usage - 0.8 * budget) / per_entry)
        try:
            # Bounded per step so the loop keeps beating the watchdog and answering a stop.
            await self._spill(min(max(excess, 1), 4 * self.spill_batch))
        except LinkDown as exc:
            if exc.target != "questdb":
                raise
            await self._link_down(exc)
        except VpsFull as exc:
            self._vps_full(exc)  # a refused write stopped the spill: the marker stays set (QuestDB holds the truth)

    async def _spill(self, count: int) -> None:
        """Move the oldest `count` undelivered Redis entries to the buffer, commit-visible before trimming."""
        start = max(self.checkpoint, self.buffer_high)
        while count > 0 and not self.stopping.is_set():
            room = await self._make_room(min(self.spill_batch, count))
            entries: list[RawEntry] = await self._vps(
                "XRANGE", self.key, "(" + format_stream_id(start), "+", "COUNT", room
            )
            if not entries:
                return
            last = parse_stream_id(entries[-1][0])
            if not self._marker_saved:
                await self._set_marker()
            self.spill_pending = True
            previous_ts = self.buffer.last_ts
            last_ts, placed = await self._questdb(self.buffer.append_rows(entries))
            if not self.buffer_pending:
                self.buffer_pending = True
                self.replay_ts = previous_ts
            self.buffer_high = last
            written = self.ledger.add(segments(placed))
            try:
                await self._record_spill(written, last, last_ts)
            except VpsFull:
                # Trimming the spilled entries first is safe while the marker is saved: a restart takes the
                # high from QuestDB (and rebuilds the ledger's tail from it). It frees the memory the write needs.
                await self._trim()
                await self._record_spill(written, last, last_ts)
            self.spill_pending = False
            held, oldest = self._buffer_backlog
            self._buffer_backlog = (held + len(entries), oldest or parse_stream_id(entries[0][0]))
            await self._clear_marker()
            await self._trim()
            self.metrics.spilled.inc(len(entries))
            count -= len(entries)
            start = last
            log.info("spilled %d entries up to %s to the QuestDB buffer", len(entries), format_stream_id(last))
            if not self.brain_up and time.monotonic() >= self._next_brain_try:
                return  # the Brain may be back: the loop tries it before the next transaction (issue 16)

    async def _record_spill(self, written: list[LedgerEntry], last: StreamId, last_ts: int) -> None:
        """The ledger entries of a visible spill, then `buffer_high` (one round trip)."""
        cmds: list[Command] = [("HSET", self.ledger_key, e.field, e.value) for e in written]
        cmds.append(("HSET", self.state_key, "buffer_high_id", format_stream_id(last), "buffer_ts", last_ts))
        await self._vps_cmds(cmds)

    async def _make_room(self, wanted: int) -> int:
        """Before a spill transaction: how many entries it may take, with room made for them first, so the
        disk use QuestDB reports stays under DISK_BUFFER_BYTES at any rate. The buffer is cut into segments of
        at most a quarter of the budget: past that the head partition is closed (the next rows start the next
        hour of `ts`, see `SpillBuffer.rotate`), so the oldest can always be dropped whole, even within one
        hour of ticks. Estimates come from the measured bytes per row, plus a partition's page slack."""
        budget = self.settings.disk_buffer_bytes
        segment = budget // BUFFER_SEGMENTS
        parts = [p for p in await self._questdb(self.buffer.partitions()) if p.rows or p.disk_bytes]
        big = [p for p in parts if p.rows >= 10_000]
        per_row = max(64, sum(p.disk_bytes for p in big) // sum(p.rows for p in big)) if big else DEFAULT_ROW_BYTES
        count = max(1, min(wanted, max(0, segment - PARTITION_SLACK_BYTES) // 2 // per_row))
        incoming = count * per_row + PARTITION_SLACK_BYTES
        floor = min((p.disk_bytes for p in parts), default=PARTITION_SLACK_BYTES)  # an almost empty partition
        if parts and parts[-1].disk_bytes + incoming > segment:
            self.buffer.rotate = True
        if self.buffer.rotate or not parts:
            incoming = max(incoming, floor)
        total = sum(p.disk_bytes for p in parts)
        while parts and total + incoming > budget:
            oldest = parts.pop(0)
            if not parts:
                self.buffer.rotate = True  # the head goes too: the next rows start a fresh partition
            await self._drop_for_budget(oldest, total, budget)
            total -= oldest.disk_bytes
        return count

    async def _drop_for_budget(self, oldest: Partition, total: int, budget: int) -> None:
        """Drop the oldest partition to keep DISK_BUFFER_BYTES; its undelivered rows are counted as dropped."""
        lost = 0
        if self.buffer_pending and oldest.max_ts > self.replay_ts:
            lost = await self._questdb(self.buffer.count_between(max(self.replay_ts, oldest.min_ts - 1), oldest.max_ts))
        await self._questdb(self.buffer.drop_partition(oldest))
        gone = self.ledger.drop_range(oldest.min_ts, oldest.max_ts)  # counted as dropped, never as missing
        if gone:
            await self._note_ledger_removed(gone)
        if lost:
            self.dropped_total += lost
            self.metrics.dropped.inc(lost)
            self.replay_ts = max(self.replay_ts, oldest.max_ts)
            self._buffer_backlog = (max(0, self._buffer_backlog[0] - lost), None)
            log.error("DISK BUFFER FULL (%d bytes + the next spill > %d): dropped %d undelivered ticks, partition %s",
                      total, budget, lost, oldest.name)  # fmt: skip
            await self._note_state(dropped_total=self.dropped_total, replay_ts=self.replay_ts)

    async def _clean_buffer(self) -> None:
        """Drop delivered hourly partitions; over the disk budget drop the oldest, counting lost ticks."""
        _, cursor = self._retention_floor()
        if cursor > 0:
            await self._questdb(self.buffer.drop_delivered(cursor))
        parts = await self._questdb(self.buffer.partitions())
        total = sum(p.disk_bytes for p in parts)
        budget = self.settings.disk_buffer_bytes
        while total > budget and len(parts) > 1:
            oldest = parts.pop(0)
            await self._drop_for_budget(oldest, total, budget)
            total -= oldest.disk_bytes
