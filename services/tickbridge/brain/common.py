"""Helpers shared by the Brain roles: raw stream replies, instance names, the Redis function library."""

from __future__ import annotations

import os
import re
import socket
import time
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tickbridge.core import keys
from tickbridge.core.redis_io import execute_packed
from tickbridge.core.settings import Settings
from tickbridge.core.tick import MAX_ID, MAX_TS_US, MIN_TS_US

#: Name of the Redis function that acks Brain-stream entries and writes them atomically.
INGEST_FUNCTION = "tickbridge_brain_ingest"

#: (entry ID, flat field list or None when the entry was deleted while pending).
RawEntry = tuple[bytes, list[bytes] | None]


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
    check(reply)


def check(reply: Any) -> Any:
    """Raise an error reply returned in place by `execute_packed`."""
    if isinstance(reply, BaseException):
        raise reply
    return reply


def parse_read_reply(reply: Any) -> dict[bytes, list[RawEntry]]:
    """XREADGROUP/XREAD raw reply -> {stream: [(id, fields)]}."""
    out: dict[bytes, list[RawEntry]] = {}
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


def id_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])


def id_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def now_us() -> int:
    return time.time_ns() // 1000


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
        candidates = [id_key(g[b"last-delivered-id"])]
        if not isinstance(p, BaseException) and p and p[0]:
            candidates.append(id_key(p[1]))
        low = min(candidates)
        floor = low if floor is None else min(floor, low)
    return floor


_DEC = rb"(?=[0-9.]*[1-9])[0-9]{1,20}(?:\.[0-9]{1,18})?"  # a decimal string > 0
#: A trade entry in the contract's field order, fields joined with NUL (which no valid value contains).
_TRADE = re.compile(
    rb"symbol\0([A-Z0-9]{2,32})\0exchange\0("
    + re.escape(keys.EXCHANGE.encode())
    + rb")\0type\0TRADE\0price\0"
    + _DEC
    + rb"\0volume\0"
    + _DEC
    + rb"\0side\0(?:BUY|SELL)\0timestamp\0([0-9]{16})\0trade_id\0([0-9]{1,19})"
    + rb"\0recv_ts\0([0-9]{16})"
)
_MIN_TS = str(MIN_TS_US).encode()
_MAX_TS = str(MAX_TS_US).encode()
_MAX_ID = str(MAX_ID).encode()


def fast_trade(fields: list[bytes]) -> tuple[bytes, bytes] | None:
    """(symbol, exchange) if `fields` is a valid trade in the contract's field order, else None.

    The same rules as `decode_entry` in one regex (several times faster than building a dict and a
    dataclass); anything else (depth diffs, other field orders, invalid values) returns None and the
    caller falls back to `decode_entry` for the precise verdict.
    """
    if len(fields) != 18:
        return None
    m = _TRADE.fullmatch(b"\0".join(fields))
    if m is None:
        return None
    ts, tid, recv = m.group(3), m.group(4), m.group(5)
    if not (_MIN_TS <= ts <= _MAX_TS and _MIN_TS <= recv <= _MAX_TS):
        return None
    if len(tid) == 19 and tid > _MAX_ID:
        return None
    return m.group(1), m.group(2)
