"""Issue 16, the trading-code side: `catch_up()` from the catch-up hash, `Answer.missing` for a range that reaches
into the gap, and the rate-limiting example of docs/brain-integration.md (run as written there)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tickbridge.brain.catchup import FRONTIER_MARGIN_US, parse_catchup
from tickbridge.brain.tiered import TieredMarketData
from tickbridge.core import keys
from tickbridge.core.redis_io import make_client
from tickbridge.core.settings import Settings
from tickbridge.core.tick import Trade
from tickbridge.core.wire import encode_warm_member
from tickbridge_dev.devstack.servers import RedisServer

DOC = Path(__file__).resolve().parents[1] / "docs" / "brain-integration.md"


def example() -> dict[str, Any]:
    """The catch-up example of the integration guide, executed as a module."""
    text = DOC.read_text()
    m = re.search(r"<!-- catch-up example: start -->\n```python\n(.*?)```\n<!-- catch-up example: end -->", text, re.S)
    assert m, "the catch-up example is missing from docs/brain-integration.md"
    namespace: dict[str, Any] = {}
    exec(compile(m.group(1), str(DOC), "exec"), namespace)
    return namespace


def test_parse_catchup_gap_and_figures() -> None:
    now = 1_800_000_000.0
    state = parse_catchup(
        {
            b"vps_active": b"1", b"vps_backlog": b"400000", b"vps_buffer": b"250000", b"vps_oldest_age_s": b"60",
            b"vps_rate": b"20000", b"vps_eta_s": b"20", b"live_start": b"1799999990000-0",
            b"vps_updated": str(now - 1).encode(), b"brain_lag": b"30000", b"brain_frontier": b"1799999900000-5",
            b"brain_rate": b"15000", b"brain_eta_s": b"2", b"brain_updated": str(now).encode(),
        },
        now,
    )  # fmt: skip
    assert state.active and state.backlog == 430_000 and state.buffer_rows == 250_000
    assert state.rate == 15_000 and state.eta_s == 20 and state.oldest_age_s == pytest.approx(61)
    assert state.missing == (1_799_999_900_000_000 - FRONTIER_MARGIN_US, 1_799_999_990_000_000)
    assert state.vps_age_s == pytest.approx(1)
    # The consumer passed the live start: nothing is missing, and an old live_start says nothing any more.
    done = parse_catchup({b"vps_active": b"0", b"live_start": b"1799999990000-0", b"brain_lag": b"3",
                          b"brain_frontier": b"1800000000000-0"}, now)  # fmt: skip
    assert not done.active and done.missing is None and done.backlog == 3
    assert parse_catchup([], now).missing is None


async def test_range_over_the_gap_says_what_is_missing(redis_server: RedisServer) -> None:
    """WARM holds live ticks above the gap; a range across it is stitched and names the missing part, a range
    above it is answered from WARM as complete."""
    client = make_client(redis_server.url)
    now_ms = int(time.time() * 1000)
    frontier_ms, live_ms = now_ms - 120_000, now_ms - 10_000
    trades = [Trade("BTCUSDT", "1.0", "0.5", "BUY", (live_ms + i * 1000) * 1000, 100 + i, (live_ms + i * 1000) * 1000)
              for i in range(5)]  # fmt: skip
    await client.zadd(keys.warm_key("BTCUSDT"), {encode_warm_member(t): t.timestamp for t in trades})
    await client.hset(keys.CATCHUP, mapping={"vps_active": 1, "live_start": f"{live_ms}-0", "brain_lag": 40_000,
                                             "brain_frontier": f"{frontier_ms}-0"})  # fmt: skip
    settings = Settings(brain_redis_url=redis_server.url, brain_questdb_url="http://127.0.0.1:9")
    md = TieredMarketData(settings, ["BTCUSDT"], CollectorRegistry(), follow=False)
    md._cold = _no_cold  # type: ignore[method-assign]  # QuestDB has nothing yet: not the subject here
    try:
        across = await md.range("BTCUSDT", (frontier_ms - 60_000) * 1000, now_ms * 1000)
        assert across.missing == (frontier_ms * 1000 - FRONTIER_MARGIN_US, live_ms * 1000)
        assert [r.trade_id for r in across.rows] == [100, 101, 102, 103, 104]
        above = await md.range("BTCUSDT", live_ms * 1000 + 1, now_ms * 1000)
        assert above.missing is None and above.tiers == ("warm",)
        recent = await md.recent("BTCUSDT", 2)
        assert recent.missing is None and [r.trade_id for r in recent.rows] == [103, 104]
        state = await md.catch_up()
        assert state.active and state.brain_lag == 40_000
    finally:
        await md.close()
        await client.aclose()


async def _no_cold(*_args: object, **_kw: object) -> list[Any]:
    return []


async def test_rate_limit_example_of_the_integration_guide(redis_server: RedisServer) -> None:
    ns = example()
    client = make_client(redis_server.url)
    settings = Settings(brain_redis_url=redis_server.url)
    now = time.time()
    async with TieredMarketData(settings, ["BTCUSDT"], CollectorRegistry(), follow=False) as md:
        assert await ns["order_budget"](md) == 10.0  # nothing reported yet: no catch-up
        await client.hset(keys.CATCHUP, mapping={"vps_active": 1, "vps_backlog": 500_000, "vps_eta_s": 30,
                                                 "vps_oldest_age_s": 120, "vps_updated": now})  # fmt: skip
        assert await ns["order_budget"](md) == 5.0
        await client.hset(keys.CATCHUP, mapping={"vps_eta_s": 900})
        assert await ns["order_budget"](md) == pytest.approx(1.0)
        await client.hset(keys.CATCHUP, mapping={"vps_updated": now - 60})  # the forwarder went quiet
        assert await ns["order_budget"](md) == 0.0
        await client.hset(keys.CATCHUP, mapping={"vps_active": 0, "vps_updated": time.time()})
        budgets: list[float] = []
        stop = asyncio.Event()

        async def step(_md: TieredMarketData, budget: float) -> None:
            budgets.append(budget)
            stop.set()

        await asyncio.wait_for(ns["trade"](md, step, stop), 10)
        assert budgets == [10.0]
    await client.aclose()
