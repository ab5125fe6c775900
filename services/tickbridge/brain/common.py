"""Helpers shared by the Brain roles: raw stream replies, instance names, the Redis function library."""

from __future__ import annotations

import os
import socket
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tickbridge.core.redis_io import execute_packed
from tickbridge.core.settings import Settings
from tickbridge.core.wire import GroupEntry, parse_stream_id

#: Name of the Redis function that acks Brain-stream entries and writes them atomically.
INGEST_FUNCTION = "tickbridge_brain_ingest"


def instance_name(settings: Settings, role: str) -> str:
    """CONSUMER_NAME if set (stable across restarts: the PEL is taken back at once), else host-pid."""
    if settings.consumer_name:
        return settings.consumer_name
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def lua_source() -> str:
    return resources.files("tickbridge.brain").joinpath("brain.lua").read_text(encoding="utf-8")


async def load_functions(client: aioredis.Redis) -> None:
    """`FUNCTION LOAD REPLACE` the Brain library (idempotent, safe with several instances)."""
    (reply,) = await execute_packed(client, [["FUNCTION", "LOAD", "REPLACE", lua_source()]])
    reply_or_raise(reply)


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
    if isinstance(flat, dict):
        return flat
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def as_text(value: Any) -> str:
    """A reply value as text (bytes decoded, anything else through str)."""
    return value.decode() if isinstance(value, bytes) else str(value)


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
