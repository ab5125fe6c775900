"""What the link's credential can do to the Brain stream, tried with the forwarder's own user (issue 14 item 2).

The Brain runs the committed ACLs over TLS; the forwarder and the consumer run in-process with their own users.
The forwarder user may append, and an append can trim (`XADD … MAXLEN 0`) or set the top far ahead
(`XADD <far-future ID>`): Redis ACLs do not filter arguments, so the forwarder refuses a top it did not write,
the VPS keeps every entry CONSUMER_GROUP has not received, and after the operator's repair
(docs/monitoring.md, ForwarderBrainStreamRefused) the rewind refills the Brain: 0 lost, 0 duplicated.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from conftest import ServiceRunner, eventually
from tickbridge.brain.consumer import BrainConsumer
from tickbridge.core import keys
from tickbridge.core.redis_io import make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import StreamId, format_stream_id, parse_stream_id
from tickbridge.devstack.servers import QuestDBServer, RedisServer
from tickbridge.devstack.tls import BRAIN_ACL, CertPaths, SecureRedisServer, acl_variables, make_certs, render_acl
from tickbridge.forwarder.loadgen import SYMBOLS, preload
from tickbridge.forwarder.service import Forwarder

pytestmark = pytest.mark.timeout(150)

STREAM = keys.DEFAULT_STREAM_KEY
GROUP = keys.DEFAULT_CONSUMER_GROUP
FAR_FUTURE = "99999999999999-0"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_certs(tmp_path_factory.mktemp("pki") / "certs")


@pytest.fixture
def passwords() -> dict[str, str]:
    return {name: secrets.token_urlsafe(24) for name in acl_variables(BRAIN_ACL.read_text())}


@pytest.fixture
def brain(certs: CertPaths, passwords: dict[str, str], tmp_path: Path) -> Iterator[SecureRedisServer]:
    server = SecureRedisServer(aclfile=render_acl(BRAIN_ACL, tmp_path / "brain.acl", passwords), certs=certs,
                               plain_port=False, workdir=tmp_path / "brain")  # fmt: skip
    server.start()
    yield server
    server.stop()


class Link:
    """The Brain (ACLs, TLS), the VPS Redis, and a client per Brain user."""

    def __init__(self, brain: SecureRedisServer, vps: RedisServer, qdb: QuestDBServer, passwords: dict[str, str]):
        self.brain, self.vps, self.qdb, self.passwords = brain, vps, qdb, passwords
        self.vps_c = make_client(vps.url)
        self.admin = self.client("admin")
        self.attacker = self.client("forwarder")  # a leaked forwarder password

    def settings(self, user: str, **kw: Any) -> Settings:
        assert self.brain.certs is not None
        base: dict[str, Any] = {
            "brain_redis_url": self.brain.url_for(user, self.passwords[f"BRAIN_REDIS_{user.upper()}_PASSWORD"]),
            "vps_redis_url": self.vps.url,
            "vps_questdb_url": self.qdb.url,
            "redis_tls_ca": str(self.brain.certs.ca),
            "redis_tls_cert": str(self.brain.certs.client_cert),
            "redis_tls_key": str(self.brain.certs.client_key),
            "symbols": SYMBOLS,
            "forward_batch": 500,
            "delivered_retention_s": 0.2,
            "consumer_claim_idle_ms": 1000,
        }
        base.update(kw)
        return Settings(**base)

    def client(self, user: str) -> aioredis.Redis:
        s = self.settings(user)
        return make_client(s.brain_redis_url, s)

    def forwarder(self, registry: CollectorRegistry, **kw: Any) -> Forwarder:
        fw = Forwarder(self.settings("forwarder", **kw), registry, buffer_table=f"vb_{uuid.uuid4().hex[:8]}",
                       stats_interval=0.3)  # fmt: skip
        return fw

    def consumer(self, **kw: Any) -> BrainConsumer:
        return BrainConsumer(self.settings("consumer", consumer_name="c1", **kw), CollectorRegistry(),
                             trim_retention_s=0, monitor_interval_s=0.1)  # fmt: skip

    async def trade_ids(self) -> list[int]:
        """Every trade_id in the per-symbol streams (each trade must be there exactly once)."""
        out: list[int] = []
        for sym in SYMBOLS:
            out += [int(f[b"trade_id"]) for _, f in await self.admin.xrange(keys.trades_key(sym))]
        return out

    async def close(self) -> None:
        for c in (self.vps_c, self.admin, self.attacker):
            await c.aclose()


@pytest.fixture
async def link(
    brain: SecureRedisServer,
    redis_factory: Callable[..., RedisServer],
    questdb_server: QuestDBServer,
    passwords: dict[str, str],
) -> AsyncIterator[Link]:
    result = Link(brain, redis_factory(), questdb_server, passwords)
    yield result
    await result.close()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def refusals(registry: CollectorRegistry) -> float:
    return sum(
        sample(registry, "tickbridge_forwarder_brain_refusals_total", reason=r)
        for r in ("future_top", "foreign_top", "lost_entries")
    )


def refused_now(registry: CollectorRegistry) -> bool:
    return any(
        sample(registry, "tickbridge_forwarder_brain_refused", reason=r) == 1
        for r in ("future_top", "foreign_top", "lost_entries")
    )


def indexes(ids: list[bytes], first_index: int) -> set[int]:
    """The trade_ids `preload` gave these entries (loadgen: 1_000_000 + index)."""
    return {1_000_000 + first_index + i for i in range(len(ids))}


async def all_written_once(link: Link, expected: set[int]) -> bool:
    got = await link.trade_ids()
    assert len(got) == len(set(got)), f"{len(got) - len(set(got))} trades written twice"
    return set(got) == expected


async def repair(admin: aioredis.Redis) -> StreamId:
    """The operator's repair (docs/monitoring.md, ForwarderBrainStreamRefused), as the admin user:
    delete what lies above what CONSUMER_GROUP received, set the top back there, and move the group back
    if it received a bogus entry. The forwarder then rewinds and refills the Brain from the VPS copy."""
    group = next(g for g in await admin.xinfo_groups(STREAM) if g["name"] == GROUP.encode())
    delivered = parse_stream_id(group["last-delivered-id"])
    now_ms = int(time.time() * 1000)
    if delivered[0] > now_ms + 60_000:  # the group received the bogus far-future entry: back to the real one
        real = [
            e
            for e, _ in await admin.xrevrange(STREAM, "+", "-", count=1000)
            if parse_stream_id(e)[0] <= now_ms + 60_000
        ]
        delivered = parse_stream_id(real[0]) if real else (0, 0)
        await admin.execute_command("XGROUP", "SETID", STREAM, GROUP, format_stream_id(delivered))  # type: ignore[no-untyped-call]
    above = [e for e, _ in await admin.xrange(STREAM, "(" + format_stream_id(delivered), "+")]
    if above:
        await admin.xdel(STREAM, *above)
    await admin.execute_command("XSETID", STREAM, format_stream_id(delivered))  # type: ignore[no-untyped-call]
    return delivered


async def test_xadd_maxlen_0_over_the_link_loses_nothing(link: Link, services: ServiceRunner) -> None:
    """`XADD … MAXLEN 0` as the forwarder user empties the Brain stream mid-flow: the forwarder notices
    (the top is no entry it wrote, or entries the group never received are gone), keeps the VPS copy, and
    after the repair every trade lands in the per-symbol streams exactly once."""
    registry = CollectorRegistry()
    services.start(link.forwarder(registry))
    consumer = services.start(link.consumer())
    first = await preload(link.vps_c, STREAM, 3000)
    expected = indexes(first, 0)
    await eventually(lambda: all_written_once(link, expected), 30, what="first 3000 trades written")
    await services.stop_one(consumer)  # the consumer is away (restart, deploy): the Brain stream holds the rest
    second = await preload(link.vps_c, STREAM, 2000, first_index=3000)
    expected |= indexes(second, 3000)

    async def delivered() -> bool:
        info = await link.admin.xinfo_stream(STREAM)
        return bool(parse_stream_id(info["last-generated-id"]) >= parse_stream_id(second[-1]))

    await eventually(delivered, 30, what="second batch on the Brain stream, not consumed yet")
    await link.attacker.execute_command("XADD", STREAM, "MAXLEN", "0", "*", "forged", "1")  # type: ignore[no-untyped-call]
    assert await link.admin.xlen(STREAM) == 0
    third = await preload(link.vps_c, STREAM, 1000, first_index=5000, start=(int(time.time() * 1000) + 1000, 0))
    expected |= indexes(third, 5000)

    async def refused_or_trimmed() -> bool:
        if refused_now(registry):
            return True
        return not await link.vps_c.xrange(STREAM, second[0], second[0])

    await eventually(refused_or_trimmed, 20, what="the forwarder refuses the emptied Brain stream (or trims its copy)")
    # The VPS still holds everything the group has not received.
    vps_ids = {e for e, _ in await link.vps_c.xrange(STREAM, second[0], "+")}
    missing = len((set(second) | set(third)) - vps_ids)
    assert missing == 0, f"the VPS trimmed {missing} entries the Brain's group never received"
    assert refusals(registry) >= 1
    await repair(link.admin)
    services.start(link.consumer())
    await eventually(lambda: all_written_once(link, expected), 40, what="every trade written exactly once")
    assert not refused_now(registry)


async def test_a_far_future_top_is_refused_and_the_vps_keeps_its_copy(link: Link, services: ServiceRunner) -> None:
    """`XADD <far-future ID>` makes every real append "equal or smaller": the forwarder must not count those
    as delivered, must not adopt the top, and must not trim the VPS on its word; after the repair it resumes."""
    registry = CollectorRegistry()
    services.start(link.forwarder(registry))
    services.start(link.consumer())
    first = await preload(link.vps_c, STREAM, 2000)
    expected = indexes(first, 0)
    await eventually(lambda: all_written_once(link, expected), 30, what="first 2000 trades written")
    await link.attacker.execute_command("XADD", STREAM, FAR_FUTURE, "forged", "1")  # type: ignore[no-untyped-call]
    second = await preload(link.vps_c, STREAM, 2000, first_index=2000)
    expected |= indexes(second, 2000)

    async def refused_or_trimmed() -> bool:
        if refused_now(registry):
            return True
        return not await link.vps_c.xrange(STREAM, second[0], second[0])

    await eventually(refused_or_trimmed, 20, what="the forwarder refuses the far-future top (or trims its copy)")
    vps_ids = {e for e, _ in await link.vps_c.xrange(STREAM, second[0], "+")}
    missing = len(set(second) - vps_ids)
    assert missing == 0, f"the VPS trimmed {missing} entries that never reached the Brain, on the word of {FAR_FUTURE}"
    assert sample(registry, "tickbridge_forwarder_brain_refused", reason="future_top") == 1
    assert sample(registry, "tickbridge_forwarder_brain_refusals_total", reason="future_top") == 1
    assert sample(registry, "tickbridge_forwarder_already_delivered_total") == 0
    state = await link.vps_c.hgetall(keys.FORWARDER_STATE)
    assert parse_stream_id(state[b"confirmed_id"]) <= parse_stream_id(first[-1])
    await repair(link.admin)

    async def resumed() -> bool:
        return not refused_now(registry) and await all_written_once(link, expected)

    await eventually(resumed, 40, what="resumed after the repair, every trade written exactly once")
    assert await link.admin.xlen(keys.CONSUMER_DEAD_LETTER) == 1  # the bogus entry, received before the repair


async def test_consumer_group_mismatch_loses_nothing_and_both_streams_trim(link: Link, services: ServiceRunner) -> None:
    """CONSUMER_GROUP differs between the hosts: the forwarder creates no group of its own (one at 0-0 would stop
    the Brain's trimming), reports the missing group, and the VPS falls back to trimming by time."""
    registry = CollectorRegistry()
    services.start(link.forwarder(registry, consumer_group="vps-side-group"))
    services.start(link.consumer())
    ids = await preload(link.vps_c, STREAM, 3000)
    expected = indexes(ids, 0)
    await eventually(lambda: all_written_once(link, expected), 30, what="3000 trades written once")
    groups = [g["name"] for g in await link.admin.xinfo_groups(STREAM)]
    assert groups == [GROUP.encode()], f"groups on the Brain stream: {groups}"

    async def both_trimmed() -> bool:
        return int(await link.admin.xlen(STREAM)) < 3000 and int(await link.vps_c.xlen(STREAM)) == 0

    await eventually(both_trimmed, 30, what="the Brain stream and the VPS stream trimmed")
    assert sample(registry, "tickbridge_forwarder_brain_group_missing") == 1
    assert not refused_now(registry)


async def test_the_forwarder_user_cannot_create_groups_and_the_forwarder_needs_none(
    link: Link, services: ServiceRunner
) -> None:
    """The forwarder runs with its ACL user against a fresh Brain (no stream yet): it delivers without creating
    a group or the stream's group itself, and its user may not XGROUP CREATE."""
    registry = CollectorRegistry()
    services.start(link.forwarder(registry))
    ids = await preload(link.vps_c, STREAM, 500)

    async def delivered() -> bool:
        return int(await link.admin.xlen(STREAM)) == len(ids)

    await eventually(delivered, 30, what="500 entries on the Brain")
    assert await link.admin.xinfo_groups(STREAM) == []
    with pytest.raises(Exception, match=r"(?i)noperm|no permissions"):
        await link.attacker.execute_command("XGROUP", "CREATE", STREAM, "stray", "0")  # type: ignore[no-untyped-call]


async def test_a_real_top_the_vps_lost_is_refused_until_the_operator_accepts_it(
    link: Link, services: ServiceRunner
) -> None:
    """A VPS power cut can lose entries the Brain already received (and the state hash with them): the restarted
    forwarder cannot vouch for that top and refuses it, until an operator who checked it accepts it on the VPS."""
    registry = CollectorRegistry()
    fw = services.start(link.forwarder(registry))
    ids = await preload(link.vps_c, STREAM, 1000)

    async def delivered() -> bool:
        return int(await link.admin.xlen(STREAM)) == len(ids)

    await eventually(delivered, 30, what="1000 entries on the Brain")
    await services.stop_one(fw)
    # The VPS comes back without its last 100 entries and with an older state hash.
    await link.vps_c.xdel(STREAM, *ids[-100:])
    await link.vps_c.hset(keys.FORWARDER_STATE, "confirmed_id", ids[-101])
    registry = CollectorRegistry()
    services.start(link.forwarder(registry))

    async def refused() -> bool:
        return sample(registry, "tickbridge_forwarder_brain_refused", reason="foreign_top") == 1

    await eventually(refused, 20, what="the restarted forwarder refuses a top it cannot find on the VPS")
    more = await preload(link.vps_c, STREAM, 200, first_index=1000, start=(parse_stream_id(ids[-1])[0] + 1000, 0))
    await link.vps_c.hset(keys.FORWARDER_STATE, "accept_top", ids[-1])  # the operator checked it on the Brain

    async def resumed() -> bool:
        return not refused_now(registry) and int(await link.admin.xlen(STREAM)) == len(ids) + len(more)

    await eventually(resumed, 30, what="accepted by the operator, delivery resumes")
