"""`python -m tickbridge_dev.bench.forwarder_live`: the forwarder's live hop alone, in µs, and its CPU per entry
at a live rate (issue 20), optionally A/B against another checkout's forwarder.

Per round: a VPS and a Brain redis-server and the forwarder as the deployed process (`python -m tickbridge
forwarder`, FORWARDER_LANE=ordered; the VPS QuestDB buffer started once for all rounds). This process appends
trades to the VPS stream at `--rate` (batches every 5 ms, as the collector does, each entry's `recv_ts` the
wall clock in µs when its batch is sent) for `--seconds`, while the load test's followers (`devstack/hopwatch.py`)
stamp "recv_ts -> visible to a reader" on the VPS stream and on the Brain stream, and the floor pair (one Redis
hop to a Python reader) runs on the Brain Redis. Printed per round: the forwarder's share of the hop (p50 and
p99 of the Brain stream minus those of the VPS stream, µs), the floor, the forwarder's core-µs per entry, and
the 1-min load average. `--base-python DIR/.venv/bin/python` alternates (base, new, base, new) with the
forwarder of the checkout that interpreter imports; the harness is this one for both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from tickbridge.core import keys
from tickbridge.core.redis_io import Command, execute_packed, make_client
from tickbridge.core.wire import now_us
from tickbridge_dev.devstack.hopwatch import HopWatch
from tickbridge_dev.devstack.loadtest import hop_table
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer, free_port
from tickbridge_dev.loadgen.forwarder import trade_fields

KEY = keys.DEFAULT_STREAM_KEY
BATCH_S = 0.005


async def _append(url: str, rate: float, seconds: float) -> int:
    """Trades at `rate` for `seconds`, `recv_ts` = send time (µs); returns how many."""
    client = make_client(url)
    sent, i, start = 0, 0, time.monotonic()
    try:
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate) - sent
            if due > 0:
                stamp = str(now_us()).encode()
                cmds: list[Command] = []
                for _ in range(due):
                    fields = trade_fields(i)
                    fields[-1] = stamp  # the contract's last field: recv_ts
                    cmds.append([b"XADD", KEY, b"*", *fields])
                    i += 1
                await execute_packed(client, cmds)
                sent += due
            await asyncio.sleep(BATCH_S)
    finally:
        await client.aclose()
    return sent


async def one_round(python: str, qdb: QuestDBServer, workdir: Path, rate: float, seconds: float) -> dict[str, float]:
    vps = RedisServer(workdir=workdir / "vps").start()
    brain = RedisServer(workdir=workdir / "brain").start()
    assert isinstance(vps, RedisServer) and isinstance(brain, RedisServer)
    env = {**os.environ, "VPS_REDIS_URL": vps.url, "BRAIN_REDIS_URL": brain.url, "VPS_QUESTDB_URL": qdb.url,
           "FORWARDER_LANE": "ordered", "METRICS_PORT": str(free_port()), "LOG_LEVEL": "WARNING"}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(python, "-m", "tickbridge", "forwarder", env=env)
    watch: HopWatch | None = None
    try:
        await _append(vps.url, 50, 3.0)  # the forwarder connects and forwards: warm-up, not measured
        watch = HopWatch(vps.url, brain.url, ["BTCUSDT"], workdir / "hw")
        if not await asyncio.to_thread(watch.wait_ready):
            # Without its followers the bench would measure nothing and print empty figures: stop instead.
            raise RuntimeError(f"hop followers not connected within 60 s (logs in {workdir / 'hw'})")
        await asyncio.sleep(0.5)  # connected: now blocking in XREAD
        fwd = psutil.Process(proc.pid)
        t0 = fwd.cpu_times()
        sent = await _append(vps.url, rate, seconds)
        t1 = fwd.cpu_times()
        samples = watch.stop()
        watch = None
        table = hop_table(samples)
        cpu_us = (t1.user + t1.system - t0.user - t0.system) * 1e6
        return {
            "share_p50": table["brain_stream"]["share_p50"],
            "share_p99": table["brain_stream"]["share_p99"],
            "vps_p50": table["vps_stream"]["p50"],
            "floor_p50": table["floor"]["p50"],
            "floor_p99": table["floor"]["p99"],
            "us_per_entry": cpu_us / max(1, sent),
            "samples": table["brain_stream"]["n"],
        }
    finally:
        if watch is not None:
            watch.stop()
        proc.terminate()
        await proc.wait()
        vps.stop()
        brain.stop()


async def run(rate: float, seconds: float, rounds: int, base_python: str | None) -> None:
    variants = ([("base", base_python)] if base_python else []) + [("new", sys.executable)]
    workdir = Path(tempfile.mkdtemp(prefix="tb-bench-fwd-live-"))
    qdb = QuestDBServer(workdir=workdir / "questdb")
    qdb.start()
    try:
        print(f"{'variant':<7} {'hop share p50 µs':>16} {'p99':>7} {'VPS p50':>8} {'floor p50':>9} {'p99':>7} "
              f"{'core-µs/entry':>13} {'samples':>7} {'load1':>6}")  # fmt: skip
        for n in range(rounds):
            for name, python in variants:
                r = await one_round(python, qdb, workdir / f"{name}{n}", rate, seconds)
                print(f"{name:<7} {r['share_p50']:>16} {r['share_p99']:>7} {r['vps_p50']:>8.0f} {r['floor_p50']:>9.0f} "
                      f"{r['floor_p99']:>7.0f} {r['us_per_entry']:>13.1f} {r['samples']:>7.0f} "
                      f"{os.getloadavg()[0]:>6.2f}", flush=True)  # fmt: skip
    finally:
        qdb.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1200.0, help="trades/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base-python", help="another checkout's interpreter: its forwarder is the A/B's base")
    opts = parser.parse_args(argv)
    asyncio.run(run(opts.rate, opts.seconds, opts.rounds, opts.base_python))


if __name__ == "__main__":
    main()
