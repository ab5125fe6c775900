"""Checkpoints and trimming: what the Brain confirmed, and how long the VPS keeps a delivered copy."""

from __future__ import annotations

import logging
import time

from tickbridge.core.wire import StreamId, format_stream_id
from tickbridge.forwarder.base import ZERO
from tickbridge.forwarder.buffer_audit import BufferAudit

log = logging.getLogger("tickbridge.forwarder.service")


def next_id(entry_id: StreamId) -> str:
    """The smallest ID above `entry_id` (XTRIM MINID keeps IDs >= it)."""
    return format_stream_id((entry_id[0], entry_id[1] + 1))


class Retention(BufferAudit):
    """Confirmed checkpoints, the delayed copy of them in the state hash, and XTRIM of the VPS stream."""

    def _confirmed(self) -> None:
        """Record a confirmed batch; the state hash copy is written by `_maintain` (the Brain's top is the truth)."""
        cursor = self.replay_ts if self.buffer_pending else self.buffer.last_ts
        entry = (time.monotonic(), self.checkpoint, cursor)
        # At most ~10 kept per second: the list now lasts as long as CONSUMER_GROUP lags, not only the
        # retention. Replacing the newest (later time, higher checkpoint) only ever trims later.
        if len(self.confirms) >= 2 and entry[0] - self.confirms[-2][0] < 0.1:
            self.confirms[-1] = entry
        else:
            self.confirms.append(entry)

    async def _save_checkpoint(self) -> None:
        current = (self.checkpoint, self.replay_ts)
        if current != self._saved_checkpoint and await self._note_state(
            confirmed_id=format_stream_id(self.checkpoint), replay_ts=self.replay_ts
        ):
            self._saved_checkpoint = current

    def _retention_floor(self) -> tuple[StreamId, int]:
        """Checkpoint and buffer cursor confirmed more than `delivered_retention_s` ago..."""
        limit = time.monotonic() - self.settings.delivered_retention_s
        floor: tuple[StreamId, int] | None = None
        # ...and only up to what CONSUMER_GROUP received: the Brain stream can be trimmed over the link, the
        # VPS copy is what refills it.
        cap = self.group_floor
        while self.confirms and self.confirms[0][0] <= limit and (cap is None or self.confirms[0][1] <= cap):
            _, cp, cursor = self.confirms.popleft()
            floor = (cp, cursor)
        if floor is None:
            return ZERO, 0
        self.confirms.appendleft((limit, *floor))  # the newest expired confirmation stays the floor
        return floor

    async def _trim(self, floor: StreamId | None = None) -> None:
        """Drop from Redis what is delivered long enough ago, or safely in the buffer; never above that."""
        if floor is None:
            # ...and never above the checkpoint the state hash holds: after a restart the Brain's top is then
            # still on the VPS to be checked against (see _top_problem).
            floor = min(self._retention_floor()[0], self._saved_checkpoint[0])
        floor = min(floor, self.checkpoint)
        target = max(floor, self.buffer_high if self.buffer_known or not self.spill_pending else ZERO)
        if target <= self.trimmed_to:
            return
        removed = int(await self._vps("XTRIM", self.key, "MINID", next_id(target)))
        delivered_part = min(removed, self.retained)
        self.retained -= delivered_part
        self.trimmed_to = target
