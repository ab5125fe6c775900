"""Traffic and checks of the fast-forward tests and benches (issue 16).

- `FlowSource`: trades with contiguous IDs per symbol, either a backlog laid in the past (explicit stream IDs,
  exchange time just before each ID's time) or live ones (`XADD *`, exchange time = now).
- `FreshnessProbe`: every `interval` the age of the newest tick `recent(symbol, 1)` returns, per symbol.
- `SymbolStreamWatch`: follows the Brain's per-symbol trade streams from their start (the writer trims them
  behind itself) and records each trade_id as it appears: once, in trade-ID order, none missing.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis

from tickbridge.core import keys
from tickbridge.core.groups import parse_read_reply
from tickbridge.core.redis_io import Command, execute_packed, make_client
from tickbridge.core.wire import StreamId, encode_tick, format_stream_id, now_us, symbol_trade
from tickbridge_dev.loadgen.brain import make_trade


class FlowSource:
    """Contiguous trade IDs per symbol (from 1), round robin over `symbols`."""

    def __init__(self, symbols: Sequence[str]) -> None:
        self.symbols = list(symbols)
        self.next_id = dict.fromkeys(self.symbols, 1)
        self._i = 0

    def _next(self) -> tuple[str, int]:
        sym = self.symbols[self._i % len(self.symbols)]
        self._i += 1
        tid = self.next_id[sym]
        self.next_id[sym] = tid + 1
        return sym, tid

    async def backlog(
        self, client: aioredis.Redis, stream: str, n: int, *, start_ms: int, step_ms: float, chunk: int = 10_000
    ) -> StreamId:
        """`n` entries with explicit IDs from `start_ms`, `step_ms` apart; returns the last ID."""
        last: StreamId = (start_ms, -1)
        for base in range(0, n, chunk):
            cmds: list[Command] = []
            for i in range(base, min(n, base + chunk)):
                ms = start_ms + int(i * step_ms)
                last = (ms, last[1] + 1) if ms == last[0] else (ms, 0)
                sym, tid = self._next()
                trade = make_trade(sym, tid, ms * 1000 - 500)
                cmds.append(["XADD", stream, format_stream_id(last), *encode_tick(trade)])
            for reply in await execute_packed(client, cmds):
                if isinstance(reply, BaseException):
                    raise reply
        return last

    def live_commands(self, stream: str, n: int) -> list[Command]:
        cmds: list[Command] = []
        for _ in range(n):
            sym, tid = self._next()
            cmds.append(["XADD", stream, "*", *encode_tick(make_trade(sym, tid, now_us()))])
        return cmds

    async def live(self, client: aioredis.Redis, stream: str, rate: float, stop: asyncio.Event) -> int:
        """Live trades at about `rate`/s in batches every 10 ms until `stop`; a failed batch is retried."""
        sent = 0
        start = time.monotonic()
        while not stop.is_set():
            due = int((time.monotonic() - start) * rate) - sent
            if due > 0:
                cmds = self.live_commands(stream, due)
                while True:
                    try:
                        replies = await execute_packed(client, cmds)
                    except Exception:  # a VPS Redis restart: the collector would retry too
                        await asyncio.sleep(0.05)
                        continue
                    bad = [r for r in replies if isinstance(r, BaseException)]
                    if bad:
                        raise bad[0]
                    break
                sent += due
            await asyncio.sleep(0.01)
        return sent

    def expected(self) -> dict[str, tuple[int, int]]:
        """symbol -> (first, last) trade_id emitted (the oracle's form)."""
        return {s: (1, n - 1) for s, n in self.next_id.items() if n > 1}


class RecentReader(Protocol):
    async def recent(self, symbol: str, n: int) -> Any: ...


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class FreshnessProbe:
    """Ages (s) of `recent(symbol, 1)`'s newest tick, every `interval`, for every symbol."""

    reader: RecentReader
    symbols: Sequence[str]
    interval: float = 0.5
    ages: list[float] = field(default_factory=list)
    empty: int = 0

    async def sample(self) -> None:
        now = now_us()
        for sym in self.symbols:
            answer = await self.reader.recent(sym, 1)
            if not answer.rows:
                self.empty += 1
                continue
            self.ages.append(max(0.0, (now - answer.rows[-1].timestamp) / 1e6))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample()
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except TimeoutError:
                pass

    def summary(self) -> str:
        p50, p99 = percentile(self.ages, 0.5), percentile(self.ages, 0.99)
        worst = max(self.ages, default=float("nan"))
        return f"{len(self.ages)} samples, p50 {p50:.3f}s p99 {p99:.3f}s max {worst:.3f}s, empty {self.empty}"


@dataclass
class SymbolStreamWatch:
    """Trade IDs as they appear in each per-symbol stream (followed from `0`), in a thread of its own: parsing
    the replay's volume in the test's event loop would delay the live reads the test measures."""

    url: str
    symbols: Sequence[str]
    seen: dict[str, list[int]] = field(default_factory=dict)
    _last: dict[str, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="symbol-stream-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following, read what is left, and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # handed to `stop()`
            self.error = exc

    async def _run(self) -> None:
        self.client = make_client(self.url)
        streams = [keys.trades_key(s) for s in self.symbols]
        for s in streams:
            self._last.setdefault(s, "0-0")
        for s in self.symbols:
            self.seen.setdefault(s, [])
        try:
            while not self._stop.is_set():
                await self.poll(streams, self._last)
            while await self.poll(streams, self._last, block=1):
                pass
        finally:
            await self.client.aclose()

    async def poll(self, streams: list[str], last: dict[str, str], block: int = 200) -> int:
        cmd: list[Any] = ["XREAD", "COUNT", 20_000, "BLOCK", block, "STREAMS", *streams, *(last[s] for s in streams)]
        (reply,) = await execute_packed(self.client, [cmd])
        if isinstance(reply, BaseException):
            raise reply
        n = 0
        for stream, entries in parse_read_reply(reply).items():
            name = stream.decode()
            ids = self.seen[name.rsplit(":", 1)[1]]
            for _eid, fields in entries:
                values = symbol_trade(list(fields or []))
                if values is not None:
                    ids.append(int(values[7]))
            if entries:
                last[name] = entries[-1][0].decode()
                n += len(entries)
        return n

    def problems(self, expected: dict[str, tuple[int, int]]) -> list[str]:
        """Per symbol: lost, duplicated, out of order (empty when all is well)."""
        out: list[str] = []
        for sym, (first, last) in sorted(expected.items()):
            ids = self.seen.get(sym, [])
            want = set(range(first, last + 1))
            lost = len(want - set(ids))
            dup = len(ids) - len(set(ids))
            disorder = sum(1 for a, b in itertools.pairwise(ids) if b <= a)
            if lost or dup or disorder:
                out.append(f"{sym}: lost {lost} duplicated {dup} out of order {disorder} of {len(want)}")
        return out
