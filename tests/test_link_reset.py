"""A link that resets connections (issue 14, item 3): TCP RSTs and refused connects, as the internet does it.

Under uvloop a write to a connection the peer has reset raises `RuntimeError: unable to perform operation on
<TCPTransport closed=True ...>; the handler is closed`, which was not a transient error: the forwarder exited
when the Brain link was reset. The RST comes from `LinkProxy` (toxiproxy only closes with FIN) in front of a
real Redis; the unit tests run on uvloop, as the roles do, and reset at the moments it was seen: the first
command on a pooled connection (`ensure_group`), the health-check PING, the raw link's round trip on an idle
connection. The end-to-end test runs the forwarder as a process (uvloop) through an outage that swallows,
then resets and refuses, during a spill: it must not exit, and every tick arrives once, in order.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
import websockets
from redis.asyncio.connection import Connection

from conftest import eventually
from test_forwarder_chaos import ForwarderProcess
from test_forwarder_flow import make_settings
from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBHttp
from tickbridge.core.rawlink import RawRedis
from tickbridge.core.redis_io import (
    TRANSIENT_ERRORS,
    ResetSafeConnection,
    ResetSafeSSLConnection,
    ensure_group,
    execute_packed,
    is_closed_transport_error,
    make_client,
)
from tickbridge_dev.devstack.linkproxy import RTO_S, LinkProxy, retransmit_delay
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer
from tickbridge_dev.loadgen.forwarder import LiveWriter, read_stream, verify

CLOSED = "unable to perform operation on <TCPTransport closed=True reading=False 0x7f>; the handler is closed"


def on_uvloop(coro: Callable[[], Awaitable[None]]) -> None:
    """Run a test body on uvloop, the roles' event loop (pytest-asyncio's loop is asyncio's own)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(coro(), 60))  # type: ignore[arg-type]


def pooled(client: Any) -> Connection:
    conns: list[Connection] = list(client.connection_pool._available_connections)
    assert conns, "no idle pooled connection"
    return conns[0]


async def transport_closed(writer: Any) -> None:
    async def closed() -> bool:
        return bool(writer.transport.is_closing())

    await eventually(closed, 5, 0.01, what="the reset seen by the event loop")


def test_only_the_closed_transport_runtime_error_is_transient() -> None:
    assert is_closed_transport_error(RuntimeError(CLOSED))
    assert not is_closed_transport_error(RuntimeError("Event loop is closed"))
    assert not is_closed_transport_error(RuntimeError("unable to perform operation on <TCPTransport>; nope"))
    assert not is_closed_transport_error(ConnectionError(CLOSED))

    class Sub(RuntimeError):
        pass

    assert not is_closed_transport_error(Sub(CLOSED))


async def test_every_role_client_is_reset_safe() -> None:
    """Every role's Redis client comes from `make_client` (VPS and Brain Redis in the collector, forwarder,
    consumer, writer and TieredMarketData), plain or TLS: both connection classes convert the reset."""
    for url, cls in (
        ("redis://127.0.0.1:1/0", ResetSafeConnection),
        ("rediss://127.0.0.1:1/0", ResetSafeSSLConnection),
    ):
        client = make_client(url)
        assert client.connection_pool.connection_class is cls
        await client.aclose()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("moment", ["ensure_group", "execute_packed", "health-check PING", "raw round trip"])
def test_rst_on_idle_redis_connections_is_a_transient_error(redis_server: RedisServer, moment: str) -> None:
    """The first command on a pooled connection the peer reset (`ensure_group`'s XGROUP CREATE, a packed
    batch), the health-check PING before it, and the raw link's round trip on its idle connection each raise
    a transient error, and work again once the link is back."""

    async def body() -> None:
        proxy = await LinkProxy("127.0.0.1", redis_server.port).start()
        url = f"redis://127.0.0.1:{proxy.port}/0"
        client, raw = make_client(url), RawRedis(url)
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "ensure_group": lambda: ensure_group(client, "s", "g"),
            "execute_packed": lambda: execute_packed(client, [("PING",)]),
            "health-check PING": lambda: client.ping(),
            "raw round trip": lambda: raw.execute([("PING",)]),
        }
        try:
            assert await client.ping()
            assert await raw.execute([("PING",)]) == [b"PONG"]
            if moment == "health-check PING":
                pooled(client).next_health_check = -1.0  # due: the next command on it PINGs first
            await proxy.reset(refuse=True)  # RST every connection; reconnects are refused
            assert raw._writer is not None
            await transport_closed(raw._writer)
            await transport_closed(pooled(client)._writer)
            with pytest.raises(TRANSIENT_ERRORS):
                await calls[moment]()
            await proxy.restore()
            await calls[moment]()
        finally:
            await client.aclose()
            await raw.close()
            await proxy.close()

    on_uvloop(body)


@pytest.mark.timeout(90)
def test_rst_on_fresh_connections_is_a_transient_error(redis_server: RedisServer) -> None:
    """Connections accepted and reset at once (a middlebox without a backend): every attempt is a transient
    error, never a RuntimeError, on the pooled client and on the raw link."""

    async def body() -> None:
        proxy = await LinkProxy("127.0.0.1", redis_server.port).start()
        url = f"redis://127.0.0.1:{proxy.port}/0"
        client, raw = make_client(url), RawRedis(url)
        try:
            await proxy.reset(refuse=False)
            for _ in range(20):
                for call in (lambda: ensure_group(client, "s", "g"), lambda: raw.execute([("PING",)])):
                    with pytest.raises(TRANSIENT_ERRORS):
                        await call()
            await proxy.restore()
            assert await client.ping()
        finally:
            await client.aclose()
            await raw.close()
            await proxy.close()

    on_uvloop(body)


@pytest.mark.timeout(120)
def test_rst_on_questdb_http_and_exchange_websocket_is_handled(questdb_server: QuestDBServer) -> None:
    """The sweep's other links: QuestDB over HTTP (aiohttp) and the exchange's WebSocket (websockets) report a
    reset as their own connection errors (aiohttp checks the transport before writing, websockets the state),
    which the roles already retry; this pins it."""

    async def body() -> None:
        host, _, port = questdb_server.url.removeprefix("http://").rpartition(":")
        qproxy = await LinkProxy(host, int(port)).start()

        async def echo(ws: Any) -> None:
            async for msg in ws:
                await ws.send(msg)

        async with websockets.serve(echo, "127.0.0.1", 0) as server:
            wport = next(iter(server.sockets)).getsockname()[1]
            wproxy = await LinkProxy("127.0.0.1", wport).start()
            http = QuestDBHttp(f"http://127.0.0.1:{qproxy.port}")
            try:
                assert await http.ping()
                ws = await websockets.connect(f"ws://127.0.0.1:{wproxy.port}")
                await qproxy.reset(refuse=False)
                await wproxy.reset(refuse=False)
                for _ in range(10):
                    with pytest.raises((aiohttp.ClientError, OSError, TimeoutError)):
                        await http.exec("SELECT 1")
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                for _ in range(10):
                    with pytest.raises((websockets.InvalidHandshake, OSError, TimeoutError)):
                        await websockets.connect(f"ws://127.0.0.1:{wproxy.port}", open_timeout=2)
            finally:
                await http.close()
                await qproxy.close()
                await wproxy.close()

    on_uvloop(body)


def test_loss_emulation_delays_by_rto_backoff() -> None:
    rng = random.Random(1)
    assert retransmit_delay(100_000, 0.0, rng) == 0.0
    delays = [retransmit_delay(1448, 0.10, rng) for _ in range(20_000)]
    lost = [d for d in delays if d]
    assert 0.08 < len(lost) / len(delays) < 0.12
    assert min(lost) == pytest.approx(RTO_S)
    assert any(abs(d - RTO_S * 3) < 1e-9 for d in lost)  # lost twice: 200 ms, then 400 ms


@pytest.mark.chaos
@pytest.mark.timeout(240)
async def test_forwarder_rides_out_link_resets_during_spill(
    redis_factory: Callable[..., RedisServer], questdb_server: QuestDBServer, tmp_path: Path
) -> None:
    """The forwarder (a process, on uvloop) delivers through a link that: resets every connection a few times
    while ticks flow; then swallows everything; then resets every connection and for a while refuses or resets
    every new one; all during a spill (RAM budget 300 kB). It must never exit, and afterwards every tick is on
    the Brain exactly once, in order."""
    vps, brain = redis_factory(), redis_factory()
    proxy = await LinkProxy("127.0.0.1", brain.port).start()
    settings = make_settings(vps, brain, questdb_server)
    env = {
        "VPS_REDIS_URL": vps.url, "BRAIN_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0",
        "VPS_QUESTDB_URL": questdb_server.url, "RAM_BUFFER_BYTES": "300000", "FORWARD_BATCH": "2000",
        "DELIVERED_RETENTION_S": "0.5", "METRICS_PORT": "0", "LOG_LEVEL": "INFO",
        "FORWARDER_BUFFER_TABLE": f"vb_{uuid.uuid4().hex[:8]}",
    }  # fmt: skip
    fw = ForwarderProcess(env, tmp_path / "forwarder.log")
    vps_c, brain_c = make_client(vps.url), make_client(brain.url)
    writer = LiveWriter(vps_c, settings.stream_key, rate=1500)
    stop_writer = asyncio.Event()
    exits: list[int] = []

    def log_tail() -> str:
        return (tmp_path / "forwarder.log").read_text(errors="replace")[-4000:]

    async def watch() -> None:  # a forwarder that exits is restarted, and the test fails at the end
        while True:
            assert fw.proc is not None
            if fw.proc.poll() is not None:
                exits.append(fw.proc.returncode)
                fw.start()
            await asyncio.sleep(0.1)

    async def mode() -> str:
        return (await vps_c.hget(keys.FORWARDER_STATE, "mode") or b"-").decode()

    fw.start()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(writer.run(stop_writer))
            watcher = tg.create_task(watch())

            async def flowing() -> bool:
                return int(await brain_c.xlen(settings.stream_key)) > 1000

            await eventually(flowing, 60, what="ticks flowing through the proxy")
            for _ in range(4):  # resets while flowing: an idle connection is reset between two batches
                await proxy.reset(refuse=False)
                await asyncio.sleep(0.5)  # the fault's duration
                await proxy.restore()
                await asyncio.sleep(1.5)
            proxy.swallow()  # the outage: first a black hole ...
            await asyncio.sleep(6)
            for i in range(6):  # ... then every connection reset, new ones refused or reset
                await proxy.reset(refuse=i % 2 == 1)
                await asyncio.sleep(1.5)
            spilled_before = await vps_c.hget(keys.FORWARDER_STATE, "buffer_high_id")
            await proxy.restore()

            async def direct() -> bool:
                return await mode() == "direct"

            await eventually(direct, 90, interval=0.2, what="caught up after the outage")
            stop_writer.set()

            async def drained() -> bool:
                return int(await brain_c.xlen(settings.stream_key)) >= len(writer.acked)

            await eventually(drained, 60, interval=0.2, what="every tick on the Brain")
            watcher.cancel()
    finally:
        fw.stop()
        await proxy.close()
    assert not exits, f"the forwarder exited on its own (codes {exits}); log:\n{log_tail()}"
    assert spilled_before, "the outage did not spill: the test did not test the spill"
    assert proxy.stats.reset > 5, proxy.stats
    verdict = verify(await read_stream(brain_c, settings.stream_key), {eid: None for _, eid in writer.acked})
    assert verdict.ok, (verdict.missing[:5], verdict)
    await vps_c.aclose()
    await brain_c.aclose()
