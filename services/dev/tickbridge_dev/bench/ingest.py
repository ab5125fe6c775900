"""`python -m tickbridge_dev.bench.ingest`: the Brain Redis CPU of the consumer's ingest call, per batch shape.

The live Brain Redis costs several times more per tick than a catch-up (`docs/scaling.md`); this splits it.
One redis-server (AOF on, as on the Brain), the real `BrainConsumer` (its `_build`, its Redis function) and a
valid whole book of 1,700 levels a side for every configured symbol. Per shape, `--reps` batches are
appended to the Brain stream and then ingested in one call; Redis's `INFO commandstats` over each call alone
(reset after the appends) gives the call's own time (`FCALL`, the commands it runs included) per tick and per
call, split into the per-symbol XADDs, the other commands it runs (WARM's ZADD / ZREMRANGEBYSCORE, the books'
ZADD / HSET / ZREM / HDEL / HMGET, the group's XINFO / SETID) and the rest: Lua and the call's arguments.
Shapes, alternated over `--rounds`:

- live: 85 trades and 5 depth diffs of ~40 levels over the 50 symbols (10,000 trades/s arrive in calls of
  about 90 entries, with Binance's 500 diffs a second among them);
- live, trades only: 90 trades;
- depth only: 5 diffs;
- catch-up: 1,000 trades a call (the consumer's `CONSUMER_BATCH` bounds a call).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from tickbridge.brain.consumer import BrainConsumer
from tickbridge.core.redis_io import make_client
from tickbridge.core.settings import Settings
from tickbridge.core.tick import BookSnapshot, DepthDiff, Trade
from tickbridge.core.wire import encode_book, encode_depth, encode_trade
from tickbridge_dev.devstack.servers import RedisServer
from tickbridge_dev.loadgen.brain import as_mapping

LEVELS = 1_700
#: The calls' inner commands counted apart: the per-symbol XADDs are mixed with the bench's own appends.
_NOT_INNER = ("cmdstat_fcall", "cmdstat_xadd", "cmdstat_xread", "cmdstat_config|resetstat", "cmdstat_info")


def _price(offset: int) -> str:
    return f"{50_000 + offset * 0.01:.8f}"


class IngestBench:
    """The stack of one run: a Redis, a consumer on it, the books set, and the next IDs per symbol."""

    def __init__(self, redis: aioredis.Redis, consumer: BrainConsumer, settings: Settings) -> None:
        self.redis = redis
        self.consumer = consumer
        self.settings = settings
        self.symbols = list(settings.symbols)
        self.now = time.time_ns() // 1000
        self.update_id = dict.fromkeys(self.symbols, 1_000)
        self.trade_id = dict.fromkeys(self.symbols, 1)

    async def _append(self, values: list[str | int]) -> None:
        await self.redis.xadd(self.settings.stream_key, as_mapping(values))  # type: ignore[arg-type]

    async def _ingest(self, expected: int) -> None:
        got = await self.consumer.read_new()
        await self.consumer._finish_inflight()
        if got != expected:
            raise RuntimeError(f"read {got} entries, expected {expected}")

    async def set_books(self) -> None:
        bids = tuple((_price(-j), "1.00000000") for j in range(1, LEVELS + 1))
        asks = tuple((_price(j), "1.00000000") for j in range(1, LEVELS + 1))
        for sym in self.symbols:
            await self._append(encode_book(BookSnapshot(sym, self.now, self.update_id[sym], bids, asks, self.now)))
        await self._ingest(len(self.symbols))

    async def append(self, trades: int, diffs: int, levels: int = 42) -> None:
        """Append one batch of `trades` trades and `diffs` depth diffs to the Brain stream."""
        for _ in range(trades):
            sym = random.choice(self.symbols)
            self.now += 10
            tid = self.trade_id[sym]
            self.trade_id[sym] = tid + 1
            await self._append(encode_trade(Trade(sym, "50000.01000000", "0.01000000", "BUY", self.now, tid, self.now)))
        for _ in range(diffs):
            sym = random.choice(self.symbols)
            self.now += 10
            side = levels // 2
            bids = tuple((_price(-random.randint(1, LEVELS)), f"{random.random():.8f}") for _ in range(side))
            asks = tuple((_price(random.randint(1, LEVELS)), f"{random.random():.8f}") for _ in range(side))
            first = self.update_id[sym] + 1
            self.update_id[sym] = first + 2
            await self._append(encode_depth(DepthDiff(sym, self.now, first, first + 2, bids, asks, self.now)))

    async def measure(self, label: str, trades: int, diffs: int, reps: int) -> None:
        """`reps` batches of one shape, each appended and then ingested in one call; prints the call's Redis time
        per tick and per call, the part its commands take, and the rest (Lua and the call's arguments)."""
        usec: dict[str, float] = {}
        for _ in range(reps):
            await self.append(trades, diffs)
            # Only the ingest call is counted: the appends above are the bench's, not the Brain's.
            await self.redis.config_resetstat()
            await self._ingest(trades + diffs)
            stats: dict[str, Any] = await self.redis.info("commandstats")
            for name, v in stats.items():
                usec[name] = usec.get(name, 0.0) + v["usec"]
        ticks = (trades + diffs) * reps
        fcall = usec["cmdstat_fcall"]
        inner = sum(v for k, v in usec.items() if k not in _NOT_INNER)
        xadd = usec.get("cmdstat_xadd", 0.0)
        print(f"  {label:32s} ingest call {fcall / ticks:7.2f} µs/tick {fcall / reps:8.1f} µs/call;"
              f"  its commands: XADD {xadd / ticks:5.2f}, others {inner / ticks:5.2f};"
              f"  Lua and arguments {(fcall - xadd - inner) / ticks:6.2f} µs/tick", flush=True)  # fmt: skip


async def run(rounds: int, reps: int) -> None:
    server = RedisServer(appendonly=True)
    server.start()
    os.environ["BRAIN_REDIS_URL"] = server.url
    settings = Settings()
    consumer = BrainConsumer(settings, CollectorRegistry(), fastforward=False)
    consumer.client = make_client(settings.brain_redis_url, settings)
    redis = aioredis.from_url(server.url)
    try:
        await consumer._setup()
        bench = IngestBench(redis, consumer, settings)
        await bench.set_books()
        print(f"tickbridge bench ingest  ({len(bench.symbols)} symbols, books of {LEVELS} levels a side, "
              f"{reps} calls per shape, load avg {os.getloadavg()[0]:.1f})")  # fmt: skip
        for n in range(rounds):
            print(f"round {n + 1}")
            await bench.measure("live: 85 trades + 5 depth diffs", 85, 5, reps)
            await bench.measure("live, trades only: 90 trades", 90, 0, reps)
            await bench.measure("depth only: 5 diffs", 0, 5, reps)
            await bench.measure("catch-up: 1,000 trades", 1_000, 0, max(1, reps // 10))
    finally:
        await redis.aclose()
        await consumer.client.aclose()
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the shapes")
    parser.add_argument("--reps", type=int, default=200, help="ingest calls per shape")
    opts = parser.parse_args(argv)
    asyncio.run(run(opts.rounds, opts.reps))


if __name__ == "__main__":
    main()
