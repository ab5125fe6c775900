"""What the QuestDB buffer owes (issue 14): the spill ledger checked on replay, and the quarantine of rows
the replay cannot use."""

from __future__ import annotations

import logging
import time

import orjson

from tickbridge.core.redis_io import Command
from tickbridge.core.wire import StreamId, format_stream_id, parse_stream_id
from tickbridge.forwarder.base import ZERO, ForwarderBase
from tickbridge.forwarder.buffer import BufferRow
from tickbridge.forwarder.ledger import LedgerEntry

log = logging.getLogger("tickbridge.forwarder.service")

#: Quarantined buffer rows kept (capped copies) in `keys.FORWARDER_QUARANTINE`; the oldest IDs go first.
QUARANTINE_MAX = 256
QUARANTINE_PAYLOAD_BYTES = 2048


def _id_order(field: str) -> tuple[int, int]:
    """Quarantine fields are entry IDs (or `ts:<n>` when the ID was unreadable): oldest first."""
    try:
        return parse_stream_id(field)
    except ValueError:
        return (0, 0)


class BufferAudit(ForwarderBase):
    """Ledger of the spills and quarantine of unusable buffer rows."""

    async def _load_ledger(self) -> None:
        raw = await self._vps("HGETALL", self.ledger_key)
        self.ledger.load(raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2], strict=True)))
        held = await self._vps("HGETALL", self.quarantine_key)
        fields = list(held) if isinstance(held, dict) else list(held[::2])
        self._quarantined = sorted((f.decode() if isinstance(f, bytes) else f for f in fields), key=_id_order)

    async def _rebuild_ledger(self, high: StreamId | None, cursor: int | None) -> None:
        """Rows QuestDB holds above the ledger's top (a stop between a spill's commit and its ledger write, a
        VPS Redis that lost the ledger, a buffer older than the ledger): taken as spilled, one entry per
        partition, from what QuestDB holds. Logged: they cannot be checked against what was written."""
        top = self.ledger.top
        floor = max(top.last if top is not None else ZERO, self.checkpoint)
        if high is None or high <= floor:
            return
        after = top.last_ts if top is not None and top.last >= self.checkpoint else (cursor or 1) - 1
        rebuilt: list[LedgerEntry] = []
        for part in await self._questdb(self.buffer.partitions()):
            if part.max_ts <= after or not part.rows:
                continue
            count, first, last = await self._questdb(self.buffer.span(max(after, part.min_ts - 1), part.max_ts))
            if count and first is not None and last is not None:
                rebuilt.append(LedgerEntry(first[0], last[0], count, first[1], last[1]))
        if not rebuilt:
            return
        first, last = format_stream_id(rebuilt[0].first), format_stream_id(rebuilt[-1].last)
        log.warning("spill ledger lacks %d buffer rows (%s..%s): taken as spilled from what QuestDB holds",
                    sum(e.count for e in rebuilt), first, last)  # fmt: skip
        written = self.ledger.add(rebuilt)
        await self._note_vps([("HSET", self.ledger_key, e.field, e.value) for e in written])

    async def _catch_up_ledger(self, upto_ts: int) -> None:
        """The replay starts past rows it did not read in this run (delivered before a restart, or up to a
        Brain top it adopted): count those rows in QuestDB instead."""
        gap = self.ledger.gap(upto_ts)
        for entry, lo, hi in gap:
            count, first, last = await self._questdb(self.buffer.span(lo, hi))
            entry.got += count
            if first is not None and last is not None:
                entry.first_got = entry.first_got or first[0]
                entry.last_got = last[0]
        closed = self.ledger.close_upto(upto_ts)
        await self._report_closed(closed)

    async def _settle_ledger(self) -> None:
        """The replay is complete: every entry still open is short of what it did not get back."""
        await self._catch_up_ledger(self.replay_ts)
        await self._report_closed(self.ledger.close_all())

    async def _report_closed(self, closed: list[LedgerEntry]) -> None:
        """Entries the replay is past: a shortfall is counted, logged with its range, kept in the state hash."""
        if not closed:
            return
        cmds: list[Command] = []
        for e in closed:
            if e.shortfall:
                self.missing_total += e.shortfall
                self.metrics.buffer_missing.inc(e.shortfall)
                where = e.missing_range()
                log.error("BUFFER ROWS MISSING: %d of %d entries spilled to %s as %s..%s did not come back "
                          "(lost from the buffer); missing IDs %s", e.shortfall, e.count, self.buffer.table,
                          format_stream_id(e.first), format_stream_id(e.last), where)  # fmt: skip
                cmds.append(("HSET", self.state_key, "missing_total", self.missing_total,
                             "missing_last_range", where))  # fmt: skip
            cmds.append(("HSET", self.ledger_key, e.field, e.value))
        await self._note_vps(cmds)
        await self._release_ledger()

    async def _release_ledger(self) -> None:
        gone = self.ledger.release(self.checkpoint)
        if gone:
            await self._note_ledger_removed(gone)

    async def _note_ledger_removed(self, gone: list[LedgerEntry]) -> None:
        await self._note_vps([("HDEL", self.ledger_key, *(e.field for e in gone))])

    async def _check_rows(self, rows: list[BufferRow]) -> list[BufferRow]:
        """Account every row read back against the ledger; quarantine what cannot be replayed (an unreadable
        ID or payload, a row no spill of ours wrote); keep the rows above the checkpoint, in ID order."""
        if self.replay_ts > self.ledger.noted_ts:
            await self._catch_up_ledger(self.replay_ts)
        sendable: list[BufferRow] = []
        closed: list[LedgerEntry] = []
        prev = self.checkpoint
        for row in rows:
            if row.entry_id is None:
                await self._quarantine(row, "unreadable ID")
                continue
            verdict, ended = self.ledger.note(row.ts, row.entry_id)
            closed += ended
            if verdict == "foreign" and row.entry_id > self.checkpoint:
                await self._quarantine(row, "not a row the forwarder spilled (ID outside every spill of the ledger)")
            elif row.error:
                await self._quarantine(row, "unreadable payload (not a field/value list)")
            elif verdict != "foreign" and row.entry_id > prev:
                sendable.append(row)
                prev = row.entry_id
        await self._report_closed(closed)
        return sendable

    async def _quarantine(self, row: BufferRow, reason: str) -> None:
        """A buffer row the replay cannot use: counted, logged with its ID, a capped copy kept (bounded hash)."""
        if row.ts <= self._quarantined_ts:
            return  # a re-read of a row already quarantined
        self._quarantined_ts = row.ts
        self.metrics.buffer_quarantined.inc()
        name = format_stream_id(row.entry_id) if row.entry_id is not None else f"ts:{row.ts}"
        log.error("BUFFER ROW QUARANTINED: %s (ts %d) in %s: %s; not sent, the replay goes on", name, row.ts,
                  self.buffer.table, reason)  # fmt: skip
        copy = orjson.dumps({"reason": reason, "ts": row.ts, "table": self.buffer.table,
                             "payload": row.raw[:QUARANTINE_PAYLOAD_BYTES], "at": time.time()})  # fmt: skip
        cmds: list[Command] = [("HSET", self.quarantine_key, name, copy)]
        if name not in self._quarantined:
            self._quarantined.append(name)
            self._quarantined.sort(key=_id_order)
        while len(self._quarantined) > QUARANTINE_MAX:
            cmds.append(("HDEL", self.quarantine_key, self._quarantined.pop(0)))
        await self._note_vps(cmds)
