"""Replay mode: the capture's messages exactly and in order, its snapshot at the right moment, its trades
for back-fill, and a local book that syncs on the real data."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets

from conftest import eventually
from tickbridge_dev.sim import SimConfig
from tickbridge_dev.sim.testing import LocalBook, running_sim

pytestmark = pytest.mark.timeout(60)

STREAMS = "ethusdt@trade/ethusdt@depth@100ms/ethusdt@bookTicker"


def capture_ws_lines(path: Path) -> list[bytes]:
    with gzip.open(path, "rb") as fh:
        lines = [raw.rstrip(b"\n").split(b" ", 1)[1] for raw in fh]
    return [text for text in lines if text.startswith(b'{"stream"')]


async def _true(value: bool) -> bool:
    return value


async def test_replay_emits_exactly_the_capture_in_order(binance_data: Path) -> None:
    path = binance_data / "ethusdt_20240808.gz"
    expected = capture_ws_lines(path)
    cfg = SimConfig(mode="replay", replay_files=(path,), speed=0.0)
    async with running_sim(cfg) as sim:
        got: list[bytes] = []
        async with websockets.connect(f"{sim.ws_url}/stream?streams={STREAMS}", max_queue=None, max_size=None) as ws:
            async with asyncio.timeout(45):
                while len(got) < len(expected):
                    msg = await ws.recv(decode=False)
                    got.append(msg)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await ws.recv()
        assert sim.replay_done
        assert len(got) == len(expected) == 6106 + 3434 + 24077
        assert got == expected
        stats = sim.stats()["symbols"]["ETHUSDT"]
        assert (stats["first_trade_id"], stats["last_trade_id"], stats["trades"]) == (1520538925, 1520545030, 6106)


async def test_replay_snapshot_follows_the_buffered_depth_events_and_syncs(binance_data: Path) -> None:
    path = binance_data / "ethusdt_20240808.gz"
    # Real pace for the start (the snapshot line is ~0.13 s in), so the order on the wire is the capture's.
    cfg = SimConfig(mode="replay", replay_files=(path,), speed=1.0)
    async with running_sim(cfg) as sim:
        book = LocalBook()
        depth_before_snapshot: list[dict[str, Any]] = []
        async with websockets.connect(f"{sim.ws_url}/stream?streams=ethusdt@depth@100ms", max_queue=None) as ws:
            async with aiohttp.ClientSession() as http:
                params = {"symbol": "ETHUSDT", "limit": "1000"}
                async with http.get(sim.rest_url + "/api/v3/depth", params=params) as r:
                    assert r.status == 200
                    snap = await r.json()
            # The snapshot is only served once the replay reached it: both earlier events are already sent.
            async with asyncio.timeout(5):
                while len(depth_before_snapshot) < 2:
                    depth_before_snapshot.append(json.loads(await ws.recv())["data"])
            assert snap["lastUpdateId"] == 35346513512
            assert depth_before_snapshot[1]["u"] == snap["lastUpdateId"]  # dropped by the procedure
            for ev in depth_before_snapshot:
                book.on_event(ev)
            assert book.sync(snap)
            async with asyncio.timeout(10):
                while book.applied < 10:
                    book.on_event(json.loads(await ws.recv())["data"])
            sim.pause()
            try:  # drain what was sent before the pause took effect
                while True:
                    async with asyncio.timeout(0.5):
                        book.on_event(json.loads(await ws.recv())["data"])
            except TimeoutError:
                pass
        assert book.gaps == 0
        bids, asks, uid = sim.book("ETHUSDT")
        assert book.update_id == uid
        assert (book.bids, book.asks) == (bids, asks)


async def test_replay_raw_stream_and_historical_trades(binance_data: Path) -> None:
    path = binance_data / "ethusdt_20240808.gz"
    trades: list[dict[str, Any]] = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            if '"ethusdt@trade"' in line[:60]:
                trades.append(json.loads(line.split(" ", 1)[1])["data"])
    cfg = SimConfig(mode="replay", replay_files=(path,), speed=0.0, replay_autostart=False)
    async with running_sim(cfg) as sim:
        async with websockets.connect(f"{sim.ws_url}/ws/ethusdt@trade", max_queue=None) as ws:
            sim.skip_trade_ids("ETHUSDT", 5)
            sim.start_replay()
            got: list[dict[str, Any]] = []
            async with asyncio.timeout(30):
                while len(got) < len(trades) - 5:
                    got.append(json.loads(await ws.recv()))
        assert got == trades[5:]  # bare payloads, identical to the capture's, minus the 5 skipped
        await eventually(lambda: _true(sim.replay_done), timeout=30, what="replay done")
        async with aiohttp.ClientSession() as http:
            params = {"symbol": "ETHUSDT", "fromId": str(trades[0]["t"]), "limit": "5"}
            async with http.get(sim.rest_url + "/api/v3/historicalTrades", params=params) as r:
                rows = await r.json()
        assert [(r["id"], r["price"], r["qty"], r["time"], r["isBuyerMaker"]) for r in rows] == [
            (t["t"], t["p"], t["q"], t["T"], t["m"]) for t in trades[:5]
        ]
