"""A TCP proxy for the link faults toxiproxy cannot make: resets, refused connects, segment loss.

toxiproxy closes with FIN (`enabled: false`) and resets only connections opened after a `reset_peer` toxic,
and only when they send; the kernel's netem is not available here. `LinkProxy` sits in front of the link
(the forwarder dials it; it dials toxiproxy or Brain Redis) and has four behaviours, switched at any time:

- `pass`: bytes flow both ways.
- `swallow`: nothing moves (a black hole): no byte is read or written, so the kernel buffers fill and the
  peers' writes and reads time out; new connections are accepted (the kernel completes the handshake) and
  held. Nothing is dropped, as TCP retransmits, so a connection that outlives the swallow stays intact.
- `reset`: every open connection is reset (SO_LINGER 0: a TCP RST to both peers), and so is every new one
  right after it is accepted (`refuse=False`, a middlebox or load balancer without a backend), or the
  listener is closed so connects are refused (`refuse=True`, nothing listening).
- `loss`: in `pass`, each 1448-byte segment is lost with probability `loss`; a lost segment arrives one
  retransmission timeout later (200 ms, doubled each time the retransmission is lost too, as TCP's RTO
  backoff), and every byte behind it waits for it (in-order delivery: head-of-line blocking). This is what
  the application sees of loss over TCP with the worst recovery (an RTO, no fast retransmit); congestion
  control is not modelled.

In-process (tests): `await LinkProxy(...).start()`, then `swallow()`, `await reset()`, `await restore()`,
`set_loss(p)`. As a process (the chaos stack): `python -m tickbridge_dev.devstack.linkproxy --upstream host:port
--listen-port P --control-port C`, controlled with `POST /mode {"mode": ..., "refuse": ..., "loss": ...}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tickbridge.core.redis_io import is_closed_transport_error

MSS = 1448
#: TCP's minimum retransmission timeout (Linux), doubled for each repeated loss of the same segment.
RTO_S = 0.2
RTO_CAP_S = 3.2
CHUNK = 65536
QUEUE_CHUNKS = 256


def retransmit_delay(size: int, loss: float, rng: random.Random) -> float:
    """How late a chunk of `size` bytes arrives: the worst of its segments' RTO backoffs (0 if none lost)."""
    if loss <= 0:
        return 0.0
    worst = 0
    for _ in range(max(1, math.ceil(size / MSS))):
        lost = 0
        while lost < 10 and rng.random() < loss:
            lost += 1
        worst = max(worst, lost)
    return float(sum(min(RTO_CAP_S, RTO_S * 2**i) for i in range(worst)))


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER on, 0 s) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass
class ProxyStats:
    accepted: int = 0
    reset: int = 0
    refused_windows: int = 0
    segments_delayed: int = 0
    max_delay_s: float = 0.0
    bytes: int = 0


class LinkProxy:
    """One listening port relayed to one upstream, with switchable faults (see the module docstring)."""

    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1", port: int = 0,
                 seed: int | None = None) -> None:  # fmt: skip
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = port
        self.mode = "pass"
        self.loss = 0.0
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> LinkProxy:
        await self._listen()
        return self

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    async def close(self) -> None:
        await self._unlisten()
        for conn in list(self._conns):
            self._drop(conn, rst=False)

    # -- faults ---------------------------------------------------------------------------------------
    def swallow(self) -> None:
        self.mode = "swallow"
        self._flowing.clear()

    async def reset(self, *, refuse: bool = True) -> None:
        """RST every connection; new ones are refused (`refuse`) or reset as soon as they are accepted."""
        self.mode = "refuse" if refuse else "reset"
        for conn in list(self._conns):
            self._drop(conn, rst=True)
        if refuse:
            if self._server is not None:
                self.stats.refused_windows += 1
            await self._unlisten()
        else:
            await self._listen()

    async def restore(self) -> None:
        self.mode = "pass"
        await self._listen()
        self._flowing.set()

    def set_loss(self, loss: float) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        self.loss = loss

    async def apply(self, mode: str, *, refuse: bool = True, loss: float | None = None) -> None:
        if loss is not None:
            self.set_loss(loss)
        if mode == "pass":
            await self.restore()
        elif mode == "swallow":
            self.swallow()
        elif mode == "reset":
            await self.reset(refuse=refuse)
        else:
            raise ValueError(f"unknown mode {mode!r}")

    # -- relaying -------------------------------------------------------------------------------------
    def _drop(self, conn: _Conn, *, rst: bool) -> None:
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        for task in conn.tasks:
            task.cancel()
        for writer in (conn.client, conn.upstream):
            if writer is None:
                continue
            if rst:
                _rst(writer)
            else:
                writer.close()
        if rst:
            self.stats.reset += 1

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        conn = _Conn(writer)
        self._conns.add(conn)
        if self.mode in ("reset", "refuse"):
            self._drop(conn, rst=True)
            return
        try:
            await self._flowing.wait()  # a swallowed link: the connect "succeeds", nothing answers
            if conn not in self._conns:
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except (OSError, asyncio.CancelledError):
            self._drop(conn, rst=True)  # nothing upstream: the client sees a reset
            return
        if conn not in self._conns:  # reset meanwhile
            _rst(up_writer)
            return
        conn.upstream = up_writer
        done = asyncio.Event()
        conn.tasks = [asyncio.create_task(self._pipe(reader, up_writer, done)),
                      asyncio.create_task(self._pipe(up_reader, writer, done))]  # fmt: skip
        with contextlib.suppress(asyncio.CancelledError):
            await done.wait()
        if conn in self._conns:  # one side closed (FIN): close both
            self._drop(conn, rst=False)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, done: asyncio.Event) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)
        sender = asyncio.create_task(self._send(queue, writer, done))
        last = 0.0
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(CHUNK)
                await self._flowing.wait()
                if not data:
                    break
                delay = retransmit_delay(len(data), self.loss, self._rng)
                if delay:
                    self.stats.segments_delayed += 1
                    self.stats.max_delay_s = max(self.stats.max_delay_s, delay)
                last = max(time.monotonic() + delay, last)
                await queue.put((last, data))
            await queue.put(None)
            await sender
        except (OSError, ConnectionError):
            pass
        finally:
            sender.cancel()
            done.set()

    async def _send(self, queue: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter,
                    done: asyncio.Event) -> None:  # fmt: skip
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
                self.stats.bytes += len(data)
        except (OSError, ConnectionError):
            done.set()  # the peer went away
        except RuntimeError as exc:
            if not is_closed_transport_error(exc):  # uvloop's write to a transport the peer reset
                raise
            done.set()


# -- as a process ---------------------------------------------------------------------------------------
async def _serve(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    proxy = await LinkProxy(host, int(port), port=args.listen_port, seed=args.seed).start()

    async def mode(request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        try:
            if "mode" in body:
                await proxy.apply(str(body["mode"]), refuse=bool(body.get("refuse", True)), loss=body.get("loss"))
            elif body.get("loss") is not None:
                proxy.set_loss(float(body["loss"]))
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"mode": proxy.mode, "loss": proxy.loss})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"mode": proxy.mode, "loss": proxy.loss, "port": proxy.port,
                                  "connections": len(proxy._conns), **proxy.stats.__dict__})  # fmt: skip

    app = web.Application()
    app.router.add_post("/mode", mode)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.control_port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await proxy.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tickbridge_dev.devstack.linkproxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--upstream", required=True, help="host:port to relay to")
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
