"""Redis helpers: client construction (TLS, timeouts) and a lean packed-pipeline path.

`redis.asyncio` spends most of its time encoding commands in Python (~50k XADD/s here); packing a
batch with `hiredis.pack_command` and sending it in one write reaches several times that.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tickbridge.core.settings import Settings

#: Transient failures worth a retry (the server or the link, not our command).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    OSError,
    TimeoutError,
    __import__("redis").exceptions.ConnectionError,
    __import__("redis").exceptions.TimeoutError,
    __import__("redis").exceptions.BusyLoadingError,
)

Command = Sequence[str | bytes | int | float]


def is_closed_transport_error(exc: BaseException) -> bool:
    """uvloop's answer to a write on a transport it has already closed because the peer reset the connection
    (`RuntimeError: unable to perform operation on <TCPTransport closed=True ...>; the handler is closed`):
    a dead connection like any other. Matched on its exact type and message: every other RuntimeError is a bug
    and stays fatal."""
    if type(exc) is not RuntimeError:
        return False
    text = str(exc)
    return text.startswith("unable to perform operation on <") and text.endswith("; the handler is closed")


class ClosedTransportError(RedisConnectionError):
    """A command written to a connection the peer had reset (uvloop's closed-transport `RuntimeError`)."""


async def _send_or_connection_error(send: Any, command: Any, check_health: bool) -> None:
    try:
        await send(command, check_health)
    except RuntimeError as exc:
        if not is_closed_transport_error(exc):
            raise
        raise ClosedTransportError(f"connection reset by the peer ({exc})") from exc


class ResetSafeConnection(Connection):
    """redis-py's connection, but a write to a reset connection raises `ConnectionError` (transient), not
    uvloop's `RuntimeError`. Every write goes through `send_packed_command`: commands, pipelines, the
    handshake of a fresh connection and the health-check PING. (redis-py has already dropped the connection.)"""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        await _send_or_connection_error(super().send_packed_command, command, check_health)


class ResetSafeSSLConnection(SSLConnection):
    """`ResetSafeConnection` for `rediss://`."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        await _send_or_connection_error(super().send_packed_command, command, check_health)


def make_client(url: str, settings: Settings | None = None, *, timeout: float = 10.0) -> aioredis.Redis:
    """A bytes-returning asyncio client for `url` (`rediss://` uses the TLS files from settings)."""
    kwargs: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": timeout,
        "socket_connect_timeout": min(timeout, 5.0),
        "health_check_interval": 15,
        "retry_on_timeout": False,
    }
    if url.startswith("rediss://") and settings is not None:
        if settings.redis_tls_ca:
            kwargs["ssl_ca_certs"] = settings.redis_tls_ca
        if settings.redis_tls_cert:
            kwargs["ssl_certfile"] = settings.redis_tls_cert
        if settings.redis_tls_key:
            kwargs["ssl_keyfile"] = settings.redis_tls_key
    client = aioredis.Redis.from_url(url, **kwargs)
    pool = client.connection_pool
    if pool.connection_class is SSLConnection:
        pool.connection_class = ResetSafeSSLConnection
    elif pool.connection_class is Connection:
        pool.connection_class = ResetSafeConnection
    return client


def pack(commands: Sequence[Command]) -> bytes:
    """RESP-encode a batch of commands in C."""
    return b"".join([hiredis.pack_command(tuple(cmd)) for cmd in commands])  # type: ignore[arg-type]


async def execute_packed(
    client: aioredis.Redis,
    commands: Sequence[Command] | bytes,
    count: int | None = None,
    *,
    deadline: float | None = None,
) -> list[Any]:
    """Send a batch in one write and read every reply, undecoded (bytes; nested lists, or dicts for the
    map replies of RESP3, which redis-py 8 negotiates by default: callers handle both shapes).

    Error replies are returned in place as `ResponseError` instances (the connection stays usable),
    so a caller can treat e.g. an XADD "ID equal or smaller" as already delivered. Connection errors
    raise, and the connection is dropped rather than reused half-read.

    With `deadline` (seconds) the whole batch has one timer instead of redis-py's timeout around every reply:
    for a transaction of a few thousand commands that per-reply bookkeeping costs more than parsing them.
    """
    if isinstance(commands, bytes):
        if count is None:
            raise ValueError("count is required with pre-packed bytes")
        payload, n = commands, count
    else:
        payload, n = pack(commands), len(commands)
    if n == 0:
        return []
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    ok = False
    # No per-reply timer under a deadline (math.inf), the client's socket timeout per reply otherwise.
    per_reply: dict[str, float] = {"timeout": math.inf} if deadline is not None else {}
    try:
        async with asyncio.timeout(deadline):
            await conn.send_packed_command(payload, check_health=False)
            replies: list[Any] = []
            for _ in range(n):
                try:
                    replies.append(await conn.read_response(disable_decoding=True, **per_reply))
                except ResponseError as exc:
                    replies.append(exc)
        ok = True
        return replies
    finally:
        if not ok:
            with contextlib.suppress(Exception):
                await conn.disconnect()
        await pool.release(conn)


async def execute_read(client: aioredis.Redis, commands: Sequence[Command]) -> list[Any]:
    """`execute_packed` for commands that are safe to repeat (reads).

    After a Redis restart every idle connection of the pool is stale, and redis-py finds out only
    when the reply does not come. The first such failure drops the idle connections and sends the
    batch once more, so a restart costs the caller no answer; Redis still gone raises as before.
    """
    try:
        return await execute_packed(client, commands)
    except RedisConnectionError:
        await client.connection_pool.disconnect(inuse_connections=False)
        return await execute_packed(client, commands)


def is_duplicate_id_error(reply: object) -> bool:
    """XADD with an explicit ID at or below the stream top: the entry is already there."""
    return isinstance(reply, ResponseError) and "equal or smaller than the target stream top" in str(reply)


async def ensure_group(client: aioredis.Redis, stream: str, group: str, start_id: str = "0") -> bool:
    """Create `group` on `stream` (and the stream) if missing; True if it was created."""
    try:
        await client.xgroup_create(stream, group, id=start_id, mkstream=True)
        return True
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
