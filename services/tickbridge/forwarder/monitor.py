"""Gauges: delivery rate, buffer size, and the backlog read by a task of its own."""

from __future__ import annotations

import logging
import time

from tickbridge.core.redis_io import execute_packed
from tickbridge.core.wire import StreamId, format_stream_id, parse_stream_id
from tickbridge.forwarder.base import LinkDown
from tickbridge.forwarder.brain_link import BrainLink

log = logging.getLogger("tickbridge.forwarder.service")


class Monitoring(BrainLink):
    """Stats of the loop and the backlog monitor task."""

    async def _stats(self) -> None:
        now = time.monotonic()
        mark_t, mark_n = self._rate_mark
        if now > mark_t:
            self.rate = (self._delivered - mark_n) / (now - mark_t)
        self._rate_mark = (now, self._delivered)
        self.metrics.send_rate.set(self.rate)
        self.metrics.checkpoint_ms.set(self.checkpoint[0])
        if self.buffer_known and now >= self._next_qdb_try:
            try:
                parts = await self._questdb(self.buffer.partitions())
                self.metrics.buffer_rows.set(sum(p.rows for p in parts))
                self.metrics.buffer_bytes.set(sum(p.disk_bytes for p in parts))
                span = (parts[-1].max_ts - parts[0].min_ts) / 3.6e9 if parts else 0.0
                self.metrics.buffer_hours.set(span)
                if self.buffer_pending:
                    rows = await self._questdb(self.buffer.count_after(self.replay_ts))
                    first = await self._questdb(self.buffer.page(self.replay_ts, 1))
                    self._buffer_backlog = (rows, first[0].entry_id if first else None)
                else:
                    self._buffer_backlog = (0, None)
            except LinkDown as exc:
                await self._link_down(exc)
        # The backlog gauges are the monitor task's (`_monitor`); the progress line uses its last figures.
        backlog, buffer_backlog = self._backlog, self._buffer_part()[0]
        if backlog > self.batch and now - self._last_progress_log >= 5.0:
            self._last_progress_log = now
            eta = backlog / self.rate if self.rate > 0 else -1.0
            eta_text = f"{eta:.0f}s" if eta >= 0 else ("measuring" if self.brain_up else "unknown (Brain unreachable)")
            log.info("%s: backlog %d (buffer %d, redis ~%d), oldest %.0fs, drain %.0f/s, ETA %s",
                     self.mode.value if self.mode else "start", backlog, buffer_backlog, backlog - buffer_backlog,
                     self._oldest_age, self.rate, eta_text)  # fmt: skip

    def _buffer_part(self) -> tuple[int, StreamId | None]:
        # While QuestDB cannot be read, the buffer's part of the backlog is its last known value, not 0:
        # the gauges must not fall exactly when the buffer is out of reach.
        return self._buffer_backlog if self.buffer_pending or self.spill_pending else (0, None)

    async def _monitor(self) -> None:
        """Backlog gauges from VPS Redis on a connection of its own, every `monitor_interval`, whatever the loop
        is doing: they stay true while it waits out a Brain write timeout (a link that swallows packets, where
        they once read 0 with 61,147 entries queued) or a slow QuestDB. A failed refresh is retried; the
        loop's own errors are the loop's business (this task never stops the forwarder)."""
        failures = 0
        while not self.stopping.is_set():
            if self.vps_ready:
                try:
                    await self._refresh_backlog()
                    failures = 0
                except Exception as exc:  # a monitor must outlive what it watches (VPS Redis restarts included)
                    failures += 1
                    if failures in (1, 10) or failures % 100 == 0:
                        log.warning("backlog monitor: VPS Redis read failed (%s); gauges keep their last value",
                                    exc)  # fmt: skip
            await self.sleep_or_stop(self.monitor_interval)

    async def _refresh_backlog(self) -> None:
        length_reply, head_reply = await execute_packed(
            self.vps_monitor, [("XLEN", self.key), ("XRANGE", self.key, "-", "+", "COUNT", 1)]
        )
        if isinstance(length_reply, Exception) or isinstance(head_reply, Exception):
            raise RuntimeError(f"{length_reply!r} {head_reply!r}")
        length = int(length_reply)
        cursor = max(self.checkpoint, self.buffer_high)
        if not head_reply:
            redis_backlog = 0
        elif parse_stream_id(head_reply[0][0]) > cursor:
            redis_backlog = length  # no delivered copy left in Redis: exact
        else:
            redis_backlog = max(0, length - self.retained)  # delivered copies still kept: estimated
        buffer_backlog, oldest = self._buffer_part()
        if oldest is None and redis_backlog:
            if parse_stream_id(head_reply[0][0]) > cursor:
                oldest = parse_stream_id(head_reply[0][0])
            else:
                (head,) = await execute_packed(
                    self.vps_monitor, [("XRANGE", self.key, "(" + format_stream_id(cursor), "+", "COUNT", 1)]
                )
                oldest = parse_stream_id(head[0][0]) if head and not isinstance(head, Exception) else None
        backlog = buffer_backlog + redis_backlog
        self._backlog = backlog
        self.metrics.backlog_entries.set(backlog)
        self.metrics.buffer_undelivered.set(buffer_backlog)
        self._oldest_age = max(0.0, time.time() - oldest[0] / 1000) if oldest else 0.0
        self.metrics.backlog_oldest_age.set(self._oldest_age)
        eta = backlog / self.rate if self.rate > 0 else (0.0 if backlog == 0 else -1.0)
        self.metrics.replay_eta.set(eta)
        self.metrics.backlog_refreshed.set(time.time())
