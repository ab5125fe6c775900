"""Simulator faults and connection management: drop, serverShutdown, stall, slow consumer, burst, pause,
ping/pong timeout, lifetime, the HTTP control plane and the CLI process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import websockets
from prometheus_client import CollectorRegistry

from conftest import eventually
from tickbridge_dev.devstack.servers import free_port
from tickbridge_dev.sim import SimConfig
from tickbridge_dev.sim.testing import running_sim

pytestmark = pytest.mark.timeout(40)


async def stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
        await task


async def _true(value: bool) -> bool:
    return value


BASE = SimConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=300.0, seed=9)


def cfg(**kw: object) -> SimConfig:
    from dataclasses import replace

    return replace(BASE, **kw)  # type: ignore[arg-type]


async def test_drop_connections_is_abrupt() -> None:
    reg = CollectorRegistry()
    async with running_sim(cfg(), reg) as sim, websockets.connect(sim.ws_url + "/ws/btcusdt@trade") as ws:
        await ws.recv()
        assert sim.drop_connections() == 1
        with pytest.raises(websockets.ConnectionClosedError) as info:
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
        assert info.value.rcvd is None  # no close frame: the client sees 1006
        assert reg.get_sample_value("tickbridge_sim_disconnects_total", {"reason": "drop"}) == 1
        assert reg.get_sample_value("tickbridge_sim_faults_injected_total", {"action": "drop_connections"}) == 1


@pytest.mark.parametrize("path", ["/stream?streams=btcusdt@trade", "/ws/btcusdt@trade"])
async def test_server_shutdown_event_then_close(path: str) -> None:
    async with running_sim(cfg(shutdown_grace_s=0.3)) as sim, websockets.connect(sim.ws_url + path) as ws:
        await ws.recv()
        sim.server_shutdown()
        events = []
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    events.append(json.loads(await ws.recv()))
        shutdown = [e for e in events if "serverShutdown" in json.dumps(e)]
        assert len(shutdown) == 1
        if path.startswith("/stream"):
            assert shutdown[0]["stream"] == "!serverShutdown" and shutdown[0]["data"]["e"] == "serverShutdown"
        else:
            assert set(shutdown[0]) == {"e", "E"} and shutdown[0]["e"] == "serverShutdown"


async def test_stall_sends_nothing_then_delivers_the_backlog() -> None:
    async with (
        running_sim(cfg(rate=400.0)) as sim,
        websockets.connect(sim.ws_url + "/ws/btcusdt@trade", max_queue=None) as ws,
    ):
        arrivals: list[tuple[float, int]] = []

        async def read() -> None:
            async for raw in ws:
                arrivals.append((time.monotonic(), json.loads(raw)["t"]))

        task = asyncio.create_task(read())
        await eventually(lambda: _true(len(arrivals) > 10), timeout=5, what="first trades")
        sim.stall(1.0)
        await asyncio.sleep(1.6)
        await stop_task(task)
        assert ws.state is websockets.State.OPEN
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert max(gaps) >= 0.9  # silence for the stall
    ids = [t for _, t in arrivals]
    assert ids == list(range(ids[0], ids[-1] + 1))  # nothing lost: the backlog came after


async def raw_ws_client(port: int, path: str) -> socket.socket:
    """A WebSocket handshake on a socket with a tiny receive buffer that then never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    req = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, req.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101")
    return sock


async def test_slow_consumer_is_dropped_fast_one_survives() -> None:
    reg = CollectorRegistry()
    async with running_sim(cfg(rate=0.0), reg) as sim:
        sim.slow_consumer(65536, grace_s=1.0)
        slow = await raw_ws_client(sim.port, "/ws/btcusdt@trade")
        received = 0
        async with websockets.connect(sim.ws_url + "/ws/btcusdt@trade", max_queue=None) as fast:

            async def read() -> None:
                nonlocal received
                async for _ in fast:
                    received += 1

            task = asyncio.create_task(read())
            sim.burst(40_000, "BTCUSDT")

            async def dropped() -> bool:
                return reg.get_sample_value("tickbridge_sim_disconnects_total", {"reason": "slow_consumer"}) == 1

            await eventually(dropped, timeout=20, what="slow consumer dropped")
            await eventually(lambda: _true(received == 40_000), timeout=20, what="fast consumer got everything")
            await stop_task(task)
            assert fast.state is websockets.State.OPEN
        slow.close()


async def test_burst_pause_resume() -> None:
    reg = CollectorRegistry()
    async with running_sim(cfg(rate=200.0), reg) as sim, websockets.connect(sim.ws_url + "/ws/ethusdt@trade") as ws:
        ids: list[int] = []

        async def read() -> None:
            async for raw in ws:
                ids.append(json.loads(raw)["t"])

        task = asyncio.create_task(read())
        await eventually(lambda: _true(len(ids) > 5), timeout=5, what="trades")
        sim.pause()
        await asyncio.sleep(0.2)
        frozen = sim.stats()["symbols"]["ETHUSDT"]["last_trade_id"]
        await asyncio.sleep(0.5)
        assert sim.stats()["symbols"]["ETHUSDT"]["last_trade_id"] == frozen
        assert ids[-1] == frozen
        sim.burst(2000, "ETHUSDT")  # a burst still runs while paused: it is an explicit command
        await eventually(lambda: _true(ids[-1] == frozen + 2000), timeout=10, what="burst delivered")
        sim.resume()
        await eventually(lambda: _true(ids[-1] > frozen + 2000), timeout=5, what="trades after resume")
        assert reg.get_sample_value("tickbridge_sim_connections") == 1
        sent = reg.get_sample_value("tickbridge_sim_messages_sent_total", {"stream_type": "trade"})
        assert sent is not None and sent >= len(ids)
        assert reg.get_sample_value("tickbridge_sim_faults_injected_total", {"action": "burst"}) == 1
        await stop_task(task)
        assert ids == list(range(ids[0], ids[-1] + 1))


async def test_pong_timeout_closes_and_ponging_client_stays() -> None:
    async with running_sim(cfg(ping_interval_s=0.2, pong_timeout_s=0.6)) as sim, aiohttp.ClientSession() as http:
        silent = await http.ws_connect(sim.ws_url + "/ws/btcusdt@trade", autoping=False)
        polite = await http.ws_connect(sim.ws_url + "/ws/btcusdt@trade", autoping=True)
        polite_texts = 0

        async def read_polite() -> None:  # aiohttp answers pings while we read
            nonlocal polite_texts
            async for msg in polite:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    polite_texts += 1

        task = asyncio.create_task(read_polite())
        pings = 0
        t0 = time.monotonic()
        async with asyncio.timeout(5):
            async for msg in silent:
                if msg.type is aiohttp.WSMsgType.PING:
                    pings += 1
                    assert msg.data  # pings carry a payload
                    # An unsolicited pong with another payload must not count as an answer.
                    await silent.pong(b"unsolicited")
        closed_after = time.monotonic() - t0
        assert pings >= 2 and 0.6 <= closed_after < 2.5
        assert silent.close_code == 1008
        await asyncio.sleep(max(0.0, 1.5 - closed_after))
        assert not polite.closed and polite_texts > 0
        await stop_task(task)
        await polite.close()


async def test_lifetime_closes_connection() -> None:
    reg = CollectorRegistry()
    async with running_sim(cfg(lifetime_s=0.5), reg) as sim:
        t0 = time.monotonic()
        async with websockets.connect(sim.ws_url + "/ws/btcusdt@trade") as ws:
            with pytest.raises(websockets.ConnectionClosedOK):
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
        assert 0.5 <= time.monotonic() - t0 < 2.0
        assert reg.get_sample_value("tickbridge_sim_disconnects_total", {"reason": "lifetime"}) == 1


async def test_http_control_plane() -> None:
    async with running_sim(cfg()) as sim, aiohttp.ClientSession() as http:
        async with http.post(sim.rest_url + "/_sim/rate", json={"rate": 5000}) as r:
            assert r.status == 200
        assert sim.rate == 5000.0
        async with http.post(sim.rest_url + "/_sim/fault", json={"action": "pause"}) as r:
            assert r.status == 200 and (await r.json())["ok"] is True
        assert sim.paused
        async with http.post(
            sim.rest_url + "/_sim/fault", json={"action": "skip_trade_ids", "symbol": "BTCUSDT", "count": 3}
        ) as r:
            assert r.status == 200
        assert sim.markets["BTCUSDT"].suppress_trades == 3
        async with http.post(sim.rest_url + "/_sim/fault", json={"action": "explode"}) as r:
            assert r.status == 400
        async with http.post(sim.rest_url + "/_sim/fault", json={"action": "stall", "seconds": 0.1}) as r:
            assert r.status == 200
        async with http.get(sim.rest_url + "/_sim/stats") as r:
            stats = await r.json()
        assert {"first_trade_id", "last_trade_id", "trades", "last_update_id"} <= set(stats["symbols"]["BTCUSDT"])
        assert stats["paused"] is True and stats["totals"]["faults"]["skip_trade_ids"] == 1


async def test_cli_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tickbridge", "sim", "--port", str(port), "--symbols", "BTCUSDT,ETHUSDT",
        "--rate", "100", "--metrics-port", "0",
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
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/btcusdt@trade") as ws:
            assert json.loads(await ws.recv())["s"] == "BTCUSDT"
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tickbridge", "sim", "--mode", "replay"], capture_output=True, text=True, cwd=tmp_path,
        timeout=20,
    )  # fmt: skip
    assert proc.returncode == 2 and "--replay" in proc.stderr
