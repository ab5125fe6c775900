"""The spill ledger: what the forwarder put in the QuestDB buffer, so the replay can prove it got it back.

One entry per spill transaction and buffer partition (an entry never straddles an hour of `ts`, so a lost
partition is whole entries and its range is exact): first ID, last ID, row count, first and last `ts`.
Kept in the VPS hash `keys.FORWARDER_LEDGER` (field: first ID; value: `last count first_ts last_ts`),
written after the spill's commit is visible, so it survives a forwarder restart (and VPS Redis AOF).

The replay notes every row it reads back (in `ts` order). An entry is closed when the replay passes its last
`ts`; then `got < count` is a shortfall: rows lost from the buffer (a truncated table, a lost partition, a
disk fault), reported with the missing range. Closed entries leave the ledger once the Brain holds them, so it
holds only what is still owed: bounded by the buffer itself (and by `LEDGER_MAX`, past which a spill extends
the newest entry of its partition instead of adding one). Partitions the disk budget drops leave it too
(counted as dropped, not missing).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tickbridge.core.wire import StreamId, format_stream_id, parse_stream_id

HOUR_US = 3_600_000_000
#: Entries past which a spill extends the newest entry of its partition (coarser ranges, bounded hash).
LEDGER_MAX = 10_000


@dataclass(slots=True)
class LedgerEntry:
    first: StreamId
    last: StreamId
    count: int
    first_ts: int
    last_ts: int
    got: int = 0  # rows read back so far
    first_got: StreamId | None = None
    last_got: StreamId | None = None
    closed: bool = False  # read back past its end (and any shortfall reported); kept until delivered

    @property
    def field(self) -> str:
        return format_stream_id(self.first)

    @property
    def value(self) -> str:
        tail = f" closed {self.got}" if self.closed else ""
        return f"{format_stream_id(self.last)} {self.count} {self.first_ts} {self.last_ts}{tail}"

    @property
    def shortfall(self) -> int:
        return max(0, self.count - self.got)

    def contains(self, ts: int, entry_id: StreamId) -> bool:
        return self.first_ts <= ts <= self.last_ts and self.first <= entry_id <= self.last

    def missing_range(self) -> str:
        """Where the missing rows are: exact IDs at the ends the replay did not see (`>X`: after X)."""
        if self.first_got is None or self.last_got is None:
            return f"{format_stream_id(self.first)}..{format_stream_id(self.last)}"
        parts = []
        if self.first_got > self.first:
            parts.append(f"{format_stream_id(self.first)}..<{format_stream_id(self.first_got)}")
        if self.last_got < self.last:
            parts.append(f">{format_stream_id(self.last_got)}..{format_stream_id(self.last)}")
        if not parts:
            parts.append(f">{format_stream_id(self.first_got)}..<{format_stream_id(self.last_got)}")
        return ", ".join(parts)


def segments(rows: Iterable[tuple[StreamId, int]]) -> list[LedgerEntry]:
    """Ledger entries for spilled rows `(id, ts)` in order: split where `ts` enters another hour."""
    out: list[LedgerEntry] = []
    for entry_id, ts in rows:
        cur = out[-1] if out else None
        if cur is not None and cur.last_ts // HOUR_US == ts // HOUR_US:
            cur.last, cur.last_ts, cur.count = entry_id, ts, cur.count + 1
        else:
            out.append(LedgerEntry(entry_id, entry_id, 1, ts, ts))
    return out


class Ledger:
    """Entries not yet delivered, oldest first; the replay's position `noted_ts` (rows up to it are
    accounted). Closed entries stay until the checkpoint passes them, so a re-read (after a Brain rewind or
    a failed send) is still recognised as ours."""

    def __init__(self) -> None:
        self.entries: list[LedgerEntry] = []
        self.noted_ts = 0

    def load(self, raw: Mapping[bytes, bytes] | Mapping[str, str]) -> None:
        entries = []
        for field, value in raw.items():
            f = field.decode() if isinstance(field, bytes) else field
            v = (value.decode() if isinstance(value, bytes) else value).split()
            e = LedgerEntry(parse_stream_id(f), parse_stream_id(v[0]), int(v[1]), int(v[2]), int(v[3]))
            if len(v) >= 6 and v[4] == "closed":
                e.closed, e.got = True, int(v[5])
            entries.append(e)
        entries.sort(key=lambda e: e.first_ts)
        self.entries = entries
        self.noted_ts = 0
        for e in entries:
            if not e.closed:
                self.noted_ts = e.first_ts - 1
                break
            self.noted_ts = e.last_ts

    @property
    def top(self) -> LedgerEntry | None:
        return self.entries[-1] if self.entries else None

    def _open(self) -> list[LedgerEntry]:
        return [e for e in self.entries if not e.closed]

    def add(self, new: list[LedgerEntry]) -> list[LedgerEntry]:
        """Record spilled entries; returns the entries to write (new ones, or the newest one extended)."""
        changed: list[LedgerEntry] = []
        for seg in new:
            top = self.top
            if (
                top is not None
                and not top.closed
                and len(self.entries) >= LEDGER_MAX
                and top.last_ts // HOUR_US == seg.first_ts // HOUR_US
            ):
                top.last, top.last_ts, top.count = seg.last, seg.last_ts, top.count + seg.count
                if not changed or changed[-1] is not top:
                    changed.append(top)
            else:
                if not self._open():
                    self.noted_ts = max(self.noted_ts, seg.first_ts - 1)
                self.entries.append(seg)
                changed.append(seg)
        return changed

    def find(self, ts: int, entry_id: StreamId) -> LedgerEntry | None:
        for e in self.entries:
            if e.first_ts > ts:
                return None
            if e.contains(ts, entry_id):
                return e
        return None

    def note(self, ts: int, entry_id: StreamId) -> tuple[str, list[LedgerEntry]]:
        """A row read back: 'ok' (counted), 'reread' (at or before the position, in an entry of ours) or
        'foreign' (no spill of ours holds that ts and ID); plus the entries it closed."""
        if ts <= self.noted_ts:
            return ("reread" if self.find(ts, entry_id) else "foreign"), []
        self.noted_ts = ts
        closed = self.close_upto(ts - 1)
        e = next((x for x in self.entries if not x.closed), None)
        if e is None or not e.contains(ts, entry_id) or (e.last_got is not None and entry_id <= e.last_got):
            return "foreign", closed  # not a row we wrote (IDs rise with ts in every spill)
        e.got += 1
        if e.first_got is None:
            e.first_got = entry_id
        e.last_got = entry_id
        if ts == e.last_ts:
            e.closed = True
            closed.append(e)
        return "ok", closed

    def close_upto(self, ts: int) -> list[LedgerEntry]:
        """Close the open entries whose last row is at or before `ts` (the replay is past them)."""
        closed = []
        for e in self.entries:
            if e.closed:
                continue
            if e.last_ts > ts:
                break
            e.closed = True
            closed.append(e)
        self.noted_ts = max(self.noted_ts, ts)
        return closed

    def close_all(self) -> list[LedgerEntry]:
        closed = [e for e in self.entries if not e.closed]
        for e in closed:
            e.closed = True
        if closed:
            self.noted_ts = max(self.noted_ts, closed[-1].last_ts)
        return closed

    def gap(self, upto_ts: int) -> list[tuple[LedgerEntry, int, int]]:
        """Open-entry parts in (`noted_ts`, `upto_ts`] the replay skipped (delivered before a restart, or below
        a Brain top it adopted): `(entry, after_ts, upto_ts)` ranges to count in QuestDB instead."""
        out = []
        for e in self._open():
            if e.first_ts > upto_ts:
                break
            lo, hi = max(self.noted_ts, e.first_ts - 1), min(upto_ts, e.last_ts)
            if hi > lo:
                out.append((e, lo, hi))
        return out

    def release(self, checkpoint: StreamId) -> list[LedgerEntry]:
        """Closed entries the Brain now holds entirely: they leave the ledger."""
        gone = []
        while self.entries and self.entries[0].closed and self.entries[0].last <= checkpoint:
            gone.append(self.entries.pop(0))
        return gone

    def drop_range(self, min_ts: int, max_ts: int) -> list[LedgerEntry]:
        """Forget the entries inside a partition the disk budget drops (their loss is counted as dropped)."""
        gone = [e for e in self.entries if min_ts <= e.first_ts and e.last_ts <= max_ts]
        if gone:
            self.entries = [e for e in self.entries if not (min_ts <= e.first_ts and e.last_ts <= max_ts)]
            self.noted_ts = max(self.noted_ts, max_ts)
        return gone
