"""The VPS disk buffer: a QuestDB WAL table that holds the oldest undelivered entries during a long outage.

One row per stream entry. `ts` is writer-assigned and strictly increasing (`max(id_ms*1000, last_ts+1)` µs),
so the designated-timestamp order is the entry-ID order and replay pages in natural order (questdb.md §2.6).
`payload` is the entry's flat field/value list as JSON, exactly as Redis held it (VARCHAR, not DOUBLE: prices
stay the exchange's strings and the Brain gets a byte-identical entry). VARCHAR carries the #7045 torn-segment
risk on ungraceful QuestDB stops; we stop QuestDB with SIGTERM only and alert on suspended tables.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from questdb.ingress import Sender

from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBError, QuestDBHttp, ilp_conf
from tickbridge.core.settings import Settings
from tickbridge.core.wire import (
    RawEntry,
    StreamId,
    decode_payload,
    format_stream_id,
    ilp_buffer_row,
    parse_stream_id,
    vps_buffer_ddl,
)

log = logging.getLogger(__name__)

HOUR_US = 3_600_000_000


@dataclass(frozen=True, slots=True)
class BufferRow:
    """One row read back: designated ts (µs), entry ID, field/value list. A row that cannot be replayed (its
    ID or payload unreadable: a disk fault, a foreign write) has `error` set, `entry_id`/`fields` as far as
    they could be read, and `raw` (the payload as stored) for the quarantine."""

    ts: int
    entry_id: StreamId | None
    fields: list[str] | list[bytes]
    error: str = ""
    raw: str = ""


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    min_ts: int
    max_ts: int
    rows: int
    disk_bytes: int


def read_row(raw: Sequence[Any]) -> BufferRow:
    """A `ts, id_ms, id_seq, payload` row as `/exec` returns it; never raises (see `BufferRow.error`)."""
    ts = _ts_micros(raw[0])
    payload = raw[3] if isinstance(raw[3], str) else ""
    try:
        entry_id: StreamId = (int(raw[1]), int(raw[2]))
    except (TypeError, ValueError):
        return BufferRow(ts, None, [], "bad_id", payload)
    if entry_id[0] < 0 or entry_id[1] < 0:
        return BufferRow(ts, None, [], "bad_id", payload)
    try:
        return BufferRow(ts, entry_id, decode_payload(payload))
    except (ValueError, TypeError, KeyError, binascii.Error):
        return BufferRow(ts, entry_id, [], "bad_payload", payload)


def _ts_micros(value: Any) -> int:
    return int(value) if value is not None else 0


class SpillBuffer:
    """Append, page, drop: the forwarder's only access to the `vps_buffer` table."""

    def __init__(self, url: str, settings: Settings | None = None, *, table: str = keys.VPS_BUFFER_TABLE) -> None:
        self.url = url
        self.table = table
        self.http = QuestDBHttp(url, settings, timeout=60.0)
        self._conf = ilp_conf(url, settings, retry_timeout_ms=5_000)
        self._sender: Sender | None = None
        self.last_ts = 0
        self.ready = False
        #: Start the next append in a fresh partition: its `ts` goes to the next hour (still above every row
        #: and at or above the ID's time, so order and `first_after` hold). Set to cap a partition's size.
        self.rotate = False

    async def close(self) -> None:
        await self.http.close()
        sender, self._sender = self._sender, None
        if sender is not None:
            await asyncio.to_thread(self._close_sender, sender)

    @staticmethod
    def _close_sender(sender: Sender) -> None:
        try:
            sender.close()
        except Exception:  # closing a sender whose server died: nothing left to flush
            log.debug("sender close failed", exc_info=True)

    async def ensure_table(self) -> None:
        await self.http.exec(vps_buffer_ddl(self.table))
        self.ready = True

    async def recover(self) -> tuple[StreamId | None, int]:
        """After every commit is visible: (highest entry ID held, its ts). Drives crash recovery of a spill."""
        await self.ensure_table()
        await self.http.wait_applied(self.table, timeout=120.0)
        rows = await self.http.rows(f"SELECT id_ms, id_seq, ts::long FROM {self.table} ORDER BY ts DESC LIMIT 1")
        if not rows:
            return None, self.last_ts
        self.last_ts = max(self.last_ts, _ts_micros(rows[0][2]))
        return (int(rows[0][0]), int(rows[0][1])), self.last_ts

    async def append(self, entries: Sequence[RawEntry]) -> int:
        """Write `entries` in one transaction, wait until visible, check the last is readable; return its ts."""
        return (await self.append_rows(entries))[0]

    async def append_rows(self, entries: Sequence[RawEntry]) -> tuple[int, list[tuple[StreamId, int]]]:
        """`append`, also returning each entry's `(id, ts)` (for the spill ledger)."""
        if not entries:
            return self.last_ts, []
        placed: list[tuple[StreamId, int]] = []
        start_ts = self.last_ts
        if self.rotate and start_ts:
            start_ts = (start_ts // HOUR_US + 1) * HOUR_US - 1
        last_ts = await asyncio.to_thread(self._write, entries, start_ts, placed)
        await self.http.wait_applied(self.table, timeout=120.0)
        last_id = parse_stream_id(entries[-1][0])
        seen = await self.http.rows(f"SELECT id_ms, id_seq FROM {self.table} WHERE ts = {last_ts}::timestamp LIMIT 1")
        if not seen or (int(seen[0][0]), int(seen[0][1])) != last_id:
            raise QuestDBError(f"{self.table}: spilled entry {format_stream_id(last_id)} not visible after commit")
        self.last_ts = last_ts
        self.rotate = False
        return last_ts, placed

    def _write(self, entries: Sequence[RawEntry], last_ts: int, placed: list[tuple[StreamId, int]]) -> int:
        if self._sender is None:
            sender = Sender.from_conf(self._conf)
            sender.establish()
            self._sender = sender
        buf = self._sender.new_buffer()
        ts = last_ts
        table = self.table
        for raw_id, fields in entries:
            ms, seq = parse_stream_id(raw_id)
            ts = max(ms * 1000, ts + 1)
            placed.append(((ms, seq), ts))
            ilp_buffer_row(buf, table, (ms, seq), ts, fields)
        try:
            self._sender.flush(buf, transactional=True)
        except Exception:
            # The sender may be unusable now (server gone): start a fresh one next time.
            sender, self._sender = self._sender, None
            self._close_sender(sender)
            raise
        return ts

    async def first_after(self, entry_id: StreamId) -> int | None:
        """ts of the first row whose ID is above `entry_id` (None if none): where a replay starts."""
        ms, seq = entry_id
        rows = await self.http.rows(
            f"SELECT ts::long FROM {self.table} WHERE ts >= {ms * 1000}::timestamp AND "
            f"(id_ms > {ms} OR (id_ms = {ms} AND id_seq > {seq})) ORDER BY ts LIMIT 1"
        )
        return _ts_micros(rows[0][0]) if rows else None

    async def page(self, after_ts: int, limit: int) -> list[BufferRow]:
        """The next `limit` rows after `after_ts`, in ts (= ID) order."""
        rows = await self.http.rows(
            f"SELECT ts::long, id_ms, id_seq, payload FROM {self.table} WHERE ts > {after_ts}::timestamp "
            f"ORDER BY ts LIMIT {limit}"
        )
        return [read_row(r) for r in rows]

    async def span(
        self, after_ts: int, upto_ts: int
    ) -> tuple[int, tuple[StreamId, int] | None, tuple[StreamId, int] | None]:
        """Rows with `after_ts < ts <= upto_ts`: count, first and last `(id, ts)` (rebuilding the ledger)."""
        where = f"WHERE ts > {after_ts}::timestamp AND ts <= {upto_ts}::timestamp"
        count = int(await self.http.scalar(f"SELECT count() FROM {self.table} {where}") or 0)
        if not count:
            return 0, None, None
        ends = []
        for order in ("", " DESC"):
            r = await self.http.rows(
                f"SELECT id_ms, id_seq, ts::long FROM {self.table} {where} ORDER BY ts{order} LIMIT 1"
            )
            ends.append(((int(r[0][0]), int(r[0][1])), _ts_micros(r[0][2])) if r else None)
        return count, ends[0], ends[1]

    async def count_after(self, after_ts: int) -> int:
        return int(await self.http.scalar(f"SELECT count() FROM {self.table} WHERE ts > {after_ts}::timestamp") or 0)

    async def count_between(self, after_ts: int, upto_ts: int) -> int:
        sql = f"SELECT count() FROM {self.table} WHERE ts > {after_ts}::timestamp AND ts <= {upto_ts}::timestamp"
        return int(await self.http.scalar(sql) or 0)

    async def partitions(self) -> list[Partition]:
        rows = await self.http.rows(
            "SELECT name, minTimestamp::long, maxTimestamp::long, numRows, diskSize "
            f"FROM table_partitions('{self.table}') ORDER BY minTimestamp"
        )
        return [Partition(str(r[0]), _ts_micros(r[1]), _ts_micros(r[2]), int(r[3] or 0), int(r[4] or 0)) for r in rows]

    async def drop_delivered(self, cursor_ts: int) -> int:
        """Drop every partition whose rows all lie at or below `cursor_ts` (delivered); return the rows dropped.

        The partition holding the writer's head may go too: the forwarder spills and cleans in one task, and a
        later spill gets `ts > last_ts >= cursor_ts`, so it lands in a fresh partition, never in a dropped one.
        """
        parts = [p for p in await self.partitions() if p.rows and p.max_ts <= cursor_ts]
        if not parts:
            return 0
        await self._drop([p.name for p in parts])
        return sum(p.rows for p in parts)

    async def drop_partition(self, part: Partition) -> None:
        await self._drop([part.name])

    async def _drop(self, names: list[str]) -> None:
        listed = ", ".join(f"'{n}'" for n in names)
        try:
            await self.http.exec(f"ALTER TABLE {self.table} DROP PARTITION LIST {listed}")
        except QuestDBError as exc:
            if "no partitions matched" not in str(exc) and "could not remove partition" not in str(exc):
                raise
        await self.http.wait_applied(self.table, timeout=120.0)
