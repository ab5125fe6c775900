"""core/groups.py against a real redis-server: read new, own pending page by page, claim idle only from others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tickbridge.core.groups import GroupMember, group_floor
from tickbridge.core.redis_io import ensure_group, make_client
from tickbridge.core.wire import parse_stream_id
from tickbridge_dev.devstack.servers import RedisServer

pytestmark = pytest.mark.timeout(60)

STREAM = "g:stream"
GROUP = "g"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = make_client(redis_server.url)
    await ensure_group(c, STREAM, GROUP, "0")
    yield c
    await c.aclose()


async def add(client: aioredis.Redis, n: int) -> list[bytes]:
    return [await client.xadd(STREAM, {"i": str(i)}) for i in range(n)]


async def test_read_new_then_own_pending_in_pages(client: aioredis.Redis) -> None:
    ids = await add(client, 25)
    me = GroupMember(GROUP, "a")
    got = await me.read(client, [STREAM], [">"], count=10)
    assert [e[0] for e in got[STREAM.encode()]] == ids[:10]
    await me.read(client, [STREAM], [">"], count=100)  # the other 15: all 25 pending for "a", none acked
    pages = [page async for page in me.own_pending(client, [STREAM], count=10)]
    seen = [e[0] for page in pages for e in page[STREAM.encode()]]
    assert seen == ids and len(pages) == 3  # every pending entry once, oldest first, 10 per page
    # Another member has nothing of its own to re-read.
    assert [page async for page in GroupMember(GROUP, "b").own_pending(client, [STREAM], count=10)] == []


async def test_claim_idle_only_from_other_members(client: aioredis.Redis) -> None:
    ids = await add(client, 5)
    a, b = GroupMember(GROUP, "a"), GroupMember(GROUP, "b")
    await a.read(client, [STREAM], [">"], count=3)
    await asyncio.sleep(0.05)
    # Only "a" holds pending entries: "a" has nothing to claim (its own come back through own_pending) ...
    assert not await a.others_pending(client, STREAM)
    assert [p async for p in a.claim_idle(client, STREAM, min_idle_ms=1, count=10)] == []
    # ... and "b" takes what "a" left idle, exactly those entries, with the deleted ones counted apart.
    await client.xdel(STREAM, ids[1])
    assert await b.others_pending(client, STREAM)
    pages = [p async for p in b.claim_idle(client, STREAM, min_idle_ms=1, count=10)]
    claimed = [e[0] for entries, _ in pages for e in entries]
    assert claimed == [ids[0], ids[2]]
    assert sum(deleted for _, deleted in pages) == 1
    assert not await b.others_pending(client, STREAM)  # everything pending is b's now


async def test_group_floor_is_the_oldest_pending_or_last_delivered(client: aioredis.Redis) -> None:
    ids = await add(client, 4)
    a = GroupMember(GROUP, "a")
    await a.read(client, [STREAM], [">"], count=4)
    await client.xack(STREAM, GROUP, ids[0])
    assert await group_floor(client, STREAM, GROUP) == parse_stream_id(ids[1])
    await client.xack(STREAM, GROUP, *ids[1:])
    assert await group_floor(client, STREAM, GROUP) == parse_stream_id(ids[3])
    assert await group_floor(client, STREAM, "no-such-group") is None
