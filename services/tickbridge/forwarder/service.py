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
import collections
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import aiohttp
import orjson
from prometheus_client import REGISTRY, CollectorRegistry
from questdb.ingress import IngressError
from redis.exceptions import OutOfMemoryError, ResponseError

from tickbridge.core import keys
from tickbridge.core.backoff import Backoff
from tickbridge.core.lifecycle import Service, Watchdog
from tickbridge.core.metrics import HopCounts
from tickbridge.core.questdb_io import QuestDBError
from tickbridge.core.rawlink import RawRedis, RawReplyError
from tickbridge.core.redis_io import TRANSIENT_ERRORS, Command, execute_packed, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import RawEntry, StreamId, format_stream_id, now_us, parse_stream_id
from tickbridge.forwarder.buffer import BufferRow, Partition, SpillBuffer
from tickbridge.forwarder.ledger import Ledger, LedgerEntry, segments
from tickbridge.forwarder.metrics import ForwarderMetrics

log = logging.getLogger(__name__)

ZERO: StreamId = (0, 0)
QUESTDB_ERRORS: tuple[type[BaseException], ...] = (
    QuestDBError, IngressError, aiohttp.ClientError, TimeoutError, OSError,
)  # fmt: skip


class LinkDown(Exception):
    """A link (brain, vps, questdb) failed; the loop backs off and retries that link only."""

    def __init__(self, target: str, cause: BaseException | str) -> None:
        super().__init__(f"{target}: {cause}")
        self.target = target


#: State-hash field present while no spill is in flight. The marker "a spill may be in flight" is its
#: absence: setting it is an HDEL, which a full Redis (OOM) still accepts, so a spill can always start and
#: then free memory. Clearing it (HSET) comes after the spill trimmed, when there is room again.
SPILL_CLEAR = "spill_clear"


#: The disk budget is held in segments of at most 1/BUFFER_SEGMENTS of it (one partition each at most).
BUFFER_SEGMENTS = 4
#: Bytes per buffer row before any is measured (254 measured: VARCHAR payload, page slack).
DEFAULT_ROW_BYTES = 300
#: What a partition may take above its rows: column files grow by whole pages
#: (`cairo.writer.data.append.page.size`, 1 MiB on the VPS, over 7 files; an almost empty partition is ~7 MiB).
PARTITION_SLACK_BYTES = 8 * 2**20

#: Quarantined buffer rows kept (capped copies) in `keys.FORWARDER_QUARANTINE`; the oldest IDs go first.
QUARANTINE_MAX = 256
QUARANTINE_PAYLOAD_BYTES = 2048


class VpsFull(Exception):
    """The VPS Redis refused a write with OOM (`maxmemory`, `noeviction`): it still reads, trims and deletes."""


def _id_order(field: str) -> tuple[int, int]:
    """Quarantine fields are entry IDs (or `ts:<n>` when the ID was unreadable): oldest first."""
    try:
        return parse_stream_id(field)
    except ValueError:
        return (0, 0)


#: The contract's last field (bytes as read from Redis, str as read back from the buffer).
_RECV_TS = (b"recv_ts", "recv_ts")

#: State-hash field an operator sets (as the VPS admin) to accept a Brain top the VPS cannot vouch for.
ACCEPT_TOP = "accept_top"
#: How far the Brain's top may run ahead of the newest VPS entry and of this host's clock (clock skew between
#: the hosts) before it is refused as a top in the future.
TOP_SLACK_MS = 5_000


@dataclass(frozen=True, slots=True)
class BrainView:
    """What the forwarder reads of the Brain stream: top, oldest and newest entry, CONSUMER_GROUP's position."""

    top: StreamId
    first: StreamId | None
    last: tuple[StreamId, list[bytes]] | None
    group: StreamId | None  # last-delivered-id of CONSUMER_GROUP; None without that group


def _pairs(reply: Any) -> dict[bytes, Any]:
    """An XINFO reply as a dict (RESP3 answers a map, RESP2 a flat list)."""
    if isinstance(reply, dict):
        return reply
    return {reply[i]: reply[i + 1] for i in range(0, len(reply) - 1, 2)}


def next_id(entry_id: StreamId) -> str:
    """The smallest ID above `entry_id` (XTRIM MINID keeps IDs >= it)."""
    return format_stream_id((entry_id[0], entry_id[1] + 1))


class Forwarder(Service):
    """`tickbridge forwarder`: moves the VPS stream to the Brain exactly once, in order."""

    name = "forwarder"

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        *,
        buffer_table: str = keys.VPS_BUFFER_TABLE,
        spill_batch: int = 50_000,
        replay_batch: int = 20_000,
        maintain_interval: float = 0.2,
        stats_interval: float = 2.0,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.metrics = ForwarderMetrics(registry if registry is not None else REGISTRY)
        self.metrics.ram_budget.set(settings.ram_buffer_bytes)
        self.metrics.disk_budget.set(settings.disk_buffer_bytes)
        self.key = settings.stream_key
        self.batch = settings.forward_batch
        #: Hop collector -> Brain stream per configured symbol (fields come as bytes from Redis, str from the buffer).
        self._latency: dict[str | bytes | int | float, HopCounts] = {}
        for symbol in settings.symbols:
            self._latency[symbol] = self._latency[symbol.encode()] = self.metrics.brain_stream_latency.child(symbol)
        self.spill_batch = spill_batch
        self.replay_batch = max(replay_batch, self.batch)
        self.maintain_interval = maintain_interval
        self.stats_interval = stats_interval
        self.vps = make_client(settings.vps_redis_url, settings, timeout=10.0)
        self.brain = make_client(settings.brain_redis_url, settings, timeout=5.0)
        self.brain_raw = RawRedis(settings.brain_redis_url, settings, timeout=10.0)
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
        self.mode = ""
        self.trimmed_to: StreamId = ZERO
        self.retained = 0  # delivered entries still in VPS Redis (kept for Brain-side rewinds)
        # (monotonic time, checkpoint, buffer cursor) after each confirmed batch, for delayed trimming
        self.confirms: collections.deque[tuple[float, StreamId, int]] = collections.deque()
        self._brain_backoff = Backoff(0.1, 10.0)
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

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        watchdog = Watchdog(default_limit=300.0)
        log.info("forwarder starting: %s -> %s (stream %s)", self.settings.vps_redis_url.split("@")[-1],
                 self.settings.brain_redis_url.split("@")[-1], self.key)  # fmt: skip
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._loop(watchdog))
                tg.create_task(self._monitor())
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

    # ------------------------------------------------------------------ Redis / QuestDB wrappers

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

    async def _questdb(self, coro: Any) -> Any:
        try:
            return await coro
        except QUESTDB_ERRORS as exc:
            raise LinkDown("questdb", exc) from exc

    async def _save_state(self, **fields: str | int) -> None:
        flat: list[str | int] = []
        for name, value in fields.items():
            flat += [name, value]
        await self._vps("HSET", keys.FORWARDER_STATE, *flat)

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

    # ------------------------------------------------------------------ recovery

    async def _recover_vps(self) -> None:
        """Load the state hash and reconcile it with QuestDB (crash recovery of a spill)."""
        raw = await self._vps("HGETALL", keys.FORWARDER_STATE)
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
        await self._vps("HDEL", keys.FORWARDER_STATE, SPILL_CLEAR)  # allowed with Redis full
        self._marker_saved = True

    async def _clear_marker(self) -> None:
        """Only once the exact buffer_high is saved (or nothing was ever spilled); skipped while Redis is full."""
        if await self._note_state(**{SPILL_CLEAR: 1}):
            await self._vps("HDEL", keys.FORWARDER_STATE, "spill_pending")  # the field older versions wrote
            self._marker_saved = False

    def _redis_path_safe(self) -> bool:
        """Redis entries may go to the Brain only when no buffer row can precede them."""
        if self.buffer_known:
            return not self.buffer_pending
        return not self.spill_pending and self.buffer_high <= self.checkpoint

    # ------------------------------------------------------------------ Brain link

    async def _brain_view(self) -> BrainView:
        """The Brain stream's last-generated-id (what the Brain holds; survives its own trimming), its first and
        last entries and CONSUMER_GROUP's last-delivered-id. XINFO STREAM goes first: the group only moves up
        meanwhile, so a legitimate trim never looks like a loss."""
        try:
            info, groups = await execute_packed(
                self.brain, [("XINFO", "STREAM", self.key), ("XINFO", "GROUPS", self.key)]
            )
        except TRANSIENT_ERRORS as exc:
            raise LinkDown("brain", exc) from exc
        if isinstance(info, ResponseError):
            if "no such key" in str(info):  # the forwarder no longer creates it: a fresh Brain has nothing yet
                return BrainView(ZERO, None, None, None)
            raise LinkDown("brain", str(info))
        if isinstance(groups, ResponseError):
            raise LinkDown("brain", str(groups))
        fields = _pairs(info)
        first, last = fields.get(b"first-entry"), fields.get(b"last-entry")
        wanted = self.settings.consumer_group.encode()
        group = next(
            (parse_stream_id(g[b"last-delivered-id"]) for g in map(_pairs, groups) if g[b"name"] == wanted), None
        )
        return BrainView(
            top=parse_stream_id(fields[b"last-generated-id"]),
            first=parse_stream_id(first[0]) if first else None,
            last=(parse_stream_id(last[0]), list(last[1])) if last else None,
            group=group,
        )

    async def _adopt_top(self, top: StreamId) -> None:
        """Make the Brain's top the checkpoint; behind ours means the Brain lost writes: rewind and resend."""
        if top == self.checkpoint:
            return
        if top < self.checkpoint:
            self.metrics.rewinds.inc()
            log.warning("Brain stream top %s is behind the checkpoint %s (the Brain lost acknowledged writes): "
                        "resending from the VPS copy", format_stream_id(top),
                        format_stream_id(self.checkpoint))  # fmt: skip
        self.checkpoint = top
        if self.buffer_known:
            # Where the buffer replay must restart (rows up to the Brain's top are delivered).
            cursor = await self._questdb(self.buffer.first_after(top))
            self.buffer_pending = cursor is not None
            if cursor is not None:
                self.replay_ts = cursor - 1
                await self._catch_up_ledger(self.replay_ts)  # a top ahead of us: what it holds was delivered
            else:
                await self._settle_ledger()
        await self._note_state(confirmed_id=format_stream_id(top))

    async def _top_problem(self, view: BrainView) -> tuple[str, str] | None:
        """Why the Brain's top must not become the checkpoint, or None. A top at or below the checkpoint is safe
        (resending only repairs); above it, it must be an entry this forwarder wrote."""
        top = view.top
        if top <= self.checkpoint:
            return None
        newest = await self._vps("XREVRANGE", self.key, "+", "-", "COUNT", 1)
        ours_ms = max(parse_stream_id(newest[0][0]) if newest else ZERO, self.buffer_high)[0]
        base_ms = max(ours_ms, int(time.time() * 1000))
        if top[0] > base_ms + self.top_slack_ms:
            return "future_top", (f"top {format_stream_id(top)} is {(top[0] - base_ms) / 1000:.0f}s ahead of the "
                                  "newest VPS entry and of the clock")  # fmt: skip
        if view.last is None or view.last[0] != top:
            return "foreign_top", f"top {format_stream_id(top)} has no entry left on the Brain, so it cannot be checked"
        copy = await self._vps("XRANGE", self.key, format_stream_id(top), format_stream_id(top))
        if copy:
            if list(copy[0][1]) == view.last[1]:
                return None
            return "foreign_top", f"entry {format_stream_id(top)} on the Brain differs from the VPS copy"
        if self.buffer_known and top <= self.buffer_high and await self._in_buffer(top, view.last[1]):
            return None
        # A real top the VPS lost (a VPS power cut after delivery) looks the same: an operator who checked it
        # accepts it in the VPS state hash (docs/monitoring.md), which the Brain's credential cannot reach.
        accepted = await self._vps("HGETALL", keys.FORWARDER_STATE)
        fields = accepted if isinstance(accepted, dict) else dict(zip(accepted[::2], accepted[1::2], strict=True))
        if fields.get(ACCEPT_TOP.encode()) == format_stream_id(top).encode():
            log.warning(
                "Brain top %s accepted by the operator (%s in the state hash)", format_stream_id(top), ACCEPT_TOP
            )
            return None
        return "foreign_top", f"top {format_stream_id(top)} is no entry the VPS holds"

    async def _in_buffer(self, entry_id: StreamId, fields: list[bytes]) -> bool:
        """The QuestDB buffer holds `entry_id` with these fields (delivered by a replay before a restart)."""
        before = (entry_id[0], entry_id[1] - 1) if entry_id[1] else (entry_id[0] - 1, 2**63 - 1)
        cursor = await self._questdb(self.buffer.first_after(before))
        if cursor is None:
            return False
        rows = await self._questdb(self.buffer.page(cursor - 1, 1))
        if not rows or rows[0].entry_id != entry_id:
            return False
        return [f.encode() if isinstance(f, str) else f for f in rows[0].fields] == fields

    async def _lost_problem(self, view: BrainView) -> tuple[str, str] | None:
        """Entries delivered (at or below the checkpoint) but gone from the Brain before CONSUMER_GROUP received
        them: an entry the VPS holds between the group's position and the Brain's first entry."""
        if view.group is None or self.checkpoint <= view.group:
            return None
        end = format_stream_id(self.checkpoint)
        if view.first is not None and view.first <= self.checkpoint:
            end = "(" + format_stream_id(view.first)
        gap = await self._vps("XRANGE", self.key, "(" + format_stream_id(view.group), end, "COUNT", 1)
        if not gap:
            return None
        return "lost_entries", (f"entries from {gap[0][0].decode()} on were delivered but are gone from the Brain "
                                f"before {self.settings.consumer_group} received them")  # fmt: skip

    async def _note_group(self, group: StreamId | None) -> None:
        if (group is None) != self._group_missing:
            self._group_missing = group is None
            self.metrics.brain_group_missing.set(1 if group is None else 0)
            if group is None:
                log.warning(
                    "consumer group %s is not on the Brain stream (CONSUMER_GROUP differs between the "
                    "hosts, or no consumer ran yet): the VPS trims by time only",
                    self.settings.consumer_group,
                )
        if group is None:
            self.group_floor = None
            return
        self.metrics.brain_group_ms.set(group[0])
        if group != self.group_floor:
            self.group_floor = group
            await self._note_state(group_delivered_id=format_stream_id(group))

    def _refuse(self, reason: str, detail: str) -> NoReturn:
        if self.refused != reason:
            if self.refused:
                self.metrics.brain_refused.labels(self.refused).set(0)
            self.refused = reason
            self.metrics.brain_refusals.labels(reason).inc()
            self.metrics.brain_refused.labels(reason).set(1)
            floor = format_stream_id(self.group_floor) if self.group_floor is not None else "unknown"
            log.error("REFUSING the Brain stream (%s): %s. Nothing is sent or trimmed on its word; the VPS keeps "
                      "every entry above %s (what %s received). Repair: docs/monitoring.md, "
                      "ForwarderBrainStreamRefused", reason, detail, floor, self.settings.consumer_group)  # fmt: skip
        raise LinkDown("brain", f"refused ({reason}): {detail}")

    async def _inspect_brain(self) -> None:
        """Adopt the Brain's top if this forwarder can vouch for it; otherwise refuse the Brain stream."""
        view = await self._brain_view()
        await self._note_group(view.group)
        problem = await self._top_problem(view)
        if problem is None:
            await self._adopt_top(view.top)
            self.trusted_top = self.checkpoint
            problem = await self._lost_problem(view)
        if problem is not None:
            self._refuse(*problem)
        if self.refused:
            log.warning("the Brain stream is trusted again (was refused: %s): resuming after %s", self.refused,
                        format_stream_id(self.checkpoint))  # fmt: skip
            self.metrics.brain_refused.labels(self.refused).set(0)
            self.refused = ""

    async def _connect_brain(self) -> None:
        await self._inspect_brain()
        self.brain_up = True
        self.catching_up = True
        self._brain_backoff.reset()
        self.metrics.connected.labels("brain").set(1)
        log.info("Brain connected: resuming after %s", format_stream_id(self.checkpoint))

    async def _check_brain(self) -> None:
        """While idle, notice a Brain restart that lost data (no write fails to tell us), a top someone else
        wrote, and entries lost before CONSUMER_GROUP received them."""
        await self._inspect_brain()

    async def _send(self, ids: Sequence[bytes | str], commands: Sequence[Command]) -> int:
        """XADD a batch with the original IDs; advance the checkpoint over what the Brain now holds."""
        t0 = time.perf_counter()
        try:
            replies = await self.brain_raw.execute(commands)
        except TRANSIENT_ERRORS as exc:
            raise LinkDown("brain", exc) from exc
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        confirmed_us = now_us()
        sent = dup = 0
        failed: RawReplyError | str | None = None
        for i, reply in enumerate(replies):
            if isinstance(reply, RawReplyError):
                if "equal or smaller than the target stream top" in str(reply):
                    if parse_stream_id(ids[i]) <= self.trusted_top:
                        dup += 1
                        continue
                    # Not a top we wrote: someone moved it. Nothing from here on counts; the reconnect checks it.
                    failed = (
                        f"{format_stream_id(parse_stream_id(ids[i]))} refused as 'equal or smaller' above the top "
                        f"this forwarder wrote, {format_stream_id(self.trusted_top)}"
                    )
                    break
                failed = reply
                break
            sent += 1
        done = sent + dup
        if done:
            self.checkpoint = parse_stream_id(ids[done - 1])
            self.trusted_top = max(self.trusted_top, self.checkpoint)
        if sent:  # the duplicates are a prefix (IDs ascend; only those at or below the trusted top are)
            self._observe_latency(commands, done - sent, done, confirmed_us)
        self.metrics.sent.inc(sent)
        self.metrics.already_delivered.inc(dup)
        self._delivered += sent
        if failed is not None:
            # OOM / READONLY and the like: stop here; the reconnect re-reads the Brain's top.
            raise LinkDown("brain", f"XADD rejected: {failed}")
        return done

    def _observe_latency(self, commands: Sequence[Command], start: int, end: int, confirmed_us: int) -> None:
        """Hop collector -> Brain stream of the XADDs `commands[start:end]` (`XADD key id symbol S ... recv_ts T`:
        the contract's first and last fields); an entry of another shape or symbol is not counted."""
        latency = self._latency
        for cmd in commands[start:end]:
            try:
                child = latency.get(cmd[4])
                if child is not None and cmd[-2] in _RECV_TS:
                    child.observe_us(confirmed_us - int(cmd[-1]))
            except (IndexError, ValueError, TypeError):
                pass

    # ------------------------------------------------------------------ one step

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

    async def _read_redis(self, cursor: StreamId) -> list[RawEntry]:
        # BLOCK: wait for new entries without spinning; short so maintenance and stop stay responsive.
        reply = await self._vps(
            "XREAD", "COUNT", self.batch, "BLOCK", 50, "STREAMS", self.key, format_stream_id(cursor)
        )
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
            self._start_prefetch(
                ("redis", parse_stream_id(entries[-1][0])), self._read_redis(parse_stream_id(entries[-1][0]))
            )
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

    async def _check_rows(self, rows: list[BufferRow]) -> list[BufferRow]:
        """Account every row read back against the ledger; quarantine what cannot be replayed (an unreadable
        ID or payload, a row no spill of ours wrote); keep the rows above the checkpoint, in ID order."""
        if self.replay_ts > self.ledger.noted_ts:
            await self._catch_up_ledger(self.replay_ts)
        sendable: list[BufferRow] = []
        closed: list[LedgerEntry] = []
        prev = self.checkpoint
        for row in rows:
            if row.entry_id is None:
                await self._quarantine(row, "unreadable ID")
                continue
            verdict, ended = self.ledger.note(row.ts, row.entry_id)
            closed += ended
            if verdict == "foreign" and row.entry_id > self.checkpoint:
                await self._quarantine(row, "not a row the forwarder spilled (ID outside every spill of the ledger)")
            elif row.error:
                await self._quarantine(row, "unreadable payload (not a field/value list)")
            elif verdict != "foreign" and row.entry_id > prev:
                sendable.append(row)
                prev = row.entry_id
        await self._report_closed(closed)
        return sendable

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

    # ------------------------------------------------------------------ mode, maintenance, stats

    async def _set_mode(self) -> None:
        if not self.brain_up:
            mode = "disk_spill" if (self.buffer_pending or self.buffer_high > self.checkpoint) else "ram_backlog"
        elif self.buffer_pending or self.catching_up:
            mode = "replay"
        else:
            mode = "direct"
        if mode != self.mode:
            log.info("mode %s -> %s", self.mode or "start", mode)
            self.mode = mode
            self.metrics.set_mode(mode)
            await self._note_state(mode=mode)

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

    async def _enforce_ram_budget(self) -> None:
        usage = await self._vps("MEMORY", "USAGE", self.key, "SAMPLES", 5)
        if usage is None:
            return
        usage = int(usage)
        self.metrics.redis_bytes.set(usage)
        budget = self.settings.ram_buffer_bytes
        if usage <= budget:
            if (
                self._marker_saved
                and not self.spill_pending
                and await self._note_state(
                    buffer_high_id=format_stream_id(self.buffer_high), buffer_ts=self.buffer.last_ts
                )
            ):
                # No spill is in flight, so our buffer_high is exact: once saved, the marker kept while Redis
                # was full is not needed any more.
                await self._clear_marker()
            return
        if self.checkpoint > self.trimmed_to:
            # The RAM budget wins over the rewind window: drop the delivered copies first.
            await self._trim(self.checkpoint)
            usage = int(await self._vps("MEMORY", "USAGE", self.key, "SAMPLES", 5) or 0)
            if usage <= budget:
                return
        if not self.buffer_known and not await self._try_recover_buffer():
            return  # QuestDB unavailable: the backlog stays in Redis over budget (alerted: RedisOverRamBudget)
        length = int(await self._vps("XLEN", self.key))
        if length == 0:
            return
        per_entry = usage / length
        excess = math.ceil((usage - 0.8 * budget) / per_entry)
        try:
            # Bounded per step so the loop keeps beating the watchdog and answering a stop.
            await self._spill(min(max(excess, 1), 4 * self.spill_batch))
        except LinkDown as exc:
            if exc.target != "questdb":
                raise
            await self._link_down(exc)
        except VpsFull as exc:
            self._vps_full(exc)  # a refused write stopped the spill: the marker stays set (QuestDB holds the truth)

    async def _spill(self, count: int) -> None:
        """Move the oldest `count` undelivered Redis entries to the buffer, commit-visible before trimming."""
        start = max(self.checkpoint, self.buffer_high)
        while count > 0 and not self.stopping.is_set():
            room = await self._make_room(min(self.spill_batch, count))
            entries: list[RawEntry] = await self._vps(
                "XRANGE", self.key, "(" + format_stream_id(start), "+", "COUNT", room
            )
            if not entries:
                return
            last = parse_stream_id(entries[-1][0])
            if not self._marker_saved:
                await self._set_marker()
            self.spill_pending = True
            previous_ts = self.buffer.last_ts
            last_ts, placed = await self._questdb(self.buffer.append_rows(entries))
            if not self.buffer_pending:
                self.buffer_pending = True
                self.replay_ts = previous_ts
            self.buffer_high = last
            written = self.ledger.add(segments(placed))
            try:
                await self._record_spill(written, last, last_ts)
            except VpsFull:
                # Trimming the spilled entries first is safe while the marker is saved: a restart takes the
                # high from QuestDB (and rebuilds the ledger's tail from it). It frees the memory the write needs.
                await self._trim()
                await self._record_spill(written, last, last_ts)
            self.spill_pending = False
            held, oldest = self._buffer_backlog
            self._buffer_backlog = (held + len(entries), oldest or parse_stream_id(entries[0][0]))
            await self._clear_marker()
            await self._trim()
            self.metrics.spilled.inc(len(entries))
            count -= len(entries)
            start = last
            log.info("spilled %d entries up to %s to the QuestDB buffer", len(entries), format_stream_id(last))

    async def _record_spill(self, written: list[LedgerEntry], last: StreamId, last_ts: int) -> None:
        """The ledger entries of a visible spill, then `buffer_high` (one round trip)."""
        cmds: list[Command] = [("HSET", keys.FORWARDER_LEDGER, e.field, e.value) for e in written]
        cmds.append(("HSET", keys.FORWARDER_STATE, "buffer_high_id", format_stream_id(last), "buffer_ts", last_ts))
        await self._vps_cmds(cmds)

    # ------------------------------------------------------------------ ledger and quarantine (issue 14)

    async def _load_ledger(self) -> None:
        raw = await self._vps("HGETALL", keys.FORWARDER_LEDGER)
        self.ledger.load(raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2], strict=True)))
        held = await self._vps("HGETALL", keys.FORWARDER_QUARANTINE)
        fields = list(held) if isinstance(held, dict) else list(held[::2])
        self._quarantined = sorted((f.decode() if isinstance(f, bytes) else f for f in fields), key=_id_order)

    async def _rebuild_ledger(self, high: StreamId | None, cursor: int | None) -> None:
        """Rows QuestDB holds above the ledger's top (a stop between a spill's commit and its ledger write, a
        VPS Redis that lost the ledger, a buffer older than the ledger): taken as spilled, one entry per
        partition, from what QuestDB holds. Logged: they cannot be checked against what was written."""
        top = self.ledger.top
        floor = max(top.last if top is not None else ZERO, self.checkpoint)
        if high is None or high <= floor:
            return
        after = top.last_ts if top is not None and top.last >= self.checkpoint else (cursor or 1) - 1
        rebuilt: list[LedgerEntry] = []
        for part in await self._questdb(self.buffer.partitions()):
            if part.max_ts <= after or not part.rows:
                continue
            count, first, last = await self._questdb(self.buffer.span(max(after, part.min_ts - 1), part.max_ts))
            if count and first is not None and last is not None:
                rebuilt.append(LedgerEntry(first[0], last[0], count, first[1], last[1]))
        if not rebuilt:
            return
        first, last = format_stream_id(rebuilt[0].first), format_stream_id(rebuilt[-1].last)
        log.warning("spill ledger lacks %d buffer rows (%s..%s): taken as spilled from what QuestDB holds",
                    sum(e.count for e in rebuilt), first, last)  # fmt: skip
        written = self.ledger.add(rebuilt)
        await self._note_vps([("HSET", keys.FORWARDER_LEDGER, e.field, e.value) for e in written])

    async def _catch_up_ledger(self, upto_ts: int) -> None:
        """The replay starts past rows it did not read in this run (delivered before a restart, or up to a
        Brain top it adopted): count those rows in QuestDB instead."""
        gap = self.ledger.gap(upto_ts)
        for entry, lo, hi in gap:
            count, first, last = await self._questdb(self.buffer.span(lo, hi))
            entry.got += count
            if first is not None and last is not None:
                entry.first_got = entry.first_got or first[0]
                entry.last_got = last[0]
        closed = self.ledger.close_upto(upto_ts)
        await self._report_closed(closed)

    async def _settle_ledger(self) -> None:
        """The replay is complete: every entry still open is short of what it did not get back."""
        await self._catch_up_ledger(self.replay_ts)
        await self._report_closed(self.ledger.close_all())

    async def _report_closed(self, closed: list[LedgerEntry]) -> None:
        """Entries the replay is past: a shortfall is counted, logged with its range, kept in the state hash."""
        if not closed:
            return
        cmds: list[Command] = []
        for e in closed:
            if e.shortfall:
                self.missing_total += e.shortfall
                self.metrics.buffer_missing.inc(e.shortfall)
                where = e.missing_range()
                log.error("BUFFER ROWS MISSING: %d of %d entries spilled to %s as %s..%s did not come back "
                          "(lost from the buffer); missing IDs %s", e.shortfall, e.count, self.buffer.table,
                          format_stream_id(e.first), format_stream_id(e.last), where)  # fmt: skip
                cmds.append(("HSET", keys.FORWARDER_STATE, "missing_total", self.missing_total,
                             "missing_last_range", where))  # fmt: skip
            cmds.append(("HSET", keys.FORWARDER_LEDGER, e.field, e.value))
        await self._note_vps(cmds)
        await self._release_ledger()

    async def _release_ledger(self) -> None:
        gone = self.ledger.release(self.checkpoint)
        if gone:
            await self._note_ledger_removed(gone)

    async def _note_ledger_removed(self, gone: list[LedgerEntry]) -> None:
        await self._note_vps([("HDEL", keys.FORWARDER_LEDGER, *(e.field for e in gone))])

    async def _note_vps(self, cmds: Sequence[Command]) -> None:
        """Ledger and quarantine writes: a full VPS Redis skips them (counted, logged) rather than stopping."""
        if not cmds:
            return
        try:
            await self._vps_cmds(cmds)
        except VpsFull as exc:
            self._vps_full(exc)

    async def _quarantine(self, row: BufferRow, reason: str) -> None:
        """A buffer row the replay cannot use: counted, logged with its ID, a capped copy kept (bounded hash)."""
        if row.ts <= self._quarantined_ts:
            return  # a re-read of a row already quarantined
        self._quarantined_ts = row.ts
        self.metrics.buffer_quarantined.inc()
        name = format_stream_id(row.entry_id) if row.entry_id is not None else f"ts:{row.ts}"
        log.error("BUFFER ROW QUARANTINED: %s (ts %d) in %s: %s; not sent, the replay goes on", name, row.ts,
                  self.buffer.table, reason)  # fmt: skip
        copy = orjson.dumps({"reason": reason, "ts": row.ts, "table": self.buffer.table,
                             "payload": row.raw[:QUARANTINE_PAYLOAD_BYTES], "at": time.time()})  # fmt: skip
        cmds: list[Command] = [("HSET", keys.FORWARDER_QUARANTINE, name, copy)]
        if name not in self._quarantined:
            self._quarantined.append(name)
            self._quarantined.sort(key=_id_order)
        while len(self._quarantined) > QUARANTINE_MAX:
            cmds.append(("HDEL", keys.FORWARDER_QUARANTINE, self._quarantined.pop(0)))
        await self._note_vps(cmds)

    async def _clean_buffer(self) -> None:
        """Drop delivered hourly partitions; over the disk budget drop the oldest, counting lost ticks."""
        _, cursor = self._retention_floor()
        if cursor > 0:
            await self._questdb(self.buffer.drop_delivered(cursor))
        parts = await self._questdb(self.buffer.partitions())
        total = sum(p.disk_bytes for p in parts)
        budget = self.settings.disk_buffer_bytes
        while total > budget and len(parts) > 1:
            oldest = parts.pop(0)
            await self._drop_for_budget(oldest, total, budget)
            total -= oldest.disk_bytes

    async def _drop_for_budget(self, oldest: Partition, total: int, budget: int) -> None:
        """Drop the oldest partition to keep DISK_BUFFER_BYTES; its undelivered rows are counted as dropped."""
        lost = 0
        if self.buffer_pending and oldest.max_ts > self.replay_ts:
            lost = await self._questdb(self.buffer.count_between(max(self.replay_ts, oldest.min_ts - 1), oldest.max_ts))
        await self._questdb(self.buffer.drop_partition(oldest))
        gone = self.ledger.drop_range(oldest.min_ts, oldest.max_ts)  # counted as dropped, never as missing
        if gone:
            await self._note_ledger_removed(gone)
        if lost:
            self.dropped_total += lost
            self.metrics.dropped.inc(lost)
            self.replay_ts = max(self.replay_ts, oldest.max_ts)
            self._buffer_backlog = (max(0, self._buffer_backlog[0] - lost), None)
            log.error("DISK BUFFER FULL (%d bytes + the next spill > %d): dropped %d undelivered ticks, partition %s",
                      total, budget, lost, oldest.name)  # fmt: skip
            await self._note_state(dropped_total=self.dropped_total, replay_ts=self.replay_ts)

    async def _make_room(self, wanted: int) -> int:
        """Before a spill transaction: how many entries it may take, with room made for them first, so the
        disk use QuestDB reports stays under DISK_BUFFER_BYTES at any rate. The buffer is cut into segments of
        at most a quarter of the budget: past that the head partition is closed (the next rows start the next
        hour of `ts`, see `SpillBuffer.rotate`), so the oldest can always be dropped whole, even within one
        hour of ticks. Estimates come from the measured bytes per row, plus a partition's page slack."""
        budget = self.settings.disk_buffer_bytes
        segment = budget // BUFFER_SEGMENTS
        parts = [p for p in await self._questdb(self.buffer.partitions()) if p.rows or p.disk_bytes]
        big = [p for p in parts if p.rows >= 10_000]
        per_row = max(64, sum(p.disk_bytes for p in big) // sum(p.rows for p in big)) if big else DEFAULT_ROW_BYTES
        count = max(1, min(wanted, max(0, segment - PARTITION_SLACK_BYTES) // 2 // per_row))
        incoming = count * per_row + PARTITION_SLACK_BYTES
        floor = min((p.disk_bytes for p in parts), default=PARTITION_SLACK_BYTES)  # an almost empty partition
        if parts and parts[-1].disk_bytes + incoming > segment:
            self.buffer.rotate = True
        if self.buffer.rotate or not parts:
            incoming = max(incoming, floor)
        total = sum(p.disk_bytes for p in parts)
        while parts and total + incoming > budget:
            oldest = parts.pop(0)
            if not parts:
                self.buffer.rotate = True  # the head goes too: the next rows start a fresh partition
            await self._drop_for_budget(oldest, total, budget)
            total -= oldest.disk_bytes
        return count

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
                     self.mode, backlog, buffer_backlog, backlog - buffer_backlog,
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
