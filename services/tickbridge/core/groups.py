"""Consumer-group mechanics, written once for every role that reads a stream through a group.

The Brain's consumer (one stream) reads through a group: read new entries (`>`), re-read its own pending
entries after a crash or a failed batch (cursor from `0`), and claim entries left idle by a member that died
(XAUTOCLAIM, cursor loop). The writer (every per-symbol stream) uses its group as a durable cursor instead
(`cursor_start`, `Cursor`): plain XREAD from the group's last-delivered ID, and XGROUP SETID once the rows are
in QuestDB, so Redis keeps no pending list for it (XREADGROUP's pending list and the XACKs cost Redis about
twice what XREAD does). The trim floor (the lowest ID the group still needs) is shared as well. What a role
does with the entries stays in the role.

Replies are read raw (`execute_packed`): a stream entry is `(id, flat field list)`, or `(id, None)` for an
entry deleted while pending (older servers; Redis 7 lists those apart in XAUTOCLAIM's third element).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tickbridge.core.redis_io import Command, execute_packed
from tickbridge.core.wire import GroupEntry, StreamId, format_stream_id, parse_stream_id

#: The largest sequence number of a stream ID.
_MAX_SEQ = 2**64 - 1


def reply_or_raise(reply: Any) -> Any:
    """Raise an error reply returned in place by `execute_packed`."""
    if isinstance(reply, BaseException):
        raise reply
    return reply


def parse_read_reply(reply: Any) -> dict[bytes, list[GroupEntry]]:
    """XREADGROUP/XREAD raw reply -> {stream: [(id, fields)]}."""
    out: dict[bytes, list[GroupEntry]] = {}
    if not reply:
        return out
    # RESP3 (redis-py 8 default) answers a map, RESP2 a list of [stream, entries] pairs.
    pairs = reply.items() if isinstance(reply, dict) else reply
    for stream, entries in pairs:
        out[stream] = [(e[0], e[1]) for e in entries]
    return out


def parse_info_pairs(flat: list[Any] | dict[bytes, Any]) -> dict[bytes, Any]:
    """An XINFO reply (flat list in RESP2, map in RESP3) as a dict."""
    if isinstance(flat, dict):
        return flat
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


async def group_floor(client: aioredis.Redis, stream: str, group: str) -> tuple[int, int] | None:
    """Lowest ID `group` on `stream` still needs (oldest pending or last delivered); None without that group.

    Only the role's own group counts: any other group (a stray one left at 0-0 by a peer, or a CONSUMER_GROUP
    that differs between the hosts) must not hold the trimming back, or the stream grows until Redis is full.
    """
    replies = await execute_packed(client, [["XINFO", "GROUPS", stream]])
    if isinstance(replies[0], ResponseError):
        return None
    groups = [g for g in map(parse_info_pairs, replies[0]) if g[b"name"] == group.encode()]
    if not groups:
        return None
    cmds = [["XPENDING", stream, g[b"name"]] for g in groups]
    pend = await execute_packed(client, cmds)
    floor: tuple[int, int] | None = None
    for g, p in zip(groups, pend, strict=True):
        candidates = [parse_stream_id(g[b"last-delivered-id"])]
        if not isinstance(p, BaseException) and p and p[0]:
            candidates.append(parse_stream_id(p[1]))
        low = min(candidates)
        floor = low if floor is None else min(floor, low)
    return floor


@dataclass(frozen=True)
class GroupMember:
    """One member (`consumer`) of `group`: the reads every group reader needs, each one Redis round trip."""

    group: str
    consumer: str

    async def read(
        self,
        client: aioredis.Redis,
        streams: Sequence[str],
        starts: Sequence[str],
        count: int,
        block_ms: int | None = None,
    ) -> dict[bytes, list[GroupEntry]]:
        """XREADGROUP from `starts` (`>` = new entries; an ID = own pending entries after it)."""
        head = ["XREADGROUP", "GROUP", self.group, self.consumer]
        return await _read(client, head, streams, starts, count, block_ms)

    async def own_pending(
        self, client: aioredis.Redis, streams: Sequence[str], count: int, stopping: asyncio.Event | None = None
    ) -> AsyncIterator[dict[bytes, list[GroupEntry]]]:
        """This member's pending entries (delivered before a crash or a failed batch, never acked), page by
        page from the oldest, until every stream's pending list is read once (or `stopping` is set)."""
        cursors = {s: "0" for s in streams}
        live = list(streams)
        while live and not (stopping is not None and stopping.is_set()):
            got = await self.read(client, live, [cursors[s] for s in live], count)
            page = {stream: entries for stream, entries in got.items() if entries}
            if not page:
                return
            for stream, entries in page.items():
                cursors[stream.decode()] = entries[-1][0].decode()
            live = [s for s in live if s.encode() in page]
            yield page

    async def others_pending(self, client: aioredis.Redis, stream: str) -> bool:
        """True if another member holds pending entries of `stream` (XPENDING summary, O(members)).

        Nothing to claim otherwise: a scan of the pending list by XAUTOCLAIM costs Redis time per entry it
        looks at, and during a catch-up this member's own list is tens of thousands of entries long.
        """
        (reply,) = await execute_packed(client, [["XPENDING", stream, self.group]])
        reply = reply_or_raise(reply)
        if not reply or not reply[0]:
            return False
        me = self.consumer.encode()
        return any(row[0] != me for row in reply[3] or ())

    async def claim_idle(
        self, client: aioredis.Redis, stream: str, min_idle_ms: int, count: int, max_rounds: int = 1000
    ) -> AsyncIterator[tuple[list[GroupEntry], int]]:
        """Entries of other members idle past `min_idle_ms`, claimed page by page (XAUTOCLAIM cursor loop,
        at most `max_rounds` pages: a huge list is finished next time), each page with the number of pending
        entries that were deleted from the stream before anyone handled them."""
        if not await self.others_pending(client, stream):
            return
        cursor = "0-0"
        for _ in range(max_rounds):
            cmd: Command = ["XAUTOCLAIM", stream, self.group, self.consumer, min_idle_ms, cursor, "COUNT", count]
            (reply,) = await execute_packed(client, [cmd])
            reply = reply_or_raise(reply)
            cursor = reply[0].decode()
            entries: list[GroupEntry] = [(e[0], e[1]) for e in reply[1]]
            deleted = reply[2] if len(reply) > 2 else []
            yield entries, len(deleted)
            if cursor == "0-0":
                return


def id_before(entry_id: StreamId) -> StreamId:
    """The stream ID just below `entry_id`: a read after it returns `entry_id` first."""
    ms, seq = entry_id
    return (ms, seq - 1) if seq else (ms - 1, _MAX_SEQ)


@dataclass
class Cursor:
    """Where a reader that uses its group as a durable cursor stands on one stream: the last ID it read, and how
    many entries the stream had added up to it (None: unknown; Redis then reports no lag for the group)."""

    position: bytes
    entries_read: int | None

    def setid(self, stream: str | bytes, group: str) -> Command:
        """The XGROUP SETID that records this position as done (with ENTRIESREAD, so the group's lag stays valid)."""
        cmd: list[str | bytes | int] = ["XGROUP", "SETID", stream, group, self.position]
        if self.entries_read is not None:
            cmd += ["ENTRIESREAD", self.entries_read]
        return cmd


async def cursor_start(client: aioredis.Redis, stream: str, group: str, page: int = 10_000) -> Cursor | None:
    """The position of `group` on `stream` for a reader that moves the group with XGROUP SETID only once its work
    is durable (None: no such group or key). Nothing is pending in such a group, so there is nothing to ack, claim
    or re-read after a crash: the reader starts again from the group's last-delivered ID.

    Pending entries (left by a reader of an older version that used XREADGROUP) are folded in: the group goes
    back to just below the oldest one and they are acked, in one transaction per page, so they are read again
    (their re-send is the reader's to absorb, e.g. by QuestDB's DEDUP); a crash halfway leaves the group
    already moved back, and the next start finishes the acks.
    """
    (reply,) = await execute_packed(client, [["XINFO", "GROUPS", stream]])
    if isinstance(reply, ResponseError):
        return None
    found = [g for g in map(parse_info_pairs, reply) if g[b"name"] == group.encode()]
    if not found:
        return None
    info = found[0]
    last = parse_stream_id(info[b"last-delivered-id"])
    read = info.get(b"entries-read")
    if not int(info[b"pending"]):
        return Cursor(format_stream_id(last).encode(), int(read) if read is not None else None)
    while True:
        (rows,) = await execute_packed(client, [["XPENDING", stream, group, "-", "+", page]])
        ids = [row[0] for row in reply_or_raise(rows)]
        if not ids:
            return Cursor(format_stream_id(last).encode(), None)
        last = min(last, id_before(parse_stream_id(ids[0])))
        cmds: list[Command] = [["MULTI"], ["XGROUP", "SETID", stream, group, format_stream_id(last)]]
        cmds += [["XACK", stream, group, *ids], ["EXEC"]]
        replies = await execute_packed(client, cmds)
        for r in replies[-1] if isinstance(replies[-1], list) else [replies[-1]]:
            reply_or_raise(r)


async def read_after(
    client: aioredis.Redis,
    streams: Sequence[str],
    starts: Sequence[bytes],
    count: int,
    block_ms: int | None = None,
) -> dict[bytes, list[GroupEntry]]:
    """XREAD of the entries after `starts` (one ID per stream): a `Cursor` reader's read, no pending list."""
    return await _read(client, ["XREAD"], streams, starts, count, block_ms)


async def _read(
    client: aioredis.Redis,
    head: list[str],
    streams: Sequence[str],
    starts: Sequence[str | bytes],
    count: int,
    block_ms: int | None,
) -> dict[bytes, list[GroupEntry]]:
    cmd: list[str | bytes | int] = [*head, "COUNT", count]
    if block_ms is not None:
        cmd += ["BLOCK", block_ms]
    cmd += ["STREAMS", *streams, *starts]
    (reply,) = await execute_packed(client, [cmd])
    return parse_read_reply(reply_or_raise(reply))
