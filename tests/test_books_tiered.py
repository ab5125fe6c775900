"""Issue 17 on the trading side, real servers: `TieredMarketData.book()` (HOT copy and WARM read agree with
the Brain's book, follow it through a break and a repair), two `TieredMarketData` in one process (no
DuplicateTimeseries), and the `docs/brain-integration.md` example run exactly as written."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry

from conftest import QUESTDB_READER, ServiceRunner, eventually
from test_brain_books import diff, feed, settled, snap
from tickbridge.brain.books import read_book
from tickbridge.brain.consumer import BrainConsumer
from tickbridge.brain.tiered import TieredMarketData
from tickbridge.core import keys
from tickbridge.core.redis_io import ensure_group, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import now_us
from tickbridge_dev.devstack.servers import REPO_ROOT, QuestDBServer, RedisServer
from tickbridge_dev.loadgen.brain import TradeSource

pytestmark = pytest.mark.timeout(120)

SYM = "ETHUSDT"


@pytest.fixture
async def brain(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = make_client(redis_server.url)
    yield client
    await client.aclose()


async def test_book_hot_and_warm_follow_the_brain_book(
    brain: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner
) -> None:
    await ensure_group(brain, keys.DEFAULT_STREAM_KEY, keys.DEFAULT_CONSUMER_GROUP)
    settings = Settings(brain_redis_url=redis_server.url, symbols=(SYM,), consumer_name="c1")
    services.start(BrainConsumer(settings, CollectorRegistry()))
    levels = [(f"{100 - i}.00", f"{i + 1}.5") for i in range(30)]
    await feed(brain, snap(10, levels, [(f"{101 + i}.00", "2") for i in range(30)]))
    await eventually(lambda: settled(brain), what="snapshot applied")
    # Constructed twice in one process with the default registry: the second used to raise DuplicateTimeseries.
    async with TieredMarketData(settings, [SYM]) as md, TieredMarketData(settings, [SYM]) as md2:
        assert md.metrics is md2.metrics
        hot = await md.book(SYM, depth=5)
        assert hot.valid and hot.last_update_id == 10 and hot.bids == tuple(levels[:5])
        deep = await md.book(SYM, depth=25)  # deeper than the HOT copy: WARM
        assert deep.bids == tuple(levels[:25]) and deep.valid
        assert REGISTRY.get_sample_value("tickbridge_tiered_answers_total", {"tier": "hot"})
        assert REGISTRY.get_sample_value("tickbridge_tiered_answers_total", {"tier": "warm"})

        await feed(brain, diff(11, 11, [("100.00", "0"), ("100.50", "7")]))

        async def hot_at(u: int, valid: bool = True) -> bool:
            b = await md2.book(SYM, depth=3)
            return b.last_update_id == u and b.valid is valid

        await eventually(lambda: hot_at(11), timeout=5, what="HOT book follows the diff")
        b = await md2.book(SYM, depth=3)
        assert b.best_bid == ("100.50", "7") and b.bids[1] == levels[1]
        assert b == await read_book(brain, SYM, 3)
        # A break: the HOT copy turns invalid with the Brain's book; a whole book repairs both.
        await feed(brain, diff(14, 15, [("99.50", "1")]))
        await eventually(lambda: _invalid(md2), timeout=5, what="HOT book invalid after a break")
        await feed(brain, snap(20, levels, []))
        await eventually(lambda: hot_at(20), timeout=5, what="HOT book repaired")
        started = time.perf_counter()
        for _ in range(10_000):
            md2.books.get(SYM, 1)
        per_call_us = (time.perf_counter() - started) / 10_000 * 1e6
        print(f"\nHOT top of book: {per_call_us:.2f} µs per call")
        assert per_call_us < 50


async def _invalid(md: TieredMarketData) -> bool:
    b = await md.book(SYM, depth=3)
    return not b.valid and "break" in b.reason


def doc_example() -> str:
    text = (REPO_ROOT / "docs" / "brain-integration.md").read_text()
    # The guide's first Python block (the catch-up example further down has its own test).
    return re.findall(r"```python\n(.*?)```", text, re.S)[0]


async def test_brain_integration_example_runs_as_written(
    questdb_with_reader: tuple[QuestDBServer, str, str], redis_server: RedisServer, services: ServiceRunner,
    tmp_path: Path,
) -> None:  # fmt: skip
    qdb, _, reader_password = questdb_with_reader
    brain = make_client(redis_server.url)
    try:
        await ensure_group(brain, keys.DEFAULT_STREAM_KEY, keys.DEFAULT_CONSUMER_GROUP)
        settings = Settings(brain_redis_url=redis_server.url, symbols=("BTCUSDT",), consumer_name="c1")
        services.start(BrainConsumer(settings, CollectorRegistry()))
        await TradeSource(["BTCUSDT"], start_us=now_us() - 5_000_000).append(brain, keys.DEFAULT_STREAM_KEY, 50)
        book = snap(7, [("2.50", "1")], [("2.60", "3")])
        await feed(brain, type(book)("BTCUSDT", book.timestamp, 7, book.bids, book.asks, book.recv_ts))
        await eventually(lambda: settled(brain), what="trades and book written")
    finally:
        await brain.aclose()
    script = tmp_path / "example.py"
    script.write_text(doc_example())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRAIN_", "QUESTDB_", "SYMBOLS"))}
    env.update(BRAIN_REDIS_URL=redis_server.url, BRAIN_QUESTDB_PG_URL=f"postgresql://127.0.0.1:{qdb.pg_port}/qdb",
               QUESTDB_READER_USER=QUESTDB_READER, QUESTDB_READER_PASSWORD=reader_password)  # fmt: skip
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "10 recent trades from hot" in proc.stdout and "50 in the last minute" in proc.stdout, proc.stdout
    assert "book at update 7: best bid ('2.50', '1'), best ask ('2.60', '3')" in proc.stdout, proc.stdout
    # The same book for a person: `tickbridge query BTCUSDT --book`.
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "tickbridge", "query", "BTCUSDT", "--book", "5"], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "BTCUSDT order book: valid" in proc.stdout and "last update ID 7" in proc.stdout, proc.stdout
    assert "2.50" in proc.stdout and "2.60" in proc.stdout, proc.stdout
