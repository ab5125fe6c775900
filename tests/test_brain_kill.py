"""Acceptance: kill -9 of consumers and writer at random instants plus a QuestDB restart, under a steady flow.

1. Real redis-server and QuestDB; two consumer processes and one writer process (`python -m tickbridge ...`).
2. A generator appends contiguous trade IDs for three symbols to the Brain stream (~1,000 ticks/s, ~40 s).
3. Meanwhile 10 `kill -9` of a consumer and 10 of the writer at random instants (each restarted at once),
   and one QuestDB restart.
Result: the contract's check query gives count == count_distinct == max - min + 1 == appended for every
symbol, min(trade_id) is 1, and nothing went to the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from conftest import eventually
from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBHttp
from tickbridge.core.redis_io import ensure_group, make_client
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer
from tickbridge_dev.loadgen.brain import TradeSource

pytestmark = [pytest.mark.timeout(180), pytest.mark.chaos, pytest.mark.slow]

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
FLOW_SECONDS = 40.0
KILLS_EACH = 10


class Role:
    """One role subprocess that can be kill -9'd and restarted with the same name (takes back its PEL)."""

    def __init__(self, role: str, name: str, env: dict[str, str], logdir: Path) -> None:
        self.role, self.name = role, name
        self.env = {**env, "CONSUMER_NAME": name}
        self.log = logdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tickbridge", self.role], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


@pytest.fixture
async def roles(
    redis_server: RedisServer, questdb_factory: Callable[..., QuestDBServer], tmp_path: Path
) -> AsyncIterator[tuple[list[Role], QuestDBServer]]:
    qserver = questdb_factory()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("BRAIN_", "SYMBOLS", "CONSUMER_", "WRITER_"))},
        "BRAIN_REDIS_URL": redis_server.url,
        "BRAIN_QUESTDB_URL": qserver.url,
        "SYMBOLS": ",".join(SYMBOLS),
        "METRICS_PORT": "0",
        "CONSUMER_CLAIM_IDLE_MS": "1000",
        "CONSUMER_BATCH": "500",
        "WRITER_FLUSH_INTERVAL_S": "0.2",
        "WRITER_BATCH_ROWS": "2000",
        "LOG_LEVEL": "WARNING",
    }
    made = [
        Role("consumer", "c1", env, tmp_path),
        Role("consumer", "c2", env, tmp_path),
        Role("writer", "w1", env, tmp_path),
    ]
    yield made, qserver
    for role in made:
        role.stop()


async def test_kill9_consumers_and_writer_and_questdb_restart_exactly_once(
    roles: tuple[list[Role], QuestDBServer], redis_server: RedisServer
) -> None:
    procs, qserver = roles
    c1, c2, writer = procs
    brain = make_client(redis_server.url)
    qdb = QuestDBHttp(qserver.url)
    await ensure_group(brain, keys.DEFAULT_STREAM_KEY, keys.DEFAULT_CONSUMER_GROUP)
    for role in procs:
        role.start()
    source = TradeSource(SYMBOLS)
    rng = random.Random()
    loop = asyncio.get_running_loop()
    flow_end = loop.time() + FLOW_SECONDS

    async def flow() -> None:
        while loop.time() < flow_end:
            await source.append(brain, keys.DEFAULT_STREAM_KEY, 10, live=True)
            await asyncio.sleep(0.01)

    async def killer(targets: list[Role]) -> None:
        instants = sorted(rng.uniform(1.0, FLOW_SECONDS - 2.0) for _ in range(KILLS_EACH))
        start = loop.time()
        for i, at in enumerate(instants):
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            target = targets[i % len(targets)]
            target.kill9()
            target.start()

    async def restart_questdb() -> None:
        await asyncio.sleep(FLOW_SECONDS / 2)
        await asyncio.to_thread(qserver.restart)

    try:
        await asyncio.gather(flow(), killer([c1, c2]), killer([writer]), restart_questdb())
        expected = source.counts()
        assert sum(expected.values()) > 10_000  # a steady flow even on a loaded machine
        assert c1.kills + c2.kills == KILLS_EACH and writer.kills == KILLS_EACH

        async def exactly_once() -> bool:
            try:
                await qdb.wait_applied("trades", timeout=5)
                rows = await qdb.rows(
                    "SELECT symbol, count(), count_distinct(trade_id), max(trade_id) - min(trade_id) + 1, "
                    "min(trade_id) FROM trades GROUP BY symbol"
                )
            except Exception:
                return False
            got = {r[0]: [int(x) for x in r[1:]] for r in rows}
            return got == {sym: [n, n, n, 1] for sym, n in expected.items()}

        await eventually(exactly_once, timeout=60, interval=0.5, what="every trade exactly once in QuestDB")
        assert await brain.xlen(keys.CONSUMER_DEAD_LETTER) == 0
        for role in procs:  # SIGTERM: a clean stop, exit 0
            assert role.stop() == 0, role.log.read_text()[-2000:]
    finally:
        await brain.aclose()
        await qdb.close()
