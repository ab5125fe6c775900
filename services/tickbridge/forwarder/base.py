"""The forwarder's state and its access to the three links (VPS Redis, Brain Redis, QuestDB buffer).

The forwarder is one task; its work is layered, each layer a class in a file of its own that uses only the
layers below it: this base (state, link wrappers), `buffer_audit` (what the buffer owes: ledger, quarantine),
`retention` (checkpoints, trimming), `recovery` (state hash and buffer after a restart), `spilling` (RAM and
disk budgets), `brain_link` (trusting and writing the Brain stream), `monitor` (gauges), and `service` (the
loop: one step of shipping from Redis or replaying from the buffer, the mode, maintenance).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import aiohttp
from prometheus_client import REGISTRY, CollectorRegistry
from questdb.ingress import IngressError
from redis.exceptions import OutOfMemoryError, ResponseError

from tickbridge.core import keys
from tickbridge.core.backoff import Backoff
from tickbridge.core.lifecycle import Service
from tickbridge.core.metrics import HopCounts
from tickbridge.core.questdb_io import QuestDBError
from tickbridge.core.rawlink import RawRedis, RawReplyError
from tickbridge.core.redis_io import TRANSIENT_ERRORS, Command, execute_packed, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import StreamId
from tickbridge.forwarder.buffer import SpillBuffer
from tickbridge.forwarder.ledger import Ledger
from tickbridge.forwarder.metrics import ForwarderMetrics

log = logging.getLogger("tickbridge.forwarder.service")

ZERO: StreamId = (0, 0)
QUESTDB_ERRORS: tuple[type[BaseException], ...] = (
    QuestDBError, IngressError, aiohttp.ClientError, TimeoutError, OSError,
)  # fmt: skip


class LinkDown(Exception):
    """A link (brain, vps, questdb) failed; the loop backs off and retries that link only."""

    def __init__(self, target: str, cause: BaseException | str) -> None:
        super().__init__(f"{target}: {cause}")
        self.target = target


#: How far the Brain's top may run ahead of the newest VPS entry and of this host's clock (clock skew between
#: the hosts) before it is refused as a top in the future.
TOP_SLACK_MS = 5_000


class VpsFull(Exception):
    """The VPS Redis refused a write with OOM (`maxmemory`, `noeviction`): it still reads, trims and deletes."""


class Mode(StrEnum):
    """What the forwarder is doing (metric `forwarder_mode`, state-hash field `mode`)."""

    DIRECT = "direct"  # the Brain is up and nothing is behind: entries go as they come
    REPLAY = "replay"  # the Brain is up, catching up from the buffer or a Redis backlog
    RAM_BACKLOG = "ram_backlog"  # the Brain is down, the backlog is in VPS Redis
    DISK_SPILL = "disk_spill"  # the Brain is down and part of the backlog is in the QuestDB buffer


class ForwarderBase(Service):
    """State of the forwarder and its Redis/QuestDB wrappers (a failure raises `LinkDown` for its link)."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        *,
        buffer_table: str | None = None,
        spill_batch: int = 50_000,
        replay_batch: int = 20_000,
        maintain_interval: float = 0.2,
        stats_interval: float = 2.0,
        live_lane: bool = True,
        lane_figures: bool = False,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.registry = registry if registry is not None else REGISTRY
        self.metrics = ForwarderMetrics(self.registry)
        self.metrics.ram_budget.set(settings.ram_buffer_bytes)
        self.metrics.disk_budget.set(settings.disk_buffer_bytes)
        self.key = settings.stream_key
        # One forwarder per exchange (issue 18): its own state, ledger, quarantine and buffer table.
        self.state_key = keys.for_exchange(keys.FORWARDER_STATE, settings.exchange)
        self.ledger_key = keys.for_exchange(keys.FORWARDER_LEDGER, settings.exchange)
        self.quarantine_key = keys.for_exchange(keys.FORWARDER_QUARANTINE, settings.exchange)
        if buffer_table is None:
            buffer_table = keys.buffer_table_for(settings.exchange)
        self.batch = settings.forward_batch
        #: Hop collector -> Brain stream per configured symbol (fields come as bytes from Redis, str from the buffer).
        self._latency: dict[str | bytes | int | float, HopCounts] = {}
        for symbol in settings.symbols:
            self._latency[symbol] = self._latency[symbol.encode()] = self.metrics.brain_stream_latency.child(symbol)
        self.spill_batch = spill_batch
        self.replay_batch = max(replay_batch, self.batch)
        self.maintain_interval = maintain_interval
        self.stats_interval = stats_interval
        #: Run the fast-forward live lane beside a replay (`live_lane.py`; off only to measure its cost).
        self.live_lane = live_lane
        #: Without the lane, still write the catch-up figures to the Brain (FORWARDER_LANE=ordered).
        self.lane_figures = lane_figures
        self.vps = make_client(settings.vps_redis_url, settings, timeout=10.0)
        self.brain = make_client(settings.brain_redis_url, settings, timeout=5.0)
        self.brain_raw = RawRedis(settings.brain_redis_url, settings, timeout=10.0)
        #: The loop's own lean connection for its blocking XREADs (no pool, no per-reply timer, the reply parsed
        #: in C): ~25 µs less per read on the live hop. Only the loop uses it, one read at a time.
        self.vps_raw = RawRedis(settings.vps_redis_url, settings, timeout=10.0)
        self.buffer = SpillBuffer(settings.vps_questdb_url, settings, table=buffer_table)
        self.checkpoint: StreamId = ZERO  # highest ID the Brain holds
        #: Highest Brain top this forwarder wrote or verified against its VPS copy: an XADD refused as "equal or
        #: smaller" counts as delivered only at or below it (above it, someone else moved the top).
        self.trusted_top: StreamId = ZERO
        #: Last ID CONSUMER_GROUP received on the Brain (last read, or from the state hash); the VPS keeps every
        #: entry above it. None while that group is not on the Brain stream (the VPS then trims by time only).
        self.group_floor: StreamId | None = None
        self.refused = ""  # why the Brain stream is refused ("" while trusted)
        self._group_missing = False
        self.top_slack_ms = TOP_SLACK_MS
        self.buffer_high: StreamId = ZERO  # highest ID moved to the QuestDB buffer
        self.replay_ts = 0  # buffer cursor: rows with ts > replay_ts are not delivered yet
        self.spill_pending = False  # a spill was started and not recorded: the buffer must be read first
        self.buffer_known = False  # buffer_high/last_ts verified against QuestDB
        self.buffer_pending = False  # undelivered rows in the buffer
        self.vps_ready = False
        self.brain_up = False
        self.catching_up = False
        self.mode: Mode | None = None  # None until the first step
        self.trimmed_to: StreamId = ZERO
        self.retained = 0  # delivered entries still in VPS Redis (kept for Brain-side rewinds)
        # (monotonic time, checkpoint, buffer cursor) after each confirmed batch, for delayed trimming
        self.confirms: collections.deque[tuple[float, StreamId, int]] = collections.deque()
        # Capped at 1 s (issue 16): a link that returns is used within about a second, not after a backoff
        # grown during the outage (a reconnect attempt is one XINFO round trip: cheap at 1/s).
        self._brain_backoff = Backoff(0.1, 1.0)
        self._vps_backoff = Backoff(0.1, 5.0)
        self._qdb_backoff = Backoff(0.2, 10.0)
        self._next_brain_try = 0.0
        self._next_qdb_try = 0.0
        self._last_maintain = 0.0
        self._last_stats = 0.0
        self._last_clean = 0.0
        self._last_progress_log = 0.0
        self._rate_mark = (time.monotonic(), 0)
        self._delivered = 0
        self.rate = 0.0
        self.dropped_total = 0
        self._buffer_backlog: tuple[int, StreamId | None] = (0, None)  # last read: rows, oldest ID
        self._prefetch: tuple[tuple[str, Any], asyncio.Task[Any]] | None = None
        self._saved_checkpoint: tuple[StreamId, int] = (ZERO, -1)
        self._last_full_log = -math.inf
        #: The state hash says "a spill may be in flight" (`SPILL_CLEAR` absent, or the old `spill_pending`).
        self._marker_saved = False
        #: What the buffer owes (spills not yet read back), checked by the replay (issue 14, item 4).
        self.ledger = Ledger()
        self.missing_total = 0
        self._quarantined: list[str] = []  # fields of the quarantine hash, oldest first
        self._quarantined_ts = -1  # ts of the last row quarantined (a re-read is not counted twice)
        #: The monitor task's own connection: the backlog gauges stay true while the loop waits on the Brain.
        self.vps_monitor = make_client(settings.vps_redis_url, settings, timeout=2.0)
        self.monitor_interval = 0.5
        self._backlog = 0
        self._oldest_age = 0.0

    async def _vps_cmds(self, commands: Sequence[Command]) -> list[Any]:
        try:
            replies = await execute_packed(self.vps, commands)
        except TRANSIENT_ERRORS as exc:
            raise LinkDown("vps", exc) from exc
        for reply in replies:
            if isinstance(reply, ResponseError):
                if isinstance(reply, OutOfMemoryError):
                    raise VpsFull(str(reply))
                raise RuntimeError(f"VPS Redis rejected a command: {reply}")
        return replies

    async def _vps(self, *command: str | bytes | int | float) -> Any:
        return (await self._vps_cmds([command]))[0]

    async def _vps_read(self, *command: str | bytes | int | float) -> Any:
        """One read on `vps_raw` (never from two tasks at once: a read-ahead uses `_vps`)."""
        try:
            (reply,) = await self.vps_raw.execute([command])
        except TRANSIENT_ERRORS as exc:
            raise LinkDown("vps", exc) from exc
        if isinstance(reply, RawReplyError):
            raise RuntimeError(f"VPS Redis rejected a command: {reply}")
        return reply

    async def _questdb(self, coro: Any) -> Any:
        try:
            return await coro
        except QUESTDB_ERRORS as exc:
            raise LinkDown("questdb", exc) from exc

    async def _save_state(self, **fields: str | int) -> None:
        flat: list[str | int] = []
        for name, value in fields.items():
            flat += [name, value]
        await self._vps("HSET", self.state_key, *flat)

    async def _note_state(self, **fields: str | int) -> bool:
        """A state write that recovery can do without (QuestDB or the Brain hold the truth): a full VPS Redis
        skips it instead of stopping the forwarder, which is what frees memory again."""
        try:
            await self._save_state(**fields)
            return True
        except VpsFull as exc:
            self._vps_full(exc)
            return False

    def _vps_full(self, exc: VpsFull) -> None:
        self.metrics.errors.labels("vps").inc()
        now = time.monotonic()
        if now - self._last_full_log >= 5.0:
            self._last_full_log = now
            log.error("VPS Redis is full (%s): the collector's writes fail too; freeing memory by delivering, "
                      "spilling and trimming", exc)  # fmt: skip

    async def _note_vps(self, cmds: Sequence[Command]) -> None:
        """Ledger and quarantine writes: a full VPS Redis skips them (counted, logged) rather than stopping."""
        if not cmds:
            return
        try:
            await self._vps_cmds(cmds)
        except VpsFull as exc:
            self._vps_full(exc)

    async def _link_down(self, exc: LinkDown) -> None:
        """Back off the failed link (the loop, `Forwarder._link_down`)."""
        raise NotImplementedError
