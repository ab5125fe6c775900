"""Fuzzed exchange frames through the real collector, writing as its own ACL user (issue 7).

A scripted Binance-shaped WebSocket sends contiguous valid trades with a few hundred generated bad
frames between them (random bytes, random JSON, valid trades with a field dropped or given a wrong
type, oversized frames, invalid UTF-8). `parse_frame` is the oracle for the verdict: every bad frame
is dead-lettered once with its reason and raw payload and counted; every valid trade reaches the VPS
stream once, in order; the collector keeps running. `make fuzz` runs it with more frames.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import WSMsgType, web
from hypothesis import settings as hypothesis_settings
from prometheus_client import CollectorRegistry

from conftest import eventually
from tickbridge.collector.parser import MAX_FRAME_BYTES, MAX_RAW_KEPT, Rejected, parse_frame
from tickbridge.collector.service import Collector
from tickbridge.core import keys
from tickbridge.core.redis_io import make_client
from tickbridge.core.settings import Settings
from tickbridge.core.tick import Trade
from tickbridge.core.wire import decode_entry
from tickbridge.devstack.tls import VPS_ACL, SecureRedisServer, acl_variables, render_acl

LONG = hypothesis_settings().max_examples > 1000
BAD_FRAMES = 3000 if LONG else 300
pytestmark = pytest.mark.timeout(600 if LONG else 90)

T0 = 1_723_161_255_342
RECV = T0 * 1000


class FrameServer:
    """Just enough of Binance for the collector: the combined stream, a depth snapshot, no back-fill."""

    def __init__(self) -> None:
        self.clients: list[web.WebSocketResponse] = []
        self.connected = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/stream", self._ws)
        app.router.add_get("/api/v3/depth", self._depth)
        app.router.add_get("/api/v3/historicalTrades", self._trades)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        for ws in self.clients:
            await ws.close()
        assert self.runner is not None
        await self.runner.cleanup()

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.clients.append(ws)
        self.connected.set()
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
        return ws

    async def _depth(self, request: web.Request) -> web.Response:
        return web.json_response({"lastUpdateId": 100, "bids": [["10.0", "1.0"]], "asks": [["11.0", "2.0"]]})

    async def _trades(self, request: web.Request) -> web.Response:
        return web.json_response([])

    async def send(self, frames: list[bytes | str]) -> None:
        ws = self.clients[-1]
        for frame in frames:
            await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))


def trade_payload(tid: int) -> dict[str, Any]:
    return {"e": "trade", "E": T0 + tid, "s": "BTCUSDT", "t": tid, "p": f"{100 + tid}.5", "q": "0.01",
            "T": T0 + tid, "m": tid % 2 == 0, "M": True}  # fmt: skip


def wrap(data: object, stream: str = "btcusdt@trade") -> bytes:
    return orjson.dumps({"stream": stream, "data": data})


JUNK_VALUES: list[Any] = [None, True, False, -1, 0, 2**63, 2**64 - 1, -(2**63), 1.5, 1e300, "", "NaN", "inf",
                          "-1", "1e400", "BTCUSDT\n", "x" * 300, [], {}, [["1"]], {"a": [1, {"b": None}]}]  # fmt: skip


def bad_frame(rng: random.Random) -> bytes | str:
    """One generated frame that is not a usable event (the caller checks that with the oracle)."""
    kind = rng.randrange(8)
    base = trade_payload(rng.randrange(1, 10**6))
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 200))
    if kind == 1:
        key = rng.choice(list(base))
        return wrap({k: v for k, v in base.items() if k != key})
    if kind == 2:
        return wrap({**base, rng.choice(["s", "t", "p", "q", "T", "m", "e"]): rng.choice(JUNK_VALUES)})
    if kind == 3:
        text = wrap(base)
        cut = rng.randrange(1, len(text))
        return text[:cut] + (rng.randbytes(3) if rng.random() < 0.5 else b"")
    if kind == 4:
        return wrap(base)[:20] + b"\xff\xfe\xc3\x28" + wrap(base)[20:]
    if kind == 5:
        return wrap(rng.choice(JUNK_VALUES), stream=rng.choice(["btcusdt@trade", "btcusdt@depth@100ms", "x@kline"]))
    if kind == 6:
        return orjson.dumps(rng.choice(JUNK_VALUES))
    return wrap({**base, "pad": "x" * (MAX_FRAME_BYTES + rng.randrange(1, 1000))})


@pytest.fixture
async def exchange() -> AsyncIterator[FrameServer]:
    server = FrameServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def vps(tmp_path: Path) -> Iterator[tuple[SecureRedisServer, dict[str, str]]]:
    passwords = {name: secrets.token_urlsafe(24) for name in acl_variables(VPS_ACL.read_text())}
    server = SecureRedisServer(aclfile=render_acl(VPS_ACL, tmp_path / "vps.acl", passwords), workdir=tmp_path / "r")
    server.start()
    yield server, passwords
    server.stop()


async def test_fuzz_collector_dead_letters_every_bad_frame_and_keeps_every_trade(
    exchange: FrameServer, vps: tuple[SecureRedisServer, dict[str, str]]
) -> None:
    server, passwords = vps
    rng = random.Random(20240808)
    frames: list[bytes | str] = []
    want_ids: list[int] = []
    want_reasons: Counter[str] = Counter()
    want_raw: Counter[bytes] = Counter()
    tid = 0
    while sum(want_reasons.values()) < BAD_FRAMES:
        frame = bad_frame(rng)
        verdict = parse_frame(frame, RECV)
        if not isinstance(verdict, Rejected):
            continue  # a harmless mutation (still a valid trade, or a control reply): not garbage
        frames.append(frame)
        want_reasons[verdict.reason] += 1
        want_raw[verdict.raw] += 1
        if rng.random() < 0.5:
            tid += 1
            frames.append(wrap(trade_payload(tid)))
            want_ids.append(tid)

    settings = Settings(
        binance_ws_url=f"ws://127.0.0.1:{exchange.port}", binance_rest_url=f"http://127.0.0.1:{exchange.port}",
        symbols=("BTCUSDT",), vps_redis_url=server.url_for("collector", passwords["VPS_REDIS_COLLECTOR_PASSWORD"]),
    )  # fmt: skip
    registry = CollectorRegistry()
    collector = Collector(settings, registry)
    task = asyncio.create_task(collector.run())
    admin = make_client(server.url_for("admin", passwords["VPS_REDIS_ADMIN_PASSWORD"]))
    try:
        await asyncio.wait_for(collector.started.wait(), 15)
        await exchange.send(frames)

        async def done() -> bool:
            if task.done():
                return True
            n_dead = await admin.xlen(keys.COLLECTOR_DEAD_LETTER)
            return n_dead >= len(frames) - len(want_ids) and await trade_ids(admin) == want_ids

        await eventually(done, timeout=60 if LONG else 30, what="every frame handled")
        assert not task.done(), f"the collector stopped: {task.exception() if task.done() else ''}"
        assert await trade_ids(admin) == want_ids
        letters: list[tuple[bytes, dict[bytes, bytes]]] = await admin.xrange(keys.COLLECTOR_DEAD_LETTER)  # type: ignore[assignment]
        assert Counter(f[b"reason"].decode() for _, f in letters) == want_reasons
        assert Counter(f[b"raw"] for _, f in letters) == want_raw
        assert all(len(f[b"raw"]) <= MAX_RAW_KEPT for _, f in letters)
        for reason, n in want_reasons.items():
            got = registry.get_sample_value("tickbridge_collector_dead_letters_total", {"reason": reason})
            assert got == n, reason
        denials = await admin.acl_log()
        assert not [d for d in denials if d.get("username") == "collector"], denials
    finally:
        collector.request_stop()
        await asyncio.wait_for(task, 20)
        await admin.aclose()


async def trade_ids(client: aioredis.Redis) -> list[int]:
    rows: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(keys.DEFAULT_STREAM_KEY)  # type: ignore[assignment]
    ticks = [decode_entry(fields) for _, fields in rows]
    return [t.trade_id for t in ticks if isinstance(t, Trade)]
