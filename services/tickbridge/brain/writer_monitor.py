"""Monitoring: backlog and suspended WAL tables as gauges, the heartbeat, and trimming the per-symbol
streams below what the writer group still needs.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tickbridge.brain.common import group_floor, parse_info_pairs
from tickbridge.brain.writer_base import MONITOR_ERRORS
from tickbridge.brain.writer_flushing import WriterFlushing
from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBError
from tickbridge.core.redis_io import Command, execute_packed

log = logging.getLogger("tickbridge.brain.writer")


class WriterMonitor(WriterFlushing):
    """The monitor loop: gauges, heartbeat, trimming."""

    async def _monitor_loop(self) -> None:
        last_trim = 0.0
        while not await self.sleep_or_stop(self.monitor_interval_s):
            try:
                await self.update_metrics()
                if time.monotonic() - last_trim > 5.0:
                    await self.trim()
                    last_trim = time.monotonic()
            except MONITOR_ERRORS as exc:
                log.debug("monitor: %s", exc)

    async def update_metrics(self) -> None:
        """Backlog from XINFO GROUPS (lag + pending), suspended WAL tables, heartbeat."""
        assert self.client is not None
        streams = list(self.streams)
        cmds: list[Command] = [["XINFO", "GROUPS", s] for s in streams]
        cmds.append(["SET", keys.heartbeat_key("writer", self.consumer), str(time.time()), "EX", 15])
        replies = await execute_packed(self.client, cmds)
        backlog = 0
        for reply in replies[:-1]:
            if isinstance(reply, BaseException):
                continue
            for g in reply:
                info = parse_info_pairs(g)
                if info[b"name"].decode() == self.group:
                    backlog += int(info.get(b"lag") or 0) + int(info[b"pending"])
        self.metrics.backlog.set(backlog)
        try:
            # Bounded: a stalled QuestDB must not hold the monitor loop (and so the heartbeat) past the TTL.
            suspended = await asyncio.wait_for(self.qdb.suspended_tables(), timeout=5.0)
        except (QuestDBError, OSError, TimeoutError) as exc:
            log.debug("suspended check: %s", exc)
            return
        self.metrics.suspended.set(len(suspended))
        if suspended:
            log.error("QuestDB WAL tables suspended (nothing becomes visible; their rows wait in Redis): %s",
                      ", ".join(suspended))  # fmt: skip
        elif self.suspended_tables:
            log.info("QuestDB WAL tables apply again: writing resumes")
        self.suspended_tables = set(suspended)

    async def trim(self) -> None:
        """Trim each per-symbol stream below what the writer's group still needs (other groups do not hold it back;
        WARM is the zset, not the stream)."""
        assert self.client is not None
        cmds: list[Command] = []
        for stream in list(self.streams):
            floor = await group_floor(self.client, stream, self.group)
            if floor is not None and floor > (0, 0):
                cmds.append(["XTRIM", stream, "MINID", "~", f"{floor[0]}-{floor[1]}"])
        if cmds:
            await execute_packed(self.client, cmds)
