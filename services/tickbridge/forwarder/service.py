"""The forwarder loop: deliver, spill, replay and clean up, one step at a time in a single task.

Invariant (what is undelivered): QuestDB buffer rows with ID > checkpoint, then VPS Redis entries with
ID > max(checkpoint, buffer_high). Every buffer row precedes every Redis entry, so "buffer first, then
Redis" is strict ID order. The checkpoint is the Brain stream's top (`last-generated-id`, which survives
trimming), read on every (re)connect; a copy lives in the VPS hash `keys.FORWARDER_STATE`. Because the
Brain rejects an XADD at or below its top, a resent entry is recognised as delivered, never duplicated.

The link's credential can do more than append (issue 14): `XADD … MAXLEN 0` empties the Brain stream and an
`XADD <far-future ID>` makes every later append "equal or smaller". Redis ACLs cannot filter arguments and
scripts run with the caller's rights, so the defence is here: a top above the checkpoint is adopted only if
it is an entry this forwarder wrote (the VPS copy holds it with the same fields, and it is not in the
future); an "equal or smaller" counts as delivered only at or below such a top; a Brain stream that lost
entries CONSUMER_GROUP had not received is refused too. Refusing means: nothing more is sent, counted and
alerted, until an operator repairs the stream (docs/monitoring.md); the VPS keeps every entry above what
CONSUMER_GROUP received, so the rewind that follows the repair refills the Brain from the VPS copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tickbridge.core.lifecycle import Watchdog
from tickbridge.core.redis_io import TRANSIENT_ERRORS, Command
from tickbridge.core.wire import RawEntry, StreamId, format_stream_id, parse_stream_id
from tickbridge.forwarder.base import QUESTDB_ERRORS, TOP_SLACK_MS, ZERO, LinkDown, Mode, VpsFull
from tickbridge.forwarder.book_relay import relay_book_requests
from tickbridge.forwarder.brain_link import ACCEPT_TOP, BrainView
from tickbridge.forwarder.buffer_audit import QUARANTINE_MAX, QUARANTINE_PAYLOAD_BYTES
from tickbridge.forwarder.live_lane import LiveLane
from tickbridge.forwarder.monitor import Monitoring
from tickbridge.forwarder.recovery import SPILL_CLEAR
from tickbridge.forwarder.retention import next_id
from tickbridge.forwarder.spilling import BUFFER_SEGMENTS, DEFAULT_ROW_BYTES, PARTITION_SLACK_BYTES

log = logging.getLogger(__name__)

__all__ = [
    "ACCEPT_TOP",
    "BUFFER_SEGMENTS",
    "DEFAULT_ROW_BYTES",
    "PARTITION_SLACK_BYTES",
    "QUARANTINE_MAX",
    "QUARANTINE_PAYLOAD_BYTES",
    "QUESTDB_ERRORS",
    "SPILL_CLEAR",
    "TOP_SLACK_MS",
    "ZERO",
    "BrainView",
    "Forwarder",
    "LinkDown",
    "Mode",
    "VpsFull",
    "next_id",
]


class Forwarder(Monitoring):
    """`tickbridge forwarder`: moves the VPS stream to the Brain exactly once, in order."""

    name = "forwarder"

    async def run(self) -> None:
        watchdog = Watchdog(default_limit=300.0)
        log.info("forwarder starting: %s -> %s (stream %s)", self.settings.vps_redis_url.split("@")[-1],
                 self.settings.brain_redis_url.split("@")[-1], self.key)  # fmt: skip
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._loop(watchdog))
                tg.create_task(self._monitor())
                if self.live_lane or self.lane_figures:
                    # FORWARDER_LANE=ordered: the lane runs in its own process; this one still reports its backlog.
                    tg.create_task(LiveLane(self, self.registry, send=self.live_lane).run())
                tg.create_task(watchdog.run(self.stopping))
        finally:
            await self._close()

    async def _close(self) -> None:
        self._drop_prefetch()
        if self.vps_ready:
            try:
                await self._save_state(
                    mode="stopped", confirmed_id=format_stream_id(self.checkpoint), replay_ts=self.replay_ts
                )
            except Exception:
                log.warning("could not save state on stop", exc_info=True)
        for client in (self.vps, self.brain, self.vps_monitor):
            try:
                await client.aclose()
            except Exception:
                log.debug("close failed", exc_info=True)
        await self.brain_raw.close()
        await self.vps_raw.close()
        await self.buffer.close()
        log.info("forwarder stopped at checkpoint %s (%d delivered this run)", format_stream_id(self.checkpoint),
                 self._delivered)  # fmt: skip

    async def _loop(self, watchdog: Watchdog) -> None:
        while not self.stopping.is_set():
            watchdog.beat("forwarder-loop")
            try:
                if not self.vps_ready:
                    await self._recover_vps()
                    self._vps_backoff.reset()
                busy = await self._step()
            except LinkDown as exc:
                busy = False
                await self._link_down(exc)
            except TRANSIENT_ERRORS as exc:
                busy = False
                await self._link_down(LinkDown("vps", exc))
            except VpsFull as exc:
                # Not a reason to stop: only delivering and spilling (then trimming) free the memory again.
                busy = False
                self._vps_full(exc)
                await self.sleep_or_stop(self.maintain_interval)
            if not busy:
                await self.sleep_or_stop(0.002)

    async def _link_down(self, exc: LinkDown) -> None:
        self._drop_prefetch()
        self.metrics.errors.labels(exc.target).inc()
        self.metrics.retries.labels(exc.target).inc()
        self.metrics.connected.labels(exc.target).set(0)
        if exc.target == "brain":
            if self.brain_up:
                log.warning("Brain link lost (%s): holding the backlog on the VPS", exc)
            self.brain_up = False
            self._next_brain_try = time.monotonic() + self._brain_backoff.next()
        elif exc.target == "questdb":
            delay = self._qdb_backoff.next()
            log.warning("QuestDB buffer failed (%s); retry in %.1fs", exc, delay)
            self.buffer_known = False  # re-read what QuestDB holds before the next spill or replay
            self._next_qdb_try = time.monotonic() + delay
        else:
            delay = self._vps_backoff.next()
            log.warning("VPS Redis failed (%s); retry in %.1fs", exc, delay)
            self.vps_ready = False
            await self.sleep_or_stop(delay)

    async def _step(self) -> bool:
        now = time.monotonic()
        if not self.brain_up and now >= self._next_brain_try:
            try:
                await self._connect_brain()
            except LinkDown as exc:
                if exc.target != "brain":
                    raise
                self.metrics.retries.labels("brain").inc()
                self.metrics.errors.labels("brain").inc()
                self._next_brain_try = now + self._brain_backoff.next()
        if not self.buffer_known and (self.spill_pending or self.buffer_pending or self.buffer_high > self.checkpoint):
            await self._try_recover_buffer()
        await self._set_mode()
        await self._maintain()
        await self._set_mode()
        if not self.brain_up:
            await self.sleep_or_stop(max(0.0, min(self.maintain_interval, self._next_brain_try - time.monotonic())))
            return True
        if self.buffer_pending:
            if not self.buffer_known:
                await self.sleep_or_stop(self.maintain_interval)
                return True
            return await self._replay_page()
        if not self._redis_path_safe():
            await self.sleep_or_stop(self.maintain_interval)
            return True
        return await self._forward_redis()

    # Read-ahead: the next page (Redis or buffer) is fetched while the current batch is in flight to the
    # Brain. It is used only if it starts exactly where the checkpoint ended up; otherwise it is dropped.

    def _drop_prefetch(self) -> None:
        if self._prefetch is None:
            return
        _, task = self._prefetch
        self._prefetch = None
        if task.done():
            if not task.cancelled():
                task.exception()  # a stale read's failure does not matter; retrieve it so it is not logged
        else:
            task.cancel()

    async def _take_prefetch(self, key: tuple[str, Any]) -> Any:
        if self._prefetch is None or self._prefetch[0] != key:
            self._drop_prefetch()
            return None
        _, task = self._prefetch
        self._prefetch = None
        return await task

    def _start_prefetch(self, key: tuple[str, Any], coro: Any) -> None:
        self._drop_prefetch()
        self._prefetch = (key, asyncio.create_task(coro))

    async def _read_redis(self, cursor: StreamId, *, ahead: bool = False) -> list[RawEntry]:
        """The entries after `cursor`: on the loop's lean connection, or (`ahead`, a read-ahead that runs beside
        the loop) on a pooled one."""
        # BLOCK: wait for new entries without spinning; short so maintenance and stop stay responsive.
        command = ("XREAD", "COUNT", self.batch, "BLOCK", 50, "STREAMS", self.key, format_stream_id(cursor))
        reply = await (self._vps(*command) if ahead else self._vps_read(*command))
        if not reply:
            return []
        # RESP3 answers a map {stream: entries}, RESP2 a list of [stream, entries]
        entries: list[RawEntry] = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        return entries

    async def _forward_redis(self) -> bool:
        cursor = max(self.checkpoint, self.buffer_high)
        entries = await self._take_prefetch(("redis", cursor))
        if entries is None:
            entries = await self._read_redis(cursor)
        if not entries:
            self.catching_up = False
            return True
        self.catching_up = len(entries) >= self.batch
        if self.catching_up:
            after = parse_stream_id(entries[-1][0])
            self._start_prefetch(("redis", after), self._read_redis(after, ahead=True))
        ids = [e[0] for e in entries]
        commands: list[Command] = [(b"XADD", self.key, e[0], *e[1]) for e in entries]
        done = await self._send(ids, commands)
        self.retained += done
        self._confirmed()
        return True

    async def _replay_page(self) -> bool:
        if time.monotonic() < self._next_qdb_try:
            await self.sleep_or_stop(self.maintain_interval)
            return True
        rows = await self._take_prefetch(("buffer", self.replay_ts))
        if not rows:
            # An empty read-ahead may predate a spill since: only a fresh read can end the replay. (A non-empty
            # one stays right: a spill only adds rows after it. So spills keep the read-ahead, and its overlap.)
            rows = await self._questdb(self.buffer.page(self.replay_ts, self.replay_batch))
        if not rows:
            self.buffer_pending = False
            self.replay_ts = max(self.replay_ts, self.buffer.last_ts)
            await self._settle_ledger()
            log.info("buffer replay complete at %s; continuing from Redis", format_stream_id(self.checkpoint))
            return True
        if len(rows) >= self.replay_batch:
            nxt = rows[-1].ts
            self._start_prefetch(("buffer", nxt), self._questdb(self.buffer.page(nxt, self.replay_batch)))
        sendable = await self._check_rows(rows)
        if not sendable:  # all delivered before, or quarantined: move on
            self.replay_ts = rows[-1].ts
            self._confirmed()
            return True
        ids = [format_stream_id(r.entry_id) for r in sendable if r.entry_id is not None]
        commands: list[Command] = [(b"XADD", self.key, ids[i], *r.fields) for i, r in enumerate(sendable)]
        done = await self._send(ids, commands)
        self.metrics.replayed.inc(done)
        if done:
            # Rows after the last sent one were quarantined or delivered before: the page is done.
            self.replay_ts = rows[-1].ts if done == len(sendable) else sendable[done - 1].ts
            self._buffer_backlog = (max(0, self._buffer_backlog[0] - done), self._buffer_backlog[1])
        self._confirmed()
        await self._release_ledger()
        return True

    async def _set_mode(self) -> None:
        if not self.brain_up:
            spilled = self.buffer_pending or self.buffer_high > self.checkpoint
            mode = Mode.DISK_SPILL if spilled else Mode.RAM_BACKLOG
        elif self.buffer_pending or self.catching_up:
            mode = Mode.REPLAY
        else:
            mode = Mode.DIRECT
        if mode != self.mode:
            log.info("mode %s -> %s", self.mode.value if self.mode else "start", mode.value)
            self.mode = mode
            self.metrics.set_mode(mode.value)
            await self._note_state(mode=mode.value)

    async def _maintain(self) -> None:
        now = time.monotonic()
        if now - self._last_maintain < self.maintain_interval:
            return
        self._last_maintain = now
        await self._save_checkpoint()
        await self._trim()
        if self.ledger.entries:
            await self._release_ledger()  # closed entries the Brain now holds (the Redis path moves it too)
        await self._enforce_ram_budget()
        if self.brain_up:
            await relay_book_requests(self.brain, self.vps)
        if self.buffer_known and now >= self._next_qdb_try and now - self._last_clean >= 1.0:
            self._last_clean = now
            try:
                await self._clean_buffer()
            except LinkDown as exc:
                await self._link_down(exc)
        if now - self._last_stats >= self.stats_interval:
            self._last_stats = now
            if self.brain_up:
                try:
                    await self._check_brain()
                except LinkDown as exc:
                    if exc.target != "brain":
                        raise
                    await self._link_down(exc)
            await self._probe_buffer()
            await self._stats()

    async def _probe_buffer(self) -> None:
        """With nothing pending, QuestDB is still looked at now and then, so its `connected` gauge, the buffer
        gauges and the cleanup of delivered partitions come back when it does (not only at the next spill).
        A short ping first: a frozen QuestDB must not hold up delivery."""
        if self.buffer_known or time.monotonic() < self._next_qdb_try:
            return
        try:
            alive = await asyncio.wait_for(self.buffer.http.ping(), 2.0)
        except TimeoutError:
            alive = False
        if alive:
            await self._try_recover_buffer()
        else:
            await self._link_down(LinkDown("questdb", "ping failed"))
