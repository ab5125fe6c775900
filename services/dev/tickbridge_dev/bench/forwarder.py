"""`make bench-forwarder`: how fast the forwarder drains a 1,000,000-tick backlog, from Redis and from the
QuestDB buffer, next to `redis-benchmark` pipelined XADD measured in the same run; and what a tick costs
in Redis memory and QuestDB disk, in hours of outage on a 4 GB / 50 GB VPS at 1,200 ticks/s.

Real servers on this machine: VPS redis-server, Brain redis-server, VPS QuestDB; the forwarder runs
in-process (uvloop, GC tuned as in `tickbridge forwarder`) with the default settings except the RAM budget
of the buffer phase.
1. Redis drain: 1M entries preloaded in the VPS stream (explicit IDs, contract layout), Brain up,
   forwarder started; rate = entries / time from the first to the last arrival on the Brain.
2. QuestDB drain: 1M entries preloaded, Brain down, RAM budget 2 MB so the forwarder spills them to
   `vps_buffer` (spill rate reported too); then the Brain comes up; rate = rows replayed / replay time.
3. Catch-up with live flow, fast-forward live lane on and off (issue 16), alternated: a Redis backlog of
   `--catchup-ticks` entries while 1,200 live ticks/s keep arriving; rate = backlog entries / time from the
   first arrival on the Brain until the whole backlog is there. On must be >= 90 % of off. With
   `--lane-process`, "on" is the deployed layout instead: this forwarder FORWARDER_LANE=ordered and the lane a
   `tickbridge forwarder` process of its own (FORWARDER_LANE=live) on the same host.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry

from tickbridge.core import keys
from tickbridge.core.lifecycle import tune_gc
from tickbridge.core.redis_io import make_client
from tickbridge.core.settings import Settings
from tickbridge.forwarder.service import Forwarder
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer
from tickbridge_dev.loadgen.forwarder import LiveWriter, preload, trade_fields

KEY = keys.DEFAULT_STREAM_KEY
TICKS_PER_S = 1200
VPS_RAM_BUDGET = 3_000_000_000  # RAM_BUFFER_BYTES default: 3 GB of a 4 GB VPS
VPS_DISK_BUDGET = 40_000_000_000  # DISK_BUFFER_BYTES default: 40 GB of a 50 GB VPS


def redis_benchmark_xadd(port: int, pipeline: int = 128, n: int = 500_000) -> float:
    """redis-benchmark pipelined XADD of the same 9-field trade entry, one connection."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return float("nan")
    fields = [f.decode() for f in trade_fields(1)]
    out = subprocess.run(
        [exe, "-p", str(port), "-P", str(pipeline), "-n", str(n), "-c", "1", "-q", "XADD", "bench:ceiling", "*",
         *fields],
        capture_output=True, text=True, check=False, timeout=300,
    ).stdout  # fmt: skip
    rates = re.findall(r"([\d.]+) requests per second", out)
    return float(rates[-1]) if rates else float("nan")


async def _wait(check: object, timeout: float, poll: float = 0.02) -> float:
    deadline = time.monotonic() + timeout
    while True:
        if await check():  # type: ignore[operator]
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError("bench step did not finish in time")
        await asyncio.sleep(poll)


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


async def redis_drain(workdir: Path, qdb: QuestDBServer, n: int) -> tuple[float, float, dict[str, float]]:
    """(ticks/s, bytes per tick in Redis, core-µs per tick by process over the drain)."""
    vps = RedisServer(workdir=workdir / "vps1").start()
    brain = RedisServer(workdir=workdir / "brain1").start()
    assert isinstance(vps, RedisServer) and isinstance(brain, RedisServer)
    try:
        vps_c, brain_c = make_client(vps.url), make_client(brain.url)
        await preload(vps_c, KEY, n, start=(int(time.time() * 1000) - 7_200_000, 0), step_ms=0.005)
        bytes_per_tick = int(await vps_c.memory_usage(KEY, samples=0) or 0) / n
        settings = Settings(vps_redis_url=vps.url, brain_redis_url=brain.url, vps_questdb_url=qdb.url)
        fw = Forwarder(settings, CollectorRegistry(), buffer_table="bench_redis_drain")
        task = asyncio.create_task(fw.run())

        async def first() -> bool:
            return int(await brain_c.xlen(KEY)) > 0

        async def done() -> bool:
            return int(await brain_c.xlen(KEY)) >= n

        procs = {"forwarder (this process)": [os.getpid()], "VPS redis-server": [vps.pid],
                 "Brain redis-server": [brain.pid]}  # fmt: skip
        cpu0 = {name: _cpu_s(pids) for name, pids in procs.items()}
        t0 = await _wait(first, 60, poll=0.001)
        t1 = await _wait(done, 600)
        cpu = {name: (_cpu_s(pids) - cpu0[name]) * 1e6 / n for name, pids in procs.items()}
        fw.request_stop()
        await task
        await vps_c.aclose()
        await brain_c.aclose()
        return n / (t1 - t0), bytes_per_tick, cpu
    finally:
        vps.stop()
        brain.stop()


async def questdb_drain(workdir: Path, qdb: QuestDBServer, n: int) -> tuple[float, float, float]:
    """(replay ticks/s, spill ticks/s, bytes per tick in QuestDB)."""
    vps = RedisServer(workdir=workdir / "vps2").start()
    brain = RedisServer(workdir=workdir / "brain2").start()
    assert isinstance(vps, RedisServer) and isinstance(brain, RedisServer)
    brain.stop()
    try:
        vps_c = make_client(vps.url)
        await preload(vps_c, KEY, n, start=(int(time.time() * 1000) - 7_200_000, 0), step_ms=0.005)
        settings = Settings(
            vps_redis_url=vps.url, brain_redis_url=brain.url, vps_questdb_url=qdb.url, ram_buffer_bytes=2_000_000
        )
        registry = CollectorRegistry()
        fw = Forwarder(settings, registry, buffer_table="vps_buffer")

        def value(name: str) -> float:
            return registry.get_sample_value(name) or 0.0

        task = asyncio.create_task(fw.run())

        async def spill_started() -> bool:
            return value("tickbridge_forwarder_spilled_total") > 0

        async def spilled() -> bool:
            return value("tickbridge_forwarder_spilled_total") >= n - 30_000

        t0 = time.monotonic()
        await _wait(spill_started, 120)
        t1 = await _wait(spilled, 900)
        spill_rate = value("tickbridge_forwarder_spilled_total") / (t1 - t0)
        parts = await fw.buffer.partitions()
        rows = sum(p.rows for p in parts)
        bytes_per_tick = sum(p.disk_bytes for p in parts) / max(1, rows)
        brain.start()
        total = value("tickbridge_forwarder_spilled_total")

        async def replay_started() -> bool:
            return value("tickbridge_forwarder_replayed_total") > 0

        async def replayed() -> bool:
            return value("tickbridge_forwarder_replayed_total") >= total

        t2 = await _wait(replay_started, 60, poll=0.001)
        t3 = await _wait(replayed, 900)
        fw.request_stop()
        await task
        await vps_c.aclose()
        return value("tickbridge_forwarder_replayed_total") / (t3 - t2), spill_rate, bytes_per_tick
    finally:
        vps.stop()
        brain.stop()


async def catchup_drain(
    workdir: Path, qdb: QuestDBServer, n: int, live_lane: bool, tag: str, process: bool = False
) -> tuple[float, float]:
    """(backlog ticks/s with 1,200 live ticks/s arriving, live entries the lane sent); `process`: the lane as a
    process of its own (its sent count is then not known here: 0)."""
    vps = RedisServer(workdir=workdir / f"vps-{tag}").start()
    brain = RedisServer(workdir=workdir / f"brain-{tag}").start()
    assert isinstance(vps, RedisServer) and isinstance(brain, RedisServer)
    try:
        vps_c, brain_c = make_client(vps.url), make_client(brain.url)
        await preload(vps_c, KEY, n, start=(int(time.time() * 1000) - 7_200_000, 0), step_ms=0.005)
        settings = Settings(vps_redis_url=vps.url, brain_redis_url=brain.url, vps_questdb_url=qdb.url)
        registry = CollectorRegistry()
        stop = asyncio.Event()
        writer = LiveWriter(vps_c, KEY, rate=TICKS_PER_S)
        live = asyncio.create_task(writer.run(stop))
        await asyncio.sleep(1.0)  # live flow on before the catch-up starts
        lane_proc: asyncio.subprocess.Process | None = None
        if live_lane and process:
            env = {**os.environ, "VPS_REDIS_URL": vps.url, "BRAIN_REDIS_URL": brain.url, "FORWARDER_LANE": "live",
                   "METRICS_PORT": "0", "LOG_LEVEL": "WARNING"}  # fmt: skip
            lane_proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "tickbridge", "forwarder", env=env)

            async def lane_up() -> bool:  # deployed, the lane process is long running: its start is not timed
                return bool(await brain_c.hget(keys.CATCHUP, "live_updated"))

            await _wait(lane_up, 60)
        fw = Forwarder(settings, registry, buffer_table=f"bench_catchup_{tag}", live_lane=live_lane and not process,
                       lane_figures=process)  # fmt: skip
        task = asyncio.create_task(fw.run())

        async def first() -> bool:
            return int(await brain_c.xlen(KEY)) > 0

        async def done() -> bool:
            return int(await brain_c.xlen(KEY)) >= n

        t0 = await _wait(first, 60, poll=0.001)
        t1 = await _wait(done, 600)
        stop.set()
        await live
        fw.request_stop()
        await task
        if lane_proc is not None:
            lane_proc.terminate()
            await lane_proc.wait()
        await vps_c.aclose()
        await brain_c.aclose()
        return n / (t1 - t0), registry.get_sample_value("tickbridge_forwarder_live_sent_total") or 0.0
    finally:
        vps.stop()
        brain.stop()


async def run(n: int, catchup_n: int = 1_000_000, rounds: int = 2, process: bool = False) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="tb-bench-forwarder-"))
    qdb = QuestDBServer(workdir=workdir / "questdb")
    qdb.start()
    ceiling_srv = RedisServer(workdir=workdir / "ceiling").start()
    assert isinstance(ceiling_srv, RedisServer)
    try:
        ceiling = redis_benchmark_xadd(ceiling_srv.port)
        ceiling_srv.stop()
        print(f"redis-benchmark XADD -P 128, 1 connection (ceiling): {ceiling:,.0f} ops/s")
        rate_r, bpt_r, cpu_r = await redis_drain(workdir, qdb, n)
        print(f"drain from Redis:   {rate_r:,.0f} ticks/s  ({rate_r / ceiling:.2f} x ceiling; aim 100,000)")
        print(f"  CPU per tick: {sum(cpu_r.values()):.2f} core-µs ("
              + ", ".join(f"{name} {us:.2f}" for name, us in cpu_r.items()) + "; the forwarder's includes the "
              "bench's own polling)")  # fmt: skip
        rate_q, spill, bpt_q = await questdb_drain(workdir, qdb, n)
        print(f"drain from QuestDB: {rate_q:,.0f} ticks/s  ({rate_q / ceiling:.2f} x ceiling; aim 50,000)")
        print(f"spill Redis->QuestDB: {spill:,.0f} ticks/s")
        print(f"24 h backlog at {TICKS_PER_S}/s = {TICKS_PER_S * 86400:,} ticks: drained in "
              f"{TICKS_PER_S * 86400 / rate_q / 3600:.2f} h from QuestDB (design needs <= 1 h: 28,800/s)")  # fmt: skip
        hours_r = VPS_RAM_BUDGET / (bpt_r * TICKS_PER_S) / 3600
        hours_q = VPS_DISK_BUDGET / (bpt_q * TICKS_PER_S) / 3600
        print(f"bytes per tick: Redis {bpt_r:.1f} B (MEMORY USAGE), QuestDB {bpt_q:.1f} B (partition diskSize)")
        print(f"outage held at {TICKS_PER_S} ticks/s: Redis {VPS_RAM_BUDGET / 1e9:.0f} GB of a 4 GB VPS = "
              f"{hours_r:.1f} h; QuestDB {VPS_DISK_BUDGET / 1e9:.0f} GB of a 50 GB VPS = {hours_q:.1f} h; "
              f"together {hours_r + hours_q:.1f} h")  # fmt: skip
        await catchup_ab(workdir, qdb, catchup_n, rounds, process)
    finally:
        ceiling_srv.stop()
        qdb.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def catchup_ab(workdir: Path, qdb: QuestDBServer, n: int, rounds: int, process: bool = False) -> None:
    """Catch-up rate with the live lane on and off, alternated (issue 16: on >= 90 % of off)."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    on_text = "on (own process)" if process else "on "
    for i in range(rounds):
        for lane in (False, True) if i % 2 == 0 else (True, False):
            rate, sent = await catchup_drain(workdir, qdb, n, lane, f"{i}_{int(lane)}", process)
            rates[lane].append(rate)
            print(
                f"catch-up of {n:,} with {TICKS_PER_S}/s live, live lane {on_text if lane else 'off'}: "
                f"{rate:,.0f} ticks/s" + (f" ({sent:,.0f} live entries sent on the lane)" if lane and sent else "")
            )
    on, off = sum(rates[True]) / rounds, sum(rates[False]) / rounds
    print(f"catch-up rate, live lane on / off (mean of {rounds}): {on:,.0f} / {off:,.0f} ticks/s = {on / off:.2f} "
          "(aim >= 0.90)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ticks", type=int, default=1_000_000)
    parser.add_argument(
        "--catchup-ticks",
        type=int,
        default=1_000_000,
        help="backlog of the live lane on/off A/B (300,000 drains in ~2 s: too short to compare)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternated on/off pairs of the A/B")
    parser.add_argument("--only-catchup", action="store_true", help="run only the live lane on/off A/B")
    lane_help = "the A/B's 'on': the lane as its own process (FORWARDER_LANE=live), as deployed"
    parser.add_argument("--lane-process", action="store_true", help=lane_help)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tune_gc()  # as `tickbridge forwarder` does
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        if args.only_catchup:
            runner.run(_only_catchup(args.catchup_ticks, args.rounds, args.lane_process))
        else:
            runner.run(run(args.ticks, args.catchup_ticks, args.rounds, args.lane_process))


async def _only_catchup(n: int, rounds: int, process: bool = False) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="tb-bench-forwarder-"))
    qdb = QuestDBServer(workdir=workdir / "questdb")
    qdb.start()
    try:
        await catchup_ab(workdir, qdb, n, rounds, process)
    finally:
        qdb.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
