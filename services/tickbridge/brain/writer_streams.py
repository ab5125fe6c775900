"""Stream discovery and group setup: per-symbol streams found by SCAN, keys that are not streams set
aside and looked at again, the writer group created on each stream, and where it stands.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from redis.exceptions import ResponseError

from tickbridge.brain.writer_base import WriterBase
from tickbridge.core import keys
from tickbridge.core.groups import Cursor, cursor_start, parse_info_pairs
from tickbridge.core.redis_io import Command, ensure_group, execute_packed

log = logging.getLogger("tickbridge.brain.writer")


class WriterStreams(WriterBase):
    """Which per-symbol streams the writer reads, each with the writer group on it."""

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

    async def load_cursors(self, streams: Iterable[str]) -> None:
        """Start reading `streams` again from their group's position: what QuestDB confirmed (an older
        writer's pending entries are folded in, `cursor_start`). After a crash, an outage or a held table the
        entries after it are read again; the re-sent rows are absorbed by DEDUP."""
        assert self.client is not None
        streams = list(streams)
        for stream in streams:
            cursor = await cursor_start(self.client, stream, self.group)
            # No group (the key was deleted since): MKSTREAM recreates both at 0 at the next setup.
            self.cursors[stream.encode()] = cursor or Cursor(b"0-0", None)
        await self.count_read(s.encode() for s in streams)

    async def count_read(self, streams: Iterable[bytes], *, settled: bool = False) -> None:
        """Learn how many entries lie up to the position of cursors that do not know it (a new group, an upgrade),
        so the group's lag stays valid: read in one transaction with the first entry after the position, it is
        the stream's entries-added if nothing is after it, entries-added minus the length if everything is.

        `settled` (the writer is idle: nothing held, nothing in flight, so each position is its group's): every
        cursor is checked, and a group at the top whose count or position is off is moved to the stream's last ID
        with the right count at once. Both drift for each entry the consumer appends and removes in one call
        (the undo of a duplicate between two members): counted in entries-added, never read."""
        assert self.client is not None
        streams = [s for s in streams if (c := self.cursors.get(s)) is not None and (settled or c.entries_read is None)]
        cmds: list[Command] = []
        for stream in streams:
            cmds += [["MULTI"], ["XRANGE", stream, b"(" + self.cursors[stream].position, "+", "COUNT", 1]]
            cmds += [["XINFO", "STREAM", stream], ["EXEC"]]
        replies = await execute_packed(self.client, cmds)
        fixes: list[Command] = []
        for stream, done in zip(streams, replies[3::4], strict=True):
            if not isinstance(done, list) or any(isinstance(r, BaseException) for r in done):
                continue  # no such key yet (XINFO STREAM), or no right to look: the lag stays unknown
            cursor, (after, info) = self.cursors[stream], (done[0], parse_info_pairs(done[1]))
            if not after:
                count = int(info[b"entries-added"])
                top = info[b"last-generated-id"]
                if settled and (count != cursor.entries_read or top != cursor.position):
                    # Nothing real after the position: move to the stream's last ID, past any removed entry
                    # (Redis reports no lag while one lies after a group's position).
                    fixes.append(["XGROUP", "SETID", stream, self.group, top, "ENTRIESREAD", count])
                    cursor.position = top
            elif info[b"first-entry"] and after[0][0] == info[b"first-entry"][0]:
                count = int(info[b"entries-added"]) - int(info[b"length"])
            else:
                continue
            cursor.entries_read = count
        if fixes:
            await execute_packed(self.client, fixes)

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
