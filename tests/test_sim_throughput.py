"""Throughput smoke: a sim process at a high rate, one websockets client draining it without gaps."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest

from conftest import eventually
from tickbridge_dev.devstack.servers import free_port
from tickbridge_dev.sim.drain import drain

pytestmark = [pytest.mark.timeout(60), pytest.mark.load]


async def test_high_rate_drains_without_gaps(tmp_path: Path) -> None:
    port = free_port()
    rate = 20_000
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tickbridge", "sim", "--port", str(port), "--symbols", "BTCUSDT,ETHUSDT,SOLUSDT",
        "--rate", str(rate), "--metrics-port", "0",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:

            async def up() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/api/v3/ping") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(up, timeout=15, what="sim process listening")
            result = await drain(f"ws://127.0.0.1:{port}", ("BTCUSDT", "ETHUSDT", "SOLUSDT"), 3.0)
            async with http.get(f"http://127.0.0.1:{port}/_sim/stats") as r:
                stats = await r.json()
        print(f"drained {result.trades_per_s:,.0f} trades/s ({result.messages_per_s:,.0f} msgs/s)")
        assert result.trade_gaps == 0 and result.depth_gaps == 0
        # Conservative floor: the 2-core machine is shared; the report has the real figures.
        assert result.trades_per_s > 2_000
        assert stats["totals"]["trades"] >= result.trades
    finally:
        proc.terminate()
        await proc.wait()
