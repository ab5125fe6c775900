"""The live lane (issue 16): while the forwarder replays a backlog, the newest VPS entries reach the Brain at once.

The ordered path (the forwarder's loop: buffer, then Redis, oldest first, into the Brain stream) stays the only
way into the Brain stream, so the per-symbol streams, WARM's ordered writes and QuestDB get every entry once, in
order, by construction. Beside it, this task copies the entries above a *live cursor* to a second Brain stream,
`<STREAM_KEY>:live` (`keys.live_stream_key`), with their original IDs. That stream is a disposable view: no
group reads it, nothing is checkpointed on it, it is capped (`MAXLEN ~`), and nothing is kept on the VPS or
spilled because of it. The Brain's fast-forward follower (`brain/fastforward.py`) puts its trades into WARM
with the member the ordered path writes (so a trade that comes both ways is one member), and
`TieredMarketData` adds them to HOT (de-duplicated by trade_id).

- The lane starts when the Brain is reachable and the backlog is at least `min_backlog` entries (or the buffer
  holds undelivered rows): its cursor is `prime_ms` before the newest VPS entry (so each symbol has its last
  ticks at once) and never below the checkpoint.
- It follows new entries with `XREAD BLOCK` on a connection of its own and writes them with one pipelined
  `XADD` batch: live ticks go out within ~0.1 s whatever the replay is doing.
- It stops when the ordered replay's checkpoint reaches its cursor (everything it sent is now on the ordered
  path too) or the Brain link drops; after a link cut it starts again at the new top (newest first).
- Every 0.5 s it writes the catch-up figures to its exchange's Brain hash (`keys.catchup_key`:
  `tickbridge:catchup` for Binance, `tickbridge:catchup:<exchange>` otherwise):
  `vps_active`, `vps_backlog`, `vps_buffer`, `vps_oldest_age_s`, `vps_rate`, `vps_eta_s`, `live_start`,
  `live_cursor`, `vps_checkpoint`, `vps_updated` (Unix time). `TieredMarketData.catch_up()` reads them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from tickbridge.core import keys
from tickbridge.core.metrics import counter, gauge
from tickbridge.core.rawlink import RawRedis, RawReplyError
from tickbridge.core.redis_io import TRANSIENT_ERRORS, Command, execute_packed, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import StreamId, format_stream_id, parse_stream_id

log = logging.getLogger("tickbridge.forwarder.live")

#: Approximate cap of the Brain live stream: minutes of live flow, seconds of a burst.
LIVE_MAXLEN = 200_000
#: Backlog (entries) from which the lane runs: below it the ordered path is live enough.
LIVE_MIN_BACKLOG = 5_000
#: The lane starts this long before the newest VPS entry, so every symbol has recent ticks at once.
LIVE_PRIME_MS = 2_000
#: ... and at most this many entries before it.
PRIME_ENTRIES = 2_000
#: A lane this far (ID time) behind the newest VPS entry starts again at the newest: it is a view of the newest
#: ticks, and the entries it skips come by the ordered path (a starved host, or a burst faster than the lane).
LIVE_JUMP_MS = 5_000
LIVE_BATCH = 2_000
STATUS_INTERVAL_S = 0.5
LANE_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, RawReplyError, RuntimeError)
#: "equal or smaller than the target stream top": the entry is already in the live stream (a restarted lane).
_ALREADY = "equal or smaller"


class ForwarderView(Protocol):
    """What the lane reads of the forwarder (its loop owns these; the lane never writes them)."""

    settings: Settings
    key: str
    brain_up: bool
    vps_ready: bool
    refused: str
    checkpoint: StreamId
    buffer_pending: bool
    rate: float
    _backlog: int
    _oldest_age: float

    stopping: asyncio.Event

    def _buffer_part(self) -> tuple[int, StreamId | None]: ...


class LiveLaneMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent = counter(
            "forwarder_live_sent_total", "Entries sent to the Brain live stream (fast-forward lane)", registry=registry
        )
        self.active = gauge(
            "forwarder_live_active", "1 while the live lane runs beside a replay (catch-up)", registry=registry
        )
        self.lag = gauge(
            "forwarder_live_lag_seconds",
            "Age of the newest entry the live lane sent, when it sent it (0 while the lane is off)",
            registry=registry,
        )
        self.errors = counter("forwarder_live_errors_total", "Failed live lane steps", registry=registry)
        self.brain_behind = gauge(
            "forwarder_live_brain_behind_seconds",
            "FORWARDER_LANE=live: how far the Brain stream's top is behind the newest VPS entry (ID time); the "
            "lane runs from 1 s",
            registry=registry,
        )


class LiveLane:
    """The fast-forward lane of one forwarder (a task beside its loop, own VPS and Brain connections)."""

    def __init__(
        self,
        fw: ForwarderView,
        registry: CollectorRegistry,
        *,
        min_backlog: int = LIVE_MIN_BACKLOG,
        prime_ms: int = LIVE_PRIME_MS,
        maxlen: int = LIVE_MAXLEN,
        batch: int = LIVE_BATCH,
        send: bool = True,
        figures: bool = True,
    ) -> None:
        """`send`: run the lane (False: only write the catch-up figures, the ordered half of FORWARDER_LANE);
        `figures`: write the VPS backlog figures (False in the live-only process, which cannot know them: it
        writes only its own `live_*` fields)."""
        self.fw = fw
        self.send = send
        self.figures = figures
        self.key = fw.key
        self.live_key = keys.live_stream_key(fw.key)
        self.catchup_key = keys.catchup_key(fw.settings.exchange)  # this exchange's own hash
        self.min_backlog = min_backlog
        self.prime_ms = prime_ms
        self.maxlen = maxlen
        self.batch = batch
        settings = fw.settings
        self.vps = make_client(settings.vps_redis_url, settings, timeout=5.0)
        self.brain = RawRedis(settings.brain_redis_url, settings, timeout=5.0)
        self.metrics = LiveLaneMetrics(registry)
        self.cursor: StreamId | None = None  # last VPS entry sent on the lane; None while it is off
        self.start_id: StreamId | None = None  # where it started: the live view is complete above it
        self.sent = 0
        self._last_status = 0.0
        self._status_failed = False

    async def run(self) -> None:
        """Run the lane in a thread of its own until the forwarder stops.

        A thread, not a task: the loop's replay pages (parsing 20,000 buffer rows, packing their XADDs) hold
        an event loop for a few hundred ms at a time, and a live tick must not wait behind them (measured: lane
        p50 0.26 s in the forwarder's loop). The GIL is handed over every few ms, so the lane's short steps go
        through. The lane only reads the forwarder's state (plain attributes) and has its own connections."""
        stop = threading.Event()
        thread = asyncio.create_task(asyncio.to_thread(self._thread_main, stop))
        try:
            await asyncio.wait([thread, asyncio.create_task(self.fw.stopping.wait())],
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            stop.set()
            await thread

    def _thread_main(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                asyncio.run(self._run(stop))
            except Exception:  # the lane is a view: it never stops the forwarder
                log.exception("live lane failed; restarting it in 1 s")
                self._off()
                stop.wait(1.0)

    async def _sleep(self, stop: threading.Event, seconds: float) -> bool:
        await asyncio.sleep(seconds)
        return stop.is_set()

    async def _run(self, stop: threading.Event) -> None:
        failures = 0
        try:
            while not stop.is_set():
                try:
                    busy = await self.step()
                    await self._status()
                    failures = 0
                except LANE_ERRORS as exc:
                    self.metrics.errors.inc()
                    failures += 1
                    if failures in (1, 10) or failures % 100 == 0:
                        log.warning("live lane: %s (off until the link is back)", exc)
                    self._off()
                    busy = False
                    if await self._sleep(stop, 0.2):
                        return
                # Figures only: no need to poll at the lane's pace (and steal the GIL from the replay).
                if not busy and await self._sleep(stop, 0.005 if self.send else 0.1):
                    return
        finally:
            await self._close()
            # Fresh connections for a restarted loop (the old ones belong to this one).
            settings = self.fw.settings
            self.vps = make_client(settings.vps_redis_url, settings, timeout=5.0)
            self.brain = RawRedis(settings.brain_redis_url, settings, timeout=5.0)

    async def _close(self) -> None:
        try:
            await self.vps.aclose()
        except Exception:
            log.debug("close failed", exc_info=True)
        await self.brain.close()

    def _off(self) -> None:
        if self.cursor is not None:
            log.info("live lane off at %s (%d sent)", format_stream_id(self.cursor), self.sent)
        self.cursor = self.start_id = None
        self.metrics.active.set(0)
        self.metrics.lag.set(0)

    def wanted(self) -> bool:
        """A catch-up worth a lane: the Brain is up and trusted, and the backlog is large."""
        fw = self.fw
        if not (fw.brain_up and fw.vps_ready) or fw.refused:
            return False
        return fw.buffer_pending or fw._backlog >= self.min_backlog

    async def step(self) -> bool:
        """Start, follow or stop the lane; True if a full batch went (more is waiting)."""
        fw = self.fw
        if not self.send or not (fw.brain_up and fw.vps_ready) or fw.refused:
            self._off()
            return False
        if self.cursor is None and (not self.wanted() or not await self._start()):
            await asyncio.sleep(0.05)
            return False
        assert self.cursor is not None
        if fw.checkpoint >= self.cursor:
            log.info("live lane: the replay reached it (checkpoint %s)", format_stream_id(fw.checkpoint))
            self._off()
            return False
        (reply,) = await execute_packed(
            self.vps, [("XREAD", "COUNT", self.batch, "BLOCK", 100, "STREAMS", self.key, format_stream_id(self.cursor))]
        )
        if isinstance(reply, BaseException):
            raise RuntimeError(f"VPS XREAD: {reply}")
        if not reply:
            return False
        entries: list[tuple[bytes, list[bytes]]] = (
            next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        )
        if not entries:
            return False
        await self._send(entries)
        self.cursor = parse_stream_id(entries[-1][0])
        self.metrics.lag.set(max(0.0, time.time() - self.cursor[0] / 1000))
        if len(entries) >= self.batch:
            await self._jump_if_behind()
            return True
        return False

    async def _jump_if_behind(self) -> None:
        """More is waiting: if the newest VPS entry is LIVE_JUMP_MS or more ahead, start again from it (the live
        view is then complete from the new `live_start` on; `catch_up()` reports the part below as missing)."""
        (newest,) = await execute_packed(self.vps, [("XREVRANGE", self.key, "+", "-", "COUNT", 1)])
        if isinstance(newest, BaseException) or not newest or self.cursor is None:
            return
        behind_ms = parse_stream_id(newest[0][0])[0] - self.cursor[0]
        if behind_ms >= LIVE_JUMP_MS:
            log.warning("live lane %.1fs behind the newest VPS entry: starting again from the newest", behind_ms / 1000)
            self.cursor = None
            await self._start()

    async def _start(self) -> bool:
        (newest,) = await execute_packed(self.vps, [("XREVRANGE", self.key, "+", "-", "COUNT", PRIME_ENTRIES)])
        if isinstance(newest, BaseException):
            raise RuntimeError(f"VPS XREVRANGE: {newest}")
        if not newest:
            return False
        top = parse_stream_id(newest[0][0])
        # `prime_ms` before the top, but at most PRIME_ENTRIES entries (a burst: the ordered path's job).
        oldest = parse_stream_id(newest[-1][0])
        before = (oldest[0], oldest[1] - 1) if oldest[1] else (oldest[0] - 1, 2**63 - 1)
        start = max(self.fw.checkpoint, (max(0, top[0] - self.prime_ms), 0), before)
        if start >= top:
            return False
        self.cursor = self.start_id = start
        self.metrics.active.set(1)
        log.info("live lane on: newest entries from %s go to %s while the backlog (%d) replays",
                 format_stream_id(start), self.live_key, self.fw._backlog)  # fmt: skip
        return True

    async def _send(self, entries: list[tuple[bytes, list[bytes]]]) -> None:
        maxlen = str(self.maxlen).encode()
        cmds: list[Command] = [(b"XADD", self.live_key, b"MAXLEN", b"~", maxlen, eid, *f) for eid, f in entries]
        replies = await self._brain(cmds)
        sent = 0
        for reply in replies:
            if isinstance(reply, RawReplyError):
                if _ALREADY in str(reply):
                    continue  # a restarted lane re-sends what the live stream holds: one copy
                raise reply
            sent += 1
        self.sent += sent
        self.metrics.sent.inc(sent)

    async def _brain(self, cmds: list[Command]) -> list[Any]:
        """Brain commands; a connection that went stale (a link cut since its last use) is reopened once: an
        XADD with an explicit ID and an HSET of the same figures are safe to repeat."""
        try:
            return await self.brain.execute(cmds)
        except ConnectionError:
            return await self.brain.execute(cmds)

    async def _status(self) -> None:
        """The catch-up figures on the Brain, every STATUS_INTERVAL_S while the Brain is up."""
        fw = self.fw
        now = time.monotonic()
        if now - self._last_status < STATUS_INTERVAL_S or not fw.brain_up:
            return
        self._last_status = now
        fields: list[Any] = []
        if self.figures:
            backlog = fw._backlog
            buffer_rows = fw._buffer_part()[0]
            active = self.cursor is not None or fw.buffer_pending or backlog >= self.min_backlog
            eta = backlog / fw.rate if fw.rate > 0 else (0.0 if backlog == 0 else -1.0)
            fields += [
                "vps_active", int(active), "vps_backlog", backlog, "vps_buffer", buffer_rows,
                "vps_oldest_age_s", f"{fw._oldest_age:.3f}", "vps_rate", f"{fw.rate:.1f}", "vps_eta_s", f"{eta:.1f}",
                "vps_checkpoint", format_stream_id(fw.checkpoint), "vps_updated", f"{time.time():.3f}",
            ]  # fmt: skip
        if self.send:
            # `live_updated`: when the lane (in whichever process) last reported (`tickbridge status`).
            fields += ["live_cursor", format_stream_id(self.cursor) if self.cursor else "",
                       "live_updated", f"{time.time():.3f}"]  # fmt: skip
        if self.start_id is not None:
            # Kept after the lane stops: the Brain's view has a gap below it until the consumer passes it.
            fields += ["live_start", format_stream_id(self.start_id)]
        (reply,) = await self._brain([(b"HSET", self.catchup_key, *fields)])
        if isinstance(reply, RawReplyError):
            if not self._status_failed:  # an older Brain ACL without the hash: the lane still runs
                self._status_failed = True
                log.warning("catch-up state not written to the Brain (%s): %s", self.catchup_key, reply)
            return
        self._status_failed = False
