"""Helpers shared by the Brain roles: raw stream replies, instance names, the Redis function library."""

from __future__ import annotations

import os
import re
import socket
import time
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from tickbridge.core import keys
from tickbridge.core.groups import RawEntry, check, group_floor, id_key, parse_info_pairs, parse_read_reply
from tickbridge.core.redis_io import execute_packed
from tickbridge.core.settings import Settings
from tickbridge.core.tick import MAX_ID, MAX_TS_US, MIN_TS_US

#: Name of the Redis function that acks Brain-stream entries and writes them atomically.
INGEST_FUNCTION = "tickbridge_brain_ingest"

__all__ = ["RawEntry", "check", "group_floor", "id_key", "parse_info_pairs", "parse_read_reply"]  # core.groups


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


def as_text(value: Any) -> str:
    """A reply value as text (bytes decoded, anything else through str)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def id_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])


def now_us() -> int:
    return time.time_ns() // 1000


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
