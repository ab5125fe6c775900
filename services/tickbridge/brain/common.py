"""Helpers shared by the Brain roles: instance names, the Redis function library."""

from __future__ import annotations

import os
import socket
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from tickbridge.core.groups import group_floor, parse_info_pairs, parse_read_reply, reply_or_raise
from tickbridge.core.redis_io import execute_packed
from tickbridge.core.settings import Settings

#: Name of the Redis function that acks Brain-stream entries and writes them atomically.
INGEST_FUNCTION = "tickbridge_brain_ingest"

#: Re-exported: the consumer-group mechanics live in core/groups.py.
__all__ = [
    "INGEST_FUNCTION",
    "as_text",
    "group_floor",
    "instance_name",
    "load_functions",
    "lua_source",
    "parse_info_pairs",
    "parse_read_reply",
    "reply_or_raise",
]


def instance_name(settings: Settings, role: str) -> str:
    """CONSUMER_NAME if set (stable across restarts: the PEL is taken back at once), else host-pid."""
    if settings.consumer_name:
        return settings.consumer_name
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def lua_source() -> str:
    """The tickbridge_brain library: brain.lua with book.lua's functions ahead of it (the ingest call uses them)."""
    here = resources.files("tickbridge.brain")
    shebang, _, rest = here.joinpath("brain.lua").read_text(encoding="utf-8").partition("\n")
    return f"{shebang}\n{here.joinpath('book.lua').read_text(encoding='utf-8')}\n{rest}"


async def load_functions(client: aioredis.Redis) -> None:
    """`FUNCTION LOAD REPLACE` the Brain library (idempotent, safe with several instances)."""
    (reply,) = await execute_packed(client, [["FUNCTION", "LOAD", "REPLACE", lua_source()]])
    reply_or_raise(reply)


def as_text(value: Any) -> str:
    """A reply value as text (bytes decoded, anything else through str)."""
    return value.decode() if isinstance(value, bytes) else str(value)
