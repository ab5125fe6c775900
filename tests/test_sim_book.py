"""Simulator data integrity: snapshots consistent with the diff stream, contiguous IDs, determinism,
update-ID gaps, trade back-fill, REST weights and errors."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from conftest import eventually
from tickbridge_dev.sim import SimConfig, SimServer
from tickbridge_dev.sim.testing import LocalBook, running_sim

pytestmark = pytest.mark.timeout(45)


async def stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
        await task


async def _true(value: bool) -> bool:
    return value


async def get_json(url: str, **params: Any) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url, params={k: str(v) for k, v in params.items()}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


class DepthReader:
    """Reads one depth stream into a `LocalBook`, syncing (and resyncing after gaps) per Binance's procedure."""

    def __init__(self, sim: SimServer, ws: ClientConnection, symbol: str, stream: str) -> None:
        self.sim, self.ws, self.symbol, self.stream = sim, ws, symbol, stream
        self.book = LocalBook()
        self.resyncs = 0
        self.last_u = 0

    async def run(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if msg.get("stream") != self.stream:
                continue
            ev = msg["data"]
            self.last_u = ev["u"]
            self.book.on_event(ev)
            if not self.book.synced:
                # Fetch after buffering began (step 3); retry if the snapshot is older than the buffer.
                snap = await get_json(self.sim.rest_url + "/api/v3/depth", symbol=self.symbol, limit=5000)
                if self.book.sync(snap):
                    self.resyncs += 1


async def assert_book_equals_sim(sim: SimServer, reader: DepthReader) -> None:
    sim.pause()
    _, _, final_id = sim.book(reader.symbol)

    async def caught_up() -> bool:
        return reader.book.update_id == final_id

    await eventually(caught_up, timeout=10, what="local book to reach the sim's last update ID")
    bids, asks, _ = sim.book(reader.symbol)
    assert reader.book.bids == bids
    assert reader.book.asks == asks


@pytest.mark.parametrize("stream_kind", ["depth@100ms", "depth"])
async def test_snapshot_plus_diffs_equals_internal_book(stream_kind: str) -> None:
    cfg = SimConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=600.0, seed=3, depth_levels=300)
    async with running_sim(cfg) as sim:
        stream = f"btcusdt@{stream_kind}"
        async with websockets.connect(f"{sim.ws_url}/stream?streams={stream}") as ws:
            reader = DepthReader(sim, ws, "BTCUSDT", stream)
            task = asyncio.create_task(reader.run())

            async def applied_some() -> bool:
                return reader.book.applied >= 3

            await eventually(applied_some, timeout=10, what="diffs applied after the snapshot")
            await assert_book_equals_sim(sim, reader)
            assert reader.book.gaps == 0 and reader.resyncs == 1
            await stop_task(task)


async def test_skip_update_ids_forces_a_resync_that_recovers() -> None:
    cfg = SimConfig(symbols=("BTCUSDT",), rate=500.0, seed=4)
    async with running_sim(cfg) as sim:
        stream = "btcusdt@depth@100ms"
        async with websockets.connect(f"{sim.ws_url}/stream?streams={stream}") as ws:
            reader = DepthReader(sim, ws, "BTCUSDT", stream)
            task = asyncio.create_task(reader.run())

            async def synced() -> bool:
                return reader.book.applied >= 2

            await eventually(synced, timeout=10, what="initial sync")
            sim.skip_update_ids("BTCUSDT", 25)

            async def resynced() -> bool:
                return reader.book.gaps == 1 and reader.resyncs == 2 and reader.book.synced

            await eventually(resynced, timeout=10, what="gap detected and resynced")
            applied = reader.book.applied
            sim.duplicate_depth("BTCUSDT")  # an old event again: ignored by the procedure, no gap

            async def moved_on() -> bool:
                return reader.book.applied > applied + 2

            await eventually(moved_on, timeout=10, what="more diffs after the duplicate")
            assert reader.book.gaps == 1
            await assert_book_equals_sim(sim, reader)
            await stop_task(task)


async def test_ids_contiguous_and_match_stats() -> None:
    cfg = SimConfig(symbols=("BTCUSDT", "ETHUSDT", "SOLUSDT"), rate=3000.0, seed=5)
    async with running_sim(cfg) as sim:
        kinds = ("trade", "depth@100ms", "bookTicker")
        streams = [f"{s}@{k}" for s in ("btcusdt", "ethusdt", "solusdt") for k in kinds]
        trades: dict[str, list[int]] = {}
        depth: dict[str, list[tuple[int, int]]] = {}
        tickers: dict[str, list[int]] = {}
        depth_times: dict[str, list[int]] = {}
        async with websockets.connect(f"{sim.ws_url}/stream?streams={'/'.join(streams)}", max_queue=None) as ws:

            async def read() -> None:
                async for raw in ws:
                    d = json.loads(raw)["data"]
                    if "e" not in d:
                        tickers.setdefault(d["s"], []).append(d["u"])
                    elif d["e"] == "trade":
                        trades.setdefault(d["s"], []).append(d["t"])
                    else:
                        depth.setdefault(d["s"], []).append((d["U"], d["u"]))
                        depth_times.setdefault(d["s"], []).append(d["E"])

            task = asyncio.create_task(read())
            await asyncio.sleep(1.5)
            sim.pause()
            stats = sim.stats()["symbols"]

            async def drained() -> bool:
                return all(
                    trades.get(s, [0])[-1] == stats[s]["last_trade_id"]
                    and depth.get(s, [(0, 0)])[-1][1] == stats[s]["last_update_id"]
                    for s in stats
                )

            await eventually(drained, timeout=10, what="all generated events received")
            await stop_task(task)
        for sym, st in stats.items():
            ids = trades[sym]
            assert ids == list(range(ids[0], ids[-1] + 1)), f"{sym} trade IDs not contiguous"
            assert st["trades"] == st["last_trade_id"] - st["first_trade_id"] + 1
            spans = depth[sym]
            assert all(nxt[0] == prev[1] + 1 for prev, nxt in itertools.pairwise(spans)), sym
            assert all(u <= un for u, un in spans)
            ticks = tickers[sym]
            assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)
            assert spans[0][0] <= ticks[-1] <= spans[-1][1]  # one ID space shared with depth
            times = depth_times[sym]
            assert all(t % 100 == 0 for t in times)  # on the 100 ms grid, never closer than 100 ms
            assert all(b - a >= 100 for a, b in itertools.pairwise(times))
        # RATE is spread over symbols, busiest first (zipf weights)
        assert stats["BTCUSDT"]["trades"] > stats["SOLUSDT"]["trades"]
        total = sum(st["trades"] for st in stats.values())
        assert 3000 * 1.0 < total < 3000 * 2.5


async def test_same_seed_same_market() -> None:
    async def run(seed: int) -> tuple[list[Any], dict[str, Any]]:
        cfg = SimConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=0.0, seed=seed)
        async with running_sim(cfg) as sim:
            sim.burst(400)

            async def done() -> bool:
                return bool(sim.stats()["totals"]["trades"] == 400)

            await eventually(done, timeout=10, what="burst generated")
            rows = await get_json(sim.rest_url + "/api/v3/historicalTrades", symbol="BTCUSDT", limit=1000)
            snap = await get_json(sim.rest_url + "/api/v3/depth", symbol="ETHUSDT", limit=50)
            return [(r["id"], r["price"], r["qty"], r["isBuyerMaker"]) for r in rows], snap

    a_rows, a_snap = await run(11)
    b_rows, b_snap = await run(11)
    c_rows, _ = await run(12)
    assert len(a_rows) > 100
    assert a_rows == b_rows and a_snap == b_snap
    assert a_rows != c_rows


async def test_skipped_trades_are_served_by_historical_trades() -> None:
    cfg = SimConfig(symbols=("BTCUSDT",), rate=0.0, seed=6)
    async with running_sim(cfg) as sim:
        async with websockets.connect(f"{sim.ws_url}/ws/btcusdt@trade") as ws:
            sim.burst(10)
            seen = [json.loads(await ws.recv())["t"] for _ in range(10)]
            sim.skip_trade_ids("BTCUSDT", 7)
            sim.burst(20)
            after = [json.loads(await ws.recv())["t"] for _ in range(13)]
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await ws.recv()
        assert after[0] == seen[-1] + 8  # a gap of exactly 7 IDs on the WebSocket
        assert after == list(range(after[0], after[0] + 13))
        rows = await get_json(sim.rest_url + "/api/v3/historicalTrades", symbol="BTCUSDT", fromId=seen[-1] + 1, limit=7)
        assert [r["id"] for r in rows] == list(range(seen[-1] + 1, seen[-1] + 8))
        assert set(rows[0]) == {"id", "price", "qty", "quoteQty", "time", "isBuyerMaker", "isBestMatch"}
        agg = await get_json(sim.rest_url + "/api/v3/aggTrades", symbol="BTCUSDT", fromId=seen[-1] + 1, limit=7)
        assert [a["f"] for a in agg] == [r["id"] for r in rows]
        stats = sim.stats()["symbols"]["BTCUSDT"]
        assert stats["trades"] == 30 and stats["last_trade_id"] == after[-1]


async def test_history_is_bounded() -> None:
    cfg = SimConfig(symbols=("BTCUSDT",), rate=0.0, seed=6, history_per_symbol=100)
    async with running_sim(cfg) as sim:
        sim.burst(250)

        async def done() -> bool:
            return bool(sim.stats()["totals"]["trades"] == 250)

        await eventually(done, timeout=10, what="burst")
        first = sim.stats()["symbols"]["BTCUSDT"]["first_trade_id"]
        rows = await get_json(sim.rest_url + "/api/v3/historicalTrades", symbol="BTCUSDT", fromId=first, limit=1000)
        # Evicted trades are gone: the answer starts at the oldest one still held.
        assert [r["id"] for r in rows] == list(range(first + 150, first + 250))


async def test_rest_errors_weights_and_429() -> None:
    # The weight budget is per clock minute (as Binance's): a minute that turns during the requests resets it and
    # no 429 comes. Late in a minute, wait for the next one (the requests take a second or two).
    into_minute = time.time() % 60
    if into_minute > 40:
        await asyncio.sleep(60.05 - into_minute)
    cfg = SimConfig(symbols=("BTCUSDT",), rate=50.0, rest_weight_limit=400)
    async with running_sim(cfg) as sim, aiohttp.ClientSession() as http:
        url = sim.rest_url + "/api/v3/depth"
        async with http.get(url, params={"symbol": "NOPEUSDT"}) as r:
            assert r.status == 400 and await r.json() == {"code": -1121, "msg": "Invalid symbol."}
        async with http.get(url) as r:
            assert r.status == 400 and (await r.json())["code"] == -1102
        used = []
        for limit in (100, 500, 1000):
            async with http.get(url, params={"symbol": "BTCUSDT", "limit": str(limit)}) as r:
                assert r.status == 200
                used.append(int(r.headers["X-MBX-USED-WEIGHT-1M"]))
        assert [b - a for a, b in itertools.pairwise(used)] == [25, 50]
        statuses = []
        for _ in range(8):
            async with http.get(url, params={"symbol": "BTCUSDT", "limit": "1000"}) as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert int(r.headers["Retry-After"]) >= 1
                    assert (await r.json())["code"] == -1003
        assert 200 in statuses and statuses[-1] == 429
        params = {"symbol": "BTCUSDT", "limit": "1001"}
        async with http.get(sim.rest_url + "/api/v3/historicalTrades", params=params) as r:
            assert r.status in (400, 429)


async def test_stale_snapshot_is_rejected_then_retry_syncs() -> None:
    cfg = SimConfig(symbols=("BTCUSDT",), rate=400.0, seed=8)
    async with running_sim(cfg) as sim:
        await asyncio.sleep(0.3)
        sim.stale_snapshot("BTCUSDT", 1)
        await asyncio.sleep(0.3)  # the market moves on; the next snapshot served is the frozen one
        async with websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws:
            book = LocalBook()
            book.on_event(json.loads(await ws.recv()))
            url = sim.rest_url + "/api/v3/depth"
            stale = await get_json(url, symbol="BTCUSDT", limit=1000)
            assert stale["lastUpdateId"] < book.buffer[0]["U"]
            assert not book.sync(stale)  # step 4: too old, fetch again
            fresh = await get_json(url, symbol="BTCUSDT", limit=1000)
            assert book.sync(fresh)


async def test_duplicate_trades_resent_with_same_ids() -> None:
    cfg = SimConfig(symbols=("BTCUSDT",), rate=0.0, seed=8)
    async with running_sim(cfg) as sim, websockets.connect(f"{sim.ws_url}/ws/btcusdt@trade") as ws:
        sim.burst(5)
        first = [json.loads(await ws.recv()) for _ in range(5)]
        sim.duplicate_trades("BTCUSDT", 3)
        again = [json.loads(await ws.recv()) for _ in range(3)]
        assert [t["t"] for t in again] == [t["t"] for t in first[2:]]
        assert [(t["p"], t["q"], t["T"], t["m"]) for t in again] == [
            (t["p"], t["q"], t["T"], t["m"]) for t in first[2:]
        ]


async def test_repeated_429s_lead_to_418_ban() -> None:
    cfg = SimConfig(symbols=("BTCUSDT",), rate=0.0, rest_weight_limit=10, rest_429s_before_ban=2, rest_ban_s=30)
    async with running_sim(cfg) as sim, aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(6):
            async with http.get(sim.rest_url + "/api/v3/depth", params={"symbol": "BTCUSDT"}) as r:
                statuses.append(r.status)
                if r.status == 418:
                    assert int(r.headers["Retry-After"]) > 0
        assert statuses == [200, 200, 429, 429, 429, 418]


async def test_time_unit_microsecond() -> None:
    cfg = SimConfig(symbols=("BTCUSDT",), rate=0.0, seed=8)
    async with (
        running_sim(cfg) as sim,
        websockets.connect(f"{sim.ws_url}/stream?streams=btcusdt@trade&timeUnit=MICROSECOND") as us,
        websockets.connect(f"{sim.ws_url}/stream?streams=btcusdt@trade") as ms,
    ):
        sim.burst(1)
        a, b = json.loads(await us.recv())["data"], json.loads(await ms.recv())["data"]
        assert a["t"] == b["t"] and a["E"] == b["E"] * 1000 and a["T"] == b["T"] * 1000
        assert len(str(a["E"])) == 16
        async with aiohttp.ClientSession() as http:
            params = {"symbol": "BTCUSDT", "limit": "1"}
            async with http.get(
                sim.rest_url + "/api/v3/historicalTrades", params=params, headers={"X-MBX-TIME-UNIT": "MICROSECOND"}
            ) as r:
                assert (await r.json())[0]["time"] == a["T"]


async def test_big_diff_with_capped_quantity_keeps_the_book_exact() -> None:
    cfg = SimConfig(symbols=("BTCUSDT",), rate=300.0, seed=12)
    async with running_sim(cfg) as sim:
        stream = "btcusdt@depth@100ms"
        sizes: list[int] = []
        async with websockets.connect(f"{sim.ws_url}/stream?streams={stream}", max_size=None) as ws:
            reader = DepthReader(sim, ws, "BTCUSDT", stream)
            orig = reader.book.on_event

            def spy(ev: dict[str, Any]) -> None:
                sizes.append(len(ev["b"]) + len(ev["a"]))
                if any(q == "92233720368.54775807" for _, q in ev["a"]):
                    sizes.append(-1)
                orig(ev)

            reader.book.on_event = spy  # type: ignore[method-assign]
            task = asyncio.create_task(reader.run())

            async def synced() -> bool:
                return reader.book.applied >= 2

            await eventually(synced, timeout=10, what="sync")
            sim.big_diff("BTCUSDT", 1000)
            await eventually(lambda: _true(-1 in sizes), timeout=10, what="the big diff")
            await assert_book_equals_sim(sim, reader)
            await stop_task(task)
        assert max(sizes) >= 1000 and reader.book.gaps == 0


async def test_prices_and_sizes_look_like_the_real_market() -> None:
    cfg = SimConfig(symbols=("BTCUSDT", "ETHUSDT", "NEWCOINUSDT"), rate=0.0, seed=13, weights="even")
    async with running_sim(cfg) as sim:
        sim.burst(6000)

        async def done() -> bool:
            return bool(sim.stats()["totals"]["trades"] == 6000)

        await eventually(done, timeout=20, what="burst")
        for sym, (low, high) in {
            "BTCUSDT": (55_000, 67_000),
            "ETHUSDT": (2_400, 3_000),
            "NEWCOINUSDT": (0, 1e6),
        }.items():
            rows = await get_json(sim.rest_url + "/api/v3/historicalTrades", symbol=sym, limit=1000)
            prices = [float(r["price"]) for r in rows]
            notionals = sorted(float(r["quoteQty"]) for r in rows)
            assert low < min(prices) and max(prices) < high, sym
            assert 20 < notionals[len(notionals) // 2] < 2_000, sym  # median trade ~150 USDT
            assert 0.2 < sum(r["isBuyerMaker"] for r in rows) / len(rows) < 0.8, sym
            snap = await get_json(sim.rest_url + "/api/v3/depth", symbol=sym, limit=5000)
            best_bid, best_ask = float(snap["bids"][0][0]), float(snap["asks"][0][0])
            assert 0 < best_ask - best_bid < best_bid * 0.001, sym  # a tight spread, never crossed
            assert len(snap["bids"]) >= 150 and len(snap["asks"]) >= 150, sym
