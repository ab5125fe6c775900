"""WebSocket connections: one reader task each, reconnects with backoff, and make-before-break rotation on
the lifetime limit, `serverShutdown` or a stale stream."""

from __future__ import annotations

import asyncio
import logging
import time

# picows' websockets-compatible client (Cython): the same API and close semantics as `websockets`, at ~0.8
# instead of ~4.5 core-µs per received frame (the collector's largest per-tick cost after parsing; issue 20).
from picows import websockets
from picows.websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from tickbridge.collector.base import WS_MAX_SIZE, CollectorBase, Connection, Disconnected, Switch
from tickbridge.core.backoff import Backoff
from tickbridge.core.wire import now_us

log = logging.getLogger("tickbridge.collector.service")


class Session(CollectorBase):
    """The connection manager and the per-connection readers (frames go to the bounded inbox)."""

    # --- connections --------------------------------------------------------------------------

    async def _connect(self, reason: str, *, primary: bool) -> Connection | None:
        self._next_gen += 1
        gen = self._next_gen
        try:
            ws = await websockets.connect(
                self.url, max_size=WS_MAX_SIZE, ping_interval=None, open_timeout=10, close_timeout=2,
                compression=None,
            )  # fmt: skip
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            self.metrics.connect_failures.inc()
            log.warning("connect failed (%s): %s", reason, exc)
            return None
        now = time.monotonic()
        conn = Connection(gen=gen, ws=ws, opened=now, last_frame=now)
        assert self._tg is not None
        if primary:  # before any frame of this connection
            self._active_gen = gen
            await self.inbox.put(Switch(gen))
        conn.task = self._tg.create_task(self._read(conn), name=f"collector-ws-{gen}")
        self.conns[gen] = conn
        self.metrics.reconnects.labels(reason).inc()
        self.metrics.connections_open.set(len(self.conns))
        log.info("connection %d open (%s)", gen, reason)
        return conn

    async def _read(self, conn: Connection) -> None:
        inbox = self.inbox
        try:
            async for msg in conn.ws:
                if self.stopping.is_set():
                    # Frames after the stop request are left to the next start (the stored last trade IDs make
                    # it back-fill them): a fast reader would otherwise drain the whole send buffer the server
                    # holds for us during the close handshake, and the stop would wait for all of it.
                    break
                recv = now_us()
                conn.frames += 1
                conn.last_frame = time.monotonic()
                item = (conn.gen, recv, msg)
                try:
                    inbox.put_nowait(item)
                except asyncio.QueueFull:
                    self.metrics.queue_full.labels("inbox").inc()
                    await inbox.put(item)  # stop reading: TCP backpressure
        except ConnectionClosed as exc:
            codes = {f.code for f in (exc.rcvd, exc.sent) if f is not None}
            if 1009 in codes:
                self.metrics.dead_letters.labels("oversized").inc()
            log.info("connection %d closed: %s", conn.gen, exc)
        except OSError as exc:
            log.info("connection %d failed: %s", conn.gen, exc)
        finally:
            conn.closed.set()
            self._wake.set()

    async def _close(self, conn: Connection) -> None:
        try:
            await conn.ws.close()
        except Exception:  # closing a broken socket: nothing left to save
            pass
        if conn.task is not None:
            await conn.task
        self.conns.pop(conn.gen, None)
        self._shutdown_gens.discard(conn.gen)
        self.metrics.connections_open.set(len(self.conns))

    async def _wait_wake(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.001))
        except TimeoutError:
            pass
        self._wake.clear()

    def _trigger(self, conn: Connection) -> str | None:
        if self.stopping.is_set():
            return "stop"
        if conn.closed.is_set():
            return "disconnect"
        if conn.gen in self._shutdown_gens:
            return "server_shutdown"
        now = time.monotonic()
        if now - conn.opened >= self.settings.ws_max_lifetime_s:
            return "lifetime"
        if now - conn.last_frame >= self.settings.ws_stale_timeout_s:
            return "stale"
        return None

    async def _manage(self) -> None:
        backoff = Backoff(base=self.reconnect_base_s, cap=30.0)
        reason = "start"
        try:
            while not self.stopping.is_set():
                primary = self.conns.get(self._active_gen)
                if primary is None:
                    conn = await self._connect(reason, primary=True)
                    if conn is None:
                        await self.sleep_or_stop(backoff.next())
                        continue
                    self.metrics.connection_up.set(1)
                    self.started.set()
                    continue
                trigger = self._trigger(primary)
                if trigger is None:
                    lifetime_left = primary.opened + self.settings.ws_max_lifetime_s - time.monotonic()
                    await self._wait_wake(min(1.0, lifetime_left))
                    continue
                if trigger == "stop":
                    break
                if trigger == "disconnect":
                    self.metrics.connection_up.set(0)
                    lived = time.monotonic() - primary.opened
                    await self._close(primary)
                    await self.inbox.put(Disconnected(primary.gen))
                    if lived >= 5.0:
                        backoff.reset()
                    reason = "disconnect"
                    await self.sleep_or_stop(backoff.next())
                    continue
                await self._rotate(primary, trigger, backoff)
        finally:
            for conn in list(self.conns.values()):
                await self._close(conn)
            self.metrics.connection_up.set(0)
            # Unfinished REST work is dropped: the hash still holds the last appended trade ID, so the next
            # start back-fills that gap again, and the books resync anyway.
            for task in (*self._snap_tasks.values(), *self._backfill_tasks.values()):
                task.cancel()
            await self.inbox.put(None)

    async def _rotate(self, old: Connection, reason: str, backoff: Backoff) -> None:
        """Make-before-break: open the replacement, let it join the books, then retire `old`."""
        log.info("rotating connection %d (%s)", old.gen, reason)
        new = await self._connect(reason, primary=False)
        if new is None:
            if reason == "stale" or old.closed.is_set():
                await self._close(old)  # nothing to keep: plain reconnect with backoff
                self.metrics.connection_up.set(0)
                await self.inbox.put(Disconnected(old.gen))
            await self.sleep_or_stop(backoff.next())
            return
        if reason != "stale":
            deadline = time.monotonic() + self.join_timeout_s
            while not (self.stopping.is_set() or old.closed.is_set() or new.closed.is_set()):
                if new.frames and self._joined_all(new.gen):
                    break
                if time.monotonic() >= deadline:
                    log.warning("connection %d did not join every book in %.0fs", new.gen, self.join_timeout_s)
                    break
                await self._wait_wake(0.05)
        if new.closed.is_set() and not old.closed.is_set() and reason != "stale":
            await self._close(new)  # the replacement died first: keep the old one, try again later
            await self.sleep_or_stop(backoff.next())
            return
        await self._close(old)  # its reader has put every frame it got into the inbox
        self._active_gen = new.gen
        await self.inbox.put(Switch(new.gen))
        self.metrics.connection_up.set(1)
        log.info("connection %d is primary, %d retired", new.gen, old.gen)

    def _joined_all(self, gen: int) -> bool:
        return all(self._joined.get(s) == gen for s, sync in self.depth.items() if sync.valid)
