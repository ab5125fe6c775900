"""Batches of ticks -> one MULTI/EXEC round trip on the VPS Redis.

Per batch: `XADD STREAM_KEY *` per tick, `ZADD` to the WARM key per trade, `HSET` of the last trade ID
per symbol (a restarted collector back-fills from there), dead letters (`XADD ... MAXLEN ~`), periodic
WARM trims, and a `SET` of the batch token. The token makes a retry after an ambiguous failure (the
connection dropped after EXEC was sent) exactly-once: if Redis already holds it, the batch is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tickbridge.collector.metrics import CollectorMetrics
from tickbridge.core import keys
from tickbridge.core.backoff import Backoff
from tickbridge.core.redis_io import TRANSIENT_ERRORS, Command, execute_packed, pack
from tickbridge.core.tick import DepthDiff, Trade

log = logging.getLogger(__name__)

LAST_BATCH_KEY = keys.COLLECTOR_LAST_BATCH
DEAD_LETTER_MAXLEN = 10_000
TRIM_INTERVAL_S = 1.0
#: A link failure, or an error reply such as OOM or LOADING: retry the same batch, never drop it.
_RETRY_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ResponseError)


async def execute_batch(client: aioredis.Redis, commands: list[Command], timeout: float = 10.0) -> list[Any]:
    """`execute_packed` with one deadline for the whole batch instead of one timer per reply.

    redis-py arms a timeout around every `read_response`; for a transaction of a few thousand commands
    that timer bookkeeping costs more than parsing the replies.
    """
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    ok = False
    try:
        async with asyncio.timeout(timeout):
            await conn.send_packed_command(pack(commands), check_health=False)
            replies: list[Any] = []
            for _ in range(len(commands)):
                try:
                    replies.append(await conn.read_response(disable_decoding=True, timeout=math.inf))
                except ResponseError as exc:
                    replies.append(exc)
        ok = True
        return replies
    finally:
        if not ok:
            with contextlib.suppress(Exception):
                await conn.disconnect()
        await pool.release(conn)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    detail: str
    raw: bytes
    recv_ts: int


Item = Trade | DepthDiff | DeadLetter


class StreamWriter:
    """Owns the bounded batch queue and the Redis write loop."""

    def __init__(
        self,
        client: aioredis.Redis,
        stream_key: str,
        metrics: CollectorMetrics,
        *,
        warm_window_s: float = 300.0,
        max_batches: int = 64,
        max_batch_items: int = 5000,
        linger_s: float = 0.005,
    ) -> None:
        self.client = client
        self.stream_key = stream_key
        self.metrics = metrics
        self.warm_window_us = int(warm_window_s * 1_000_000)
        self.max_batch_items = max_batch_items
        self.linger_s = linger_s
        self.queue: asyncio.Queue[list[Item] | None] = asyncio.Queue(maxsize=max_batches)
        self._token_prefix = uuid.uuid4().hex[:12]
        self._seq = 0
        self._latest_ts: dict[str, int] = {}
        self._last_trim: dict[str, float] = {}
        self.written = 0  # ticks appended (tests, bench)

    async def put(self, batch: list[Item]) -> None:
        """Enqueue a batch; waits when the queue is full (the caller stops reading: TCP backpressure)."""
        if self.queue.full():
            self.metrics.queue_full.labels("writer").inc()
        await self.queue.put(batch)

    async def close_input(self) -> None:
        await self.queue.put(None)

    async def run(self) -> None:
        """Write batches until the `None` sentinel; never drops a batch (retries with backoff)."""
        done = False
        while not done:
            first = await self.queue.get()
            if first is None:
                break
            items = list(first)
            if len(items) < self.max_batch_items and self.queue.empty() and self.linger_s:
                await asyncio.sleep(self.linger_s)  # a few ms of latency for far fewer round trips at low rates
            while len(items) < self.max_batch_items and not self.queue.empty():
                more = self.queue.get_nowait()
                if more is None:
                    done = True
                    break
                items.extend(more)
            if items:
                await self._write(items)
        await self._final_trim()

    async def _final_trim(self) -> None:
        """Trim every WARM key once more on shutdown (periodic trims may lag a fast replay)."""
        cmds: list[Command] = [
            ("ZREMRANGEBYSCORE", keys.warm_key(symbol), "-inf", f"({ts - self.warm_window_us}")
            for symbol, ts in self._latest_ts.items()
        ]
        try:
            await execute_packed(self.client, cmds)
        except _RETRY_ERRORS as exc:
            log.warning("final WARM trim failed: %s", exc)

    def _commands(self, items: list[Item]) -> list[Command]:
        stream = self.stream_key
        cmds: list[Command] = [("MULTI",)]
        last_ids: dict[str, int] = {}
        warm: dict[str, list[str | int]] = {}  # one ZADD per symbol and batch
        latest = self._latest_ts
        for item in items:
            if isinstance(item, Trade):
                cmds.append(("XADD", stream, "*", *item.fields()))
                symbol = item.symbol
                member = f"{item.trade_id}|{item.price}|{item.volume}|{item.side}|{item.timestamp}"
                args = warm.get(symbol)
                if args is None:
                    args = warm[symbol] = ["ZADD", keys.warm_key(symbol)]
                args += (item.timestamp, member)
                last_ids[symbol] = item.trade_id
                if item.timestamp > latest.get(symbol, 0):
                    latest[symbol] = item.timestamp
            elif isinstance(item, DepthDiff):
                cmds.append(("XADD", stream, "*", *item.fields()))
            else:
                cmds.append(
                    ("XADD", keys.COLLECTOR_DEAD_LETTER, "MAXLEN", "~", DEAD_LETTER_MAXLEN, "*",
                     "reason", item.reason, "detail", item.detail, "raw", item.raw, "recv_ts", item.recv_ts)
                )  # fmt: skip
        cmds.extend(warm.values())
        if last_ids:
            flat: list[str | int] = []
            for symbol, trade_id in last_ids.items():
                flat += [symbol, trade_id]
            cmds.append(("HSET", keys.COLLECTOR_LAST_TRADE_IDS, *flat))
        now = time.monotonic()
        for symbol in last_ids:
            if now - self._last_trim.get(symbol, 0.0) >= TRIM_INTERVAL_S:
                self._last_trim[symbol] = now
                cutoff = latest[symbol] - self.warm_window_us
                cmds.append(("ZREMRANGEBYSCORE", keys.warm_key(symbol), "-inf", f"({cutoff}"))
        return cmds

    async def _write(self, items: list[Item]) -> None:
        self._seq += 1
        token = f"{self._token_prefix}:{self._seq}"
        cmds = self._commands(items)
        cmds.append(("SET", LAST_BATCH_KEY, token))
        cmds.append(("EXEC",))
        backoff = Backoff(base=0.05, cap=2.0)
        ambiguous = False
        while True:
            try:
                if ambiguous and await self.client.get(LAST_BATCH_KEY) == token.encode():
                    break  # the previous attempt was applied; its reply was lost
                replies = await execute_batch(self.client, cmds)
                result = replies[-1]
                if isinstance(result, ResponseError):
                    raise result
                if isinstance(result, list):
                    for reply in result:
                        if isinstance(reply, ResponseError):
                            log.error("stream write: command failed inside the batch: %s", reply)
                break
            except _RETRY_ERRORS as exc:
                ambiguous = True
                self.metrics.redis_errors.inc()
                delay = backoff.next()
                log.warning("stream write failed (%s), retrying the batch in %.2fs", exc, delay)
                await asyncio.sleep(delay)
        n = 0
        for item in items:
            if not isinstance(item, DeadLetter):
                n += 1
        self.written += n
        self.metrics.batch_size.observe(n)
