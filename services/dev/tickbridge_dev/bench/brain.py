"""`make bench-brain`: Brain catch-up rate from a 1,000,000-tick backlog, and HOT/WARM/COLD tier latencies.

Starts its own redis-server and QuestDB and runs `tickbridge consumer` and `tickbridge writer` as
processes. Once they are ready they are paused, the Brain stream is filled, and the clock runs from
their resumption until every row is visible in QuestDB `trades`; CPU seconds per process and Redis
time per command over that interval show where the time goes. Ceilings measured in the same run:
`redis-benchmark` XADD (pipeline 128) and a raw XREADGROUP+XACK drain from Python; for latencies, a Redis
PING round trip (pool and lean link) and a trivial QuestDB `/exec` query.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry

from tickbridge.brain.tiered import TieredMarketData
from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBHttp
from tickbridge.core.rawlink import RawRedis
from tickbridge.core.redis_io import ensure_group, execute_packed, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import StreamId, now_us, parse_stream_id
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer
from tickbridge_dev.loadgen.brain import TradeSource

SYMBOLS = (
    "BTCUSDT",
    "ETHUSDT",
    "BNBUSDT",
    "SOLUSDT",
    "XRPUSDT",
    "DOGEUSDT",
    "ADAUSDT",
    "TRXUSDT",
    "AVAXUSDT",
    "LINKUSDT",
)
DESIGN = {"hot": "0.01 ms", "warm": "0.1-0.3 ms", "cold": "50-200 ms"}
#: The design's figures, strict end (the lower bound of a range).
DESIGN_MS = {"hot": 0.01, "warm": 0.1, "cold": 50.0}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def redis_benchmark_xadd(port: int, n: int = 200_000) -> float:
    """`redis-benchmark` XADD of a tick-sized entry, 1 connection, pipeline 128 (ops/s)."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return float("nan")
    cmd = [
        exe, "-p", str(port), "-c", "1", "-P", "128", "-n", str(n), "-q",
        "XADD", "bench:ceiling", "*", "symbol", "BTCUSDT", "exchange", "binance_spot", "type", "TRADE",
        "price", "65000.01", "volume", "0.001", "side", "BUY", "timestamp", "1763900000000000",
        "trade_id", "123456789", "recv_ts", "1763900000001500",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    match = re.findall(r"([\d.]+) requests per second", out)
    return float(match[-1]) if match else float("nan")


async def drain_ceiling(url: str, n: int = 200_000) -> float:
    """Raw XREADGROUP COUNT 1000 + XACK from Python, no processing (entries/s)."""
    client = make_client(url)
    stream = "bench:drain"
    source = TradeSource(SYMBOLS)
    await source.append(client, stream, n)
    await ensure_group(client, stream, "g")
    started = time.perf_counter()
    done = 0
    while done < n:
        (reply,) = await execute_packed(
            client, [["XREADGROUP", "GROUP", "g", "c", "COUNT", 1000, "STREAMS", stream, ">"]]
        )
        entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        await execute_packed(client, [["XACK", stream, "g", *[e[0] for e in entries]]])
        done += len(entries)
    rate = n / (time.perf_counter() - started)
    await client.delete(stream)
    await client.aclose()
    return rate


async def timed(fn: Callable[[], Awaitable[object]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def start_role(role: str, env: dict[str, str], logdir: Path, name: str) -> subprocess.Popen[bytes]:
    out = open(logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "tickbridge", role], env={**env, "CONSUMER_NAME": name}, stdout=out, stderr=out
    )


@dataclass
class CatchUp:
    """One catch-up run: times, and where the CPU went (seconds per process, Redis µs per command)."""

    total_s: float
    consumer_s: float
    cpu: dict[str, float]
    commandstats: dict[str, tuple[int, float]]  # command -> (calls, usec total)


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _commandstats(info: object) -> dict[str, tuple[int, float]]:
    """`INFO commandstats` (raw reply) -> {command: (calls, usec)}."""
    text = info.decode() if isinstance(info, bytes) else str(info)
    out: dict[str, tuple[int, float]] = {}
    for m in re.finditer(r"cmdstat_([a-z|]+):calls=(\d+),usec=(\d+)", text):
        out[m.group(1)] = (int(m.group(2)), float(m.group(3)))
    return out


async def catch_up(
    redis: RedisServer,
    qdb_server: QuestDBServer,
    ticks: int,
    consumers: int,
    workdir: Path,
    *,
    consumer_batch: int = 2000,
    writer_batch: int = 50_000,
    live_rate: float = 0.0,
    extra_env: dict[str, str] | None = None,
) -> CatchUp:
    """The catch-up of `ticks` queued entries; with `live_rate`, live trades keep arriving meanwhile and the
    consumer counts as done when its group is less than a second of live flow behind."""
    client = make_client(redis.url)
    qdb = QuestDBHttp(qdb_server.url)
    await ensure_group(client, keys.DEFAULT_STREAM_KEY, keys.DEFAULT_CONSUMER_GROUP)
    env = {
        **os.environ,
        "BRAIN_REDIS_URL": redis.url,
        "BRAIN_QUESTDB_URL": qdb_server.url,
        "SYMBOLS": ",".join(SYMBOLS),
        "METRICS_PORT": "0",
        "CONSUMER_BATCH": str(consumer_batch),
        "WRITER_BATCH_ROWS": str(writer_batch),
        "LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }
    # The roles start on an empty stream and are paused (SIGSTOP) once ready, the backlog is filled,
    # and the clock starts when they resume: the figure is the processing rate, not Python start-up.
    names = [f"bench-c{i}" for i in range(consumers)]
    procs = [start_role("consumer", env, workdir, name) for name in names]
    procs.append(start_role("writer", env, workdir, "bench-w"))
    try:  # from here on every exit resumes and stops the roles
        spawned = time.perf_counter()
        beats = [keys.heartbeat_key("consumer", n) for n in names] + [keys.heartbeat_key("writer", "bench-w")]
        while await client.exists(*beats) < len(beats):
            if time.perf_counter() - spawned > 60 or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a role exited or did not report ready within 60 s; logs in {workdir}")
            await asyncio.sleep(0.1)
        ready_s = time.perf_counter() - spawned
        for p in procs:
            p.send_signal(signal.SIGSTOP)

        now = now_us()
        # Exchange times over the last ~1,000 s: WARM keeps the last 300 s, the rest is COLD only.
        source = TradeSource(SYMBOLS, start_us=now - ticks * 1000, step_us=1000)
        t0 = time.perf_counter()
        await source.append(client, keys.DEFAULT_STREAM_KEY, ticks, chunk=10_000)
        fill_rate = ticks / (time.perf_counter() - t0)
        print(f"roles ready in {ready_s:.1f} s, then paused; backlog: {ticks:,} ticks in the Brain stream "
              f"({fill_rate:,.0f} XADD/s from Python while filling)")  # fmt: skip

        (newest,) = await execute_packed(client, [["XREVRANGE", keys.DEFAULT_STREAM_KEY, "+", "-", "COUNT", 1]])
        backlog_last = parse_stream_id(newest[0][0])
        await execute_packed(client, [["CONFIG", "RESETSTAT"]])
        watched = {"redis-server": psutil.Process(redis.pid), "questdb": psutil.Process(qdb_server.pid)}
        watched.update({f"consumer {i + 1}": psutil.Process(p.pid) for i, p in enumerate(procs[:-1])})
        watched["writer"] = psutil.Process(procs[-1].pid)
        cpu_before = {name: _cpu_s(p) for name, p in watched.items()}
        started = time.perf_counter()
        for p in procs:
            p.send_signal(signal.SIGCONT)
        consumed_at: float | None = None
        visible = 0
        live = _LiveFlow(client, source, live_rate, started)
        while True:
            await asyncio.sleep(0.25)
            await live.step()
            if consumed_at is None and await _drained(client, live_rate, backlog_last):
                consumed_at = time.perf_counter() - started
                if live_rate:
                    break
            try:
                visible = int(await qdb.scalar("SELECT count() FROM trades") or 0)
            except Exception:
                visible = 0
            if visible >= ticks and not live_rate:  # with a live flow only the consumers are timed (shared table)
                break
            if time.perf_counter() - started > 600:
                raise TimeoutError(f"only {visible:,} rows visible after 600 s")
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a role exited with {p.returncode}; logs in {workdir}")
        total = time.perf_counter() - started
        cpu = {name: _cpu_s(p) - cpu_before[name] for name, p in watched.items()}
        (stats,) = await execute_packed(client, [["INFO", "commandstats"]])
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.terminate()
        for p in procs:
            p.wait(30)
    await client.aclose()
    await qdb.close()
    return CatchUp(total_s=total, consumer_s=consumed_at or total, cpu=cpu, commandstats=_commandstats(stats))


async def fastforward_ab(qdb: QuestDBServer, ticks: int, rounds: int, workdir: Path) -> None:
    """Issue 16: the consumers' catch-up rate with 1,200 live trades/s arriving, fast-forward on and off
    (CONSUMER_FASTFORWARD), alternated; on must be >= 90 % of off. Each run gets a redis-server of its own."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    for i in range(rounds):
        for ff in (False, True) if i % 2 == 0 else (True, False):
            redis = RedisServer(workdir=workdir / f"ff-redis-{i}-{int(ff)}")
            redis.start()
            try:
                r = await catch_up(redis, qdb, ticks, 2, workdir, live_rate=1200.0,
                                   extra_env={"CONSUMER_FASTFORWARD": "1" if ff else "0"})  # fmt: skip
            finally:
                redis.stop()
            rates[ff].append(ticks / r.consumer_s)
            print(f"  catch-up of {ticks:,} with 1,200/s live, fast-forward {'on ' if ff else 'off'}: "
                  f"{ticks / r.consumer_s:,.0f} ticks/s (consumers, {r.consumer_s:.1f} s)")  # fmt: skip
    on, off = statistics.fmean(rates[True]), statistics.fmean(rates[False])
    print(f"  fast-forward on / off (mean of {rounds}): {on:,.0f} / {off:,.0f} ticks/s = {on / off:.2f} (aim >= 0.90)")


@dataclass
class _LiveFlow:
    """Live trades at `rate`/s appended during a catch-up (none at rate 0)."""

    client: Any
    source: TradeSource
    rate: float
    started: float
    sent: int = 0

    async def step(self) -> None:
        if self.rate:
            due = int((time.perf_counter() - self.started) * self.rate) - self.sent
            await self.source.append(self.client, keys.DEFAULT_STREAM_KEY, due, live=True)
            self.sent += due


async def _drained(client: Any, live_rate: float, backlog_last: StreamId) -> bool:
    """The group has nothing left (with a live flow: it has read past the backlog's last entry; `lag` is no
    help there, the consumers trim the stream and Redis then reports it as nil)."""
    info = (await client.xinfo_groups(keys.DEFAULT_STREAM_KEY))[0]
    if live_rate:
        return parse_stream_id(info["last-delivered-id"]) >= backlog_last
    return bool(info["lag"] == 0 and info["pending"] == 0)


def print_cpu(r: CatchUp, ticks: int) -> None:
    """Where the catch-up's CPU went: per process, and inside Redis per command (µs per tick)."""
    cores = os.cpu_count() or 1
    total = sum(r.cpu.values())
    per_tick_us = total * 1e6 / ticks
    print(f"  CPU during the catch-up: {total:.1f} core-s of {r.total_s * cores:.1f} available ({cores} cores), "
          f"{per_tick_us:.1f} core-µs per tick: 100,000 ticks/s would need {per_tick_us / 10:.1f} cores")  # fmt: skip
    for name, seconds in sorted(r.cpu.items(), key=lambda kv: -kv[1]):
        print(f"    {name:<14} {seconds:>6.1f} s  {seconds * 1e6 / ticks:>6.2f} µs/tick")
    busiest = sorted(r.commandstats.items(), key=lambda kv: -kv[1][1])[:6]
    inside = ", ".join(f"{cmd} {usec / ticks:.2f}" for cmd, (_calls, usec) in busiest)
    print(f"    inside Redis, µs/tick (fcall includes the commands it runs): {inside}")


async def tier_latencies(redis: RedisServer, qdb_server: QuestDBServer, rounds: int) -> dict[str, list[float]]:
    settings = Settings(
        brain_redis_url=redis.url, brain_questdb_url=qdb_server.url, symbols=SYMBOLS, hot_ticks=100, warm_window_s=300
    )
    out: dict[str, list[float]] = {}
    async with TieredMarketData(settings, registry=CollectorRegistry()) as md:
        sym = SYMBOLS[0]
        now = now_us()
        for _ in range(100):  # warm-up: connections, QuestDB query plans
            await md.recent(sym, 10)
            await md.recent(sym, 500)
        out["hot"] = await timed(lambda: _expect(md.recent(sym, 10), "hot"), rounds * 10)
        # WARM: ~10 trades from a minute ago (older than HOT's 100, inside the 5-minute window).
        w0 = md.hot(sym)[0].timestamp - 60_000_000
        out["warm"] = await timed(lambda: _expect(md.range(sym, w0, w0 + 100_000), "warm"), rounds)
        out["warm_recent500"] = await timed(lambda: _expect(md.recent(sym, 500), "warm"), rounds // 4)
        old_start = now - 900_000_000
        for _ in range(10):
            await md.range(sym, old_start, old_start + 50_000)
        out["cold"] = await timed(
            lambda: _expect(md.range(sym, old_start, old_start + 50_000), "cold"), max(50, rounds // 10)
        )
        client = md.redis
        out["ceiling_redis_ping"] = await timed(lambda: execute_packed(client, [["PING"]]), rounds)
        lean = RawRedis(redis.url)  # the kind of connection WARM reads use
        out["ceiling_redis_ping_lean"] = await timed(lambda: lean.execute([["PING"]]), rounds)
        await lean.close()
        out["ceiling_questdb_select1"] = await timed(lambda: md.qdb.rows("SELECT 1"), max(50, rounds // 10))
    return out


async def _expect(answer: Awaitable[object], tier: str) -> None:
    got = await answer
    tiers: tuple[str, ...] = getattr(got, "tiers", ("?",))
    if tiers[-1] != tier:
        raise AssertionError(f"expected the {tier} tier, got {tiers}")


async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="tb-bench-brain-"))
    redis = RedisServer(workdir=workdir / "redis")
    qdb = QuestDBServer(workdir=workdir / "questdb")
    redis.start()
    qdb.start()
    try:
        print(f"tickbridge bench-brain  (cpus={os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}: noisy if >2)")
        if args.only_fastforward:
            await fastforward_ab(qdb, args.fastforward_ticks, args.fastforward_rounds, workdir)
            return
        # Ceilings before and after the catch-up: the machine is shared, so bracket the run.
        xadd_before = redis_benchmark_xadd(redis.port)
        drain_before = await drain_ceiling(redis.url)
        r = await catch_up(
            redis,
            qdb,
            args.ticks,
            args.consumers,
            workdir,
            consumer_batch=args.consumer_batch,
            writer_batch=args.writer_batch,
        )
        xadd = (xadd_before + redis_benchmark_xadd(redis.port)) / 2
        drain = (drain_before + await drain_ceiling(redis.url)) / 2
        lat = await tier_latencies(redis, qdb, args.rounds)
        if args.fastforward_rounds:
            print("fast-forward A/B (issue 16)")
            await fastforward_ab(qdb, args.fastforward_ticks, args.fastforward_rounds, workdir)
    finally:
        redis.stop()
        qdb.stop()
    print()
    print("catch-up (Brain stream backlog -> rows visible in QuestDB trades)")
    rate, consumer_rate = args.ticks / r.total_s, args.ticks / r.consumer_s
    took = f"{args.ticks:,} in {r.total_s:.1f} s"
    print(f"  end to end      {rate:>10,.0f} ticks/s  ({took}; aim 100,000, design needs 28,800)")
    print(f"  consumer alone  {consumer_rate:>10,.0f} ticks/s  (group drained after {r.consumer_s:.1f} s)")
    print("  ceilings: mean of before and after the catch-up")
    print(f"  ceiling: redis-benchmark XADD P128   {xadd:>10,.0f} ops/s  -> end to end = {rate / xadd:.2f}x")
    print(f"  ceiling: XREADGROUP+XACK (Python)    {drain:>10,.0f} entries/s -> end to end = {rate / drain:.2f}x, "
          f"consumer = {consumer_rate / drain:.2f}x")  # fmt: skip
    print_cpu(r, args.ticks)
    print()
    print("tier latencies (ms)              p50       p99     design   design/p50  design/p99  (>1 = faster)")
    for tier in ("hot", "warm", "cold"):
        s = lat[tier]
        p50, p99 = pct(s, 0.5), pct(s, 0.99)
        print(f"  {tier:<6} n={len(s):<6}     {p50:>9.4f} {p99:>9.4f}   {DESIGN[tier]:>10} "
              f"{DESIGN_MS[tier] / p50:>8.1f}x {DESIGN_MS[tier] / p99:>10.1f}x")  # fmt: skip
    for name in ("warm_recent500", "ceiling_redis_ping", "ceiling_redis_ping_lean", "ceiling_questdb_select1"):
        s = lat[name]
        print(f"  {name:<24} {pct(s, 0.5):>9.4f} {pct(s, 0.99):>9.4f}")
    warm_ratio = pct(lat["warm"], 0.5) / pct(lat["ceiling_redis_ping_lean"], 0.5)
    cold_ratio = pct(lat["cold"], 0.5) / pct(lat["ceiling_questdb_select1"], 0.5)
    print(f"  WARM p50 = {warm_ratio:.1f}x a PING on the lean link; COLD p50 = {cold_ratio:.1f}x a QuestDB SELECT 1")
    print(f"  (mean HOT {statistics.fmean(lat['hot']) * 1000:.1f} µs; load avg at the end {os.getloadavg()[0]:.1f})")
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tickbridge_dev.bench.brain", description=__doc__)
    p.add_argument("--ticks", type=int, default=1_000_000)
    p.add_argument("--consumers", type=int, default=2, help="consumer processes in the group")
    p.add_argument("--consumer-batch", type=int, default=2000, help="CONSUMER_BATCH of the consumers")
    p.add_argument("--writer-batch", type=int, default=50_000, help="WRITER_BATCH_ROWS of the writer")
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--fastforward-ticks", type=int, default=300_000, help="backlog of the fast-forward on/off A/B")
    p.add_argument("--fastforward-rounds", type=int, default=2, help="on/off pairs of that A/B (0: skip it)")
    p.add_argument("--only-fastforward", action="store_true", help="run only the fast-forward on/off A/B")
    asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    main()
