"""What comes back from the QuestDB buffer is checked against what went in (issue 14, items 4 and 6):
rows lost from `vps_buffer` during an outage are reported with their range; a corrupt row is quarantined
and the replay goes on; the backlog gauges stay true while the Brain link swallows packets."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from conftest import eventually
from test_forwarder_flow import make_settings, running, sample
from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBError
from tickbridge.core.redis_io import make_client
from tickbridge.core.wire import parse_stream_id
from tickbridge.devstack.servers import QuestDBServer, RedisServer, ToxiproxyServer, free_port
from tickbridge.forwarder.buffer import SpillBuffer
from tickbridge.forwarder.ledger import LEDGER_MAX, Ledger, segments
from tickbridge.forwarder.loadgen import LiveWriter, preload, read_stream, trade_fields, verify
from tickbridge.forwarder.service import Forwarder

pytestmark = pytest.mark.timeout(180)
HOUR_MS = 3_600_000


async def _spill_all(registry: CollectorRegistry, count: int) -> None:
    async def spilled() -> bool:
        return sample(registry, "tickbridge_forwarder_spilled_total") >= count

    await eventually(spilled, 60, interval=0.2, what=f"{count} entries spilled")


async def test_rows_lost_from_the_buffer_are_reported_with_their_range(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Three hours spilled; the middle hour's partition vanishes during the outage (DROP PARTITION by hand,
    as a lost partition or disk fault would). The replay reports those 5,000 entries as missing, with their
    exact first and last IDs (counter, log line, state hash), not as dropped; the other hours arrive once,
    in order."""
    vps, brain = redis_factory(), redis_factory()
    brain.stop()
    settings = make_settings(vps, brain, questdb_server, ram_buffer_bytes=1, forward_batch=5000)
    vps_c = make_client(vps.url)
    hour0 = (int(time.time() * 1000) // HOUR_MS - 5) * HOUR_MS
    per_hour = 5000
    ids = await preload(vps_c, settings.stream_key, 3 * per_hour, start=(hour0, 0), step_ms=HOUR_MS / per_hour)
    table = f"vb_{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    buf = SpillBuffer(questdb_server.url, table=table)
    with caplog.at_level(logging.INFO):
        async with running(Forwarder(settings, registry, buffer_table=table)):
            await _spill_all(registry, 3 * per_hour)
            parts = await buf.partitions()
            assert len(parts) == 3, parts
            await buf.http.exec(f"ALTER TABLE {table} DROP PARTITION LIST '{parts[1].name}'")
            await buf.http.wait_applied(table)
            brain.start()
            brain_c = make_client(brain.url)

            async def delivered() -> bool:
                return int(await brain_c.xlen(settings.stream_key)) >= 2 * per_hour

            await eventually(delivered, 60, what="the two remaining hours delivered")

            async def reported() -> bool:
                return sample(registry, "tickbridge_forwarder_buffer_missing_total") >= per_hour

            await eventually(reported, 20, what="the lost hour counted as missing")
    lost = ids[per_hour : 2 * per_hour]
    assert sample(registry, "tickbridge_forwarder_buffer_missing_total") == per_hour
    assert sample(registry, "tickbridge_forwarder_dropped_total") == 0
    lines = [r.getMessage() for r in caplog.records if "BUFFER ROWS MISSING" in r.getMessage()]
    assert lines, "no BUFFER ROWS MISSING log line"
    assert any(lost[0].decode() in line and lost[-1].decode() in line for line in lines), lines
    state = await vps_c.hgetall(keys.FORWARDER_STATE)
    assert state[b"missing_total"] == str(per_hour).encode()
    assert lost[0] in state[b"missing_last_range"] and lost[-1] in state[b"missing_last_range"]
    kept = {eid: trade_fields(i) for i, eid in enumerate(ids) if not per_hour <= i < 2 * per_hour}
    verdict = verify(await read_stream(brain_c, settings.stream_key), kept)  # type: ignore[arg-type]
    assert verdict.ok, (verdict.missing[:5], verdict)
    assert verdict.delivered == 2 * per_hour
    # Verified batches leave the ledger: it holds only what is still owed.
    assert await vps_c.hlen(keys.FORWARDER_LEDGER) == 0
    await buf.close()
    await vps_c.aclose()
    await brain_c.aclose()


async def test_ledger_survives_a_restart_and_reports_a_truncated_buffer(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The forwarder spills, stops; the buffer table is truncated while it is away; a new forwarder (the
    ledger read back from VPS Redis) reports every spilled entry as missing, then carries on with Redis."""
    vps, brain = redis_factory(), redis_factory()
    brain.stop()
    settings = make_settings(vps, brain, questdb_server, ram_buffer_bytes=1, forward_batch=5000)
    vps_c = make_client(vps.url)
    ids = await preload(vps_c, settings.stream_key, 8000, step_ms=0.05)
    table = f"vb_{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    async with running(Forwarder(settings, registry, buffer_table=table)):
        await _spill_all(registry, 8000)
    assert await vps_c.hlen(keys.FORWARDER_LEDGER) > 0
    buf = SpillBuffer(questdb_server.url, table=table)
    await buf.http.exec(f"TRUNCATE TABLE {table}")
    await buf.http.wait_applied(table)
    later = await preload(vps_c, settings.stream_key, 1000, start=(parse_stream_id(ids[-1])[0] + 1, 0), step_ms=0.05)
    brain.start()
    brain_c = make_client(brain.url)
    registry = CollectorRegistry()
    with caplog.at_level(logging.INFO):
        async with running(Forwarder(settings.model_copy(update={"ram_buffer_bytes": 10**9}), registry,
                                     buffer_table=table)):  # fmt: skip

            async def reported() -> bool:
                return sample(registry, "tickbridge_forwarder_buffer_missing_total") >= 8000

            await eventually(reported, 30, what="the truncated rows counted as missing")

            async def delivered() -> bool:
                return int(await brain_c.xlen(settings.stream_key)) >= len(later)

            await eventually(delivered, 30, what="the entries still in Redis delivered")
    assert sample(registry, "tickbridge_forwarder_buffer_missing_total") == 8000
    lines = [r.getMessage() for r in caplog.records if "BUFFER ROWS MISSING" in r.getMessage()]
    assert any(ids[0].decode() in line for line in lines), lines
    assert any(ids[-1].decode() in line for line in lines), lines
    verdict = verify(await read_stream(brain_c, settings.stream_key), {e: None for e in later})
    assert verdict.ok, verdict
    await buf.close()
    await vps_c.aclose()
    await brain_c.aclose()


async def test_corrupt_buffer_rows_are_quarantined_and_the_replay_goes_on(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A row whose payload is garbage, a row whose payload is not a field list, and a foreign row (an ID the
    forwarder never spilled, far in the future) are quarantined: counted, logged with their IDs, copied to
    the bounded dead-letter hash. Every other entry reaches the Brain once, in order; nothing crashes."""
    vps, brain = redis_factory(), redis_factory()
    brain.stop()
    settings = make_settings(vps, brain, questdb_server, ram_buffer_bytes=1, forward_batch=2000)
    vps_c = make_client(vps.url)
    ids = await preload(vps_c, settings.stream_key, 6000, step_ms=0.05)
    table = f"vb_{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    buf = SpillBuffer(questdb_server.url, table=table)
    garbage, odd = parse_stream_id(ids[1000]), parse_stream_id(ids[4000])
    with caplog.at_level(logging.INFO):
        async with running(Forwarder(settings, registry, buffer_table=table)) as fw:
            await _spill_all(registry, 6000)
            await buf.http.exec(f"UPDATE {table} SET payload = 'not json {{' WHERE id_ms = {garbage[0]} "
                                f"AND id_seq = {garbage[1]}")  # fmt: skip
            await buf.http.exec(f"UPDATE {table} SET payload = '[\"symbol\"]' WHERE id_ms = {odd[0]} "
                                f"AND id_seq = {odd[1]}")  # fmt: skip
            last_ts = int(await buf.http.scalar(f"SELECT max(ts)::long FROM {table}"))
            await buf.http.exec(
                f"INSERT INTO {table} (ts, id_ms, id_seq, kind, symbol, payload) VALUES "
                f"({last_ts + 1}::timestamp, 9999999999999, 0, 'TRADE', 'BTCUSDT', '[\"a\",\"b\"]')"
            )
            await buf.http.wait_applied(table)
            brain.start()
            brain_c = make_client(brain.url)

            async def delivered() -> bool:
                return int(await brain_c.xlen(settings.stream_key)) >= len(ids) - 2

            await eventually(delivered, 60, what="every good entry on the Brain")

            async def direct() -> bool:
                return sample(registry, "tickbridge_forwarder_mode", mode="direct") == 1

            await eventually(direct, 20, what="replay finished")
            assert not fw.stopping.is_set()
    assert sample(registry, "tickbridge_forwarder_buffer_quarantined_total") == 3
    assert sample(registry, "tickbridge_forwarder_buffer_missing_total") == 0
    messages = " ".join(r.getMessage() for r in caplog.records if "QUARANTINED" in r.getMessage())
    for bad in (ids[1000].decode(), ids[4000].decode(), "9999999999999-0"):
        assert bad in messages, messages
    held = await vps_c.hgetall(keys.FORWARDER_QUARANTINE)
    assert {ids[1000], ids[4000], b"9999999999999-0"} <= set(held), held.keys()
    good = {eid: trade_fields(i) for i, eid in enumerate(ids) if i not in (1000, 4000)}
    verdict = verify(await read_stream(brain_c, settings.stream_key), good)  # type: ignore[arg-type]
    assert verdict.ok, (verdict.missing[:5], verdict)
    assert verdict.delivered == len(ids) - 2
    await buf.close()
    await vps_c.aclose()
    await brain_c.aclose()


async def test_backlog_gauge_tracks_the_vps_while_the_link_swallows_packets(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer, toxiproxy: ToxiproxyServer
) -> None:
    """The Brain link drops every packet (toxiproxy `timeout` toxic, no RST). While the forwarder's loop
    waits out its write timeout, `tickbridge_forwarder_backlog_entries` keeps following the VPS backlog
    (entries above the Brain's top) within a couple of seconds, from the first seconds of the outage."""
    vps, brain = redis_factory(), redis_factory()
    port = free_port()
    rate = 1000
    async with aiohttp.ClientSession() as http:
        body = {"name": "brain", "listen": f"127.0.0.1:{port}", "upstream": f"127.0.0.1:{brain.port}"}
        async with http.post(f"{toxiproxy.api}/proxies", json=body) as resp:
            assert resp.status == 201, await resp.text()
        settings = make_settings(vps, brain, questdb_server).model_copy(
            update={"brain_redis_url": f"redis://127.0.0.1:{port}/0"}
        )
        vps_c, brain_c = make_client(vps.url), make_client(brain.url)
        registry = CollectorRegistry()
        writer = LiveWriter(vps_c, settings.stream_key, rate=rate)
        stop_writer = asyncio.Event()
        async with running(Forwarder(settings, registry, buffer_table=f"vb_{uuid.uuid4().hex[:8]}")):
            async with asyncio.TaskGroup() as tg:
                tg.create_task(writer.run(stop_writer))

                async def flowing() -> bool:
                    return int(await brain_c.xlen(settings.stream_key)) > 500

                await eventually(flowing, 20, what="ticks flowing through the proxy")
                toxic = {"name": "blackhole", "type": "timeout", "attributes": {"timeout": 0}}
                async with http.post(f"{toxiproxy.api}/proxies/brain/toxics", json=toxic) as resp:
                    assert resp.status == 200, await resp.text()
                t0 = time.monotonic()
                worst: list[tuple[float, float, int]] = []
                while time.monotonic() - t0 < 15:
                    await asyncio.sleep(0.5)
                    info = await brain_c.xinfo_stream(settings.stream_key)
                    top = info["last-generated-id"].decode()
                    true = len(await vps_c.xrange(settings.stream_key, "(" + top, "+") or [])
                    gauge = sample(registry, "tickbridge_forwarder_backlog_entries")
                    elapsed = time.monotonic() - t0
                    # "within a couple of seconds": what the VPS held 2.5 s ago at the writer's rate
                    if elapsed > 2.5 and not true - 2.5 * rate <= gauge <= true + 0.5 * rate:
                        worst.append((round(elapsed, 1), gauge, true))
                assert not worst, f"backlog gauge off (elapsed s, gauge, VPS backlog): {worst}"
                async with http.delete(f"{toxiproxy.api}/proxies/brain/toxics/blackhole") as resp:
                    assert resp.status == 204, await resp.text()
                stop_writer.set()

            async def drained() -> bool:
                return int(await brain_c.xlen(settings.stream_key)) >= len(writer.acked)

            await eventually(drained, 60, what="every tick on the Brain")
    verdict = verify(await read_stream(brain_c, settings.stream_key), {eid: None for _, eid in writer.acked})
    assert verdict.ok, (verdict.missing[:5], verdict)
    await vps_c.aclose()
    await brain_c.aclose()


async def test_disk_budget_smaller_than_one_partition_holds(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer, caplog: pytest.LogCaptureFixture
) -> None:
    """300,000 entries of one hour (~75 MB in one hourly partition) spill into a 60 MB disk budget. The disk use
    QuestDB reports (`table_partitions` diskSize) never passes the budget; the oldest entries are dropped,
    counted (not as missing) and logged; the rest reaches the Brain once, in order."""
    vps, brain = redis_factory(), redis_factory()
    brain.stop()
    budget = 60 * 2**20
    settings = make_settings(vps, brain, questdb_server, ram_buffer_bytes=1, forward_batch=5000,
                             disk_buffer_bytes=budget)  # fmt: skip
    vps_c = make_client(vps.url)
    n = 300_000
    hour = (int(time.time() * 1000) // HOUR_MS - 3) * HOUR_MS
    ids = await preload(vps_c, settings.stream_key, n, start=(hour, 0), step_ms=0.01)
    table = f"vb_{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    buf = SpillBuffer(questdb_server.url, table=table)
    peak = 0

    async def disk_use() -> int:
        try:
            return sum(p.disk_bytes for p in await buf.partitions())
        except QuestDBError:  # the table is not created yet
            return 0

    with caplog.at_level(logging.ERROR):
        async with running(Forwarder(settings, registry, buffer_table=table)):
            while sample(registry, "tickbridge_forwarder_spilled_total") < n:
                peak = max(peak, await disk_use())
                assert peak <= budget, f"buffer disk use {peak} > DISK_BUFFER_BYTES {budget}"
                await asyncio.sleep(0.05)
            peak = max(peak, await disk_use())
            dropped = sample(registry, "tickbridge_forwarder_dropped_total")
            assert dropped > 0
            brain.start()
            brain_c = make_client(brain.url)

            async def delivered() -> bool:
                dropped = sample(registry, "tickbridge_forwarder_dropped_total")
                return int(await brain_c.xlen(settings.stream_key)) >= n - dropped

            await eventually(delivered, 90, what="the entries the budget kept on the Brain")
            dropped = sample(registry, "tickbridge_forwarder_dropped_total")
    assert peak <= budget, f"buffer disk use {peak} > DISK_BUFFER_BYTES {budget}"
    assert sample(registry, "tickbridge_forwarder_buffer_missing_total") == 0
    assert any("DISK BUFFER FULL" in r.getMessage() for r in caplog.records)
    got = await read_stream(brain_c, settings.stream_key)
    kept = int(n - dropped)
    assert len(got) == kept, (len(got), kept)
    # the oldest went: what arrived is the newest `kept`, once, in order, byte-identical
    newest: dict[bytes, list[bytes] | None] = {eid: trade_fields(i) for i, eid in enumerate(ids) if i >= n - kept}
    verdict = verify(got, newest)
    assert verdict.ok, (verdict.missing[:5], verdict)
    await buf.close()
    await vps_c.aclose()
    await brain_c.aclose()


def test_ledger_ranges_bound_and_restart() -> None:
    """The ledger alone (no servers): entries split at hour boundaries of ts; a shortfall names exact ends
    where it can; past LEDGER_MAX a spill extends the newest entry of its partition; closed entries
    survive a reload as closed; foreign and re-read rows are told apart."""
    hour = 3_600_000_000
    rows = [((1000 + i, 0), 10 * hour - 3 + i) for i in range(6)]  # 3 rows in one hour, 3 in the next
    entries = segments(rows)
    assert [(e.first, e.last, e.count) for e in entries] == [((1000, 0), (1002, 0), 3), ((1003, 0), (1005, 0), 3)]
    ledger = Ledger()
    assert ledger.add(entries) == entries
    assert ledger.note(rows[0][1], rows[0][0]) == ("ok", [])
    # rows[1] lost; rows[2] closes the first entry one short, with the missing ID inside known ends
    verdict, closed = ledger.note(rows[2][1], rows[2][0])
    assert verdict == "ok" and closed == [entries[0]] and entries[0].shortfall == 1
    assert entries[0].missing_range() == ">1000-0..<1002-0"
    assert ledger.note(rows[0][1], rows[0][0])[0] == "reread"
    assert ledger.note(rows[0][1], (999_999, 0))[0] == "foreign"
    # the whole second entry lost: closed at the end with its exact range
    assert ledger.close_all() == [entries[1]] and entries[1].missing_range() == "1003-0..1005-0"
    reloaded = Ledger()
    reloaded.load({e.field: e.value for e in ledger.entries})
    assert [(e.closed, e.got) for e in reloaded.entries] == [(True, 2), (True, 0)]
    assert reloaded.noted_ts == rows[-1][1]
    assert ledger.release((1002, 0)) == [entries[0]]
    bounded = Ledger()
    for i in range(LEDGER_MAX + 50):
        bounded.add(segments([((i, 0), 5 * hour + i)]))
    assert len(bounded.entries) == LEDGER_MAX
    assert bounded.entries[-1].count == 51 and bounded.entries[-1].last == (LEDGER_MAX + 49, 0)
