"""Issue 16: the live lane as a process of its own (FORWARDER_LANE=ordered + FORWARDER_LANE=live).

Real redis-servers (VPS, Brain) and QuestDB; the two forwarder halves, the consumer and the writer as processes.
A backlog on the VPS replays while live trades flow, and:
1. kill -9 of the replaying forwarder: live ticks stay fresh in `recent()` (p99 <= 1 s) while it is down,
   because the lane decides from the two stream tops, not from the forwarder's memory;
2. kill -9 of the lane process itself (the forwarder still down): restarted, it re-primes within seconds
   (the gap is logged and bounded);
3. the forwarder restarted: the catch-up ends, and exactly once holds: every trade in QuestDB once, the
   per-symbol streams in trade-ID order without gaps or duplicates, and no trade twice in `recent()`/HOT.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from conftest import eventually
from test_brain_kill import Role
from test_fastforward import (
    FRESH_P99_S,
    LIVE_RATE,
    SYMBOLS,
    caught_up,
    exactly_once,
    metric,
    read_streams_then_start_writer,
    role_env,
    vps_flow,
)
from tickbridge.brain.tiered import TieredMarketData
from tickbridge.core import keys
from tickbridge.core.redis_io import make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import now_us
from tickbridge.forwarder.live_lane import LiveLane
from tickbridge.forwarder.live_process import LaneWatch
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer, free_port
from tickbridge_dev.loadgen.fastforward import FreshnessProbe, SymbolStreamWatch, percentile

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow, pytest.mark.alone]
log = logging.getLogger(__name__)

#: kill -9 of the lane process, restarted at once: every symbol fresh again (its newest tick came after the kill
#: and is <= 1 s old) within this long (a Python start on a loaded 2-core host included).
LANE_REPRIME_MAX_S = 10.0


async def all_fresh(md: TieredMarketData, limit_s: float = 1.0, since_us: int = 0) -> bool:
    """Every symbol's newest tick in `recent()` is at most `limit_s` old (and newer than `since_us`)."""
    now = now_us()
    for sym in SYMBOLS:
        answer = await md.recent(sym, 1)
        if (
            not answer.rows
            or (now - answer.rows[-1].timestamp) / 1e6 > limit_s
            or answer.rows[-1].timestamp <= since_us
        ):
            return False
    return True


async def no_trade_twice(md: TieredMarketData) -> None:
    for sym in SYMBOLS:
        ids = [r.trade_id for r in (await md.recent(sym, 100)).rows]
        assert len(ids) == len(set(ids)), f"{sym}: a trade twice in recent(): {ids}"
        hot = [r.trade_id for r in md.hot(sym)]
        assert len(hot) == len(set(hot)), f"{sym}: a trade twice in HOT"
        assert ids == sorted(ids), f"{sym}: recent() out of order"


async def test_kill9_forwarder_and_live_lane_processes_during_catch_up(
    redis_factory: Callable[..., RedisServer], questdb_factory: Callable[..., QuestDBServer], tmp_path: Path
) -> None:
    vps, brain = redis_factory(), redis_factory()
    qdb = questdb_factory()
    settings, vps_c, source = await vps_flow(vps, brain, qdb)
    stream = settings.stream_key
    await source.backlog(vps_c, stream, 300_000, start_ms=int(time.time() * 1000) - 240_000, step_ms=0.75)
    fw_port, lane_port = free_port(), free_port()
    fw_env = role_env(vps, brain, qdb, FORWARD_BATCH="5000", METRICS_PORT=str(fw_port), FORWARDER_LANE="ordered")
    forwarder = Role("forwarder", "f1", fw_env, tmp_path)
    lane_env = role_env(vps, brain, qdb, METRICS_PORT=str(lane_port), FORWARDER_LANE="live")
    lane = Role("forwarder", "live1", lane_env, tmp_path)
    env = role_env(vps, brain, qdb)
    consumer, writer = Role("consumer", "c1", env, tmp_path), Role("writer", "w1", env, tmp_path)
    stop_live = asyncio.Event()
    watch = SymbolStreamWatch(brain.url, SYMBOLS)
    md = TieredMarketData(settings, SYMBOLS, CollectorRegistry())
    try:
        async with asyncio.TaskGroup() as tg:
            live = tg.create_task(source.live(vps_c, stream, LIVE_RATE, stop_live))
            consumer.start()
            lane.start()
            forwarder.start()

            async def lane_on() -> bool:
                return await metric(lane_port, "tickbridge_forwarder_live_active") == 1

            await eventually(lane_on, 30, interval=0.1, what="the live lane process on beside the replay")
            await md.start(ready_timeout=10)
            await eventually(lambda: all_fresh(md), 15, interval=0.1, what="live ticks fresh")
            probe = FreshnessProbe(md, SYMBOLS, interval=0.5)
            for _ in range(4):  # 2 s of catch-up with both processes
                await probe.sample()
                await asyncio.sleep(0.5)
            # 1. kill -9 of the replaying forwarder: the lane goes on by itself.
            forwarder.kill9()
            for _ in range(12):
                await probe.sample()
                await asyncio.sleep(0.5)
            down_summary = probe.summary()
            assert percentile(probe.ages, 0.99) <= FRESH_P99_S, f"forwarder down: {down_summary}"
            # 2. kill -9 of the lane process (the forwarder still down), restarted at once.
            lane.kill9()
            killed, killed_us = time.monotonic(), now_us()
            lane.start()
            # Fresh again with ticks that came after the kill, so through the restarted lane.
            await eventually(lambda: all_fresh(md, since_us=killed_us), LANE_REPRIME_MAX_S, interval=0.05,
                             what="the restarted lane re-primed")  # fmt: skip
            reprime_s = time.monotonic() - killed
            # 3. the forwarder back: the catch-up ends with the lane beside it.
            forwarder.start()
            after = FreshnessProbe(md, SYMBOLS, interval=0.5)
            brain_c = make_client(brain.url)
            started = time.monotonic()
            while True:
                await after.sample()
                if await caught_up(brain_c, stream, fw_port):
                    break
                assert time.monotonic() - started < 240, "catch-up did not end"
                await asyncio.sleep(0.5)
            catchup_s = time.monotonic() - started
            sent = await metric(lane_port, "tickbridge_forwarder_live_sent_total")
            stop_live.set()
            await live
            await asyncio.sleep(1.0)
            await no_trade_twice(md)
            await read_streams_then_start_writer(watch, writer)
        log.info("forwarder down: %s; fresh again %.2fs after the lane's kill -9; after: %s (catch-up %.1fs); "
                 "lane sent %d", down_summary, reprime_s, after.summary(), catchup_s, sent)  # fmt: skip
        assert percentile(after.ages, 0.99) <= FRESH_P99_S, after.summary()
        assert sent > 0
        await exactly_once(qdb, source, watch)
        await brain_c.aclose()
    finally:
        await md.close()
        for role in (forwarder, lane, consumer, writer):
            role.stop()
        await vps_c.aclose()


async def test_a_lane_far_behind_starts_again_from_the_newest(redis_factory: Callable[..., RedisServer]) -> None:
    """A lane LIVE_JUMP_MS or more behind the newest VPS entry (a starved host, a burst faster than it) jumps to
    the newest entries: it is a view of the newest ticks, and what it skips comes by the ordered path."""
    vps, brain = redis_factory(), redis_factory()
    settings = Settings(vps_redis_url=vps.url, brain_redis_url=brain.url, symbols=SYMBOLS)
    vps_c = make_client(vps.url)
    top_ms = int(time.time() * 1000)
    start_ms = top_ms - 20_000
    for i in range(0, 3000, 500):
        async with vps_c.pipeline(transaction=False) as pipe:
            for j in range(i, i + 500):
                pipe.xadd(settings.stream_key, {"n": str(j)}, id=f"{start_ms + j * 20_000 // 3000}-{j}")
            await pipe.execute()
    watch = LaneWatch(settings, asyncio.Event())
    lane = LiveLane(watch, CollectorRegistry(), batch=100, figures=False)
    try:
        await watch.refresh()
        assert watch.brain_up and watch.vps_ready and lane.wanted()  # an empty Brain: everything is ahead
        lane.cursor = lane.start_id = (start_ms, 0)  # as if it had fallen 20 s behind
        assert await lane.step()
        assert lane.cursor is not None and lane.start_id is not None
        assert lane.cursor[0] >= top_ms - 2_000 - 100, (lane.cursor, top_ms)  # primed 2 s before the newest
        assert lane.start_id == lane.cursor
        brain_c = make_client(brain.url)
        assert await brain_c.xlen(keys.live_stream_key(settings.stream_key)) == 100
        await brain_c.aclose()
    finally:
        await lane._close()
        await watch.close()
        await vps_c.aclose()


async def test_the_lane_stays_on_until_the_consumer_group_passed_its_cursor(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """At the end of a catch-up the forwarder is done before the consumer: the lane stops only when the Brain's top
    *and* the consumer group's last-delivered ID reached its cursor (no hand-over gap to the consumer's follower)."""
    vps, brain = redis_factory(), redis_factory()
    settings = Settings(vps_redis_url=vps.url, brain_redis_url=brain.url, symbols=SYMBOLS)
    key = settings.stream_key
    vps_c, brain_c = make_client(vps.url), make_client(brain.url)
    now_ms = int(time.time() * 1000)
    ids = [f"{now_ms - 3_000 + i}-0" for i in range(0, 3_000, 100)]
    for entry_id in ids:  # the ordered path has delivered everything: both tops are equal
        await vps_c.xadd(key, {"n": entry_id}, id=entry_id)
        await brain_c.xadd(key, {"n": entry_id}, id=entry_id)
    watch = LaneWatch(settings, asyncio.Event())
    lane = LiveLane(watch, CollectorRegistry(), batch=100, figures=False)
    try:
        await watch.refresh()
        assert watch.checkpoint == (now_ms - 100, 0)  # no consumer group yet: the Brain's top alone
        await brain_c.xgroup_create(key, settings.consumer_group, id=ids[5])  # the consumer is 25 entries behind
        await watch.refresh()
        assert watch.checkpoint == (now_ms - 3_000 + 500, 0)
        lane.cursor = lane.start_id = (now_ms - 1_000, 0)
        await lane.step()
        assert lane.cursor is not None, "the lane stopped while the consumer was still behind its cursor"
        await brain_c.xgroup_setid(key, settings.consumer_group, id=ids[-1])  # the consumer caught up
        await watch.refresh()
        await lane.step()
        assert lane.cursor is None, "the lane kept running after the consumer passed its cursor"
    finally:
        await lane._close()
        await watch.close()
        await vps_c.aclose()
        await brain_c.aclose()
