"""Forwarder in-process against real Redis (both sides) and a real QuestDB: normal flow and short outages."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from conftest import eventually
from tickbridge.core import keys
from tickbridge.core.redis_io import make_client
from tickbridge.core.settings import Settings
from tickbridge.forwarder.service import Forwarder
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer
from tickbridge_dev.loadgen.forwarder import LiveWriter, preload, read_stream, trade_fields, verify

pytestmark = pytest.mark.timeout(150)


def make_settings(vps: RedisServer, brain: RedisServer, qdb: QuestDBServer, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "vps_redis_url": vps.url,
        "brain_redis_url": brain.url,
        "vps_questdb_url": qdb.url,
        "forward_batch": 2000,
        "delivered_retention_s": 0.5,
    }
    base.update(kw)
    return Settings(**base)


@contextlib.asynccontextmanager
async def running(fw: Forwarder) -> AsyncIterator[Forwarder]:
    task = asyncio.create_task(fw.run())
    try:
        yield fw
    finally:
        fw.request_stop()
        await asyncio.wait_for(task, 60)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_forwards_in_order_byte_identical(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer
) -> None:
    vps, brain = redis_factory(), redis_factory()
    settings = make_settings(vps, brain, questdb_server)
    vps_c, brain_c = make_client(vps.url), make_client(brain.url)
    expected = {eid: trade_fields(i) for i, eid in enumerate(await preload(vps_c, settings.stream_key, 5000))}
    registry = CollectorRegistry()
    fw = Forwarder(settings, registry, buffer_table=f"vb_{uuid.uuid4().hex[:8]}")
    async with running(fw):

        async def all_there() -> bool:
            return int(await brain_c.xlen(settings.stream_key)) >= len(expected)

        await eventually(all_there, 30, what="preloaded entries on the Brain")

        async def direct() -> bool:  # "replay" until the step after the last backlog batch
            return sample(registry, "tickbridge_forwarder_mode", mode="direct") == 1

        await eventually(direct, 10, what="mode direct once the backlog is delivered")
    verdict = verify(await read_stream(brain_c, settings.stream_key), expected)
    assert verdict.ok, verdict
    # The forwarder creates no group (issue 14): a group it left at 0-0 would hold the Brain's trimming back.
    assert await brain_c.xinfo_groups(settings.stream_key) == []
    state = await vps_c.hgetall(keys.FORWARDER_STATE)
    assert state[b"confirmed_id"] == max(expected, key=lambda e: tuple(map(int, e.split(b"-"))))
    assert sample(registry, "tickbridge_forwarder_sent_total") == len(expected)
    await vps_c.aclose()
    await brain_c.aclose()


async def run_outage(redis_factory: Callable[..., RedisServer], qdb: QuestDBServer, outage_s: float) -> None:
    """Live ticks keep arriving; the Brain Redis is down for `outage_s`; then everything arrives once, in order."""
    vps, brain = redis_factory(), redis_factory(appendonly=True)
    settings = make_settings(vps, brain, qdb)
    vps_c, brain_c = make_client(vps.url), make_client(brain.url)
    registry = CollectorRegistry()
    table = f"vb_{uuid.uuid4().hex[:8]}"
    fw = Forwarder(settings, registry, buffer_table=table)
    writer = LiveWriter(vps_c, settings.stream_key, rate=1500)
    stop_writer = asyncio.Event()
    async with running(fw), asyncio.TaskGroup() as tg:
        tg.create_task(writer.run(stop_writer))

        async def flowing() -> bool:
            return int(await brain_c.xlen(settings.stream_key)) > 500

        await eventually(flowing, 20, what="ticks flowing")
        brain.stop()

        async def noticed() -> bool:
            return sample(registry, "tickbridge_forwarder_mode", mode="ram_backlog") == 1

        await eventually(noticed, 20, what="ram_backlog mode")
        await asyncio.sleep(outage_s)  # the outage itself: ticks pile up on the VPS meanwhile
        assert sample(registry, "tickbridge_forwarder_connected", target="brain") == 0
        brain.start()
        await brain_c.aclose()
        brain_c = make_client(brain.url)  # the old pooled connection died with the server

        async def caught_up() -> bool:
            return sample(registry, "tickbridge_forwarder_mode", mode="direct") == 1

        await eventually(caught_up, 60, what="back to direct mode")
        stop_writer.set()
    async with running(Forwarder(settings, CollectorRegistry(), buffer_table=table)):
        total = len(writer.acked)

        async def drained() -> bool:
            return int(await brain_c.xlen(settings.stream_key)) >= total

        await eventually(drained, 30, what="all ticks on the Brain")
    verdict = verify(await read_stream(brain_c, settings.stream_key), {eid: None for _, eid in writer.acked})
    assert verdict.ok, (verdict.missing[:5], verdict)
    assert sample(registry, "tickbridge_forwarder_spilled_total") == 0
    assert sample(registry, "tickbridge_forwarder_buffer_rows") == 0
    assert sample(registry, "tickbridge_forwarder_errors_total", target="brain") >= 1
    await vps_c.aclose()
    await brain_c.aclose()


async def test_short_outage_no_loss_no_duplicates(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer
) -> None:
    await run_outage(redis_factory, questdb_server, float(os.environ.get("FORWARDER_OUTAGE_S", "3")))


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(not os.environ.get("FORWARDER_FULL_OUTAGE"), reason="set FORWARDER_FULL_OUTAGE=1 (60 s)")
async def test_one_minute_outage(redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer) -> None:
    await run_outage(redis_factory, questdb_server, 60.0)


REPO = Path(__file__).resolve().parents[1]


def _acl_line(path: Path, user: str) -> str | None:
    """The project's ACL rule for `user`, with the password placeholder replaced by `>pw`."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith(f"user {user} "):
            return re.sub(r"#@[A-Z_]+@", ">pw", line)
    return None


def _acl_files(tmp_path: Path) -> dict[str, Path] | None:
    files = {}
    for host in ("vps", "brain"):
        rule = _acl_line(REPO / "redis" / f"users.{host}.acl", "forwarder")
        if rule is None:
            return None
        files[host] = tmp_path / f"{host}.acl"
        files[host].write_text(f"user default on nopass ~* &* +@all\n{rule}\n")
    return files


async def test_runs_under_the_project_acls(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer, tmp_path: Path
) -> None:
    """The forwarder needs only the commands `redis/users.{vps,brain}.acl` grant its user (password in the URL)."""
    acls = _acl_files(tmp_path)
    if acls is None:
        pytest.skip("no forwarder ACL rules in redis/")
    servers = {host: redis_factory(extra=["--aclfile", str(path)]) for host, path in acls.items()}
    vps, brain = servers["vps"], servers["brain"]

    def with_user(url: str) -> str:
        return url.replace("redis://", "redis://forwarder:pw@")

    settings = make_settings(vps, brain, questdb_server).model_copy(
        update={"vps_redis_url": with_user(vps.url), "brain_redis_url": with_user(brain.url)}
    )
    vps_c, brain_c = make_client(vps.url), make_client(brain.url)
    ids = await preload(vps_c, settings.stream_key, 3000)
    registry = CollectorRegistry()
    async with running(Forwarder(settings, registry, buffer_table=f"vb_{uuid.uuid4().hex[:8]}")):

        async def delivered() -> bool:
            return int(await brain_c.xlen(settings.stream_key)) >= len(ids)

        await eventually(delivered, 30, what="delivery with ACL-restricted users")

        async def idle_check_done() -> bool:  # the idle Brain check and the stats run under the ACL too
            return sample(registry, "tickbridge_forwarder_checkpoint_ms") > 0

        await eventually(idle_check_done, 10, what="a stats cycle")
        assert sample(registry, "tickbridge_forwarder_errors_total", target="brain") == 0
    verdict = verify(await read_stream(brain_c, settings.stream_key), {e: trade_fields(i) for i, e in enumerate(ids)})
    assert verdict.ok, verdict
    await vps_c.aclose()
    await brain_c.aclose()
