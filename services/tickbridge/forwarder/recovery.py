"""Crash recovery: the state hash, the spill marker, and what the QuestDB buffer really holds."""

from __future__ import annotations

import logging
import time

from tickbridge.core.wire import format_stream_id, parse_stream_id
from tickbridge.forwarder.base import ZERO, LinkDown
from tickbridge.forwarder.retention import Retention

log = logging.getLogger("tickbridge.forwarder.service")

#: State-hash field present while no spill is in flight. The marker "a spill may be in flight" is its
#: absence: setting it is an HDEL, which a full Redis (OOM) still accepts, so a spill can always start and
#: then free memory. Clearing it (HSET) comes after the spill trimmed, when there is room again.
SPILL_CLEAR = "spill_clear"


class Recovery(Retention):
    """Reconciles the VPS state hash with QuestDB after a (re)start or a QuestDB outage."""

    async def _recover_vps(self) -> None:
        """Load the state hash and reconcile it with QuestDB (crash recovery of a spill)."""
        raw = await self._vps("HGETALL", self.state_key)
        pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
        state = {k.decode(): v.decode() for k, v in pairs}
        if not self.brain_up:  # connected, the checkpoint is the Brain's top (it may have just rewound)
            self.checkpoint = max(self.checkpoint, parse_stream_id(state.get("confirmed_id", "0-0")))
        self.buffer_high = max(self.buffer_high, parse_stream_id(state.get("buffer_high_id", "0-0")))
        if self.group_floor is None and "group_delivered_id" in state:
            self.group_floor = parse_stream_id(state["group_delivered_id"])
        self.buffer.last_ts = max(self.buffer.last_ts, int(state.get("buffer_ts", "0")))
        # An empty hash is a fresh start (or a Redis that lost everything): nothing known was spilled.
        self.spill_pending = bool(state.get("spill_pending")) or (bool(state) and SPILL_CLEAR not in state)
        self._marker_saved = self.spill_pending
        if not state:
            await self._clear_marker()
        self.dropped_total = max(self.dropped_total, int(state.get("dropped_total", "0")))  # a lifetime count
        self.missing_total = max(self.missing_total, int(state.get("missing_total", "0")))
        await self._load_ledger()
        self.buffer_known = False
        self.trimmed_to = ZERO  # a restarted VPS Redis may hold entries again that we had trimmed
        self.metrics.connected.labels("vps").set(1)
        await self._try_recover_buffer()
        self.retained = await self._count_retained()
        # Nothing older is known to be confirmed: the retention window starts now.
        self.confirms.append((time.monotonic(), self.checkpoint, self.replay_ts))
        self.vps_ready = True
        log.info("state: checkpoint %s, buffer high %s, buffer %s", format_stream_id(self.checkpoint),
                 format_stream_id(self.buffer_high), "pending" if self.buffer_pending else "delivered")  # fmt: skip

    async def _count_retained(self) -> int:
        """Entries at or below the checkpoint still in Redis (bounded by the retention window)."""
        count, start = 0, "-"
        end = format_stream_id(self.checkpoint)
        while True:
            page = await self._vps("XRANGE", self.key, start, end, "COUNT", 10_000)
            count += len(page)
            if len(page) < 10_000:
                return count
            start = "(" + page[-1][0].decode()

    async def _try_recover_buffer(self) -> bool:
        """Make buffer_high/last_ts exact from what QuestDB holds, then trim spilled entries from Redis."""
        if time.monotonic() < self._next_qdb_try:
            return False
        try:
            high, last_ts = await self._questdb(self.buffer.recover())
            if high is not None and high > self.buffer_high:
                log.warning("buffer holds up to %s beyond the saved %s: the last spill committed before a stop",
                            format_stream_id(high), format_stream_id(self.buffer_high))  # fmt: skip
                self.buffer_high = high
            cursor = await self._questdb(self.buffer.first_after(self.checkpoint))
        except LinkDown as exc:
            await self._link_down(exc)
            return False
        self.buffer_pending = cursor is not None
        self.replay_ts = cursor - 1 if cursor is not None else last_ts
        try:
            await self._rebuild_ledger(high, cursor)
            # Rows up to the cursor were delivered before: counted now, before the cleanup may drop them.
            await self._catch_up_ledger(self.replay_ts)
            if cursor is None:
                await self._settle_ledger()  # nothing left to replay: whatever the ledger still owes is lost
        except LinkDown as exc:
            await self._link_down(exc)
            return False
        # The marker goes only once the exact high is saved; while Redis is full it stays (QuestDB is the truth).
        if await self._note_state(buffer_high_id=format_stream_id(self.buffer_high), buffer_ts=self.buffer.last_ts):
            await self._clear_marker()
        self.spill_pending = False
        self.buffer_known = True
        self._qdb_backoff.reset()
        self.metrics.connected.labels("questdb").set(1)
        await self._trim()
        return True

    async def _set_marker(self) -> None:
        await self._vps("HDEL", self.state_key, SPILL_CLEAR)  # allowed with Redis full
        self._marker_saved = True

    async def _clear_marker(self) -> None:
        """Only once the exact buffer_high is saved (or nothing was ever spilled); skipped while Redis is full."""
        if await self._note_state(**{SPILL_CLEAR: 1}):
            await self._vps("HDEL", self.state_key, "spill_pending")  # the field older versions wrote
            self._marker_saved = False

    def _redis_path_safe(self) -> bool:
        """Redis entries may go to the Brain only when no buffer row can precede them."""
        if self.buffer_known:
            return not self.buffer_pending
        return not self.spill_pending and self.buffer_high <= self.checkpoint
