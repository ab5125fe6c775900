"""Simulator wire protocol: control messages, error objects, limits and payload shapes vs a real capture."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tickbridge_dev.sim import SimConfig, SimServer
from tickbridge_dev.sim.testing import running_sim

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with running_sim(SimConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=400.0, seed=7)) as s:
        yield s


async def recv_reply(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    """Next control reply (anything with an `id`), skipping data events."""
    async with asyncio.timeout(timeout):
        while True:
            msg = json.loads(await ws.recv())
            if "id" in msg and ("result" in msg or "error" in msg):
                return msg  # type: ignore[no-any-return]


async def recv_stream(ws: ClientConnection, stream: str, timeout: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            msg = json.loads(await ws.recv())
            if msg.get("stream") == stream:
                return msg  # type: ignore[no-any-return]


async def test_subscribe_unsubscribe_list(sim: SimServer) -> None:
    async with websockets.connect(sim.ws_url + "/stream?streams=btcusdt@trade") as ws:
        await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["ethusdt@depth@100ms", "ethusdt@trade"], "id": 1}))
        assert await recv_reply(ws) == {"result": None, "id": 1}
        await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": "abc"}))
        assert await recv_reply(ws) == {
            "result": ["btcusdt@trade", "ethusdt@depth@100ms", "ethusdt@trade"],
            "id": "abc",
        }
        await recv_stream(ws, "ethusdt@depth@100ms")
        await ws.send(json.dumps({"method": "UNSUBSCRIBE", "params": ["btcusdt@trade"], "id": 312}))
        assert await recv_reply(ws) == {"result": None, "id": 312}
        await asyncio.sleep(1.1)  # respect the 5 frames/s limit
        await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": None}))
        assert await recv_reply(ws) == {"result": ["ethusdt@depth@100ms", "ethusdt@trade"], "id": None}
        # After the unsubscribe reply no btcusdt@trade event may arrive.
        for _ in range(50):
            msg = json.loads(await ws.recv())
            assert msg.get("stream") != "btcusdt@trade"


async def test_error_objects(sim: SimServer) -> None:
    async with websockets.connect(sim.ws_url + "/ws") as ws:
        await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["btcusdt@nonsense"], "id": 2}))
        assert await recv_reply(ws) == {"error": {"code": 2, "msg": "Invalid request: invalid stream"}, "id": 2}
        await ws.send("{not json")
        reply = await recv_reply(ws)
        assert reply["id"] is None and reply["error"]["code"] == 3
        assert reply["error"]["msg"].startswith("Invalid JSON")
        await ws.send(json.dumps({"params": [], "id": 4}))
        assert await recv_reply(ws) == {"error": {"code": 2, "msg": "Invalid request: missing field `method`"}, "id": 4}
        await ws.send(json.dumps({"method": "SUBSCRIBEX", "params": [], "id": 5}))
        reply = await recv_reply(ws)
        assert reply["id"] == 5 and reply["error"]["code"] == 2 and "unknown variant" in reply["error"]["msg"]
        await asyncio.sleep(1.1)
        await ws.send(json.dumps({"method": "GET_PROPERTY", "params": ["combined"], "id": 6}))
        assert await recv_reply(ws) == {"result": False, "id": 6}
        await ws.send(json.dumps({"method": "SET_PROPERTY", "params": ["combined", "yes"], "id": 7}))
        assert await recv_reply(ws) == {"error": {"code": 1, "msg": "Invalid value type: expected Boolean"}, "id": 7}
        await ws.send(json.dumps({"method": "SET_PROPERTY", "params": ["colour", True], "id": 8}))
        assert await recv_reply(ws) == {"error": {"code": 0, "msg": "Unknown property"}, "id": 8}
        await ws.send(json.dumps({"method": "SET_PROPERTY", "params": ["combined", True], "id": 9}))
        assert await recv_reply(ws) == {"result": None, "id": 9}
        await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["btcusdt@trade"], "id": 10}))
        assert await recv_reply(ws) == {"result": None, "id": 10}
        # combined switched on live: events now come wrapped
        assert (await recv_stream(ws, "btcusdt@trade"))["data"]["e"] == "trade"


async def test_unknown_symbol_is_silent(sim: SimServer) -> None:
    async with websockets.connect(sim.ws_url + "/ws") as ws:
        await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["xrpxrp@trade"], "id": 1}))
        assert await recv_reply(ws) == {"result": None, "id": 1}
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.7):
                await ws.recv()


async def test_raw_ws_path_sends_bare_payloads(sim: SimServer) -> None:
    async with websockets.connect(sim.ws_url + "/ws/btcusdt@trade") as ws:
        msg = json.loads(await ws.recv())
        assert msg["e"] == "trade" and msg["s"] == "BTCUSDT" and "stream" not in msg


async def test_too_many_incoming_frames_closes_1008(sim: SimServer) -> None:
    async with websockets.connect(sim.ws_url + "/ws") as ws:
        for i in range(7):
            await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": i}))
        with pytest.raises(websockets.ConnectionClosed) as info:
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1008 and info.value.rcvd.reason == "Too many requests"


async def test_stream_limit_1024(sim: SimServer) -> None:
    async with websockets.connect(sim.ws_url + "/ws") as ws:
        params = [f"s{i}usdt@trade" for i in range(1025)]
        await ws.send(json.dumps({"method": "SUBSCRIBE", "params": params, "id": 1}))
        reply = await recv_reply(ws)
        assert reply["id"] == 1 and reply["error"]["code"] == 2
        await ws.send(json.dumps({"method": "SUBSCRIBE", "params": params[:1024], "id": 2}))
        assert await recv_reply(ws) == {"result": None, "id": 2}


async def test_invalid_stream_in_url_rejected(sim: SimServer) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(sim.ws_url + "/stream?streams=btcusdt@bogus"):
            pass
    assert info.value.response.status_code == 400


async def test_connection_attempt_limit() -> None:
    cfg = SimConfig(symbols=("BTCUSDT",), rate=10.0, max_connects_per_5m=2)
    async with running_sim(cfg) as sim:
        for _ in range(2):
            async with websockets.connect(sim.ws_url + "/ws"):
                pass
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(sim.ws_url + "/ws"):
                pass
        assert info.value.response.status_code == 429


# -- payload shapes against the real capture ----------------------------------------------------------------


def shape(value: Any) -> Any:
    """Key order and value types, recursively (lists: the shape of their first element)."""
    if isinstance(value, dict):
        return [(k, shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return ["list", shape(value[0])] if value else ["list"]
    return type(value).__name__


def capture_samples(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with gzip.open(path, "rt") as fh:
        for line in fh:
            obj = json.loads(line.split(" ", 1)[1])
            key = obj["stream"].split("@", 1)[1] if "stream" in obj else "snapshot"
            if key == "depth@100ms" and not (obj["data"]["b"] and obj["data"]["a"]):
                continue  # compare a sample with both sides present
            out.setdefault(key, obj)
            if len(out) == 4:
                return out
    raise AssertionError("capture lacks a sample")


async def test_payload_shapes_match_real_capture(sim: SimServer, binance_data: Path) -> None:
    real = capture_samples(binance_data / "ethusdt_20240808.gz")
    streams = ["ethusdt@trade", "ethusdt@depth@100ms", "ethusdt@bookTicker"]
    got: dict[str, Any] = {}
    async with websockets.connect(sim.ws_url + "/stream?streams=" + "/".join(streams)) as ws:
        async with asyncio.timeout(10):
            while len(got) < 3:
                msg = json.loads(await ws.recv())
                kind = msg["stream"].split("@", 1)[1]
                if kind == "depth@100ms" and not (msg["data"]["b"] and msg["data"]["a"]):
                    continue
                got.setdefault(kind, msg)
    for kind in ("trade", "depth@100ms", "bookTicker"):
        assert shape(got[kind]) == shape(real[kind]), kind
    trade = got["trade"]["data"]
    assert trade["E"] >= trade["T"] and trade["M"] is True and "b" not in trade and "a" not in trade
    assert all(len(x.split(".")[1]) == 8 for x in (trade["p"], trade["q"]))
    params = {"symbol": "ETHUSDT", "limit": "1000"}
    async with aiohttp.ClientSession() as http, http.get(sim.rest_url + "/api/v3/depth", params=params) as r:
        snap = await r.json()
    assert shape(snap) == shape(real["snapshot"])
    assert [float(p) for p, _ in snap["bids"]] == sorted((float(p) for p, _ in snap["bids"]), reverse=True)
    assert [float(p) for p, _ in snap["asks"]] == sorted(float(p) for p, _ in snap["asks"])
    assert float(snap["bids"][0][0]) < float(snap["asks"][0][0])
