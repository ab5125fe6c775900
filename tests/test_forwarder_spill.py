"""Long outages: the backlog spills to the QuestDB buffer, replays oldest first; the disk budget drops the oldest."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.exceptions import OutOfMemoryError

from conftest import equals, eventually
from test_forwarder_flow import make_settings, running, sample
from tickbridge.core import keys
from tickbridge.core.redis_io import execute_packed, make_client
from tickbridge.core.wire import parse_stream_id
from tickbridge.devstack.servers import QuestDBServer, RedisServer
from tickbridge.forwarder.buffer import SpillBuffer
from tickbridge.forwarder.loadgen import LiveWriter, preload, read_stream, trade_fields, verify
from tickbridge.forwarder.service import Forwarder

pytestmark = pytest.mark.timeout(180)
HOUR_MS = 3_600_000


async def test_spill_200k_then_replay_in_order(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer
) -> None:
    """1. Brain down. 2. 210k ticks backlog + live ticks, RAM budget 1 MB: >= 200k go to QuestDB.
    3. Brain back: buffer replayed first, then Redis, while live ticks keep arriving.
    Result: every VPS ID once, strictly increasing, byte-identical."""
    vps, brain = redis_factory(), redis_factory()
    brain.stop()
    settings = make_settings(vps, brain, questdb_server, ram_buffer_bytes=1_000_000, forward_batch=5000)
    vps_c = make_client(vps.url)
    n = 210_000
    start = (int(time.time() * 1000) - HOUR_MS, 0)
    ids = await preload(vps_c, settings.stream_key, n, start=start, step_ms=0.02)
    expected: dict[bytes, list[bytes] | None] = {eid: trade_fields(i) for i, eid in enumerate(ids)}
    registry = CollectorRegistry()
    table = f"vb_{uuid.uuid4().hex[:8]}"
    fw = Forwarder(settings, registry, buffer_table=table)
    writer = LiveWriter(vps_c, settings.stream_key, rate=1000)
    stop_writer = asyncio.Event()
    async with running(fw), asyncio.TaskGroup() as tg:
        tg.create_task(writer.run(stop_writer))

        async def spilled() -> bool:
            return sample(registry, "tickbridge_forwarder_spilled_total") >= 200_000

        await eventually(spilled, 90, interval=0.2, what=">= 200k ticks spilled to QuestDB")

        async def disk_mode() -> bool:
            return sample(registry, "tickbridge_forwarder_mode", mode="disk_spill") == 1

        await eventually(disk_mode, 5, what="disk_spill mode")

        async def within_budget() -> bool:
            return int(await vps_c.memory_usage(settings.stream_key) or 0) <= settings.ram_buffer_bytes

        await eventually(within_budget, 20, what="VPS stream back under RAM_BUFFER_BYTES")

        async def stats_seen() -> bool:
            return sample(registry, "tickbridge_forwarder_buffer_rows") >= 200_000

        await eventually(stats_seen, 10, what="buffer rows metric")
        assert sample(registry, "tickbridge_forwarder_buffer_bytes") > 0
        assert sample(registry, "tickbridge_forwarder_backlog_entries") >= 200_000
        assert sample(registry, "tickbridge_forwarder_backlog_oldest_age_seconds") >= 3500
        brain.start()
        brain_c = make_client(brain.url)

        async def replaying() -> bool:
            return sample(registry, "tickbridge_forwarder_replayed_total") > 0

        await eventually(replaying, 30, what="replay started")

        async def caught_up() -> bool:
            return sample(registry, "tickbridge_forwarder_mode", mode="direct") == 1

        await eventually(caught_up, 60, interval=0.2, what="replay finished")
        stop_writer.set()
    total = n + len(writer.acked)

    async def drained() -> bool:
        return int(await brain_c.xlen(settings.stream_key)) >= total

    async with running(Forwarder(settings, CollectorRegistry(), buffer_table=table)):
        await eventually(drained, 30, what="every tick on the Brain")
    expected.update({eid: None for _, eid in writer.acked})
    verdict = verify(await read_stream(brain_c, settings.stream_key), expected)
    assert verdict.ok, (verdict.missing[:5], verdict)
    assert verdict.delivered == total
    assert sample(registry, "tickbridge_forwarder_replayed_total") >= 200_000
    # Every row is delivered, so every partition goes, the writer's current hour included: the buffer ends
    # empty whatever the minute of the hour (the next spill gets a ts above the cursor, a fresh partition).
    buf = SpillBuffer(questdb_server.url, table=table)

    async def cleaned() -> bool:
        return not [p for p in await buf.partitions() if p.rows]

    async with running(Forwarder(settings, CollectorRegistry(), buffer_table=table)):
        await eventually(cleaned, 120, what="delivered buffer partitions dropped")  # drops are async (WAL)
    await buf.close()
    await vps_c.aclose()
    await brain_c.aclose()


async def test_spill_again_after_the_buffer_was_emptied(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer
) -> None:
    """Two outages within one hour, one forwarder throughout: the first spill is delivered and its partition
    dropped (the writer's head partition too); the second spill lands in the same hour again and arrives
    whole. Guards the cleanup rule "drop every partition at or below the cursor"."""
    vps, brain = redis_factory(), redis_factory(appendonly=True)
    brain.stop()
    settings = make_settings(vps, brain, questdb_server, ram_buffer_bytes=300_000, forward_batch=5000)
    vps_c = make_client(vps.url)
    n = 30_000
    first = await preload(vps_c, settings.stream_key, n, step_ms=0.01)
    table = f"vb_{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    buf = SpillBuffer(questdb_server.url, table=table)

    async def buffer_empty() -> bool:
        return not [p for p in await buf.partitions() if p.rows]

    async with running(Forwarder(settings, registry, buffer_table=table)):

        async def spilled(count: int) -> bool:
            return sample(registry, "tickbridge_forwarder_spilled_total") >= count

        await eventually(lambda: spilled(n // 2), 60, what="first outage spilled")
        brain.start()
        brain_c = make_client(brain.url)

        async def delivered(count: int) -> bool:
            return int(await brain_c.xlen(settings.stream_key)) >= count

        await eventually(lambda: delivered(n), 60, what="first backlog delivered")
        await eventually(buffer_empty, 60, what="first spill's partitions dropped")
        await brain_c.aclose()
        brain.stop()
        top = parse_stream_id(first[-1])
        second = await preload(vps_c, settings.stream_key, n, start=(top[0] + 1, 0), step_ms=0.01)
        already = sample(registry, "tickbridge_forwarder_spilled_total")
        await eventually(lambda: spilled(already + n // 2), 60, what="second outage spilled")
        brain.start()
        brain_c = make_client(brain.url)
        await eventually(lambda: delivered(2 * n), 60, what="second backlog delivered")
    expected: dict[bytes, list[bytes] | None] = {eid: trade_fields(i) for i, eid in enumerate(first)}
    expected.update({eid: trade_fields(i) for i, eid in enumerate(second)})
    verdict = verify(await read_stream(brain_c, settings.stream_key), expected)
    assert verdict.ok, (verdict.missing[:5], verdict)
    assert verdict.delivered == 2 * n
    await buf.close()
    await vps_c.aclose()
    await brain_c.aclose()


async def test_disk_budget_drops_oldest_counted(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A backlog over 4 hourly partitions; the disk budget fits two: the two oldest hours are dropped,
    counted and logged; the rest arrives in order."""
    vps, brain = redis_factory(), redis_factory()
    brain.stop()
    settings = make_settings(vps, brain, questdb_server, ram_buffer_bytes=200_000, forward_batch=5000)
    vps_c = make_client(vps.url)
    hour0 = (int(time.time() * 1000) // HOUR_MS - 6) * HOUR_MS
    per_hour = 10_000
    ids = await preload(vps_c, settings.stream_key, 4 * per_hour, start=(hour0, 0), step_ms=HOUR_MS / per_hour)
    table = f"vb_{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    async with running(Forwarder(settings, registry, buffer_table=table)):

        async def spilled() -> bool:
            return sample(registry, "tickbridge_forwarder_spilled_total") >= 4 * per_hour - 2000

        await eventually(spilled, 60, what="backlog spilled")
    buf = SpillBuffer(questdb_server.url, table=table)
    parts = await buf.partitions()
    assert len(parts) == 4, parts
    budget = parts[2].disk_bytes + parts[3].disk_bytes + 1
    settings = settings.model_copy(update={"disk_buffer_bytes": budget})
    registry = CollectorRegistry()
    with caplog.at_level(logging.ERROR):
        async with running(Forwarder(settings, registry, buffer_table=table)):

            async def dropped() -> bool:
                return sample(registry, "tickbridge_forwarder_dropped_total") >= parts[0].rows + parts[1].rows

            await eventually(dropped, 30, what="oldest partitions dropped")
            brain.start()
            brain_c = make_client(brain.url)
            rest = len(ids) - parts[0].rows - parts[1].rows

            async def delivered() -> bool:
                return int(await brain_c.xlen(settings.stream_key)) >= rest

            await eventually(delivered, 60, what="the rest delivered")
    assert sample(registry, "tickbridge_forwarder_dropped_total") == parts[0].rows + parts[1].rows == 2 * per_hour
    assert any("DISK BUFFER FULL" in r.getMessage() for r in caplog.records)
    assert (await vps_c.hget(keys.FORWARDER_STATE, "dropped_total")) == str(2 * per_hour).encode()
    restarted = Forwarder(settings, CollectorRegistry(), buffer_table=table)
    await restarted._recover_vps()  # the lifetime count survives a restart (the next drop adds to it)
    assert restarted.dropped_total == 2 * per_hour
    await restarted._close()
    kept = {eid: trade_fields(i) for i, eid in enumerate(ids) if i >= 2 * per_hour}
    verdict = verify(await read_stream(brain_c, settings.stream_key), kept)  # type: ignore[arg-type]
    assert verdict.ok, verdict
    await buf.close()
    await vps_c.aclose()
    await brain_c.aclose()


async def test_brain_lost_writes_are_resent(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer
) -> None:
    """The Brain Redis restarts empty (no persistence): its top is behind the checkpoint; the forwarder
    rewinds and resends from the VPS copy kept for `delivered_retention_s`."""
    vps, brain = redis_factory(), redis_factory()
    settings = make_settings(vps, brain, questdb_server, delivered_retention_s=60)
    vps_c = make_client(vps.url)
    ids = await preload(vps_c, settings.stream_key, 3000)
    registry = CollectorRegistry()
    async with running(Forwarder(settings, registry, buffer_table=f"vb_{uuid.uuid4().hex[:8]}")):
        brain_c = make_client(brain.url)

        async def delivered() -> bool:
            return int(await brain_c.xlen(settings.stream_key)) >= len(ids)

        await eventually(delivered, 30, what="first delivery")
        await brain_c.aclose()
        brain.kill9()
        brain.start()
        brain_c = make_client(brain.url)

        async def rewound() -> bool:
            return sample(registry, "tickbridge_forwarder_rewinds_total") >= 1

        await eventually(rewound, 30, what="rewind detected")
        await eventually(delivered, 30, what="resent after the Brain lost its data")
    verdict = verify(await read_stream(brain_c, settings.stream_key), {e: trade_fields(i) for i, e in enumerate(ids)})
    assert verdict.ok, verdict
    await vps_c.aclose()
    await brain_c.aclose()


async def test_spill_during_the_last_replay_page_is_replayed_too(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer
) -> None:
    """The read-ahead of the page after a full last page comes back empty. If a spill lands before that
    empty page is used, it must not end the replay: the new rows were skipped, never sent nor counted.
    (In production every spill over the budget is 4 x 50,000 rows, a multiple of the 20,000-row page, so
    the last page is always full.) Live ticks arrive while the second (last) page is in flight."""
    vps, brain = redis_factory(), redis_factory()
    brain.stop()
    settings = make_settings(vps, brain, questdb_server, ram_buffer_bytes=1)
    vps_c = make_client(vps.url)
    ids = await preload(vps_c, settings.stream_key, 40_000, step_ms=0.01)
    expected: dict[bytes, list[bytes] | None] = {eid: trade_fields(i) for i, eid in enumerate(ids)}
    registry = CollectorRegistry()
    fw = Forwarder(settings, registry, buffer_table=f"vb_{uuid.uuid4().hex[:8]}", spill_batch=10_000,
                   replay_batch=20_000)  # fmt: skip
    live: list[bytes] = []
    pages = 0
    send = fw.brain_raw.execute

    async def send_then_tick(commands: Any) -> Any:
        nonlocal pages
        replies = await send(commands)
        if len(commands) == 20_000:
            pages += 1
            if pages == 2:  # the empty read-ahead is out; new ticks, then a step with maintenance (spill)
                batch = [(b"XADD", settings.stream_key, b"*", *trade_fields(500_000 + k)) for k in range(5000)]
                live.extend(await execute_packed(vps_c, batch))
                await asyncio.sleep(fw.maintain_interval * 1.5)
        return replies

    fw.brain_raw.execute = send_then_tick  # type: ignore[method-assign]
    async with running(fw):

        async def spilled() -> bool:
            return sample(registry, "tickbridge_forwarder_spilled_total") >= 40_000

        await eventually(spilled, 60, interval=0.2, what="40k spilled")
        brain.start()
        brain_c = make_client(brain.url)

        async def delivered() -> bool:
            return pages >= 2 and int(await brain_c.xlen(settings.stream_key)) >= 45_000

        await eventually(delivered, 60, interval=0.2, what="the backlog and the live ticks on the Brain")
    assert len(live) == 5000
    expected.update({eid: None for eid in live})
    verdict = verify(await read_stream(brain_c, settings.stream_key), expected)
    assert verdict.ok, (verdict.missing[:5], verdict)
    assert sample(registry, "tickbridge_forwarder_spilled_total") == 45_000
    assert sample(registry, "tickbridge_forwarder_replayed_total") == 45_000
    await vps_c.aclose()
    await brain_c.aclose()


async def _fill_until_full(client: Any, key: str, start: int) -> list[bytes]:
    """Append like the collector until the VPS Redis refuses with OOM; the IDs it accepted."""
    accepted: list[bytes] = []
    i = start
    while True:
        replies = await execute_packed(client, [(b"XADD", key, b"*", *trade_fields(i + k)) for k in range(500)])
        i += 500
        accepted += [r for r in replies if not isinstance(r, Exception)]
        refused = [r for r in replies if isinstance(r, Exception)]
        if refused:
            assert isinstance(refused[0], OutOfMemoryError), refused[0]
            return accepted
        await asyncio.sleep(0.02)  # a collector's pace: the forwarder's maintenance sees the budget pass


@pytest.mark.parametrize("first_back", ["questdb", "brain"])
async def test_full_vps_redis_drains_when_questdb_or_the_brain_is_back(
    redis_factory: Callable[..., RedisServer], questdb_factory: Callable[..., QuestDBServer], first_back: str
) -> None:
    """Brain and VPS QuestDB both down: the stream passes RAM_BUFFER_BYTES and then Redis' maxmemory, so Redis
    refuses every write (OOM), the forwarder's state writes too. When QuestDB (or the Brain) comes back the
    forwarder must free the memory: it used to exit on the refused HSET, and crash-loop for good. Then
    every accepted tick reaches the Brain once, in order, and the collector can write again."""
    vps, brain = redis_factory(extra=["--maxmemory", "24mb"]), redis_factory()
    qdb = questdb_factory()
    brain.stop()
    qdb.stop()
    settings = make_settings(vps, brain, qdb, ram_buffer_bytes=6_000_000)
    vps_c = make_client(vps.url)
    registry = CollectorRegistry()
    async with running(Forwarder(settings, registry, buffer_table=f"vb_{uuid.uuid4().hex[:8]}")) as fw:
        accepted = await _fill_until_full(vps_c, settings.stream_key, 0)
        await asyncio.sleep(1.0)  # the forwarder meets the refusals (state writes, mode) and must stay up
        (qdb if first_back == "questdb" else brain).start()

        async def room_again() -> bool:
            """A whole batch accepted (a single entry may slip in as Redis' own buffers shrink)."""
            batch = [(b"XADD", settings.stream_key, b"*", *trade_fields(10**6 + k)) for k in range(2000)]
            replies = await execute_packed(vps_c, batch)
            accepted.extend(r for r in replies if not isinstance(r, Exception))
            return not any(isinstance(r, Exception) for r in replies)

        if first_back == "questdb":

            async def spilled() -> bool:
                return sample(registry, "tickbridge_forwarder_spilled_total") > 0

            await eventually(spilled, 60, interval=0.5, what="a spill into the QuestDB that came back")
        await eventually(room_again, 60, interval=0.5, what="room in the VPS Redis again")
        if first_back == "questdb":
            brain.start()
        brain_c = make_client(brain.url)

        async def delivered() -> bool:
            return bool(await brain_c.exists(settings.stream_key)) and int(
                await brain_c.xlen(settings.stream_key)
            ) >= len(accepted)

        await eventually(delivered, 90, interval=0.5, what="every accepted tick on the Brain")
        assert not fw.stopping.is_set()
    verdict = verify(await read_stream(brain_c, settings.stream_key), dict.fromkeys(accepted))
    assert verdict.ok, (verdict.missing[:5], verdict)
    assert verdict.delivered == len(accepted)
    assert sample(registry, "tickbridge_forwarder_dropped_total") == 0
    await vps_c.aclose()
    await brain_c.aclose()


async def test_questdb_down_at_start_is_noticed_when_it_comes_back(
    redis_factory: Callable[..., RedisServer], questdb_factory: Callable[..., QuestDBServer]
) -> None:
    """Nothing pending, QuestDB down when the forwarder starts: once QuestDB is up, `connected{questdb}`
    turns 1 and the buffer is known (gauges, cleanup), without waiting for the next spill. Delivery to the
    Brain never waited for QuestDB."""
    vps, brain = redis_factory(), redis_factory()
    qdb = questdb_factory()
    qdb.stop()
    settings = make_settings(vps, brain, qdb)
    vps_c, brain_c = make_client(vps.url), make_client(brain.url)
    await preload(vps_c, settings.stream_key, 1000)
    registry = CollectorRegistry()
    async with running(Forwarder(settings, registry, buffer_table=f"vb_{uuid.uuid4().hex[:8]}")) as fw:
        await eventually(lambda: equals(brain_c.xlen(settings.stream_key), 1000), 20, what="delivered without QuestDB")
        assert sample(registry, "tickbridge_forwarder_connected", target="questdb") == 0
        qdb.start()

        async def noticed() -> bool:
            return fw.buffer_known and sample(registry, "tickbridge_forwarder_connected", target="questdb") == 1

        await eventually(noticed, 30, what="QuestDB noticed")
    await vps_c.aclose()
    await brain_c.aclose()
