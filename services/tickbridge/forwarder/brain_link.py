"""The Brain link: which Brain stream top to trust (issue 14), and writing entries with their original IDs."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from redis.exceptions import ResponseError

from tickbridge.core.rawlink import RawReplyError
from tickbridge.core.redis_io import TRANSIENT_ERRORS, Command, execute_packed
from tickbridge.core.wire import StreamId, format_stream_id, now_us, parse_stream_id
from tickbridge.forwarder.base import ZERO, LinkDown
from tickbridge.forwarder.spilling import Spilling

log = logging.getLogger("tickbridge.forwarder.service")

#: The contract's last field (bytes as read from Redis, str as read back from the buffer).
_RECV_TS = (b"recv_ts", "recv_ts")

#: State-hash field an operator sets (as the VPS admin) to accept a Brain top the VPS cannot vouch for.
ACCEPT_TOP = "accept_top"


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


async def read_brain_view(brain: Any, key: str, group_name: str) -> BrainView:
    """The Brain stream's last-generated-id (what the Brain holds; survives its own trimming), its first and
    last entries and `group_name`'s last-delivered-id. XINFO STREAM goes first: the group only moves up
    meanwhile, so a legitimate trim never looks like a loss. Raises `LinkDown` if the Brain does not answer."""
    try:
        info, groups = await execute_packed(brain, [("XINFO", "STREAM", key), ("XINFO", "GROUPS", key)])
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
    wanted = group_name.encode()
    group = next((parse_stream_id(g[b"last-delivered-id"]) for g in map(_pairs, groups) if g[b"name"] == wanted), None)
    return BrainView(
        top=parse_stream_id(fields[b"last-generated-id"]),
        first=parse_stream_id(first[0]) if first else None,
        last=(parse_stream_id(last[0]), list(last[1])) if last else None,
        group=group,
    )


class BrainLink(Spilling):
    """Inspects the Brain stream (adopt, rewind or refuse its top) and sends batches to it."""

    async def _brain_view(self) -> BrainView:
        return await read_brain_view(self.brain, self.key, self.settings.consumer_group)

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
        accepted = await self._vps("HGETALL", self.state_key)
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
