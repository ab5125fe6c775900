"""Issue 18: each exchange has its own catch-up hash (`keys.catchup_key`), on real Redis servers.

Binance and Coinbase catch up at once on one Brain: each forwarder's live lane and each consumer's fast-forward
write their figures, and `TieredMarketData(exchange=)` and `tickbridge status --exchanges` report each exchange's
own figures (before, both wrote `tickbridge:catchup` and the last writer won). Binance keeps the contract's name.
The forwarder's side is a fixed view of its loop (`ForwarderView`): its figures are what the lane publishes.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from prometheus_client import CollectorRegistry
from rich.console import Console

from tickbridge.brain.fastforward import FastForward
from tickbridge.brain.tiered import TieredMarketData
from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBHttp
from tickbridge.core.redis_io import make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import TRADES_DDL, StreamId
from tickbridge.forwarder.live_lane import LiveLane
from tickbridge.ops.acl import acl_variables, render_acl
from tickbridge.ops.status import Endpoints, StatusReader
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer
from tickbridge_dev.devstack.tls import BRAIN_ACL, SecureRedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SYMBOLS = ("BTCUSD",)
#: Per exchange: VPS backlog the forwarder reports, and the consumer group's lag on the Brain stream.
FIGURES = {"binance_spot": (40_000, 6_000), "coinbase": (7_000, 300)}


@dataclass
class View:
    """The forwarder loop's figures the live lane publishes (`live_lane.ForwarderView`)."""

    settings: Settings
    key: str
    _backlog: int
    rate: float = 100.0
    brain_up: bool = True
    vps_ready: bool = True
    refused: str = ""
    checkpoint: StreamId = (0, 0)
    buffer_pending: bool = False
    _oldest_age: float = 5.0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def _buffer_part(self) -> tuple[int, StreamId | None]:
        return (0, None)


async def publish(settings: Settings, backlog: int, lag: int, lane_on: bool) -> None:
    """One exchange catching up: `lag` entries on its Brain stream not yet read by its group, then one status
    round of its live lane and of its consumer's fast-forward."""
    brain = make_client(settings.brain_redis_url)
    now_ms = int(time.time() * 1000)
    async with brain.pipeline(transaction=False) as pipe:
        for i in range(lag):
            pipe.xadd(settings.stream_key, {"n": str(i)}, id=f"{now_ms - lag + i}-1")
        await pipe.execute()
    await brain.xgroup_create(settings.stream_key, settings.consumer_group, id="0", entries_read=0)
    await brain.aclose()
    lane = LiveLane(View(settings, settings.stream_key, backlog), CollectorRegistry())
    if lane_on:  # the lane runs: its cursor and start are reported, the gap below its start is missing
        lane.cursor = lane.start_id = (now_ms - 500, 0)
    ff = FastForward(settings, CollectorRegistry(), cast(Any, None), lambda: 0, lag_min=10**9)
    try:
        await lane._status()
        await ff._status()
    finally:
        await lane._close()
        await ff.client.aclose()


async def test_two_exchanges_catching_up_report_their_own_figures(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer
) -> None:
    assert keys.catchup_key() == keys.catchup_key("binance_spot") == keys.CATCHUP == "tickbridge:catchup"
    vps, brain = redis_factory(), redis_factory()
    settings = {
        ex: Settings(exchange=ex, symbols=SYMBOLS, vps_redis_url=vps.url, brain_redis_url=brain.url,
                     brain_questdb_url=questdb_server.url)
        for ex in FIGURES
    }  # fmt: skip
    for ex, (backlog, lag) in FIGURES.items():
        await publish(settings[ex], backlog, lag, lane_on=ex == "binance_spot")

    client = make_client(brain.url)
    try:
        found = sorted(k.decode() for k in await client.keys("tickbridge:catchup*"))
        assert found == ["tickbridge:catchup", "tickbridge:catchup:coinbase"]
    finally:
        await client.aclose()

    for ex, (backlog, lag) in FIGURES.items():
        md = TieredMarketData(settings[ex], registry=CollectorRegistry(), follow=False, exchange=ex)
        try:
            state = await md.catch_up()
        finally:
            await md.close()
        assert state.active, ex
        assert (state.vps_backlog, state.brain_lag, state.backlog) == (backlog, lag, backlog + lag), ex
        # Only Binance's lane ran: only its view has a gap below the live start.
        assert (state.missing is not None) == (ex == "binance_spot"), (ex, state.missing)

    qdb = QuestDBHttp(questdb_server.url)
    try:
        await qdb.exec(TRADES_DDL)  # the status reads each exchange's rows in it
    finally:
        await qdb.close()
    ep = Endpoints(vps.url, brain.url, questdb_server.url, questdb_server.url, exchanges=tuple(FIGURES))
    reader = StatusReader(ep)
    try:
        snap = await asyncio.to_thread(reader.read)
        out = io.StringIO()
        Console(file=out, width=250).print(reader.table(snap))
    finally:
        await asyncio.to_thread(reader.close)
    v, text = snap.values, out.getvalue()
    assert "exchanges" not in snap.problems, snap.problems
    for ex, (backlog, lag) in FIGURES.items():
        line = v[f"{ex}:catchup"]
        assert f"VPS {backlog:,}" in line and f"Brain lag {lag:,}" in line, (ex, line)
        assert f"{ex}: catch-up" in text and line in text, text
    assert v["binance_spot:live_lane"].startswith("ON"), v["binance_spot:live_lane"]
    assert v["coinbase:live_lane"].startswith("idle"), v["coinbase:live_lane"]
    assert v["catchup"] == v["binance_spot:catchup"]  # the single-exchange rows: Endpoints.exchange (Binance)


async def test_the_brain_acl_covers_every_exchanges_catchup_hash(tmp_path: Path) -> None:
    """The forwarder may HSET, the consumer HSET and HGETALL, the reader and `tickbridge status`'s monitor user
    only HGETALL each exchange's hash."""
    passwords = {name: secrets.token_urlsafe(24) for name in acl_variables(BRAIN_ACL.read_text())}
    server = SecureRedisServer(aclfile=render_acl(BRAIN_ACL, tmp_path / "brain.acl", passwords), workdir=tmp_path / "r")
    server.start()
    try:
        users = {"forwarder": {"HSET"}, "consumer": {"HSET", "HGETALL"}, "reader": {"HGETALL"}, "monitor": {"HGETALL"}}
        for user, allowed in users.items():
            client = make_client(server.url_for(user, passwords[f"BRAIN_REDIS_{user.upper()}_PASSWORD"]))
            try:
                for key in (keys.catchup_key(ex) for ex in keys.EXCHANGES):
                    for command in ("HSET", "HGETALL"):
                        args = (key, "f", "1") if command == "HSET" else (key,)
                        try:
                            await client.execute_command(command, *args)
                            done = True
                        except redis.exceptions.NoPermissionError:
                            done = False
                        assert done == (command in allowed), (user, command, key)
            finally:
                await client.aclose()
    finally:
        server.stop()
