"""`tickbridge forwarder` with FORWARDER_LANE=live: the fast-forward live lane as a process of its own (issue 16).

In one process (FORWARDER_LANE=both) the lane is a thread of the replaying forwarder, so kill -9 of the
forwarder also stopped live data until it restarted, reconnected and re-primed (recent() p99 3.4 s in the
chaos kills run). Here the lane decides when to run from what it reads itself, every `WATCH_INTERVAL_S`:

- the Brain stream's top (`XINFO STREAM`'s last-generated-id: the ordered path's checkpoint, whoever wrote it);
- the VPS stream's newest entry, and the forwarder's published `buffer_high_id` (VPS hash
  `tickbridge:forwarder:state`): rows spilled above the Brain's top are a backlog too.

The lane runs while the Brain's top is `LIVE_MIN_GAP_MS` or more behind the newest VPS entry, or spilled rows
wait; it stops once the Brain's top **and** the consumer group's last-delivered ID (`XINFO GROUPS`) reach its
cursor (`LiveLane.step` compares the lower of the two). So it also covers a forwarder that is down (its top
stops moving), a restarted one that replays, and the tail of a catch-up where the forwarder is done but the
consumer still works through the Brain stream (stopping at the Brain's top left a hand-over to the consumer's
Brain-tail follower, stale ~1.5 s on a loaded host). Exactly once is unchanged: the lane writes only
the disposable live stream; the ordered forwarder is still the only writer of the Brain stream.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from tickbridge.core import keys
from tickbridge.core.lifecycle import Service
from tickbridge.core.redis_io import execute_packed, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import StreamId, format_stream_id, parse_stream_id
from tickbridge.forwarder.brain_link import read_brain_view
from tickbridge.forwarder.live_lane import LIVE_MIN_BACKLOG, LiveLane

log = logging.getLogger("tickbridge.forwarder.live")

#: The Brain's top this far behind the newest VPS entry is a backlog worth the lane (the ordered path's normal
#: hop is milliseconds; 1,200 entries at the design's live rate).
LIVE_MIN_GAP_MS = 1_000
WATCH_INTERVAL_S = 0.1
#: One watch round trip at most this long (a link that swallows packets must not freeze the figures).
WATCH_TIMEOUT_S = 1.0
ZERO: StreamId = (0, 0)


class LaneWatch:
    """What the lane needs to know (`live_lane.ForwarderView`), read from the VPS and the Brain, not from the
    forwarder's memory."""

    def __init__(self, settings: Settings, stopping: asyncio.Event) -> None:
        self.settings = settings
        self.key = settings.stream_key
        self.state_key = keys.for_exchange(keys.FORWARDER_STATE, settings.exchange)  # its forwarder's, as base.py
        self.stopping = stopping
        self.brain_up = False
        self.vps_ready = False
        self.refused = ""  # the ordered forwarder's business: the live stream is a view either way
        self.checkpoint: StreamId = ZERO
        self.buffer_pending = False
        self.rate = 0.0
        self._backlog = 0
        self._oldest_age = 0.0
        self.gap_ms = 0
        self.vps = make_client(settings.vps_redis_url, settings, timeout=2.0)
        self.brain = make_client(settings.brain_redis_url, settings, timeout=2.0)
        self.behind: Gauge | None = None  # the lane's `forwarder_live_brain_behind_seconds`, once it exists
        self._failures = 0

    def _buffer_part(self) -> tuple[int, StreamId | None]:
        return (0, None)

    async def refresh(self) -> None:
        """One look at both tops; a failed side is marked down (the lane then goes off)."""
        try:
            top, buffer_high = await asyncio.wait_for(self._vps_read(), WATCH_TIMEOUT_S)
            self.vps_ready = True
        except Exception as exc:  # the watch outlives any failure: the lane is off meanwhile
            self._down("VPS", exc)
            self.vps_ready = False
            return
        try:
            brain_top, delivered = await asyncio.wait_for(self._brain_positions(), WATCH_TIMEOUT_S)
            self.brain_up = True
        except Exception as exc:
            self._down("Brain", exc)
            self.brain_up = False
            return
        self._failures = 0
        # The lane's stop point: the ordered path is complete below it on the Brain *and* handed to the consumer.
        self.checkpoint = brain_top if delivered is None else min(brain_top, delivered)
        self.buffer_pending = buffer_high > brain_top
        self.gap_ms = max(0, top[0] - brain_top[0]) if top > brain_top else 0
        if self.behind is not None:
            self.behind.set(self.gap_ms / 1000)
        # LiveLane.wanted() compares the backlog with its minimum: a gap this large counts as one.
        self._backlog = LIVE_MIN_BACKLOG if self.gap_ms >= LIVE_MIN_GAP_MS else 0

    def _down(self, side: str, exc: BaseException) -> None:
        self._failures += 1
        if self._failures in (1, 10) or self._failures % 100 == 0:
            log.warning("live lane watch: %s read failed (%r); lane off until it answers", side, exc)

    async def _vps_read(self) -> tuple[StreamId, StreamId]:
        # HGETALL, not HGET: the forwarder's VPS ACL user has only the former (a small hash: ~10 fields).
        newest, state = await execute_packed(
            self.vps, [("XREVRANGE", self.key, "+", "-", "COUNT", 1), ("HGETALL", self.state_key)]
        )
        if isinstance(newest, BaseException):
            raise newest
        top = parse_stream_id(newest[0][0]) if newest else ZERO
        if isinstance(state, BaseException) or not state:
            return top, ZERO
        fields = state if isinstance(state, dict) else dict(zip(state[::2], state[1::2], strict=False))
        high = fields.get(b"buffer_high_id")
        return top, parse_stream_id(high) if high else ZERO

    async def _brain_positions(self) -> tuple[StreamId, StreamId | None]:
        """The Brain stream's top and the consumer group's last-delivered ID (None: no such group yet)."""
        view = await read_brain_view(self.brain, self.key, self.settings.consumer_group)
        return view.top, view.group

    async def close(self) -> None:
        for client in (self.vps, self.brain):
            try:
                await client.aclose()
            except Exception:
                log.debug("close failed", exc_info=True)


class LiveLaneProcess(Service):
    """FORWARDER_LANE=live: `LaneWatch` in this loop, `LiveLane` in its thread (own connections)."""

    name = "forwarder-live"

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.registry = registry if registry is not None else REGISTRY
        self.watch = LaneWatch(settings, self.stopping)
        self.lane = LiveLane(self.watch, self.registry, figures=False)
        self.watch.behind = self.lane.metrics.brain_behind

    async def run(self) -> None:
        started = time.monotonic()
        log.info("forwarder live lane starting (FORWARDER_LANE=live): %s -> %s", self.watch.key, self.lane.live_key)
        lane = asyncio.create_task(self.lane.run())
        try:
            while not self.stopping.is_set():
                await self.watch.refresh()
                if lane.done():
                    lane.result()  # LiveLane.run only ends on a stop, or raises
                    break
                await self.sleep_or_stop(WATCH_INTERVAL_S)
        finally:
            self.stopping.set()
            await lane
            await self.watch.close()
            log.info("forwarder live lane stopped after %.0fs (%d sent; cursor %s)", time.monotonic() - started,
                     self.lane.sent, format_stream_id(self.lane.cursor) if self.lane.cursor else "-")  # fmt: skip
