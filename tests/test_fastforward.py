"""Issue 16: trading code sees live data while a backlog replays (fast-forward), and exactly once still holds.

Real redis-servers (VPS, Brain) and QuestDB; the forwarder, the consumer and the writer as processes
(`python -m tickbridge ...`), as deployed, and `TieredMarketData` in this process as trading code would have it.
The writer starts once the catch-up is measured and the per-symbol streams are read (on 2 shared cores it and
the reader took the CPU the measure is about; the chaos scenario `brain_outage_fastforward` runs every role).

1. VPS-side backlog: the Brain is down while a backlog builds on the VPS (part spilled to the QuestDB buffer)
   and live trades keep coming; the Brain returns. From a few seconds after the return until the catch-up
   ends, `recent(symbol, 1)` answers ticks no older than the live flow (p99 <= 1 s), `catch_up()` says what is
   going on and `range()` over the gap says what is missing. Afterwards every trade is in QuestDB `trades`
   once and the per-symbol streams held each trade once, in trade-ID order.
2. Brain-side backlog (the design's "fast-forward mode (100K messages)"): the consumer is stopped while
   100,000+ entries reach the Brain, then started; live ticks are fresh again (p99 <= 1 s) while it works
   through them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from conftest import eventually
from test_brain_kill import Role
from tickbridge.brain.catchup import CatchUp
from tickbridge.brain.tiered import TieredMarketData
from tickbridge.core import keys
from tickbridge.core.groups import parse_info_pairs
from tickbridge.core.questdb_io import QuestDBHttp
from tickbridge.core.redis_io import ensure_group, execute_packed, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import TRADES_DDL
from tickbridge_dev.devstack.oracle import check_trades
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer, free_port
from tickbridge_dev.loadgen.fastforward import FlowSource, FreshnessProbe, SymbolStreamWatch, percentile

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow, pytest.mark.alone]
log = logging.getLogger(__name__)

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "TRXUSDT", "LINKUSDT",
           "DOTUSDT")  # fmt: skip
LIVE_RATE = 1000.0
FRESH_P99_S = 1.0


def role_env(vps: RedisServer, brain: RedisServer, qdb: QuestDBServer, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("BRAIN_", "VPS_", "SYMBOLS", "CONSUMER_", "WRITER_",
                                                                     "RAM_", "FORWARD"))},
        "VPS_REDIS_URL": vps.url,
        "VPS_QUESTDB_URL": qdb.url,
        "BRAIN_REDIS_URL": brain.url,
        "BRAIN_QUESTDB_URL": qdb.url,
        "SYMBOLS": ",".join(SYMBOLS),
        "METRICS_PORT": "0",
        "LOG_LEVEL": "INFO",
        **extra,
    }  # fmt: skip


def scrape(port: int, name: str, **labels: str) -> float:
    """One sample of a role's /metrics (0 if absent or unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def metric(port: int, name: str, **labels: str) -> float:
    return await asyncio.to_thread(scrape, port, name, **labels)


async def group_lag(client: Any, stream: str) -> int | None:
    (groups,) = await execute_packed(client, [["XINFO", "GROUPS", stream]])
    if isinstance(groups, BaseException):
        return None
    for g in groups:
        info = parse_info_pairs(g)
        if info[b"name"].decode() == keys.DEFAULT_CONSUMER_GROUP:
            lag = info.get(b"lag")
            return int(lag) if lag is not None else None
    return None


async def caught_up(brain_c: Any, stream: str, forwarder_port: int) -> bool:
    """The catch-up is over: the forwarder is in `direct` mode and the consumer group's lag is small."""
    lag = await group_lag(brain_c, stream)
    direct = await metric(forwarder_port, "tickbridge_forwarder_mode", mode="direct") == 1
    return direct and lag is not None and lag < 1000


async def read_streams_then_start_writer(watch: SymbolStreamWatch, writer: Role) -> None:
    """The per-symbol streams are read whole before the writer starts (it trims what it confirmed): the writer
    and this reader would otherwise take CPU from the catch-up being measured, on 2 cores."""
    await asyncio.sleep(1.0)
    watch.start()
    await asyncio.to_thread(watch.stop)
    writer.start()


async def exactly_once(qdb: QuestDBServer, source: FlowSource, watch: SymbolStreamWatch) -> None:
    """0 lost, 0 duplicated, 0 out of order per symbol in QuestDB `trades` and in the per-symbol streams."""
    expected = source.expected()

    async def in_questdb() -> bool:
        try:
            report = await asyncio.to_thread(check_trades, qdb.url, expected)
        except urllib.error.HTTPError:
            return False  # the writer has not created `trades` yet
        return report.ok

    await eventually(in_questdb, 120, interval=1.0, what="every trade in QuestDB once")
    report = await asyncio.to_thread(check_trades, qdb.url, expected)
    assert report.ok, report.summary()
    assert report.duplicated == 0 and report.out_of_order == 0
    problems = watch.problems(expected)
    assert not problems, problems


async def vps_flow(vps: RedisServer, brain: RedisServer, qdb: QuestDBServer) -> tuple[Settings, Any, FlowSource]:
    """Settings of both hosts, a VPS client and a trade source; QuestDB `trades` created (a deployed Brain has it;
    the writer, started later in these tests, would create it)."""
    settings = Settings(
        vps_redis_url=vps.url, brain_redis_url=brain.url, vps_questdb_url=qdb.url, brain_questdb_url=qdb.url,
        symbols=SYMBOLS,
    )  # fmt: skip
    http = QuestDBHttp(qdb.url)
    await http.exec(TRADES_DDL)
    await http.close()
    return settings, make_client(vps.url), FlowSource(SYMBOLS)


async def test_vps_backlog_live_ticks_fresh_while_the_replay_runs(
    redis_factory: Callable[..., RedisServer], questdb_factory: Callable[..., QuestDBServer], tmp_path: Path
) -> None:
    vps, brain = redis_factory(), redis_factory()
    qdb = questdb_factory()
    brain.stop()
    settings, vps_c, source = await vps_flow(vps, brain, qdb)
    stream = settings.stream_key
    # The backlog: the last 4 minutes before now, then live ticks on top of it.
    await source.backlog(vps_c, stream, 400_000, start_ms=int(time.time() * 1000) - 240_000, step_ms=0.5)
    port = free_port()
    env = role_env(vps, brain, qdb, RAM_BUFFER_BYTES="8000000", FORWARD_BATCH="5000", METRICS_PORT=str(port))
    forwarder = Role("forwarder", "f1", env, tmp_path)
    env = role_env(vps, brain, qdb)
    consumer, writer = Role("consumer", "c1", env, tmp_path), Role("writer", "w1", env, tmp_path)
    stop_live = asyncio.Event()
    forwarder.start()
    try:
        async with asyncio.TaskGroup() as tg:
            live = tg.create_task(source.live(vps_c, stream, LIVE_RATE, stop_live))

            async def spilled() -> bool:
                return await metric(port, "tickbridge_forwarder_spilled_total") >= 200_000

            await eventually(spilled, 120, interval=0.5, what="part of the backlog spilled to the VPS QuestDB")
            brain.start()
            restored = time.monotonic()
            consumer.start()
            brain_c = make_client(brain.url)
            watch = SymbolStreamWatch(brain.url, SYMBOLS)

            async def reconnected() -> bool:
                return await metric(port, "tickbridge_forwarder_connected", target="brain") == 1

            await eventually(reconnected, 10, interval=0.05, what="forwarder reconnected")
            reconnect_s = time.monotonic() - restored
            md = TieredMarketData(settings, SYMBOLS, CollectorRegistry())
            await md.start(ready_timeout=10)
            probe = FreshnessProbe(md, SYMBOLS, interval=0.25)
            states: list[CatchUp] = []
            diag: dict[str, list[float]] = {"lane": [], "warm": []}
            gaps: list[tuple[int, int] | None] = []
            await asyncio.sleep(max(0.0, restored + 3.0 - time.monotonic()))
            sampled_from = time.monotonic()
            while True:
                await probe.sample()
                now_ms = time.time() * 1000
                top_r, warm_r = await execute_packed(brain_c, [["XREVRANGE", keys.live_stream_key(stream), "+", "-",
                    "COUNT", 1], ["ZRANGE", keys.warm_key(SYMBOLS[0]), -1, -1, "WITHSCORES"]])  # fmt: skip
                if top_r:
                    diag["lane"].append((now_ms - int(top_r[0][0].split(b"-")[0])) / 1000)
                if warm_r:
                    diag["warm"].append(
                        (now_ms - float(warm_r[0][1] if isinstance(warm_r[0], list) else warm_r[1]) / 1000) / 1000
                    )
                state = await md.catch_up()
                states.append(state)
                if state.missing is not None and len(gaps) < 3:
                    lo, hi = state.missing
                    answer = await md.range(SYMBOLS[0], lo - 1_000_000, hi + 1_000_000)
                    gaps.append(answer.missing)
                if await caught_up(brain_c, stream, port):
                    break
                assert time.monotonic() - sampled_from < 240, "catch-up did not end"
                await asyncio.sleep(0.1)  # a fast catch-up still gives >= 8 rounds of samples
            catchup_s = time.monotonic() - restored
            live_sent = await metric(port, "tickbridge_forwarder_live_sent_total")
            stop_live.set()
            await live
            await read_streams_then_start_writer(watch, writer)
        log.info("reconnect %.2fs, catch-up %.1fs, freshness %s, live lane sent %d", reconnect_s, catchup_s,
                 probe.summary(), live_sent)  # fmt: skip
        await md.close()
        for k, v in diag.items():
            log.info("diag %s: p50 %.3f p99 %.3f n %d", k, percentile(v, 0.5), percentile(v, 0.99), len(v))
        assert reconnect_s <= 2.0, f"the forwarder reconnected {reconnect_s:.2f}s after the Brain returned"
        assert len(probe.ages) >= len(SYMBOLS) * 8, f"too short a catch-up to measure: {probe.summary()}"
        assert percentile(probe.ages, 0.99) <= FRESH_P99_S, probe.summary()
        assert live_sent > 0
        assert any(s.active and s.backlog > 0 for s in states), states[:3]
        assert gaps and all(g is not None for g in gaps), gaps
        await exactly_once(qdb, source, watch)
        final = await md_state(settings)
        assert final.missing is None and not final.active, final
    finally:
        for role in (forwarder, consumer, writer):
            role.stop()
        await vps_c.aclose()


async def md_state(settings: Settings) -> CatchUp:
    async with TieredMarketData(settings, SYMBOLS, CollectorRegistry(), follow=False) as md:
        return await md.catch_up()


async def test_brain_backlog_100k_live_ticks_fresh_while_the_consumer_catches_up(
    redis_server: RedisServer, questdb_factory: Callable[..., QuestDBServer], tmp_path: Path
) -> None:
    """The design's "fast-forward mode (100K messages)": the backlog sits on the Brain itself."""
    brain, qdb = redis_server, questdb_factory()
    settings = Settings(brain_redis_url=brain.url, brain_questdb_url=qdb.url, symbols=SYMBOLS)
    brain_c = make_client(brain.url)
    stream = settings.stream_key
    await ensure_group(brain_c, stream, settings.consumer_group)
    source = FlowSource(SYMBOLS)
    stop_live = asyncio.Event()
    env = role_env(brain, brain, qdb)
    consumer, writer = Role("consumer", "c1", env, tmp_path), Role("writer", "w1", env, tmp_path)
    watch = SymbolStreamWatch(brain.url, SYMBOLS)
    try:
        async with asyncio.TaskGroup() as tg:
            # 600,000 entries reach the Brain while no consumer runs (the last minute), then live ones follow.
            await source.backlog(brain_c, stream, 600_000, start_ms=int(time.time() * 1000) - 60_000, step_ms=0.09)
            live = tg.create_task(source.live(brain_c, stream, LIVE_RATE, stop_live))
            await asyncio.sleep(1.0)
            lag = await group_lag(brain_c, stream)
            assert lag is not None and lag >= 100_000, lag
            consumer.start()
            started = time.monotonic()
            md = TieredMarketData(settings, SYMBOLS, CollectorRegistry())
            await md.start(ready_timeout=10)
            probe = FreshnessProbe(md, SYMBOLS, interval=0.25)
            states: list[CatchUp] = []
            await asyncio.sleep(max(0.0, started + 2.0 - time.monotonic()))
            while True:
                await probe.sample()
                states.append(await md.catch_up())
                lag = await group_lag(brain_c, stream)
                if lag is not None and lag < 1000:
                    break
                assert time.monotonic() - started < 240, "the consumer did not catch up"
                await asyncio.sleep(0.25)
            catchup_s = time.monotonic() - started
            stop_live.set()
            await live
            await read_streams_then_start_writer(watch, writer)
        log.info("Brain-side catch-up %.1fs, freshness %s", catchup_s, probe.summary())
        await md.close()
        assert len(probe.ages) >= len(SYMBOLS) * 8, f"too short a catch-up to measure: {probe.summary()}"
        assert percentile(probe.ages, 0.99) <= FRESH_P99_S, probe.summary()
        assert any(s.active and s.brain_lag >= 5000 and s.missing is not None for s in states), states[:3]
        await exactly_once(qdb, source, watch)
    finally:
        consumer.stop()
        writer.stop()
        await brain_c.aclose()
