"""Tick generator and delivery oracle for forwarder tests and the benchmark (the collector may not exist yet).

Entries use the contract layout (`encode_tick(Trade(...))`), written the way the collector writes them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from tickbridge.core.redis_io import Command, execute_packed
from tickbridge.core.tick import Trade
from tickbridge.core.wire import StreamId, encode_tick, format_stream_id, parse_stream_id

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT")


def trade_fields(i: int, rng: random.Random | None = None) -> list[bytes]:
    """A valid trade entry (contract field order), deterministic in `i`."""
    r = rng or random.Random(i)
    now_us = 1_763_900_000_000_000 + i * 800
    trade = Trade(
        symbol=SYMBOLS[i % len(SYMBOLS)],
        price=f"{60000 + r.random() * 1000:.8f}",
        volume=f"{r.random() * 2 + 0.00001:.8f}",
        side="BUY" if i % 2 else "SELL",
        timestamp=now_us,
        trade_id=1_000_000 + i,
        recv_ts=now_us + 350,
    )
    return [str(x).encode() for x in encode_tick(trade)]


async def preload(
    client: aioredis.Redis, key: str, count: int, *, start: StreamId | None = None, step_ms: float = 0.01,
    first_index: int = 0, chunk: int = 10_000,
) -> list[bytes]:  # fmt: skip
    """Append `count` entries with explicit increasing IDs (pipelined); returns their IDs.

    IDs start at `start` (default: now) and advance `step_ms` per entry, so a test can lay a backlog
    over several hours. With an existing stream, `start` must be above its top.
    """
    ms0, seq0 = start if start is not None else (int(time.time() * 1000), 0)
    ids: list[bytes] = []
    last: StreamId = (ms0, seq0 - 1)
    for base in range(0, count, chunk):
        commands: list[Command] = []
        for i in range(base, min(count, base + chunk)):
            ms = ms0 + int(i * step_ms)
            entry = (ms, last[1] + 1) if ms == last[0] else (ms, 0)
            last = entry
            eid = format_stream_id(entry).encode()
            ids.append(eid)
            commands.append((b"XADD", key, eid, *trade_fields(first_index + i)))
        replies = await execute_packed(client, commands)
        bad = [r for r in replies if isinstance(r, Exception)]
        if bad:
            raise RuntimeError(f"preload XADD failed: {bad[0]}")
    return ids


@dataclass
class LiveWriter:
    """Appends ticks with auto IDs (`XADD *`) at about `rate`/s in small pipelined batches; keeps acked IDs."""

    client: aioredis.Redis
    key: str
    rate: float = 2000.0
    batch: int = 20
    acked: list[tuple[float, bytes]] = field(default_factory=list)
    errors: int = 0
    index: int = 10_000_000

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.batch / self.rate
        next_at = time.monotonic()
        while not stop.is_set():
            commands: list[Command] = []
            for _ in range(self.batch):
                commands.append((b"XADD", self.key, b"*", *trade_fields(self.index)))
                self.index += 1
            try:
                replies = await execute_packed(self.client, commands)
            except Exception:
                self.errors += 1  # VPS Redis down: the collector would hold these in memory; not our subject
                await asyncio.sleep(0.05)
                continue
            now = time.time()
            self.acked += [(now, r) for r in replies if isinstance(r, bytes)]
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def read_stream(client: aioredis.Redis, key: str, page: int = 20_000) -> list[tuple[bytes, list[bytes]]]:
    """Every entry of a stream, raw, in order."""
    out: list[tuple[bytes, list[bytes]]] = []
    start = b"-"
    while True:
        reply = await execute_packed(client, [(b"XRANGE", key, start, b"+", b"COUNT", page)])
        entries = reply[0]
        out += [(e[0], list(e[1])) for e in entries]
        if len(entries) < page:
            return out
        start = b"(" + entries[-1][0]


@dataclass
class Verdict:
    delivered: int
    missing: list[bytes]
    duplicates: int
    out_of_order: int
    unexpected: int
    mismatched: int

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicates or self.out_of_order or self.unexpected or self.mismatched)


def verify(brain_entries: Sequence[tuple[bytes, list[bytes]]], expected: dict[bytes, list[bytes] | None]) -> Verdict:
    """Every expected ID once, IDs strictly increasing, fields byte-identical (None: fields not checked)."""
    seen: set[bytes] = set()
    dup = ooo = unexpected = mismatched = 0
    last: StreamId = (-1, -1)
    for eid, fields in brain_entries:
        cur = parse_stream_id(eid)
        if cur <= last:
            ooo += 1
        last = cur
        if eid in seen:
            dup += 1
        seen.add(eid)
        if eid not in expected:
            unexpected += 1
            continue
        want = expected[eid]
        if want is not None and want != fields:
            mismatched += 1
    missing = [eid for eid in expected if eid not in seen]
    return Verdict(len(brain_entries), missing, dup, ooo, unexpected, mismatched)
