"""Issue 20: brain-consumer-group as a durable cursor, against a real redis-server and real consumer processes.

kill -9 of the consumer at random instants while it drains a backlog and a live flow, with a second consumer
process on the same stream all along: every trade in its per-symbol stream exactly once and in the Brain
stream's order (the per-symbol streams have no DEDUP to hide a duplicate), in WARM once, nothing pending,
and the group's lag valid (0) at the end.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from conftest import eventually
from test_brain_kill import Role
from tickbridge.core import keys
from tickbridge.core.redis_io import ensure_group, make_client
from tickbridge_dev.devstack.servers import RedisServer
from tickbridge_dev.loadgen.brain import TradeSource

pytestmark = [pytest.mark.timeout(120), pytest.mark.chaos]

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
STREAM = keys.DEFAULT_STREAM_KEY
GROUP = keys.DEFAULT_CONSUMER_GROUP


async def test_kill9_of_the_consumer_mid_batch_loses_nothing_duplicates_nothing_keeps_order(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("BRAIN_", "SYMBOLS", "CONSUMER_", "WRITER_"))},
        "BRAIN_REDIS_URL": redis_server.url,
        "SYMBOLS": ",".join(SYMBOLS),
        "METRICS_PORT": "0",
        "CONSUMER_BATCH": "500",
        "LOG_LEVEL": "WARNING",
    }
    brain = make_client(redis_server.url)
    await ensure_group(brain, STREAM, GROUP)
    source = TradeSource(SYMBOLS)
    await source.append(brain, STREAM, 20_000)  # a backlog: the consumer is mid-batch most of the time
    active, standby = Role("consumer", "c1", env, tmp_path), Role("consumer", "c2", env, tmp_path)
    active.start()
    standby.start()
    loop = asyncio.get_running_loop()
    rng = random.Random()
    try:

        async def flow(seconds: float) -> None:
            end = loop.time() + seconds
            while loop.time() < end:
                await source.append(brain, STREAM, 20, live=True)
                await asyncio.sleep(0.01)

        async def ingesting() -> bool:
            info = next(g for g in await brain.xinfo_groups(STREAM) if g["name"] == GROUP.encode())
            return bool(info["last-delivered-id"] != b"0-0")

        async def killer() -> None:
            # Kill only once a consumer is up and moving the group, so every kill lands on a working process.
            await eventually(ingesting, timeout=60, what="a consumer ingesting the backlog")
            for _ in range(5):
                await asyncio.sleep(rng.uniform(0.2, 0.8))
                active.kill9()
                active.start()

        await asyncio.gather(flow(5.0), killer())
        expected = source.counts()

        async def drained() -> bool:
            info = next(g for g in await brain.xinfo_groups(STREAM) if g["name"] == GROUP.encode())
            return bool(info["lag"] == 0 and info["pending"] == 0)

        await eventually(drained, timeout=60, what="the group at the top, nothing pending, lag valid")
        for sym, n in expected.items():
            trade_ids = [int(f[b"trade_id"]) for _, f in await brain.xrange(keys.trades_key(sym))]
            assert trade_ids == list(range(1, n + 1)), f"{sym}: lost, duplicated or out of order"
            assert await brain.zcard(keys.warm_key(sym)) == n
        assert await brain.xlen(keys.CONSUMER_DEAD_LETTER) == 0
        assert active.kills == 5
        for role in (active, standby):  # SIGTERM: a clean stop, exit 0
            assert role.stop() == 0, role.log.read_text()[-2000:]
    finally:
        active.stop()
        standby.stop()
        await brain.aclose()
